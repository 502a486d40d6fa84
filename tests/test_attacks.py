"""Attack kernels do what they claim; the attack mod rewrites only malicious banks' replies."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
from conftest import arrays_of, outgoing, reply
from flwr.app import Context, MessageType, RecordDict

from flower_ext.attacks import (
    AttackConfig,
    alie,
    alie_z_max,
    apply_attack,
    flip_labels,
    gaussian_noise,
    ipm,
    scaling,
    sign_flip,
)
from flower_ext.mods.attack import STATE_KEY, AttackMod, training_labels

RNG = np.random.default_rng(3)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


def test_sign_flip_and_scaling():
    u = RNG.normal(size=50)
    np.testing.assert_array_equal(sign_flip(u), -u)
    np.testing.assert_allclose(sign_flip(u, 4.0), -4.0 * u)
    np.testing.assert_allclose(scaling(u, 10.0), 10.0 * u)


def test_gaussian_noise_is_seeded_pure_noise():
    u = np.ones(20_000, dtype=np.float32)
    a = gaussian_noise(u, 2.0, np.random.default_rng(1))
    b = gaussian_noise(u, 2.0, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == u.shape
    assert abs(a.mean()) < 0.05 and a.std() == pytest.approx(2.0, rel=0.03)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(u, -1.0, np.random.default_rng(1))


def test_flip_labels():
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 1, 0])), [1, 0, 0, 1])
    np.testing.assert_array_equal(flip_labels(np.array([0, 2]), num_classes=3), [2, 0])


def test_alie_stays_within_mean_plus_minus_z_std():
    honest = RNG.normal(size=(6, 400))
    mean, std = honest.mean(axis=0), honest.std(axis=0)
    for z in (0.25, 1.0, 1.5):
        out = alie(honest, z)
        np.testing.assert_allclose(out, mean - z * std)
        assert np.all(np.abs(out - mean) <= z * std + 1e-12)


def test_alie_z_max_follows_baruch_et_al():
    # n = 10, f = 2: s = floor(6) - 2 = 4, z = Phi^-1(6 / 10).
    assert alie_z_max(10, 2) == pytest.approx(NormalDist().inv_cdf(0.6))
    assert alie_z_max(50, 12) == pytest.approx(NormalDist().inv_cdf((50 - 14) / 50))
    with pytest.raises(ValueError, match="ALIE"):
        alie_z_max(10, 0)


def test_ipm_is_minus_epsilon_times_the_honest_mean():
    honest = RNG.normal(size=(4, 100))
    np.testing.assert_allclose(ipm(honest, 0.5), -0.5 * honest.mean(axis=0))
    # One attacker alone: its own update is the whole pool.
    u = RNG.normal(size=100)
    np.testing.assert_allclose(ipm(u, 2.0), -2.0 * u)


def test_attack_config_from_run_config_and_dispatch():
    cfg = AttackConfig.from_config(
        {"attack": "IPM", "malicious-banks": "3, 0,3", "attack-ipm-epsilon": 0.1, "num-banks": 10}
    )
    assert cfg.attack == "ipm" and cfg.malicious == (0, 3)
    assert cfg.is_malicious(3) and not cfg.is_malicious(1) and not cfg.is_malicious(None)
    u = RNG.normal(size=30)
    np.testing.assert_allclose(apply_attack(cfg, u), -0.1 * u)
    none = AttackConfig.from_config({"attack": "none", "malicious-banks": "1"})
    assert not none.is_malicious(1)
    alie_cfg = AttackConfig.from_config(
        {"attack": "alie", "malicious-banks": "0,1", "num-banks": 10}
    )
    assert alie_cfg.z() == pytest.approx(alie_z_max(10, 2))
    with pytest.raises(ValueError, match="attack must be one of"):
        AttackConfig.from_config({"attack": "backdoor"})
    with pytest.raises(ValueError, match="invalid attack run config"):
        AttackConfig.from_config({"attack": "scaling", "malicious-banks": "a,b"})


# ---------------------------------------------------------------------------
# The mod
# ---------------------------------------------------------------------------

BASE = {"w": RNG.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(3, dtype=np.float32)}
HONEST_STEP = 0.5


def context_for(index: int, **run_config) -> Context:
    return Context(
        run_id=1,
        node_id=100 + index,
        node_config={"partition-id": index, "num-partitions": 10},
        state=RecordDict(),
        run_config={"num-banks": 10, **run_config},
    )


def honest_handler(seen_labels: list):
    """A stand-in for the bank's train handler: moves every weight by HONEST_STEP."""

    def handler(msg, context):
        seen_labels.append(training_labels(np.array([0, 1, 1]), context))
        arrays = msg.content["arrays"]
        local = {k: a.numpy() + HONEST_STEP for k, a in arrays.items()}
        return reply(msg, arrays_of(local), {"num-examples": 10, "train-loss": 0.3})

    return handler


