"""The adaptive attacks of issue 14 do what they claim, on malicious banks only."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import outgoing
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from test_attacks import BASE, HONEST_STEP, context_for, run_mod

from flower_ext.aggregation import coordinate_median, krum, trimmed_mean
from flower_ext.attacks import (
    AttackConfig,
    apply_attack,
    fang_krum,
    fang_trimmed_mean,
    inflate_count,
    mimic,
    min_max,
    min_sum,
    poison_moments,
)
from flower_ext.mods.attack import AttackMod

RNG = np.random.default_rng(11)


def honest(k=8, d=60):
    return RNG.normal(0.3, 1.0, size=(k, d))


def _pairwise(h):
    return np.sqrt(((h[:, None, :] - h[None, :, :]) ** 2).sum(axis=2))


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_min_max_is_as_far_as_the_honest_diameter_allows(perturbation):
    h = honest()
    m = min_max(h, perturbation)
    bound = _pairwise(h).max()
    assert np.linalg.norm(h - m, axis=1).max() <= bound + 1e-9
    mu = h.mean(axis=0)
    step = m - mu
    assert np.linalg.norm(step) > 0
    # Maximal: 1% further along the same direction breaks the bound.
    assert np.linalg.norm(h - (mu + 1.01 * step), axis=1).max() > bound
    if perturbation in ("unit", "sign"):
        assert step @ mu < 0  # pushes against the honest direction


def test_min_sum_keeps_its_sum_of_squared_distances_within_the_honest_maximum():
    h = honest()
    m = min_sum(h, "unit")
    bound = (_pairwise(h) ** 2).sum(axis=1).max()
    assert ((h - m) ** 2).sum() <= bound * (1 + 1e-9)
    mu = h.mean(axis=0)
    assert ((h - (mu + 1.01 * (m - mu))) ** 2).sum() > bound
    assert (m - mu) @ mu < 0


def test_fang_trimmed_mean_sits_past_the_honest_extremes_against_the_direction():
    h = honest(k=8)
    rows = fang_trimmed_mean(h, 2, np.random.default_rng(0))
    assert rows.shape == (2, h.shape[1])
    mu = h.mean(axis=0)
    up = mu > 0
    assert np.all(rows[:, up] <= h.min(axis=0)[up] + 1e-12)
    assert np.all(rows[:, ~up] >= h.max(axis=0)[~up] - 1e-12)
    # It pulls the trimmed mean and the median against the honest direction.
    stacked = np.vstack([h, rows])
    for agg in (
        trimmed_mean(stacked, beta=0.2).update,
        coordinate_median(stacked).update,
    ):
        clean = np.median(h, axis=0)
        assert ((agg - clean) * np.sign(mu)).mean() < 0


def test_fang_krum_gets_the_crafted_update_selected():
    h = honest(k=8)
    m = fang_krum(h, 2)
    np.testing.assert_allclose(np.abs(m), np.abs(m[0]))  # -lambda * sign(mu)
    assert np.all(np.sign(m) == -np.sign(h.mean(axis=0)))
    stacked = np.vstack([h, m, m])
    assert krum(stacked, np.ones(10), 2).selected_rows[0] >= 8


def test_mimic_copies_the_most_remote_honest_update():
    h = honest(k=5)
    h[3] += 5.0
    np.testing.assert_array_equal(mimic(h), h[3])
    np.testing.assert_array_equal(mimic(h, target=1), h[1])


def test_inflate_count_and_poison_moments():
    assert inflate_count(120, 100) == 12_000
    with pytest.raises(ValueError):
        inflate_count(10, 0.5)
    count, total, sq = poison_moments(10, np.array([1.0, 2.0]), np.array([3.0, 5.0]), 1e4)
    assert count == 10 and total.tolist() == [1.0, 2.0] and sq.tolist() == [3e4, 5e4]


def test_config_keys_and_dispatch():
    cfg = AttackConfig.from_config(
        {
            "attack": "min-max",
            "malicious-banks": "1,2",
            "attack-knowledge": "all",
            "attack-perturbation": "unit",
            "attack-count-factor": 3.0,
        }
    )
    assert cfg.knowledge == "all" and cfg.perturbation == "unit"
    assert cfg.effective_count_factor() == 3.0
    assert AttackConfig(attack="weight-inflation").effective_count_factor() == 100.0
    assert AttackConfig(attack="sign-flip").effective_count_factor() == 1.0
    h = honest()
    np.testing.assert_allclose(apply_attack(cfg, h[0], honest=h), min_max(h, "unit"))
    fang = AttackConfig(attack="fang-trim", malicious=(1, 2))
    first = apply_attack(fang, h[0], honest=h, attacker_rank=0, server_round=3)
    second = apply_attack(fang, h[0], honest=h, attacker_rank=1, server_round=3)
    again = apply_attack(fang, h[0], honest=h, attacker_rank=1, server_round=3)
    assert not np.allclose(first, second) and np.array_equal(second, again)
    for name in ("weight-inflation", "poisoned-standardisation"):
        np.testing.assert_array_equal(apply_attack(AttackConfig(attack=name), h[0]), h[0])
    with pytest.raises(ValueError, match="attack-knowledge"):
        AttackConfig(knowledge="some")


# ---------------------------------------------------------------------------
# The mod: malicious banks only
# ---------------------------------------------------------------------------


def test_mod_weight_inflation_flips_labels_and_inflates_counts_on_malicious_only(as_server):
    config = {"attack": "weight-inflation", "malicious-banks": "1"}
    out, update, labels = run_mod(AttackMod(), 1, **config)
    np.testing.assert_array_equal(labels[0], [1, 0, 0])
    assert out.content["metrics"]["num-examples"] == 1000
    out, _, labels = run_mod(AttackMod(), 2, **config)
    np.testing.assert_array_equal(labels[0], [0, 1, 1])
    assert out.content["metrics"]["num-examples"] == 10
    # Count inflation on top of another attack.
    out, update, _ = run_mod(
        AttackMod(), 1, **{**config, "attack": "sign-flip", "attack-count-factor": 7.0}
    )
    assert out.content["metrics"]["num-examples"] == 70
    np.testing.assert_allclose(update["w"], -10.0 * HONEST_STEP, rtol=1e-5)


def test_mod_knowledge_all_asks_for_every_other_bank(as_server):
    dim = sum(v.size for v in BASE.values())
    asked: list = []

    def hook(msg, context, indices):
        asked.append(list(indices))
        return [np.full(dim, 0.1 * i) for i in indices]

    config = {"attack": "min-max", "malicious-banks": "0,3", "attack-knowledge": "all"}
    _, update, _ = run_mod(AttackMod(colluder_updates=hook), 3, **config)
    assert asked == [[0, 1, 2, 4, 5, 6, 7, 8, 9]]
    assert not np.allclose(update["w"], HONEST_STEP)
    _, update, _ = run_mod(AttackMod(colluder_updates=hook), 4, **config)  # honest bank
    np.testing.assert_allclose(update["w"], HONEST_STEP)


def _query_reply(msg, context):
    """A stand-in for the bank's feature-moments handler."""
    content = RecordDict(
        {
            "moments": MetricRecord({"num-examples": 10, "sum": [1.0, 2.0], "sum-sq": [3.0, 5.0]}),
            "features": ConfigRecord({"names": ["a", "b"]}),
        }
    )
    return Message(content=content, reply_to=msg)


