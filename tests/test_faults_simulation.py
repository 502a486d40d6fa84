"""Faulty banks in Flower's Ray simulation: the run finishes and the audit says who, when, why.

Each test runs the real bank app (3 banks, 2 rounds, few rows) with one bank made
faulty by the app's test-only switch (run config ``fault-banks``/``fault-kind``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_trail_finished

from flower_ext.audit import MAX_REASON_CHARS, verify_audit_trail
from flower_ext.data.synthetic import bank_name

ROUNDS = 2


def _run(tmp_path: Path, name: str, **overrides) -> tuple[dict, list[dict]]:
    from bank_risk.simulate import run_bank_simulation

    run_dir = run_bank_simulation(
        {
            "num-server-rounds": ROUNDS,
            "num-banks": 3,
            "min-banks": 2,
            "rows-per-bank": 300,
            "model": "logreg",
            "local-only-baseline": False,
            "centralized-baseline": False,
            "output-dir": str(tmp_path),
            "run-name": name,
            **overrides,
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    assert verify_audit_trail(run_dir / "audit.jsonl") is None
    return metrics, events


def _check_short(reason: str) -> None:
    assert 0 < len(reason) <= MAX_REASON_CHARS
    assert "\x1b" not in reason and "\n" not in reason and "Traceback" not in reason
    assert "^^" not in reason and 'File "' not in reason


def _finished(metrics: dict, events: list[dict]) -> None:
    assert metrics["status"] == "finished"
    assert [e["round"] for e in events if e["event"] == "round_aggregated"] == [1, 2]
    assert_trail_finished(events)


@pytest.mark.slow
def test_a_raising_bank_is_audited_by_label_round_and_short_reason(tmp_path):
    metrics, events = _run(tmp_path, "raise", **{"fault-banks": "1", "fault-kind": "raise"})
    _finished(metrics, events)
    rejected = [e for e in events if e["event"] == "reply_rejected"]
    assert [e["round"] for e in rejected] == [1, 2]
    for event in rejected:
        assert event["label"] == bank_name(1)  # known from the standardisation query
        _check_short(event["reason"])
        assert "injected fault (fault-kind=raise) in bank 1, round" in event["reason"]
    accepted = [e for e in events if e["event"] == "client_update"]
    assert {e["label"] for e in accepted} == {bank_name(0), bank_name(2)}


@pytest.mark.slow
def test_a_nan_bank_is_rejected_by_label_round_and_reason(tmp_path):
    metrics, events = _run(tmp_path, "nan", **{"fault-banks": "2", "fault-kind": "nan"})
    _finished(metrics, events)
    rejected = [e for e in events if e["event"] == "reply_rejected"]
    assert [e["round"] for e in rejected] == [1, 2]
    for event in rejected:
        assert event["label"] == bank_name(2)
        _check_short(event["reason"])
        assert "nan" in event["reason"].lower()
    assert metrics["final"]["auc"] is not None  # the NaN never reached the model


@pytest.mark.slow
def test_a_slow_bank_is_missing_by_label_and_round_and_the_run_goes_on(tmp_path):
    metrics, events = _run(
        tmp_path,
        "sleep",
        **{
            "fault-banks": "0",
            "fault-kind": "sleep",
            # Longer than the banks' cold start (the first query) on a busy 2-core runner,
            # shorter than the slow bank's stall.
            "fault-sleep": 45.0,
            "round-timeout": 40.0,
        },
    )
    _finished(metrics, events)
    missing = [e for e in events if e["event"] == "client_missing"]
    assert [e["round"] for e in missing] == [1, 2]
    for event in missing:
        assert event["label"] == bank_name(0)
        if "reason" in event:  # the strategy may say why (a timeout)
            _check_short(event["reason"])
    assert all(e["label"] != bank_name(0) for e in events if e["event"] == "client_update")
