"""The federated preprocessing of a ``csv-schema`` run (server side).

Before the standardisation query, the server asks every bank for its
preprocessing statistics (``query = "preprocessing-stats"``: per numeric column
observed/missing counts, a sum and, for ``robust`` columns, two local quantiles;
per one-hot categorical the value counts), combines them with
:func:`flower_ext.data.preprocessing.combine_stats` (medians over banks, capped
vocabularies; answers it cannot use are audited and left out) and sends the
resulting plan to the banks with every later message: :class:`PlanGrid` adds it
as ``config["preprocessing"]`` to each message the server sends, so a bank that
restarts mid-run gets it again with its next message, and a resumed run asks
again (the same files give the same plan). No row leaves a bank.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.audit import AuditTrail, short_reason
from flower_ext.data import DataError
from flower_ext.data.banks import schema_of
from flower_ext.data.preprocessing import combine_stats
from flower_ext.validation import client_label

from .bank_query import first_replies, query_banks
from .settings import BankAppSettings

#: Longest preprocessing-stats answer read (JSON text): 1000 values x 100 chars x columns.
MAX_STATS_CHARS = 8_000_000


class PlanGrid(Grid):
    """Forwards to ``inner``; adds the preprocessing plan to every outgoing message's config."""

    def __init__(self, inner: Grid, plan: str) -> None:
        self.inner = inner
        self.plan = plan

    def _with_plan(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            if msg.has_content() and "config" in msg.content.config_records:
                msg.content.config_records["config"]["preprocessing"] = self.plan
        return messages

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._with_plan(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(self._with_plan(messages), timeout=timeout)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)  # e.g. MeteredGrid's counters


def federated_preprocessing(
    grid: Grid,
    nodes: list[int],
    settings: BankAppSettings,
    audit: AuditTrail,
) -> str:
    """The preprocessing plan (JSON text) from the banks' statistics; "" without a schema.

    Raises ``RuntimeError`` naming each bank that could not contribute (its own
    one-line reason, e.g. the ``DataError`` naming its file, column and row) when
    fewer than ``min-banks`` (default: all) banks did.
    """
    schema = schema_of(settings.data.csv)
    if schema is None:
        return ""
    timeout = settings.round_timeout
    replies, origins = query_banks(grid, nodes, "preprocessing-stats", audit, timeout)
    parts: list[object] = []
    part_nodes: list[int] = []
    labels: dict[int, str] = {}
    problems: dict[int, str] = {}
    for node, reply in first_replies(replies, origins):
        label = short_reason(client_label(reply), 100)
        labels[node] = label
        if reply.has_error():
            reason = short_reason(f"{reply.error.reason}", 300)
            problems[node] = audit.record(
                "prep_stats_failed", node_id=node, label=label, reason=reason
            )["reason"]
            continue
        try:
            text = str(reply.content["preprocessing-stats"]["json"])  # type: ignore[index]
            if len(text) > MAX_STATS_CHARS:
                raise ValueError(f"answer over {MAX_STATS_CHARS} characters")
            parts.append(json.loads(text))
            part_nodes.append(node)
        except (KeyError, TypeError, ValueError) as err:
            problems[node] = audit.record(
                "prep_stats_rejected", node_id=node, label=label, reason=f"malformed: {err}"
            )["reason"]
    for node in nodes:
        if node not in labels:
            problems[node] = audit.record(
                "prep_stats_missing",
                node_id=node,
                label="",
                reason=f"no reply to the preprocessing query within {timeout:g}s",
            )["reason"]
    try:
        plan, rejected = combine_stats(parts, schema)
    except DataError as err:
        plan, rejected = None, {i: str(err) for i in range(len(parts))}
    for i, why in rejected.items():
        node = part_nodes[i]
        problems[node] = audit.record(
            "prep_stats_rejected", node_id=node, label=labels.get(node, ""), reason=why
        )["reason"]
    used = len(parts) - len(rejected)
    required = max(settings.required_banks, 1)
    if plan is None or used < required:
        detail = "; ".join(
            f"{labels.get(n) or f'node {n}'}: {short_reason(why, 200)}"
            for n, why in sorted(problems.items())
        )
        raise RuntimeError(
            f"only {used} of {len(nodes)} banks gave usable preprocessing statistics, "
            f"{required} needed: {detail}"
        )
    audit.record(
        "preprocessing",
        banks=used,
        schema_sha256=schema.digest,
        features=plan["features"],
        columns=plan["columns"],
        left_out=sorted(problems),
    )
    log(
        INFO,
        "[bank-risk] preprocessing agreed by %d bank(s): %d raw columns -> %d features",
        used,
        len(plan["columns"]),
        len(plan["features"]),
    )
    return json.dumps(plan, sort_keys=True)


def with_preprocessing(
    grid: Grid, nodes: list[int], settings: BankAppSettings, audit: AuditTrail
) -> Grid:
    """``grid`` itself without a schema; else a :class:`PlanGrid` carrying the agreed plan."""
    plan = federated_preprocessing(grid, nodes, settings, audit)
    return PlanGrid(grid, plan) if plan else grid
