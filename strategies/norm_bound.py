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
        client's norm; set M a little above the honest ones).
    num_malicious_nodes : int (default: 0)
        Accepted for a uniform interface; no f-vs-n condition applies.

    Weights
    -------
    :math:`\alpha_i` = (capped) ``num-examples`` share of the clipped updates.
    """

    uses_weights = True
    rule_name = "norm-bound"

    def __init__(
        self, *args: Any, max_norm: float, num_malicious_nodes: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def requirement(self) -> str:
        return "norm bounding has no f-vs-n condition"

    def rule_summary(self) -> str:
        return f"every update clipped to L2 norm {self.max_norm:g}, then weighted mean"

    def aggregate_updates(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return norm_bound(updates, weights, max_norm=self.max_norm)
