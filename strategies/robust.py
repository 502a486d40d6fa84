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
- ``bucket_size`` = s > 1: bucketing (Karimireddy, He, Jaggi, ICLR 2022) in front
  of any rule: each round the updates are shuffled (seeded by ``bucket_seed`` and
  the round), averaged in groups of s, and the rule runs on the ``ceil(n / s)``
  bucket means with the same f (f attackers spoil at most f buckets). The rule's
  n-vs-f condition then applies to the buckets; :meth:`min_clients` says so.
  Subclasses implement :meth:`robust_aggregate` and :meth:`rule_min_clients`.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.supercore import log

from flower_ext.aggregation import AggregationResult, bucketed
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
    bucket_size : int (default: 1, off)
        s; > 1 runs the rule on means of random buckets of s updates.
    bucket_seed : int (default: 0)
        Seed of the bucket shuffles (one permutation per round, reproducible).
    max_weight_median_multiple : float or None
        For weight-using rules, default :data:`DEFAULT_WEIGHT_MEDIAN_MULTIPLE`
        (2.0); ``None`` switches the cap off.
    """

    #: Short name used in logs and in the audit trail's ``rule_params``.
    rule_name: str = "robust"

    def __init__(
        self,
        *args: Any,
        num_malicious_nodes: int = 0,
        bucket_size: int = 1,
        bucket_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive integer, got {bucket_size!r}")
        self.bucket_size = bucket_size
        self.bucket_seed = int(bucket_seed)
        if self.uses_weights:  # counts cannot buy influence by default (module docstring)
            kwargs.setdefault("max_weight_median_multiple", DEFAULT_WEIGHT_MEDIAN_MULTIPLE)
        super().__init__(*args, **kwargs)
        self.num_malicious_nodes = check_num_malicious(num_malicious_nodes)

    # The smallest number of updates (or buckets) the rule aggregates with f attackers.
    def rule_min_clients(self) -> int:
        return 1

    def min_clients(self) -> int:
        """Fewest updates per round: the rule's minimum, in buckets of s when bucketing."""
        need = self.rule_min_clients()
        return need if self.bucket_size <= 1 else (need - 1) * self.bucket_size + 1

    def robust_aggregate(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        """The rule's kernel on an (n, d) matrix (or the bucket means); each rule implements it."""
        raise NotImplementedError

    def aggregate_updates(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        if self.bucket_size <= 1:
            return self.robust_aggregate(updates, weights, server_round)
        rng = np.random.default_rng([self.bucket_seed, server_round])
        return bucketed(
            lambda u, w: self.robust_aggregate(u, w, server_round),
            updates,
            weights,
            self.bucket_size,
            rng,
        )

    def min_replies(self) -> int:
        return max(self.min_valid_replies, self.min_clients())

    def check_client_count(self, num_nodes: int) -> None:
        need = self.min_clients()
        if num_nodes < need:
            bucketing = (
                f", applied to buckets of {self.bucket_size}" if self.bucket_size > 1 else ""
            )
            raise ValueError(
                f"{type(self).__name__} with num_malicious_nodes={self.num_malicious_nodes} "
                f"needs at least {need} nodes per round ({self.requirement()}{bucketing}), but "
                f"{num_nodes} were sampled; sample more nodes (min_train_nodes, "
                "fraction_train) or lower num_malicious_nodes"
            )

    def requirement(self) -> str:
        """The rule's condition on n and f, in words (for error messages)."""
        return "n >= 1"

    def summary(self) -> None:
        super().summary()
        if self.bucket_size > 1:
            log(
                INFO,
                "\t\t├── Bucketing: rule applied to means of random buckets of %d updates "
                "(Karimireddy et al., ICLR 2022)",
                self.bucket_size,
            )
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