def test_mod_poisons_the_standardisation_query_of_malicious_banks_only(as_server):
    config = {"attack": "poisoned-standardisation", "malicious-banks": "2"}
    for index, expect in ((2, [3e4, 5e4]), (1, [3.0, 5.0])):
        msg = outgoing(ArrayRecord(), node_id=100 + index, message_type=MessageType.QUERY)
        out = AttackMod()(msg, context_for(index, **config), _query_reply)
        assert list(out.content["moments"]["sum-sq"]) == expect
        assert out.content["moments"]["num-examples"] == 10
    # Training stays honest for that attack.
    out, update, _ = run_mod(AttackMod(), 2, **config)
    np.testing.assert_allclose(update["w"], HONEST_STEP)
    assert out.content["metrics"]["num-examples"] == 10


@pytest.mark.slow
def test_simulation_default_app_neutralises_poisoned_standardisation_and_inflation(tmp_path):
    """The real app on Ray with FedAvg and defaults: bank 1 poisons its moments and inflates
    its count 100x; the standardisation leaves it out, its train weight stays pinned."""
    import json

    from bank_risk.simulate import run_bank_simulation
    from flower_ext.data.synthetic import bank_name

    run_dir = run_bank_simulation(
        {
            "num-server-rounds": 2,
            "num-banks": 6,
            "rows-per-bank": 400,
            "aggregation": "fedavg",
            "attack": "poisoned-standardisation",
            "attack-count-factor": 100.0,
            "malicious-banks": "1",
            "local-only-baseline": False,
            "centralized-baseline": False,
            "output-dir": str(tmp_path),
            "run-name": "poison",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    replaced = [e for e in events if e["event"] == "stats_replaced"]
    assert [e["label"] for e in replaced] == [bank_name(1)]
    assert "outlier std" in replaced[0]["reason"]
    assert "replaced by the median" in replaced[0]["reason"]
    assert not [e for e in events if e["event"] == "stats_rejected"]
    standardisation = next(e for e in events if e["event"] == "standardisation")
    # Its honest means and count are used; only its std statistics are replaced.
    assert standardisation["banks"] == 6 and standardisation["left_out"] == []
    assert len(standardisation["replaced"]) == 1 == len(standardisation["outliers"])
    updates = [e for e in events if e["event"] == "client_update"]
    bad = [e for e in updates if e["label"] == bank_name(1)]
    assert len(bad) == 2
    for e in bad:  # claimed 100x its rows: pinned back to the setup count
        assert e["weight_capped"] and "pinned" in e["weight_cap_reason"]
        assert e["weight"] < 0.35
    assert metrics["final"]["auc"] > 0.7
