"""report.html's first screen and ``compare`` read as a risk committee would (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flower_ext.report import build_report, compare_runs, human_bytes

BANKS = {
    "bank-0": ("gains", 0.74, [0.70, 0.78], 0.66, [0.03, 0.13]),
    "bank-1": ("no significant difference", 0.72, [0.67, 0.77], 0.71, [-0.01, 0.03]),
    "bank-2": ("loses", 0.70, [0.66, 0.74], 0.73, [-0.05, -0.01]),
}


def _metrics(dp: bool = False, diverged: bool = False) -> dict:
    per_bank = {}
    for name, (verdict, fed, ci, loc, gain_ci) in BANKS.items():
        row = {
            "federated_auc": fed,
            "federated_auc_ci": ci,
            "federated_gini": 2 * fed - 1,
            "federated_ks": 0.4,
            "local_only_auc": None if dp else loc,
            "federation_gain": None if dp else fed - loc,
            "gain_ci": None if dp else gain_ci,
            "gain_p_value": None if dp else 0.01,
            "verdict": None if dp else verdict,
            "verdict_note": "not available under DP" if dp else None,
            "num_test_examples": 500,
            "test_default_rate": 0.2,
            "predicted_default_rate": 0.18,
            "brier": 0.15,
            "reliability": {"predicted": [0.05, 0.2, 0.4], "observed": [0.04, 0.22, 0.45]},
            "ceiling_auc": fed + 0.01,
            "health": None,
        }
        if dp:
            row.update(epsilon=2.5, delta=1e-5)
        per_bank[name] = row
    if diverged:
        per_bank["bank-2"]["health"] = "diverged: log-odds reach 1e+19"
        per_bank["bank-2"]["federated_auc"] = 0.28
    config = {"num-server-rounds": 2, "aggregation": "median", "csv-path": "", "dataset": "x"}
    if dp:
        config.update({"dp": "dp-sgd", "dp-delta": 1e-5, "dp-target-epsilon": 3.0})
    rounds = [
        {
            "round": r,
            "evaluate": {"auc": 0.7, "ks": 0.4},
            "bytes_up": 1_234_567,
            "bytes_down": 2_000,
            **({"privacy": {b: {"epsilon": 1.2 * r, "delta": 1e-5} for b in BANKS}} if dp else {}),
        }
        for r in (1, 2)
    ]
    return {
        "status": "finished",
        "config": config,
        "config_defaults": {"num-server-rounds": 20, "aggregation": "fedavg", "csv-path": ""},
        "rounds": rounds,
        "final": {"auc": 0.72, "ks": 0.41, "gini": 0.44, "brier": 0.15},
        "per_bank": per_bank,
        "centralized_auc": 0.73,
        "ceiling": {
            "auc": 0.73,
            "best_epoch": 12,
            "label": "centralized ceiling: early stopping",
            "federated_vs_ceiling": {
                "diff": -0.01,
                "low": -0.02,
                "high": 0.0,
                "verdict": "no significant difference",
            },
        },
        "model_health": {"bank-2": per_bank["bank-2"]["health"]} if diverged else {},
        "verdict_summary": {"holm": {"gains": 0, "loses": 1}},
    }


def _run(tmp_path: Path, name: str = "run", **kw) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(**kw)))
    return run


def _first_screen(page: str) -> str:
    return page[: page.index("<img")]  # everything before the first chart


def test_first_screen_has_the_verdict_table_before_any_chart(tmp_path):
    page = build_report(_run(tmp_path)).html_path.read_text()
    first = _first_screen(page)
    for words in ("gains", "no significant difference", "loses"):
        assert words in first
    assert "Federation <b>gains</b> at 1" in first and "<b>loses</b> at 1 of 3" in first
    assert "[+0.030, +0.130]" in first  # the paired interval, signed
    assert "centralized ceiling 0.7300" in first and "12 epochs chosen by early stopping" in first
    assert "slot: what the audit verified" in first
    assert first.index('id="verdict"') < first.index("slot: what the audit verified")
    assert "null" not in page  # no literal null in any cell
    assert "2.47 MB" in page and "2469134" not in page  # bytes with units
    assert '<table class="changed">' in page and "<b>aggregation</b>" in page  # override
    assert "keys of features that are off" in page  # csv-* folded away in a synthetic run
    assert "Calibration per bank" in page


def test_dp_run_shows_epsilon_delta_and_no_verdict(tmp_path):
    page = build_report(_run(tmp_path, dp=True)).html_path.read_text()
    first = _first_screen(page)
    assert "epsilon spent up to <b>2.4</b>" in first and "delta 1e-05" in first
    assert "budget 3" in first
    assert "not available under DP" in first
    assert "0.0000" not in first
    assert "| not available under DP |" in compare_runs(
        [_run(tmp_path, "c", dp=True)], tmp_path / "c.png"
    )


def test_diverged_model_is_flagged_on_the_first_screen(tmp_path):
    first = _first_screen(build_report(_run(tmp_path, diverged=True)).html_path.read_text())
    assert "Model health" in first and "diverged: log-odds reach 1e+19" in first
    assert "0.2800" in first  # its exact AUC, not 0.5


def test_compare_has_the_verdict_columns(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b", diverged=True)
    table = compare_runs([a, b], tmp_path / "cmp.png")
    header = table.splitlines()[0]
    for col in ("ceiling AUC", "fed / ceiling", "banks gain / n.s. / lose", "banks flagged"):
        assert col in header
    assert re.search(r"\| a \|.*\| 1 / 1 / 1 \(Holm: 0 / 1\) \| 0 \| 2\.47 MB \|", table)
    assert "| -, no significant difference |" in table  # the paired ceiling verdict
    assert re.search(r"\| b \|.*\| 1 \| 2\.47 MB \|", table)


@pytest.mark.parametrize(("n", "text"), [(999, "999 B"), (1234, "1.23 kB"), (5.5e6, "5.5 MB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_first_screen_gives_holms_count_and_flags_an_inverted_pooled_model(tmp_path):
    """Review: metrics.json had Holm's count, the committee's first screen did not."""
    first = _first_screen(build_report(_run(tmp_path)).html_path.read_text())
    assert "after Holm's correction for 3 banks, <b>gains at 0</b> and loses at 1" in first
    assert "inverted ranking" not in first
    run = _run(tmp_path, "inverted")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["final"]["auc"] = 0.28
    (run / "metrics.json").write_text(json.dumps(metrics))
    first = _first_screen(build_report(run).html_path.read_text())
    assert "Pooled federated AUC <b>0.2800</b>" in first and "inverted ranking" in first
