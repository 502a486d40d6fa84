"""Top-k on every model Flower's FedAvg accepts, over several rounds.

Each test runs ``topk_mod`` on the client side and ``TopKCompression`` around Flower's
FedAvg and flower-ext's FedAvg on the server side for three rounds, and checks that:
every reply goes out sparse in every round (the round-2 fallback to dense of issue 12 item
7 cannot hide); the model that comes back has the global model's keys, shapes and dtypes;
its values are Flower's FedAvg over the same (densified) replies within the dtype's precision.
"""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest
from conftest import FakeGrid, arrays_of, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flower_ext.audit import AuditTrail
from flower_ext.compression import (
    DENSE_RECORD_KEY,
    RECORD_KEY,
    GlobalModel,
    ModelFormatError,
    payload_from_records,
)
from flower_ext.mods import TopKMod, topk_mod
from flower_ext.strategies import FedAvg, TopKCompression

NODES = (1, 2, 3)
EXAMPLES = {1: 10, 2: 30, 3: 60}
ROUNDS = 3


def record(values: dict[str, np.ndarray]) -> ArrayRecord:
    """Arrays as given (Fortran order kept, unlike conftest's arrays_of)."""
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def models() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    f32 = np.float32
    many = {f"layer{i}.w": rng.normal(size=(3, 4)).astype(f32) for i in range(150)}
    return {
        "batchnorm": {
            "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(f32),
            "bn.weight": np.ones(4, f32),
            "bn.running_mean": rng.normal(size=4).astype(f32),
            "bn.num_batches_tracked": np.array(100000002, dtype=np.int64),  # 0-d
        },
        "sklearn": {  # saga's coef_ is Fortran-ordered
            "coef": np.asfortranarray(rng.normal(size=(3, 7))),
            "intercept": rng.normal(size=3),
            "precise": np.array([1000.123456789]),
        },
        "int_and_bool": {
            "w": rng.normal(size=20).astype(f32),
            "counts": np.arange(6, dtype=np.int32).reshape(2, 3),
            "steps": np.array([7, 9], dtype=np.uint8),
            "mask": np.array([True, False, True, False]),
        },
        "float16": {"w": rng.normal(size=(5, 6)).astype(np.float16), "b": np.zeros(6, np.float16)},
        "zero_size": {
            "empty2d": np.zeros((0, 3), f32),
            "w": rng.normal(size=12).astype(f32),
            "empty1d": np.zeros((0,), np.float64),
        },
        "many_arrays": many,
    }


def delta(value: np.ndarray, node: int, server_round: int) -> np.ndarray:
    """A client's change to one array, in the array's own kind."""
    rng = np.random.default_rng(1000 * server_round + node)
    if value.dtype.kind == "b":
        return rng.random(value.shape) < 0.3  # flip some
    if value.dtype.kind in "iu":
        return np.full(value.shape, node, dtype=value.dtype)  # counters move by whole steps
    scale = 1e-6 if value.dtype == np.float64 and value.size == 1 else 0.05
    return (rng.normal(size=value.shape) * scale).astype(value.dtype)


def local_model(global_arrays: ArrayRecord, node: int, server_round: int) -> ArrayRecord:
    out = {}
    for key, array in global_arrays.items():
        value = array.numpy()
        step = delta(value, node, server_round)
        out[key] = np.asarray(value ^ step if value.dtype.kind == "b" else value + step)
        if np.isfortran(value) and value.ndim > 1:
            out[key] = np.asfortranarray(out[key])  # what the client's library returns
    return record(out)


def context(node: int, **run_config) -> Context:
    return Context(
        run_id=77,
        node_id=node,
        node_config={"partition-id": node},
        state=RecordDict(),
        run_config=run_config,
    )


def send(strategy, server_round: int, arrays: ArrayRecord, nodes=NODES) -> dict[int, Message]:
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(nodes)))
    for msg in messages:  # the Grid gives outgoing messages their ids when it sends them
        msg.metadata.__dict__["_message_id"] = msg.object_id
    return {int(m.metadata.dst_node_id): m for m in messages}


