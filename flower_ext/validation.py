"""Checks a reply must pass before its numbers reach an aggregation kernel.

A bad reply is rejected with a reason a person can act on; the round goes on
with the others. Nothing here mutates a reply.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID

from .audit import short_reason as summarise_reason
from .records import ArrayLayout, RecordFormatError, array_view

CLIENT_INFO_KEY = "client-info"  # optional ConfigRecord with a human label ("bank")


#: Longest reason kept for one rejection (the audit trail and the logs stay readable).
MAX_REASON_CHARS = 300


def short_reason(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one clean line of at most ``limit`` characters (see
    :func:`flower_ext.audit.short_reason`: terminal codes removed, a traceback reduced
    to the exception it ends with)."""
    return summarise_reason(str(text), limit)


@dataclass
class Rejection:
    """A reply the round goes on without, and why (a short, clean reason)."""

    node_id: int
    reason: str
    label: str = ""

    def __post_init__(self) -> None:
        self.reason = short_reason(self.reason)
        self.label = short_reason(self.label, 100)


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
    """The node a reply is from, for the record.

    A reply answering node B's message is B's when B sent it, or when it is an
    error reply from the SuperLink (which answers in place of a node that dropped
    out); ``origins`` (message id -> destination node of the messages the strategy
    sent) gives B. A reply sent by any other node is that node's own.
    """
    src = int(message.metadata.src_node_id)
    if origins:
        node = origins.get(message.metadata.reply_to_message_id)
        if node is not None and (src == node or (src == SUPERLINK_NODE_ID and message.has_error())):
            return node
    return src


def bind_replies(
    replies: list[Message],
    *,
    origins: Mapping[str, int] | None,
    sampled: Collection[int] | None = None,
) -> tuple[list[tuple[Message, int]], list[Rejection]]:
    """Bind each reply to a message this strategy sent in this round, one reply per node.

    A reply is kept only if it answers one of this round's outgoing messages
    (``origins``: message id -> destination node, filled once the Grid has sent
    them) and comes from that message's destination node. Error replies may come
    from the SuperLink in a dropped node's place; they are attributed to the node
    they answer. When the outgoing messages carry no ids (messages never sent
    through a Grid, as in unit tests) the sender must be one of ``sampled``.

    Rejected: replays of an earlier round's or another strategy's messages, replies
    from nodes that were not sampled, a reply whose sender is not the node the
    message was sent to, and every reply of a node that sent more than one.

    Returns
    -------
    (bound, rejected)
        ``bound`` holds ``(reply, node_id)`` pairs in arrival order.
    """
    bound: list[tuple[Message, int]] = []
    rejected: list[Rejection] = []
    senders: Counter[int] = Counter()  # every reply, bound or not, counts for its sender
    sampled_set = None if sampled is None else {int(n) for n in sampled}
    for message in replies:
        label = _safe_label(message)
        try:
            src = int(message.metadata.src_node_id)
            answers = str(message.metadata.reply_to_message_id)
        except Exception as err:  # a reply whose metadata cannot even be read
            rejected.append(Rejection(0, f"unreadable reply metadata ({type(err).__name__})"))
            continue
        if not origins or answers in origins:
            # Replies to this round's messages count for their sender (a replay of an
            # old message, rejected below, does not: its sender cannot be told apart).
            senders[reply_sender(message, origins)] += 1
        if origins:
            node = origins.get(answers)
            if node is None:
                rejected.append(
                    Rejection(
                        src,
                        "reply does not answer a message sent in this round "
                        "(a replay, or a reply to another round or strategy)",
                        label,
                    )
                )
                continue
            # Only the addressee, or the SuperLink answering for a node that dropped out
            # (an error reply), may answer a message.
            if src != node and not (message.has_error() and src == SUPERLINK_NODE_ID):
                rejected.append(  # blamed on the sender: the addressee did nothing wrong
                    Rejection(src, f"reply to node {node}'s message was sent by node {src}", label)
                )
                continue
        else:
            node = src
            if sampled_set is not None and node not in sampled_set:
                rejected.append(Rejection(node, "node was not sampled in this round", label))
                continue
        bound.append((message, node))
    # One reply per node: a node that sent several (to its own message or to others')
    # has all of them rejected, whatever their order; a node can only ever harm its own
    # contribution this way.
    for message, node in bound:
        if senders[node] > 1:
            rejected.append(
                Rejection(
                    node,
                    f"{senders[node]} replies from this node in this round; all rejected "
                    "(one reply per node)",
                    _safe_label(message),
                )
            )
    return [(m, n) for m, n in bound if senders[n] == 1], rejected


def _safe_label(message: Message) -> str:
    try:
        return client_label(message)[:100]
    except Exception:
        return ""


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
    label = _safe_label(message)
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
    sampled: Collection[int] | None = None,
) -> tuple[list[CheckedReply], list[Rejection]]:
    """Split replies into accepted and rejected, never raising.

    Replies are first bound to this round's outgoing messages (:func:`bind_replies`:
    replays, unsampled senders and second replies are rejected), then each is
    checked (:func:`check_reply`). Anything unexpected while reading a reply is a
    rejection with the exception's type and a short message.
    """
    bound, rejected = bind_replies(replies, origins=origins, sampled=sampled)
    accepted: list[CheckedReply] = []
    for message, node_id in bound:
        try:
            result = check_reply(
                message,
                weighted_by_key=weighted_by_key,
                layout=layout,
                max_weight_value=max_weight_value,
                need_arrays=need_arrays,
                origins=origins,
            )
        except Exception as err:  # a malformed reply must never stop the round
            result = Rejection(
                node_id,
                f"malformed reply ({type(err).__name__}: {err})"[:300],
                _safe_label(message),
            )
        if isinstance(result, CheckedReply):
            result.node_id = node_id
            accepted.append(result)
        else:
            result.node_id = node_id
            rejected.append(result)
    return accepted, rejected


def finite_metrics(metrics: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """``metrics`` without the values that are not finite numbers, and their keys.

    A client's NaN, Inf or non-numeric metric is left out of the round's
    metrics (and reported), never averaged into them.
    """
    clean: dict[str, object] = {}
    dropped: list[str] = []
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        ok = all(_finite_number(v) for v in values)
        if ok:
            clean[key] = value
        else:
            dropped.append(key)
    return clean, dropped


def _finite_number(value: object) -> bool:
    """A real number that converts to a finite float (a 10**400 int does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
