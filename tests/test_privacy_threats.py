"""DP against a curious server: unpredictable noise, no side channels, refusals, ledger races.

Issue 13. The server knows the run config, the seed and each bank's row count; here it
replays a bank's training (same seed, same data, even the same rows) and tries to subtract
the noise. Every noise figure below is checked against the noise the mechanism is
supposed to add, so a predictable (replayable) noise source fails the test.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import stat
import threading

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
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flower_ext.model import build_model
from flower_ext.mods.dp import UpdateDPMod
from flower_ext.privacy import (
    PRIVACY_BUDGET_ERROR_CODE,
    SAMPLE_LEDGER_KEY,
    DPSGDConfig,
    LedgerFile,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    UpdateDPConfig,
    make_private,
    privacy_config_from_run_config,
    secure_numpy_generator,
    secure_torch_generator,
    train_local_private,
    train_private_epochs,
)
from flower_ext.training import TrainConfig

N_ROWS, N_FEAT, HIDDEN = 240, 4, "32"
BATCH, LR, SIGMA, CLIP = 24, 0.1, 20.0, 1.0


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_ROWS, N_FEAT)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.float32)


def _flat(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def _dp_sgd_update(sigma: float) -> np.ndarray:
    """One bank round of the app's DP-SGD training: everything fixed but the noise source."""
    x, y = _data()
    model = build_model(N_FEAT, "mlp", HIDDEN, seed=3)
    start = _flat(model)
    cfg = TrainConfig(epochs=1, learning_rate=LR, batch_size=BATCH, momentum=0.0, seed=42)
    privacy = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=CLIP)
    train_local_private(model, x, y, cfg, privacy, RecordDict())
    return _flat(model) - start


def _noise_norm(d: int) -> float:
    """Expected L2 norm of one round's DP-SGD noise on the weights.

    Each of the ``1/q`` steps adds ``lr * N(0, (sigma C)^2) / B`` per coordinate
    (Opacus divides by the expected batch size B = qN); SGD without momentum sums them.
    """
    steps = N_ROWS // BATCH
    return LR * SIGMA * CLIP / BATCH * math.sqrt(steps) * math.sqrt(d)


def test_curious_server_replaying_a_dp_sgd_round_cannot_subtract_the_noise():
    observed = _dp_sgd_update(SIGMA)  # what the bank sends
    # The server replays the round with the same seed and the same rows, with and
    # without noise, to estimate the bank's noise and subtract it.
    replay = _dp_sgd_update(SIGMA)
    replay_clean = _dp_sgd_update(1e-9)
    bank_clean = _dp_sgd_update(1e-9)  # what the bank's update would be without noise
    recovered = observed - (replay - replay_clean)
    d = observed.size
    noise = _noise_norm(d)
    # With replayable noise both distances are ~0; with unpredictable noise the
    # recovered update is off by the difference of two independent noise draws.
    assert 0.75 * math.sqrt(2) * noise < np.linalg.norm(observed - replay)
    assert np.linalg.norm(observed - replay) < 1.25 * math.sqrt(2) * noise
    assert 0.75 * math.sqrt(2) * noise < np.linalg.norm(recovered - bank_clean)
    # The noise itself is the size the mechanism promises (so the bound above is real).
    assert np.linalg.norm(observed - bank_clean) == pytest.approx(noise, rel=0.25)


def test_two_banks_draw_independent_noise_even_with_the_same_seed_and_rows():
    clean = _dp_sgd_update(1e-9)
    first, second = _dp_sgd_update(SIGMA) - clean, _dp_sgd_update(SIGMA) - clean
    corr = float(np.corrcoef(first, second)[0, 1])
    assert abs(corr) < 4 / math.sqrt(first.size)  # ~N(0, 1/d) when independent; 1.0 if shared