def densified(sent: ArrayRecord, sparse: Message) -> ArrayRecord:
    """The dense model a sparse reply stands for, rebuilt here with plain NumPy."""
    arrays = next(iter(sparse.content.array_records.values()))
    payload, _ = payload_from_records(arrays, sparse.content[RECORD_KEY])
    indices, values = payload.decode()
    update = np.zeros(payload.dim)
    update[indices] = values
    out, offset = {}, 0
    for key, array in sent.items():
        base = array.numpy()
        chunk = update[offset : offset + base.size].reshape(base.shape)
        offset += base.size
        new = base.astype(np.float64) + chunk
        if base.dtype.kind == "b":
            new = np.clip(np.rint(new), 0, 1)
        elif base.dtype.kind in "iu":
            new = np.rint(new)
        out[key] = Array(np.array(new.astype(base.dtype), order="C"))
    return ArrayRecord(out)


def flower_fedavg(replies: list[Message]) -> ArrayRecord:
    """Flower's own FedAvg over dense replies: the reference."""
    result, _ = FlowerFedAvg(min_train_nodes=1, min_available_nodes=1).aggregate_train(1, replies)
    return result


def assert_like(
    result: ArrayRecord, reference: ArrayRecord, model: dict, float32_wire: bool = False
) -> None:
    """Same keys, shapes and dtypes as ``model``; values as ``reference`` within the dtype's
    precision. ``float32_wire``: the reference did not go through top-k, whose values
    travel as float32, so a float64 update is exact to float32 precision of the update."""
    assert list(result.keys()) == list(model)
    for key, value in model.items():
        got = result[key].numpy()
        assert got.shape == value.shape, key
        assert got.dtype == value.dtype, key
        want = reference[key].numpy()
        if value.dtype.kind in "biu":
            np.testing.assert_array_equal(got, np.rint(want).astype(value.dtype), err_msg=key)
            continue
        rtol = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-6}.get(value.dtype, 1e-12)
        atol = 1e-8 if float32_wire else rtol * 1e-3  # updates here are below 0.2
        if value.dtype == np.float16:  # Flower sums in float16, we in float32: a few ulps
            atol = 2e-3 * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=key)


