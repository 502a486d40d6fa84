"""The DP review's findings, each replayed as an attack or a bad input that must now fail.

D1 a 32-bit noise seed (brute-forceable), D3 the server choosing every DP parameter
(the bank's node config now wins; the ledger keeps the strictest delta; DP modes do not
share a ledger-dir), D4 steps past the reservation, D7 a NaN disabling the clip, D8
unbounded run-config values, D10 unvalidated ledger files, D11 a metric deny-list.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from conftest import outgoing
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch.utils.data import DataLoader, TensorDataset

import flower_ext.privacy.mechanisms as mechanisms
from flower_ext.model import build_model
from flower_ext.mods.dp import UpdateDPMod
from flower_ext.privacy import (
    PRIVACY_BUDGET_ERROR_CODE,
    PRIVACY_POLICY_ERROR_CODE,
    SAMPLE_LEDGER_KEY,
    UPDATE_LEDGER_KEY,
    BankDPPolicy,
    DPSGDConfig,
    LedgerFile,
    NonFiniteUpdateError,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyPolicyViolation,
    UpdateDPConfig,
    ledger_file_for,
    make_private,
    privacy_config_from_run_config,
    privatize_update,
    secure_torch_generator,
    train_private_epochs,
)


# ----------------------------------------------------------------------------- D1
def _words(generator: torch.Generator) -> np.ndarray:
    return np.frombuffer(generator.get_state().numpy().tobytes(), dtype=np.uint64)


def test_cpu_noise_generator_cannot_be_replayed_from_a_32_or_64_bit_seed():
    generator = secure_torch_generator()
    seed = generator.initial_seed()
    draws = torch.normal(0.0, 1.0, size=(1000,), generator=generator)
    for guess in (seed & 0xFFFFFFFF, seed, 0, 67280421310721):
        replay = torch.Generator().manual_seed(guess)
        assert not torch.equal(torch.normal(0.0, 1.0, size=(1000,), generator=replay), draws)
    other = secure_torch_generator()  # two generators: independent states and draws
    assert not np.array_equal(_words(other)[3:627], _words(secure_torch_generator())[3:627])
    assert not torch.equal(torch.normal(0.0, 1.0, size=(1000,), generator=other), draws)


def test_the_state_words_are_exactly_the_csprng_words(monkeypatch):
    written = np.arange(1, 625, dtype=np.uint32) * np.uint32(2654435761)
    monkeypatch.setattr(mechanisms.secrets, "token_bytes", lambda n: written.tobytes()[:n])
    generator = secure_torch_generator()
    words = _words(generator)
    assert np.array_equal(words[3:627], written.astype(np.uint64))
    fresh = _words(torch.Generator())
    assert words[1] == fresh[1] and words[2] == fresh[2]  # left | seeded and next kept
    torch.rand(3, generator=generator)  # draws work from the written state


def test_an_unexpected_generator_layout_is_an_error_not_a_32_bit_fallback(monkeypatch):
    monkeypatch.setattr(mechanisms, "_MT_STATE_BYTES", 5057)
    with pytest.raises(RuntimeError, match="refusing to seed the DP noise from a 32-bit seed"):
        secure_torch_generator()


# ----------------------------------------------------------------------------- D3
def _ctx(node: dict, run: dict) -> Context:
    return Context(run_id=1, node_id=100, node_config=node, state=RecordDict(), run_config=run)


def test_bank_policy_from_node_config_tightens_the_run_config():
    policy = BankDPPolicy.from_node_config(
        {"dp-required": "dp-sgd", "dp-epsilon-budget": 1.0, "dp-max-delta": 1e-6}
    )
    with pytest.raises(PrivacyPolicyViolation, match=r"dp-required='dp-sgd'.*dp='off'"):
        policy.apply(None)
    with pytest.raises(PrivacyPolicyViolation, match="dp='update'"):
        policy.apply(UpdateDPConfig(noise_multiplier=2.0, delta=1e-7))
    with pytest.raises(PrivacyPolicyViolation, match="dp-max-delta"):
        policy.apply(DPSGDConfig(target_epsilon=3.0, delta=1e-5))
    capped = policy.apply(DPSGDConfig(target_epsilon=3.0, delta=1e-7))
    assert capped is not None and capped.budget == 1.0  # min(run's 3, bank's 1)
    assert capped.target_epsilon == 3.0  # the noise is still the run's
    no_budget = policy.apply(DPSGDConfig(noise_multiplier=1.0, delta=1e-7))
    assert no_budget is not None and no_budget.budget == 1.0  # a run with no budget gets one
    assert BankDPPolicy.from_node_config({"dp-required": True}).required == "any"
    assert BankDPPolicy.from_node_config({}).apply(None) is None


@pytest.mark.parametrize(
    ("node", "named"),
    [
        ({"dp-required": "sometimes"}, "dp-required must be one of"),
        ({"dp-epsilon-budget": "3"}, "node config dp-epsilon-budget must be a number"),
        ({"dp-epsilon-budget": True}, "node config dp-epsilon-budget must be a number"),
        ({"dp-epsilon-budget": 1e9}, "dp-epsilon-budget must be in"),
        ({"dp-max-delta": 0.5}, "dp-max-delta must be in"),
    ],
)
def test_bad_bank_policy_is_refused_by_name(node, named):
    with pytest.raises(PrivacyConfigError, match=named):
        BankDPPolicy.from_node_config(node)


def test_bank_app_refuses_to_train_without_the_dp_its_node_config_requires(as_server):
    from bank_risk.client_app import app as client_app
    from bank_risk.client_app import load_context_bank

    run = {"num-banks": 2, "rows-per-bank": 200, "num-server-rounds": 2, "model": "logreg"}
    node = {"partition-id": 0, "num-partitions": 2, "dp-required": "dp-sgd"}

    def train(run_config: dict) -> Message:
        ctx = _ctx(node, run_config)
        _, bank = load_context_bank(ctx)
        msg = outgoing(ArrayRecord(build_model(bank.num_features, "logreg").state_dict()), 100)
        msg.content["config"] = ConfigRecord({"server-round": 1, "num-server-rounds": 2})
        return client_app(msg, ctx)

    for run_dp in ({"dp": "off"}, {"dp": "update", "dp-noise-multiplier": 2.0}):
        out = train({**run, **run_dp})
        assert out.has_error() and out.error.code == PRIVACY_POLICY_ERROR_CODE
        assert "dp-required='dp-sgd'" in out.error.reason
    ok = train({**run, "dp": "dp-sgd", "dp-noise-multiplier": 1.0})
    assert not ok.has_error() and ok.content["metrics"]["dp-steps"] > 0


def _update_msg() -> tuple[Message, ArrayRecord]:
    glob = ArrayRecord(build_model(4, "logreg", seed=0).state_dict())
    return outgoing(glob, 100, MessageType.TRAIN), glob


def _handler(value: float = 0.001, extra: dict | None = None):
    def handler(m: Message, _c: Context) -> Message:
        local = {k: v.numpy() + value for k, v in m.content["arrays"].items()}
        metrics = {"num-examples": 10, "train-loss": 0.25, "train_loss": 0.25, **(extra or {})}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: torch.tensor(v) for k, v in local.items()}),
                "metrics": MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=m)

    return handler


def test_update_mod_enforces_the_bank_policy(as_server):
    mod = UpdateDPMod()
    required = {"partition-id": 0, "dp-required": "true"}
    msg, _ = _update_msg()
    out = mod(msg, _ctx(required, {"dp": "off"}), _handler())
    assert out.has_error() and out.error.code == PRIVACY_POLICY_ERROR_CODE
    msg, _ = _update_msg()
    strict = {"partition-id": 0, "dp-max-delta": 1e-6}
    out = mod(msg, _ctx(strict, {"dp": "update", "dp-noise-multiplier": 2.0}), _handler())
    assert out.has_error() and "dp-max-delta" in out.error.reason
    # The bank's own cap: the run sets no budget, the bank allows epsilon 1.
    ctx = _ctx(
        {"partition-id": 0, "dp-epsilon-budget": 1.0}, {"dp": "update", "dp-noise-multiplier": 16.0}
    )
    replies = []
    for _ in range(40):
        msg, _ = _update_msg()
        replies.append(mod(msg, ctx, _handler()))
    refused = [r for r in replies if r.has_error()]
    assert refused and refused[0].error.code == PRIVACY_BUDGET_ERROR_CODE
    served = [r for r in replies if not r.has_error()]
    assert served and max(r.content["metrics"]["dp-epsilon"] for r in served) <= 1.0


def test_ledger_enforces_epsilon_at_the_strictest_delta_it_has_used(tmp_path):
    """Review D3: a second run re-spent a shared ledger by asking for a larger delta."""
    ledger_file = LedgerFile(tmp_path / "bank-0.privacy-ledger.json")

    def spend(delta: float) -> int:
        granted = 0
        for _ in range(200):
            try:
                ledger_file.reserve(
                    PrivacyLedger(), budget=3.0, delta=delta, noise_multiplier=3.0,
                    sample_rate=0.35, steps=3,
                )  # fmt: skip
                granted += 1
            except PrivacyBudgetExhausted:
                return granted
        return granted

    assert spend(1e-5) > 0
    assert spend(1e-2) == 0  # before: 18 more rounds at delta 0.5, epsilon 13 at 1e-5
    ledger = ledger_file.read()
    assert ledger.delta == 1e-5 and ledger.epsilon(1e-2) == ledger.epsilon(1e-5) <= 3.0
    assert ledger_file.runs()[-1]["delta-accounted"] == 1e-5


def test_the_two_dp_modes_cannot_share_one_ledger_dir(tmp_path):
    ctx = _ctx({"partition-id": 0, "ledger-dir": str(tmp_path)}, {})
    sample, update = (
        ledger_file_for(ctx, SAMPLE_LEDGER_KEY),
        ledger_file_for(ctx, UPDATE_LEDGER_KEY),
    )
    assert sample is not None and update is not None
    sample.reserve(PrivacyLedger(), budget=5.0, delta=1e-5, noise_multiplier=1.0,
                   sample_rate=0.1, steps=10)  # fmt: skip
    with pytest.raises(PrivacyBudgetExhausted, match="other DP mode"):
        update.reserve(PrivacyLedger(unit="bank-replace"), budget=5.0, delta=1e-5,
                       noise_multiplier=1.0, sample_rate=1.0, steps=1)  # fmt: skip
    assert not update.path.exists()


# ----------------------------------------------------------------------------- D4
def _private(ledger_file: LedgerFile | None = None):
    torch.manual_seed(0)
    x, y = torch.randn(400, 5), (torch.rand(400) < 0.3).float()
    model = torch.nn.Linear(5, 1)
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=50),
        config=DPSGDConfig(target_epsilon=1.0, rounds=1, local_epochs=1),
        ledger=PrivacyLedger(),
        ledger_file=ledger_file,
    )
    return private, x, y


@pytest.mark.parametrize("with_file", [False, True])
def test_steps_beyond_the_reservation_are_refused(tmp_path, with_file):
    ledger_file = LedgerFile(tmp_path / "l.json") if with_file else None
    private, x, y = _private(ledger_file)
    with pytest.raises(PrivacyBudgetExhausted, match="reserved 8 steps"):
        train_private_epochs(private, epochs=10)  # before: 80 steps, epsilon 2.75 > 1
    train_private_epochs(private)  # the reserved epoch
    with pytest.raises(PrivacyBudgetExhausted, match="one more step"):  # a hand-written loop
        private.optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(
            private.module(x[:50]).reshape(-1), y[:50]
        ).backward()
        private.optimizer.step()
    report = private.finish()
    assert report.total_steps == private.planned_steps == 8 and report.epsilon <= 1.0
    if ledger_file is not None:
        assert ledger_file.read().total_steps == 8


# ----------------------------------------------------------------------------- D7
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_refused_before_any_noise(bad):
    secret = np.array([1000.0, -2000.0, 3000.0])
    with pytest.raises(NonFiniteUpdateError, match="non-finite"):
        privatize_update([secret, np.array([bad])], 1.0, 1.0, np.random.default_rng(0))


def test_update_mod_replies_with_an_error_for_a_nan_update(as_server):
    msg, _ = _update_msg()
    ctx = _ctx({"partition-id": 0}, {"dp": "update", "dp-noise-multiplier": 2.0})
    out = UpdateDPMod()(msg, ctx, _handler(value=float("nan")))
    assert out.has_error() and out.error.code == PRIVACY_POLICY_ERROR_CODE
    assert "non-finite" in out.error.reason


# ----------------------------------------------------------------------------- D8
def _alarm(*_args):
    raise TimeoutError("the noise search did not end")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"dp-target-epsilon": True}, "dp-target-epsilon must be a number"),
        ({"dp-target-epsilon": "3"}, "dp-target-epsilon must be a number"),
        ({"dp-epsilon-budget": True}, "dp-epsilon-budget must be a number"),
        ({"dp-target-epsilon": 1e15}, "dp-target-epsilon must be in"),
        ({"dp-target-epsilon": 1e300}, "dp-target-epsilon must be in"),
        ({"dp-target-epsilon": 1e-12}, "dp-target-epsilon must be in"),
        ({"dp-noise-multiplier": 0.05}, "dp-noise-multiplier must be in"),
        ({"dp-noise-multiplier": 1e-300}, "dp-noise-multiplier must be in"),
        ({"dp-noise-multiplier": 1e308}, "dp-noise-multiplier must be in"),
        ({"dp-max-grad-norm": 5e-324}, "dp-max-grad-norm must be in"),
        ({"dp-max-grad-norm": 1e308}, "dp-max-grad-norm must be in"),
        ({"dp-delta": 5e-324}, "dp-delta must be in"),
        ({"dp-delta": 0.5}, "dp-delta must be in"),
        ({"dp-target-epsilon": 3.0, "dp-epsilon-budget": 0.5}, "below dp-target-epsilon"),
        ({"dp-target-epsilon": 3.0, "dp-noise-multiplier": -1}, "dp-noise-multiplier must be > 0"),
        ({"dp-grad-sample-mode": "bogus"}, "dp-grad-sample-mode must be one of"),
        ({"dp-accountant": "prv", "dp-noise-multiplier": 0.1}, "dp-noise-multiplier must be in"),
    ],
)
@pytest.mark.parametrize("mode", ["dp-sgd", "update"])
def test_review_run_configs_are_refused_by_name_and_fast(mode, extra, named):
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)  # a safety net against a search that never ends, not a timing check
    try:
        with pytest.raises(PrivacyConfigError, match=named):
            cfg = privacy_config_from_run_config({"dp": mode, **extra}, 20, 1)
            if isinstance(cfg, DPSGDConfig):
                cfg.noise_for(0.35, 3)
            elif cfg is not None:
                cfg.noise()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_update_mode_bounds_the_accounted_noise():
    with pytest.raises(PrivacyConfigError, match=r"dp-noise-multiplier must be in \[0.6"):
        privacy_config_from_run_config({"dp": "update", "dp-noise-multiplier": 0.5}, 5, 1)
    assert privacy_config_from_run_config({"dp": "update", "dp-noise-multiplier": 0.6}, 5, 1)
    with pytest.raises(PrivacyConfigError, match="PRV accountant"):
        UpdateDPConfig(noise_multiplier=0.1, accountant="prv")
    with pytest.raises(PrivacyConfigError, match="target_epsilon must be in"):
        DPSGDConfig(target_epsilon=1e15)


# ----------------------------------------------------------------------------- D10
@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({}, "field 'accountant' is missing"),
        (
            {"accountant": "rdp", "unit": "sample", "rounds": 1, "noise-multiplier": [1.0],
             "sample-rate": [0.1], "steps": [-1000]},
            "steps entry must be an integer > 0",
        ),
        (
            {"accountant": "rdp", "unit": "sample", "rounds": 1, "noise-multiplier": [1.0, 2.0],
             "sample-rate": [0.1], "steps": [10]},
            "differ in length",
        ),
        (
            {"accountant": "rdp", "unit": "sample", "rounds": -1, "noise-multiplier": [0.0],
             "sample-rate": [1.5], "steps": [1]},
            "noise multiplier must be",
        ),
        (
            {"accountant": "rdp", "unit": "sample", "rounds": 1, "noise-multiplier": [1.0],
             "sample-rate": [0.1], "steps": ["10"]},
            "steps entry must be an integer",
        ),
    ],
)  # fmt: skip
def test_a_broken_ledger_file_is_refused_naming_the_file(tmp_path, values, named):
    path = tmp_path / "bank-0.privacy-ledger.json"
    path.write_text(json.dumps(values))
    with pytest.raises(PrivacyConfigError, match=named) as err:
        LedgerFile(path).read()
    assert str(path) in str(err.value)
    with pytest.raises(PrivacyConfigError, match="not a valid ledger"):
        LedgerFile(path).reserve(PrivacyLedger(), budget=3.0, delta=1e-5, noise_multiplier=1.0,
                                 sample_rate=0.1, steps=1)  # fmt: skip


def test_a_broken_ledger_in_the_state_is_refused():
    state = RecordDict({SAMPLE_LEDGER_KEY: ConfigRecord({"accountant": "rdp"})})
    with pytest.raises(PrivacyConfigError, match="not a valid privacy ledger"):
        PrivacyLedger.load(state)


# ----------------------------------------------------------------------------- D11
def test_update_mod_metrics_are_an_allow_list(as_server):
    msg, _ = _update_msg()
    ctx = _ctx({"partition-id": 0}, {"dp": "update", "dp-noise-multiplier": 2.0})
    out = UpdateDPMod()(msg, ctx, _handler(extra={"mean-income": 52_000.0, "train-auc": 0.8}))
    assert not out.has_error()
    keys = set(out.content["metrics"].keys())
    assert keys == {
        "num-examples",
        "dp-epsilon",
        "dp-delta",
        "dp-noise-multiplier",
        "dp-max-grad-norm",
        "dp-sample-rate",
        "dp-steps",
    }  # before: a deny-list let Flower's train_loss (and anything else) through


def test_the_server_reports_policy_refusals_like_budget_refusals():
    from flower_ext.privacy import round_privacy

    rejected = {
        1: f"client error {PRIVACY_POLICY_ERROR_CODE}: bank privacy policy: dp-required",
        2: f"client error {PRIVACY_BUDGET_ERROR_CODE}: privacy budget exhausted",
        3: "client error 7: something else",
    }
    out = round_privacy({}, rejected, {1: "bank-a", 2: "bank-b", 3: "bank-c"})
    assert set(out) == {"bank-a", "bank-b"} and "dp-required" in out["bank-a"]["refused"]
