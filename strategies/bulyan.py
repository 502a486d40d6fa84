"""Bulyan: Krum selection, then a trimmed mean around the coordinate-wise median."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from flower_ext.aggregation import AggregationResult, bulyan, bulyan_min_clients

from .base import fedavg_arguments
from .robust import MetricsAggregationFn, RobustStrategy


class Bulyan(RobustStrategy):
    r"""Bulyan on validated updates (El Mhamdi et al., ICML 2018).

    "The Hidden Vulnerability of Distributed Learning in Byzantium". With
    :math:`\theta = n - 2f` and :math:`\beta = \theta - 2f`: Krum is run
    :math:`\theta` times, each time moving its choice to a selection set; then per
    coordinate the :math:`\beta` selected values closest to their median are
    averaged. A drop-in for ``flwr.serverapp.strategy.Bulyan`` that computes the
    pairwise distances once (in float64 on centred updates), leaves replies
    intact, and audits in which Krum round each client was picked or why not.

    Parameters
    ----------
    fraction_train, ..., evaluate_metrics_aggr_fn
        ``flwr.serverapp.strategy.Bulyan``'s arguments, in its positional order
        (``num_malicious_nodes`` 6th); ``**kwargs`` are the keyword arguments of
        :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    selection_rule : None
        Accepted for Flower's signature; only ``None`` (Krum) is supported, any
        other value raises ``ValueError`` saying why.
    num_malicious_nodes : int (default: 0)
        f. Needs ``n >= 4f + 3``.

    Weights
    -------
    Not used in either stage (see :class:`Median`).
    """

    uses_weights = False
    rule_name = "bulyan"

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        num_malicious_nodes: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregationFn | None = None,
        selection_rule: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Flower's positional order: num_malicious_nodes 6th, selection_rule last.
        if selection_rule is not None:
            raise ValueError(
                "flower-ext's Bulyan always selects with Krum on float64 distances of centred "
                "updates (El Mhamdi et al. 2018); a custom selection_rule over RecordDicts is "
                "not supported. Use flwr.serverapp.strategy.Bulyan for a custom rule, or "
                "MultiKrum / TrimmedMean from flower_ext.strategies."
            )
        super().__init__(
            **fedavg_arguments(locals()),
            num_malicious_nodes=num_malicious_nodes,
            **kwargs,
        )

    def rule_min_clients(self) -> int:
        return bulyan_min_clients(self.num_malicious_nodes)

    def requirement(self) -> str:
        return "Bulyan needs n >= 4f + 3"

    def rule_summary(self) -> str:
        return (
            f"Bulyan (f={self.num_malicious_nodes}): n - 2f Krum selections, then per "
            "coordinate the mean of the n - 4f selected values closest to the median"
        )

    def robust_aggregate(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return bulyan(updates, weights, self.num_malicious_nodes)