INNERS = {
    "flwr": lambda: FlowerFedAvg(min_train_nodes=3, min_available_nodes=3),
    "flower_ext": lambda: FedAvg(min_train_nodes=3, min_available_nodes=3),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("name", sorted(models()))
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_every_flower_model_over_three_rounds(as_server, name, inner, ratio):
    model = models()[name]
    strategy = TopKCompression(INNERS[inner](), ratio=ratio)
    global_arrays = record(model)
    contexts = {n: context(n) for n in NODES}
    for server_round in range(1, ROUNDS + 1):
        sent = send(strategy, server_round, global_arrays)
        locals_ = {n: local_model(global_arrays, n, server_round) for n in NODES}
        replies = [
            topk_mod(
                sent[n],
                contexts[n],
                lambda m, c, lo=locals_[n], n=n: reply(m, lo, {"num-examples": EXAMPLES[n]}),
            )
            for n in NODES
        ]
        assert all(RECORD_KEY in r.content for r in replies), f"round {server_round}: dense"
        result, _ = strategy.aggregate_train(server_round, replies)
        report = strategy.compression_reports[server_round]
        assert report["sparse"] == 3 and not report["rejected"] and not report["dense_reasons"]
        # The reference: Flower's FedAvg over the replies the server decoded.
        dense = [
            reply(sent[n], densified(global_arrays, r), {"num-examples": EXAMPLES[n]})
            for n, r in zip(NODES, replies, strict=True)
        ]
        assert_like(result, flower_fedavg(dense), model)
        if ratio == 1.0:  # lossless: Flower's FedAvg over the clients' own models
            raw = [reply(sent[n], locals_[n], {"num-examples": EXAMPLES[n]}) for n in NODES]
            assert_like(result, flower_fedavg(raw), model, float32_wire=True)
        global_arrays = result


def test_precision_of_float64_weights_and_int64_counters(as_server):
    """Issue 12 item 3's example: nothing rounded to float32 on the way."""
    model = {"w": np.array([1000.123456789]), "n": np.array([100000002], dtype=np.int64)}
    strategy = TopKCompression(FlowerFedAvg(min_train_nodes=2, min_available_nodes=2), ratio=1.0)
    global_arrays = record(model)
    sent = send(strategy, 1, global_arrays, nodes=(1, 2))
    local = record({"w": model["w"] + 1e-6, "n": model["n"]})
    replies = [
        topk_mod(sent[n], context(n), lambda m, c: reply(m, local, {"num-examples": 5}))
        for n in (1, 2)
    ]
    result, _ = strategy.aggregate_train(1, replies)
    assert abs(result["w"].numpy()[0] - 1000.123457789) < 1e-11
    assert result["n"].numpy()[0] == 100000002 and result["n"].dtype == "int64"


def test_flower_fedavg_float64_buffer_does_not_turn_topk_off(as_server):
    """Issue 12 item 7, both sides: the wrapper casts Flower's float64 back to int64, and the
    mod compresses even when the model received and the reply differ in dtype."""
    model = {"w": np.zeros(10, np.float32), "num_batches_tracked": np.array(5, np.int64)}
    inner = FlowerFedAvg(min_train_nodes=2, min_available_nodes=2)
    strategy = TopKCompression(inner, ratio=0.5)
    global_arrays = record(model)
    for server_round in (1, 2, 3):
        sent = send(strategy, server_round, global_arrays, nodes=(1, 2))
        replies = []
        for n in (1, 2):
            local = record(
                {
                    "w": np.full(10, float(n), np.float32),
                    "num_batches_tracked": np.array(5 + 10 * server_round, np.int64),
                }
            )
            replies.append(topk_mod(sent[n], context(n), lambda m, c, lo=local: reply(m, lo)))
        assert all(RECORD_KEY in r.content for r in replies)
        global_arrays, _ = strategy.aggregate_train(server_round, replies)
        assert global_arrays["num_batches_tracked"].dtype == "int64"
        assert global_arrays["num_batches_tracked"].shape == ()
    # The client side alone: a model received as float64 (an app whose server strategy
    # returned float64) and a reply in int64 still go out sparse.
    received = record({"w": np.zeros(10, np.float32), "nbt": np.array(5.0)})
    plain = TopKCompression(FedAvg(min_train_nodes=1, min_available_nodes=1), ratio=0.5)
    msg = send(plain, 1, received, nodes=(4,))[4]
    local = record({"w": np.ones(10, np.float32), "nbt": np.array(15, np.int64)})
    out = topk_mod(msg, context(4), lambda m, c: reply(m, local))
    assert RECORD_KEY in out.content and DENSE_RECORD_KEY not in out.content
    result, _ = plain.aggregate_train(1, [out])
    assert result["nbt"].dtype == "float64" and result["nbt"].numpy() in (5.0, 15.0)


def test_a_reply_that_must_go_dense_says_so_and_is_audited(as_server, caplog):
    model = {"w": np.zeros(4)}
    audit = AuditTrail()
    strategy = TopKCompression(
        FlowerFedAvg(min_train_nodes=2, min_available_nodes=2), ratio=0.5, audit=audit
    )
    sent = send(strategy, 1, record(model), nodes=(1, 2))
    huge = record({"w": np.array([1e39, 0.0, 0.0, 0.0])})  # finite in float64, not in float32
    with caplog.at_level(logging.WARNING):
        out = topk_mod(sent[1], context(1), lambda m, c: reply(m, huge, label="north"))
    assert RECORD_KEY not in out.content
    assert "float32" in out.content[DENSE_RECORD_KEY]["reason"]
    assert any("dense" in r.getMessage() for r in caplog.records)
    # A client without the mod: dense without a reason.
    plain = reply(sent[2], record({"w": np.ones(4)}), label="south")
    result, _ = strategy.aggregate_train(1, [out, plain])
    reasons = strategy.compression_reports[1]["dense_reasons"]
    assert "float32" in reasons[1] and "no reason" in reasons[2]
    events = [e for e in audit.events if e["event"] == "topk_dense_reply"]
    assert [(e["node_id"], e["label"]) for e in events] == [(1, "north"), (2, "south")]
    assert result["w"].numpy()[0] == pytest.approx(0.5e39 + 0.5)


def test_mod_rejects_bad_settings_by_name(as_server):
    mod = TopKMod()
    msg = Message(
        RecordDict({"arrays": arrays_of({"w": np.zeros(3, np.float32)})}),
        dst_node_id=1,
        message_type="train",
    )
    for bad in ("abc", [0.1], True):
        ctx = context(1, **{"topk-ratio": bad})
        with pytest.raises(ValueError, match="topk-ratio"):
            mod(msg, ctx, lambda m, c: m)
    assert mod.settings(msg, context(1, **{"topk-ratio": "0.25"})).ratio == 0.25


def test_global_model_refuses_what_it_cannot_carry():
    with pytest.raises(ModelFormatError, match="complex"):
        GlobalModel(record({"z": np.zeros(2, np.complex64)}))
    model = GlobalModel(record({"a": np.zeros((2, 3)), "b": np.zeros(())}))
    assert model.dim == 7 and model.shapes == ((2, 3), ())
    assert "shape" in model.mismatch(record({"a": np.zeros((3, 2)), "b": np.zeros(())}))
    assert "keys" in model.mismatch(record({"a": np.zeros((2, 3))}))
    assert (
        model.mismatch(record({"a": np.zeros((2, 3), np.float32), "b": np.zeros((), int)})) is None
    )


def test_int_and_bool_arrays_saturate_instead_of_wrapping():
    model = GlobalModel(
        record({"u": np.array([250], np.uint8), "b": np.array([True]), "i": np.array([-5])})
    )
    out = model.apply(np.array([100.0, 3.0, -1e30], np.float32))
    assert out["u"].numpy()[0] == 255 and out["b"].numpy()[0]
    assert out["i"].numpy()[0] == np.iinfo(np.int64).min
    big = GlobalModel(record({"n": np.array([2**60 + 1, 5], np.int64)}))
    out = big.apply_sparse(np.array([1]), np.array([2.0], np.float32))
    assert out["n"].numpy().tolist() == [2**60 + 1, 7]  # an untouched entry stays exact
    cast, notes = model.cast(
        record({"u": np.array([3.5]), "b": np.array([0.7]), "i": np.array([np.nan])})
    )
    assert cast["u"].numpy().tolist() == [4] and cast["u"].dtype == "uint8"
    assert cast["b"].numpy().tolist() == [True]
    assert cast["i"].dtype == "float64" and "NaN" in notes[0]  # kept, and said so


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_residual_file_is_owner_only(as_server, tmp_path):
    arrays = record({"w": np.zeros(50, np.float32)})
    strategy = TopKCompression(FedAvg(min_train_nodes=1, min_available_nodes=1), ratio=0.1)
    mod = TopKMod(residual_dir=str(tmp_path / "res"))
    local = record({"w": np.linspace(0, 1, 50, dtype=np.float32)})
    old_umask = os.umask(0o022)
    try:
        for server_round in (1, 2):
            msg = send(strategy, server_round, arrays, nodes=(3,))[3]
            mod(msg, context(3), lambda m, c: reply(m, local))
            (path,) = (tmp_path / "res").glob("topk-residual-*.npz")
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            path.chmod(0o644)  # a file left world-readable is tightened on the next write
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "res").stat().st_mode) == 0o700
    assert not list((tmp_path / "res").glob("*.tmp"))


def test_a_failure_inside_the_mod_sends_dense_and_keeps_the_residual(as_server, monkeypatch):
    import flower_ext.mods.topk as topk_module

    def broken(*args, **kwargs):
        raise RuntimeError("encoder broke")

    monkeypatch.setattr(topk_module, "payload_to_records", broken)
    arrays = record({"w": np.zeros(20, np.float32)})
    strategy = TopKCompression(FedAvg(min_train_nodes=1, min_available_nodes=1), ratio=0.1)
    msg = send(strategy, 1, arrays, nodes=(2,))[2]
    ctx = context(2)
    local = record({"w": np.arange(20, dtype=np.float32)})
    out = topk_mod(msg, ctx, lambda m, c: reply(m, local))
    assert RECORD_KEY not in out.content
    assert "RuntimeError: encoder broke" in out.content[DENSE_RECORD_KEY]["reason"]
    assert "topk.residual" not in ctx.state.array_records  # the dense reply sent it all
    result, _ = strategy.aggregate_train(1, [out])
    np.testing.assert_array_equal(result["w"].numpy(), np.arange(20))
    assert "RuntimeError" in strategy.compression_reports[1]["dense_reasons"][2]
