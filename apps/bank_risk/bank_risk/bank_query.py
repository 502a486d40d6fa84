"""One QUERY round to the banks: the setup steps (feature moments, preprocessing statistics)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flower_ext.audit import AuditTrail
from flower_ext.validation import reply_sender


def query_banks(
    grid: Grid,
    nodes: list[int],
    query: str,
    audit: AuditTrail,
    timeout: float,
    *,
    arrays: ArrayRecord | None = None,
    extra: Mapping[str, int | float | str | bool] | None = None,
) -> tuple[list[Message], dict[str, int]]:
    """Send ``query`` to every node and wait; returns ``(replies, origins)``.

    ``arrays`` (a model) and ``extra`` config entries travel with the query when given.

    ``origins`` maps each sent message id to its node, so an error reply the
    SuperLink sends for a node that dropped out is attributed to that node. The
    config carries the server's audit key and signed head (the banks pin the key
    from the first message they receive, for their receipts).
    """
    config = {"query": query, **(extra or {}), **audit.published()}
    records: dict[str, ArrayRecord | ConfigRecord] = {} if arrays is None else {"arrays": arrays}
    messages = [
        Message(
            content=RecordDict({**records, "config": ConfigRecord(dict(config))}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    origins = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
    return replies, origins


def first_replies(replies: list[Message], origins: dict[str, int]) -> Iterator[tuple[int, Message]]:
    """``(node, reply)`` for each asked node's first reply, in arrival order: a reply from a
    node that was not asked, or a node's second answer, counts for nothing."""
    answered: set[int] = set()
    for reply in replies:
        node = reply_sender(reply, origins)
        if node not in origins.values() or node in answered:
            continue
        answered.add(node)
        yield node, reply
