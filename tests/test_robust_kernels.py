"""Robust aggregation kernels against straightforward float64 reference implementations.

Every reference below is written the slow, obvious way (loops, np.median, sorted
lists) so that it shares no code and no numerical trick with the kernels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flower_ext.aggregation import robust
from flower_ext.aggregation.base import weighted_mean
from flower_ext.aggregation.robust import (
    bulyan,
    bulyan_min_clients,
    centered_clipping,
    check_bulyan_params,
    check_krum_params,
    check_trimmed_mean_params,
    coordinate_median,
    geometric_median,
    krum,
    krum_min_clients,
    median_min_clients,
    multi_krum,
    norm_bound,
    pairwise_sq_distances,
    trim_count,
    trimmed_mean,
    trimmed_mean_min_clients,
)

# ---------------------------------------------------------------------------
# Fixtures and references
# ---------------------------------------------------------------------------


@pytest.fixture(params=["one_block", "many_blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the default column blocks and with 256-column blocks.

    Test matrices are small, so by default they fit one block; the tiny block size
    makes every blocked loop run several times and end on a partial block.
    """
    if request.param == "many_blocks":
        monkeypatch.setattr(robust, "_BLOCK_BYTES", 1)
    return request.param


def make_updates(n: int, d: int, seed: int, outliers: dict[int, float] | None = None) -> np.ndarray:
    """Honest float32 updates ~ N(0, 1); each outlier row is shifted by its value."""
    rng = np.random.default_rng(seed)
    updates = rng.standard_normal((n, d)).astype(np.float32)
    for row, shift in (outliers or {}).items():
        updates[row] += np.float32(shift)
    return updates


def ref_sq_distances(updates: np.ndarray) -> np.ndarray:
    u = updates.astype(np.float64)
    n = len(u)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            dist[i, j] = np.sum((u[i] - u[j]) ** 2)
    return dist


def ref_krum_scores(updates: np.ndarray, rows: list[int], f: int, floor_one: bool) -> dict:
    dist = ref_sq_distances(updates)
    k = len(rows) - f - 2
    if floor_one:
        k = max(1, k)
    return {i: sum(sorted(dist[i, j] for j in rows if j != i)[:k]) for i in rows}


def ref_krum(updates: np.ndarray, weights: np.ndarray, f: int, m: int):
    n = len(updates)
    scores = ref_krum_scores(updates, list(range(n)), f, floor_one=False)
    chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    w = np.asarray(weights, dtype=np.float64)[chosen]
    aggregate = (w[:, None] * updates[chosen].astype(np.float64)).sum(axis=0) / w.sum()
    return aggregate, chosen, scores


def ref_bulyan(updates: np.ndarray, f: int):
    n, d = updates.shape
    theta, beta = n - 2 * f, n - 4 * f
    remaining, chosen = list(range(n)), []
    while len(chosen) < theta:
        scores = ref_krum_scores(updates, remaining, f, floor_one=True)
        best = min(remaining, key=lambda i: (scores[i], i))
        chosen.append(best)
        remaining.remove(best)
    values = updates[sorted(chosen)].astype(np.float64)
    median = np.median(values, axis=0)
    aggregate = np.empty(d)
    for j in range(d):
        closest = sorted(range(theta), key=lambda r: abs(values[r, j] - median[j]))[:beta]
        aggregate[j] = np.mean(values[closest, j])
    return aggregate, sorted(chosen)


def ref_weiszfeld(updates: np.ndarray, weights: np.ndarray, iters: int = 20_000) -> np.ndarray:
    u = updates.astype(np.float64)
    alpha = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    z = alpha @ u
    for _ in range(iters):
        dist = np.array([math.sqrt(np.sum((z - ui) ** 2)) for ui in u])
        beta = alpha / np.maximum(dist, 1e-15)
        z_new = beta @ u / beta.sum()
        if np.linalg.norm(z_new - z) <= 1e-13 * max(np.linalg.norm(z), 1.0):
            return z_new
        z = z_new
    return z


