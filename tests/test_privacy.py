"""DP-SGD wrapper, privacy ledger, budget enforcement, update-level DP (flower_ext.privacy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import FakeGrid, outgoing
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flower_ext.audit import AuditTrail
from flower_ext.model import build_model
from flower_ext.mods.dp import UpdateDPMod
from flower_ext.privacy import (
    PRIVACY_BUDGET_ERROR_CODE,
    SAMPLE_LEDGER_KEY,
    DPSGDConfig,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    UpdateDPConfig,
    check_module,
    make_private,
    privacy_config_from_run_config,
    privatize_update,
    round_privacy,
    train_private_epochs,
)
from flower_ext.strategies import FedAvg

N_ROWS, N_FEAT = 240, 4


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_ROWS, N_FEAT)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=N_ROWS) > 0).astype(np.float32)
    return x, y


def _loader(batch: int = 24, seed: int = 0) -> DataLoader:
    x, y = _data(seed)
    ds = TensorDataset(torch.tensor(x), torch.tensor(y))
    return DataLoader(
        ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1)
    )


def _round(state: RecordDict, cfg: DPSGDConfig, model: nn.Module, batch: int = 24):
    ledger = PrivacyLedger.load(state, accountant=cfg.accountant)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    private = make_private(
        module=model, optimizer=opt, data_loader=_loader(batch), config=cfg, ledger=ledger
    )
    train_private_epochs(private)
    report = private.finish()
    ledger.save(state)
    return report, private


# ----------------------------------------------------------------------------- ledger
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_over_rounds_equals_one_accountant_fed_every_step(accountant):
    cfg = DPSGDConfig(noise_multiplier=1.1, accountant=accountant, rounds=3, local_epochs=2)
    state, model = RecordDict(), build_model(N_FEAT, "logreg")
    epsilons, q, steps = [], None, 0
    for _ in range(3):
        report, private = _round(state, cfg, model)
        epsilons.append(report.epsilon)
        q, steps = private.sample_rate, steps + report.steps
        assert report.steps == 2 * private.steps_per_epoch  # empty batches are steps too
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=1.1, sample_rate=q)
    assert steps == 3 * 2 * 10
    assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert all(b > a for a, b in itertools.pairwise(epsilons))  # monotone


def test_ledger_with_changing_sample_rates_matches_one_accountant_and_persists():
    state = RecordDict()
    reference = RDPAccountant()
    plan = [(1.0, 0.1, 7), (1.0, 0.1, 3), (0.8, 0.05, 5), (1.0, 0.1, 2)]
    for sigma, q, n in plan:
        ledger = PrivacyLedger.load(state)
        ledger.record(sigma, q, n)
        ledger.save(state)
        for _ in range(n):
            reference.step(noise_multiplier=sigma, sample_rate=q)
    ledger = PrivacyLedger.load(state)
    assert ledger.history == reference.history  # same merging as Opacus
    assert ledger.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(PrivacyConfigError, match="switching"):
        PrivacyLedger.load(state, accountant="prv")


def test_target_epsilon_is_met_over_the_whole_federation_then_refused():
    cfg = DPSGDConfig(target_epsilon=2.0, rounds=3, local_epochs=1)
    state, model = RecordDict(), build_model(N_FEAT, "logreg")
    reports = [_round(state, cfg, model)[0] for _ in range(3)]
    assert 1.9 < reports[-1].epsilon <= 2.0
    before = PrivacyLedger.load(state).history
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted") as info:
        _round(state, cfg, model)
    assert info.value.projected > 2.0
    assert PrivacyLedger.load(state).history == before  # a refused round spends nothing


# ----------------------------------------------------------------------------- clipping
def _reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, n: int):
    """Sum of per-sample gradients, each clipped (flat) to ``clip``, over ``n``: one at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(x[i : i + 1]).reshape(-1), y[i : i + 1]
        )
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return [t / n for t in total]


