"""Personalisation: the kernels (intercept correction, fine-tuning), the bank's reply
(summaries only), the run-config checks, and one short real simulation."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import _as_server
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from sklearn.metrics import roc_auc_score

from bank_risk.client_app import app as client_app
from bank_risk.client_app import load_context_bank
from bank_risk.personalisation import (
    NUMERIC_KEYS,
    PERSONALISE_QUERY,
    TEXT_KEYS,
    bank_entry,
    check_fits_run,
    read_reply,
)
from bank_risk.settings import BankAppSettings, SettingsError
from flower_ext.data.scenarios import bayes_logit
from flower_ext.model import build_model
from flower_ext.personalise import (
    PersonalisationConfig,
    apply_intercept_offset,
    beats_both,
    calibrate_intercept,
    finetune,
    intercept_offset,
    log_loss_of_logits,
    personalisation_summary,
    personalise,
)
from flower_ext.training import TrainConfig, predict_logits, train_local
from flower_ext.verdict import sigmoid


def _scored_rows(n: int = 3000, shift: float = -1.5, seed: int = 0):
    """Log-odds of a miscalibrated model and labels drawn from a shifted truth."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < sigmoid(z + shift)).astype(np.int64)
    return z, y


# ------------------------------------------------------------------ intercept correction
@pytest.mark.parametrize("shift", [-3.0, -1.5, 0.0, 2.0])
def test_intercept_hits_the_observed_rate_and_keeps_the_ranking(shift):
    z, y = _scored_rows(shift=shift)
    b = intercept_offset(z, y)
    assert abs(float(np.mean(sigmoid(z + b))) - float(np.mean(y))) < 1e-6
    assert roc_auc_score(y, z + b) == roc_auc_score(y, z)  # one constant shift: same ranking
    # b is the log-loss minimiser over the offset: nudging it either way costs loss
    best = log_loss_of_logits(y, z + b)
    assert best < log_loss_of_logits(y, z + b + 1e-3)
    assert best < log_loss_of_logits(y, z + b - 1e-3)


def test_intercept_converges_for_extreme_and_tied_scores():
    z = np.array([-60.0] * 50 + [0.0] * 10 + [55.0] * 40)
    y = np.array([0] * 45 + [1] * 5 + [0, 1] * 5 + [1] * 40)
    b = intercept_offset(z, y)
    assert abs(float(np.mean(sigmoid(z + b))) - float(np.mean(y))) < 1e-6


@pytest.mark.parametrize("labels", [np.zeros(20), np.ones(20)])
def test_intercept_refuses_one_class_rows(labels):
    with pytest.raises(ValueError, match="both classes"):
        intercept_offset(np.linspace(-1, 1, 20), labels)


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_intercept_correction_of_a_model_moves_every_log_odds_by_the_offset(kind):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(800, 4)).astype(np.float32)
    y = (rng.random(800) < sigmoid(x[:, 0] - 2.5)).astype(np.int64)  # about 10% default
    model = build_model(4, kind, "8", seed=1)
    before = predict_logits(model, x)
    offset = calibrate_intercept(model, x, y)
    after = predict_logits(model, x)
    assert np.allclose(after - before, offset, atol=1e-5)
    assert abs(float(np.mean(sigmoid(after))) - float(np.mean(y))) < 1e-6
    assert roc_auc_score(y, after) == pytest.approx(roc_auc_score(y, before), abs=1e-12)
    apply_intercept_offset(model, -offset)  # and back
    assert np.allclose(predict_logits(model, x), before, atol=1e-5)


# -------------------------------------------------------------------------- fine-tuning
def _concept_shifted_bank(seed: int = 0):
    """The federation learned "x0 raises risk"; in this bank's book x0 lowers it."""
    rng = np.random.default_rng(seed)

    def rows(n, sign):
        x = rng.normal(size=(n, 3)).astype(np.float32)
        y = (rng.random(n) < sigmoid(sign * 2.0 * x[:, 0] + 0.5 * x[:, 1] - 1.0)).astype(np.int64)
        return x, y

    return rows(3000, +1.0), rows(600, -1.0), rows(200, -1.0)


