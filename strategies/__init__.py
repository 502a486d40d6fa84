"""Server-side strategies for Flower's Message API (installed as ``flower_ext.strategies``).

Every strategy subclasses ``flwr.serverapp.strategy.FedAvg`` through
:class:`UpdateAggregationStrategy`, keeps FedAvg's constructor arguments, and
aggregates validated client *updates* with a pure kernel from
:mod:`flower_ext.aggregation`.
"""

from .base import RoundReport, UpdateAggregationStrategy
from .fedavg import FedAvg

__all__ = [
    "FedAvg",
    "RoundReport",
    "UpdateAggregationStrategy",
]