def test_secure_generators_ignore_torch_and_numpy_seeds():
    torch.manual_seed(0)
    a = torch.randn(64, generator=secure_torch_generator())
    torch.manual_seed(0)
    b = torch.randn(64, generator=secure_torch_generator())
    assert not torch.equal(a, b)
    np.random.seed(0)
    assert not np.array_equal(
        secure_numpy_generator().normal(size=64), secure_numpy_generator().normal(size=64)
    )


def test_bank_app_sends_different_noise_for_the_same_round_and_seed(as_server):
    from bank_risk.client_app import app as client_app
    from bank_risk.client_app import load_context_bank

    config = {
        "num-banks": 2,
        "rows-per-bank": 300,
        "num-server-rounds": 2,
        "model": "logreg",
        "dp": "dp-sgd",
        "dp-noise-multiplier": 1.0,
        "seed": 7,
    }

    def run() -> tuple[np.ndarray, MetricRecord]:
        ctx = Context(
            run_id=1,
            node_id=100,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config=config,
        )
        _, bank = load_context_bank(ctx)
        msg = outgoing(
            ArrayRecord(build_model(bank.num_features, "logreg", seed=1).state_dict()), 100
        )
        msg.content["config"] = ConfigRecord({"server-round": 1, "num-server-rounds": 2})
        out = client_app(msg, ctx)
        arrays = out.content["arrays"]
        return np.concatenate([a.numpy().ravel() for a in arrays.values()]), out.content["metrics"]

    (first, metrics), (second, _) = run(), run()
    assert not np.allclose(first, second)  # before issue 13: bit-identical
    # Under DP a train reply carries no statistic of the rows outside the guarantee.
    assert "train-loss" not in metrics and not any(
        "norm" in k[3:] for k in metrics if k != "dp-max-grad-norm"
    )


# ----------------------------------------------------------------------------- update level
def _update_mod_round(mod: UpdateDPMod, ctx: Context, model: nn.Module) -> np.ndarray:
    glob = ArrayRecord(model.state_dict())
    msg = outgoing(glob, 100, MessageType.TRAIN)

    def handler(m: Message, _c: Context) -> Message:  # deterministic local training
        local = {k: v.numpy() + 0.001 for k, v in m.content["arrays"].items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: torch.tensor(v) for k, v in local.items()}),
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.25}),
            }
        )
        return Message(content=content, reply_to=m)

    out = mod(msg, ctx, handler)
    assert not out.has_error()
    metrics = out.content["metrics"]
    assert "train-loss" not in metrics and "dp-update-norm" not in metrics
    return np.concatenate(
        [out.content["arrays"][k].numpy().ravel() - glob[k].numpy().ravel() for k in glob]
    )


def _ctx(partition: int = 0) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={},
    )


def test_update_level_noise_cannot_be_replayed_and_is_independent_across_banks(as_server):
    model = build_model(N_FEAT, "mlp", "64", seed=0)
    cfg = UpdateDPConfig(noise_multiplier=1.0, clip_norm=0.5, rounds=10)
    mod = UpdateDPMod(cfg)
    first = _update_mod_round(mod, _ctx(0), model)
    # The server rebuilds the mod with the same config (it knows everything but the noise).
    replay = _update_mod_round(UpdateDPMod(cfg), _ctx(0), model)
    other_bank = _update_mod_round(mod, _ctx(1), model)
    d = first.size
    noise = 1.0 * 0.5 * math.sqrt(d)  # sigma * C * sqrt(d)
    assert np.linalg.norm(first - replay) == pytest.approx(math.sqrt(2) * noise, rel=0.2)
    corr = float(np.corrcoef(first, other_bank)[0, 1])  # the clipped update is tiny: ~noise
    assert abs(corr) < 4 / math.sqrt(d)