@pytest.mark.parametrize(
    ("mode", "fused"),
    [
        ("hooks", True),
        ("hooks", False),
        ("functorch", True),
        ("ew", True),
        ("ew", False),
        ("ghost", False),
    ],
)
def test_per_sample_clipping_matches_a_one_sample_at_a_time_reference(mode, fused):
    torch.manual_seed(0)
    model = build_model(N_FEAT, "mlp", "5")
    x, y = _data(3)
    xb, yb = torch.tensor(x[:17]), torch.tensor(y[:17])
    lr, clip = 0.5, 0.05  # small clip: most samples are clipped
    expected_batch = int(N_ROWS / 10)  # Opacus scales by the expected batch size
    start = [p.detach().clone() for p in model.parameters()]
    ref = _reference_step(model, xb, yb, clip, expected_batch)
    cfg = DPSGDConfig(  # noise 1e-9: negligible here, and 0 is refused as no privacy
        noise_multiplier=1e-9, max_grad_norm=clip, grad_sample_mode=mode, fused_clipping=fused
    )
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=_loader(24),
        config=cfg,
        ledger=PrivacyLedger(),
    )
    # Evaluation through the wrapped model, in both ways a user might do it, must not
    # leak into the next step's per-sample gradients.
    with private.evaluating() as m:
        m(torch.tensor(x[50:90]))
    if mode == "hooks":
        private.module.train()
        private.module(torch.tensor(x[100:130]))  # stray train-mode forward, no backward
    private.data_loader = [(xb, yb)]  # one fixed batch
    train_private_epochs(private, epochs=1)
    for p0, p, g in zip(start, model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.detach(), p0 - lr * g, rtol=1e-4, atol=1e-6)


def test_ghost_mode_refuses_per_sample_losses_that_are_not_one_per_row():
    model = build_model(N_FEAT, "logreg")
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=_loader(),
        config=DPSGDConfig(noise_multiplier=1.0, grad_sample_mode="ghost"),
        ledger=PrivacyLedger(),
    )
    x, y = _data()
    logits = private.module(torch.tensor(x[:8]))  # (B, 1)
    with pytest.raises(PrivacyConfigError, match=r"shape \(B,\)"):
        private.criterion(logits, torch.tensor(y[:8]).reshape(-1, 1))


def test_models_opacus_cannot_train_get_a_clear_error_or_the_validator_fix():
    model = nn.Sequential(nn.Linear(N_FEAT, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    with pytest.raises(PrivacyConfigError, match="BatchNorm"):
        make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(),
            config=DPSGDConfig(noise_multiplier=1.0),
            ledger=PrivacyLedger(),
        )
    fixed = check_module(model, fix=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())
    private = make_private(
        module=fixed,
        optimizer=torch.optim.SGD(fixed.parameters(), lr=0.1),
        data_loader=_loader(),
        config=DPSGDConfig(noise_multiplier=1.0),
        ledger=PrivacyLedger(),
    )
    assert train_private_epochs(private) > 0


def test_empty_poisson_batches_are_noise_steps_in_every_mode():
    for mode in ("hooks", "ew"):
        model = build_model(N_FEAT, "logreg")
        before = [p.detach().clone() for p in model.parameters()]
        private = make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(),
            config=DPSGDConfig(noise_multiplier=1.0, grad_sample_mode=mode),
            ledger=PrivacyLedger(),
        )
        private.data_loader = [(torch.zeros(0, N_FEAT), torch.zeros(0))] * 3
        train_private_epochs(private, epochs=1)
        assert private.finish().steps == 3
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_config_errors_are_named():
    with pytest.raises(PrivacyConfigError, match="exactly one"):
        DPSGDConfig()
    with pytest.raises(PrivacyConfigError, match="grad_sample_mode"):
        DPSGDConfig(noise_multiplier=1.0, grad_sample_mode="fast")
    with pytest.raises(PrivacyConfigError, match="dp must be one of"):
        privacy_config_from_run_config({"dp": "yes"}, 3, 1)
    cfg = privacy_config_from_run_config({"dp": "dp-sgd", "dp-target-epsilon": 3.0}, 5, 2)
    assert isinstance(cfg, DPSGDConfig) and cfg.budget == 3.0 and cfg.rounds == 5
    assert privacy_config_from_run_config({"dp": "off"}, 5, 2) is None


