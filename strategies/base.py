"""The base every flower-ext strategy stands on: validated updates in, one kernel call, audit out.

``UpdateAggregationStrategy`` is a Flower Message-API ``FedAvg`` subclass (same
constructor arguments, so it drops into an existing ServerApp) that changes
what happens in ``aggregate_train``:

1. every reply is checked (error replies, keys, shapes, dtypes, ``.npy``
   headers, a positive and plausible ``num-examples``, NaN/Inf); a bad reply is
   rejected with a reason in the audit trail and the round goes on with the rest;
2. accepted replies are decoded with zero-copy reads straight into one stacked
   (n, d) float32 matrix of *updates* (reply weights minus the global model this
   strategy sent), the only copy of the client data the server makes;
3. client weights (``num-examples``) are optionally capped;
4. the subclass's pure kernel aggregates the matrix (``aggregate_updates``);
5. the server step applies the aggregate, with optional server momentum (FedAvgM,
   Hsu et al. 2019) and server learning rate;
6. the round's decisions go to the audit trail and a summary to the returned
   metrics.

Replies are never mutated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore import log

from flower_ext.aggregation import (
    AggregationResult,
    ClientReport,
    cap_weights,
    normalised,
    weighted_sum_into,
)
from flower_ext.audit import AuditTrail
from flower_ext.metrics import metrics_from_histograms
from flower_ext.records import ArrayLayout, array_view, arrays_sha256
from flower_ext.validation import CheckedReply, Rejection, check_replies, reply_sender

PROXIMAL_MU_KEY = "proximal-mu"  # the config key Flower's own FedProx sends
HIST_NEG_KEY = "hist-neg"
HIST_POS_KEY = "hist-pos"


@dataclass
class RoundReport:
    """What the strategy decided in one training round (also written to the audit trail)."""

    server_round: int
    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    model_sha256: str = ""
    aggregate_seconds: float = 0.0
    skipped_reason: str = ""
    train_metrics: dict[str, Any] = field(default_factory=dict)
    #: Scalar metrics of each accepted reply (node id -> metrics), e.g. the DP ``dp-*`` keys.
    client_metrics: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def num_selected(self) -> int:
        return sum(1 for c in self.clients.values() if c.get("selected"))


class UpdateAggregationStrategy(FlowerFedAvg):
    """Base class: subclasses implement :meth:`aggregate_updates` with a pure kernel.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    server_learning_rate : float (default: 1.0)
        Step size of the server update ``w += lr * v``.
    server_momentum : float (default: 0.0)
        FedAvgM momentum ``v = beta * v + aggregate``; 0 gives plain FedAvg.
    proximal_mu : float (default: 0.0)
        If > 0, sent to clients as ``proximal-mu`` for the FedProx term (the same
        key Flower's ``FedProx`` uses).
    max_weight : float, optional
        Cap on any client's ``num-examples`` (a client cannot buy influence).
    max_weight_median_multiple : float, optional
        Cap at this multiple of the round's median ``num-examples``.
    max_plausible_examples : float (default: 1e9)
        Replies claiming more examples than this are rejected as absurd.
    min_valid_replies : int (default: 1)
        Fewer accepted replies than this (or than the rule's own minimum) skip
        the round: the global model is kept and the reason audited.
    audit : AuditTrail, optional
        Where decisions are written; an in-memory trail is used if omitted.
    """

    #: Whether the rule uses client weights (``num-examples``); said in ``summary()``.
    uses_weights: bool = True
    #: Linear rules set this: the weighted mean is then summed straight from the
    #: replies (:meth:`stream_weighted_mean`) instead of stacking an (n, d) matrix.
    streams_weighted_mean: bool = False

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        *,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        proximal_mu: float = 0.0,
        max_weight: float | None = None,
        max_weight_median_multiple: float | None = None,
        max_plausible_examples: float = 1e9,
        min_valid_replies: int = 1,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self._custom_train_metrics = train_metrics_aggr_fn is not None
        self._custom_evaluate_metrics = evaluate_metrics_aggr_fn is not None
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        if max_weight is not None and max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        if max_weight_median_multiple is not None and max_weight_median_multiple < 1:
            raise ValueError(
                f"max_weight_median_multiple must be >= 1, got {max_weight_median_multiple}"
            )
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.proximal_mu = proximal_mu
        self.max_weight = max_weight
        self.max_weight_median_multiple = max_weight_median_multiple
        self.max_plausible_examples = max_plausible_examples
        self.min_valid_replies = max(1, min_valid_replies)
        self.audit = audit if audit is not None else AuditTrail()
        self.round_reports: dict[int, RoundReport] = {}
        self.evaluation_reports: dict[int, dict[str, Any]] = {}
        self.labels: dict[int, str] = {}  # node id -> bank label seen in replies
        self._global: ArrayRecord | None = None
        self._global_flat: np.ndarray | None = None
        self._layout: ArrayLayout | None = None
        self._velocity: np.ndarray | None = None
        self._sampled: dict[int, list[int]] = {}
        self._outgoing: dict[str, list[Message]] = {}
        self._streamed_mean: np.ndarray | None = None  # set by stream_weighted_mean
        self._streamed_update: np.ndarray | None = None

    # ------------------------------------------------------------------ kernel
    def aggregate_updates(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        """Aggregate the (n, d) update matrix; implemented by each rule."""
        raise NotImplementedError

    def min_replies(self) -> int:
        """The fewest accepted replies this rule can aggregate."""
        return self.min_valid_replies

    def check_client_count(self, num_nodes: int) -> None:
        """Raise ``ValueError`` if the rule cannot work with ``num_nodes`` nodes.

        Called at the first round with the number of sampled nodes; robust rules
        override it to check their f against n.
        """

    def rule_summary(self) -> str:
        return "weighted mean of updates"

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Aggregation: %s", self.rule_summary())
        log(
            INFO,
            "\t\t├── Weights: %s%s",
            "num-examples" if self.uses_weights else "ignored (every client counts once)",
            self._weight_cap_text(),
        )
        log(
            INFO,
            "\t\t└── Server step: lr %.3g, momentum %.3g, proximal-mu %.3g",
            self.server_learning_rate,
            self.server_momentum,
            self.proximal_mu,
        )

    def _weight_cap_text(self) -> str:
        caps = []
        if self.max_weight is not None:
            caps.append(f"capped at {self.max_weight:g}")
        if self.max_weight_median_multiple is not None:
            caps.append(f"capped at {self.max_weight_median_multiple:g}x the median")
        return (", " + ", ".join(caps)) if caps else ""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.proximal_mu > 0:
            config[PROXIMAL_MU_KEY] = float(self.proximal_mu)
        self.set_global_model(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._outgoing["train"] = messages  # their ids, set when sent, map error replies
        sampled = [int(m.metadata.dst_node_id) for m in messages]
        if server_round == 1 or not self._sampled:
            self.check_client_count(len(sampled))
        self._sampled[server_round] = sampled
        self.audit.record(
            "round_start",
            round=server_round,
            phase="train",
            sampled_nodes=sampled,
            global_model_sha256=arrays_sha256(arrays),
        )
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._outgoing["evaluate"] = messages
        return messages

    def origins(self, phase: str) -> dict[str, int]:
        """Message id -> destination node of this phase's messages (ids exist once sent)."""
        return {
            m.metadata.message_id: int(m.metadata.dst_node_id)
            for m in self._outgoing.get(phase, [])
            if m.metadata.message_id
        }

    def set_global_model(self, arrays: ArrayRecord) -> None:
        """Remember the model sent this round: updates are measured against it."""
        layout = ArrayLayout.of(arrays)
        if self._layout is not None and layout != self._layout:
            self._velocity = None  # model architecture changed: momentum is meaningless
        self._layout = layout
        self._global = arrays
        self._global_flat = layout.flatten(arrays, dtype=np.float32)

    # ------------------------------------------------------------------ resume
    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a restarted server needs besides the global model: (arrays, JSON fields).

        The server momentum ``velocity`` (FedAvgM) and the bank labels seen so far;
        the global model itself travels separately (the app's checkpoint).
        """
        arrays = {} if self._velocity is None else {"velocity": self._velocity.copy()}
        return arrays, {"labels": {str(k): v for k, v in self.labels.items()}}

    def import_state(self, arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
        """Restore :meth:`export_state`'s output (call before the first resumed round)."""
        velocity = arrays.get("velocity")
        self._velocity = None if velocity is None else np.asarray(velocity, dtype=np.float32)
        self.labels.update({int(k): str(v) for k, v in fields.get("labels", {}).items()})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None or self._layout is None or self._global_flat is None:
            raise RuntimeError(
                "aggregate_train called before configure_train: the strategy does not know "
                "which global model the updates are relative to"
            )
        start = time.perf_counter()
        replies = list(replies)
        report = RoundReport(server_round, sampled=list(self._sampled.get(server_round, [])))
        self.round_reports[server_round] = report
        accepted, rejected = check_replies(
            replies,
            weighted_by_key=self.weighted_by_key,
            layout=self._layout,
            max_weight_value=self.max_plausible_examples,
            origins=self.origins("train"),
        )
        streamed: AggregationResult | None = None
        updates: np.ndarray | None = None
        if self.streams_weighted_mean:
            streamed, accepted, late_rejections = self.stream_weighted_mean(accepted)
        else:
            updates, accepted, late_rejections = self.decode_updates(accepted)
        rejected += late_rejections
        self.record_participation(server_round, report, replies, rejected, accepted)
        for rep in accepted:
            report.client_metrics[rep.node_id] = {
                k: v for k, v in rep.metrics.items() if not isinstance(v, list)
            }
        if len(accepted) < self.min_replies():
            self.skip_round(server_round, report, len(accepted))
            metrics = self._summary_metrics(report, accepted, None)
            report.train_metrics = dict(metrics)
            return None, metrics

        raw_weights = np.array([r.weight for r in accepted], dtype=np.float64)
        weights, capped = cap_weights(raw_weights, self.max_weight, self.max_weight_median_multiple)
        if streamed is not None:
            result = streamed
        else:
            assert updates is not None
            result = self.aggregate_updates(updates, weights, server_round)
        self._streamed_update = result.update if streamed is not None else None
        new_arrays = self.server_step(result.update)
        self._streamed_mean = self._streamed_update = None
        report.aggregate_seconds = time.perf_counter() - start
        report.model_sha256 = arrays_sha256(new_arrays)
        for i, rep in enumerate(accepted):
            client_report = result.reports[i].to_dict()
            client_report["num_examples"] = raw_weights[i]
            client_report["weight_capped"] = bool(capped[i])
            client_report["label"] = self.labels.get(rep.node_id, "")
            report.clients[rep.node_id] = client_report
            self.audit.record(
                "client_update", round=server_round, node_id=rep.node_id, **client_report
            )
        self.audit.record(
            "round_aggregated",
            round=server_round,
            rule=type(self).__name__,
            accepted=len(accepted),
            rejected=len(rejected),
            missing=len(report.missing),
            selected=report.num_selected,
            aggregate_seconds=report.aggregate_seconds,
            model_sha256=report.model_sha256,
        )
        metrics = self._summary_metrics(report, accepted, result)
        report.train_metrics = dict(metrics)
        return new_arrays, metrics

    def record_participation(
        self,
        server_round: int,
        report: RoundReport,
        replies: list[Message],
        rejected: list[Rejection],
        accepted: list[Any],
    ) -> None:
        """Audit who was missing and who was rejected (and why); note who was accepted.

        ``accepted`` items need ``node_id`` and ``label`` attributes.
        """
        origins = self.origins("train")
        replied = {reply_sender(m, origins) for m in replies}
        report.missing = [n for n in report.sampled if n not in replied]
        for node in report.missing:
            self.audit.record(
                "client_missing", round=server_round, node_id=node, label=self.labels.get(node, "")
            )
        for rej in rejected:
            self._note_label(rej.node_id, rej.label)
            report.rejected[rej.node_id] = rej.reason
            self.audit.record(
                "reply_rejected",
                round=server_round,
                node_id=rej.node_id,
                label=self.labels.get(rej.node_id, ""),
                reason=rej.reason,
            )
            log(
                WARNING,
                "Round %s: rejected reply from node %s: %s",
                server_round,
                rej.node_id,
                rej.reason,
            )
        for rep in accepted:
            self._note_label(rep.node_id, rep.label)
        report.accepted = [r.node_id for r in accepted]

    def skip_round(self, server_round: int, report: RoundReport, num_valid: int) -> None:
        """Keep the global model for this round and audit why."""
        assert self._global is not None
        report.skipped_reason = (
            f"{num_valid} valid replies, the rule needs at least {self.min_replies()}; "
            "global model kept"
        )
        report.model_sha256 = arrays_sha256(self._global)
        self.audit.record(
            "round_skipped",
            round=server_round,
            reason=report.skipped_reason,
            model_sha256=report.model_sha256,
        )
        log(WARNING, "Round %s skipped: %s", server_round, report.skipped_reason)

    def decode_updates(
        self, accepted: list[CheckedReply]
    ) -> tuple[np.ndarray, list[CheckedReply], list[Rejection]]:
        """Stack accepted replies as updates (float32), dropping non-finite ones."""
        assert self._layout is not None and self._global_flat is not None
        matrix = np.empty((len(accepted), self._layout.dim), dtype=np.float32)
        keep: list[int] = []
        late: list[Rejection] = []
        with np.errstate(over="ignore", invalid="ignore"):
            for i, rep in enumerate(accepted):
                row = matrix[len(keep)]
                assert rep.arrays is not None
                self.subtract_global_into(rep.arrays, row)
                # One float32 pass (SIMD; 2.5x a float64-accumulated sum): NaN/Inf anywhere
                # makes it non-finite; so does a sum past 3e38, which no real update has.
                if not np.isfinite(row.sum()):
                    late.append(Rejection(rep.node_id, "update contains NaN or Inf", rep.label))
                    continue
                keep.append(i)
        return matrix[: len(keep)], [accepted[i] for i in keep], late

    def subtract_global_into(self, arrays: ArrayRecord, row: np.ndarray) -> None:
        """``row = reply - global`` in one pass, reading the reply's bytes in place."""
        assert self._layout is not None and self._global_flat is not None
        offsets = self._layout.offsets
        for j, key in enumerate(self._layout.keys):
            lo, hi = offsets[j], offsets[j + 1]
            np.subtract(
                array_view(arrays[key]).reshape(-1),
                self._global_flat[lo:hi],
                out=row[lo:hi],
                casting="same_kind",
            )

    def stream_weighted_mean(
        self, accepted: list[CheckedReply]
    ) -> tuple[AggregationResult | None, list[CheckedReply], list[Rejection]]:
        """The weighted-mean update straight from the replies' zero-copy views.

        Used by linear rules (``streams_weighted_mean = True``): ``sum_i w_i r_i - g``
        equals ``sum_i w_i (r_i - g)``, so each reply is read once and no (n, d)
        matrix is built. NaN/Inf in any reply makes the sum non-finite; only then
        are replies checked one by one, the bad ones rejected and the sum redone.
        """
        assert self._layout is not None and self._global_flat is not None
        layout, offsets = self._layout, self._layout.offsets
        late: list[Rejection] = []
        while accepted:
            raw = np.array([r.weight for r in accepted], dtype=np.float64)
            capped, _ = cap_weights(raw, self.max_weight, self.max_weight_median_multiple)
            shares = normalised(capped)
            mean = np.empty(layout.dim, dtype=np.float32)
            for j, key in enumerate(layout.keys):
                views = [array_view(r.arrays[key]).reshape(-1) for r in accepted]  # type: ignore[index]
                weighted_sum_into(mean[offsets[j] : offsets[j + 1]], views, shares)
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(mean.sum()):
                    reports = [ClientReport(selected=True, weight=float(x)) for x in shares]
                    self._streamed_mean = mean
                    return AggregationResult(mean - self._global_flat, reports), accepted, late
            bad = [i for i, r in enumerate(accepted) if not _all_finite(r, layout)]
            reason = "update contains NaN or Inf"
            if not bad:  # every value finite but the sum overflowed: nobody can be trusted
                bad, reason = list(range(len(accepted))), "update values overflow float32"
            late += [Rejection(accepted[i].node_id, reason, accepted[i].label) for i in bad]
            accepted = [r for i, r in enumerate(accepted) if i not in set(bad)]
        return None, [], late

    def server_step(self, aggregate: np.ndarray) -> ArrayRecord:
        """``w += lr * v`` with ``v = momentum * v + aggregate`` (FedAvgM)."""
        assert self._layout is not None and self._global_flat is not None
        step = aggregate.astype(np.float32, copy=False)
        if self.server_momentum > 0:
            if self._velocity is None or self._velocity.shape != step.shape:
                self._velocity = np.zeros_like(step)
            self._velocity = self.server_momentum * self._velocity + step
            step = self._velocity
        if (
            self.server_momentum == 0
            and self.server_learning_rate == 1.0
            and self._streamed_mean is not None
            and aggregate is self._streamed_update
        ):
            # Plain FedAvg: the new model is the weighted mean itself (exact, and two
            # fewer passes over the model than global + (mean - global)).
            new_flat = self._streamed_mean
        else:
            new_flat = self._global_flat + np.float32(self.server_learning_rate) * step
        return self._layout.unflatten(new_flat)

    def _note_label(self, node_id: int, label: str) -> None:
        if label:
            self.labels[node_id] = label

    def _summary_metrics(
        self,
        report: RoundReport,
        accepted: list[CheckedReply],
        result: AggregationResult | None,
    ) -> MetricRecord:
        """Weighted train metrics of the clients used, plus the round's decision counts."""
        if self._custom_train_metrics:
            metrics = (
                self.train_metrics_aggr_fn(
                    [r.message.content for r in accepted], self.weighted_by_key
                )
                if accepted
                else MetricRecord()
            )
        else:
            metrics = MetricRecord()
            if result is not None:
                used = [(r, rep.weight) for r, rep in zip(accepted, result.reports, strict=True)]
                metrics = weighted_scalar_metrics(
                    [(r.metrics, w) for r, w in used if w > 0], skip={self.weighted_by_key}
                )
        metrics["clients-accepted"] = len(report.accepted)
        metrics["clients-rejected"] = len(report.rejected)
        metrics["clients-missing"] = len(report.missing)
        metrics["clients-selected"] = report.num_selected
        return metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted metrics plus pooled AUC/KS from the banks' score histograms."""
        replies = list(replies)
        accepted, rejected = check_replies(
            replies,
            weighted_by_key=self.weighted_by_key,
            layout=None,
            max_weight_value=self.max_plausible_examples,
            need_arrays=False,
            origins=self.origins("evaluate"),
        )
        for rej in rejected:
            self.audit.record(
                "evaluate_reply_rejected",
                round=server_round,
                node_id=rej.node_id,
                label=self.labels.get(rej.node_id, rej.label),
                reason=rej.reason,
            )
        if not accepted:
            return None
        for rep in accepted:
            self._note_label(rep.node_id, rep.label)
        if self._custom_evaluate_metrics:
            metrics = self.evaluate_metrics_aggr_fn(
                [r.message.content for r in accepted], self.weighted_by_key
            )
        else:
            metrics = weighted_scalar_metrics(
                [(r.metrics, r.weight) for r in accepted],
                skip={self.weighted_by_key, "auc", "ks"},
            )
        pooled = pooled_histogram_metrics([r.metrics for r in accepted])
        if pooled is not None:
            metrics["auc"], metrics["ks"] = pooled
        metrics[self.weighted_by_key] = float(sum(r.weight for r in accepted))
        self.evaluation_reports[server_round] = {
            "metrics": dict(metrics),
            "clients": {
                r.node_id: {
                    "label": self.labels.get(r.node_id, ""),
                    **{k: v for k, v in r.metrics.items() if not isinstance(v, list)},
                    **r.extra,
                }
                for r in accepted
            },
            "rejected": {rej.node_id: rej.reason for rej in rejected},
        }
        return metrics


def _all_finite(reply: CheckedReply, layout: ArrayLayout) -> bool:
    assert reply.arrays is not None
    return all(bool(np.isfinite(array_view(reply.arrays[k])).all()) for k in layout.keys)


def weighted_scalar_metrics(
    items: list[tuple[MetricRecord, float]],
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> MetricRecord:
    """Weighted mean of every scalar metric present in all items (lists skipped)."""
    out = MetricRecord()
    if not items:
        return out
    total = sum(w for _, w in items)
    common = set.intersection(*(set(m.keys()) for m, _ in items)) - set(skip)
    for key in sorted(common):
        values = [(m[key], w) for m, w in items]
        if any(isinstance(v, (list, bool)) for v, _ in values):
            continue
        out[key] = float(sum(float(v) * w for v, w in values) / total)
    return out


def pooled_histogram_metrics(records: list[MetricRecord]) -> tuple[float, float] | None:
    """Pooled (AUC, KS) from per-bank score histograms, if every bank sent them."""
    if not records or not all(HIST_NEG_KEY in m and HIST_POS_KEY in m for m in records):
        return None
    lengths = {len(m[HIST_NEG_KEY]) for m in records} | {len(m[HIST_POS_KEY]) for m in records}  # type: ignore[arg-type]
    if len(lengths) != 1:
        return None
    neg = np.sum([np.asarray(m[HIST_NEG_KEY], dtype=np.float64) for m in records], axis=0)
    pos = np.sum([np.asarray(m[HIST_POS_KEY], dtype=np.float64) for m in records], axis=0)
    auc, ks = metrics_from_histograms(neg, pos)
    if auc is None or ks is None:
        return None
    return auc, ks
