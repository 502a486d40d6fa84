"""Issue 18, "training that fits": per-bank validation rows, best round by pooled validation
AUC (with its model kept), the learning-rate schedule, the warning when federation is far
below the ceiling, the verdict count over banks with a verdict, one-line data errors."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from sklearn.metrics import roc_auc_score

from bank_risk.client_app import DATA_ERROR_CODE, round_learning_rate_of
from bank_risk.server_app import RoundRecorder, app_metrics, federated_standardisation
from bank_risk.settings import BankAppSettings, SettingsError
from bank_risk.verdicts import (
    best_round_summary,
    ceiling_gap_warning,
    verdict_counts,
    verdict_lines,
    verdict_summary,
)
from flower_ext.audit import AuditTrail
from flower_ext.data import DataError, DataSource, load_bank
from flower_ext.metrics import score_sketch
from flower_ext.model import build_model
from flower_ext.records import arrays_sha256
from flower_ext.report import verdict_section
from flower_ext.runlog import BEST_MODEL_FILE, load_checkpoint
from flower_ext.training import LR_FINAL_FRACTION, round_learning_rate
from strategies.base import pooled_histogram_metrics

# --- validation rows -------------------------------------------------------------------


def test_each_bank_holds_validation_rows_out_of_its_training_rows():
    with_val = load_bank(DataSource(validation_fraction=0.15), 1)
    without = load_bank(DataSource(validation_fraction=0.0), 1)
    assert len(without.y_val) == 0
    # The test rows do not depend on the validation split; train = fit + validation rows.
    np.testing.assert_array_equal(with_val.x_test, without.x_test)
    assert len(with_val.y_train) + len(with_val.y_val) == len(without.y_train)
    assert len(with_val.y_val) == round(0.15 * len(without.y_train))
    assert set(np.unique(with_val.y_val)) == {0, 1}  # stratified: both classes
    rows = {tuple(r) for r in with_val.x_train.tolist()}
    assert not rows & {tuple(r) for r in with_val.x_val.tolist()}  # disjoint
    again = load_bank(DataSource(validation_fraction=0.15), 1)  # deterministic by seed
    np.testing.assert_array_equal(again.x_val, with_val.x_val)
    other = load_bank(DataSource(validation_fraction=0.15, seed=7), 1)
    assert not np.array_equal(other.y_val, with_val.y_val) or len(other.y_val) == 0


def test_validation_fraction_is_checked():
    assert DataSource.from_config({"validation-fraction": 0.2}).validation_fraction == 0.2
    with pytest.raises(DataError, match="validation-fraction"):
        DataSource.from_config({"validation-fraction": 0.9})


def test_pooled_validation_auc_from_the_banks_validation_sketches():
    rng = np.random.default_rng(3)
    records, ys, scores = [], [], []
    for n in (300, 120, 60):
        y = (rng.random(n) < 0.3).astype(int)
        s = rng.normal(size=n) + y
        edges, neg, pos = score_sketch(y, s)
        records.append(
            {"val-hist-edges": edges.tolist(), "val-hist-neg": neg.tolist(),
             "val-hist-pos": pos.tolist()}
        )  # fmt: skip
        ys.append(y)
        scores.append(s)
    auc, _ = pooled_histogram_metrics(records, prefix="val-")
    assert auc == pytest.approx(roc_auc_score(np.concatenate(ys), np.concatenate(scores)), abs=1e-3)
    assert pooled_histogram_metrics(records) is None  # the test-row keys are not these
    # The app shows the pooled validation figures, never the sketches.
    shown = app_metrics({"pooled-val-auc": 0.7, "val-hist-neg": [1], "hist-neg": [2]})
    assert shown == {"validation_auc": 0.7}


# --- best round --------------------------------------------------------------------------


def _arrays(seed: int) -> ArrayRecord:
    return ArrayRecord(build_model(3, "logreg", seed=seed).state_dict())


def test_best_round_follows_validation_never_test_and_keeps_its_model(tmp_path):
    settings = BankAppSettings.from_config({})
    recorder = RoundRecorder(settings, None, None, None, None, run_dir=tmp_path)  # type: ignore[arg-type]
    models = {r: _arrays(r) for r in (1, 2, 3, 4)}
    rounds = {  # round 3 has the best *test* AUC, round 2 the best validation AUC
        1: {"auc": 0.70, "validation_auc": 0.71},
        2: {"auc": 0.72, "validation_auc": 0.75},
        3: {"auc": 0.80, "validation_auc": 0.74},
        4: {"auc": 0.69, "validation_auc": 0.75},  # a tie keeps the earlier round
    }
    for rnd, metrics in rounds.items():
        recorder.track_best(rnd, models[rnd], metrics, arrays_sha256(models[rnd]))
    assert recorder.best["round"] == 2 and recorder.best["auc"] == 0.72
    kept = load_checkpoint(tmp_path, BEST_MODEL_FILE)
    assert kept.server_round == 2 and kept.model_sha256 == arrays_sha256(models[2])
    summary = best_round_summary(recorder.best, 4, rounds[4], settings)
    assert summary["round"] == 2 and summary["final_auc"] == 0.69
    assert summary["file"] == BEST_MODEL_FILE
    no_banks = verdict_counts({})
    line = verdict_lines({"auc": 0.69}, {"null_reason": "off"}, {}, no_banks, settings, summary)[1]
    assert "round 2" in line and "validation 0.7500" in line and "final round 4" in line


def test_no_best_round_without_validation_rows():
    settings = BankAppSettings.from_config({"validation-fraction": 0.0})
    summary = best_round_summary({}, 5, {"auc": 0.7}, settings)
    assert summary["round"] is None and "validation-fraction = 0" in summary["null_reason"]


# --- learning-rate schedule ---------------------------------------------------------------


def test_learning_rate_schedules():
    rates = {s: [round_learning_rate(s, 0.1, r, 20) for r in range(1, 21)] for s in
             ("constant", "cosine", "step")}  # fmt: skip
    assert rates["constant"] == [0.1] * 20
    assert rates["cosine"][0] == pytest.approx(0.1)
    assert rates["cosine"][-1] == pytest.approx(0.1 * LR_FINAL_FRACTION)
    assert all(a > b for a, b in zip(rates["cosine"], rates["cosine"][1:], strict=False))
    assert rates["step"][:5] == [0.1] * 5 and rates["step"][5] == pytest.approx(0.05)
    assert rates["step"][-1] == pytest.approx(0.1 / 8)
    assert round_learning_rate("cosine", 0.1, 1, 1) == 0.1  # one round: the base rate
    with pytest.raises(ValueError, match="lr-schedule"):
        round_learning_rate("linear", 0.1, 1, 10)
    with pytest.raises(SettingsError, match="lr-schedule"):
        BankAppSettings.from_config({"lr-schedule": "linear"})


def test_banks_use_the_rate_the_server_sends_and_fall_back_to_the_schedule():
    settings = BankAppSettings.from_config({"lr-schedule": "cosine", "num-server-rounds": 10})
    assert round_learning_rate_of({"learning-rate": 0.02}, settings, 3) == 0.02
    expected = round_learning_rate("cosine", settings.learning_rate, 10, 10)
    assert round_learning_rate_of({}, settings, 10) == pytest.approx(expected)
    for bad in (float("nan"), -1.0, 1e6, "x"):  # an absurd rate is not trusted
        assert round_learning_rate_of({"learning-rate": bad}, settings, 10) == pytest.approx(
            expected
        )


# --- far below the ceiling -------------------------------------------------------------


def _ceiling(diff: float, verdict: str) -> dict:
    return {
        "auc": 0.8,
        "federated_vs_ceiling": {
            "diff": diff, "low": diff - 0.01, "high": diff + 0.01, "p_value": 0.001,
            "verdict": verdict,
        },
    }  # fmt: skip


def test_warning_when_federated_is_far_and_significantly_below_the_ceiling():
    warning = ceiling_gap_warning(_ceiling(-0.043, "loses"))
    assert warning is not None and "0.0430 AUC below" in warning
    assert ceiling_gap_warning(_ceiling(-0.043, "no significant difference")) is None
    assert ceiling_gap_warning(_ceiling(-0.01, "loses")) is None  # within 0.02
    assert ceiling_gap_warning({"auc": None, "null_reason": "deployment"}) is None
    settings = BankAppSettings.from_config({})
    ceiling = _ceiling(-0.043, "loses")
    lines = verdict_lines({"auc": 0.757}, ceiling, {}, verdict_counts({}), settings, None, warning)
    assert any(line.startswith("WARNING: ") for line in lines)
    html = verdict_section({"final": {"auc": 0.757}, "warnings": [warning]})
    assert "0.0430 AUC below" in html


# --- verdict count over banks with a verdict ----------------------------------------------


def test_summary_counts_only_banks_with_a_verdict():
    per_bank = {
        "bank-a": {"verdict": "gains"},
        "bank-b": {"verdict": "gains"},
        "bank-c": {"verdict": "no significant difference"},
        "bank-x": {
            "verdict": None,
            "verdict_note": "not computed",
            "auc_null_reason": "test split holds only non-defaults (21 rows)",
        },
    }
    summary = verdict_summary(per_bank)
    assert summary["banks_with_verdict"] == 3 and summary["gains"] == 2
    assert summary["line"].startswith("gains at 2, no significant difference at 1, loses at 0 of 3")
    assert "bank-x: test split holds only non-defaults" in summary["line"]
    settings = BankAppSettings.from_config({})
    verdicts = verdict_counts(per_bank)
    lines = verdict_lines({"auc": 0.7}, {"null_reason": "off"}, per_bank, verdicts, settings)
    assert any("of 3 banks with a verdict; bank-x" in line for line in lines)
    html = verdict_section({"per_bank": per_bank, "final": {}})
    assert "of 3 banks with a verdict" in html and "only non-defaults" in html


def test_summary_adds_holms_count_over_the_banks():
    """Five banks each at 95%: p = 0.03 'gains' is expected by chance in one of them;
    the line says what survives Holm's correction (only p = 0.001 here)."""
    per_bank = {
        "bank-a": {"verdict": "gains", "gain_p_value": 0.001},
        "bank-b": {"verdict": "gains", "gain_p_value": 0.03},
        "bank-c": {"verdict": "no significant difference", "gain_p_value": 0.4},
        "bank-d": {"verdict": "loses", "gain_p_value": 0.02},
        "bank-e": {"verdict": "no significant difference", "gain_p_value": 0.9},
    }
    summary = verdict_summary(per_bank)
    assert summary["holm"] == {"gains": 1, "loses": 0}
    assert "after Holm's correction for 5 banks: gains at 1, loses at 0" in summary["line"]
    per_bank["bank-e"].pop("gain_p_value")  # a bank that sent none: no corrected count
    assert verdict_summary(per_bank)["holm"] is None