def test_update_level_target_epsilon_accounts_the_replace_relation():
    cfg = UpdateDPConfig(target_epsilon=3.0, rounds=5, clip_norm=1.0)
    ledger = PrivacyLedger(unit="bank-replace")
    for _ in range(5):
        ledger.record(cfg.accounted_noise(), 1.0, 1)
    assert cfg.noise() == pytest.approx(2 * cfg.accounted_noise())
    assert 2.9 < ledger.epsilon(cfg.delta) <= 3.0  # the reported figure is the replace one
    add_remove = PrivacyLedger(history=[(cfg.noise(), 1.0, 5)])
    assert add_remove.epsilon(cfg.delta) < 2.0  # what the old accounting would have claimed


def test_an_old_add_remove_update_ledger_is_converted_not_reused_as_is():
    old = {"accountant": "rdp", "unit": "client", "rounds": 2, "noise-multiplier": [2.0],
           "sample-rate": [1.0], "steps": [2]}  # fmt: skip
    ledger = PrivacyLedger.from_values(old, "rdp", "bank-replace")
    assert ledger.history == [(1.0, 1.0, 2)]
    with pytest.raises(PrivacyConfigError, match="cannot share one ledger"):
        PrivacyLedger.from_values(old, "rdp", "sample")


# ----------------------------------------------------------------------------- run config
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"dp-target-epsilon": -1.0}, "dp-target-epsilon must be > 0"),
        ({"dp-noise-multiplier": 0.0}, "dp-noise-multiplier must be > 0"),
        ({"dp-noise-multiplier": -2.0}, "dp-noise-multiplier must be > 0"),
        ({"dp-delta": 0.0}, r"dp-delta must be in \(0, 1\)"),
        ({"dp-delta": 1.0}, r"dp-delta must be in \(0, 1\)"),
        ({"dp-max-grad-norm": 0.0}, "dp-max-grad-norm must be > 0"),
        ({"dp-max-grad-norm": -1.0}, "dp-max-grad-norm must be > 0"),
        ({"dp-epsilon-budget": -3.0}, "dp-epsilon-budget must be > 0"),
        ({"dp-accountant": "gdp-ish"}, "dp-accountant must be one of"),
        ({"dp-grad-sample-mode": "fast"}, "dp-grad-sample-mode must be one of"),
        ({"dp-target-epsilon": float("nan")}, "dp-target-epsilon must be finite"),
        ({"dp-noise-multiplier": "lots"}, "dp-noise-multiplier must be a number"),
    ],
)
@pytest.mark.parametrize("mode", ["dp-sgd", "update"])
def test_impossible_dp_settings_are_refused_by_name(mode, extra, named):
    if mode == "update" and "grad-sample" in next(iter(extra)):
        pytest.skip("the grad-sample mode is a DP-SGD setting")
    with pytest.raises(PrivacyConfigError, match=named):
        privacy_config_from_run_config({"dp": mode, **extra}, 5, 1)


def test_the_bank_app_refuses_impossible_dp_settings_before_training():
    from bank_risk.settings import BankAppSettings, SettingsError

    with pytest.raises(SettingsError, match="dp-noise-multiplier must be > 0"):
        BankAppSettings.from_config({"dp": "dp-sgd", "dp-noise-multiplier": 0.0})
    with pytest.raises(SettingsError, match="dp-target-epsilon must be > 0"):
        BankAppSettings.from_config({"dp": "update", "dp-target-epsilon": -1.0})
    with pytest.raises(PrivacyConfigError, match="noise_multiplier must be a finite number > 0"):
        DPSGDConfig(noise_multiplier=0.0)


# ----------------------------------------------------------------------------- ledger file
SIGMA_L, Q_L, STEPS_L, BUDGET_L = 1.0, 0.1, 2, 4.0


def _affordable_rounds() -> int:
    ledger, n = PrivacyLedger(), 0
    while ledger.projected_epsilon(1e-5, SIGMA_L, Q_L, STEPS_L) <= BUDGET_L:
        ledger.record(SIGMA_L, Q_L, STEPS_L)
        n += 1
    return n


