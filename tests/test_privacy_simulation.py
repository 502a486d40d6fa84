"""Budget exhaustion in a real multi-round run (Flower's Ray simulation, in-process)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_trail_finished

from flower_ext.audit import verify_audit_trail


@pytest.mark.slow
def test_banks_stop_at_their_budget_and_the_run_finishes(tmp_path):
    from bank_risk.simulate import run_bank_simulation

    budget = 7.0
    run_dir = run_bank_simulation(
        {
            "num-server-rounds": 4,
            "num-banks": 3,
            "rows-per-bank": 400,
            "model": "logreg",
            "dp": "dp-sgd",
            "dp-noise-multiplier": 1.0,
            "dp-epsilon-budget": budget,
            "local-only-baseline": False,
            "centralized-baseline": False,
            "output-dir": str(tmp_path),
            "run-name": "dp-budget",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["rounds"]) == 4
    first = metrics["rounds"][0]["privacy"]
    assert len(first) == 3
    for row in first.values():
        assert set(row) == {
            "epsilon",
            "delta",
            "noise_multiplier",
            "max_grad_norm",
            "sample_rate",
            "steps",
        }
        assert 0 < row["epsilon"] <= budget and row["delta"] == 1e-5
    refusals = [
        (entry["round"], bank)
        for entry in metrics["rounds"]
        for bank, row in entry.get("privacy", {}).items()
        if "refused" in row
    ]
    assert refusals, "some bank must run out of budget within 4 rounds"
    for bank, row in metrics["per_bank"].items():
        assert row["epsilon"] is not None and row["epsilon"] <= budget, bank
    # Per bank, epsilon only grows, and never past the budget.
    history: dict[str, list[float]] = {}
    for entry in metrics["rounds"]:
        for bank, row in entry.get("privacy", {}).items():
            if "epsilon" in row:
                history.setdefault(bank, []).append(row["epsilon"])
    assert all(h == sorted(h) and h[-1] <= budget for h in history.values())

    events = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    why = [e for e in events if e["event"] == "reply_rejected"]
    assert why and all("privacy budget exhausted" in e["reason"] for e in why)
    assert any(e["event"] == "privacy" for e in events)
    assert_trail_finished(events)
    assert verify_audit_trail(run_dir / "audit.jsonl") is None
