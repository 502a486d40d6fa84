"""Checks a reply must pass before its numbers reach an aggregation kernel.

A bad reply is rejected with a reason a person can act on; the round goes on
with the others. Nothing here mutates a reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from .records import ArrayLayout, RecordFormatError, array_view

CLIENT_INFO_KEY = "client-info"  # optional ConfigRecord with a human label ("bank")


@dataclass
class Rejection:
    node_id: int
    reason: str
    label: str = ""


@dataclass
class CheckedReply:
    """A reply that passed the structural checks, with what was read from it."""

    message: Message
    node_id: int
    weight: float
    metrics: MetricRecord
    arrays: ArrayRecord | None
    label: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def client_info(message: Message) -> dict[str, object]:
    """The optional ``client-info`` ConfigRecord of a reply (bank label, notes)."""
    if message.has_error() or not message.has_content():
        return {}
    info = message.content.config_records.get(CLIENT_INFO_KEY)
    if isinstance(info, ConfigRecord):
        return {k: v for k, v in info.items() if not isinstance(v, bytes)}
    return {}


def client_label(message: Message) -> str:
    return str(client_info(message).get("bank", ""))


def _single(records: dict, kind: str) -> tuple[object | None, str]:
    if len(records) != 1:
        return None, f"expected exactly one {kind}, found {len(records)}"
    return next(iter(records.values())), ""


def check_weight(
    metrics: MetricRecord, weighted_by_key: str, max_weight_value: float
) -> tuple[float | None, str]:
    if weighted_by_key not in metrics:
        return None, f"metric '{weighted_by_key}' is missing"
    value = metrics[weighted_by_key]
    if isinstance(value, (list, bool)):
        return None, f"metric '{weighted_by_key}' must be one number, got {type(value).__name__}"
    weight = float(value)
    if not math.isfinite(weight):
        return None, f"metric '{weighted_by_key}' is not finite ({value})"
    if weight <= 0:
        return None, f"metric '{weighted_by_key}' must be positive, got {value}"
    if weight > max_weight_value:
        return None, (
            f"metric '{weighted_by_key}' = {value} exceeds the plausible maximum "
            f"{max_weight_value:g}"
        )
    return weight, ""


def reply_sender(message: Message, origins: Mapping[str, int] | None = None) -> int:
    """The node a reply is about.

    When a node drops out, the SuperLink answers in its place with an error reply
    whose source is the SuperLink itself; ``origins`` (message id -> destination
    node of the messages the strategy sent) maps such a reply back to the bank.
    """
    if origins:
        node = origins.get(message.metadata.reply_to_message_id)
        if node is not None:
            return node
    return int(message.metadata.src_node_id)


def check_reply(
    message: Message,
    *,
    weighted_by_key: str,
    layout: ArrayLayout | None,
    max_weight_value: float = 1e9,
    need_arrays: bool = True,
    origins: Mapping[str, int] | None = None,
) -> CheckedReply | Rejection:
    """Structural checks on one reply; finiteness of values is checked when decoding."""
    node_id = reply_sender(message, origins)
    label = client_label(message)
    if message.has_error():
        return Rejection(
            node_id, f"client error {message.error.code}: {message.error.reason}", label
        )
    if not message.has_content():
        return Rejection(node_id, "reply has no content", label)
    content = message.content
    metrics, problem = _single(dict(content.metric_records), "MetricRecord")
    if problem:
        return Rejection(node_id, problem, label)
    assert isinstance(metrics, MetricRecord)
    weight, problem = check_weight(metrics, weighted_by_key, max_weight_value)
    if weight is None:
        return Rejection(node_id, problem, label)
    arrays = None
    if need_arrays:
        found, problem = _single(dict(content.array_records), "ArrayRecord")
        if problem:
            return Rejection(node_id, problem, label)
        assert isinstance(found, ArrayRecord)
        arrays = found
        if layout is not None:
            mismatch = layout.mismatch(arrays)
            if mismatch:
                return Rejection(node_id, mismatch, label)
            try:
                for key in layout.keys:
                    array_view(arrays[key])
            except RecordFormatError as err:
                return Rejection(node_id, f"array '{key}': {err}", label)
    extra = {k: v for k, v in client_info(message).items() if k != "bank"}
    return CheckedReply(message, node_id, weight, metrics, arrays, label, extra)


def check_replies(
    replies: list[Message],
    *,
    weighted_by_key: str,
    layout: ArrayLayout | None,
    max_weight_value: float = 1e9,
    need_arrays: bool = True,
    origins: Mapping[str, int] | None = None,
) -> tuple[list[CheckedReply], list[Rejection]]:
    """Split replies into accepted and rejected; a second reply from a node is rejected."""
    accepted: list[CheckedReply] = []
    rejected: list[Rejection] = []
    seen: set[int] = set()
    for message in replies:
        result = check_reply(
            message,
            weighted_by_key=weighted_by_key,
            layout=layout,
            max_weight_value=max_weight_value,
            need_arrays=need_arrays,
            origins=origins,
        )
        if isinstance(result, CheckedReply):
            if result.node_id in seen:
                rejected.append(
                    Rejection(result.node_id, "duplicate reply from this node", result.label)
                )
                continue
            seen.add(result.node_id)
            accepted.append(result)
        else:
            rejected.append(result)
    return accepted, rejected