def _spend(path: str, attempts: int, results: list | None = None) -> int:
    granted = 0
    for i in range(attempts):
        try:
            LedgerFile(path).reserve(
                PrivacyLedger(),  # a run that knows nothing: the file is the ledger
                budget=BUDGET_L,
                delta=1e-5,
                noise_multiplier=SIGMA_L,
                sample_rate=Q_L,
                steps=STEPS_L,
                note={"writer": os.getpid(), "attempt": i},
            )
            granted += 1
        except PrivacyBudgetExhausted:
            pass
    if results is not None:
        results.append(granted)
    return granted


def _check_ledger_file(path, granted: int) -> None:
    ledger = LedgerFile(path).read()
    affordable = _affordable_rounds()
    assert affordable >= 3  # the budget is contended for, not spent at once
    assert granted == affordable  # no race let a writer past the budget, none was lost
    assert ledger.total_steps == STEPS_L * granted  # recorded = spent
    assert ledger.rounds == granted and len(LedgerFile(path).runs()) == granted
    assert ledger.epsilon(1e-5) <= BUDGET_L
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(LedgerFile(path).lock_path).st_mode) == 0o600


def test_ledger_file_under_concurrent_threads_never_overspends(tmp_path):
    path = str(tmp_path / "bank-0.json")
    results: list[int] = []
    threads = [threading.Thread(target=_spend, args=(path, 6, results)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_ledger_file(path, sum(results))


def test_ledger_file_under_concurrent_processes_never_overspends(tmp_path):
    path = str(tmp_path / "bank-0.json")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        granted = pool.starmap(_spend, [(path, 6), (path, 6)])
    _check_ledger_file(path, sum(granted))


def test_two_runs_sharing_a_ledger_dir_cannot_both_spend_the_last_budget(as_server, tmp_path):
    """Issue 13's race: each run used to keep its own ledger in memory, the last writer won."""
    from bank_risk.client_app import app as client_app
    from bank_risk.client_app import load_context_bank

    config = {
        "num-banks": 2,
        "rows-per-bank": 300,
        "num-server-rounds": 2,
        "model": "logreg",
        "dp": "dp-sgd",
        "dp-target-epsilon": 1.0,
    }

    def run_context(run_id: int) -> Context:
        return Context(
            run_id=run_id,
            node_id=100,
            node_config={"partition-id": 0, "num-partitions": 2, "ledger-dir": str(tmp_path)},
            state=RecordDict(),
            run_config=config,
        )

    first, second = run_context(1), run_context(2)
    _, bank = load_context_bank(first)

    def train(ctx: Context, rnd: int) -> Message:
        msg = outgoing(ArrayRecord(build_model(bank.num_features, "logreg").state_dict()), 100)
        msg.content["config"] = ConfigRecord({"server-round": rnd, "num-server-rounds": 2})
        return client_app(msg, ctx)

    assert not train(first, 1).has_error()
    assert not train(second, 1).has_error()  # the two runs have now spent the whole budget
    late = train(first, 2)  # run 1 only knows its own round, but the file knows both
    assert late.has_error() and late.error.code == PRIVACY_BUDGET_ERROR_CODE
    ledger = PrivacyLedger.load(first.state, SAMPLE_LEDGER_KEY)
    file_ledger = LedgerFile(tmp_path / "partition-0.privacy-ledger.json").read()
    assert ledger.history == file_ledger.history and file_ledger.rounds == 2
    assert file_ledger.epsilon(1e-5) <= 1.0
    runs = LedgerFile(tmp_path / "partition-0.privacy-ledger.json").runs()
    assert [r["run-id"] for r in runs] == [1, 2]


# ----------------------------------------------------------------------------- any model
class _DictImages(Dataset):
    """Flower-example-style rows: {"img": (1, 4, 4) float, "label": int}, three classes."""

    def __init__(self, n: int = 300) -> None:
        gen = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 3, (n,), generator=gen)
        centres = torch.randn(3, 1, 4, 4, generator=gen) * 2
        self.images = centres[self.labels] + 0.5 * torch.randn(n, 1, 4, 4, generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.images[i], "label": int(self.labels[i])}


def _accuracy(model: nn.Module, ds: _DictImages) -> float:
    with torch.no_grad():
        return float((model(ds.images).argmax(1) == ds.labels).float().mean())


@pytest.mark.parametrize("loss_fn", [None, nn.CrossEntropyLoss()])
def test_dp_sgd_trains_a_multiclass_model_on_dict_batches(loss_fn):
    torch.manual_seed(0)
    ds = _DictImages()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    before = _accuracy(model, ds)
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(ds, batch_size=30),
        config=DPSGDConfig(noise_multiplier=0.5, max_grad_norm=1.0, local_epochs=4),
        ledger=PrivacyLedger(),
    )
    loss = train_private_epochs(private, loss_fn=loss_fn)
    report = private.finish()
    assert math.isfinite(loss) and report.steps == 4 * 10
    assert _accuracy(model, ds) > max(0.8, before + 0.2)


