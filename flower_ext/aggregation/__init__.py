"""Aggregation kernels: pure functions over an (n, d) matrix of updates plus weights.

``base`` holds the result types, the FedAvg rule and the weight policy; ``robust``
holds the Byzantine-robust rules; ``bucketing`` bucketing and adaptive radii;
``moments`` the robust combination of feature moments (standardisation); ``server_opt``
the adaptive server optimisers (FedAdagrad, FedAdam, FedYogi).
Nothing here imports Flower or torch.
"""

from .base import (
    AggregationResult,
    ClientReport,
    cap_weights,
    check_matrix,
    normalised,
    weight_policy,
    weighted_mean,
    weighted_sum_into,
)
from .bucketing import adaptive_radius, bucket_means, bucketed
from .moments import MomentsResult, robust_feature_moments
from .robust import (
    bulyan,
    bulyan_min_clients,
    centered_clipping,
    check_bulyan_params,
    check_krum_params,
    check_trimmed_mean_params,
    coordinate_median,
    geometric_median,
    krum,
    krum_min_clients,
    median_min_clients,
    multi_krum,
    norm_bound,
    pairwise_sq_distances,
    trim_count,
    trimmed_mean,
    trimmed_mean_min_clients,
)
from .server_opt import (
    ADAPTIVE_OPTIMIZERS,
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    ServerOptState,
    check_server_optimizer,
)

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "SERVER_OPTIMIZERS",
    "AggregationResult",
    "ClientReport",
    "MomentsResult",
    "ServerOptState",
    "ServerOptimizer",
    "adaptive_radius",
    "bucket_means",
    "bucketed",
    "bulyan",
    "bulyan_min_clients",
    "cap_weights",
    "centered_clipping",
    "check_bulyan_params",
    "check_krum_params",
    "check_matrix",
    "check_server_optimizer",
    "check_trimmed_mean_params",
    "coordinate_median",
    "geometric_median",
    "krum",
    "krum_min_clients",
    "median_min_clients",
    "multi_krum",
    "norm_bound",
    "normalised",
    "pairwise_sq_distances",
    "robust_feature_moments",
    "trim_count",
    "trimmed_mean",
    "trimmed_mean_min_clients",
    "weight_policy",
    "weighted_mean",
    "weighted_sum_into",
]
