"""Bucketing in front of a robust rule, and adaptive clipping radii.

Bucketing (Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
Datasets via Bucketing", ICLR 2022): with non-IID clients, honest updates are far
apart, so a rule that keeps the "most central" updates (Krum) or the middle
values (median) has a large bias, and attackers hide inside the honest spread
(Min-Sum, mimic). Averaging random groups of ``s`` updates first shrinks the
honest spread by about ``sqrt(s)`` while each attacker can spoil at most one
bucket, so the rule then runs on ``ceil(n / s)`` far more homogeneous points.
With f attackers the rule must tolerate f bad buckets out of ``ceil(n / s)``;
the paper takes ``s <= n / (2f)``.

Adaptive radius: clipping rules need a radius in update units, and the honest
norms shrink as training converges (0.14-0.33 after round 2 on the bank app,
against a default of 1.0). ``adaptive_radius`` takes ``factor`` x the median of
the round's norms (or distances to a center): while attackers are a minority,
the median is an honest norm, so no attacker can inflate the radius.

Pure NumPy; no Flower.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .base import AggregationResult, ClientReport, FloatMatrix, FloatVector, check_matrix

__all__ = ["adaptive_radius", "bucket_means", "bucketed"]

#: ``rule(bucket_means, bucket_weights) -> AggregationResult`` over the buckets.
BucketRule = Callable[[FloatMatrix, FloatVector], AggregationResult]


def bucket_means(
    updates: FloatMatrix,
    weights: FloatVector,
    bucket_size: int,
    rng: np.random.Generator,
) -> tuple[NDArray[Any], NDArray[np.float64], NDArray[np.int64]]:
    r"""Random buckets of ``bucket_size`` rows and their weighted means.

    A random permutation :math:`\pi` of the n rows is cut into
    :math:`m = \lceil n / s \rceil` consecutive buckets (the last one may be
    smaller); bucket k's point is the weighted mean
    :math:`\bar u_k = \sum_{i \in B_k} w_i u_i / \sum_{i \in B_k} w_i` (the plain
    mean when every weight in it is 0) and its weight :math:`\sum_{i \in B_k} w_i`.

    Parameters
    ----------
    updates : (n, d) float
    weights : (n,) non-negative
    bucket_size : int >= 1 (1: every row its own bucket, in permuted order)
    rng : numpy Generator (the permutation; seed it per round to reproduce)

    Returns
    -------
    means (m, d) in the updates' dtype, bucket weights (m,) float64, and the
    bucket of every row (n,) int64.

    Raises
    ------
    ValueError
        For a ``bucket_size`` that is not a positive integer, or bad inputs.
    """
    check_matrix(updates, weights)
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, (int, np.integer)):
        raise ValueError(f"bucket_size must be a positive integer, got {bucket_size!r}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    n = updates.shape[0]
    perm = rng.permutation(n)
    m = -(-n // int(bucket_size))
    bucket_of = np.empty(n, dtype=np.int64)
    bucket_of[perm] = np.arange(n) // int(bucket_size)
    w = np.asarray(weights, dtype=np.float64)
    mix = np.zeros((m, n), dtype=np.float64)  # row k: the mean's coefficients
    for k in range(m):
        rows = np.flatnonzero(bucket_of == k)
        total = w[rows].sum()
        mix[k, rows] = w[rows] / total if total > 0 else 1.0 / len(rows)
    means = mix.astype(updates.dtype) @ updates
    bucket_weights = np.array([w[bucket_of == k].sum() for k in range(m)])
    return np.asarray(means), bucket_weights, bucket_of


def bucketed(
    rule: BucketRule,
    updates: FloatMatrix,
    weights: FloatVector,
    bucket_size: int,
    rng: np.random.Generator,
) -> AggregationResult:
    """Run ``rule`` on the bucket means (:func:`bucket_means`) and report per client.

    The aggregate is the rule's aggregate of the buckets. Each client's report is
    its bucket's: ``selected`` if the bucket was, ``score`` and ``clip_factor``
    the bucket's, ``weight`` the bucket's share times the client's share inside
    its bucket (so the shares still sum to one), and a reason naming the bucket
    and its members, followed by the rule's reason for the bucket. With
    ``bucket_size = 1`` it is ``rule`` itself, up to the row order it sees.
    """
    means, bucket_weights, bucket_of = bucket_means(updates, weights, bucket_size, rng)
    result = rule(means, bucket_weights)
    if len(result.reports) != means.shape[0]:
        raise ValueError(
            f"the rule returned {len(result.reports)} reports for {means.shape[0]} buckets"
        )
    w = np.asarray(weights, dtype=np.float64)
    reports = []
    for i in range(updates.shape[0]):
        k = int(bucket_of[i])
        members = np.flatnonzero(bucket_of == k)
        total = w[members].sum()
        inside = w[i] / total if total > 0 else 1.0 / len(members)
        bucket = result.reports[k]
        reason = f"bucket {k + 1}/{means.shape[0]} (rows {', '.join(map(str, members))})"
        if bucket.reason:
            reason += f": {bucket.reason}"
        reports.append(
            ClientReport(
                selected=bucket.selected,
                score=bucket.score,
                reason=reason,
                clip_factor=bucket.clip_factor,
                weight=float(bucket.weight * inside),
            )
        )
    return AggregationResult(update=result.update, reports=reports)


def adaptive_radius(norms: FloatVector, factor: float, ceiling: float = np.inf) -> float:
    r"""Clipping radius from the round's norms: ``min(ceiling, factor * median(norms))``.

    Parameters
    ----------
    norms : (n,) non-negative float
        The round's L2 norms of the updates (NormBound) or their distances to
        the center (CenteredClipping), in update units.
    factor : float > 0
        Multiple of the median; 1 clips the larger half of the updates to the
        median norm, 2 only clear outliers.
    ceiling : float (default: inf)
        A fixed radius the adaptive one never exceeds.

    Returns
    -------
    The radius (> 0; if the median is 0, the smallest positive norm times
    ``factor``, or ``ceiling``/1.0 when every norm is 0).

    Raises
    ------
    ValueError
        For an empty or non-finite ``norms`` or a ``factor`` not > 0.
    """
    x = np.asarray(norms, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("norms must be a non-empty finite vector")
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor!r}")
    median = float(np.median(x))
    if median <= 0:
        positive = x[x > 0]
        if positive.size == 0:
            return float(ceiling) if np.isfinite(ceiling) else 1.0
        median = float(positive.min())
    return float(min(ceiling, factor * median))
