"""Aggregation kernels: pure functions over an (n, d) matrix of updates plus weights.

``base`` holds the result types and the FedAvg rule; ``robust`` holds the
Byzantine-robust rules. Nothing here imports Flower or torch.
"""

from .base import (
    AggregationResult,
    ClientReport,
    cap_weights,
    check_matrix,
    normalised,
    weighted_mean,
)

__all__ = [
    "AggregationResult",
    "ClientReport",
    "cap_weights",
    "check_matrix",
    "normalised",
    "weighted_mean",
]
