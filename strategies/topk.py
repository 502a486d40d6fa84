"""Server side of top-k compression: densify sparse replies for any Message-API strategy.

``TopKCompression(inner)`` wraps a strategy the way Flower's DP wrappers do.
It puts the compression settings into every train config (so the clients'
:class:`flower_ext.mods.TopKMod` follow the server), remembers the global model
each node was sent, and in ``aggregate_train``:

1. validates every sparse reply (marker record and its field types, format
   version, layout fingerprint, dimension, the number of entries the server asked
   for, value encoding, index encoding, indices in range and strictly increasing,
   as many indices as values, declared dtypes, int8 scale finite and consistent,
   finite values, no overflow of the model's dtypes) and rebuilds it as a dense
   reply ``global + update`` in the keys, shapes and dtypes of the model sent;
2. passes dense replies on after checking they have the keys and shapes of the
   model sent; a dense reply while the server asks for top-k is written to the
   audit trail with the client's reason (``topk.dense`` record) or "no reason";
3. turns a malformed reply into an error reply whose reason names the bank and the
   problem, which every Message-API strategy already skips (ours also list it in
   ``round_reports[r].rejected``), and writes a ``topk_reply_rejected`` event to
   the audit trail. Nothing a client sends raises out of this wrapper;
4. hands the replies to ``inner.aggregate_train`` and casts what it returns back to
   the global model's dtypes and shapes (Flower's FedAvg returns an int64 buffer as
   float64; integers come back rounded half-to-even, bools rounded), so the next
   round's model has the same layout and the clients keep compressing.

Received messages are never mutated: decoded replies are new Messages with the
same metadata. Everything else is delegated, and attributes the wrapper does not
have (``round_reports``, ``evaluation_reports``, ...) are read from ``inner``.

Only the uplink is compressed; the global model goes down dense.

Differences from Flower's FedAvg on the same dense replies: a reply whose keys or
shapes differ from the model sent is rejected (Flower raises or broadcasts), and
integer and bool arrays come back in their own dtype (Flower returns float64).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from flower_ext.audit import AuditTrail
from flower_ext.compression import (
    DENSE_RECORD_KEY,
    INDICES_KEY,
    RECORD_KEY,
    SCOPES,
    VALUE_DTYPES,
    GlobalModel,
    SparsePayloadError,
    check_ratio,
    expected_count,
    payload_from_records,
)
from flower_ext.mods.topk import ERROR_FEEDBACK_KEY, RATIO_KEY, SCOPE_KEY, VALUES_KEY
from flower_ext.validation import client_label

REJECTION_PREFIX = "sparse payload rejected"
DENSE_REJECTION_PREFIX = "dense reply rejected"
MAX_REASON_CHARS = 300


class _Sent:
    """A global model sent this round, read once, or why it could not be read."""

    def __init__(self, arrays: ArrayRecord) -> None:
        self.model: GlobalModel | None = None
        self.error = ""
        try:
            self.model = GlobalModel(arrays)
        except Exception as err:  # the reason goes into every rejection of a reply to it
            self.error = f"the global model sent cannot carry top-k updates: {err}"


class _Rejected(Exception):
    """A reply rejected by the wrapper; the message is the full reason."""


class TopKCompression(Strategy):
    """Top-k compressed uplink around any Message-API strategy.

    Parameters
    ----------
    inner : Strategy
        The strategy that aggregates (``flwr.serverapp.strategy.FedAvg``, ``Krum``, ...,
        or any flower-ext strategy).
    ratio : float, optional
        Fraction of entries each client sends, put in the train config as
        ``topk-ratio``. ``None`` leaves the choice to the clients' run config.
    values : {"float32", "float16", "int8"}, optional
        Value encoding imposed on clients (``topk-values``); ``None``: client's choice.
    scope : {"global", "layer"}, optional
        Selection scope imposed on clients (``topk-scope``).
    error_feedback : bool, optional
        Imposed on clients (``topk-error-feedback``).
    audit : AuditTrail, optional
        Where rejections go; default: ``inner.audit`` if it has one, else a new
        in-memory trail.

    Examples
    --------
    >>> strategy = TopKCompression(FedAvg(fraction_train=1.0), ratio=0.01, values="float16")
    """

    def __init__(
        self,
        inner: Strategy,
        ratio: float | None = 0.01,
        *,
        values: str | None = None,
        scope: str | None = None,
        error_feedback: bool | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a flwr Strategy, got {type(inner).__name__}")
        if ratio is not None:
            check_ratio(ratio)
        if values is not None and values not in VALUE_DTYPES:
            raise ValueError(f"values must be one of {VALUE_DTYPES}, got {values!r}")
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.inner = inner
        self.ratio = ratio
        self.values = values
        self.scope = scope
        self.error_feedback = error_feedback
        inner_audit = getattr(inner, "audit", None)
        self.audit = (
            audit
            if audit is not None
            else inner_audit
            if isinstance(inner_audit, AuditTrail)
            else AuditTrail()
        )
        self._sent: dict[int, _Sent] = {}  # node id -> global model it was sent
        self._round_model: GlobalModel | None = None  # this round's global model
        #: Per round: how many replies were sparse, dense, rejected; decode time.
        self.compression_reports: dict[int, dict[str, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: forward round_reports, evaluation_reports, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ------------------------------------------------------------------ Strategy API
    def summary(self) -> None:
        self.inner.summary()
        log(
            INFO,
            "\t└──> Top-k compression (TopKCompression): ratio %s, values %s, scope %s, "
            "error feedback %s",
            self.ratio if self.ratio is not None else "client's",
            self.values or "client's",
            self.scope or "client's",
            self.error_feedback if self.error_feedback is not None else "client's",
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.ratio is not None:
            config[RATIO_KEY] = float(self.ratio)
        if self.values is not None:
            config[VALUES_KEY] = self.values
        if self.scope is not None:
            config[SCOPE_KEY] = self.scope
        if self.error_feedback is not None:
            config[ERROR_FEEDBACK_KEY] = bool(self.error_feedback)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = {}
        by_record: dict[int, _Sent] = {id(arrays): _Sent(arrays)}
        self._round_model = by_record[id(arrays)].model
        if by_record[id(arrays)].error:
            log(WARNING, "TopKCompression: %s", by_record[id(arrays)].error)
        for msg in messages:
            records = list(msg.content.array_records.values()) if msg.has_content() else []
            if len(records) != 1:
                continue
            record = records[0]
            if id(record) not in by_record:  # one read per distinct model sent
                by_record[id(record)] = _Sent(record)
            self._sent[int(msg.metadata.dst_node_id)] = by_record[id(record)]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        passed: list[Message] = []
        report: dict[str, Any] = {
            "sparse": 0,
            "dense": 0,
            "rejected": {},
            "dense_reasons": {},
            "clients": {},
        }
        for msg in replies:
            try:
                passed.append(self._intake(server_round, msg, report))
            except _Rejected as err:
                passed.append(self._reject(server_round, msg, str(err), report))
            except Exception as err:  # never let one reply end the run
                reason = f"reply rejected ({_who(msg)}): unreadable reply"
                reason += f" ({type(err).__name__}: {_short(str(err), 120)})"
                passed.append(self._reject(server_round, msg, reason, report))
        report["decode_seconds"] = time.perf_counter() - start
        self.compression_reports[server_round] = report
        self.audit.record(
            "topk_round",
            round=server_round,
            sparse=report["sparse"],
            dense=report["dense"],
            rejected=len(report["rejected"]),
            decode_seconds=report["decode_seconds"],
            clients=report["clients"],
        )
        arrays, metrics = self.inner.aggregate_train(server_round, passed)
        return self._as_model(server_round, arrays, report), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ intake
    def _intake(self, server_round: int, msg: Message, report: dict[str, Any]) -> Message:
        """The reply to hand to ``inner``: decoded, passed on, or raises :class:`_Rejected`."""
        if msg.has_error():
            return msg
        node = int(msg.metadata.src_node_id)
        if is_sparse(msg):
            try:
                dense, info = self.densify(msg)
            except SparsePayloadError as err:
                raise _Rejected(f"{REJECTION_PREFIX} ({_who(msg)}): {_short(str(err))}") from err
            report["sparse"] += 1
            report["clients"][node] = info
            return dense
        report["dense"] += 1
        sent = self._sent.get(node)
        if sent is not None and sent.model is not None:
            why = _dense_mismatch(msg, sent.model)
            if why:
                raise _Rejected(f"{DENSE_REJECTION_PREFIX} ({_who(msg)}): {why}")
        marker = msg.content.config_records.get(DENSE_RECORD_KEY)
        if marker is None and self.ratio is None:
            return msg  # the clients choose, and this one chose dense
        reason = (
            _short(str(marker.get("reason", "")))
            if marker is not None
            else "no reason given (a client without topk_mod?)"
        )
        report["dense_reasons"][node] = reason
        log(WARNING, "Round %s: %s sent a dense reply: %s", server_round, _who(msg), reason)
        self.audit.record(
            "topk_dense_reply",
            round=server_round,
            node_id=node,
            label=_label(msg),
            reason=reason,
        )
        if marker is None:
            return msg
        content = RecordDict()
        for key, record in msg.content.items():
            if key != DENSE_RECORD_KEY:
                content[key] = record
        return Message(metadata=copy.copy(msg.metadata), content=content)

    def _reject(
        self, server_round: int, msg: Message, reason: str, report: dict[str, Any]
    ) -> Message:
        reason = _short(reason, MAX_REASON_CHARS)
        node = _node(msg)
        report["rejected"][node] = reason
        self.audit.record(
            "topk_reply_rejected",
            round=server_round,
            node_id=node,
            label=_label(msg),
            reason=reason,
        )
        log(WARNING, "Round %s: %s", server_round, reason)
        return Message(
            metadata=copy.copy(msg.metadata), error=Error(code=ErrorCode.UNKNOWN, reason=reason)
        )

    def _as_model(
        self, server_round: int, arrays: ArrayRecord | None, report: dict[str, Any]
    ) -> ArrayRecord | None:
        """``arrays`` in the global model's dtypes and shapes (see :meth:`GlobalModel.cast`)."""
        model = getattr(self, "_round_model", None)
        if arrays is None or model is None:
            return arrays
        try:
            cast, notes = model.cast(arrays)
        except Exception as err:  # keep what inner returned rather than lose the round
            cast, notes = arrays, [f"{type(err).__name__}: {_short(str(err), 120)}"]
        if notes:
            report["cast_notes"] = notes
            log(
                WARNING,
                "Round %s: TopKCompression kept arrays the inner strategy returned in another "
                "layout than the global model: %s",
                server_round,
                "; ".join(notes[:5]),
            )
        return cast

    # ------------------------------------------------------------------ decoding
    def densify(self, msg: Message) -> tuple[Message, dict[str, Any]]:
        """A new dense reply (``global + update``) from a sparse one.

        Raises
        ------
        SparsePayloadError
            With the reason, for any payload that cannot be decoded safely.
        """
        node = int(msg.metadata.src_node_id)
        sent = self._sent.get(node)
        if sent is None:
            raise SparsePayloadError(
                f"no global model was sent to node {node} this round; cannot decode its update"
            )
        if sent.model is None:
            raise SparsePayloadError(sent.error)
        model = sent.model
        content = msg.content
        marker = content.config_records.get(RECORD_KEY)
        sparse_items = [(k, r) for k, r in content.array_records.items() if INDICES_KEY in r]
        if marker is None:
            raise SparsePayloadError(f"sparse arrays without their '{RECORD_KEY}' record")
        if len(content.array_records) != 1 or len(sparse_items) != 1:
            raise SparsePayloadError("expected exactly one ArrayRecord, the sparse payload")
        arrays_key, sparse = sparse_items[0]
        payload, fields = payload_from_records(sparse, marker)
        if fields["layout"] != model.signature:
            raise SparsePayloadError(
                "layout fingerprint differs from the model sent (keys, shapes or dtypes)"
            )
        if payload.dim != model.dim:
            raise SparsePayloadError(
                f"dimension {payload.dim} differs from the model's {model.dim}"
            )
        if self.values is not None and payload.value_dtype != self.values:
            raise SparsePayloadError(
                f"values encoded as {payload.value_dtype!r}, the server asked for {self.values!r}"
            )
        if self.ratio is not None:
            scopes = (self.scope,) if self.scope is not None else SCOPES
            allowed = sorted({expected_count(model.sizes, self.ratio, s) for s in scopes})
            if payload.count not in allowed:
                raise SparsePayloadError(
                    f"wrong k: {payload.count} entries, the server asked for "
                    f"{' or '.join(map(str, allowed))} (ratio {self.ratio})"
                )
        indices, values = payload.decode()
        dense = model.apply_sparse(indices, values)
        new_content = RecordDict()
        for key, record in content.items():
            if key == RECORD_KEY:
                continue
            new_content[key] = dense if key == arrays_key else record
        info = {
            "count": payload.count,
            "index_encoding": payload.index_encoding,
            "values": payload.value_dtype,
            "payload_bytes": payload.nbytes,
        }
        return Message(metadata=copy.copy(msg.metadata), content=new_content), info


def _dense_mismatch(msg: Message, model: GlobalModel) -> str:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        return f"expected exactly one ArrayRecord, found {len(records)}"
    why = model.mismatch(records[0])
    return f"does not match the model sent: {why}" if why else ""


def _node(msg: Message) -> int:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:
        return 0


def _label(msg: Message) -> str:
    try:
        return _short(client_label(msg), 100)
    except Exception:
        return ""


def _who(msg: Message) -> str:
    label = _label(msg)
    return f"bank {label!r}, node {_node(msg)}" if label else f"node {_node(msg)}"


def _short(text: str, limit: int = 200) -> str:
    """One line, printable, at most ``limit`` characters (reasons go into logs and audits)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_sparse(msg: Message) -> bool:
    """Whether a reply claims to carry a top-k payload (marker record or sparse keys)."""
    if msg.has_error():
        return False
    content = msg.content
    if RECORD_KEY in content.config_records:
        return True
    return any(INDICES_KEY in r for r in content.array_records.values())