def objective(point: np.ndarray, updates: np.ndarray, weights: np.ndarray) -> float:
    u = updates.astype(np.float64)
    return float(sum(w * np.linalg.norm(point - ui) for w, ui in zip(weights, u, strict=True)))


def ref_clip_mean(updates, weights, tau, center, iterations):
    u = updates.astype(np.float64)
    alpha = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    v = np.zeros(u.shape[1]) if center is None else np.asarray(center, dtype=np.float64)
    factors = []
    for _ in range(iterations):
        step, factors = np.zeros_like(v), []
        for a, ui in zip(alpha, u, strict=True):
            norm = math.sqrt(np.sum((ui - v) ** 2))
            factor = 1.0 if norm <= tau else tau / norm
            factors.append(factor)
            step += a * factor * (ui - v)
        v = v + step
    return v, factors


def check_reports(result, n: int) -> None:
    """Invariants every kernel's report must keep."""
    assert len(result.reports) == n
    weights = [r.weight for r in result.reports]
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-9)
    for report in result.reports:
        assert 0.0 <= report.weight <= 1.0
        if not report.selected:
            assert report.weight == 0.0 and report.reason
        if report.clip_factor < 1.0:
            assert report.reason


def unchanged_after(kernel, updates: np.ndarray, *args, **kwargs):
    """Run a kernel and check it did not write to its input (kernels are pure)."""
    before = updates.copy()
    result = kernel(updates, *args, **kwargs)
    np.testing.assert_array_equal(updates, before)
    return result


# ---------------------------------------------------------------------------
# Pairwise distances
# ---------------------------------------------------------------------------


def test_pairwise_distances_match_direct_float64(blocks: str) -> None:
    updates = make_updates(9, 700, seed=1, outliers={4: 30.0})
    got = unchanged_after(pairwise_sq_distances, updates)
    assert got.dtype == np.float64 and got.shape == (9, 9)
    np.testing.assert_allclose(got, ref_sq_distances(updates), rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(got, got.T)
    assert np.all(np.diag(got) == 0.0) and np.all(got >= 0.0)


def test_pairwise_distances_of_near_duplicates_are_never_negative() -> None:
    # Rows one ulp apart: G_ii + G_jj - 2 G_ij rounds to about -1e-11 here; a negative
    # "distance" would hand its owner a better Krum score than an exact copy.
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(2000) * 10).astype(np.float32)
    updates = np.stack(
        [base] * 3 + [base + np.float32(20) * rng.standard_normal(2000).astype(np.float32)]
    )
    for row in (1, 2):
        col = rng.integers(2000)
        updates[row, col] = np.nextafter(updates[row, col], np.float32(1e9))
    got = pairwise_sq_distances(updates)
    assert np.all(got >= 0.0)
    np.testing.assert_allclose(got, ref_sq_distances(updates), rtol=1e-9, atol=1e-9)


def test_pairwise_distances_stay_accurate_when_one_attacker_dominates_the_mean() -> None:
    # Honest updates 1e-4, one attacker 1e4 times larger: centring by the mean moves
    # every honest row by ~attacker/n, and the float64 Gram matrix must still resolve
    # honest distances ~1e-7 of the centred squared norms.
    rng = np.random.default_rng(2)
    updates = (rng.standard_normal((6, 20_000)) * 1e-4).astype(np.float32)
    updates[3] *= np.float32(1e4)
    np.testing.assert_allclose(pairwise_sq_distances(updates), ref_sq_distances(updates), rtol=1e-7)


