"""Wrappers the run config puts around the aggregation strategy (compression, ...).

A wrapper must forward ``round_reports``, ``evaluation_reports`` and ``audit``
of the strategy it wraps: the app's round recorder reads them.

``topk-ratio`` > 0 wraps the strategy in :class:`~flower_ext.strategies.TopKCompression`,
which sends the ratio, value encoding, scope and error-feedback switch to the
banks in every train config: the server's run config governs the whole
federation, whatever the banks' own run configs say. The banks' ``topk_mod``
(always in ``BANK_MODS``) compresses; the wrapper checks and densifies before the
chosen rule aggregates.
"""

from __future__ import annotations

from flower_ext.audit import AuditTrail
from flower_ext.compression import SCOPES, VALUE_DTYPES
from flower_ext.mods.topk import as_bool
from flower_ext.strategies import TopKCompression, UpdateAggregationStrategy

from .settings import BankAppSettings, SettingsError


def topk_settings(settings: BankAppSettings) -> dict[str, object] | None:
    """The ``topk-*`` run-config keys, checked; ``None`` when compression is off."""
    raw = settings.raw
    try:
        ratio = float(raw.get("topk-ratio", 0.0) or 0.0)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(f"topk-ratio must be a number, got {raw.get('topk-ratio')!r}") from None
    if ratio == 0.0:
        return None
    if not 0.0 < ratio <= 1.0:
        raise SettingsError(f"topk-ratio must be in [0, 1] (0 = off), got {ratio}")
    values = str(raw.get("topk-values", "float16"))
    if values not in VALUE_DTYPES:
        raise SettingsError(f"topk-values must be one of {VALUE_DTYPES}, got '{values}'")
    scope = str(raw.get("topk-scope", "global"))
    if scope not in SCOPES:
        raise SettingsError(f"topk-scope must be one of {SCOPES}, got '{scope}'")
    return {
        "ratio": ratio,
        "values": values,
        "scope": scope,
        "error_feedback": as_bool(raw.get("topk-error-feedback", True)),
    }


def wrap_strategy(
    strategy: UpdateAggregationStrategy, settings: BankAppSettings, audit: AuditTrail
) -> UpdateAggregationStrategy:
    topk = topk_settings(settings)
    if topk is not None:
        # Attribute access (round_reports, ...) is forwarded to the wrapped strategy.
        return TopKCompression(strategy, audit=audit, **topk)  # type: ignore[return-value, arg-type]
    return strategy
