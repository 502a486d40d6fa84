"""What every Byzantine-robust strategy shares: f checks and a robust round summary.

:class:`RobustStrategy` sits between :class:`UpdateAggregationStrategy` and the
rules (``Krum``, ``MultiKrum``, ``Median``, ``TrimmedMean``, ``Bulyan``,
``GeometricMedian``, ``CenteredClipping``, ``NormBound``). It adds:

- ``num_malicious_nodes`` (f, Flower's name), validated at construction and,
  against the number of sampled nodes, at the first round (a clear
  ``ValueError``); a round whose *valid* replies fall below the rule's minimum is
  skipped with the reason audited (the base class does that via
  :meth:`min_replies`);
- robust numbers in the round's ``MetricRecord`` (an operator's dashboard):
  ``robust-rejected`` (clients the rule left out), ``robust-clipped`` (clients
  scaled down), ``robust-mean-clip-factor``, ``robust-max-score`` /
  ``robust-median-score`` (the rule's anomaly score) and ``robust-max-share``
  (the largest share one client had in the aggregate). Node ids, bank labels and
  reasons do not fit a ``MetricRecord`` (no strings; uint64 ids lose precision
  as floats), so they are in the audit trail (``client_update`` events) and in
  :attr:`round_reports`.
- a safe weight policy by default: rules that use ``num-examples``
  (``uses_weights``: MultiKrum, GeometricMedian, CenteredClipping, NormBound) cap
  every client at :data:`DEFAULT_WEIGHT_MEDIAN_MULTIPLE` x the round's median
  weight unless ``max_weight_median_multiple`` is passed (``None`` turns it off),
  so a count cannot buy more than that; ``pinned_weights`` (the counts a bank
  reported at setup) lowers claims further. Every lowered weight is audited.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from flower_ext.aggregation import AggregationResult
from flower_ext.validation import CheckedReply

from .base import RoundReport, UpdateAggregationStrategy

#: Flower's type of ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``.
MetricsAggregationFn = Callable[[list[RecordDict], str], MetricRecord]


#: Default federation-relative cap of the weight-using robust rules: no client weighs
#: more than twice the round's median ``num-examples``. With f of n clients lying, they
#: hold at most 2f / (n - f + 2f) of the weight (3 of 10: 46%, not 97% at 100x counts).
DEFAULT_WEIGHT_MEDIAN_MULTIPLE = 2.0


def check_num_malicious(value: object) -> int:
    """``value`` as f, a non-negative int, or a ``ValueError`` that says so."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"num_malicious_nodes must be a non-negative integer, got {value!r}")
    return int(value)


class RobustStrategy(UpdateAggregationStrategy):
    """Base of the robust rules; ``num_malicious_nodes`` is f, the attackers tolerated.

    Parameters
    ----------
    *args, **kwargs
        FedAvg's arguments and :class:`UpdateAggregationStrategy`'s keyword
        arguments (weight caps, server step, audit).
    num_malicious_nodes : int (default: 0)
        f. Every rule checks that the sampled nodes can outvote f attackers.
    max_weight_median_multiple : float or None
        For weight-using rules, default :data:`DEFAULT_WEIGHT_MEDIAN_MULTIPLE`
        (2.0); ``None`` switches the cap off.
    """

    #: Short name used in logs and in the audit trail's ``rule_params``.
    rule_name: str = "robust"

    def __init__(self, *args: Any, num_malicious_nodes: int = 0, **kwargs: Any) -> None:
        if self.uses_weights:  # counts cannot buy influence by default (module docstring)
            kwargs.setdefault("max_weight_median_multiple", DEFAULT_WEIGHT_MEDIAN_MULTIPLE)
        super().__init__(*args, **kwargs)
        self.num_malicious_nodes = check_num_malicious(num_malicious_nodes)

    # The smallest number of updates the rule aggregates with f attackers.
    def min_clients(self) -> int:
        return 1

    def min_replies(self) -> int:
        return max(self.min_valid_replies, self.min_clients())

    def check_client_count(self, num_nodes: int) -> None:
        need = self.min_clients()
        if num_nodes < need:
            raise ValueError(
                f"{type(self).__name__} with num_malicious_nodes={self.num_malicious_nodes} "
                f"needs at least {need} nodes per round ({self.requirement()}), but "
                f"{num_nodes} were sampled; sample more nodes (min_train_nodes, "
                "fraction_train) or lower num_malicious_nodes"
            )

    def requirement(self) -> str:
        """The rule's condition on n and f, in words (for error messages)."""
        return "n >= 1"

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t\t└── Tolerates f = %d malicious nodes; needs n >= %d (%s)",
            self.num_malicious_nodes,
            self.min_clients(),
            self.requirement(),
        )

    def _summary_metrics(
        self,
        report: RoundReport,
        accepted: list[CheckedReply],
        result: AggregationResult | None,
    ) -> MetricRecord:
        metrics = super()._summary_metrics(report, accepted, result)
        if result is None:
            return metrics
        metrics.update(robust_summary(result))
        return metrics


def robust_summary(result: AggregationResult) -> dict[str, float | int]:
    """Round-level numbers from a kernel's per-client reports (MetricRecord-safe)."""
    reports = result.reports
    factors = np.array([r.clip_factor for r in reports], dtype=np.float64)
    scores = np.array([r.score for r in reports if r.score is not None], dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    shares = np.array([r.weight for r in reports], dtype=np.float64)
    out: dict[str, float | int] = {
        "robust-rejected": sum(1 for r in reports if not r.selected),
        "robust-clipped": int(np.count_nonzero(factors < 1.0)),
        "robust-mean-clip-factor": float(factors.mean()) if factors.size else 1.0,
        "robust-max-share": float(shares.max()) if shares.size else 0.0,
    }
    if scores.size:
        out["robust-max-score"] = float(scores.max())
        out["robust-median-score"] = float(np.median(scores))
    return out
