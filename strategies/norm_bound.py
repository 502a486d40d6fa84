"""Norm bounding: clip every update to an L2 bound, then average."""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_ext.aggregation import AggregationResult, norm_bound

from .robust import RobustStrategy


class NormBound(RobustStrategy):
    r"""Clip every update to L2 norm ``max_norm``, then take the weighted mean.

    Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
    2019: :math:`\Delta = \sum_i \alpha_i u_i / \max(1, \lVert u_i \rVert / M)`.
    It removes nobody; it bounds what any one client can do (a scaled
    model-replacement update shrinks to norm M). Not a defence against attackers
    whose updates are small but wrong (sign flip at scale 1, ALIE, IPM): combine
    it with, or replace it by, a robust rule there.

    Parameters
    ----------
    *args, **kwargs
        ``flwr.serverapp.strategy.FedAvg``'s arguments, plus the keyword arguments
        of :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    max_norm : float
        M, in the units of the update's L2 norm (the audit's ``score`` is every
        client's norm; set M a little above the honest ones). With ``norm_factor``
        a ceiling on the adaptive bound (``float("inf")`` allowed).
    norm_factor : float, optional
        Adaptive bound: each round ``M = min(max_norm, norm_factor x median norm)``
        of that round's updates (attackers, a minority, cannot move the median; the
        bound follows the honest norms as they shrink during training).
    num_malicious_nodes : int (default: 0)
        Accepted for a uniform interface; no f-vs-n condition applies.

    Weights
    -------
    :math:`\alpha_i` = (capped) ``num-examples`` share of the clipped updates.
    By default capped at 2x the round's median (``max_weight_median_multiple=2.0``;
    ``None`` turns it off) and at ``pinned_weights`` where given; every lowered
    weight is audited (``weight_capped``, ``weight_cap_reason``).
    """

    uses_weights = True
    rule_name = "norm-bound"

    def __init__(
        self,
        *args: Any,
        max_norm: float,
        norm_factor: float | None = None,
        num_malicious_nodes: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        self.max_norm = float(max_norm)
        if norm_factor is not None and (
            isinstance(norm_factor, bool)
            or not isinstance(norm_factor, (int, float))
            or not 0 < norm_factor < float("inf")
        ):
            raise ValueError(f"norm_factor must be a positive number, got {norm_factor!r}")
        self.norm_factor = None if norm_factor is None else float(norm_factor)

    def requirement(self) -> str:
        return "norm bounding has no f-vs-n condition"

    def rule_summary(self) -> str:
        if self.norm_factor is not None:
            return (
                f"every update clipped to L2 norm min({self.max_norm:g}, {self.norm_factor:g} x "
                "the round's median norm), then weighted mean"
            )
        return f"every update clipped to L2 norm {self.max_norm:g}, then weighted mean"

    def robust_aggregate(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return norm_bound(updates, weights, max_norm=self.max_norm, norm_factor=self.norm_factor)
