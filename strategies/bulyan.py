"""Bulyan: Krum selection, then a trimmed mean around the coordinate-wise median."""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_ext.aggregation import AggregationResult, bulyan, bulyan_min_clients

from .robust import RobustStrategy


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
    *args, **kwargs
        ``flwr.serverapp.strategy.FedAvg``'s arguments, plus the keyword arguments
        of :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    num_malicious_nodes : int (default: 0)
        f. Needs ``n >= 4f + 3``.

    Weights
    -------
    Not used in either stage (see :class:`Median`).
    """

    uses_weights = False
    rule_name = "bulyan"

    def __init__(self, *args: Any, num_malicious_nodes: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)

    def min_clients(self) -> int:
        return bulyan_min_clients(self.num_malicious_nodes)

    def requirement(self) -> str:
        return "Bulyan needs n >= 4f + 3"

    def rule_summary(self) -> str:
        return (
            f"Bulyan (f={self.num_malicious_nodes}): n - 2f Krum selections, then per "
            "coordinate the mean of the n - 4f selected values closest to the median"
        )

    def aggregate_updates(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return bulyan(updates, weights, self.num_malicious_nodes)
