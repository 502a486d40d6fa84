"""Reports, run comparison and audit verification, built from a real short simulation."""

from __future__ import annotations

import json
import shutil

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from flower_ext.audit import AuditTrail
from flower_ext.cli import main as cli
from flower_ext.report import build_report, compare_runs
from flower_ext.runcheck import verify_run


@pytest.mark.slow
def test_report_references_every_chart_that_applies(simulated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(simulated_run, run)
    report = build_report(run)
    page = report.html_path.read_text()
    # no DP, nobody rejected; the reliability chart from the banks' calibration summaries
    assert set(report.charts) == {"auc_ks", "per_bank", "reliability", "bytes"}
    assert page.count("data:image/png;base64,") == 4
    for title in ("Pooled AUC and KS", "Federated vs local-only", "Calibration per bank"):
        assert title in page
    assert "Epsilon" not in page and "Rejected or failed" not in page
    assert "hash chain intact" in page and "did not finish" not in page
    for path in report.charts.values():
        image = mpimg.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # not blank


@pytest.mark.slow
def test_rejections_appear_when_present_and_partial_runs_say_so(simulated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(simulated_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["status"] = "failed"
    metrics["error"] = "RuntimeError: server lost power"
    metrics["rounds"] = metrics["rounds"][:2]
    (run / "metrics.json").write_text(json.dumps(metrics))
    AuditTrail(run / "audit.jsonl").record(
        "reply_rejected", round=2, node_id=7, label="bank-9", reason="update contains NaN or Inf"
    )
    report = build_report(run)
    page = report.html_path.read_text()
    assert "rejections" in report.charts
    assert "update contains NaN or Inf" in page and "bank-9" in page
    assert "It stopped after round 2 of 4" in page and "server lost power" in page


@pytest.mark.slow
def test_verify_passes_on_a_real_run_and_names_the_tampered_line(simulated_run, tmp_path):
    assert verify_run(simulated_run).ok
    assert cli(["verify", str(simulated_run)]) == 0
    run = tmp_path / "run"
    shutil.copytree(simulated_run, run)
    lines = (run / "audit.jsonl").read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if '"round_aggregated"' in line)
    event = json.loads(lines[target])
    event["accepted"] = 99
    lines[target] = json.dumps(event)
    (run / "audit.jsonl").write_text("\n".join(lines) + "\n")
    result = verify_run(run)
    assert not result.ok and result.problem.line == target + 1
    assert cli(["verify", str(run)]) == 1


@pytest.mark.slow
def test_verify_detects_a_truncated_trail(simulated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(simulated_run, run)
    lines = (run / "audit.jsonl").read_text().splitlines()
    cut = max(i for i, line in enumerate(lines) if '"round_start"' in line)
    (run / "audit.jsonl").write_text("\n".join(lines[: cut + 2]) + "\n")
    result = verify_run(run)
    assert not result.ok
    assert "never closed" in str(result.problem)
    assert result.problem.line == cut + 1


@pytest.mark.slow
def test_compare_runs_table_and_chart(simulated_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(simulated_run, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["config"]["aggregation"] = "median"
    (other / "metrics.json").write_text(json.dumps(metrics))
    png = tmp_path / "cmp.png"
    table = compare_runs([simulated_run, other], png)
    assert "| run | aggregation |" in table
    assert "| sim | fedavg |" in table and "| other | median |" in table
    assert png.stat().st_size > 10_000


def test_png_rendering_of_a_known_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "line.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    image = mpimg.imread(path)
    assert image.shape[:2] == (300, 400)
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10