def test_pairwise_distances_of_updates_sharing_a_large_common_part() -> None:
    # Clients moving the same way (a shared gradient of norm ~30) that differ by ~0.01:
    # the uncentred float32 formula loses the differences, centring keeps them.
    rng = np.random.default_rng(3)
    common = rng.standard_normal(100_000)
    updates = (0.1 * common + 1e-5 * rng.standard_normal((5, 100_000))).astype(np.float32)
    reference = ref_sq_distances(updates)
    np.testing.assert_allclose(pairwise_sq_distances(updates), reference, rtol=1e-9)
    norms = np.square(updates).sum(axis=1)
    naive = norms[:, None] + norms[None, :] - 2 * updates @ updates.T
    off_diagonal = ~np.eye(5, dtype=bool)
    relative_error = np.abs(naive - reference)[off_diagonal] / reference[off_diagonal]
    assert relative_error.max() > 0.1


def test_krum_at_one_million_parameters_where_flower_formula_is_noise() -> None:
    """Flower computes |x|^2 + |y|^2 - 2x.y on float32 *weights*; we use the updates.

    With d = 1M and weights ~ N(0, 1), |w|^2 ~ 1e6 and float32 resolves it to
    ~0.06, while honest updates of scale 1e-4 are 0.02 apart.
    """
    n, d = 6, 1_000_000
    rng = np.random.default_rng(7)
    global_weights = rng.standard_normal(d, dtype=np.float32)
    local_updates = rng.standard_normal((n, d), dtype=np.float32) * np.float32(1e-4)
    local_updates[5] = local_updates[5] * np.float32(2.0) + np.float32(1e-4)  # the attacker
    local_weights = global_weights + local_updates  # what clients send in Flower
    updates = local_weights - global_weights  # what our strategies aggregate

    reference = ref_sq_distances(updates)
    ours = pairwise_sq_distances(updates)
    np.testing.assert_allclose(ours, reference, rtol=1e-9)

    norms = np.square(local_weights).sum(axis=1)
    flower = norms[:, None] + norms[None, :] - 2 * local_weights @ local_weights.T
    off_diagonal = ~np.eye(n, dtype=bool)
    relative_error = np.abs(flower - reference)[off_diagonal] / reference[off_diagonal]
    assert relative_error.max() > 1.0  # Flower's distances are noise here

    weights = np.ones(n)
    result = krum(updates, weights, num_malicious=1)
    _, ref_chosen, ref_scores = ref_krum(updates, weights, f=1, m=1)
    assert result.selected_rows == ref_chosen
    assert 5 in result.rejected_rows
    np.testing.assert_allclose(
        [r.score for r in result.reports], [ref_scores[i] for i in range(n)], rtol=1e-9
    )


def test_non_finite_updates_are_refused_by_distance_kernels() -> None:
    updates = make_updates(7, 50, seed=3)
    updates[2, 10] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        pairwise_sq_distances(updates)
    with pytest.raises(ValueError, match="non-finite"):
        krum(updates, np.ones(7), 1)


# ---------------------------------------------------------------------------
# Krum / Multi-Krum
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, 1), (10, 2, 3), (12, 3, 9), (5, 1, 5)])
def test_krum_matches_reference(blocks: str, n: int, f: int, m: int) -> None:
    updates = make_updates(n, 300, seed=n * 10 + f, outliers={0: 8.0, n - 1: -6.0})
    weights = np.random.default_rng(n).uniform(1, 10, n)
    result = unchanged_after(krum, updates, weights, f, m)
    ref_aggregate, ref_chosen, ref_scores = ref_krum(updates, weights, f, m)
    assert result.selected_rows == ref_chosen
    np.testing.assert_allclose(
        [r.score for r in result.reports], [ref_scores[i] for i in range(n)], rtol=1e-9
    )
    assert result.update.dtype == np.float32
    np.testing.assert_allclose(result.update, ref_aggregate, rtol=1e-5, atol=1e-5)
    check_reports(result, n)
    if m <= n - 2:
        assert {0, n - 1} <= set(result.rejected_rows)  # the planted outliers


