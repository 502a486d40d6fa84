"""FedNova's normalised averaging: no bank counts twice for training more steps.

Wang, Liu, Liang, Joshi and Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020 (Eq. 8-9).

With FedAvg each bank trains ``local-epochs`` over its own rows, so bank i takes
``tau_i`` steps in proportion to its size and its update is roughly
``-lr * tau_i * grad F_i``. Weighting those updates by ``p_i`` (its share of the
rows) weights bank i's objective by ``p_i * tau_i``, i.e. by its size *squared*:
FedAvg converges to the optimum of ``sum_i p_i tau_i F_i``, not the federation's
``sum_i p_i F_i`` (the bigger banks count twice). FedNova divides each update by
its bank's normalising factor ``a_i`` (``tau_i`` for plain SGD; with heavy-ball
momentum beta, ``sum_k (1 - beta**k) / (1 - beta)``,
:func:`flower_ext.scaffold.effective_steps`) and applies
``tau_eff * sum_i p_i d_i`` with ``d_i = Delta_i / a_i`` and ``tau_eff = sum_i p_i a_i``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: A bank's claimed steps are held within this factor of what its rows imply at the
#: round's median steps per row (a bank 20x smaller takes ~20x fewer steps; momentum's
#: warm-up makes a bank of a few batches report up to ~5x fewer again).
STEPS_BAND = 10.0


def bounded_steps(
    weights: NDArray[np.floating],
    steps: NDArray[np.floating],
    band: float = STEPS_BAND,
    floor: float = 0.0,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """``(steps', clamped)``: each bank's claimed steps held within ``band`` x of
    ``median_j(a_j / n_j) * n_i``, the steps its (validated, pinned) row count ``n_i`` implies
    at the round's median steps per row; ``clamped`` marks the banks whose claim moved.

    FedNova divides by the claimed steps, so an unbounded claim buys a bank any share of
    the round (1e-6 steps: all of it) and scales everyone's step (1e7 steps: x22,000). A
    bank's rows are pinned at setup; its steps per row cannot differ much from the
    others' when all train the same epochs with the same batch size, so a claim outside
    the band is a lie or a misconfiguration, and is clamped (a liar moves its weight by at
    most ``band``). ``floor``: the fewest steps an honest bank takes whatever its rows (the
    app's ``min-local-steps``, in the same momentum-adjusted units): the implied steps are
    ``max(median_j(a_j / n_j) * n_i, floor)``, so a small bank that honestly ran more epochs
    is not clamped. Raises ``ValueError`` on ``band < 1``, ``floor < 0`` or shapes that differ.
    """
    n = np.asarray(weights, dtype=np.float64)
    a = np.asarray(steps, dtype=np.float64)
    if band < 1 or n.shape != a.shape or not floor >= 0:
        raise ValueError(
            f"band must be >= 1, floor >= 0 and shapes equal, got {band}, {floor}, "
            f"{n.shape}, {a.shape}"
        )
    positive = n > 0
    if not positive.any():
        return a.copy(), np.zeros(a.shape, dtype=bool)
    per_row = float(np.median(a[positive] / n[positive]))
    implied = np.maximum(per_row * n, floor)
    low, high = implied / band, implied * band
    out = np.where(positive, np.clip(a, low, high), a)
    return out, out != a


def fednova_weights(
    weights: NDArray[np.floating], steps: NDArray[np.floating]
) -> tuple[NDArray[np.float64], float]:
    """``(shares, scale)`` such that ``scale * sum_i shares_i * Delta_i`` is FedNova's step.

    ``weights``: the banks' (validated, capped) weights ``n_i``, shape ``(k,)``, >= 0
    with a positive sum; ``steps``: their normalising factors ``a_i`` (effective local
    steps), shape ``(k,)``, finite and > 0. ``shares_i = (p_i / a_i) / sum_j (p_j / a_j)``
    (they sum to 1, so the weighted-mean machinery computes ``sum_i shares_i Delta_i``) and
    ``scale = tau_eff * sum_j (p_j / a_j)`` with ``tau_eff = sum_j p_j a_j``. With equal
    steps everywhere ``shares = p`` and ``scale = 1``: FedAvg exactly. Raises
    ``ValueError`` on shapes that differ, negative or non-finite weights, a zero weight
    sum, or steps that are not finite and positive.
    """
    n = np.asarray(weights, dtype=np.float64)
    a = np.asarray(steps, dtype=np.float64)
    if n.ndim != 1 or n.shape != a.shape or n.size == 0:
        raise ValueError(f"weights and steps must be 1-D of one length, got {n.shape}, {a.shape}")
    if not np.isfinite(n).all() or (n < 0).any() or n.sum() <= 0:
        raise ValueError("weights must be finite, >= 0 and not all 0")
    if not np.isfinite(a).all() or (a <= 0).any():
        raise ValueError("local steps must be finite and > 0")
    p = n / n.sum()
    per_step = p / a
    tau_eff = float(np.dot(p, a))
    return per_step / per_step.sum(), tau_eff * float(per_step.sum())
