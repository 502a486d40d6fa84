"""Faults without a runtime: the fault-injection switch, and a partial standardisation query."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import outgoing, sent
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from bank_risk.client_app import app as client_app
from bank_risk.client_mods import InjectedFault, bank_fault_mod
from bank_risk.server_app import federated_standardisation
from bank_risk.settings import BankAppSettings, FaultInjection, SettingsError
from flower_ext.audit import AuditTrail
from flower_ext.model import build_model

BASE = {"num-banks": 3, "rows-per-bank": 200, "model": "logreg", "num-server-rounds": 2}


def _context(partition: int, **run_config) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={**BASE, **run_config},
    )


def _train_message(node: int, kind: str = MessageType.TRAIN) -> Message:
    from flower_ext.data.synthetic import FEATURES

    msg = outgoing(ArrayRecord(build_model(len(FEATURES), "logreg").state_dict()), node, kind)
    msg.content["config"] = ConfigRecord({"server-round": 1, "num-server-rounds": 2})
    return msg


def test_fault_injection_is_off_by_default_and_parsed():
    assert FaultInjection.from_config({}) is None
    assert FaultInjection.from_config({"fault-banks": "", "fault-kind": "none"}) is None
    fault = FaultInjection.from_config({**BASE, "fault-banks": "0, 2", "fault-kind": "raise"})
    assert fault == FaultInjection(frozenset({0, 2}), "raise", 0.0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"fault-banks": "1", "fault-kind": "explode"}, "fault-kind must be one of"),
        ({"fault-banks": "1"}, "needs both fault-banks"),
        ({"fault-kind": "raise"}, "needs both fault-banks"),
        ({"fault-banks": "one", "fault-kind": "raise"}, "comma-separated bank indices"),
        ({"fault-banks": "3", "fault-kind": "nan"}, "bank index 3 is outside 0..2"),
        ({"fault-banks": "1", "fault-kind": "sleep"}, "needs fault-sleep > 0"),
        ({"fault-banks": "1", "fault-kind": "sleep", "fault-sleep": "soon"}, "fault-sleep"),
    ],
)
def test_bad_fault_settings_are_refused_by_the_server_settings(config, message):
    with pytest.raises(SettingsError, match=message):
        BankAppSettings.from_config({**BASE, **config})


def test_raise_fault_only_in_the_listed_bank_and_only_in_train(as_server):
    ctx = _context(1, **{"fault-banks": "1", "fault-kind": "raise"})
    with pytest.raises(InjectedFault, match="bank 1, round 1"):
        bank_fault_mod(_train_message(101), ctx, lambda m, c: pytest.fail("handler ran"))
    other = _context(0, **{"fault-banks": "1", "fault-kind": "raise"})
    reply = client_app(_train_message(100), other)
    assert not reply.has_error() and "arrays" in reply.content
    evaluated = client_app(_train_message(101, MessageType.EVALUATE), ctx)
    assert not evaluated.has_error() and "metrics" in evaluated.content


def test_nan_fault_keeps_the_layout_and_makes_every_weight_nan(as_server):
    ctx = _context(2, **{"fault-banks": "2", "fault-kind": "nan"})
    msg = _train_message(102)
    reply = client_app(msg, ctx)
    arrays = reply.content["arrays"]
    sent_arrays = msg.content["arrays"]
    assert list(arrays.keys()) == list(sent_arrays.keys())
    for key in arrays:
        values = arrays[key].numpy()
        assert values.shape == sent_arrays[key].numpy().shape
        if np.issubdtype(values.dtype, np.floating):
            assert np.isnan(values).all(), key
    assert reply.content["client-info"]["bank"]  # the label still travels


class _QueryGrid:
    """Answers a feature-statistics query: node -> "ok", "error", "bad" or "silent"."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour

    def send_and_receive(self, messages, timeout):
        replies = []
        for msg in sent(messages):
            node = int(msg.metadata.dst_node_id)
            kind = self.behaviour[node]
            if kind == "silent":
                continue
            TaskIdentity.node_id = node
            if kind == "error":
                replies.append(
                    Message(
                        Error(code=0, reason="\x1b[31mboom\x1b[0m\n" + "x" * 3000), reply_to=msg
                    )
                )
                continue
            count = 10 if kind == "ok" else -1
            content = RecordDict(
                {
                    "moments": MetricRecord(
                        {"num-examples": count, "sum": [10.0, 20.0], "sum-sq": [20.0, 50.0]}
                    ),
                    "features": ConfigRecord({"names": ["a", "b"]}),
                    "client-info": ConfigRecord({"bank": f"bank-{node}\x1b[0m"}),
                }
            )
            replies.append(Message(content=content, reply_to=msg))
        TaskIdentity.node_id = 1
        return replies


def test_standardisation_audits_each_bank_that_did_not_answer(as_server, tmp_path):
    audit = AuditTrail(tmp_path / "audit.jsonl")
    grid = _QueryGrid({11: "ok", 12: "error", 13: "silent", 14: "ok", 15: "bad"})
    stats = federated_standardisation(grid, [11, 12, 13, 14, 15], 3.0, audit, required=2)
    np.testing.assert_allclose(stats.mean, [1.0, 2.0])
    assert stats.features == ["a", "b"]
    assert stats.labels == {11: "bank-11", 14: "bank-14", 15: "bank-15"}
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").open()]
    by_node = {e.get("node_id"): e for e in events if e["event"].startswith("stats_")}
    assert by_node[12]["event"] == "stats_failed" and "boom" in by_node[12]["reason"]
    assert len(by_node[12]["reason"]) <= 300 and "\x1b" not in by_node[12]["reason"]
    assert by_node[13]["event"] == "stats_missing" and "within 3s" in by_node[13]["reason"]
    assert by_node[15]["event"] == "stats_rejected" and "positive integer" in by_node[15]["reason"]
    assert by_node[15]["label"] == "bank-15"
    assert events[-1]["event"] == "standardisation" and events[-1]["missing"] == [12, 13, 15]


def test_standardisation_stops_naming_the_missing_banks_when_too_few_answer(as_server):
    audit = AuditTrail()
    grid = _QueryGrid({21: "ok", 22: "silent", 23: "error"})
    with pytest.raises(RuntimeError, match=r"only 1 of 3 banks.*2 needed.*node 22.*node 23"):
        federated_standardisation(grid, [21, 22, 23], 5.0, audit, required=2)
    assert {e["event"] for e in audit.events} == {"stats_missing", "stats_failed"}
    with pytest.raises(RuntimeError, match="3 needed"):  # default: every bank
        federated_standardisation(
            _QueryGrid({31: "ok", 32: "ok", 33: "silent"}), [31, 32, 33], 1, audit
        )