def test_finetune_improves_the_training_loss_of_a_concept_shifted_bank():
    (x_fed, y_fed), (x_tr, y_tr), (x_val, y_val) = _concept_shifted_bank()
    global_model = build_model(3, "logreg", seed=0)
    train_local(global_model, x_fed, y_fed, TrainConfig(epochs=5, learning_rate=0.05, seed=1))
    train_loss_before = log_loss_of_logits(y_tr, predict_logits(global_model, x_tr))
    model = build_model(3, "logreg")
    model.load_state_dict(global_model.state_dict())
    result = finetune(
        model, x_tr, y_tr, x_val, y_val, TrainConfig(learning_rate=0.05, seed=2), max_epochs=5
    )
    train_loss_after = log_loss_of_logits(y_tr, predict_logits(model, x_tr))
    assert train_loss_after < train_loss_before - 0.05
    assert 1 <= result.best_epoch <= result.epochs_run <= 5
    assert result.best_val_loss < result.initial_val_loss
    # personalise() works on a copy: the global model is left as it was
    snapshot = {k: v.clone() for k, v in global_model.state_dict().items()}
    mine = personalise(
        global_model,
        x_tr,
        y_tr,
        x_val,
        y_val,
        PersonalisationConfig(mode="finetune+intercept", epochs=3),
        TrainConfig(learning_rate=0.05, seed=2),
    )
    assert all(torch.equal(snapshot[k], v) for k, v in global_model.state_dict().items())
    assert mine.finetune is not None and mine.intercept_offset is not None
    rate = float(np.mean(sigmoid(predict_logits(mine.model, x_tr))))
    assert rate == pytest.approx(float(np.mean(y_tr)), abs=1e-6)


def test_finetune_keeps_the_global_model_when_no_epoch_helps_on_validation():
    (x_fed, y_fed), _, _ = _concept_shifted_bank()
    model = build_model(3, "logreg", seed=0)
    train_local(model, x_fed, y_fed, TrainConfig(epochs=5, seed=1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # training rows from the shifted book, validation rows from the federation's own:
    # every fine-tuning epoch makes validation worse, so epoch 0 is kept
    (x_tr, y_tr) = _concept_shifted_bank(seed=5)[1]
    result = finetune(
        model, x_tr, y_tr, x_fed[:500], y_fed[:500], TrainConfig(learning_rate=0.2, seed=3), 6, 2
    )
    assert result.best_epoch == 0 and result.early_stopped and result.epochs_run == 2
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------- the bank's summary
def test_summary_counts_a_bank_as_beating_both_only_with_both_lower_bounds_above_zero():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.2).astype(np.int64)
    signal = y + rng.normal(0, 0.6, 2000)
    weak = y + rng.normal(0, 3.0, 2000)
    out = personalisation_summary(y, weak, signal, weak * 0.5 + rng.normal(0, 2, 2000))
    assert out["vs-global-ci-low"] > 0 and out["vs-local-ci-low"] > 0 and beats_both(out)
    same = personalisation_summary(y, signal, signal + 0.3, weak)  # a pure shift: no gain
    assert same["vs-global-diff"] == 0.0 and same["vs-global-verdict"] != "gains"
    assert not beats_both(same)


RUN_CONFIG = {
    "dataset": "synthetic",
    "num-banks": 3,
    "rows-per-bank": 600,
    "num-server-rounds": 2,
    "model": "logreg",
    "personalisation": "finetune+intercept",
    "personalisation-epochs": 3,
}


def _bank_context(partition: int = 0, run_config: dict | None = None, **node) -> Context:
    return Context(
        run_id=7,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 3, **node},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **(run_config or {})},
    )


def _personalise_message(context: Context, epochs: int = 2) -> Message:
    """The server's personalisation query, with a global model trained ``epochs`` epochs
    on this bank's rows."""
    _, bank = load_context_bank(context)
    model = build_model(bank.num_features, "logreg", seed=0)
    std = bank.x_train.std(axis=0)
    std[std < 1e-8] = 1.0
    model.set_standardisation(bank.x_train.mean(axis=0), std)
    train_local(model, bank.x_train, bank.y_train, TrainConfig(epochs=epochs, seed=0))
    _as_server()
    return Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "config": ConfigRecord(
                    {"query": PERSONALISE_QUERY, "server-round": 2, "num-server-rounds": 2}
                ),
            }
        ),
        message_type=MessageType.QUERY,
        dst_node_id=context.node_id,
    )


