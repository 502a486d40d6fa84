"""Coordinate-wise trimmed mean of the updates."""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_ext.aggregation import (
    AggregationResult,
    check_trimmed_mean_params,
    trim_count,
    trimmed_mean,
    trimmed_mean_min_clients,
)

from .base import fedavg_arguments
from .robust import MetricsAggregationFn, RobustStrategy


class TrimmedMean(RobustStrategy):
    r"""Coordinate-wise trimmed mean of validated updates (Yin et al., ICML 2018).

    With :math:`k = \lfloor \beta n \rfloor`, every coordinate drops its k smallest
    and k largest values and averages the rest:
    :math:`\Delta_j = \frac{1}{n - 2k} \sum_{r=k+1}^{n-k} u_{(r)j}`. A drop-in for
    ``flwr.serverapp.strategy.FedTrimmedAvg`` (same ``beta`` and default) that
    leaves replies intact and reports, per client, the fraction of its
    coordinates that were trimmed (an attacker pushing one way approaches 100%).

    Parameters
    ----------
    *args, **kwargs
        ``flwr.serverapp.strategy.FedAvg``'s arguments, plus the keyword arguments
        of :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    beta : float (default: 0.2)
        Fraction cut from EACH end, in ``[0, 0.5)``.
    num_malicious_nodes : int (default: 0)
        f; checked so that ``floor(beta * n) >= f`` (every attacker can be trimmed).
    report_trim_fraction : bool (default: True)
        Count trimmed coordinates per client for the audit; ``False`` is faster.

    Weights
    -------
    Not used, for the same reason as in :class:`Median`.
    """

    uses_weights = False
    rule_name = "trimmed-mean"

    def __init__(
        self,
        *args: Any,
        beta: float = 0.2,
        num_malicious_nodes: int = 0,
        report_trim_fraction: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)
        check_trimmed_mean_params(beta)
        self.beta = float(beta)
        self.report_trim_fraction = bool(report_trim_fraction)
        # Fails here, not at round 1, if beta = 0 with f > 0.
        trimmed_mean_min_clients(self.num_malicious_nodes, self.beta)

    def rule_min_clients(self) -> int:
        return trimmed_mean_min_clients(self.num_malicious_nodes, self.beta)

    def requirement(self) -> str:
        return f"floor(beta * n) >= f with beta = {self.beta:g}"

    def rule_summary(self) -> str:
        return (
            f"coordinate-wise trimmed mean (beta={self.beta:g}: floor(beta*n) values cut "
            "from each end of every coordinate; unweighted)"
        )

    def robust_aggregate(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        k = trim_count(updates.shape[0], self.beta)
        assert k >= self.num_malicious_nodes  # min_replies() guarantees it
        return trimmed_mean(
            updates, weights, beta=self.beta, report_trim_fraction=self.report_trim_fraction
        )


class FedTrimmedAvg(TrimmedMean):
    """Flower's name for :class:`TrimmedMean`, with ``flwr.serverapp.strategy.FedTrimmedAvg``'s
    signature: ``FedAvg``'s arguments, then ``beta`` (11th, the fraction cut from each tail).

    flower-ext's options (``num_malicious_nodes``, weight caps, audit, ...) are
    keyword-only.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregationFn | None = None,
        beta: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            **fedavg_arguments(locals()),
            beta=beta,
            **kwargs,
        )
