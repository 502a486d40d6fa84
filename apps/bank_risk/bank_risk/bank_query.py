"""One QUERY round to the banks: the setup steps (feature moments, preprocessing statistics)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flower_ext.audit import AuditTrail


def query_banks(
    grid: Grid, nodes: list[int], query: str, audit: AuditTrail, timeout: float
) -> tuple[list[Message], dict[str, int]]:
    """Send ``query`` to every node and wait; returns ``(replies, origins)``.

    ``origins`` maps each sent message id to its node, so an error reply the
    SuperLink sends for a node that dropped out is attributed to that node. The
    config carries the server's audit key and signed head (the banks pin the key
    from the first message they receive, for their receipts).
    """
    messages = [
        Message(
            content=RecordDict({"config": ConfigRecord({"query": query, **audit.published()})}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    origins = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
    return replies, origins