def test_the_bank_replies_with_summary_numbers_only(as_server):
    context = _bank_context()
    reply = client_app(_personalise_message(context), context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    content = reply.content
    assert len(content.array_records) == 0  # the personalised model stays at the bank
    assert set(content.keys()) == {"personalisation", "client-info"}
    numbers, words = content["personalisation"], content["client-info"]
    assert isinstance(numbers, MetricRecord) and isinstance(words, ConfigRecord)
    assert set(numbers) <= NUMERIC_KEYS and set(words) <= TEXT_KEYS
    # no list, no vector: one number per key, a few dozen at most
    assert all(isinstance(v, (int, float)) and not isinstance(v, list) for v in numbers.values())
    assert len(numbers) <= len(NUMERIC_KEYS) <= 40
    assert all(isinstance(v, str) and len(v) <= 300 for v in words.values())
    for key in ("auc-global", "auc-personalised", "auc-local-only", "vs-global-ci-low"):
        assert key in numbers
    # a synthetic bank adds its true risk's AUC on the same test rows, nothing per row
    _, bank = load_context_bank(context)
    truth = bayes_logit("segments", 0, dict(zip(bank.feature_names, bank.x_test.T, strict=True)))
    assert numbers["auc-bayes"] == pytest.approx(roc_auc_score(bank.y_test, truth), abs=1e-12)
    assert numbers["bayes-vs-global-diff"] == pytest.approx(
        numbers["auc-bayes"] - numbers["auc-global"], abs=1e-12
    )
    # the server's reading: checked fields, its own verdicts and count
    row = read_reply(reply)
    entry = bank_entry(context.node_id, row)
    low_g, low_l = entry["vs_global"]["ci"][0], entry["vs_local_only"]["ci"][0]
    assert entry["beats_both"] == (low_g > 0 and low_l > 0)
    assert entry["finetune"]["epochs_run"] >= 1 and "intercept_offset" in entry
    bayes = entry["bayes"]
    lows = (bayes["vs_global"]["ci"][0], bayes["vs_local_only"]["ci"][0])
    assert bayes["beats_both"] == (min(lows) > 0)
    json.dumps(entry)  # fit for metrics.json


def test_the_server_rejects_a_reply_carrying_more_than_the_summary(as_server):
    context = _bank_context(1)
    reply = client_app(_personalise_message(context), context)
    reply.content["personalisation"]["auc-global"] = [0.7, 0.8]  # type: ignore[index]
    with pytest.raises(ValueError, match="not one number"):
        read_reply(reply)
    reply.content["personalisation"] = MetricRecord({"scores": 0.5})
    with pytest.raises(ValueError, match="unexpected field 'scores'"):
        read_reply(reply)


def test_a_bank_whose_own_policy_requires_dp_refuses_to_personalise(as_server):
    context = _bank_context(0, **{"dp-required": "dp-sgd"})
    reply = client_app(_personalise_message(_bank_context(0)), context)
    assert reply.has_error()


# ------------------------------------------------------------------ run-config checks
@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"personalisation": "fine-tune"}, "personalisation must be one of"),
        ({"personalisation": "finetune", "personalisation-epochs": 0}, "personalisation-epochs"),
        ({"personalisation": "finetune", "personalisation-epochs": 2.5}, "whole number"),
        ({"personalisation": "finetune", "personalisation-learning-rate": -1}, "learning-rate"),
        ({"personalisation": "intercept", "dp": "dp-sgd"}, "cannot run with dp = 'dp-sgd'"),
        ({"personalisation": "finetune", "dp": "update"}, "cannot run with dp = 'update'"),
        ({"personalisation": "intercept", "he": True}, "cannot run with he = true"),
    ],
)
def test_bad_personalisation_settings_are_clear_errors(overrides, words):
    with pytest.raises(SettingsError, match=words):
        BankAppSettings.from_config(overrides)


def test_a_bad_personalisation_value_stops_the_server_before_it_touches_the_grid():
    from bank_risk.server_app import main

    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(),
        run_config={"personalisation": "everything"},
    )  # fmt: skip
    with pytest.raises(SettingsError, match="personalisation must be one of"):
        main(None, context)  # type: ignore[arg-type]  # a grid call would raise otherwise


