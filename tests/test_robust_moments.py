"""Robust standardisation: poisoned feature moments are neutralised and audited."""

from __future__ import annotations

import numpy as np
import pytest

from flower_ext.aggregation.moments import robust_feature_moments
from flower_ext.model import combine_feature_moments, feature_moments


def banks(num=10, d=6, seed=0):
    """Non-IID banks: each its own shift and scale per feature, 300-1200 rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        rows = int(rng.integers(300, 1200))
        shift = rng.normal(0, 0.3, d)
        scale = np.exp(rng.normal(0, 0.1, d))
        out.append(rng.normal(shift, scale, size=(rows, d)) * 100.0 + 5.0)
    return out


def pooled(xs):
    x = np.concatenate(xs)
    return x.mean(axis=0), x.std(axis=0)


def test_honest_banks_give_exactly_the_pooled_moments_float64():
    xs = banks()
    r = robust_feature_moments([feature_moments(x) for x in xs])
    mean, std = pooled(xs)
    assert r.rejected == {} and r.capped == {} and r.kept == list(range(10))
    np.testing.assert_allclose(r.mean, mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(r.std, std, rtol=1e-10)
    plain = combine_feature_moments([feature_moments(x) for x in xs])
    np.testing.assert_allclose(r.std, plain[1], rtol=1e-10)


def _poison(kind, part):
    count, total, total_sq = part
    if kind == "sum-sq x 10000":
        return count, total, total_sq * 1e4
    if kind == "sum-sq / 10000":  # shrinks the std: fails the variance bound
        return count, total, total_sq / 1e4
    if kind == "mean x 50":
        return count, total * 50, total_sq * 2500
    if kind == "count x 1000, consistent":
        return count * 1000, total * 1000, total_sq * 1000
    if kind == "negative count":
        return -count, total, total_sq
    if kind == "nan":
        return count, total * np.nan, total_sq
    raise AssertionError(kind)


def replaced_reference(xs, liars, what):
    """Float64 reference: the pooled moments by the law of total variance, with the
    liars' ``what`` statistics (means and/or stds) set to the median of the honest
    banks' (for when every feature's ``what`` of a liar is an outlier)."""
    n = np.array([len(x) for x in xs], dtype=np.float64)
    m = np.stack([x.mean(axis=0) for x in xs])
    s = np.stack([x.std(axis=0) for x in xs])
    honest = [i for i in range(len(xs)) if i not in liars]
    for i in liars:
        if "mean" in what:
            m[i] = np.median(m[honest], axis=0)
        if "std" in what:
            s[i] = np.median(s[honest], axis=0)
    mean = n @ m / n.sum()
    return mean, np.sqrt(n @ (s**2 + (m - mean) ** 2) / n.sum())


@pytest.mark.parametrize(
    "kind",
    [
        "sum-sq x 10000",
        "sum-sq / 10000",
        "mean x 50",
        "count x 1000, consistent",
        "negative count",
        "nan",
    ],
)
@pytest.mark.parametrize("liars", [(3,), (2, 7), (2, 5, 7)])
def test_poisoned_moments_are_neutralised(kind, liars):
    xs = banks()
    parts = [feature_moments(x) for x in xs]
    honest_mean, honest_std = pooled([x for i, x in enumerate(xs) if i not in liars])
    all_mean, all_std = pooled(xs)
    plain_mean, plain_std = combine_feature_moments(
        [_poison(kind, p) if i in liars else p for i, p in enumerate(parts)]
    )
    r = robust_feature_moments([_poison(kind, p) if i in liars else p for i, p in enumerate(parts)])
    if kind == "count x 1000, consistent":
        # Harmless moments, kept: the bank weighs 3x the median count at most, so its
        # (honest, non-IID) mean moves the result a bounded amount from the true one.
        assert np.abs(r.mean - all_mean).max() <= 0.25 * all_std.min()
        assert np.abs(r.std / all_std - 1).max() <= 0.05
        assert set(r.capped) == set(liars) and r.rejected == {} == r.replaced
        assert all(r.counts[i] < 3000 for i in liars)
    elif kind == "sum-sq x 10000":
        # Only the stds lie: the liars' counts and their honest means are kept (held
        # to z 3: an unusual honest mean of a flagged bank may be replaced too), so
        # the mean is close to the pooled mean of ALL banks; their stds are replaced
        # by the honest median.
        assert np.abs(r.mean - all_mean).max() <= 0.05 * all_std.min()
        _, ref_std = replaced_reference(xs, liars, "std")
        np.testing.assert_allclose(r.std, ref_std, rtol=0.02)
        assert set(r.replaced) == set(liars) and r.rejected == {}
        assert all("std" in r.replaced[i] and "median" in r.replaced[i] for i in liars)
        assert all(r.counts[i] == len(xs[i]) for i in liars)
    elif kind == "mean x 50":
        # Every std (x50) is an outlier, so each liar is held to z 3 on its means:
        # a mean near 0 stays near 0 when multiplied and may pass; the rest are
        # replaced by the honest median. Bounded: 3 robust spreads x the liars' share.
        assert set(r.replaced) == set(liars) and r.rejected == {}
        assert np.abs(r.mean - all_mean).max() <= 0.25 * all_std.min()
        assert np.abs(r.std / all_std - 1).max() <= 0.2
    else:  # fails a bound: left out, exactly the honest banks' pooled moments
        np.testing.assert_allclose(r.mean, honest_mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(r.std, honest_std, rtol=1e-9)
        assert set(r.rejected) == set(liars) and r.replaced == {}
        assert all(r.rejected[i] for i in liars)  # every rejection has a reason
    # Plain sums are wrecked by the same poisoning (except the harmless kinds).
    if kind in ("sum-sq x 10000", "mean x 50"):
        assert (
            np.abs(plain_std / all_std - 1).max() > 0.5
            or np.abs(plain_mean - all_mean).max() > all_std.min()
        )
        assert np.abs(r.std / all_std - 1).max() < 0.2  # and the robust result is not


def test_one_outlier_feature_replaces_only_that_statistic():
    xs = banks()
    parts = [feature_moments(x) for x in xs]
    count, total, total_sq = parts[4]
    total_sq = total_sq.copy()
    total_sq[2] *= 1e4  # only feature 2's std lies
    parts[4] = (count, total, total_sq)
    r = robust_feature_moments(parts, names=[f"f{j}" for j in range(6)])
    assert list(r.replaced) == [4] and "feature f2" in r.replaced[4]
    assert "0 mean(s) and 1 std(s) of 6 features replaced" in r.replaced[4]
    all_mean, all_std = pooled(xs)
    np.testing.assert_allclose(r.mean, all_mean, rtol=1e-9, atol=1e-9)
    others = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(r.std[others], all_std[others], rtol=1e-9)
    assert abs(r.std[2] / all_std[2] - 1) < 0.1


def test_reasons_name_the_feature_and_the_bound():
    xs = banks()
    parts = [feature_moments(x) for x in xs]
    parts[4] = _poison("sum-sq x 10000", parts[4])
    parts[6] = _poison("sum-sq / 10000", parts[6])
    names = [f"f{j}" for j in range(6)]
    r = robust_feature_moments(parts, names=names)
    assert "outlier std of feature f" in r.replaced[4] and "robust z-score" in r.replaced[4]
    assert "negative variance" in r.rejected[6]


def test_disagreeing_majority_is_refused_and_few_banks_skip_outlier_step():
    xs = banks(num=4)
    parts = [feature_moments(x) for x in xs]
    parts[0] = _poison("sum-sq x 10000", parts[0])
    r = robust_feature_moments(parts)  # 4 < min_banks_for_outliers: bounds only
    assert r.rejected == {} and np.isnan(r.max_z).all()
    with pytest.raises(ValueError, match="no bank sent usable"):
        robust_feature_moments([_poison("nan", p) for p in parts])
    xs = banks(num=6)
    parts = [feature_moments(x) for x in xs]
    with pytest.raises(ValueError, match="too few to tell"):  # nearly every bank an outlier
        robust_feature_moments(parts, z_max=0.01)


# ---------------------------------------------------------------------------
# The bank app's standardisation query
# ---------------------------------------------------------------------------


class _MomentsGrid:
    """Answers the feature-statistics query with each node's (possibly poisoned) moments."""

    def __init__(self, parts: dict[int, tuple]) -> None:
        self.parts = parts

    def send_and_receive(self, messages, timeout):
        from conftest import sent
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        replies = []
        for msg in sent(messages):
            node = int(msg.metadata.dst_node_id)
            count, total, total_sq = self.parts[node]
            TaskIdentity.node_id = node
            content = RecordDict(
                {
                    "moments": MetricRecord(
                        {
                            "num-examples": int(count),
                            "sum": [float(v) for v in total],
                            "sum-sq": [float(v) for v in total_sq],
                        }
                    ),
                    "features": ConfigRecord({"names": [f"f{j}" for j in range(len(total))]}),
                    "client-info": ConfigRecord({"bank": f"bank-{node}"}),
                }
            )
            replies.append(Message(content=content, reply_to=msg))
        TaskIdentity.node_id = 1
        return replies


