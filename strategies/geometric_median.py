"""Geometric median of the updates (RFA, smoothed Weiszfeld)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_ext.aggregation import AggregationResult, geometric_median, median_min_clients

from .robust import RobustStrategy


class GeometricMedian(RobustStrategy):
    r"""Robust Federated Aggregation: the weighted geometric median of the updates.

    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning",
    IEEE TSP 2022. :math:`\Delta = \arg\min_v \sum_i \alpha_i \lVert v - u_i \rVert`
    by the smoothed Weiszfeld algorithm, from the weighted mean; the iterations
    run on the n x n Gram matrix, so their cost does not grow with the model.

    Parameters
    ----------
    *args, **kwargs
        ``flwr.serverapp.strategy.FedAvg``'s arguments, plus the keyword arguments
        of :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    num_malicious_nodes : int (default: 0)
        f; the geometric median breaks down at half the weight, so
        ``n >= 2f + 1`` is checked.
    max_iter, tol, eps
        Weiszfeld settings: at most ``max_iter`` iterations, stop when the
        objective moves by at most ``tol`` relative, ``eps`` guards the division.

    Weights
    -------
    :math:`\alpha_i` = (capped) ``num-examples`` share, as in RFA. An attacker
    that inflates its count gains weight here, so the count is policed.
    By default capped at 2x the round's median (``max_weight_median_multiple=2.0``;
    ``None`` turns it off) and at ``pinned_weights`` where given; every lowered
    weight is audited (``weight_capped``, ``weight_cap_reason``).

    Measured (README, robustness acceptance table: the bank app, 10 non-IID banks,
    20 rounds, 2 seeds, 3 local epochs): holds attacks crafted inside the honest spread
    (ALIE, Min-Max, Min-Sum, Fang's trimmed-mean, mimic: within 0.010 AUC of clean
    FedAvg at 3 of 10 malicious) but is pulled by large coordinated updates, which keep
    their (pinned, capped) weight here: IPM -0.046 and sign flip -0.022 at 3 of 10.
    """

    uses_weights = True
    rule_name = "geometric-median"

    def __init__(
        self,
        *args: Any,
        num_malicious_nodes: int = 0,
        max_iter: int = 100,
        tol: float = 1e-6,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.max_iter, self.tol, self.eps = max_iter, float(tol), float(eps)

    def rule_min_clients(self) -> int:
        return median_min_clients(self.num_malicious_nodes)

    def requirement(self) -> str:
        return "the geometric median needs attackers to be a strict minority, n >= 2f + 1"

    def rule_summary(self) -> str:
        return (
            f"geometric median (RFA, smoothed Weiszfeld, max_iter={self.max_iter}, "
            f"tol={self.tol:g}), weighted by num-examples"
        )

    def robust_aggregate(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return geometric_median(
            updates, weights, max_iter=self.max_iter, tol=self.tol, eps=self.eps
        )
