"""Wrappers the run config puts around the aggregation strategy (compression, ...).

A wrapper must forward ``round_reports``, ``evaluation_reports`` and ``audit``
of the strategy it wraps: the app's round recorder reads them.
"""

from __future__ import annotations

from flower_ext.audit import AuditTrail
from flower_ext.strategies import UpdateAggregationStrategy

from .settings import BankAppSettings


def wrap_strategy(
    strategy: UpdateAggregationStrategy, settings: BankAppSettings, audit: AuditTrail
) -> UpdateAggregationStrategy:
    return strategy
