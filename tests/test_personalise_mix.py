"""Personalisation by model interpolation (``personalisation = "mix"`` / ``"finetune+mix"``):
the kernels against hand-computed values, the server's checks of a mixture's figures, and
one short in-process run that reports them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from sklearn.metrics import roc_auc_score
from test_personalise import _personalise_message

from bank_risk.client_app import app as client_app
from bank_risk.client_app import load_context_bank, local_only_metrics
from bank_risk.personalisation import (
    MIX_KEYS,
    NUMERIC_KEYS,
    bank_entry,
    local_only_logits,
    personalisation_lines,
    read_reply,
)
from bank_risk.settings import BankAppSettings, SettingsError
from flower_ext.personalise import (
    MIX_GRID,
    PersonalisationConfig,
    choose_mix_weight,
    log_loss_of_logits,
    mix_logits,
)

SOFTPLUS_MINUS_1 = 0.31326168751822286  # log(1 + e^-1)
SOFTPLUS_MINUS_2 = 0.12692801104297263  # log(1 + e^-2)
LOG_2 = 0.6931471805599453


# ------------------------------------------------------------------------ the kernels
def test_mix_logits_weights_the_two_models_log_odds():
    f, g = np.array([1.0, -2.0]), np.array([3.0, 0.0])
    # 0.25 * 1 + 0.75 * 3 + 0.5 = 3.0 ; 0.25 * -2 + 0.75 * 0 + 0.5 = 0.0
    assert mix_logits(f, g, 0.25, 0.5).tolist() == [3.0, 0.0]
    assert mix_logits(f, g, 1.0).tolist() == f.tolist()
    assert mix_logits(f, g, 0.0).tolist() == g.tolist()


@pytest.mark.parametrize(
    ("f", "g", "alpha", "match"),
    [
        ([1.0, 2.0], [1.0], 0.5, "same rows"),
        ([1.0], [1.0], 1.5, r"alpha must be in \[0, 1\]"),
        ([1.0], [1.0], -0.1, r"alpha must be in \[0, 1\]"),
    ],
)
def test_mix_logits_refuses_other_rows_or_a_weight_outside_0_1(f, g, alpha, match):
    with pytest.raises(ValueError, match=match):
        mix_logits(np.array(f), np.array(g), alpha)


def test_each_model_knowing_half_the_rows_gives_the_even_mixture():
    # y = 1, 0, 1, 0; the federated model scores rows 1-2 right (+-2) and knows nothing of
    # rows 3-4, the local-only model the other way round. Every mixture is antisymmetric in
    # pairs, so its mean predicted rate is 0.5 = the observed one (offset 0), and its mean
    # log-loss is (softplus(-2 alpha) + softplus(-2 (1 - alpha))) / 2: by symmetry least at
    # alpha = 0.5, softplus(-1) = 0.31326; at either end (softplus(-2) + log 2) / 2 = 0.41004.
    y = np.array([1, 0, 1, 0])
    fed, local = np.array([2.0, -2.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0, -2.0])
    choice = choose_mix_weight(fed, local, y)
    assert choice.alpha == 0.5
    assert choice.offset == pytest.approx(0.0, abs=1e-12)
    assert choice.val_loss == pytest.approx(SOFTPLUS_MINUS_1, abs=1e-12)
    ends = (SOFTPLUS_MINUS_2 + LOG_2) / 2
    assert choice.val_loss_federated == pytest.approx(ends, abs=1e-12)
    assert choice.val_loss_local == pytest.approx(ends, abs=1e-12)
    assert choice.note == ""


def test_an_uninformative_model_gets_no_weight():
    y = np.array([1, 0, 1, 0])
    signal, nothing = np.array([2.0, -2.0, 2.0, -2.0]), np.zeros(4)
    # mixture = alpha * signal: its loss softplus(-2 alpha) falls all the way to alpha = 1
    assert choose_mix_weight(signal, nothing, y).alpha == 1.0
    assert choose_mix_weight(nothing, signal, y).alpha == 0.0
    assert choose_mix_weight(signal, nothing, y).val_loss == pytest.approx(SOFTPLUS_MINUS_2)


def test_the_offset_recentres_the_mixture_on_the_validation_default_rate():
    # both models say 0 (50%) for every row; the rows default at 1 in 4: the offset is
    # logit(0.25) = log(1/3), the loss the rate's entropy, and every weight ties (alpha 1)
    y = np.array([1, 0, 0, 0])
    choice = choose_mix_weight(np.zeros(4), np.zeros(4), y)
    assert choice.alpha == 1.0
    assert choice.offset == pytest.approx(math.log(1 / 3), abs=1e-9)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
    assert choice.val_loss == pytest.approx(entropy, abs=1e-9)


def test_a_miscalibrated_but_better_ranking_model_still_wins():
    # the federated model ranks every row right but predicts 95% for everyone; the local one
    # is calibrated to the 50% rate but ranks half the rows wrong. Without recentring the
    # log-loss would prefer the local model for its calibration alone.
    y = np.array([1, 0, 1, 0])
    fed = np.array([4.0, 2.0, 4.0, 2.0])  # logit 0.95 +- 1, right order
    local = np.array([1.0, -1.0, -1.0, 1.0])  # calibrated, half wrong
    assert log_loss_of_logits(y, fed) > log_loss_of_logits(y, local)
    choice = choose_mix_weight(fed, local, y)
    assert choice.alpha == 1.0 and choice.offset == pytest.approx(-3.0, abs=1e-9)


def test_without_validation_rows_of_both_classes_the_federated_model_is_kept():
    choice = choose_mix_weight(np.array([0.3, 0.1]), np.array([1.0, 2.0]), np.array([0, 0]))
    assert choice.alpha == 1.0 and choice.offset == 0.0
    assert math.isnan(choice.val_loss) and "no validation rows" in choice.note


def test_the_kept_mixture_is_never_worse_on_validation_than_either_model():
    rng = np.random.default_rng(4)
    for _ in range(20):
        y = (rng.random(300) < 0.2).astype(np.int64)
        fed = 1.5 * y + rng.normal(0, 1.5, 300) + rng.normal()
        local = 1.5 * y + rng.normal(0, 1.5, 300) + rng.normal()
        choice = choose_mix_weight(fed, local, y)
        assert choice.alpha in MIX_GRID
        assert choice.val_loss <= min(choice.val_loss_federated, choice.val_loss_local) + 1e-12
        kept = mix_logits(fed, local, choice.alpha, choice.offset)
        assert log_loss_of_logits(y, kept) == pytest.approx(choice.val_loss, abs=1e-12)


def test_choose_mix_weight_refuses_a_bad_grid():
    with pytest.raises(ValueError, match="weights in"):
        choose_mix_weight(np.zeros(2), np.zeros(2), np.array([0, 1]), grid=(0.0, 2.0))
    with pytest.raises(ValueError, match="weights in"):
        choose_mix_weight(np.zeros(2), np.zeros(2), np.array([0, 1]), grid=())


# ---------------------------------------------------------------------- run config
def test_mix_modes_parse_and_mix_needs_validation_rows():
    cfg = PersonalisationConfig.from_run_config({"personalisation": " Mix+Finetune "})
    assert cfg.mode == "finetune+mix" and cfg.mix and cfg.finetune and not cfg.intercept
    plain = PersonalisationConfig.from_run_config({"personalisation": "mix"})
    assert plain.mix and not plain.finetune and not plain.intercept
    assert not PersonalisationConfig.from_run_config({"personalisation": "finetune"}).mix
    with pytest.raises(SettingsError, match="validation-fraction = 0 gives it none"):
        BankAppSettings.from_config({"personalisation": "mix", "validation-fraction": 0.0})
    with pytest.raises(SettingsError, match="cannot run with dp"):
        BankAppSettings.from_config({"personalisation": "mix", "dp": "dp-sgd"})


# ------------------------------------------------------------------------- the bank
RUN_CONFIG = {
    "dataset": "synthetic",
    "scenario": "concept-shift",
    "num-banks": 3,
    "rows-per-bank": 800,
    "num-server-rounds": 2,
    "model": "logreg",
    "personalisation": "mix",
}


def _bank_context(partition: int = 0, **run) -> Context:
    return Context(
        run_id=7,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run},
    )


def _query(context: Context) -> Message:
    return _personalise_message(context, epochs=1)


def test_the_local_only_logits_are_the_verdicts_model_on_validation_and_test_rows():
    settings, bank = load_context_bank(_bank_context())
    val, test = local_only_logits(bank, settings, local_only_metrics)
    assert val.shape == (len(bank.y_val),) and test.shape == (len(bank.y_test),)
    _, verdicts = local_only_metrics(bank, settings)
    assert np.allclose(test, verdicts, atol=1e-6)
    assert roc_auc_score(bank.y_test, test) == pytest.approx(
        roc_auc_score(bank.y_test, verdicts), abs=1e-12
    )


@pytest.mark.parametrize("mode", ["mix", "finetune+mix"])
def test_a_mixing_bank_replies_with_its_weight_and_the_server_accepts_it(as_server, mode):
    context = _bank_context(1, personalisation=mode, **{"personalisation-epochs": 2})
    reply = client_app(_query(context), context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    assert len(reply.content.array_records) == 0  # the mixture stays at the bank
    numbers = reply.content["personalisation"]
    assert set(numbers) <= NUMERIC_KEYS and "mix-alpha" in numbers
    assert numbers["mix-alpha"] in MIX_GRID
    assert numbers["mix-val-loss"] <= min(
        numbers["mix-val-loss-federated"], numbers["mix-val-loss-local-only"]
    )
    assert ("finetune-epochs-run" in numbers) == (mode == "finetune+mix")
    entry = bank_entry(context.node_id, read_reply(reply))
    assert entry["mix"]["alpha"] == numbers["mix-alpha"]
    assert entry["beats_both"] == (
        entry["vs_global"]["ci"][0] > 0 < entry["vs_local_only"]["ci"][0]
    )
    json.dumps(entry)


# ------------------------------------------------- the server's checks of a mixture
def _mix_numbers(alpha: float = 0.6) -> dict[str, float]:
    """A mixture's summary that agrees with itself: 200 test rows, 40 defaults."""
    aucs = {"global": 0.70, "personalised": 0.80, "local-only": 0.75}
    nums: dict[str, float] = {
        "num-examples": 200,
        "observed-rate": 0.2,
        **{f"auc-{m}": v for m, v in aucs.items()},
        "mix-alpha": alpha,
        "mix-offset": -0.2,
        "mix-val-loss": 0.40,
        "mix-val-loss-federated": 0.45,
        "mix-val-loss-local-only": 0.43,
    }
    for prefix, other in (("vs-global", "global"), ("vs-local", "local-only")):
        diff = aucs["personalised"] - aucs[other]
        nums |= {f"{prefix}-diff": diff, f"{prefix}-ci-low": diff - 0.04}
        nums |= {f"{prefix}-ci-high": diff + 0.04, f"{prefix}-p-value": 0.01}
    return nums