def test_krum_single_choice_is_that_update_and_reasons_name_the_rank() -> None:
    updates = make_updates(8, 100, seed=5, outliers={3: 20.0, 6: 25.0})
    result = krum(updates, np.arange(1.0, 9.0), num_malicious=2)
    (chosen,) = result.selected_rows
    np.testing.assert_array_equal(result.update, updates[chosen])
    assert result.reports[chosen].weight == 1.0
    assert result.reports[6].reason.startswith("krum score ")
    assert "ranked 8/8, not among the 1 selected" in result.reports[6].reason
    assert "ranked 7/8" in result.reports[3].reason


def test_krum_selection_ignores_inflated_weights() -> None:
    updates = make_updates(9, 200, seed=6, outliers={2: 10.0})
    weights = np.ones(9)
    weights[2] = 1e9  # the attacker claims a billion examples
    result = multi_krum(updates, weights, num_malicious=2)
    assert 2 in result.rejected_rows
    assert len(result.selected_rows) == 7  # default m = n - f
    honest = result.selected_rows
    np.testing.assert_allclose(result.update, updates[honest].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_multi_krum_geometric_median_of_the_selected_matches_references() -> None:
    # Three far outliers (rows 0, 4, 9) and two honest clusters: Multi-Krum (f = 3) drops
    # the outliers, then the geometric median of the 7 kept is Weiszfeld's (float64).
    updates = make_updates(10, 250, seed=31, outliers={0: 15.0, 4: -12.0, 9: 18.0})
    weights = np.random.default_rng(31).uniform(1, 10, 10)
    plain = multi_krum(updates, weights, num_malicious=3)
    result = unchanged_after(
        multi_krum, updates, weights, 3, None, selected_aggregate="geometric-median"
    )
    _, ref_chosen, _ = ref_krum(updates, weights, 3, 7)
    assert result.selected_rows == plain.selected_rows == ref_chosen
    assert {0, 4, 9} <= set(result.rejected_rows)
    chosen = list(ref_chosen)
    reference = ref_weiszfeld(updates[chosen], weights[chosen])
    kept = updates[chosen].astype(np.float64)

    def objective(v):
        return float(weights[chosen] @ np.linalg.norm(kept - v, axis=1))

    # default tolerance: at the optimum's objective to 1e-6, close to the optimum itself
    assert objective(result.update) <= objective(reference) * (1 + 1e-6)
    np.testing.assert_allclose(result.update, reference, rtol=0, atol=5e-3)
    assert not np.allclose(result.update, plain.update, atol=5e-2)  # not the mean
    check_reports(result, 10)
    assert result.reports[chosen[0]].reason.startswith("selected by Multi-Krum (score ")
    assert "geometric median weight" in result.reports[chosen[0]].reason
    assert result.reports[0].reason == plain.reports[0].reason  # Krum's rank reason
    with pytest.raises(ValueError, match="selected_aggregate must be one of"):
        multi_krum(updates, weights, 3, selected_aggregate="median")


def test_krum_rejects_invalid_parameters() -> None:
    updates = make_updates(6, 10, seed=0)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2.*at least 7 clients, but got 6"):
        krum(updates, np.ones(6), num_malicious=2)
    for bad_m in (0, 7):
        with pytest.raises(ValueError, match="num_selected must be in"):
            krum(updates, np.ones(6), num_malicious=1, num_selected=bad_m)
    for bad_f in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_malicious must be a non-negative integer"):
            krum(updates, np.ones(6), num_malicious=bad_f)
    with pytest.raises(ValueError, match="weights must have shape"):
        krum(updates, np.ones(5), num_malicious=1)
    weights = np.ones(6)
    weights[[0, 1, 2, 3, 4]] = 0.0  # only row 5 carries weight, and it is an outlier
    outlier_last = make_updates(6, 10, seed=0, outliers={5: 50.0})
    with pytest.raises(ValueError, match="all have weight 0"):
        krum(outlier_last, weights, num_malicious=1, num_selected=3)
    assert krum(outlier_last, weights, num_malicious=1).reports[5].selected is False
    with pytest.raises(ValueError, match="floating-point"):
        pairwise_sq_distances(np.ones((4, 3), dtype=np.int64))


def test_min_clients_helpers() -> None:
    assert [krum_min_clients(f) for f in range(4)] == [3, 5, 7, 9]
    assert [bulyan_min_clients(f) for f in range(4)] == [3, 7, 11, 15]
    assert [median_min_clients(f) for f in range(3)] == [1, 3, 5]
    check_krum_params(5, 1)  # n = 2f + 3 is enough
    with pytest.raises(ValueError):
        check_krum_params(4, 1)
    check_bulyan_params(7, 1)
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3"):
        check_bulyan_params(10, 2)
    with pytest.raises(ValueError):
        krum_min_clients(-1)


# ---------------------------------------------------------------------------
# Coordinate-wise median
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8, 11])
def test_median_matches_numpy_for_odd_and_even_n(blocks: str, n: int) -> None:
    updates = make_updates(n, 600, seed=n, outliers={0: 1e3} if n > 2 else None)
    result = unchanged_after(coordinate_median, updates)
    expected = np.median(updates.astype(np.float64), axis=0)
    # Mean of the two middle values in float64, rounded once: bit-equal to the reference.
    np.testing.assert_array_equal(result.update, expected.astype(np.float32))
    check_reports(result, n)
    distances = np.linalg.norm(updates.astype(np.float64) - result.update, axis=1)
    np.testing.assert_allclose([r.score for r in result.reports], distances, rtol=1e-4)
    # weight: the share of coordinates whose median the client formed
    ranks = np.argsort(np.argsort(updates, axis=0, kind="stable"), axis=0, kind="stable")
    middle = {(n - 1) // 2, n // 2}
    formed = np.isin(ranks, list(middle)).sum(axis=1)
    np.testing.assert_allclose([r.weight for r in result.reports], formed / formed.sum())
    if n > 2:
        assert result.reports[0].weight == 0.0
        assert max(r.score for r in result.reports) == result.reports[0].score


def test_median_weights_argument_is_validated_but_unused() -> None:
    updates = make_updates(5, 40, seed=9)
    plain = coordinate_median(updates)
    weighted = coordinate_median(updates, np.array([1e9, 1, 1, 1, 1.0]))
    np.testing.assert_array_equal(plain.update, weighted.update)
    with pytest.raises(ValueError, match="non-negative"):
        coordinate_median(updates, np.array([1, -1, 1, 1, 1.0]))


def test_median_without_report_gives_nominal_weights() -> None:
    updates = make_updates(6, 50, seed=4)
    result = coordinate_median(updates, report_distances=False)
    np.testing.assert_array_equal(result.update, coordinate_median(updates).update)
    assert all(r.score is None and r.weight == pytest.approx(1 / 6) for r in result.reports)


# ---------------------------------------------------------------------------
# Trimmed mean
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "beta"), [(10, 0.1), (11, 0.2), (20, 0.25), (7, 0.49)])
def test_trimmed_mean_matches_sorted_reference(blocks: str, n: int, beta: float) -> None:
    updates = make_updates(n, 500, seed=n, outliers={1: 50.0, 4: -50.0})
    result = unchanged_after(trimmed_mean, updates, beta=beta)
    k = math.floor(beta * n)
    ordered = np.sort(updates.astype(np.float64), axis=0)
    np.testing.assert_allclose(result.update, ordered[k : n - k].mean(axis=0), rtol=1e-6, atol=1e-6)
    check_reports(result, n)
    # score: the fraction of coordinates where the client was cut
    ranks = np.argsort(np.argsort(updates, axis=0), axis=0)
    cut = ((ranks < k) | (ranks >= n - k)).mean(axis=1)
    np.testing.assert_allclose([r.score for r in result.reports], cut)
    assert result.reports[1].score == 1.0 and result.reports[4].score == 1.0  # planted
    assert result.reports[1].weight == 0.0
    assert "trimmed in 100.0% of coordinates" in result.reports[1].reason