def test_personalisation_off_is_the_default_and_accepts_spellings():
    assert not BankAppSettings.from_config({}).personalisation.enabled
    cfg = PersonalisationConfig.from_run_config({"personalisation": " Intercept+Finetune "})
    assert cfg.mode == "finetune+intercept" and cfg.finetune and cfg.intercept
    assert replace(cfg, mode="off").enabled is False


# ------------------------------------------------------------ a short real simulation
@pytest.mark.slow
def test_a_personalised_run_finishes_with_the_block_and_a_consistent_count(tmp_path):
    from bank_risk.simulate import run_bank_simulation
    from flower_ext.audit.verify import verify_run

    run_dir = run_bank_simulation(
        {
            "num-server-rounds": 3,
            "num-banks": 3,
            "rows-per-bank": 800,
            "centralized-baseline": False,
            "personalisation": "finetune+intercept",
            "personalisation-epochs": 3,
            "output-dir": str(tmp_path),
            "run-name": "personalised",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished", metrics.get("error")
    block = metrics["personalisation"]
    assert block["mode"] == "finetune+intercept" and block["banks_answered"] == 3
    assert not block["failed"]
    winners = [
        b
        for b, r in block["per_bank"].items()
        if r["vs_global"]["ci"][0] > 0 and r["vs_local_only"]["ci"][0] > 0
    ]
    assert block["banks_beating_both"] == len(winners)
    assert block["banks_beating_both_names"] == winners
    reachable = [b for b, r in block["per_bank"].items() if r["bayes"]["beats_both"]]
    assert block["banks_reachable"] == len(reachable)
    assert block["banks_reachable_names"] == reachable
    assert block["banks_with_true_risk"] == 3
    assert block["line"].endswith(
        f"the generator's true risk itself does at {len(reachable)} of 3 (reachable)"
    )
    for name, row in block["per_bank"].items():
        verdict_row = metrics["per_bank"][name]
        # the same final global model and the same local-only model as the verdict's
        assert row["global_auc"] == pytest.approx(verdict_row["federated_auc"], abs=1e-9)
        assert row["local_only_auc"] == pytest.approx(verdict_row["local_only_auc"], abs=1e-9)
        assert 0.0 <= row["observed_default_rate"] <= 1.0
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "run_end")
    assert end["personalisation"] == block  # verify compares them too
    result = verify_run(run_dir)
    assert result.ok, result.problem
    report = (run_dir / "report.html").read_text()
    assert "Personalisation" in report and "true-risk AUC" in report


# ------------------------------------------------- the server's checks of a bank's summary
def _consistent_numbers() -> dict[str, float]:
    """A summary that agrees with itself: 200 test rows, 40 defaults, gains on both."""
    aucs = {"global": 0.70, "personalised": 0.80, "local-only": 0.75}
    nums: dict[str, float] = {
        "num-examples": 200,
        "observed-rate": 0.2,
        **{f"auc-{m}": v for m, v in aucs.items()},
        **{f"predicted-rate-{m}": 0.21 for m in aucs},
        **{f"brier-{m}": 0.15 for m in aucs},
        "finetune-epochs-run": 5,
        "finetune-best-epoch": 3,
        "finetune-val-loss-before": 0.5,
        "finetune-val-loss-after": 0.45,
        "intercept-offset": 0.1,
        "seconds": 1.5,
    }
    for prefix, other in (("vs-global", "global"), ("vs-local", "local-only")):
        diff = aucs["personalised"] - aucs[other]
        nums.update(
            {
                f"{prefix}-diff": diff,
                f"{prefix}-ci-low": diff - 0.04,
                f"{prefix}-ci-high": diff + 0.04,
                f"{prefix}-p-value": 0.01,
            }
        )
    return nums


def _summary_reply(nums: dict[str, float], words: dict[str, str] | None = None) -> Message:
    return Message(
        content=RecordDict(
            {
                "personalisation": MetricRecord(nums),  # type: ignore[arg-type]
                "client-info": ConfigRecord({"bank": "b", "mode": "finetune", **(words or {})}),
            }
        ),
        message_type=MessageType.QUERY,
        dst_node_id=1,
    )


def test_a_consistent_summary_passes_and_beats_both_comes_from_its_intervals(as_server):
    row = read_reply(_summary_reply(_consistent_numbers()))
    entry = bank_entry(1, row)
    assert entry["beats_both"] and entry["vs_global"]["verdict"] == "gains"
    assert entry["num_test_examples"] == 200 and entry["finetune"]["best_epoch"] == 3
    # no vs-local interval (the bank could not compute one): passes, but does not beat both
    nums = {k: v for k, v in _consistent_numbers().items() if not k.startswith("vs-local-")}
    row = read_reply(_summary_reply(nums, {"vs-local-unavailable": "too few rows"}))
    entry = bank_entry(1, row)
    assert not entry["beats_both"] and entry["vs_local_only"]["ci"] is None
    # a summary with no finetune and no comparison at all (one class only) passes too
    row = read_reply(
        _summary_reply(
            {"num-examples": 30, "observed-rate": 0.0, "seconds": 0.1},
            {"unavailable": "the test rows hold one class only: no AUC"},
        )
    )
    assert not bank_entry(1, row)["beats_both"]


def test_a_real_summary_passes_the_server_checks(as_server):
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.15).astype(np.int64)
    out = personalisation_summary(
        y, y + rng.normal(0, 2, 400), y + rng.normal(0, 0.7, 400), y + rng.normal(0, 1.2, 400)
    )
    nums = {k: float(v) for k, v in out.items() if k in NUMERIC_KEYS}
    words = {k: str(v) for k, v in out.items() if k in TEXT_KEYS}
    entry = bank_entry(1, read_reply(_summary_reply(nums, words)))
    assert entry["beats_both"] == (out["vs-global-ci-low"] > 0 and out["vs-local-ci-low"] > 0)


