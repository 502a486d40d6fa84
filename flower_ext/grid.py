"""A Grid wrapper that measures what crosses the network.

``MeteredGrid(grid)`` forwards everything to the Grid the runtime gave the
ServerApp and adds up the serialised size (:func:`flower_ext.records.wire_size`)
of every message sent and every reply received, per message type. Wrapping the
Grid rather than a Strategy means byte accounting works with any strategy,
Flower's own included, and costs the aggregation path nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from .records import wire_size


class MeteredGrid(Grid):
    """Counts bytes down (server to nodes) and up (nodes to server) by message type."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.bytes_down: dict[str, int] = defaultdict(int)
        self.bytes_up: dict[str, int] = defaultdict(int)
        self.reply_bytes: dict[int, int] = {}  # src node -> size of its last reply

    # Measurement --------------------------------------------------------------
    def reset(self) -> None:
        self.bytes_down.clear()
        self.bytes_up.clear()
        self.reply_bytes.clear()

    def _measure_out(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        sizes: dict[int, int] = {}  # messages sharing one content are measured once
        for msg in messages:
            key = id(msg.content) if msg.has_content() else id(msg)
            if key not in sizes:
                sizes[key] = wire_size(msg)
            self.bytes_down[msg.metadata.message_type] += sizes[key]
        return messages

    def _measure_in(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            size = wire_size(msg)
            self.bytes_up[msg.metadata.message_type] += size
            self.reply_bytes[int(msg.metadata.src_node_id)] = size
        return replies

    # Grid interface -----------------------------------------------------------
    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._measure_out(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._measure_in(self.inner.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._measure_in(
            self.inner.send_and_receive(self._measure_out(messages), timeout=timeout)
        )