# ----------------------------------------------------------------------------- the bank app
def _bank_context(run_config: dict, partition: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )


def _train_message(round_: int, node: int, num_features: int):
    msg = outgoing(ArrayRecord(build_model(num_features, "logreg").state_dict()), node)
    msg.content["config"] = ConfigRecord({"server-round": round_, "num-server-rounds": 2})
    return msg


APP_CONFIG = {
    "num-banks": 2,
    "rows-per-bank": 300,
    "num-server-rounds": 2,
    "model": "logreg",
    "dp": "dp-sgd",
    "dp-target-epsilon": 1.0,
}


def test_bank_trains_with_dp_reports_privacy_and_refuses_past_its_budget(as_server):
    from bank_risk.client_app import app as client_app
    from bank_risk.client_app import load_context_bank

    ctx = _bank_context(APP_CONFIG)
    _, bank = load_context_bank(ctx)
    eps = []
    for r in (1, 2):
        out = client_app(_train_message(r, 100, bank.num_features), ctx)
        assert not out.has_error()
        m = out.content["metrics"]
        assert {"dp-epsilon", "dp-delta", "dp-noise-multiplier", "dp-sample-rate"} <= set(m)
        assert m["dp-max-grad-norm"] == 1.0 and m["dp-delta"] == 1e-5
        eps.append(m["dp-epsilon"])
    assert eps[0] < eps[1] <= 1.0
    refused = client_app(_train_message(3, 100, bank.num_features), ctx)  # a round too many
    assert refused.has_error() and refused.error.code == PRIVACY_BUDGET_ERROR_CODE
    assert "privacy budget exhausted" in refused.error.reason
    assert PrivacyLedger.load(ctx.state, SAMPLE_LEDGER_KEY).rounds == 2

    # The server records why, and the round goes on with the bank that can still train.
    fresh = _bank_context(APP_CONFIG, partition=1)
    audit = AuditTrail()
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=2, audit=audit)
    glob = ArrayRecord(build_model(bank.num_features, "logreg").state_dict())
    sent = {
        int(m.metadata.dst_node_id): m
        for m in strategy.configure_train(
            3, glob, ConfigRecord({"num-server-rounds": 2}), FakeGrid([100, 101])
        )
    }
    replies = [client_app(sent[100], ctx), client_app(sent[101], fresh)]
    arrays, metrics = strategy.aggregate_train(3, replies)
    assert arrays is not None and metrics["clients-accepted"] == 1
    report = strategy.round_reports[3]
    assert "privacy budget exhausted" in report.rejected[100]
    assert any(
        e["event"] == "reply_rejected" and "privacy budget" in e["reason"] for e in audit.events
    )
    privacy = round_privacy(report.client_metrics, report.rejected, strategy.labels)
    assert "refused" in privacy[str(100)] or any("refused" in v for v in privacy.values())
    assert any("epsilon" in v for v in privacy.values())


# ----------------------------------------------------------------------------- update level
def test_privatize_update_clips_the_whole_update_and_adds_calibrated_noise():
    rng = np.random.default_rng(0)
    update = [np.full((100, 50), 1.0, dtype=np.float32), np.full(50, 1.0, dtype=np.float32)]
    clipped = privatize_update(update, clip_norm=2.0, noise_multiplier=1e-12, rng=rng)
    assert np.sqrt(sum(float((c**2).sum()) for c in clipped)) == pytest.approx(2.0, rel=1e-5)
    zero = [np.zeros(200_000, dtype=np.float32)]
    noised = privatize_update(zero, clip_norm=0.5, noise_multiplier=2.0, rng=rng)
    assert noised[0].std() == pytest.approx(1.0, rel=0.02)