def test_trimmed_mean_with_nothing_to_trim_is_the_plain_mean() -> None:
    updates = make_updates(9, 300, seed=11, outliers={0: 100.0})
    weights = np.arange(1.0, 10.0)
    for beta in (0.0, 0.1):  # floor(0.1 * 9) = 0 as well
        result = trimmed_mean(updates, weights, beta=beta)
        np.testing.assert_allclose(
            result.update, updates.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-5
        )
        assert all(r.weight == pytest.approx(1 / 9) and r.score == 0.0 for r in result.reports)


def test_trimmed_mean_counts_ties_at_the_boundary_as_kept() -> None:
    # Sparse (top-k style) updates: most values are exactly 0, so the kept window's
    # bounds are 0 and clients sitting at 0 were used, not cut.
    updates = np.zeros((10, 100), dtype=np.float32)
    updates[7] = 9.0
    result = trimmed_mean(updates, beta=0.1)
    np.testing.assert_array_equal(result.update, np.zeros(100, dtype=np.float32))
    assert [r.score for r in result.reports] == [0.0] * 7 + [1.0] + [0.0] * 2
    assert result.reports[0].reason == "" and result.reports[7].reason


def test_trimmed_mean_drops_nan_and_inf_like_any_outlier() -> None:
    updates = make_updates(10, 64, seed=12)
    updates[3, :] = np.inf
    updates[6, :] = np.nan
    result = trimmed_mean(updates, beta=0.2)  # cuts 2 per end; inf and NaN sort to the top
    honest = np.sort(np.delete(updates, [3, 6], axis=0).astype(np.float64), axis=0)
    np.testing.assert_allclose(result.update, honest[2:].mean(axis=0), rtol=1e-6, atol=1e-6)
    assert result.reports[3].score == 1.0 and result.reports[6].score == 1.0


