"""Server side of top-k compression: densify sparse replies for any Message-API strategy.

``TopKCompression(inner)`` wraps a strategy the way Flower's DP wrappers do.
It puts the compression settings into every train config (so the clients'
:class:`flower_ext.mods.TopKMod` follow the server), remembers the global model
each node was sent, and in ``aggregate_train``:

1. leaves dense replies (clients without the mod) and error replies as they are;
2. validates every sparse reply (marker record, format version, layout
   fingerprint, dimension, index encoding, indices in range and strictly
   increasing, as many indices as values, declared dtypes, finite values) and
   rebuilds it as a dense reply ``global + update`` in the model's layout;
3. turns a malformed sparse reply into an error reply carrying the reason, which
   every Message-API strategy already skips (ours also list it in
   ``round_reports[r].rejected``), and writes a ``topk_reply_rejected`` event to
   the audit trail;
4. hands the dense replies to ``inner.aggregate_train``.

Received messages are never mutated: decoded replies are new Messages with the
same metadata. Everything else is delegated, and attributes the wrapper does not
have (``round_reports``, ``evaluation_reports``, ...) are read from ``inner``.

Only the uplink is compressed; the global model goes down dense.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from flower_ext.audit import AuditTrail
from flower_ext.compression import (
    INDICES_KEY,
    RECORD_KEY,
    SCOPES,
    VALUE_DTYPES,
    SparsePayloadError,
    check_ratio,
    layout_signature,
    payload_from_records,
)
from flower_ext.mods.topk import ERROR_FEEDBACK_KEY, RATIO_KEY, SCOPE_KEY, VALUES_KEY
from flower_ext.records import ArrayLayout
from flower_ext.validation import client_label

REJECTION_PREFIX = "sparse payload rejected"


class _Global:
    """A global model sent this round: its layout, flat float32 copy and fingerprint."""

    def __init__(self, arrays: ArrayRecord) -> None:
        self.arrays = arrays
        self.layout = ArrayLayout.of(arrays)
        self.flat = self.layout.flatten(arrays, dtype=np.float32)
        self.signature = layout_signature(self.layout.keys, self.layout.shapes, self.layout.dtypes)


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
        self._sent: dict[int, _Global] = {}  # node id -> global model it was sent
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
        by_record: dict[int, _Global] = {}
        for msg in messages:
            records = list(msg.content.array_records.values()) if msg.has_content() else []
            if len(records) != 1:
                continue
            record = records[0]
            if id(record) not in by_record:  # one flat copy per distinct model sent
                by_record[id(record)] = _Global(record)
            self._sent[int(msg.metadata.dst_node_id)] = by_record[id(record)]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        start = time.perf_counter()
        decoded: list[Message] = []
        report: dict[str, Any] = {"sparse": 0, "dense": 0, "rejected": {}, "clients": {}}
        for msg in replies:
            if not is_sparse(msg):
                report["dense"] += 1
                decoded.append(msg)
                continue
            node = int(msg.metadata.src_node_id)
            try:
                dense, info = self.densify(msg)
            except SparsePayloadError as err:
                reason = f"{REJECTION_PREFIX}: {err}"
                report["rejected"][node] = reason
                self.audit.record(
                    "topk_reply_rejected",
                    round=server_round,
                    node_id=node,
                    label=client_label(msg),
                    reason=reason,
                )
                log(WARNING, "Round %s: node %s: %s", server_round, node, reason)
                decoded.append(
                    Message(
                        metadata=copy.copy(msg.metadata),
                        error=Error(code=ErrorCode.UNKNOWN, reason=reason),
                    )
                )
                continue
            report["sparse"] += 1
            report["clients"][node] = info
            decoded.append(dense)
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
        return self.inner.aggregate_train(server_round, decoded)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ decoding
    def densify(self, msg: Message) -> tuple[Message, dict[str, Any]]:
        """A new dense reply (``global + update``) from a sparse one; raises on bad payloads."""
        node = int(msg.metadata.src_node_id)
        sent = self._sent.get(node)
        if sent is None:
            raise SparsePayloadError(
                f"no global model was sent to node {node} this round; cannot decode its update"
            )
        content = msg.content
        marker = content.config_records.get(RECORD_KEY)
        sparse_items = [(k, r) for k, r in content.array_records.items() if INDICES_KEY in r]
        if marker is None:
            raise SparsePayloadError(f"sparse arrays without their '{RECORD_KEY}' record")
        if len(content.array_records) != 1 or len(sparse_items) != 1:
            raise SparsePayloadError("expected exactly one ArrayRecord, the sparse payload")
        arrays_key, sparse = sparse_items[0]
        payload, fields = payload_from_records(sparse, marker)
        if fields["layout"] != sent.signature:
            raise SparsePayloadError(
                "layout fingerprint differs from the model sent (keys, shapes or dtypes)"
            )
        if payload.dim != sent.layout.dim:
            raise SparsePayloadError(
                f"dimension {payload.dim} differs from the model's {sent.layout.dim}"
            )
        indices, values = payload.decode()
        flat = sent.flat.copy()
        flat[indices] += values
        dense = sent.layout.unflatten(flat)
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


def is_sparse(msg: Message) -> bool:
    """Whether a reply claims to carry a top-k payload (marker record or sparse keys)."""
    if msg.has_error() or not msg.has_content():
        return False
    content = msg.content
    if RECORD_KEY in content.config_records:
        return True
    return any(INDICES_KEY in r for r in content.array_records.values())
