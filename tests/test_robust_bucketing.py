"""Bucketing and adaptive clipping radii: kernels against float64 references, strategies."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import arrays_of, reply
from test_robust_strategies import SHAPES, start_round, update_of

from flower_ext.aggregation import (
    adaptive_radius,
    bucket_means,
    bucketed,
    centered_clipping,
    coordinate_median,
    krum,
    norm_bound,
)
from flower_ext.strategies import CenteredClipping, Krum, Median, NormBound, TrimmedMean

_RNG = np.random.default_rng(1414)


def model() -> dict[str, np.ndarray]:
    """A random model of test_robust_strategies' SHAPES, from this module's own RNG."""
    return {k: _RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def shifted(base: dict[str, np.ndarray], delta: float, noise: float = 0.0):
    return arrays_of(
        {
            k: (v + delta + noise * _RNG.normal(size=v.shape)).astype(np.float32)
            for k, v in base.items()
        }
    )


def _reference_buckets(u, w, s, seed):
    """Plain float64 loops: the same permutation, bucket by bucket."""
    perm = np.random.default_rng(seed).permutation(len(u))
    means, weights = [], []
    for start in range(0, len(u), s):
        rows = perm[start : start + s]
        ww = w[rows].astype(np.float64)
        means.append((ww[:, None] * u[rows].astype(np.float64)).sum(0) / ww.sum())
        weights.append(ww.sum())
    return np.array(means), np.array(weights)


@pytest.mark.parametrize("n,s", [(10, 2), (11, 3), (7, 1), (5, 5), (9, 4)])
def test_bucket_means_match_float64_reference(n, s):
    rng = np.random.default_rng(n * 10 + s)
    u = rng.normal(size=(n, 33)).astype(np.float32)
    w = rng.uniform(1, 10, n)
    means, weights, bucket_of = bucket_means(u, w, s, np.random.default_rng(5))
    ref_means, ref_weights = _reference_buckets(u, w, s, 5)
    assert means.dtype == np.float32 and means.shape == (-(-n // s), 33)
    np.testing.assert_allclose(means, ref_means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-12)
    assert np.bincount(bucket_of).max() <= s and np.bincount(bucket_of).sum() == n


def test_bucketed_median_is_the_median_of_bucket_means_with_reports_per_client():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(10, 50))
    w = np.ones(10)
    res = bucketed(lambda m, bw: coordinate_median(m, bw), u, w, 2, np.random.default_rng(3))
    ref_means, _ = _reference_buckets(u, w, 2, 3)
    np.testing.assert_allclose(res.update, np.median(ref_means, axis=0), rtol=1e-12)
    assert len(res.reports) == 10
    assert sum(r.weight for r in res.reports) == pytest.approx(1.0)
    assert all(r.reason.startswith("bucket ") for r in res.reports)
    with pytest.raises(ValueError, match="bucket_size"):
        bucket_means(u, w, 0, np.random.default_rng(0))


def test_bucketed_krum_rejects_buckets_and_their_members():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(14, 20))
    u[[3, 9]] += 100.0  # two attackers spoil at most two of 7 buckets
    res = bucketed(lambda m, bw: krum(m, bw, 2), u, np.ones(14), 2, np.random.default_rng(0))
    assert not res.reports[3].selected and not res.reports[9].selected
    assert sum(r.selected for r in res.reports) == 2  # Krum keeps one bucket: two clients
    assert np.abs(res.update).max() < 10


def test_adaptive_radius():
    assert adaptive_radius(np.array([1.0, 2.0, 3.0, 100.0, 200.0]), 1.5) == pytest.approx(4.5)
    assert adaptive_radius(np.array([1.0, 2.0, 3.0]), 2.0, ceiling=3.0) == 3.0
    assert adaptive_radius(np.array([0.0, 0.0, 0.5]), 2.0) == 1.0  # median 0: smallest > 0
    assert adaptive_radius(np.zeros(3), 2.0) == 1.0
    with pytest.raises(ValueError):
        adaptive_radius(np.array([np.nan]), 1.0)
    with pytest.raises(ValueError):
        adaptive_radius(np.ones(2), 0.0)


def test_adaptive_norm_bound_and_centered_clipping_match_float64_reference():
    rng = np.random.default_rng(4)
    u = rng.normal(size=(9, 40)) * rng.uniform(0.1, 3.0, (9, 1))
    u[0] *= 1000.0  # an attacker's huge update cannot move the median norm
    w = rng.uniform(1, 5, 9)
    norms = np.linalg.norm(u, axis=1)
    m = 1.5 * np.median(norms)
    ref = ((w / w.sum()) * np.minimum(1.0, m / norms)) @ u
    res = norm_bound(u, w, max_norm=np.inf, norm_factor=1.5)
    np.testing.assert_allclose(res.update, ref, rtol=1e-10)
    assert res.reports[0].clip_factor < 1e-2
    # Centered clipping, one iteration around a center c, adaptive radius.
    c = rng.normal(size=40) * 0.1
    dist = np.linalg.norm(u - c, axis=1)
    tau = min(2.0, 1.2 * np.median(dist))
    ref = c + ((w / w.sum()) * np.minimum(1.0, tau / dist)) @ (u - c)
    res = centered_clipping(u, w, tau=2.0, center=c, tau_factor=1.2)
    np.testing.assert_allclose(res.update, ref, rtol=1e-10)
    assert "(adaptive)" in res.reports[0].reason


def test_strategies_with_bucketing_and_adaptive_radii(as_server):
    nodes = list(range(100, 112))
    base = model()
    for strategy in (
        Median(num_malicious_nodes=2, bucket_size=2),
        TrimmedMean(beta=0.34, num_malicious_nodes=2, bucket_size=2),
        NormBound(max_norm=float("inf"), norm_factor=1.0),
        CenteredClipping(tau=float("inf"), tau_factor=1.0, num_malicious_nodes=2),
    ):
        sent = start_round(strategy, arrays_of(base), nodes)
        replies = [
            reply(
                sent[n],
                shifted(base, 50.0 if n in (101, 107) else 1.0, 0.0 if n in (101, 107) else 0.05),
                {"num-examples": 100},
            )
            for n in nodes
        ]
        out, _ = strategy.aggregate_train(1, replies)
        assert out is not None, type(strategy).__name__
        assert np.abs(update_of(out, base) - 1.0).max() < 0.6, type(strategy).__name__


def test_bucketing_raises_the_node_minimum_and_says_so():
    assert Median(num_malicious_nodes=2).min_clients() == 5
    assert Median(num_malicious_nodes=2, bucket_size=2).min_clients() == 9
    with pytest.raises(ValueError, match="buckets of 2"):
        Krum(num_malicious_nodes=2, bucket_size=2).check_client_count(10)
    with pytest.raises(ValueError, match="bucket_size"):
        Median(bucket_size=0)
    with pytest.raises(ValueError, match="norm_factor"):
        NormBound(max_norm=1.0, norm_factor=-1.0)


def test_factory_passes_bucketing_adaptive_radii_and_weight_defaults():
    from test_robust_strategies import settings_with

    from bank_risk.strategy_factory import build_strategy
    from flower_ext.audit import AuditTrail

    def build(**kw):
        return build_strategy(settings_with(**kw), AuditTrail(), num_nodes=10)

    median = build(aggregation="median", num_malicious=2, bucket_size=2, seed=7)
    assert median.bucket_size == 2 and median.bucket_seed == 7
    norm = build(aggregation="norm-bound", max_norm=5.0, norm_factor=1.5)
    assert norm.norm_factor == 1.5 and norm.max_norm == 5.0
    assert build(aggregation="norm-bound", max_norm=5.0).norm_factor == 1.5  # the default
    assert build(aggregation="norm-bound", max_norm=5.0, norm_factor=0).norm_factor is None
    clip = build(aggregation="centered-clipping", clip_tau=3.0, clip_tau_factor=2.0)
    assert clip.tau_factor == 2.0
    # 0 = the rule's default cap: 2x median for weight-using robust rules, none for fedavg.
    assert build(aggregation="geometric-median").max_weight_median_multiple == 2.0
    assert build(aggregation="fedavg").max_weight_median_multiple is None
    assert (
        build(aggregation="fedavg", max_weight_median_multiple=4.0).max_weight_median_multiple == 4
    )
    from bank_risk.settings import SettingsError

    with pytest.raises(SettingsError, match="krum"):
        build(aggregation="krum", num_malicious=2, bucket_size=2)