def test_trimmed_mean_parameter_checks() -> None:
    for bad in (0.5, -0.1, 1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="beta"):
            check_trimmed_mean_params(bad)
        with pytest.raises(ValueError, match="beta"):
            trimmed_mean(make_updates(4, 3, seed=0), beta=bad)
    # floor(beta * n) without losing a client to binary rounding (0.29 * 100 < 29 in fp)
    assert trim_count(100, 0.29) == 29
    assert trim_count(10, 0.3) == 3
    assert trim_count(9, 0.1) == 0
    assert trimmed_mean_min_clients(2, 0.1) == 20
    assert trimmed_mean_min_clients(1, 0.25) == 4
    assert trimmed_mean_min_clients(0, 0.0) == 1
    for f, beta in [(3, 0.2), (1, 0.49)]:
        n = trimmed_mean_min_clients(f, beta)
        assert trim_count(n, beta) >= f > trim_count(n - 1, beta)
    with pytest.raises(ValueError, match="tolerates no attacker"):
        trimmed_mean_min_clients(1, 0.0)


# ---------------------------------------------------------------------------
# Bulyan
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2), (12, 2), (15, 3), (5, 0)])
def test_bulyan_matches_reference(blocks: str, n: int, f: int) -> None:
    outliers = {i: 4.0 + i for i in range(f)}  # f attackers, pulled the same way
    updates = make_updates(n, 400, seed=100 + n, outliers=outliers)
    weights = np.random.default_rng(n).uniform(1, 5, n)
    result = unchanged_after(bulyan, updates, weights, f)
    ref_aggregate, ref_chosen = ref_bulyan(updates, f)
    assert result.selected_rows == ref_chosen
    np.testing.assert_allclose(result.update, ref_aggregate, rtol=1e-5, atol=1e-6)
    check_reports(result, n)
    assert set(outliers) <= set(result.rejected_rows)
    rejected = result.reports[result.rejected_rows[0]] if result.rejected_rows else None
    if rejected is not None:
        assert rejected.reason.startswith(f"not picked by any of the {n - 2 * f} Krum rounds")


