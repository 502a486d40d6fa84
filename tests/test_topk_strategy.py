"""Top-k end to end at the Message level: the client mod and the server wrapper.

Messages are real Flower Messages (conftest builds them outside a runtime); the
mod runs the way ClientApp runs it, ``mod(msg, context, handler)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_of, reply
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum

from flower_ext.audit import AuditTrail
from flower_ext.compression import INDICES_KEY, RECORD_KEY, VALUES_KEY, raw_array, raw_view
from flower_ext.mods import TopKMod, topk_mod
from flower_ext.mods.topk import STATE_ARRAYS_KEY
from flower_ext.records import ArrayLayout, wire_size
from flower_ext.strategies import FedAvg, TopKCompression

RNG = np.random.default_rng(11)


def model(scale: float = 1.0, width: int = 50) -> dict[str, np.ndarray]:
    return {
        "fc.weight": (RNG.normal(size=(width, 20)) * scale).astype(np.float32),
        "fc.bias": (RNG.normal(size=width) * scale).astype(np.float32),
        "out.weight": (RNG.normal(size=(1, width)) * scale).astype(np.float32),
    }


def fedavg(**kwargs) -> FedAvg:
    """Our FedAvg, happy with a single node (the defaults wait for two)."""
    return FedAvg(**{"min_train_nodes": 1, "min_available_nodes": 1, **kwargs})


def context(node_id: int, run_config: dict | None = None) -> Context:
    return Context(
        run_id=4242,
        node_id=node_id,
        node_config={"partition-id": node_id},
        state=RecordDict(),
        run_config=run_config or {},
    )


def moved(arrays: ArrayRecord, delta: dict[str, np.ndarray]) -> ArrayRecord:
    return arrays_of({k: a.numpy() + delta[k] for k, a in arrays.items()})


def client_round(mod, msg: Message, ctx: Context, local: ArrayRecord, examples: int = 10):
    """Run ``mod`` around a handler that replies with ``local`` weights."""
    return mod(msg, ctx, lambda m, c: reply(m, local, {"num-examples": examples}, label="b"))


def start(strategy, arrays, nodes, server_round=1, config=None):
    messages = strategy.configure_train(
        server_round, arrays, config or ConfigRecord(), FakeGrid(nodes)
    )
    return {m.metadata.dst_node_id: m for m in messages}


def flat(arrays: ArrayRecord) -> np.ndarray:
    return ArrayLayout.of(arrays).flatten(arrays, dtype=np.float32)


# ------------------------------------------------------------------ client mod
def test_mod_sends_a_small_sparse_payload_and_keeps_the_residual(as_server):
    global_arrays = arrays_of(model(width=500))  # 10.5k parameters
    strategy = TopKCompression(fedavg(), ratio=0.05)
    msg = start(strategy, global_arrays, [5])[5]
    before = {k: bytes(a.data) for k, a in msg.content["arrays"].items()}
    ctx = context(5)
    delta = model(0.1, width=500)
    local = moved(global_arrays, delta)
    out = client_round(topk_mod, msg, ctx, local)

    assert {k: bytes(a.data) for k, a in msg.content["arrays"].items()} == before
    assert set(out.content["arrays"].keys()) == {INDICES_KEY, VALUES_KEY}
    marker = out.content[RECORD_KEY]
    dim = ArrayLayout.of(global_arrays).dim
    assert marker["dim"] == dim and marker["count"] == int(np.ceil(0.05 * dim))
    assert out.content["metrics"]["num-examples"] == 10  # metrics untouched
    dense_reply = reply(msg, local, {"num-examples": 10}, label="b")
    assert wire_size(out) < 0.25 * wire_size(dense_reply)
    # What was not sent is the residual, kept in context.state.
    residual = ctx.state[STATE_ARRAYS_KEY]["residual"].numpy()
    update = flat(local) - flat(global_arrays)
    assert np.count_nonzero(residual) == dim - marker["count"]
    np.testing.assert_allclose(
        np.abs(residual).max(), np.sort(np.abs(update))[-marker["count"] - 1]
    )


def test_mod_error_feedback_over_rounds(as_server):
    """sent + residual == update + old residual, through the mod, round after round."""
    arrays = arrays_of(model())
    strategy = TopKCompression(fedavg(), ratio=0.02, values="float16")
    ctx = context(6)
    old_residual = np.zeros(ArrayLayout.of(arrays).dim, dtype=np.float32)
    for server_round in (1, 2, 3):
        msg = start(strategy, arrays, [6], server_round)[6]
        local = moved(arrays, model(0.01))
        out = client_round(topk_mod, msg, ctx, local)
        update = flat(local) - flat(arrays)
        new_arrays, _ = strategy.aggregate_train(server_round, [out])
        sent = flat(new_arrays) - flat(arrays)  # a single client: the server applies `sent`
        residual = ctx.state[STATE_ARRAYS_KEY]["residual"].numpy()
        np.testing.assert_allclose(sent + residual, update + old_residual, atol=1e-6)
        old_residual, arrays = residual, new_arrays


def test_mod_settings_come_from_the_server_first(as_server):
    arrays = arrays_of(model())
    mod = TopKMod(ratio=0.5)
    server = TopKCompression(fedavg(), ratio=0.01)
    out = client_round(mod, start(server, arrays, [7])[7], context(7), arrays)
    dim = ArrayLayout.of(arrays).dim  # 1100
    assert out.content[RECORD_KEY]["count"] == int(np.ceil(0.01 * dim))
    # Without a server setting: the mod's own ratio, then the run config.
    plain = fedavg()
    out = client_round(mod, start(plain, arrays, [7])[7], context(7), arrays)
    assert out.content[RECORD_KEY]["count"] == dim // 2
    out = client_round(
        topk_mod, start(plain, arrays, [7])[7], context(7, {"topk-ratio": 0.1}), arrays
    )
    assert out.content[RECORD_KEY]["count"] == dim // 10
    # Off: ratio 0, or a message that is not TRAIN.
    out = client_round(topk_mod, start(plain, arrays, [7])[7], context(7), arrays)
    assert RECORD_KEY not in out.content
    evaluate = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"topk-ratio": 0.1})}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )
    out = client_round(topk_mod, evaluate, context(7), arrays)
    assert RECORD_KEY not in out.content
    with pytest.raises(ValueError, match="topk-values"):
        TopKMod(ratio=0.1, values="int3")


def test_residual_survives_a_client_restart_with_residual_dir(as_server, tmp_path):
    arrays = arrays_of(model())
    server = TopKCompression(fedavg(), ratio=0.05)
    mod = TopKMod(residual_dir=str(tmp_path))
    ctx = context(8)
    client_round(mod, start(server, arrays, [8])[8], ctx, moved(arrays, model(0.1)))
    kept = ctx.state[STATE_ARRAYS_KEY]["residual"].numpy()
    restarted = context(8)  # empty state, same run and node config
    restarted_mod = TopKMod(residual_dir=str(tmp_path))
    out = client_round(restarted_mod, start(server, arrays, [8], 2)[8], restarted, arrays)
    # A zero update: what goes out is the top of the residual left before the restart.
    new_arrays, _ = server.aggregate_train(2, [out])
    sent = flat(new_arrays) - flat(arrays)
    top = np.argsort(np.abs(kept))[-out.content[RECORD_KEY]["count"] :]
    np.testing.assert_allclose(sent[top], kept[top], rtol=1e-6)


# ------------------------------------------------------------------ server wrapper
def mixed_round(strategy_inner):
    """Two clients with the mod, one without; returns (wrapper, result, expected)."""
    global_arrays = arrays_of(model())
    strategy = TopKCompression(strategy_inner, ratio=1.0)  # lossless: compare exactly
    sent = start(strategy, global_arrays, [1, 2, 3])
    deltas = {n: model(0.1) for n in (1, 2, 3)}
    examples = {1: 10, 2: 30, 3: 60}
    replies = [
        client_round(topk_mod, sent[n], context(n), moved(global_arrays, deltas[n]), examples[n])
        for n in (1, 2)
    ]
    replies.append(
        reply(sent[3], moved(global_arrays, deltas[3]), {"num-examples": 60}, label="dense")
    )
    assert [RECORD_KEY in r.content for r in replies] == [True, True, False]
    result, _ = strategy.aggregate_train(1, replies)
    expected = {
        k: global_arrays[k].numpy() + sum(examples[n] * deltas[n][k] for n in deltas) / 100
        for k in global_arrays
    }
    return strategy, result, expected


@pytest.mark.parametrize("inner", [FedAvg, FlowerFedAvg], ids=["flower_ext", "flwr"])
def test_a_mixed_round_of_sparse_and_dense_replies(as_server, inner):
    strategy, result, expected = mixed_round(inner(min_train_nodes=3, min_available_nodes=3))
    for key, value in expected.items():
        np.testing.assert_allclose(result[key].numpy(), value, rtol=1e-5, atol=1e-6)
    report = strategy.compression_reports[1]
    assert report["sparse"] == 2 and report["dense"] == 1 and not report["rejected"]
    if isinstance(strategy.inner, FedAvg):
        assert strategy.round_reports[1].accepted == [1, 2, 3]  # forwarded attribute


def test_topk_around_krum(as_server):
    from flower_ext.strategies import Krum

    base = model()
    global_arrays = arrays_of(base)
    nodes = [1, 2, 3, 4, 5, 6]
    for inner in (Krum(num_malicious_nodes=1), FlowerKrum(num_malicious_nodes=1)):
        strategy = TopKCompression(inner, ratio=0.1)
        sent = start(strategy, global_arrays, nodes)
        replies = [
            client_round(topk_mod, sent[n], context(n), moved(global_arrays, model(0.01)))
            for n in nodes[:-1]
        ]
        attacker = moved(global_arrays, {k: np.full_like(v, 50.0) for k, v in base.items()})
        replies.append(client_round(topk_mod, sent[6], context(6), attacker))
        result, _ = strategy.aggregate_train(1, replies)
        shift = flat(result) - flat(global_arrays)
        assert np.abs(shift).max() < 1.0  # Krum picked an honest update, not the attacker


def _tamper(msg: Message, arrays: dict | None = None, marker: dict | None = None) -> Message:
    """A copy of a sparse reply with some arrays or marker fields replaced."""
    content = RecordDict()
    for key, record in msg.content.items():
        if key == "arrays" and arrays is not None:
            fields = {k: raw_view(a) for k, a in record.items()}
            fields.update(arrays)
            record = ArrayRecord({k: raw_array(v) for k, v in fields.items()})
        if key == RECORD_KEY and marker is not None:
            record = ConfigRecord({**dict(record), **marker})
        content[key] = record
    return Message(metadata=msg.metadata, content=content)


@pytest.mark.parametrize("inner", [FedAvg, FlowerFedAvg], ids=["flower_ext", "flwr"])
def test_malformed_sparse_payloads_are_rejected_not_fatal(as_server, inner):
    global_arrays = arrays_of(model())
    audit = AuditTrail()
    kwargs = {"audit": audit} if inner is FedAvg else {}
    strategy = TopKCompression(
        inner(min_train_nodes=8, min_available_nodes=8, **kwargs), ratio=0.05, audit=audit
    )
    nodes = list(range(1, 9))
    sent = start(strategy, global_arrays, nodes)
    good = {
        n: client_round(topk_mod, sent[n], context(n), moved(global_arrays, model(0.1)))
        for n in nodes
    }
    idx = raw_view(good[2].content["arrays"][INDICES_KEY])
    vals = raw_view(good[2].content["arrays"][VALUES_KEY])
    replies = [
        good[1],
        _tamper(good[2], {INDICES_KEY: np.append(idx[:-1], np.uint8(254)).astype(np.uint8)}),
        _tamper(good[3], {INDICES_KEY: np.concatenate([idx[:1], [0], idx[1:-1]]).astype(np.uint8)}),
        _tamper(good[4], {VALUES_KEY: vals[:-1]}),
        _tamper(good[5], {VALUES_KEY: vals.astype(np.float64)}),
        _tamper(good[6], {VALUES_KEY: np.where(np.arange(vals.size) == 3, np.nan, vals)}),
        _tamper(good[7], marker={"layout": "0" * 16}),
        _tamper(good[8], marker={"format": 99}),
    ]
    result, _ = strategy.aggregate_train(1, replies)
    rejected = strategy.compression_reports[1]["rejected"]
    assert sorted(rejected) == [2, 3, 4, 5, 6, 7, 8]
    assert "out of range" in rejected[2]
    assert "duplicate" in rejected[3]
    assert "length mismatch" in rejected[4]
    assert "float64" in rejected[5] or "float32" in rejected[5]
    assert "NaN" in rejected[6]
    assert "layout" in rejected[7]
    assert "format" in rejected[8]
    events = [e for e in audit.events if e["event"] == "topk_reply_rejected"]
    assert {e["node_id"] for e in events} == {2, 3, 4, 5, 6, 7, 8}
    # The round went on with the one good reply.
    alone = TopKCompression(fedavg(), ratio=0.05)
    start(alone, global_arrays, [1])
    expected, _ = alone.aggregate_train(1, [good[1]])
    np.testing.assert_allclose(flat(result), flat(expected), rtol=1e-6)
    if inner is FedAvg:
        report = strategy.round_reports[1]
        assert report.accepted == [1]
        assert "out of range" in report.rejected[2]


def test_sparse_keys_without_marker_are_rejected(as_server):
    global_arrays = arrays_of(model())
    strategy = TopKCompression(fedavg(), ratio=0.05)
    sent = start(strategy, global_arrays, [1, 2])
    ok = client_round(topk_mod, sent[1], context(1), global_arrays)
    sparse = client_round(topk_mod, sent[2], context(2), global_arrays)
    content = RecordDict({k: r for k, r in sparse.content.items() if k != RECORD_KEY})
    unmarked = Message(metadata=sparse.metadata, content=content)
    strategy.aggregate_train(1, [ok, unmarked])
    assert "record" in strategy.compression_reports[1]["rejected"][2]


def test_wrapper_injects_config_and_forwards_attributes(as_server):
    inner = fedavg()
    strategy = TopKCompression(inner, ratio=0.02, values="int8", scope="layer")
    msg = start(strategy, arrays_of(model()), [1])[1]
    config = msg.content["config"]
    assert config["topk-ratio"] == 0.02
    assert config["topk-values"] == "int8" and config["topk-scope"] == "layer"
    assert strategy.round_reports is inner.round_reports
    assert strategy.audit is inner.audit
    strategy.summary()
    with pytest.raises(ValueError, match="ratio"):
        TopKCompression(inner, ratio=1.5)
    with pytest.raises(AttributeError):
        _ = strategy.no_such_attribute


def test_bank_app_wraps_its_strategy_from_the_run_config():
    from bank_risk.settings import BankAppSettings, SettingsError
    from bank_risk.strategy_wrappers import wrap_strategy

    audit = AuditTrail()
    inner = fedavg(audit=audit)
    off = BankAppSettings.from_config({"topk-ratio": 0.0})
    assert wrap_strategy(inner, off, audit) is inner
    on = BankAppSettings.from_config({"topk-ratio": 0.01, "topk-values": "int8"})
    wrapped = wrap_strategy(inner, on, audit)
    assert isinstance(wrapped, TopKCompression)
    assert (wrapped.ratio, wrapped.values, wrapped.error_feedback) == (0.01, "int8", True)
    assert wrapped.evaluation_reports is inner.evaluation_reports
    with pytest.raises(SettingsError, match="topk-values"):
        wrap_strategy(
            inner, BankAppSettings.from_config({"topk-ratio": 0.1, "topk-values": "x"}), audit
        )
