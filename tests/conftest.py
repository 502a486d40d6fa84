"""Shared test helpers: build real Flower Messages outside the runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.records import as_c_array

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "bank_risk"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

SERVER_NODE = 1


def _as_server() -> None:
    # Messages built outside a Flower runtime need a task identity.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 4242
    TaskIdentity.node_id = SERVER_NODE


def arrays_of(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(as_c_array(v)) for k, v in values.items()})


def outgoing(arrays: ArrayRecord, node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    _as_server()
    return Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        message_type=message_type,
        dst_node_id=node_id,
    )


#: What a finished run's audit trail may hold after its ``run_end``: signatures only.
AFTER_RUN_END = {"head_signed", "report_written"}


def assert_trail_finished(events: list[dict]) -> None:
    """The trail holds ``run_end``, and after it only the server's closing signatures."""
    kinds = [e["event"] for e in events]
    assert "run_end" in kinds, kinds[-5:]
    assert set(kinds[kinds.index("run_end") + 1 :]) <= AFTER_RUN_END, kinds[-5:]


def sent(messages):
    """Give outgoing messages the ids a Grid gives them when it sends them (their object id).

    Replies built afterwards answer these ids, so strategies can bind replies to the
    round's messages as they do in the real runtime.
    """
    messages = list(messages)
    for message in messages:
        message.metadata.__dict__["_message_id"] = message.object_id
    return messages


def reply(
    to: Message,
    arrays: ArrayRecord | None = None,
    metrics: dict | None = None,
    *,
    label: str = "",
    error: str = "",
) -> Message:
    """A client's reply to ``to`` (as if node ``to.dst_node_id`` sent it)."""
    _as_server()
    TaskIdentity.node_id = to.metadata.dst_node_id
    try:
        if error:
            return Message(Error(code=1, reason=error), reply_to=to)
        content = RecordDict()
        if arrays is not None:
            content["arrays"] = arrays
        content["metrics"] = MetricRecord(metrics if metrics is not None else {"num-examples": 10})
        if label:
            content["client-info"] = ConfigRecord({"bank": label})
        return Message(content=content, reply_to=to)
    finally:
        _as_server()


class FakeGrid:
    """Just enough Grid for a strategy's configure_* calls (node sampling)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


@pytest.fixture
def as_server():
    _as_server()
    yield
    _as_server()


@pytest.fixture(scope="session")
def simulated_run(tmp_path_factory) -> Path:
    """One short real bank-app run on Flower's Ray simulation, shared by the tests that read it."""
    from bank_risk.simulate import run_bank_simulation

    output = tmp_path_factory.mktemp("runs")
    return run_bank_simulation(
        {
            "num-server-rounds": 4,
            "num-banks": 4,
            "rows-per-bank": 1500,
            "output-dir": str(output),
            "run-name": "sim",
        }
    )