def run_mod(mod, index: int, **run_config):
    msg = outgoing(arrays_of(BASE), node_id=100 + index)
    before = {k: bytes(a.data) for k, a in msg.content["arrays"].items()}
    labels: list = []
    context = context_for(index, **run_config)
    out = mod(msg, context, honest_handler(labels))
    assert {k: bytes(a.data) for k, a in msg.content["arrays"].items()} == before
    assert STATE_KEY not in context.state  # the label-flip flag never outlives the call
    update = {k: out.content["arrays"][k].numpy() - BASE[k] for k in BASE}
    return out, update, labels


@pytest.mark.parametrize(
    ("attack", "expected_step"),
    [
        ("sign-flip", -10.0 * HONEST_STEP),
        ("scaling", 10.0 * HONEST_STEP),
        ("ipm", -5.0 * HONEST_STEP),
        ("alie", HONEST_STEP),  # one attacker and no hook: std 0, so mean - z*0
    ],
)
def test_mod_attacks_only_the_malicious_banks(as_server, attack, expected_step):
    mod = AttackMod()
    config = {"attack": attack, "malicious-banks": "0,3", "attack-scale": 10.0}
    for index in range(5):
        out, update, _ = run_mod(mod, index, **config)
        step = expected_step if index in (0, 3) else HONEST_STEP
        for key in BASE:
            np.testing.assert_allclose(update[key], step, rtol=1e-5, atol=1e-6)
            assert out.content["arrays"][key].dtype == "float32"
        assert out.content["metrics"]["num-examples"] == 10  # the rest of the reply is kept


def test_mod_gaussian_is_noise_and_reproducible(as_server):
    config = {"attack": "gaussian", "malicious-banks": "2", "attack-noise-std": 3.0}
    _, first, _ = run_mod(AttackMod(), 2, **config)
    _, second, _ = run_mod(AttackMod(), 2, **config)
    np.testing.assert_array_equal(first["w"], second["w"])
    assert not np.allclose(first["w"], HONEST_STEP)
    _, honest, _ = run_mod(AttackMod(), 1, **config)
    np.testing.assert_allclose(honest["w"], HONEST_STEP)


def test_mod_label_flip_flips_labels_only_on_malicious_banks(as_server):
    config = {"attack": "label-flip", "malicious-banks": "1"}
    _, update, labels = run_mod(AttackMod(), 1, **config)
    np.testing.assert_array_equal(labels[0], [1, 0, 0])
    np.testing.assert_allclose(update["w"], HONEST_STEP)  # the reply itself is untouched
    _, _, labels = run_mod(AttackMod(), 2, **config)
    np.testing.assert_array_equal(labels[0], [0, 1, 1])


def test_mod_alie_pools_the_colluders_honest_updates(as_server):
    dim = sum(v.size for v in BASE.values())
    peers = {3: np.full(dim, 1.5), 5: np.full(dim, -0.5)}
    asked: list = []

    def hook(msg, context, indices):
        asked.append(indices)
        return [peers[i] for i in indices]

    config = {"attack": "alie", "malicious-banks": "0,3,5", "attack-alie-z": 1.0}
    _, update, _ = run_mod(AttackMod(colluder_updates=hook), 0, **config)
    assert asked == [[3, 5]]
    pool = np.array([HONEST_STEP, 1.5, -0.5])
    np.testing.assert_allclose(update["w"], pool.mean() - pool.std(), rtol=1e-5)


def test_mod_passes_other_messages_through(as_server):
    msg = outgoing(arrays_of(BASE), node_id=100, message_type=MessageType.EVALUATE)
    sentinel = object()
    out = AttackMod()(
        msg,
        context_for(0, attack="sign-flip", **{"malicious-banks": "0"}),
        lambda m, c: sentinel,
    )
    assert out is sentinel


@pytest.mark.slow
def test_simulation_multikrum_drops_colluding_alie_banks(tmp_path):
    """The real app on Ray: banks 1 and 3 run ALIE (pooled by the app's hook); dropped."""
    import json

    from bank_risk.simulate import run_bank_simulation
    from flower_ext.data.synthetic import bank_name

    run_dir = run_bank_simulation(
        {
            "num-server-rounds": 3,
            "num-banks": 7,
            "rows-per-bank": 600,
            "aggregation": "multikrum",
            "num-malicious": 2,
            "attack": "alie",
            "malicious-banks": "1,3",
            "attack-alie-z": 50.0,
            "local-only-baseline": False,
            "centralized-baseline": False,
            "output-dir": str(tmp_path),
            "run-name": "attack",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    updates = [e for e in events if e["event"] == "client_update"]
    assert len(updates) == 21
    attackers = {bank_name(1), bank_name(3)}
    for server_round in (1, 2, 3):
        this_round = [e for e in updates if e["round"] == server_round]
        bad = [e for e in this_round if e["label"] in attackers]
        assert len(bad) == 2 and not any(e["selected"] for e in bad)
        assert all("krum score" in e["reason"] for e in bad)
        assert sum(e["selected"] for e in this_round) == 5  # m = n - f
        # Colluders send the same vector: they pooled the same honest updates.
        assert bad[0]["score"] == pytest.approx(bad[1]["score"])
    assert metrics["final"]["auc"] > 0.6
