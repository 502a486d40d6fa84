"""FedAvg (and FedAvgM, FedProx) on validated updates with an audit trail."""

from __future__ import annotations

import numpy as np

from flower_ext.aggregation import AggregationResult, weighted_mean

from .base import UpdateAggregationStrategy


class FedAvg(UpdateAggregationStrategy):
    """Federated Averaging weighted by (optionally capped) ``num-examples``.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017. A drop-in for
    ``flwr.serverapp.strategy.FedAvg`` that also validates replies, never
    mutates them, audits every decision, and offers server momentum (FedAvgM:
    ``server_momentum``), adaptive server optimisers (FedAdagrad / FedAdam /
    FedYogi: ``server_optimizer``) and the FedProx term (``proximal_mu``) from one
    class; :class:`~flower_ext.strategies.Scaffold` adds SCAFFOLD's control variates.
    With default arguments its aggregate equals Flower's FedAvg. The mean is
    summed straight from the replies' bytes (no stacked matrix, no copy of a
    reply); :meth:`aggregate_updates` serves callers that hold a matrix.
    """

    streams_weighted_mean = True

    def aggregate_updates(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        return weighted_mean(updates, weights)
