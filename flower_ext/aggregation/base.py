"""Pure aggregation kernels over an (n, d) matrix of client updates.

Every kernel takes the stacked updates ``U`` (one row per client, float32 or
float64) and a weight per client, and returns an :class:`AggregationResult`: the
aggregated update and one :class:`ClientReport` per row saying what the rule did
with that client. Kernels import neither Flower nor torch, so they can be tested
and reused alone; the Strategy classes in :mod:`flower_ext.strategies` only move
Messages in and out of them.

Robust rules (Krum, Median, ...) are added to this module by the robust
aggregation work; :func:`weighted_mean` is the FedAvg rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatMatrix = NDArray[np.floating[Any]]
FloatVector = NDArray[np.floating[Any]]


@dataclass
class ClientReport:
    """What an aggregation rule did with one client's update.

    Attributes
    ----------
    selected : bool
        Whether the update contributed to the aggregate.
    score : float | None
        The rule's score for the client (e.g. Krum's sum of distances), if any.
    reason : str
        Why the client was rejected or changed (empty when used as sent).
    clip_factor : float
        Factor the update was scaled by before aggregation (1.0 = unchanged).
    weight : float
        Normalised weight the client had in the aggregate (0.0 if not selected).
    """

    selected: bool = True
    score: float | None = None
    reason: str = ""
    clip_factor: float = 1.0
    weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AggregationResult:
    """The aggregated update and a report per input row (same order)."""

    update: FloatVector
    reports: list[ClientReport] = field(default_factory=list)

    @property
    def selected_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.reports) if r.selected]

    @property
    def rejected_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.reports) if not r.selected]


def check_matrix(updates: FloatMatrix, weights: FloatVector | None = None) -> None:
    """Raise ``ValueError`` naming the problem if the kernel inputs are unusable."""
    if updates.ndim != 2:
        raise ValueError(f"updates must be a 2-D (n, d) matrix, got shape {updates.shape}")
    if updates.shape[0] == 0:
        raise ValueError("updates is empty: no client update to aggregate")
    if weights is not None:
        if weights.shape != (updates.shape[0],):
            raise ValueError(f"weights must have shape ({updates.shape[0]},), got {weights.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("weights must be finite and non-negative")
        if float(weights.sum()) <= 0.0:
            raise ValueError("weights sum to zero: no client carries any weight")


def normalised(weights: FloatVector) -> NDArray[np.float64]:
    """Weights as float64 summing to one."""
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def weighted_mean(updates: FloatMatrix, weights: FloatVector) -> AggregationResult:
    r"""FedAvg: the data-size weighted mean of the updates.

    .. math:: \Delta = \sum_i \frac{w_i}{\sum_j w_j} u_i

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017. One BLAS matrix-vector product over the
    stacked updates in their own dtype: converting a float32 (n, d) matrix to
    float64 would cost a second copy of it, and updates (not weights) are small
    enough that float32 accumulation loses nothing that matters.
    """
    check_matrix(updates, weights)
    w = normalised(weights)
    aggregate = w.astype(updates.dtype, copy=False) @ updates
    reports = [ClientReport(selected=True, weight=float(wi)) for wi in w]
    return AggregationResult(update=np.asarray(aggregate), reports=reports)


def weighted_sum_into(
    out: NDArray[np.floating[Any]],
    vectors: list[NDArray[np.floating[Any]]],
    weights: NDArray[np.floating[Any]],
) -> NDArray[np.floating[Any]]:
    r"""``out = \sum_i w_i v_i`` over 1-D vectors, reading each vector exactly once.

    The FedAvg rule without stacking: the vectors can be read-only zero-copy
    views on the clients' message bytes, so the server never copies a reply.
    float32 goes through BLAS ``saxpy`` (one fused pass per vector); other
    dtypes through NumPy.
    """
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    out[...] = 0
    if out.size == 0:  # BLAS rejects empty vectors; a zero-size array's mean is itself
        return out
    if out.dtype == np.float32:
        from scipy.linalg.blas import saxpy

        for vec, w in zip(vectors, weights, strict=True):
            if vec.shape != out.shape:
                raise ValueError(f"vector of shape {vec.shape}, expected {out.shape}")
            if vec.dtype == np.float32:
                saxpy(vec, out, a=float(w))  # in place on `out` (float32, contiguous)
            else:
                out += np.float32(w) * vec.astype(np.float32)
        return out
    for vec, w in zip(vectors, weights, strict=True):
        out += w * vec
    return out


def cap_weights(
    weights: FloatVector,
    max_weight: float | None = None,
    max_weight_median_multiple: float | None = None,
) -> tuple[NDArray[np.float64], list[bool]]:
    """Cap client-reported data sizes so no client can buy influence.

    Parameters
    ----------
    weights : array of shape (n,)
        Reported ``num-examples`` per client.
    max_weight : float, optional
        Absolute cap on any client's weight.
    max_weight_median_multiple : float, optional
        Cap at this multiple of the median reported weight (robust to a minority
        of liars: the median moves only if half the clients inflate).

    Returns
    -------
    capped weights (float64) and, per client, whether it was capped.
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    cap = np.inf
    if max_weight is not None:
        cap = min(cap, float(max_weight))
    if max_weight_median_multiple is not None and w.size:
        cap = min(cap, float(max_weight_median_multiple) * float(np.median(w)))
    capped = w > cap
    w[capped] = cap
    return w, capped.tolist()