# --- one-line data errors, old (non-schema) path -----------------------------------------


class OneBankGrid:
    """The real ClientApp for a few banks, in-process (what the runtime would deliver)."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts

    def send_and_receive(self, messages, timeout=None):
        from conftest import sent
        from flwr.supercore.task_identity import TaskIdentity

        from bank_risk.client_app import app as client_app

        replies = []
        for msg in sent(messages):
            node = int(msg.metadata.dst_node_id)
            TaskIdentity.node_id = node
            replies.append(client_app(msg, self.contexts[node]))  # raising fails the test
        return replies


def test_a_bad_bank_file_is_one_line_from_that_bank(tmp_path, as_server):
    folder = tmp_path / "banks"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        lines = ["x1,x2,default"] + [
            f"{rng.normal():.3f},{rng.normal():.3f},{int(rng.random() < 0.3)}" for _ in range(60)
        ]
        if i == 1:
            lines[5] = "0.1,abc,0"  # a text cell in a numeric column, at bank 1
        (folder / f"bank-{i}.csv").write_text("\n".join(lines) + "\n")
    config = {"dataset": "csv", "csv-source": "per-bank", "num-banks": 2,
              "csv-label-column": "default", "csv-drop-columns": "", "model": "logreg"}  # fmt: skip
    contexts = {
        100 + i: Context(
            run_id=1,
            node_id=100 + i,
            node_config={"bank-index": i, "csv-path": str(folder / f"bank-{i}.csv")},
            state=RecordDict(),
            run_config=config,
        )
        for i in range(2)
    }
    grid = OneBankGrid(contexts)
    audit = AuditTrail()
    with pytest.raises(RuntimeError) as caught:
        federated_standardisation(grid, [100, 101], 5.0, audit)
    message = str(caught.value)
    assert "\n" not in message and "1 of 2 banks" in message
    assert "bank-1.csv" in message and "data error at bank 1" in message
    failed = [e for e in audit.events if e["event"] == "stats_failed"]
    assert [e["node_id"] for e in failed] == [101]
    assert f"error reply {DATA_ERROR_CODE}" in failed[0]["reason"]
    assert "\n" not in failed[0]["reason"] and "Traceback" not in failed[0]["reason"]
    # Train and evaluate at that bank answer the same way (the round goes on without it).
    reply = grid.send_and_receive(
        [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=101)]
    )[0]
    assert reply.has_error() and reply.error.code == DATA_ERROR_CODE


def test_a_banks_verdict_word_follows_its_interval_not_its_claim():
    from bank_risk.verdicts import per_bank_row

    settings = BankAppSettings.from_config({})
    lying = {"auc": 0.7, "local-only-auc": 0.75, "gain-ci-low": -0.08, "gain-ci-high": -0.02,
             "verdict": "gains"}  # fmt: skip
    assert per_bank_row(lying, settings)["verdict"] == "loses"
    backwards = {**lying, "gain-ci-low": 0.05, "gain-ci-high": -0.05}
    assert per_bank_row(backwards, settings)["verdict"] is None
    nan = {**lying, "gain-ci-low": float("nan")}
    assert per_bank_row(nan, settings)["verdict"] is None


def test_min_local_steps_gives_small_banks_more_epochs_by_hand():
    from flower_ext.training import epochs_for_min_steps

    assert epochs_for_min_steps(1, 70, 64, 10) == 5  # 2 steps an epoch -> 5 epochs
    assert epochs_for_min_steps(1, 1275, 64, 10) == 1  # 20 steps an epoch already
    assert epochs_for_min_steps(3, 70, 64, 10) == 5 and epochs_for_min_steps(7, 70, 64, 10) == 7
    assert epochs_for_min_steps(1, 640, 64, 10) == 1 and epochs_for_min_steps(1, 576, 64, 10) == 2
    assert epochs_for_min_steps(1, 70, 64, 0) == 1  # off
    assert epochs_for_min_steps(2, 0, 64, 10) == 2  # no rows: nothing to step on
    with pytest.raises(ValueError, match="min_steps >= 0"):
        epochs_for_min_steps(1, 70, 64, -1)


@pytest.mark.parametrize("bad", [-1, 2.5, "ten", True])
def test_min_local_steps_must_be_a_whole_number(bad):
    from bank_risk.settings import BankAppSettings, SettingsError

    with pytest.raises(SettingsError, match="min-local-steps must be a whole number >= 0"):
        BankAppSettings.from_config({"min-local-steps": bad})
    ok = BankAppSettings.from_config({"min-local-steps": 20.0})
    assert ok.min_local_steps == 20 and ok.local_epochs_for(70) == 10
    assert BankAppSettings.from_config({}).min_local_steps == 10