def _reply(nums: dict[str, float], mode: str = "mix") -> Message:
    return Message(
        content=RecordDict(
            {
                "personalisation": MetricRecord(nums),  # type: ignore[arg-type]
                "client-info": ConfigRecord({"bank": "b", "mode": mode}),
            }
        ),
        message_type=MessageType.QUERY,
        dst_node_id=1,
    )


def test_a_consistent_mixture_passes_and_is_in_the_entry(as_server):
    entry = bank_entry(1, read_reply(_reply(_mix_numbers())))
    assert entry["beats_both"] and entry["mix"]["alpha"] == 0.6
    assert entry["mix"]["validation_loss"] == {
        "mixture": 0.4,
        "federated": 0.45,
        "local_only": 0.43,
    }
    # at alpha = 1 of finetune+mix the personalised model is the fine-tuned one: any AUC
    nums = _mix_numbers(1.0)
    assert bank_entry(1, read_reply(_reply(nums, "finetune+mix")))["mix"]["alpha"] == 1.0


@pytest.mark.parametrize(
    ("change", "mode", "match"),
    [
        ({}, "finetune+intercept", r"mix-alpha, .* sent by mode 'finetune\+intercept'"),
        ({}, "everything", r"'mode' = 'everything' is not one of"),
        ({"mix-alpha": None}, "mix", r"mode 'mix' sends no 'mix-alpha'"),
        ({"mix-alpha": 0.37}, "mix", r"'mix-alpha' = 0.37 is not one of the weights"),
        ({"mix-alpha": 1.5}, "mix", r"'mix-alpha' = 1.5 is not one of the weights"),
        ({"mix-val-loss": -0.1}, "mix", r"'mix-val-loss' = -0.1 is negative"),
        ({"mix-val-loss": 0.44}, "mix", r"worse than 'mix-val-loss-local-only' = 0.43"),
        # alpha 1 of mix is the global model (plus a constant): the global AUC
        ({"mix-alpha": 1.0}, "mix", r"makes the global model, but auc-personalised = 0.8"),
        # alpha 0 is the local-only model (plus a constant): its AUC, in either mode
        ({"mix-alpha": 0.0}, "finetune+mix", r"makes the local-only model, but auc-pers"),
    ],
)
def test_the_server_rejects_a_mixture_that_contradicts_itself(as_server, change, mode, match):
    nums = _mix_numbers()
    nums.update(change)
    nums = {k: v for k, v in nums.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        read_reply(_reply(nums, mode))
    assert set(MIX_KEYS.values()) <= NUMERIC_KEYS


# ------------------------------------------------------- a short in-process run
def test_a_mix_run_finishes_and_reports_each_banks_weight(tmp_path):
    from bank_risk.simulate import run_bank_inprocess

    run_dir = run_bank_inprocess(
        {
            "scenario": "concept-shift",
            "num-server-rounds": 2,
            "num-banks": 3,
            "rows-per-bank": 600,
            "model": "logreg",
            "centralized-baseline": False,
            "personalisation": "mix",
            "output-dir": str(tmp_path),
            "run-name": "mix",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished", metrics.get("error")
    block = metrics["personalisation"]
    assert block["mode"] == "mix" and block["banks_answered"] == 3 and not block["failed"]
    assert block["mix_grid"] == list(MIX_GRID)
    winners = [
        b
        for b, r in block["per_bank"].items()
        if r["vs_global"]["ci"][0] > 0 and r["vs_local_only"]["ci"][0] > 0
    ]
    assert block["banks_beating_both"] == len(winners)
    for name, row in block["per_bank"].items():
        assert row["mix"]["alpha"] in MIX_GRID
        verdict_row = metrics["per_bank"][name]
        # the same global and local-only models as the verdict's
        assert row["global_auc"] == pytest.approx(verdict_row["federated_auc"], abs=1e-9)
        assert row["local_only_auc"] == pytest.approx(verdict_row["local_only_auc"], abs=1e-9)
        if row["mix"]["alpha"] == 1.0:
            assert row["personalised_auc"] == pytest.approx(row["global_auc"], abs=1e-6)
        if row["mix"]["alpha"] == 0.0:
            assert row["personalised_auc"] == pytest.approx(row["local_only_auc"], abs=1e-6)
    lines = personalisation_lines(block)
    assert len(lines) == 4 and all("mix alpha" in line for line in lines[1:])


# ------------------------------------------------------------- the benchmark's table
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_non_iid.py"
    spec = importlib.util.spec_from_file_location("bench_non_iid", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_bench_counts_significant_and_point_wins_per_bank_size():
    bench = _bench()

    def row(size, sig, pers, fed, gain):
        banks = {f"b{i}": {"test_rows": 100 * (i + 1)} for i in range(len(pers))}
        return {
            "scenario": "hard",
            "method": "fedavg+mix",
            "rows_per_bank": size,
            "per_bank_auc": dict(zip(banks, fed, strict=True)),
            "per_bank_gain_vs_local": dict(zip(banks, gain, strict=True)),
            "personalised": {
                "banks_beating_both": sig,
                "banks": len(pers),
                "per_bank_personalised_auc": dict(zip(banks, pers, strict=True)),
                "per_bank": banks,
            },
        }

    # bank 0 above both (local = 0.70 - 0.05), bank 1 above the global only (local 0.80),
    # bank 2 below the global: 1 point win; test rows 100, 200, 300 (median 200)
    small = row(2000, 0, [0.75, 0.72, 0.69], [0.70, 0.70, 0.70], [0.05, -0.10, 0.0])
    large = row(8000, 1, [0.75, 0.72, 0.69], [0.70, 0.70, 0.70], [0.05, 0.05, 0.0])
    text = bench.personalised_table([small, large], ["hard"], ["fedavg+mix"])
    assert "| fedavg+mix | 2000 | 0 / 1 / 3 [200] |" in text
    assert "| fedavg+mix | 8000 | 1 / 2 / 3 [200] |" in text
    merged = bench.merge_saved(
        [
            {"scenarios": {"hard": {}}, "methods": {"a": {}}, "rows": [small]},
            {"scenarios": {"concept-shift": {}, "hard": {}}, "methods": {"b": {}}, "rows": [large]},
        ]
    )
    assert merged["scenarios"] == ["hard", "concept-shift"] and merged["methods"] == ["a", "b"]
    assert merged["rows"] == [small, large]


def test_the_bench_shows_reachable_banks_and_never_reads_failed_banks_as_zero():
    bench = _bench()
    base = {
        "scenario": "hard",
        "method": "fedavg+mix",
        "rows_per_bank": 2000,
        "final_auc": 0.7,
        "worst_bank_auc": 0.6,
        "bytes_up_down": 2e6,
        "rounds_to_target": None,
        "per_bank_auc": {"b0": 0.70},
        "per_bank_gain_vs_local": {"b0": 0.05},
    }
    pers = {
        "banks_beating_both": 1,
        "banks": 3,
        "per_bank_personalised_auc": {"b0": 0.75},
        "per_bank": {"b0": {"test_rows": 100}},
    }
    saved_before = dict(base, personalised=pers)  # a run saved before the true-risk figures
    synthetic = dict(base, personalised=dict(pers, banks_reachable=2, failed={}))
    broken = dict(base, personalised=dict(pers, banks_reachable=0, failed={"b1": "x", "b2": "y"}))
    assert bench.count_cell(saved_before) == "1 / 1 / 3 [100]"
    assert bench.count_cell(synthetic) == "1 / 1 / 3 [100], 2 reachable"
    assert bench.count_cell(broken) == "1 / 1 / 3 [100], 0 reachable, 2 failed"
    assert bench.cell([synthetic]).endswith("/ 1 sig, 1 pt, 2 reachable of 3")
    assert bench.cell([broken]).endswith("/ 1 sig, 1 pt, 0 reachable, 2 failed of 3")
    metrics = {
        "personalisation": {
            "mode": "mix",
            "banks": 2,
            "banks_answered": 1,
            "banks_beating_both": 0,
            "banks_reachable": 1,
            "failed": {"b1": "reply rejected: x"},
            "per_bank": {
                "b0": {
                    "num_test_examples": 300,
                    "personalised_auc": 0.8,
                    "bayes": {
                        "auc": 0.9,
                        "vs_global": {"ci": [0.01, 0.2]},
                        "vs_local_only": {"ci": [0.02, 0.3]},
                        "beats_both": True,
                    },
                }
            },
        }
    }
    got = bench.personalised(metrics)
    assert got["banks_reachable"] == 1 and got["failed"] == {"b1": "reply rejected: x"}
    bank = got["per_bank"]["b0"]
    assert bank["bayes_auc"] == 0.9 and bank["bayes_beats_both"] is True
    assert bank["bayes_vs_local_only_ci"] == [0.02, 0.3]
