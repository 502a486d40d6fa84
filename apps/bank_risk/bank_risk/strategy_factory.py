"""Build the server strategy named by the run config's ``aggregation`` key."""

from __future__ import annotations

from flower_ext.audit import AuditTrail
from flower_ext.strategies import FedAvg, UpdateAggregationStrategy

from .settings import BankAppSettings, SettingsError

AGGREGATIONS = ("fedavg",)


def build_strategy(
    settings: BankAppSettings, audit: AuditTrail, num_nodes: int
) -> UpdateAggregationStrategy:
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": num_nodes,
        "min_evaluate_nodes": num_nodes,
        "min_available_nodes": num_nodes,
        "server_learning_rate": settings.server_learning_rate,
        "server_momentum": settings.server_momentum,
        "proximal_mu": settings.proximal_mu,
        "audit": audit,
    }
    name = settings.aggregation.lower()
    if name == "fedavg":
        return FedAvg(**common)
    raise SettingsError(f"aggregation must be one of {AGGREGATIONS}, got '{settings.aggregation}'")