def _diff_of(**ci: float) -> dict[str, float]:
    return {f"vs-global-{k.replace('_', '-')}": v for k, v in ci.items()}


@pytest.mark.parametrize(
    ("change", "words", "match"),
    [
        # the difference is not the difference of the AUCs it is about
        ({"vs-global-diff": 0.12}, None, r"'vs-global-diff' = 0.12 is not auc-personalised"),
        ({"auc-local-only": 0.60}, None, r"'vs-local-diff' = .* is not auc-personalised"),
        ({"auc-global": None}, None, r"sent without 'auc-personalised' and 'auc-global'"),
        # AUCs outside [0, 1]
        ({"auc-global": 1.2}, None, r"'auc-global' = 1.2 is outside \[0, 1\]"),
        ({"auc-personalised": -0.1}, None, r"'auc-personalised' = -0.1 is outside \[0, 1\]"),
        # differences and interval bounds outside [-1, 1]
        (_diff_of(diff=3.0, ci_low=2.0, ci_high=4.0), None, r"'vs-global-diff' = 3 is outside"),
        ({"vs-local-ci-low": -1.5}, None, r"'vs-local-ci-low' = -1.5 is outside \[-1, 1\]"),
        ({"vs-global-ci-high": 1.2}, None, r"'vs-global-ci-high' = 1.2 is outside \[-1, 1\]"),
        # low > high; the difference outside its own interval
        (_diff_of(ci_low=0.15, ci_high=0.05), None, r"'vs-global' interval has low .* > high"),
        (_diff_of(ci_low=0.11, ci_high=0.2), None, r"'vs-global-diff' = .* is outside its"),
        ({"vs-global-ci-high": None}, None, r"'vs-global' is incomplete"),
        ({"vs-local-diff": None}, None, r"'vs-local' is incomplete"),
        # p-values outside [0, 1]
        ({"vs-global-p-value": 7.0}, None, r"'vs-global-p-value' = 7 is outside \[0, 1\]"),
        ({"vs-local-p-value": -0.01}, None, r"'vs-local-p-value' = -0.01 is outside \[0, 1\]"),
        # negative or non-whole counts; best epoch after the last epoch run
        ({"num-examples": -200}, None, r"'num-examples' = -200 is not a whole count"),
        ({"num-examples": 200.5}, None, r"'num-examples' = 200.5 is not a whole count"),
        ({"finetune-epochs-run": -2}, None, r"'finetune-epochs-run' = -2 is not a whole count"),
        ({"finetune-epochs-run": 4.5}, None, r"'finetune-epochs-run' = 4.5 is not a whole"),
        ({"finetune-best-epoch": -1}, None, r"'finetune-best-epoch' = -1 is not a whole"),
        ({"finetune-best-epoch": 2.5}, None, r"'finetune-best-epoch' = 2.5 is not a whole"),
        ({"finetune-best-epoch": 9}, None, r"'finetune-best-epoch' = 9 is after the last epoch"),
        ({"finetune-epochs-run": None}, None, r"'finetune-best-epoch' without"),
        ({"seconds": -5.0}, None, r"'seconds' = -5 is negative"),
        # an interval sent together with an "unavailable" reason
        ({}, {"vs-global-unavailable": "one class only"}, r"'vs-global' sends diff, ci-low"),
        ({}, {"unavailable": "the test rows hold one class only"}, r"together with an unavail"),
        # an interval from fewer than 10 rows of one class
        ({"observed-rate": 0.04}, None, r"'vs-global' interval from 8 test rows of one class"),
        ({"observed-rate": 0.97}, None, r"interval from 6 test rows of one class"),
        ({"num-examples": 15, "observed-rate": None}, None, r"from 7 test rows of one class"),
        ({"observed-rate": 0.2013}, None, r"not a whole number of defaults"),
    ],
)
def test_the_server_rejects_a_summary_that_contradicts_itself(as_server, change, words, match):
    nums = _consistent_numbers()
    nums.update(change)
    nums = {k: v for k, v in nums.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        read_reply(_summary_reply(nums, words))


# ------------------------------------------ the true-risk yardstick (synthetic banks only)
def _with_bayes(nums: dict[str, float], auc: float = 0.90, half: float = 0.04) -> dict[str, float]:
    """``nums`` plus a consistent true-risk block: AUC ``auc``, intervals of half-width
    ``half`` around its differences from the global and the local-only AUC."""
    out = dict(nums, **{"auc-bayes": auc})
    for prefix, other in (("bayes-vs-global", "global"), ("bayes-vs-local", "local-only")):
        diff = auc - nums[f"auc-{other}"]
        out.update(
            {
                f"{prefix}-diff": diff,
                f"{prefix}-ci-low": diff - half,
                f"{prefix}-ci-high": diff + half,
                f"{prefix}-p-value": 0.01,
            }
        )
    return out


def test_the_true_risk_beats_both_only_with_both_lower_bounds_above_zero(as_server):
    # global 0.70, local-only 0.75: true risk 0.90 +- 0.04 beats both; 0.77 +- 0.04 does not
    entry = bank_entry(1, read_reply(_summary_reply(_with_bayes(_consistent_numbers()))))
    assert entry["bayes"]["auc"] == 0.90 and entry["bayes"]["beats_both"]
    close = bank_entry(1, read_reply(_summary_reply(_with_bayes(_consistent_numbers(), 0.77))))
    assert close["bayes"]["vs_global"]["ci"][0] > 0 and close["bayes"]["vs_local_only"]["ci"][0] < 0
    assert not close["bayes"]["beats_both"]
    assert "bayes" not in bank_entry(1, read_reply(_summary_reply(_consistent_numbers())))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bayes-vs-global-diff": 0.22}, r"'bayes-vs-global-diff' = 0.22 is not auc-bayes - auc"),
        ({"auc-bayes": 0.95}, r"'bayes-vs-global-diff' = .* is not auc-bayes - auc-global"),
        ({"auc-bayes": 1.5}, r"'auc-bayes' = 1.5 is outside \[0, 1\]"),
        ({"auc-bayes": None}, r"sent without 'auc-bayes' and 'auc-global'"),
        ({"bayes-vs-local-ci-high": 0.12}, r"'bayes-vs-local-diff' = .* is outside its interval"),
        ({"bayes-vs-local-ci-low": None}, r"'bayes-vs-local' is incomplete"),
    ],
)
def test_the_server_rejects_a_true_risk_block_that_contradicts_itself(as_server, change, match):
    nums = _with_bayes(_consistent_numbers())
    nums.update(change)
    with pytest.raises(ValueError, match=match):
        read_reply(_summary_reply({k: v for k, v in nums.items() if v is not None}))