def test_app_standardisation_neutralises_poison_and_pins_counts(as_server):
    from bank_risk.server_app import federated_standardisation
    from flower_ext.audit import AuditTrail

    xs = banks(num=10)
    nodes = list(range(100, 110))
    parts = {n: feature_moments(x) for n, x in zip(nodes, xs, strict=True)}
    parts[103] = _poison("sum-sq x 10000", parts[103])
    parts[106] = _poison("count x 1000, consistent", parts[106])
    audit = AuditTrail()
    stats = federated_standardisation(_MomentsGrid(parts), nodes, 5.0, audit)
    all_mean, all_std = pooled(xs)
    assert np.abs(stats.std / all_std - 1).max() < 0.25  # 106 over-weighted, bounded
    assert np.abs(stats.mean - all_mean).max() < 0.25 * all_std.min()
    events = {e["event"]: e for e in audit.events}
    assert "stats_rejected" not in events
    assert events["stats_replaced"]["node_id"] == 103
    assert "outlier std" in events["stats_replaced"]["reason"]
    assert events["stats_count_capped"]["node_id"] == 106
    std_event = events["standardisation"]
    assert std_event["outliers"] == [103] == std_event["replaced"] and std_event["banks"] == 10
    # The pinned training weights: reported counts, 106's capped at 3x the median.
    assert stats.counts[100] == len(xs[0])
    assert stats.counts[106] < 3 * max(len(x) for x in xs) < len(xs[6]) * 1000
