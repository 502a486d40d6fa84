"""SecureFedAvg + secagg_mod with real Flower Messages (the protocol rounds run in memory)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.audit import AuditTrail
from flower_ext.mods import secagg_mod
from flower_ext.secagg.mod import RECORD_KEY
from flower_ext.strategies import FedAvg, Krum, SecureFedAvg
from tests.conftest import SERVER_NODE, _as_server, arrays_of, reply, sent

NODES = [101, 202, 303, 404]
COUNTS = {101: 100, 202: 300, 303: 50, 404: 250}


def _global():
    return arrays_of(
        {
            "w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6),
            "b": np.zeros(6, dtype=np.float32),
        }
    )


def _delta(node: int, key: str, shape) -> np.ndarray:
    rng = np.random.default_rng(node * 7 + len(key))
    return rng.normal(0, 0.05, shape).astype(np.float32)


class Federation:
    """Banks running ``secagg_mod`` around a toy train function, behind a Grid stand-in.

    ``drop`` maps a protocol stage to the nodes that vanish at it (no reply).
    """

    def __init__(self, nodes, drop=None, tamper=None):
        self.nodes = list(nodes)
        self.drop = drop or {}
        self.tamper = tamper or (lambda stage, node, out: out)
        self.contexts = {
            n: Context(run_id=4242, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in self.nodes
        }
        self.stages_seen: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def _train(self, msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        local = {
            k: a.numpy() + _delta(msg.metadata.dst_node_id, k, a.numpy().shape)
            for k, a in arrays.items()
        }
        return Message(
            content=RecordDict(
                {
                    "arrays": arrays_of(local),
                    "metrics": MetricRecord(
                        {"num-examples": COUNTS[msg.metadata.dst_node_id], "loss": 0.5}
                    ),
                }
            ),
            reply_to=msg,
        )

    def send_and_receive(self, messages, *, timeout=None):
        messages = sent(messages)
        replies = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            stage = msg.content.config_records[RECORD_KEY]["stage"]
            self.stages_seen.append(stage)
            if node in self.drop.get(stage, ()):
                continue
            TaskIdentity.node_id = node
            try:
                out = secagg_mod(msg, self.contexts[node], self._train)
                replies.append(self.tamper(stage, node, out))
            finally:
                _as_server()
        return replies

    def run_round(self, strategy, server_round=1, arrays=None):
        arrays = arrays if arrays is not None else _global()
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), self))
        return strategy.aggregate_train(server_round, self.send_and_receive(messages))


def _plain_mean(arrays: ArrayRecord, nodes):
    total = sum(COUNTS[n] for n in nodes)
    return {
        k: a.numpy() + sum(COUNTS[n] * _delta(n, k, a.numpy().shape) for n in nodes) / total
        for k, a in arrays.items()
    }


def _check_close(result: ArrayRecord, expected: dict, tol: float):
    for key, value in expected.items():
        got = result[key].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        assert np.max(np.abs(got - value)) <= tol, key


def test_securefedavg_equals_plaintext_fedavg(as_server):
    audit = AuditTrail()
    strategy = SecureFedAvg(threshold=3, audit=audit)
    fed = Federation(NODES)
    new, metrics = fed.run_round(strategy)
    assert new is not None
    assert set(fed.stages_seen) == {"train", "share-keys", "masked-input", "unmask"}
    tol = metrics["secagg-max-error"] + 1e-6  # + float32 rounding of the model
    _check_close(new, _plain_mean(_global(), NODES), tol)
    # The same replies in clear through flower-ext's FedAvg give the same model.
    plain = FedAvg()
    msgs = sent(plain.configure_train(1, _global(), ConfigRecord(), fed))
    plain_replies = [
        reply(m, arrays_of(_plain_local(m.metadata.dst_node_id)),
              {"num-examples": COUNTS[m.metadata.dst_node_id]})
        for m in msgs
    ]  # fmt: skip
    plain_new, _ = plain.aggregate_train(1, plain_replies)
    _check_close(new, {k: a.numpy() for k, a in plain_new.items()}, tol)
    assert metrics["secagg-survivors"] == 4 and metrics["secagg-dropped"] == 0
    assert metrics["loss"] == pytest.approx(0.5)
    events = [e["event"] for e in audit.events]
    assert events.count("secagg_step") == 5 and "round_aggregated" in events


def _plain_local(node):
    return {k: a.numpy() + _delta(node, k, a.numpy().shape) for k, a in _global().items()}


def test_the_server_never_receives_an_update_in_clear(as_server):
    strategy = SecureFedAvg(threshold=3)
    fed = Federation(NODES)
    seen = []
    original = fed.send_and_receive

    def spy(messages, *, timeout=None):
        replies = original(messages, timeout=timeout)
        seen.extend(replies)
        return replies

    fed.send_and_receive = spy
    fed.run_round(strategy)
    for msg in seen:
        for key, record in msg.content.array_records.items():
            assert key == "secagg.masked"
            assert record["masked"].numpy().dtype == np.uint32


def test_dropout_after_masked_update_is_recovered_and_audited(as_server):
    audit = AuditTrail()
    strategy = SecureFedAvg(threshold=3, audit=audit)
    # 303 vanishes after sharing keys (before masking); with t=3 of 4 (2t > n) one
    # drop-out is all a round survives.
    fed = Federation(NODES, drop={"masked-input": [303]})
    new, metrics = fed.run_round(strategy)
    survivors = [101, 202, 404]
    _check_close(new, _plain_mean(_global(), survivors), metrics["secagg-max-error"] + 1e-6)
    assert metrics["secagg-survivors"] == 3 and metrics["secagg-dropped"] == 1
    recovered = [e for e in audit.events if e["event"] == "secagg_recovered"]
    assert recovered and recovered[0]["dropped"] == [303]
    dropouts = {(e["stage"], e["node_id"]) for e in audit.events if e["event"] == "secagg_dropout"}
    assert dropouts == {("masked-input", 303)}
    # accepted: the banks whose updates are in the sum (404 masked, then left: still in it)
    assert strategy.round_reports[1].accepted == survivors


def test_too_many_dropouts_skip_the_round_with_the_reason(as_server):
    audit = AuditTrail()
    strategy = SecureFedAvg(threshold=3, audit=audit)
    fed = Federation(NODES, drop={"masked-input": [202, 303]})
    new, metrics = fed.run_round(strategy)
    assert new is None and metrics["secagg-failed"] == 1
    failed = [e for e in audit.events if e["event"] == "secagg_failed"]
    assert "fewer than the threshold t=3" in failed[0]["reason"]
    assert any(e["event"] == "round_skipped" for e in audit.events)


def test_train_dropout_before_keys_is_just_missing(as_server):
    strategy = SecureFedAvg(threshold=0.6)
    fed = Federation(NODES, drop={"train": [404]})
    new, metrics = fed.run_round(strategy)
    _check_close(new, _plain_mean(_global(), [101, 202, 303]), metrics["secagg-max-error"] + 1e-6)
    assert strategy.round_reports[1].missing == [404]


def test_two_rounds_and_momentum(as_server):
    strategy = SecureFedAvg(threshold=3, server_momentum=0.5)
    fed = Federation(NODES)
    first, _ = fed.run_round(strategy, 1)
    second, metrics = fed.run_round(strategy, 2, first)
    assert second is not None and metrics["secagg-survivors"] == 4


def test_bank_refuses_out_of_order_steps(as_server):
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    TaskIdentity.node_id = SERVER_NODE
    msg = Message(
        content=RecordDict({RECORD_KEY: ConfigRecord({"stage": "unmask", "round": 1})}),
        message_type="train",
        dst_node_id=7,
    )
    msg = sent([msg])[0]
    TaskIdentity.node_id = 7
    out = secagg_mod(msg, context, lambda m, c: pytest.fail("must not train"))
    _as_server()
    assert out.has_error() and "no secure-aggregation round" in out.error.reason


def test_plain_messages_pass_through(as_server):
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    msg = sent([Message(content=RecordDict(), message_type="evaluate", dst_node_id=7)])[0]
    marker = Message(Error(code=0, reason="x"), reply_to=msg)
    assert secagg_mod(msg, context, lambda m, c: marker) is marker


def test_composition_refusals():
    with pytest.raises(ValueError, match="robust rule"):
        SecureFedAvg(compose_with=[Krum(num_malicious_nodes=1)])
    with pytest.raises(ValueError, match="top-k"):
        SecureFedAvg(compose_with=["topk_mod"])
    with pytest.raises(ValueError, match="unnecessary"):
        SecureFedAvg(compose_with=["he_mod"])
    with pytest.raises(ValueError, match="cannot cap weights"):
        SecureFedAvg(max_weight=10)
    with pytest.raises(ValueError, match="threshold"):
        SecureFedAvg(threshold=0.4)
    strategy = SecureFedAvg(threshold=5)
    with pytest.raises(ValueError, match="exceeds the 4 banks"):
        strategy.configure_train(1, _global(), ConfigRecord(), Federation(NODES))
    with pytest.raises(ValueError, match="top-k"):
        SecureFedAvg().configure_train(
            1, _global(), ConfigRecord({"topk-ratio": 0.1}), Federation(NODES)
        )


def test_clipping_is_counted_and_reported(as_server):
    # c = 1e-3 is far below the updates (std 0.05): most coordinates get clipped.
    strategy = SecureFedAvg(threshold=3, clipping_range=1e-3)
    _, metrics = Federation(NODES).run_round(strategy)
    assert metrics["secagg-clipped"] > 0
    _, metrics = Federation(NODES).run_round(SecureFedAvg(threshold=3))
    assert metrics["secagg-clipped"] == 0


def test_a_bank_that_skips_a_share_is_dropped_and_the_round_goes_on(as_server):
    def tamper(stage, node, out):
        if stage == "share-keys" and node == 202:
            rec = out.content[RECORD_KEY]
            rec["dst"], rec["ct"] = rec["dst"][:1], rec["ct"][:1]
        return out

    audit = AuditTrail()
    fed = Federation(NODES, tamper=tamper)
    new, metrics = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    survivors = [101, 303, 404]
    _check_close(new, _plain_mean(_global(), survivors), metrics["secagg-max-error"] + 1e-6)
    reasons = [e["reason"] for e in audit.events if e["event"] == "secagg_dropout"]
    assert any("every other bank" in r for r in reasons)