def test_true_risk_figures_are_refused_from_a_run_on_real_data(as_server):
    row = read_reply(_summary_reply(_with_bayes(_consistent_numbers())))
    check_fits_run(row, "finetune", "synthetic")  # the generator's own banks: fine
    with pytest.raises(ValueError, match=r"auc-bayes.* from a run whose data is 'csv'"):
        check_fits_run(row, "finetune", "csv")
    with pytest.raises(ValueError, match="mode 'finetune', the run's is 'mix'"):
        check_fits_run(row, "mix", "synthetic")
    check_fits_run(read_reply(_summary_reply(_consistent_numbers())), "finetune", "csv")


def test_a_real_summary_with_the_true_risk_passes_and_a_wrong_length_is_refused(as_server):
    rng = np.random.default_rng(2)
    y = (rng.random(500) < 0.2).astype(np.int64)
    truth = 2.0 * y + rng.normal(0, 1, 500)
    out = personalisation_summary(
        y, truth + rng.normal(0, 2, 500), truth + rng.normal(0, 1, 500),
        truth + rng.normal(0, 1.5, 500), bayes_logits=truth,
    )  # fmt: skip
    assert out["auc-bayes"] == pytest.approx(roc_auc_score(y, truth))
    assert "predicted-rate-bayes" not in out and "brier-bayes" not in out  # ranking only
    nums = {k: float(v) for k, v in out.items() if k in NUMERIC_KEYS}
    words = {k: str(v) for k, v in out.items() if k in TEXT_KEYS}
    entry = bank_entry(1, read_reply(_summary_reply(nums, words)))
    assert entry["bayes"]["beats_both"] == (
        out["bayes-vs-global-ci-low"] > 0 and out["bayes-vs-local-ci-low"] > 0
    )
    with pytest.raises(ValueError, match="bayes_logits must be 500 finite log-odds"):
        personalisation_summary(y, truth, truth, truth, bayes_logits=truth[:-1])


