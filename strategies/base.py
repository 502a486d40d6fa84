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
   Hsu et al. 2019) and server learning rate, or an adaptive server optimiser
   (FedAdagrad, FedAdam, FedYogi: Reddi et al. 2021,
   :mod:`flower_ext.aggregation.server_opt`);
6. the round's decisions go to the audit trail and a summary to the returned
   metrics.

Replies are never mutated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
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
    normalised,
    weight_policy,
    weighted_sum_into,
)
from flower_ext.aggregation.server_opt import (
    ADAPTIVE_OPTIMIZERS,
    ServerOptimizer,
    ServerOptState,
    check_server_optimizer,
)
from flower_ext.audit import AuditTrail
from flower_ext.metrics import (
    HIST_EDGES_KEY,
    metrics_from_histograms,
    pooled_sketch_metrics,
    sketch_problem,
)
from flower_ext.records import ArrayLayout, FlatModel, array_view, arrays_sha256
from flower_ext.validation import (
    CheckedReply,
    Rejection,
    check_replies,
    finite_metrics,
    reply_sender,
)

PROXIMAL_MU_KEY = "proximal-mu"  # the config key Flower's own FedProx sends
HIST_NEG_KEY = "hist-neg"
HIST_POS_KEY = "hist-pos"
POOLED_AUC_KEY = "pooled-auc"  # flower-ext's extras, next to whatever the clients sent
POOLED_KS_KEY = "pooled-ks"
#: Validation sketches (the same sketch, on each bank's validation rows, under ``val-``):
#: pooled over the banks that sent one, for best-round selection.
VAL_PREFIX = "val-"
POOLED_VAL_AUC_KEY = "pooled-val-auc"
POOLED_VAL_KS_KEY = "pooled-val-ks"
#: Default bound on the L2 norm of one update: no model's update comes near it, and
#: below it no float32 sum or squared distance of a round can overflow.
MAX_UPDATE_NORM = 1e18
MAX_UPDATE_NORM_LIMIT = 1e19


#: ``flwr.serverapp.strategy.FedAvg``'s constructor parameters, in its positional order.
FEDAVG_PARAMETERS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
)