def test_bulyan_ignores_weights_and_checks_n() -> None:
    updates = make_updates(11, 100, seed=13, outliers={0: 9.0})
    a = bulyan(updates, np.ones(11), 2)
    b = bulyan(updates, np.r_[1e9, np.ones(10)], 2)
    np.testing.assert_array_equal(a.update, b.update)
    with pytest.raises(ValueError, match=r"at least 11 clients, but got 10"):
        bulyan(updates[:10], np.ones(10), 2)


# ---------------------------------------------------------------------------
# Geometric median
# ---------------------------------------------------------------------------


def test_geometric_median_matches_weiszfeld_reference(blocks: str) -> None:
    updates = make_updates(9, 300, seed=21, outliers={2: 40.0, 5: -25.0})
    weights = np.random.default_rng(21).uniform(1, 10, 9)
    result = unchanged_after(geometric_median, updates, weights, max_iter=2000, tol=1e-13)
    reference = ref_weiszfeld(updates, weights)
    np.testing.assert_allclose(result.update, reference, rtol=1e-5, atol=1e-5)
    check_reports(result, 9)
    distances = np.linalg.norm(updates.astype(np.float64) - reference, axis=1)
    np.testing.assert_allclose([r.score for r in result.reports], distances, rtol=1e-4)
    assert "converged" in result.reports[0].reason
    assert "NOT" not in result.reports[0].reason
    # the planted outliers get the two smallest weights
    by_weight = sorted(range(9), key=lambda i: result.reports[i].weight)
    assert set(by_weight[:2]) == {2, 5}


def test_geometric_median_default_tolerance_reaches_the_optimum() -> None:
    updates = make_updates(12, 200, seed=22, outliers={0: 30.0})
    weights = np.ones(12)
    result = geometric_median(updates, weights)
    iterations = int(result.reports[0].reason.split("; ")[1].split()[0])
    assert 1 <= iterations < 100  # stopped on tol, well before max_iter
    best = objective(ref_weiszfeld(updates, weights), updates, weights)
    assert objective(result.update.astype(np.float64), updates, weights) <= best * (1 + 1e-5)
    mean_objective = objective(updates.astype(np.float64).mean(axis=0), updates, weights)
    assert best < mean_objective


def test_geometric_median_of_collinear_points_is_their_weighted_median() -> None:
    direction = np.random.default_rng(23).standard_normal(50)
    positions = np.array([0.0, 1.0, 2.0, 10.0, 100.0])
    updates = (positions[:, None] * direction).astype(np.float32)
    result = geometric_median(updates, np.ones(5), max_iter=500, tol=1e-12)
    np.testing.assert_allclose(result.update, 2.0 * direction, rtol=1e-5, atol=1e-5)
    # Weighted: enough weight on the point at 10 makes it the median.
    heavy = geometric_median(updates, np.array([1, 1, 1, 4, 1.0]), max_iter=500, tol=1e-12)
    np.testing.assert_allclose(heavy.update, 10.0 * direction, rtol=1e-5, atol=1e-5)


def test_geometric_median_reports_non_convergence_and_checks_parameters() -> None:
    updates = make_updates(7, 30, seed=24, outliers={0: 10.0})
    result = geometric_median(updates, np.ones(7), max_iter=1, tol=0.0)
    assert "1 Weiszfeld iterations, NOT converged" in result.reports[0].reason
    for kwargs in ({"max_iter": 0}, {"tol": -1.0}, {"eps": 0.0}, {"eps": float("nan")}):
        with pytest.raises(ValueError):
            geometric_median(updates, np.ones(7), **kwargs)
    zero_weight = np.r_[0.0, np.ones(6)]
    ignored = geometric_median(updates, zero_weight, max_iter=500, tol=1e-12)
    without = geometric_median(updates[1:], np.ones(6), max_iter=500, tol=1e-12)
    np.testing.assert_allclose(ignored.update, without.update, rtol=1e-5, atol=1e-6)
    assert ignored.reports[0].weight == 0.0


