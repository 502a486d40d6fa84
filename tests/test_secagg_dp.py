"""Distributed DP over secure aggregation: the maths by hand, then a Flower round."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from flower_ext.audit import AuditTrail
from flower_ext.secagg.dp import (
    DistributedDP,
    DistributedDPError,
    accounted_noise_multiplier,
    central_epsilon,
    clamp_probability,
    clip_to_norm,
    dp_clipping_range,
    epsilon_if_missing,
    honest_noise_multiplier,
    noise_multiplier_for_epsilon,
    noised_share,
    per_bank_noise_std,
    rounding_to_noise_ratio,
)
from flower_ext.strategies import SecureFedAvg
from tests.test_secagg_flower import NODES, Federation, _delta, _global

# Opacus's RDP orders; the conversion below is the one it uses (Balle et al. 2020).
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def rdp_gaussian_epsilon(multipliers: list[float], delta: float) -> float:
    """Hand formula: RDP of the Gaussian mechanism alpha / (2 sigma^2), summed, converted."""
    return min(
        sum(a / (2 * s * s) for s in multipliers)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in ALPHAS
    )


def test_noise_shares_add_up_to_the_target():
    # sigma 1.2, C 0.5, t 4: each bank 1.2 * 0.5 / 2 = 0.3
    assert per_bank_noise_std(1.2, 0.5, 4) == pytest.approx(0.3)
    # 4 shares of variance 0.09 sum to 0.36 = (sigma C)^2
    assert 4 * per_bank_noise_std(1.2, 0.5, 4) ** 2 == pytest.approx((1.2 * 0.5) ** 2)
    # 9 honest banks with t = 4: sigma * sqrt(9 / 4) = 1.5 sigma; accounted over 2C: / 2
    assert honest_noise_multiplier(1.0, 4, 9) == pytest.approx(1.5)
    assert accounted_noise_multiplier(1.0, 4, 9) == pytest.approx(0.75)
    assert accounted_noise_multiplier(2.0, 7, 7) == pytest.approx(1.0)


def test_central_epsilon_matches_the_hand_computed_rdp_bound():
    assert central_epsilon([0.5], 1e-5) == pytest.approx(rdp_gaussian_epsilon([0.5], 1e-5))
    mixed = [1.5, 1.5, 1.0, 2.0]
    assert central_epsilon(mixed, 1e-6) == pytest.approx(rdp_gaussian_epsilon(mixed, 1e-6))
    assert central_epsilon([], 1e-5) == 0.0
    # the value itself, so a change of accountant or conversion shows
    assert central_epsilon([0.5], 1e-5) == pytest.approx(10.7255, abs=1e-3)


def test_noise_for_a_target_epsilon_spends_at_most_the_target():
    sigma = noise_multiplier_for_epsilon(3.0, 1e-5, 5)
    spent = central_epsilon([sigma / 2] * 5, 1e-5)
    assert spent <= 3.0 and spent == pytest.approx(3.0, abs=0.05)
    dp = DistributedDP.for_target_epsilon(3.0, rounds=5, clip_norm=0.5)
    assert dp.noise_multiplier == pytest.approx(sigma)
    # with t honest banks every round, the run spends the target
    assert dp.epsilon([(7, 7)] * 5) == pytest.approx(spent)


def test_epsilon_if_missing_grows_with_the_missing_banks_up_to_the_nominal():
    table = epsilon_if_missing(2.0, [(10, 7)] * 3, 1e-5)
    assert sorted(table) == [0, 1, 2, 3]  # k = 0 .. n - t
    for k, eps in table.items():  # k missing: 10 - k honest of t = 7
        want = rdp_gaussian_epsilon([2.0 * math.sqrt((10 - k) / 7) / 2] * 3, 1e-5)
        assert eps == pytest.approx(want)
    assert table[0] < table[1] < table[2] < table[3]
    # k = n - t is the nominal guarantee: exactly t honest banks
    assert table[3] == pytest.approx(rdp_gaussian_epsilon([1.0] * 3, 1e-5))
    # rounds with different n: k stops at the smallest n - t
    assert sorted(epsilon_if_missing(2.0, [(10, 7), (8, 7)], 1e-5)) == [0, 1]
    with pytest.raises(DistributedDPError, match="t <= n"):
        epsilon_if_missing(2.0, [(3, 5)], 1e-5)


def test_clip_and_noise():
    v = np.array([3.0, 4.0])  # norm 5
    assert np.allclose(clip_to_norm(v, 1.0), [0.6, 0.8])
    assert np.allclose(clip_to_norm(v, 10.0), v)
    assert np.allclose(clip_to_norm(np.zeros(3), 1.0), 0.0)
    with pytest.raises(DistributedDPError, match="NaN"):
        clip_to_norm(np.array([np.nan, 1.0]), 1.0)
    big = np.full(200_000, 1.0)
    out = noised_share(big, 1.0, 0.1, np.random.default_rng(0))
    noise = out - clip_to_norm(big, 1.0)
    assert np.std(noise) == pytest.approx(0.1, rel=0.01)
    assert abs(np.mean(noise)) < 1e-3


def test_clamping_range_and_rounding():
    # c = C + 8 s: the chance is Phi(-8) + Phi(-(8 + 2C/s)), about 6.2e-16
    s = 0.5
    c = dp_clipping_range(1.0, s)
    assert c == pytest.approx(5.0)
    assert clamp_probability(c, 1.0, s) == pytest.approx(6.22e-16, rel=0.01)
    # c = C + 2 s: Phi(-2) = 0.02275 (+ Phi(-6), negligible)
    assert clamp_probability(2.0, 1.0, 0.5) == pytest.approx(0.02275, rel=1e-3)
    assert clamp_probability(0.5, 1.0, 0.5) == 1.0
    assert rounding_to_noise_ratio(2e-6, 0.5) == pytest.approx(2e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0, "clip_norm": 1.0}, "noise_multiplier must be positive"),
        ({"noise_multiplier": 1.0, "clip_norm": -1.0}, "clip_norm must be positive"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "clip_norm": 1.0, "accountant": "gdp"}, "accountant"),
        ({"noise_multiplier": True, "clip_norm": 1.0}, "must be a number"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(DistributedDPError, match=match):
        DistributedDP(**kwargs)


# --------------------------------------------------------------------------- Flower round
def _clipped_mean(nodes, clip):
    arrays = _global()
    keys = list(arrays)
    flats = [
        np.concatenate([_delta(n, k, arrays[k].numpy().shape).reshape(-1) for k in keys])
        for n in nodes
    ]
    mean = np.mean([clip_to_norm(f, clip) for f in flats], axis=0)
    out, at = {}, 0
    for k in keys:
        size = arrays[k].numpy().size
        out[k] = arrays[k].numpy() + mean[at : at + size].reshape(arrays[k].numpy().shape)
        at += size
    return out


def _flat(record, keys):
    return np.concatenate([record[k].numpy().reshape(-1).astype(np.float64) for k in keys])


def test_dp_round_is_the_equal_weight_mean_of_clipped_updates(as_server):
    # updates have norm ~0.27; C = 0.05 clips every one. Tiny noise: the mean is exact.
    dp = DistributedDP(noise_multiplier=1e-6, clip_norm=0.05)
    audit = AuditTrail()
    strategy = SecureFedAvg(threshold=3, dp=dp, audit=audit)
    new, metrics = Federation(NODES).run_round(strategy)
    want = _clipped_mean(NODES, 0.05)
    keys = list(want)
    err = np.max(np.abs(_flat(new, keys) - np.concatenate([want[k].reshape(-1) for k in keys])))
    assert err < 1e-5  # float32 model; not the num-examples-weighted mean (differs by ~1e-2)
    weighted_differs = Federation(NODES).run_round(SecureFedAvg(threshold=3))[0]
    assert np.max(np.abs(_flat(weighted_differs, keys) - _flat(new, keys))) > 1e-3
    # metrics: epsilon with 4 honest survivors, the nominal with t = 3, the table k = 0..1
    eps = metrics["secagg-dp-epsilon"]
    assert eps == pytest.approx(central_epsilon([1e-6 * math.sqrt(4 / 3) / 2], 1e-5))
    assert metrics["secagg-dp-epsilon-nominal"] == pytest.approx(central_epsilon([1e-6 / 2], 1e-5))
    assert list(metrics["secagg-dp-epsilon-if-missing"]) == pytest.approx(
        [eps, metrics["secagg-dp-epsilon-nominal"]]
    )
    assert "secagg-clipped" in metrics and metrics["secagg-clipped"] == 0  # not reported
    events = [e for e in audit.events if e["event"] == "secagg_dp"]
    assert events and events[0]["survivors"] == 4 and events[0]["threshold"] == 3
    # each bank got its noise std: sigma C / sqrt(t)
    assert events[0]["noise_std_per_bank"] == pytest.approx(1e-6 * 0.05 / math.sqrt(3))


def test_dp_noise_in_the_mean_has_the_promised_std(as_server):
    # sigma 2, C 0.05, t 3, 4 honest survivors: noise in the sum std 2*0.05*sqrt(4/3),
    # in the mean / 4: 0.0354; 30 coordinates, so a loose statistical check.
    dp = DistributedDP(noise_multiplier=2.0, clip_norm=0.05)
    strategy = SecureFedAvg(threshold=3, dp=dp)
    new, metrics = Federation(NODES).run_round(strategy)
    want = _clipped_mean(NODES, 0.05)
    keys = list(want)
    noise = _flat(new, keys) - np.concatenate([want[k].reshape(-1) for k in keys])
    expected = 2.0 * 0.05 * math.sqrt(4 / 3) / 4
    assert 0.6 * expected < np.std(noise) < 1.5 * expected
    # and a dropped bank makes the achieved epsilon worse, the nominal stays
    drop = Federation(NODES, drop={"masked-input": [303]})
    _, dropped = drop.run_round(SecureFedAvg(threshold=3, dp=dp))
    assert dropped["secagg-dp-epsilon"] > metrics["secagg-dp-epsilon"]
    assert dropped["secagg-dp-epsilon-nominal"] == pytest.approx(
        metrics["secagg-dp-epsilon-nominal"]
    )


def test_epsilon_composes_over_rounds_and_survives_a_resume(as_server):
    dp = DistributedDP(noise_multiplier=3.0, clip_norm=0.05)
    strategy = SecureFedAvg(threshold=3, dp=dp)
    fed = Federation(NODES)
    first, m1 = fed.run_round(strategy, 1)
    _, m2 = fed.run_round(strategy, 2, first)
    one = central_epsilon([3.0 * math.sqrt(4 / 3) / 2], 1e-5)
    two = central_epsilon([3.0 * math.sqrt(4 / 3) / 2] * 2, 1e-5)
    assert m1["secagg-dp-epsilon"] == pytest.approx(one)
    assert m2["secagg-dp-epsilon"] == pytest.approx(two) and two > one
    _, fields = strategy.export_state()
    again = SecureFedAvg(threshold=3, dp=dp)
    again.import_state({}, fields)
    assert again.dp_figures()["secagg-dp-epsilon"] == pytest.approx(two)


def test_a_clipping_range_the_noise_would_leave_is_refused(as_server):
    dp = DistributedDP(noise_multiplier=2.0, clip_norm=0.05)  # s = 0.0577 at t = 3
    strategy = SecureFedAvg(threshold=3, dp=dp, clipping_range=0.1)
    with pytest.raises(ValueError, match=r"clipping_range=0\.1 is too small"):
        strategy.configure_train(1, _global(), ConfigRecord(), Federation(NODES))
    auto = SecureFedAvg(threshold=3, dp=dp)
    assert auto.params_for(4).clipping_range == pytest.approx(0.05 + 8 * 0.1 / math.sqrt(3))
    with pytest.raises(ValueError, match="DistributedDP"):
        SecureFedAvg(dp={"noise_multiplier": 1.0})  # type: ignore[arg-type]


def test_frozen_coordinates_send_exactly_zero_and_no_noise():
    rng = np.random.default_rng(1)
    update = np.array([3.0, 4.0, 7.0, -2.0])
    free = np.array([True, True, False, False])
    out = noised_share(update, 1.0, 1e-9, rng, free=free)
    assert np.allclose(out[:2], [0.6, 0.8])  # clipped on the free part's norm (5)
    assert out[2] == 0.0 and out[3] == 0.0  # exactly: no noise, no update
    with pytest.raises(DistributedDPError, match="shape"):
        noised_share(update, 1.0, 1.0, rng, free=free[:3])


def test_the_bank_mod_keeps_frozen_arrays_exact_under_dp(as_server, monkeypatch):
    import tests.test_secagg_flower as flower_tests
    from flower_ext.secagg.mod import SecAggMod

    monkeypatch.setattr(flower_tests, "secagg_mod", SecAggMod(dp_frozen_keys=("b",)))
    dp = DistributedDP(noise_multiplier=2.0, clip_norm=0.05)  # loud noise elsewhere
    new, _ = Federation(NODES).run_round(SecureFedAvg(threshold=3, dp=dp))
    # "b" is frozen: its global value (zeros) comes back up to the quantisation error only
    assert np.max(np.abs(new["b"].numpy())) < 1e-5
    assert np.max(np.abs(new["w"].numpy() - _global()["w"].numpy())) > 1e-3


def test_the_banks_floor_refuses_weaker_settings():
    from flower_ext.secagg.mod import DP_CLIP_KEY, DP_STD_KEY, floor_problems

    # sigma 2, C 0.5, t 4: per-bank std 0.5; the bank recovers sigma = 0.5 * 2 / 0.5 = 2
    config = {"threshold": 4, DP_CLIP_KEY: 0.5, DP_STD_KEY: per_bank_noise_std(2.0, 0.5, 4)}
    assert floor_problems(config, {"secagg-dp-min-noise-multiplier": 2.0}) == []
    assert floor_problems(config, {"secagg-min-threshold": 4}) == []
    (low,) = floor_problems(config, {"secagg-dp-min-noise-multiplier": 2.5})
    assert "noise multiplier of the sum is 2, below" in low
    (few,) = floor_problems(config, {"secagg-min-threshold": 5})
    assert "threshold t=4 is below" in few
    (none,) = floor_problems({"threshold": 4}, {"secagg-dp-min-noise-multiplier": 1.0})
    assert "requires distributed DP" in none


def test_a_bank_below_its_floor_does_not_train(as_server):
    from flwr.app import Context, RecordDict

    fed = Federation(NODES)
    trained = []
    original = fed._train
    fed._train = lambda msg, ctx: trained.append(ctx.node_id) or original(msg, ctx)
    for n in NODES:  # every bank demands sigma >= 3; the server offers 2
        fed.contexts[n] = Context(
            run_id=1,
            node_id=n,
            node_config={"secagg-dp-min-noise-multiplier": 3.0},
            state=RecordDict(),
            run_config={},
        )
    audit = AuditTrail()
    dp = DistributedDP(noise_multiplier=2.0, clip_norm=0.05)
    new, metrics = fed.run_round(SecureFedAvg(threshold=3, dp=dp, audit=audit))
    assert new is None and metrics["secagg-failed"] == 1 and trained == []
    rejected = [e["reason"] for e in audit.events if e["event"] == "reply_rejected"]
    assert len(rejected) == 4 and all("secagg-dp-min-noise-multiplier=3" in r for r in rejected)