def test_the_report_shows_the_true_risk_table_escaped_and_only_for_synthetic_banks():
    from flower_ext.report import personalisation_section

    bank = {
        "global_auc": 0.7,
        "personalised_auc": "<script>x</script>",  # metrics.json is editable
        "local_only_auc": 0.75,
        "bayes": {
            "auc": "<b>0.9</b>",
            "vs_global": {"diff": 0.2, "ci": [0.1, 0.3], "verdict": "gains"},
            "vs_local_only": {"diff": 0.15, "ci": [0.05, 0.25], "verdict": "gains"},
            "beats_both": True,
        },
    }
    html_text = personalisation_section(
        {"personalisation": {"mode": "mix", "per_bank": {"b0": bank}}}
    )
    assert "true-risk AUC" in html_text and "b0 <b>reachable</b>" in html_text
    assert "<script>" not in html_text and "&lt;b&gt;0.9&lt;/b&gt;" in html_text
    del bank["bayes"]
    real = personalisation_section({"personalisation": {"mode": "mix", "per_bank": {"b0": bank}}})
    assert "true-risk AUC" not in real and "reachable" not in real


def test_a_synthetic_bank_scores_the_true_risk_of_its_own_scenario_and_bank(as_server):
    """The reply's auc-bayes is the true risk of the run's scenario at this bank's index (not
    the default scenario's, not bank 0's): a concept-shifted bank's book changes it."""
    context = _bank_context(2, run_config={"scenario": "concept-shift"})
    reply = client_app(_personalise_message(context), context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    _, bank = load_context_bank(context)
    columns = dict(zip(bank.feature_names, bank.x_test.T, strict=True))

    def auc_of(scenario: str, index: int) -> float:
        return float(roc_auc_score(bank.y_test, bayes_logit(scenario, index, columns)))

    sent = reply.content["personalisation"]["auc-bayes"]
    assert sent == pytest.approx(auc_of("concept-shift", 2), abs=1e-12)
    assert (
        abs(sent - auc_of("segments", 2)) > 1e-3 and abs(sent - auc_of("concept-shift", 0)) > 1e-3
    )
