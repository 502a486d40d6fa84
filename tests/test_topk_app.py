"""The bank app with top-k on: the saving shows up in metrics.json, the audit trail has it."""

from __future__ import annotations

import json

import pytest

from flower_ext.audit import verify_audit_trail


@pytest.mark.slow
def test_bank_app_with_topk_sends_few_bytes(tmp_path):
    from bank_risk.simulate import run_bank_simulation

    run_dir = run_bank_simulation(
        {
            "num-server-rounds": 2,
            "num-banks": 3,
            "rows-per-bank": 600,
            "hidden-units": "256,128",  # ~39k parameters: the payload, not the envelope, counts
            "topk-ratio": 0.01,
            "local-only-baseline": False,
            "centralized-baseline": False,
            "output-dir": str(tmp_path),
            "run-name": "topk",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    dense_payload = 4 * metrics["model"]["num_parameters"]
    for entry in metrics["rounds"]:
        assert entry["clients"]["accepted"] == 3
        train_up = entry["bytes_by_type"]["up"]["train"]
        # 1% of the entries at ~3 bytes each plus the envelope: far below 5% of dense.
        assert train_up / 3 < 0.05 * dense_payload
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    topk_rounds = [e for e in events if e["event"] == "topk_round"]
    assert [e["sparse"] for e in topk_rounds] == [3, 3]
    assert verify_audit_trail(run_dir / "audit.jsonl") is None
