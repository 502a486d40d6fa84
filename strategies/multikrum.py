"""Multi-Krum: average the m updates closest to their neighbours."""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_ext.aggregation import AggregationResult, krum_min_clients, multi_krum

from .robust import RobustStrategy


class MultiKrum(RobustStrategy):
    r"""Multi-Krum on validated client updates (Blanchard et al., NeurIPS 2017).

    Krum's score :math:`s(i) = \sum_{i \to j} \lVert u_i - u_j \rVert^2` (over the
    ``n - f - 2`` nearest neighbours) ranks the updates; the ``m`` with the lowest
    scores are averaged. El Mhamdi et al. (ICML 2018) use ``m = n - f``, the
    largest selection that can still leave out every attacker; that is the
    default here (Flower's ``MultiKrum`` defaults to ``m = 1``, which is Krum).

    Parameters
    ----------
    *args, **kwargs
        ``flwr.serverapp.strategy.FedAvg``'s arguments, plus the keyword arguments
        of :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    num_malicious_nodes : int (default: 0)
        f. Needs ``n > 2f + 2``.
    num_nodes_to_select : int, optional
        m in ``[1, n]``; ``None`` (default) selects ``n - f`` of the n valid replies.

    Weights
    -------
    Not used for the selection (an inflated ``num-examples`` cannot buy a
    place); the selected updates are averaged weighted by (capped) ``num-examples``.
    """

    uses_weights = True
    rule_name = "multikrum"

    def __init__(
        self,
        *args: Any,
        num_malicious_nodes: int = 0,
        num_nodes_to_select: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)
        if num_nodes_to_select is not None and (
            isinstance(num_nodes_to_select, bool)
            or not isinstance(num_nodes_to_select, (int, np.integer))
            or num_nodes_to_select < 1
        ):
            raise ValueError(
                f"num_nodes_to_select must be a positive integer or None, got "
                f"{num_nodes_to_select!r}"
            )
        self.num_nodes_to_select = None if num_nodes_to_select is None else int(num_nodes_to_select)

    def min_clients(self) -> int:
        return max(krum_min_clients(self.num_malicious_nodes), self.num_nodes_to_select or 1)

    def requirement(self) -> str:
        if self.num_nodes_to_select is None:
            return "Multi-Krum needs n > 2f + 2"
        return f"Multi-Krum needs n > 2f + 2 and n >= m = {self.num_nodes_to_select}"

    def rule_summary(self) -> str:
        m = "n - f" if self.num_nodes_to_select is None else str(self.num_nodes_to_select)
        return (
            f"Multi-Krum (f={self.num_malicious_nodes}, m={m}): weighted mean of the m updates "
            "with the smallest Krum scores (weights not used in the selection)"
        )

    def aggregate_updates(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return multi_krum(updates, weights, self.num_malicious_nodes, self.num_nodes_to_select)