def test_update_dp_mod_noises_accounts_and_refuses_past_budget(as_server, tmp_path):
    from flwr.app import Message, MetricRecord

    model = build_model(N_FEAT, "logreg")
    glob = ArrayRecord(model.state_dict())
    cfg = UpdateDPConfig(noise_multiplier=2.0, clip_norm=0.1, rounds=5, epsilon_budget=5.0)
    mod = UpdateDPMod(cfg, frozen_keys=("feature_mean", "feature_std"), seed=0)
    ctx = _bank_context({})
    ctx.node_config["ledger-dir"] = str(tmp_path)
    calls = []

    def handler(msg, context):
        calls.append(1)
        local = {k: v.numpy() + 1.0 for k, v in msg.content["arrays"].items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: torch.tensor(v) for k, v in local.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    msg = outgoing(glob, 100, MessageType.TRAIN)
    eps = []
    for i in range(10):
        if i == 1:  # the SuperNode restarts: empty state, its ledger comes back from disk
            ctx = _bank_context({})
            ctx.node_config["ledger-dir"] = str(tmp_path)
        out = mod(msg, ctx, handler)
        if out.has_error():
            break
        eps.append(out.content["metrics"]["dp-epsilon"])
        arrays = out.content["arrays"]
        for key in ("feature_mean", "feature_std"):
            np.testing.assert_array_equal(arrays[key].numpy(), glob[key].numpy())
        assert out.content["metrics"]["dp-sample-rate"] == 1.0
        assert not any("norm" in k and k != "dp-max-grad-norm" for k in out.content["metrics"])
    assert out.has_error() and "privacy budget exhausted" in out.error.reason
    assert len(calls) == len(eps) >= 1 and eps == sorted(eps) and eps[-1] <= 5.0
    # Replace-one-bank relation: sensitivity 2C, so noise std 2C is accounted as sigma 1.
    reference = RDPAccountant()
    for _ in eps:
        reference.step(noise_multiplier=1.0, sample_rate=1.0)
    assert eps[-1] == pytest.approx(reference.get_epsilon(1e-5))


def test_ledger_dir_keeps_the_budget_across_a_supernode_restart(as_server, tmp_path):
    from bank_risk.client_app import app as client_app
    from bank_risk.client_app import load_context_bank

    first = _bank_context(APP_CONFIG)
    first.node_config["ledger-dir"] = str(tmp_path)
    _, bank = load_context_bank(first)
    eps1 = client_app(_train_message(1, 100, bank.num_features), first).content["metrics"]
    # The SuperNode restarts: a new Context with empty state, the same ledger dir.
    second = _bank_context(APP_CONFIG)
    second.node_config["ledger-dir"] = str(tmp_path)
    out = client_app(_train_message(2, 100, bank.num_features), second)
    assert out.content["metrics"]["dp-epsilon"] > eps1["dp-epsilon"]
    assert PrivacyLedger.load(second.state, SAMPLE_LEDGER_KEY).rounds == 2
    # Past the budget, the restarted bank still refuses: nothing was forgotten.
    third = _bank_context(APP_CONFIG)
    third.node_config["ledger-dir"] = str(tmp_path)
    refused = client_app(_train_message(3, 100, bank.num_features), third)
    assert refused.has_error() and refused.error.code == PRIVACY_BUDGET_ERROR_CODE
    # Without the ledger dir a restart would have started at zero again.
    forgetful = _bank_context(APP_CONFIG)
    again = client_app(_train_message(2, 100, bank.num_features), forgetful)
    assert again.content["metrics"]["dp-epsilon"] == pytest.approx(eps1["dp-epsilon"])