def weight_policy(
    weights: FloatVector,
    pinned: FloatVector | None = None,
    max_weight: float | None = None,
    max_weight_median_multiple: float | None = None,
) -> tuple[NDArray[np.float64], list[str]]:
    """The audited weight policy: pin, then cap, the client-reported data sizes.

    Steps, in order (each only lowers a weight, never raises it):

    1. **pinned**: a client whose ``pinned[i]`` is finite gets at most that weight
       (e.g. the row count it reported at setup, when the server could still
       check it against the federation); ``NaN`` means "not pinned".
    2. **max_weight**: an absolute cap.
    3. **max_weight_median_multiple**: a cap at this multiple of the median of the
       weights after step 1 (federation-relative; the median moves only if half
       the clients lie).

    Parameters
    ----------
    weights : (n,) float
        Reported ``num-examples`` (finite, >= 0; the caller validated them).
    pinned : (n,) float, optional
        Per-client ceiling or ``NaN``.
    max_weight, max_weight_median_multiple : float, optional

    Returns
    -------
    (n,) float64 weights and, per client, the reason it was lowered ("" if not),
    e.g. ``"num-examples 1e+06 above the pinned 1000 (reported at setup)"``.

    Raises
    ------
    ValueError
        If ``pinned`` does not have shape (n,) or holds a negative value.
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    reasons = [""] * w.size
    if pinned is not None:
        pin = np.asarray(pinned, dtype=np.float64)
        if pin.shape != w.shape:
            raise ValueError(f"pinned must have shape {w.shape}, got {pin.shape}")
        if np.any(pin[np.isfinite(pin)] < 0):
            raise ValueError("pinned weights must be >= 0")
        for i in np.flatnonzero(np.isfinite(pin) & (w > pin)):
            reasons[i] = f"num-examples {w[i]:g} above the pinned {pin[i]:g} (reported at setup)"
            w[i] = pin[i]
    if max_weight is not None:
        for i in np.flatnonzero(w > max_weight):
            reasons[i] = _join(reasons[i], f"capped at max_weight {max_weight:g}")
            w[i] = max_weight
    if max_weight_median_multiple is not None and w.size:
        cap = float(max_weight_median_multiple) * float(np.median(w))
        for i in np.flatnonzero(w > cap):
            reasons[i] = _join(
                reasons[i],
                f"capped at {max_weight_median_multiple:g}x the round's median weight ({cap:g})",
            )
            w[i] = cap
    return w, reasons


def _join(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second
