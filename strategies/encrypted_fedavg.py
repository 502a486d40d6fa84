"""FedAvg over CKKS ciphertexts: the server adds updates it cannot read.

The banks run :class:`flower_ext.mods.HEMod` and encrypt ``n_i * (local_i - base)``
(all layers packed into ``ceil(d / slots)`` ciphertexts, :mod:`flower_ext.crypto`).
This strategy holds the *public* TenSEAL context only (it refuses a private one)
and, per round:

1. checks every reply: error replies, the ``he`` record (format, key
   fingerprint, slots, number of values, layout), a positive plausible
   ``num-examples`` equal to the weight the bank multiplied by, the shape of the
   ciphertext array and that every coefficient is below the modulus ``q``. A
   bad reply is rejected with a reason in the audit trail, before any of it
   touches the sum; the round goes on with the rest;
2. adds the accepted ciphertexts (coefficient arrays, mod ``q``: no TenSEAL
   object is built on the server) and the plaintext weights;
3. returns the new *encrypted global model*: an ArrayRecord with the public
   base model, ``he.ciphertexts`` (the sum) and ``he.weight-total`` (``W``).
   Flower's ``start`` loop passes it on like any model; the banks decrypt
   ``base + sum / W`` before training or evaluating.

What "the global model stays encrypted" means here: everything the server holds
that depends on the banks' data is ciphertext; the base (initial model) is the
server's own. Central evaluation is impossible by design (an ``evaluate_fn``
receives the encrypted record): evaluation runs on the banks, and the strategy
aggregates their plaintext metrics as :class:`FedAvg` does.

The server only adds: no server learning rate or momentum, no weight caps (each
would multiply a ciphertext). Robust rules need plaintext updates, and top-k
sends different coordinates per bank: both are refused (the latter when a
``topk-ratio > 0`` reaches the train config).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.audit import AuditTrail
from flower_ext.crypto import (
    FORMAT,
    CiphertextError,
    CryptoError,
    codec_for,
    context_fingerprint,
    load_public_context,
    num_chunks,
)
from flower_ext.mods.he import (
    CIPHERTEXTS,
    FINGERPRINT_KEY,
    FORMAT_KEY,
    RECORD_KEY,
    SLOTS_KEY,
    TOPK_RATIO_KEY,
    WEIGHT_KEY_KEY,
    WEIGHT_TOTAL,
    layout_signature,
    split_global,
)
from flower_ext.records import ArrayLayout, RecordFormatError, array_view, arrays_sha256
from flower_ext.validation import Rejection, check_weight, client_label, reply_sender

from .base import RoundReport, UpdateAggregationStrategy, weighted_scalar_metrics


@dataclass
class EncryptedReply:
    node_id: int
    label: str
    weight: float
    metrics: MetricRecord
    packed: np.ndarray  # uint8 (chunks, 2, N, coeff_bytes): a zero-copy view on the reply
    nbytes: int


class EncryptedFedAvg(UpdateAggregationStrategy):
    """Federated Averaging of CKKS-encrypted, client-weighted updates (add-only server).

    McMahan et al. 2017 (FedAvg) with the banks' updates encrypted under CKKS
    (Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate
    Numbers", ASIACRYPT 2017) through TenSEAL. Equal, up to CKKS noise (~1e-9
    relative with the default keys), to :class:`FedAvg` weighted by ``num-examples``.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    context : str | Path | bytes | tenseal.Context
        The *public* context (``server-public.ckks`` from ``flower-ext keygen``).
        A context holding the secret key is refused.
    proximal_mu, max_plausible_examples, min_valid_replies, audit
        As in :class:`UpdateAggregationStrategy`.
    server_learning_rate, server_momentum, max_weight, max_weight_median_multiple
        Accepted for signature compatibility; anything but the defaults is
        refused (each needs a ciphertext multiplication).
    """

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
        context: str | Path | bytes | ts.Context,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        proximal_mu: float = 0.0,
        max_weight: float | None = None,
        max_weight_median_multiple: float | None = None,
        max_plausible_examples: float = 1e9,
        min_valid_replies: int = 1,
        audit: AuditTrail | None = None,
    ) -> None:
        refused = []
        if server_learning_rate != 1.0:
            refused.append(f"server_learning_rate={server_learning_rate}")
        if server_momentum != 0.0:
            refused.append(f"server_momentum={server_momentum}")
        if max_weight is not None or max_weight_median_multiple is not None:
            refused.append("weight caps")
        if refused:
            raise ValueError(
                f"EncryptedFedAvg cannot apply {', '.join(refused)}: the server only adds "
                "ciphertexts, and each of these would multiply one"
            )
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
            proximal_mu=proximal_mu,
            max_plausible_examples=max_plausible_examples,
            min_valid_replies=min_valid_replies,
            audit=audit,
        )
        #: The public TenSEAL context (never a secret key: checked here).
        self.context = load_public_context(context)
        self.fingerprint = context_fingerprint(self.context)
        try:
            self.codec = codec_for(self.context)
        except CryptoError as err:
            raise ValueError(f"EncryptedFedAvg cannot use this context: {err}") from err
        self.slots = self.codec.slots
        self._base: ArrayRecord | None = None
        self._base_layout: ArrayLayout | None = None
        #: Per round: seconds deserializing+checking, adding, serializing.
        self.timings: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ summary
    def rule_summary(self) -> str:
        return (
            f"sum of CKKS ciphertexts pre-weighted by the banks (add-only; {self.slots} slots, "
            f"key {self.fingerprint[:12]}...)"
        )

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t\t└── Encrypted: the server holds the public context only")

    # ------------------------------------------------------------------ global model
    def set_global_model(self, arrays: ArrayRecord) -> None:
        """Keep the encrypted global record; its plaintext part is the public base model."""
        base, _ = split_global(arrays)
        layout = ArrayLayout.of(base)
        if self._base_layout is not None and layout != self._base_layout:
            raise ValueError("the model layout changed between rounds under encryption")
        self._base = base
        self._base_layout = layout
        self._global = arrays

    def _he_config(self, config: ConfigRecord) -> ConfigRecord:
        ratio = config.get(TOPK_RATIO_KEY, 0.0)
        if float(ratio or 0.0) > 0:  # type: ignore[arg-type]
            raise ValueError(
                "EncryptedFedAvg cannot be combined with top-k compression (topk-ratio > 0): "
                "the banks would send different coordinates, which ciphertexts cannot be "
                "added over"
            )
        config[FINGERPRINT_KEY] = self.fingerprint
        config[SLOTS_KEY] = self.slots
        config[FORMAT_KEY] = FORMAT
        config[WEIGHT_KEY_KEY] = self.weighted_by_key
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, self._he_config(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self._he_config(config), grid)

    # ------------------------------------------------------------------ aggregation
    def check_encrypted_reply(self, msg: Message) -> EncryptedReply:
        """Read and check one reply; raises ``CiphertextError`` with the reason."""
        if msg.has_error():
            raise CiphertextError(f"error reply: {msg.error.reason}")
        if not msg.has_content():
            raise CiphertextError("empty reply")
        assert self._base_layout is not None
        he = msg.content.config_records.get(RECORD_KEY)
        if he is None:
            raise CiphertextError(
                "reply is not encrypted (no 'he' record): every bank must run he_mod"
            )
        if he.get("format") != FORMAT:
            raise CiphertextError(f"format {he.get('format')!r}, expected {FORMAT!r}")
        if he.get("fingerprint") != self.fingerprint:
            raise CiphertextError(
                f"ciphertexts made under a different context (key fingerprint "
                f"{str(he.get('fingerprint'))[:16]}..., the federation's is "
                f"{self.fingerprint[:16]}...)"
            )
        if he.get("slots") != self.slots:
            raise CiphertextError(
                f"ciphertexts with {he.get('slots')} slots, the federation's context has "
                f"{self.slots}"
            )
        dim = self._base_layout.dim
        if he.get("num-values") != dim or he.get("layout") != layout_signature(self._base_layout):
            raise CiphertextError(
                f"encrypted update of {he.get('num-values')} values in another layout; the "
                f"model has {dim}"
            )
        metrics = msg.content.metric_records.get("metrics")
        if metrics is None and len(msg.content.metric_records) == 1:
            metrics = next(iter(msg.content.metric_records.values()))
        if metrics is None:
            raise CiphertextError("reply has no MetricRecord")
        weight, why = check_weight(metrics, self.weighted_by_key, self.max_plausible_examples)
        if why or weight is None:
            raise CiphertextError(why)
        if float(he.get("weight", -1.0)) != weight:  # type: ignore[arg-type]
            raise CiphertextError(
                f"the bank multiplied by {he.get('weight')} but reports "
                f"{self.weighted_by_key}={weight}"
            )
        if len(msg.content.array_records) != 1:
            raise CiphertextError("reply has no single ArrayRecord")
        record = next(iter(msg.content.array_records.values()))
        if set(record.keys()) != {CIPHERTEXTS}:
            raise CiphertextError(f"encrypted reply holds {sorted(record.keys())}")
        try:
            packed = array_view(record[CIPHERTEXTS])
        except RecordFormatError as err:
            raise CiphertextError(f"unreadable ciphertext array: {err}") from err
        expected = self.codec.wire_shape(num_chunks(dim, self.slots))
        if packed.dtype != np.uint8 or tuple(packed.shape) != expected:
            raise CiphertextError(
                f"ciphertext array is {packed.dtype}{tuple(packed.shape)}, expected uint8"
                f"{expected} (chunks, 2, N, bytes per coefficient) for {dim} values"
            )
        return EncryptedReply(
            node_id=reply_sender(msg, self.origins("train")),
            label=client_label(msg),
            weight=weight,
            metrics=metrics,
            packed=packed,
            nbytes=int(packed.nbytes),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._base is None or self._base_layout is None or self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        start = time.perf_counter()
        replies = list(replies)
        report = RoundReport(server_round, sampled=list(self._sampled.get(server_round, [])))
        self.round_reports[server_round] = report
        accepted: list[EncryptedReply] = []
        rejected: list[Rejection] = []
        # Check each reply whole (metadata, then every coefficient < q while widening it
        # into a scratch buffer) before its coefficients touch the sum: a malformed
        # reply is rejected and never half-added.
        codec = self.codec
        acc: np.ndarray | None = None
        scratch: np.ndarray | None = None
        pending = 0
        t_add = 0.0
        for msg in replies:
            try:
                rep = self.check_encrypted_reply(msg)
                scratch = codec.unpack(rep.packed, out=scratch)
            except CiphertextError as err:
                node = reply_sender(msg, self.origins("train"))
                rejected.append(Rejection(node, str(err), client_label(msg)))
                continue
            t0 = time.perf_counter()
            if acc is None:
                acc, scratch, pending = scratch, None, 1
            else:
                if pending == codec.max_terms:
                    np.remainder(acc, np.uint64(codec.q), out=acc)
                    pending = 1
                np.add(acc, scratch, out=acc)
                pending += 1
            t_add += time.perf_counter() - t0
            accepted.append(rep)
        t_loaded = time.perf_counter()
        self.record_participation(server_round, report, replies, rejected, accepted)
        if len(accepted) < self.min_replies():
            self.skip_round(server_round, report, len(accepted))
            metrics = self._encrypted_metrics(report, accepted)
            report.train_metrics = dict(metrics)
            return None, metrics

        assert acc is not None
        t_reduce = time.perf_counter()
        np.remainder(acc, np.uint64(codec.q), out=acc)
        t_added = time.perf_counter()
        total = float(sum(r.weight for r in accepted))
        packed = codec.pack(acc)
        new_arrays = ArrayRecord(
            {
                **dict(self._base.items()),
                CIPHERTEXTS: Array(packed),
                WEIGHT_TOTAL: Array(np.array([total], dtype=np.float64)),
            }
        )
        end = time.perf_counter()
        self.timings[server_round] = {
            "load_seconds": t_loaded - start - t_add,
            "add_seconds": t_add + (t_added - t_reduce),
            "serialize_seconds": end - t_added,
        }
        report.aggregate_seconds = end - start
        report.model_sha256 = arrays_sha256(new_arrays)
        for rep in accepted:
            client_report = {
                "selected": True,
                "weight": rep.weight / total,
                "num_examples": rep.weight,
                "ciphertext_bytes": rep.nbytes,
                "label": self.labels.get(rep.node_id, ""),
            }
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
            selected=len(accepted),
            weight_total=total,
            ciphertext_bytes_in=sum(r.nbytes for r in accepted),
            ciphertext_bytes_out=int(packed.nbytes),
            aggregate_seconds=report.aggregate_seconds,
            **self.timings[server_round],
            model_sha256=report.model_sha256,
        )
        metrics = self._encrypted_metrics(report, accepted)
        report.train_metrics = dict(metrics)
        return new_arrays, metrics

    def _encrypted_metrics(
        self, report: RoundReport, accepted: list[EncryptedReply]
    ) -> MetricRecord:
        if self._custom_train_metrics and accepted:
            metrics = self.train_metrics_aggr_fn(
                [RecordDict({"metrics": r.metrics}) for r in accepted], self.weighted_by_key
            )
        else:
            metrics = weighted_scalar_metrics(
                [(r.metrics, r.weight) for r in accepted], skip={self.weighted_by_key}
            )
        metrics["clients-accepted"] = len(report.accepted)
        metrics["clients-rejected"] = len(report.rejected)
        metrics["clients-missing"] = len(report.missing)
        metrics["clients-selected"] = len(report.accepted)
        return metrics

    def aggregate_updates(self, updates: Any, weights: Any, server_round: int) -> Any:
        raise NotImplementedError("EncryptedFedAvg never sees plaintext updates")