def test_batches_and_losses_dp_sgd_cannot_use_get_precise_errors():
    ds = _DictImages(60)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def private():
        return make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(ds, batch_size=10),
            config=DPSGDConfig(noise_multiplier=1.0),
            ledger=PrivacyLedger(),
        )

    with pytest.raises(PrivacyConfigError, match=r"keys \['img', 'label'\].*input_key"):
        train_private_epochs(private(), input_key="pixels")
    with pytest.raises(PrivacyConfigError, match="one scalar, the mean over the batch"):
        train_private_epochs(private(), loss_fn=nn.CrossEntropyLoss(reduction="none"))
    out = train_private_epochs(private(), input_key="img", target_key="label")
    assert math.isfinite(out)


def test_embedding_models_fall_back_from_expanded_weights_to_hooks():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 10, (200,), generator=gen)
    y = (idx % 2).float()
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1))
    private = make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(torch.utils.data.TensorDataset(idx, y), batch_size=20),
        config=DPSGDConfig(noise_multiplier=0.5),  # default mode "ew"
        ledger=PrivacyLedger(),
    )
    assert private.grad_sample_mode == "hooks"
    assert math.isfinite(train_private_epochs(private))
    assert private.finish().steps == 10


def test_privacy_metrics_are_aggregated_as_the_worst_bank_not_a_weighted_mean():
    from flower_ext.privacy import privacy_train_metrics_aggr_fn

    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 900, "dp-epsilon": 1.0, "x": 1.0})}),
        RecordDict({"metrics": MetricRecord({"num-examples": 100, "dp-epsilon": 3.0, "x": 2.0})}),
    ]
    out = privacy_train_metrics_aggr_fn(replies, "num-examples")
    assert out["dp-epsilon-max"] == 3.0 and "dp-epsilon" not in out  # a mean would say 1.2
    assert out["x"] == pytest.approx(1.1)  # everything else: Flower's weighted mean


@pytest.mark.parametrize("mode", ["dp-sgd", "update"])
def test_under_dp_no_non_private_local_only_model_is_trained_or_sent(mode, as_server):
    from bank_risk.client_app import app as client_app
    from bank_risk.client_app import load_context_bank

    config = {
        "num-banks": 2,
        "rows-per-bank": 300,
        "num-server-rounds": 2,
        "model": "logreg",
        "dp": mode,
        "local-only-baseline": True,
    }
    ctx = Context(
        run_id=1,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=config,
    )
    _, bank = load_context_bank(ctx)
    msg = outgoing(
        ArrayRecord(build_model(bank.num_features, "logreg").state_dict()),
        100,
        MessageType.EVALUATE,
    )
    msg.content["config"] = ConfigRecord({"server-round": 2, "num-server-rounds": 2})  # final
    out = client_app(msg, ctx)
    assert "auc" in out.content["metrics"]  # the global model's evaluation still goes back
    assert not any(k.startswith("local-only-") for k in out.content["metrics"])
    assert "dp is on" in out.content["client-info"]["local-only-skipped"]