# ---------------------------------------------------------------------------
# Centered clipping and norm bounding
# ---------------------------------------------------------------------------


def test_centered_clipping_with_infinite_tau_is_the_weighted_mean(blocks: str) -> None:
    updates = make_updates(8, 300, seed=31, outliers={3: 100.0})
    weights = np.arange(1.0, 9.0)
    result = unchanged_after(centered_clipping, updates, weights, tau=math.inf)
    np.testing.assert_allclose(
        result.update, weighted_mean(updates, weights).update, rtol=1e-5, atol=1e-5
    )
    assert all(r.clip_factor == 1.0 and r.reason == "" for r in result.reports)


@pytest.mark.parametrize(("with_center", "iterations"), [(False, 1), (True, 1), (True, 3)])
def test_centered_clipping_matches_reference(
    blocks: str, with_center: bool, iterations: int
) -> None:
    updates = make_updates(10, 400, seed=32, outliers={7: 5.0})
    weights = np.random.default_rng(32).uniform(1, 3, 10)
    center = make_updates(1, 400, seed=33)[0] * np.float32(0.5) if with_center else None
    tau = 25.0
    result = centered_clipping(updates, weights, tau=tau, center=center, iterations=iterations)
    expected, factors = ref_clip_mean(updates, weights, tau, center, iterations)
    np.testing.assert_allclose(result.update, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r.clip_factor for r in result.reports], factors, rtol=1e-9)
    check_reports(result, 10)
    assert result.reports[7].clip_factor < 0.5  # the planted outlier is clipped hardest
    assert min(factors) == factors[7]
    assert "> tau 25: difference scaled by" in result.reports[7].reason


def test_centered_clipping_parameter_checks() -> None:
    updates = make_updates(4, 5, seed=0)
    for tau in (0.0, -1.0, float("nan"), None):
        with pytest.raises(ValueError, match="tau"):
            centered_clipping(updates, np.ones(4), tau=tau)
    with pytest.raises(ValueError, match="iterations"):
        centered_clipping(updates, np.ones(4), tau=1.0, iterations=0)
    with pytest.raises(ValueError, match=r"center must have shape \(5,\)"):
        centered_clipping(updates, np.ones(4), tau=1.0, center=np.zeros(4))


def test_norm_bound_clip_factors_and_aggregate(blocks: str) -> None:
    updates = make_updates(6, 300, seed=41)
    updates[2] *= np.float32(100.0)  # large updates get scaled to max_norm
    updates[4] *= np.float32(10.0)
    weights = np.array([1, 2, 3, 4, 5, 6.0])
    max_norm = 50.0
    result = unchanged_after(norm_bound, updates, weights, max_norm=max_norm)
    norms = np.linalg.norm(updates.astype(np.float64), axis=1)
    expected_factors = np.minimum(1.0, max_norm / norms)
    assert norms[2] > max_norm and norms[4] > max_norm and norms[0] < max_norm
    np.testing.assert_allclose([r.clip_factor for r in result.reports], expected_factors, rtol=1e-9)
    assert result.reports[2].clip_factor == pytest.approx(max_norm / norms[2], rel=1e-9)
    assert result.reports[0].clip_factor == 1.0 and result.reports[0].reason == ""
    assert result.reports[2].reason.startswith("L2 norm ")
    expected = (weights / weights.sum() * expected_factors) @ updates.astype(np.float64)
    np.testing.assert_allclose(result.update, expected, rtol=1e-5, atol=1e-5)
    # identical to centered clipping around zero for one iteration
    clipped = centered_clipping(updates, weights, tau=max_norm)
    np.testing.assert_allclose(result.update, clipped.update, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="max_norm"):
        norm_bound(updates, weights, max_norm=0.0)