def fedavg_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """FedAvg's arguments picked by name from a constructor's ``locals()``.

    Flower's Krum, MultiKrum, Bulyan and FedTrimmedAvg put their own positional
    parameters among or after FedAvg's; their flower-ext counterparts (and EncryptedFedAvg,
    SecureFedAvg) declare the same signature and hand FedAvg's part on with this.
    """
    return {name: values[name] for name in FEDAVG_PARAMETERS}


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
        Step size of the server update ``w += lr * v``; with an adaptive
        ``server_optimizer`` it is the optimiser's ``eta`` (a per-coordinate step:
        use about 0.01-0.1, Flower's FedAdam/FedAdagrad default 0.1, FedYogi 0.01).
    server_momentum : float (default: 0.0)
        FedAvgM momentum ``v = beta * v + aggregate``; 0 gives plain FedAvg. Refused
        with an adaptive ``server_optimizer`` (adam and yogi have their own momentum).
    server_optimizer : str (default: "sgd")
        "sgd" (``w += lr * v`` above), or "adagrad", "adam", "yogi": the adaptive
        server optimisers of Reddi et al., "Adaptive Federated Optimization", ICLR
        2021, applied to the round's aggregate (see
        :class:`flower_ext.aggregation.server_opt.ServerOptimizer` for the equations
        and where they differ from Flower's ``FedAdam``: adam's bias correction).
        Integer arrays (counters) take the aggregate itself, not the adaptive step.
    server_beta1, server_beta2, server_tau : float (defaults: 0.9, 0.99, 1e-3)
        The adaptive optimiser's first- and second-moment decays, in [0, 1), and its
        adaptivity floor ``tau`` > 0 (Flower's ``beta_1``, ``beta_2``, ``tau``).
    proximal_mu : float (default: 0.0)
        If > 0, sent to clients as ``proximal-mu`` for the FedProx term (the same
        key Flower's ``FedProx`` uses).
    max_weight : float, optional
        Cap on any client's ``num-examples`` (a client cannot buy influence).
    max_weight_median_multiple : float, optional
        Cap at this multiple of the round's median ``num-examples``.
    pinned_weights : dict of node id -> float, optional
        Weight policy: a node's ``num-examples`` above its pinned value (e.g. the row
        count it reported at setup) is lowered to it, before the caps. Every lowered
        weight is audited (``weight_capped`` with ``weight_cap_reason``); see
        :func:`flower_ext.aggregation.weight_policy`. Settable later as an attribute.
    max_plausible_examples : float (default: 1e9)
        Replies claiming more examples than this are rejected as absurd.
    max_update_norm : float (default: 1e18)
        A reply whose update (for streamed FedAvg: whose values) has a larger L2 norm
        is rejected as implausible, so one reply can never overflow the round's sums
        and veto the honest replies.
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
        pinned_weights: dict[int, float] | None = None,
        server_optimizer: str = "sgd",
        server_beta1: float = 0.9,
        server_beta2: float = 0.99,
        server_tau: float = 1e-3,
        max_plausible_examples: float = 1e9,
        max_update_norm: float = MAX_UPDATE_NORM,
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
        check_server_optimizer(
            server_optimizer, server_learning_rate, server_beta1, server_beta2, server_tau
        )
        if server_optimizer in ADAPTIVE_OPTIMIZERS and server_momentum > 0:
            raise ValueError(
                f"server_momentum={server_momentum} cannot be combined with server_optimizer="
                f"'{server_optimizer}': the adaptive optimiser keeps its own first moment "
                "(server_beta1); set server_momentum=0"
            )
        if max_weight is not None and max_weight <= 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        if max_weight_median_multiple is not None and max_weight_median_multiple < 1:
            raise ValueError(
                f"max_weight_median_multiple must be >= 1, got {max_weight_median_multiple}"
            )
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.server_optimizer = server_optimizer
        self.server_beta1 = float(server_beta1)
        self.server_beta2 = float(server_beta2)
        self.server_tau = float(server_tau)
        #: The adaptive optimiser (None for "sgd") and its state (moments, steps applied).
        self._server_opt: ServerOptimizer | None = (
            ServerOptimizer(
                server_optimizer, server_learning_rate, server_beta1, server_beta2, server_tau
            )
            if server_optimizer in ADAPTIVE_OPTIMIZERS
            else None
        )
        self._opt_state = ServerOptState()
        if self._server_opt is not None and server_learning_rate >= 1.0:
            log(
                WARNING,
                "server_optimizer='%s' with server_learning_rate=%g: eta moves every weight by "
                "about eta per round; Flower's defaults are 0.1 (adam, adagrad), 0.01 (yogi)",
                server_optimizer,
                server_learning_rate,
            )
        self.proximal_mu = proximal_mu
        self.max_weight = max_weight
        self.max_weight_median_multiple = max_weight_median_multiple
        self.pinned_weights: dict[int, float] = dict(pinned_weights or {})
        self.max_plausible_examples = max_plausible_examples
        if not 0 < max_update_norm <= MAX_UPDATE_NORM_LIMIT:
            raise ValueError(
                f"max_update_norm must be in (0, {MAX_UPDATE_NORM_LIMIT:g}] (above it a float32 "
                f"squared norm overflows), got {max_update_norm}"
            )
        self.max_update_norm = float(max_update_norm)
        self.min_valid_replies = max(1, min_valid_replies)
        self.audit = audit if audit is not None else AuditTrail()
        self.round_reports: dict[int, RoundReport] = {}
        self.evaluation_reports: dict[int, dict[str, Any]] = {}
        self.labels: dict[int, str] = {}  # node id -> bank label seen in replies
        self._global: ArrayRecord | None = None
        self._model: FlatModel | None = None
        self._global_flat: np.ndarray | None = None
        self._layout: ArrayLayout | None = None
        self._velocity: np.ndarray | None = None
        self._sampled: dict[int, list[int]] = {}
        self._evaluate_sampled: list[int] = []
        self._outgoing: dict[str, list[Message]] = {}
        self._streamed_mean: np.ndarray | None = None  # set by stream_weighted_mean
        self._streamed_update: np.ndarray | None = None
        self._integer_steps: dict[int, np.ndarray] = {}  # float64 mean integer updates

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
        if self._server_opt is not None:
            log(
                INFO,
                "\t\t└── Server optimiser: %s (eta %.3g, beta1 %.3g, beta2 %.3g, tau %.3g)",
                self.server_optimizer,
                self.server_learning_rate,
                self.server_beta1,
                self.server_beta2,
                self.server_tau,
            )

    def policy_weights(self, node_ids: list[int], raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """The round's weights after :attr:`pinned_weights` and the caps, with reasons."""
        pinned = np.array([self.pinned_weights.get(n, np.nan) for n in node_ids], dtype=float)
        return weight_policy(raw, pinned, self.max_weight, self.max_weight_median_multiple)

    def _weight_cap_text(self) -> str:
        caps = []
        if self.pinned_weights:
            caps.append(f"pinned for {len(self.pinned_weights)} nodes")
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
        if sampled and (server_round == 1 or not self._sampled):
            # No messages (fraction_train=0: evaluation only) is Flower's "skip training".
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
        self._evaluate_sampled = [int(m.metadata.dst_node_id) for m in messages]
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
        model = FlatModel(arrays)
        if self._layout is not None and model.layout != self._layout:
            self._velocity = None  # model architecture changed: momentum is meaningless
            self._opt_state = ServerOptState()  # and so are the optimiser's moments
        self._model = model
        self._layout = model.layout
        self._global = arrays
        self._global_flat = model.flat

    # ------------------------------------------------------------------ resume
    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a restarted server needs besides the global model: (arrays, JSON fields).

        The server momentum ``velocity`` (FedAvgM), the adaptive optimiser's moments
        (``server-opt-m``, ``server-opt-v``) with its kind and step count, the bank
        labels seen so far and the pinned weights (a resumed run must not let a bank
        raise its count); the global model itself travels separately (the app's
        checkpoint).
        """
        arrays = {} if self._velocity is None else {"velocity": self._velocity.copy()}
        if self._opt_state.m is not None:
            arrays["server-opt-m"] = self._opt_state.m.copy()
        if self._opt_state.v is not None:
            arrays["server-opt-v"] = self._opt_state.v.copy()
        return arrays, {
            "labels": {str(k): v for k, v in self.labels.items()},
            "pinned_weights": {str(k): float(v) for k, v in self.pinned_weights.items()},
            "server_optimizer": {
                "kind": self.server_optimizer,
                "steps": int(self._opt_state.steps),
            },
        }

    def import_state(self, arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
        """Restore :meth:`export_state`'s output (call before the first resumed round)."""
        velocity = arrays.get("velocity")
        self._velocity = None if velocity is None else np.asarray(velocity)
        self._opt_state = ServerOptState()
        saved = fields.get("server_optimizer") or {}
        if self._server_opt is not None and saved:
            m, v = arrays.get("server-opt-m"), arrays.get("server-opt-v")
            if saved.get("kind") != self.server_optimizer:
                log(
                    WARNING,
                    "The checkpoint's server optimiser is '%s', this run's is '%s': its "
                    "moments start from zero",
                    saved.get("kind"),
                    self.server_optimizer,
                )
            else:
                self._opt_state = ServerOptState(
                    m=None if m is None else np.asarray(m, dtype=np.float64).reshape(-1),
                    v=None if v is None else np.asarray(v, dtype=np.float64).reshape(-1),
                    steps=int(saved.get("steps", 0)),
                )
        self.labels.update({int(k): str(v) for k, v in fields.get("labels", {}).items()})
        self.pinned_weights.update(
            {int(k): float(v) for k, v in fields.get("pinned_weights", {}).items()}
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None or self._layout is None or self._model is None:
            raise RuntimeError(
                "aggregate_train called before configure_train: the strategy does not know "
                "which global model the updates are relative to"
            )
        start = time.perf_counter()
        replies = list(replies)
        log_received(replies, "aggregate_train")
        report = RoundReport(server_round, sampled=list(self._sampled.get(server_round, [])))
        self.round_reports[server_round] = report
        accepted, rejected = check_replies(
            replies,
            weighted_by_key=self.weighted_by_key,
            layout=self._layout,
            max_weight_value=self.max_plausible_examples,
            origins=self.origins("train"),
            sampled=report.sampled or None,
        )
        accepted, extra_rejections = self.check_reply_extras(server_round, accepted)
        rejected += extra_rejections
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
        weights, cap_reasons = self.policy_weights([r.node_id for r in accepted], raw_weights)
        if streamed is not None:
            result = streamed
        else:
            assert updates is not None
            result = self.aggregate_updates(updates, weights, server_round)
        self._streamed_update = result.update if streamed is not None else None
        new_arrays = self.server_step(result.update)
        self._streamed_mean = self._streamed_update = None
        if new_arrays is None:
            self.skip_round(
                server_round,
                report,
                len(accepted),
                reason="the aggregated model is not finite (NaN or Inf); global model kept",
            )
            metrics = self._summary_metrics(report, accepted, None)
            report.train_metrics = dict(metrics)
            return None, metrics
        report.aggregate_seconds = time.perf_counter() - start
        report.model_sha256 = arrays_sha256(new_arrays)
        for i, rep in enumerate(accepted):
            client_report = result.reports[i].to_dict()
            client_report["num_examples"] = raw_weights[i]
            client_report["weight_capped"] = bool(cap_reasons[i])
            if cap_reasons[i]:
                client_report["weight_cap_reason"] = cap_reasons[i]
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

    def check_reply_extras(
        self, server_round: int, accepted: list[CheckedReply]
    ) -> tuple[list[CheckedReply], list[Rejection]]:
        """Subclasses' checks of what a reply carries besides the model (none here).

        Called on the replies that passed :func:`~flower_ext.validation.check_replies`,
        before any update is decoded; a rejection here is audited like any other
        (``reply_rejected`` with its reason) and the reply counts for nothing.
        """
        return accepted, []

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
                "client_missing",
                round=server_round,
                node_id=node,
                label=self.labels.get(node, ""),
                reason="no reply this round (timed out, or the node left the federation)",
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

    def skip_round(
        self, server_round: int, report: RoundReport, num_valid: int, reason: str = ""
    ) -> None:
        """Keep the global model for this round and audit why."""
        assert self._global is not None
        report.skipped_reason = reason or (
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
        """Stack accepted replies as updates (the layout's compute dtype).

        A reply whose update has NaN/Inf or a norm above ``max_update_norm`` is
        rejected here, with the reason, before any kernel sees it.
        """
        assert self._layout is not None and self._model is not None
        matrix = np.empty((len(accepted), self._layout.dim), dtype=self._layout.compute_dtype)
        keep: list[int] = []
        late: list[Rejection] = []
        for i, rep in enumerate(accepted):
            row = matrix[len(keep)]
            assert rep.arrays is not None
            try:
                self.subtract_global_into(rep.arrays, row)
            except Exception as err:  # validated already; anything left is still the reply's
                late.append(Rejection(rep.node_id, f"unreadable arrays ({err})"[:200], rep.label))
                continue
            problem = self.magnitude_problem([row], "update")
            if problem:
                late.append(Rejection(rep.node_id, problem, rep.label))
                continue
            keep.append(i)
        return matrix[: len(keep)], [accepted[i] for i in keep], late

    def magnitude_problem(self, parts: list[np.ndarray], what: str) -> str:
        """Why the vector made of ``parts`` cannot be aggregated ("" if it can).

        One dot product per part (one BLAS pass in float32): non-finite when a value
        is NaN/Inf or the squared norm overflows, which is then told apart.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            squared = 0.0
            for part in parts:
                if part.size:
                    flat = part.reshape(-1)
                    if flat.dtype.kind != "f" or flat.dtype.itemsize < 4:
                        flat = flat.astype(np.float64)
                    squared += float(np.dot(flat, flat))
        if math.isfinite(squared) and squared <= self.max_update_norm**2:
            return ""
        if not all(bool(np.isfinite(p).all()) for p in parts if p.dtype.kind == "f"):
            return f"{what} contains NaN or Inf"
        with np.errstate(over="ignore"):
            norm = math.sqrt(sum(float(np.sum(np.square(p, dtype=np.float64))) for p in parts))
        return (
            f"{what} values too large: L2 norm {norm:.3g} exceeds max_update_norm "
            f"{self.max_update_norm:.3g}"
        )

    def subtract_global_into(self, arrays: ArrayRecord, row: np.ndarray) -> None:
        """``row = reply - global`` in one pass, reading the reply's bytes in place."""
        assert self._model is not None
        self._model.subtract_into(arrays, row)

    def stream_weighted_mean(
        self, accepted: list[CheckedReply]
    ) -> tuple[AggregationResult | None, list[CheckedReply], list[Rejection]]:
        """The weighted-mean update straight from the replies' zero-copy views.

        Used by linear rules (``streams_weighted_mean = True``): ``sum_i w_i r_i - g``
        equals ``sum_i w_i (r_i - g)``, so each reply is read once for the sum and
        once for its norm (both single BLAS passes in float32), and no (n, d) matrix
        is built. Each reply is checked on its own (NaN/Inf, norm above
        ``max_update_norm``) before it is summed, so one reply can never overflow
        the sum and make the honest ones look bad. Integer arrays are averaged in
        float64 and rebuilt from the global model exactly (:class:`FlatModel`).
        """
        assert self._layout is not None and self._model is not None
        layout, offsets, model = self._layout, self._layout.offsets, self._model
        late: list[Rejection] = []
        good: list[CheckedReply] = []
        views_of: list[list[np.ndarray]] = []
        for rep in accepted:
            assert rep.arrays is not None
            try:
                views = [array_view(rep.arrays[key]).reshape(-1) for key in layout.keys]
            except Exception as err:
                late.append(Rejection(rep.node_id, f"unreadable arrays ({err})"[:200], rep.label))
                continue
            try:
                # Float arrays: their values (one BLAS pass, no temporary). Integer
                # arrays (counters, timestamps): their update, exact, since their
                # values may legitimately be large.
                parts = [
                    model.integer_update(j, v) if j in model.integers else v
                    for j, v in enumerate(views)
                ]
            except Exception as err:
                late.append(Rejection(rep.node_id, f"unreadable arrays ({err})"[:200], rep.label))
                continue
            problem = self.magnitude_problem(parts, "reply")
            if problem:
                late.append(Rejection(rep.node_id, problem, rep.label))
                continue
            good.append(rep)
            views_of.append(parts)
        if not good:
            return None, [], late
        raw = np.array([r.weight for r in good], dtype=np.float64)
        capped, _ = self.policy_weights([r.node_id for r in good], raw)
        shares = normalised(capped)
        mean = np.empty(layout.dim, dtype=layout.compute_dtype)
        update = np.empty(layout.dim, dtype=layout.compute_dtype)
        integer_steps: dict[int, np.ndarray] = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for j in range(len(layout.keys)):
                lo, hi = offsets[j], offsets[j + 1]
                if lo == hi:
                    continue
                parts = [views[j] for views in views_of]
                if j in model.integers:  # parts are exact int64 updates: mean in float64
                    seg = weighted_sum_into(np.empty(hi - lo), parts, shares)
                    integer_steps[j] = seg
                    update[lo:hi] = seg
                    mean[lo:hi] = model.flat[lo:hi] + seg
                else:
                    weighted_sum_into(mean[lo:hi], parts, shares)
                    np.subtract(mean[lo:hi], model.flat[lo:hi], out=update[lo:hi])
        reports = [ClientReport(selected=True, weight=float(x)) for x in shares]
        self._streamed_mean = mean
        self._integer_steps = integer_steps
        return AggregationResult(update, reports), good, late

    def server_step(self, aggregate: np.ndarray) -> ArrayRecord | None:
        """``w += lr * v`` with ``v = momentum * v + aggregate`` (FedAvgM), or the
        adaptive optimiser's step (``server_optimizer``: :meth:`adaptive_step`).

        Returns ``None`` (the caller skips the round) if the new model would not be
        finite. Arrays come back in the global model's shapes and dtypes.
        """
        assert self._layout is not None and self._model is not None
        dtype = self._layout.compute_dtype
        step = aggregate.astype(dtype, copy=False)
        if self._server_opt is not None:
            return self.adaptive_step(step)
        if self.server_momentum > 0:
            if self._velocity is None or self._velocity.shape != step.shape:
                self._velocity = np.zeros_like(step)
            velocity = self.server_momentum * self._velocity.astype(dtype, copy=False) + step
            if self.magnitude_problem([velocity], "momentum"):
                return None
            self._velocity = velocity
            step = velocity
        if self.magnitude_problem([step], "aggregate"):
            return None
        if (
            self.server_momentum == 0
            and self.server_learning_rate == 1.0
            and self._streamed_mean is not None
            and aggregate is self._streamed_update
        ):
            # Plain FedAvg: the new model is the weighted mean itself (exact, and two
            # fewer passes over the model than global + (mean - global)).
            return self._model.with_values(
                self._streamed_mean, step, integer_steps=self._integer_steps
            )
        return self._model.apply(step, self.server_learning_rate)

    def adaptive_step(self, aggregate: np.ndarray) -> ArrayRecord | None:
        """``w += eta_t * m / (sqrt(v) + tau)`` (FedAdagrad / FedAdam / FedYogi).

        The optimiser's state changes only when the new model is finite (else
        ``None``, and the round is skipped with the state as it was). Integer arrays
        (counters) take the aggregate itself: an adaptive step of a count means nothing.
        """
        assert self._server_opt is not None and self._layout is not None
        assert self._model is not None
        if self.magnitude_problem([aggregate], "aggregate"):
            return None
        state = self._opt_state if self._opt_state.fits(aggregate.size) else ServerOptState()
        increment, new_state = self._server_opt.step(state, aggregate)
        offsets = self._layout.offsets
        for j in self._model.integers:
            increment[offsets[j] : offsets[j + 1]] = aggregate[offsets[j] : offsets[j + 1]]
        if self.magnitude_problem([increment], "server optimiser step"):
            return None
        new_arrays = self._model.apply(increment.astype(self._layout.compute_dtype), 1.0)
        if new_arrays is not None:
            self._opt_state = new_state
        return new_arrays

    def _note_label(self, node_id: int, label: str) -> None:
        if label:
            self.labels[node_id] = label

    def _summary_metrics(
        self,
        report: RoundReport,
        accepted: list[CheckedReply],
        result: AggregationResult | None,
    ) -> MetricRecord:
        """Flower's train metrics for the accepted replies, plus the round's decision counts.

        Like Flower's ``FedAvg``: every metric weighted by the reply's reported
        ``num-examples`` (whatever share the rule gave the reply), lists element-wise,
        or the user's ``train_metrics_aggr_fn``. ``clients-*`` are flower-ext's
        additions.
        """
        metrics = self._client_metrics(report.server_round, accepted, "train")
        metrics["clients-accepted"] = len(report.accepted)
        metrics["clients-rejected"] = len(report.rejected)
        metrics["clients-missing"] = len(report.missing)
        metrics["clients-selected"] = report.num_selected
        return metrics

    def _client_metrics(
        self, server_round: int, accepted: list[CheckedReply], phase: str
    ) -> MetricRecord:
        """Aggregate the accepted replies' metrics (user function, or Flower's rule)."""
        if not accepted:
            return MetricRecord()
        items = []
        for rep in accepted:
            clean, dropped = finite_metrics(rep.metrics)
            for key in dropped:
                self.audit.record(
                    "client_metric_dropped",
                    round=server_round,
                    phase=phase,
                    node_id=rep.node_id,
                    label=self.labels.get(rep.node_id, rep.label),
                    reason=f"metric '{key}' is not a finite number",
                )
            items.append((clean, rep.weight))
        custom = self._custom_train_metrics if phase == "train" else self._custom_evaluate_metrics
        if custom:
            fn = self.train_metrics_aggr_fn if phase == "train" else self.evaluate_metrics_aggr_fn
            try:
                # The user's function sees each reply's metrics without non-finite values.
                contents = [
                    RecordDict({"metrics": MetricRecord(clean)})  # type: ignore[arg-type]
                    for clean, _ in items
                ]
                return fn(contents, self.weighted_by_key)
            except Exception as err:  # the user's function met a client's metrics
                self.audit.record(
                    "metrics_not_aggregated",
                    round=server_round,
                    phase=phase,
                    reason=f"{phase}_metrics_aggr_fn raised {type(err).__name__}: {err}"[:300],
                )
                log(WARNING, "Round %s: %s metrics not aggregated: %s", server_round, phase, err)
                return MetricRecord()
        metrics, partial = weighted_metrics(items, skip={self.weighted_by_key})
        for key, count in partial.items():
            log(
                WARNING,
                "Round %s: %s metric '%s' sent by %s of %s replies; averaged over those",
                server_round,
                phase,
                key,
                count,
                len(items),
            )
        return metrics

    def _poolable(
        self, server_round: int, accepted: list[CheckedReply], prefix: str, metrics: MetricRecord
    ) -> list[MetricRecord]:
        """The accepted replies' metrics whose score sketch can be pooled; a bank whose
        sketch cannot (:func:`flower_ext.metrics.sketch_problem`) is left out of the pooled
        figure, audited (``sketch_rejected``) and counted (``pooled-banks-left-out``)."""
        kept = []
        for rep in accepted:
            problem = sketch_problem(rep.metrics, prefix)
            if not problem:
                kept.append(rep.metrics)
                continue
            self.audit.record(
                "sketch_rejected",
                round=server_round,
                node_id=rep.node_id,
                label=self.labels.get(rep.node_id, rep.label),
                sketch=prefix + HIST_EDGES_KEY,
                reason=problem,
            )
        if len(kept) < len(accepted):
            metrics[_left_out_key(prefix)] = len(accepted) - len(kept)
        return kept

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Flower's weighted evaluate metrics, plus pooled AUC/KS from score histograms.

        The pooled figures (``pooled-auc``, ``pooled-ks``) are added when every
        accepted reply carries ``hist-neg``/``hist-pos`` of one length; whatever the
        clients sent (``auc`` included) is averaged as Flower's ``FedAvg`` would.
        """
        replies = list(replies)
        log_received(replies, "aggregate_evaluate")
        accepted, rejected = check_replies(
            replies,
            weighted_by_key=self.weighted_by_key,
            layout=None,
            max_weight_value=self.max_plausible_examples,
            need_arrays=False,
            origins=self.origins("evaluate"),
            sampled=self._evaluate_sampled or None,
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
        metrics = self._client_metrics(server_round, accepted, "evaluate")
        sketches = self._poolable(server_round, accepted, "", metrics)
        try:
            pooled = pooled_histogram_metrics(sketches)
        except Exception:  # malformed legacy histograms: no pooled figure, the rest stands
            pooled = None
        if pooled is not None:
            metrics[POOLED_AUC_KEY], metrics[POOLED_KS_KEY] = pooled
        with_val = [
            m
            for m in self._poolable(server_round, accepted, VAL_PREFIX, metrics)
            if VAL_PREFIX + HIST_NEG_KEY in m
        ]
        try:  # banks too small to hold validation rows send none: pooled over the others
            pooled_val = pooled_histogram_metrics(with_val, prefix=VAL_PREFIX)
        except Exception:
            pooled_val = None
        if pooled_val is not None:
            metrics[POOLED_VAL_AUC_KEY], metrics[POOLED_VAL_KS_KEY] = pooled_val
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


def log_received(replies: list[Message], phase: str) -> None:
    """Flower's own "Received N results and M failures" line."""
    failures = sum(1 for m in replies if m.has_error())
    log(INFO, "%s: Received %s results and %s failures", phase, len(replies) - failures, failures)


def weighted_metrics(
    items: list[tuple[dict[str, Any], float]],
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[MetricRecord, dict[str, int]]:
    """Flower's metric rule: each metric's mean weighted by the replies' weights.

    Scalars and equal-length lists (element-wise) are averaged over the replies
    that carry the key; ``partial`` maps each key some replies lacked to how many
    sent it (Flower stops the run in that case; flower-ext averages what it has
    and says so). Lists of different lengths are left out.
    """
    out = MetricRecord()
    partial: dict[str, int] = {}
    keys: list[str] = []
    for m, _ in items:
        keys += [k for k in m if k not in keys and k not in skip]
    for key in keys:
        values = [(m[key], w) for m, w in items if key in m]
        if len(values) < len(items):
            partial[key] = len(values)
        total = sum(w for _, w in values)
        if total <= 0:
            continue
        if all(isinstance(v, list) for v, _ in values):
            lengths = {len(v) for v, _ in values}
            if len(lengths) != 1:
                continue
            acc = np.zeros(lengths.pop(), dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                for v, w in values:
                    acc += (w / total) * np.asarray(v, dtype=np.float64)
            if np.isfinite(acc).all():  # several huge values can still overflow the mean
                out[key] = [float(x) for x in acc]
        elif not any(isinstance(v, list) for v, _ in values):
            value = math.fsum((w / total) * float(v) for v, w in values)
            if math.isfinite(value):
                out[key] = value
    return out, partial


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


def _left_out_key(prefix: str) -> str:
    return f"pooled-{prefix}banks-left-out"


def pooled_histogram_metrics(
    records: list[MetricRecord], prefix: str = ""
) -> tuple[float, float] | None:
    """Pooled (AUC, KS) from per-bank score sketches or histograms, if every bank sent them.

    With ``hist-edges`` from every bank (``flower_ext.metrics.score_sketch``: each bank's
    own score quantiles) the sketches are merged on the union of the edges, accurate at
    any score spread; otherwise the legacy fixed-bin histograms are summed. ``prefix``
    reads another set of sketches (``val-``: the banks' validation rows).
    """
    neg_key, pos_key, edges_key = (prefix + k for k in (HIST_NEG_KEY, HIST_POS_KEY, HIST_EDGES_KEY))
    if not records or not all(neg_key in m and pos_key in m for m in records):
        return None
    hists = [(m[neg_key], m[pos_key]) for m in records]
    if not all(isinstance(n, list) and isinstance(p, list) for n, p in hists):
        return None
    if all(isinstance(m.get(edges_key), list) for m in records):
        with np.errstate(over="ignore", invalid="ignore"):
            auc, ks = pooled_sketch_metrics(
                [(m[edges_key], n, p) for m, (n, p) in zip(records, hists, strict=True)]
            )
        if auc is None or ks is None or not (math.isfinite(auc) and math.isfinite(ks)):
            return None
        return auc, ks
    lengths = {len(n) for n, _ in hists} | {len(p) for _, p in hists}
    if len(lengths) != 1:
        return None
    neg = np.sum([np.asarray(n, dtype=np.float64) for n, _ in hists], axis=0)
    pos = np.sum([np.asarray(p, dtype=np.float64) for _, p in hists], axis=0)
    if (
        not (np.isfinite(neg).all() and np.isfinite(pos).all())
        or (neg < 0).any()
        or (pos < 0).any()
    ):
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        auc, ks = metrics_from_histograms(neg, pos)
    if auc is None or ks is None or not (math.isfinite(auc) and math.isfinite(ks)):
        return None
    return auc, ks
