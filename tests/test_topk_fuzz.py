"""Seeded fuzz of TopKCompression's intake: malformed sparse replies never cost the round.

Every malformed reply is built by mutating a REAL ``topk_mod`` reply (float32, float16 and
int8 values; global and per-layer selection; gap and bitmap index encodings), mixed with
honest sparse replies and honest dense ones, and driven through ``TopKCompression`` around
flower-ext's FedAvg, flower-ext's Median and Flower's own FedAvg for four rounds. Checked
every round: nothing raises, the new global model is finite with the initial model's keys,
shapes and dtypes, every malformed reply and only those is rejected, with a short reason
naming the bank (and in the audit trail), no reply is mutated, and the model equals the
same strategy's result on the honest replies alone.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from conftest import FakeGrid, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flower_ext.audit import AuditTrail
from flower_ext.compression import (
    INDICES_KEY,
    RECORD_KEY,
    VALUES_KEY,
    encode_indices,
    expected_count,
    payload_from_records,
    raw_array,
)
from flower_ext.mods import TopKMod
from flower_ext.strategies import FedAvg, Median, TopKCompression

SEED = 20240611
NODES = list(range(1, 43))  # 42 banks a round
MALFORMED_PER_ROUND = 30
DENSE_HONEST = 2  # honest banks without topk_mod each round
RATIOS = (0.05, 0.3, 0.1, 0.5)  # one per round: gap and bitmap encodings both appear
VALUE_DTYPES = ("float32", "float16", "int8")


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "fc.weight": rng.normal(size=(8, 16)).astype(np.float32),
        "fc.bias": np.zeros(16, np.float32),
        "bn.num_batches_tracked": np.array(0, np.int64),
        "coef": np.asfortranarray(rng.normal(size=(3, 4))),
    }


def as_record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def honest_local(global_arrays: ArrayRecord, rng: np.random.Generator) -> ArrayRecord:
    out = {}
    for key, array in global_arrays.items():
        value = array.numpy()
        if value.dtype.kind == "i":
            out[key] = np.asarray(value + 3)
        else:
            out[key] = value + (rng.normal(size=value.shape) * 0.01).astype(value.dtype)
    return as_record(out)


# ---------------------------------------------------------------------- mutations
class Parts:
    """A sparse reply taken apart: decoded indices and values, raw arrays, marker fields."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.arrays = msg.content["arrays"]
        self.marker = dict(msg.content[RECORD_KEY])
        payload, _ = payload_from_records(self.arrays, msg.content[RECORD_KEY])
        self.indices, self.values = payload.decode()
        self.dim = payload.dim

    def build(
        self,
        arrays: dict[str, Array] | None = None,
        marker: dict | None = None,
        drop: tuple[str, ...] = (),
        records: dict | None = None,
    ) -> Message:
        """A new reply: ``arrays`` replace the sparse arrays (None values delete), ``marker``
        updates the marker (None values delete), ``drop`` removes records, ``records`` adds."""
        fields = dict(self.arrays.items())
        for key, value in (arrays or {}).items():
            if value is None:
                fields.pop(key, None)
            else:
                fields[key] = value
        new_marker = dict(self.marker)
        for key, value in (marker or {}).items():
            if value is None:
                new_marker.pop(key, None)
            else:
                new_marker[key] = value
        content = RecordDict()
        for key, record in self.msg.content.items():
            if key in drop:
                continue
            if key == "arrays":
                record = ArrayRecord(fields)
            elif key == RECORD_KEY:
                record = ConfigRecord(new_marker)
            content[key] = record
        for key, record in (records or {}).items():
            content[key] = record
        return Message(metadata=copy.copy(self.msg.metadata), content=content)

    def indices_as(self, indices: np.ndarray, encoding: str, dim: int | None = None) -> Message:
        _, tokens = encode_indices(np.asarray(indices), dim or self.dim, encoding)
        return self.build({INDICES_KEY: raw_array(tokens)}, {"index-encoding": encoding})

    def float_values(self, values: np.ndarray, count: int | None = None) -> Message:
        marker = {"values": "float32", "scale": 0.0}
        if count is not None:
            marker["count"] = count
        return self.build({VALUES_KEY: raw_array(values.astype(np.float32))}, marker)

    def int8_values(self, q: np.ndarray, scale: float) -> Message:
        return self.build(
            {VALUES_KEY: raw_array(q.astype(np.int8))}, {"values": "int8", "scale": scale}
        )


def _gap_u32_tokens(indices: np.ndarray) -> Array:
    gaps = np.diff(np.asarray(indices, dtype=np.int64), prepend=0)
    return raw_array(gaps.astype(np.uint32))  # negative gaps wrap, as a forger's would


def _wrong_k(p: Parts, allowed: set[int]) -> Message:
    keep = p.indices.size - 1
    while keep in allowed and keep > 0:
        keep -= 1
    _, tokens = encode_indices(p.indices[:keep], p.dim, "gap-u32")
    return p.build(
        {INDICES_KEY: raw_array(tokens), VALUES_KEY: raw_array(p.values[:keep])},
        {"index-encoding": "gap-u32", "values": "float32", "scale": 0.0, "count": keep},
    )


def _garbage(nbytes: int, rng: np.random.Generator) -> bytes:
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()


MUTATIONS: dict[str, Callable[[Parts, np.random.Generator, set[int]], Message]] = {
    "index out of range": lambda p, r, a: p.indices_as(
        np.append(p.indices[:-1], p.dim + 5), "gap-u32"
    ),
    "duplicate index": lambda p, r, a: p.indices_as(
        np.concatenate([p.indices[:1], p.indices[:-1]]), "gap-u32"
    ),
    "unsorted indices": lambda p, r, a: p.build(
        {INDICES_KEY: _gap_u32_tokens(np.roll(p.indices, 1))}, {"index-encoding": "gap-u32"}
    ),
    "indices of the wrong dtype": lambda p, r, a: p.build(
        {INDICES_KEY: raw_array(encode_indices(p.indices, p.dim, "gap-u8")[1].astype(np.uint16))},
        {"index-encoding": "gap-u8"},
    ),
    "indices end in an escape": lambda p, r, a: p.build(
        {
            INDICES_KEY: raw_array(
                np.append(encode_indices(p.indices, p.dim, "gap-u8")[1], np.uint8(255))
            )
        },
        {"index-encoding": "gap-u8"},
    ),
    "bitmap one byte short": lambda p, r, a: p.build(
        {INDICES_KEY: raw_array(encode_indices(p.indices, p.dim, "bitmap")[1][:-1])},
        {"index-encoding": "bitmap"},
    ),
    "fewer values than the count": lambda p, r, a: p.build(
        {VALUES_KEY: raw_array(p.values[:-1])}, {"values": "float32", "scale": 0.0}
    ),
    "fewer indices than values": lambda p, r, a: p.indices_as(p.indices[:-1], "gap-u32"),
    "values in float64": lambda p, r, a: p.build(
        {VALUES_KEY: raw_array(p.values.astype(np.float64))}, {"values": "float32", "scale": 0.0}
    ),
    "values declared float16, sent float32": lambda p, r, a: p.build(
        {VALUES_KEY: raw_array(p.values)}, {"values": "float16", "scale": 0.0}
    ),
    "a NaN value": lambda p, r, a: p.float_values(
        np.where(np.arange(p.values.size) == 0, np.nan, p.values)
    ),
    "an Inf value": lambda p, r, a: p.float_values(
        np.where(np.arange(p.values.size) == 0, -np.inf, p.values)
    ),
    "a float16 Inf": lambda p, r, a: p.build(
        {VALUES_KEY: raw_array(np.full(p.values.size, np.inf, np.float16))},
        {"values": "float16", "scale": 0.0},
    ),
    "int8 scale 3e38": lambda p, r, a: p.int8_values(np.full(p.values.size, 127), 3e38),
    "int8 scale NaN": lambda p, r, a: p.int8_values(np.full(p.values.size, 127), float("nan")),
    "int8 scale Inf": lambda p, r, a: p.int8_values(np.full(p.values.size, 127), float("inf")),
    "int8 scale negative": lambda p, r, a: p.int8_values(np.full(p.values.size, 127), -0.5),
    "int8 scale inflated": lambda p, r, a: p.int8_values(np.ones(p.values.size), 1e30),
    "int8 values with scale 0": lambda p, r, a: p.int8_values(np.full(p.values.size, 127), 0.0),
    "int8 scale subnormal": lambda p, r, a: p.int8_values(np.full(p.values.size, 127), 1e-45),
    "a scale with float values": lambda p, r, a: p.build(
        {VALUES_KEY: raw_array(p.values)}, {"values": "float32", "scale": 0.5}
    ),
    "unknown index encoding": lambda p, r, a: p.build(marker={"index-encoding": "elias-fano"}),
    "format 99": lambda p, r, a: p.build(marker={"format": 99}),
    "other layout": lambda p, r, a: p.build(marker={"layout": "0123456789abcdef"}),
    "huge layout string": lambda p, r, a: p.build(marker={"layout": "x" * 10_000}),
    "dimension + 1": lambda p, r, a: p.build(marker={"dim": p.dim + 1}),
    "negative dimension": lambda p, r, a: p.build(marker={"dim": -1}),
    "wrong k": lambda p, r, a: _wrong_k(p, a),
    "no entries": lambda p, r, a: p.build(
        {
            INDICES_KEY: raw_array(np.empty(0, np.uint8)),
            VALUES_KEY: raw_array(np.empty(0, np.float32)),
        },
        {"index-encoding": "gap-u8", "values": "float32", "scale": 0.0, "count": 0},
    ),
    "marker field missing": lambda p, r, a: p.build(
        marker={
            r.choice(
                ["format", "dim", "count", "index-encoding", "values", "scale", "layout"]
            ): None
        }
    ),
    "marker field of the wrong type": lambda p, r, a: p.build(
        marker=dict(
            [
                [
                    ("format", "1"),
                    ("dim", float(p.dim)),
                    ("count", [p.values.size]),
                    ("count", True),
                    ("index-encoding", 3),
                    ("values", b"float32"),
                    ("scale", "0.0"),
                    ("layout", 1.5),
                ][r.integers(8)]
            ]
        )
    ),
    "no marker record": lambda p, r, a: p.build(drop=(RECORD_KEY,)),
    "no values array": lambda p, r, a: p.build({VALUES_KEY: None}),
    "an extra array": lambda p, r, a: p.build({"topk.extra": raw_array(np.zeros(3, np.uint8))}),
    "indices and values swapped": lambda p, r, a: p.build(
        {INDICES_KEY: p.arrays[VALUES_KEY], VALUES_KEY: p.arrays[INDICES_KEY]}
    ),
    "garbage bytes": lambda p, r, a: p.build(
        {
            VALUES_KEY: Array(
                dtype="float32",
                shape=(p.values.size,),
                stype="flower_ext.raw-le",
                data=_garbage(4 * p.values.size + 3, r),
            )
        }
    ),
    "npy serialisation": lambda p, r, a: p.build({VALUES_KEY: Array(p.values)}),
    "2-d values": lambda p, r, a: p.build(
        {
            VALUES_KEY: Array(
                dtype="float32",
                shape=(p.values.size, 1),
                stype="flower_ext.raw-le",
                data=p.values.tobytes(),
            )
        },
        {"values": "float32", "scale": 0.0},
    ),
    "object dtype": lambda p, r, a: p.build(
        {
            VALUES_KEY: Array(
                dtype="object", shape=(p.values.size,), stype="flower_ext.raw-le", data=b"\0" * 8
            )
        }
    ),
    "two ArrayRecords": lambda p, r, a: p.build(
        records={"more": ArrayRecord({"w": Array(np.zeros(2, np.float32))})}
    ),
    "marker on dense weights": lambda p, r, a: p.build(
        drop=("arrays",), records={"arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))})}
    ),
    "reply from an unsampled node": lambda p, r, a: _from_node(
        p.msg, 10_000 + p.msg.metadata.src_node_id
    ),
}


def _from_node(msg: Message, node: int) -> Message:
    metadata = copy.copy(msg.metadata)
    metadata.__dict__["_src_node_id"] = node
    return Message(metadata=metadata, content=msg.content)


def fingerprint(msg: Message) -> str:
    """Everything a strategy could mutate in a reply, hashed."""
    digest = hashlib.sha256()
    md = msg.metadata
    digest.update(repr((md.src_node_id, md.dst_node_id, md.reply_to_message_id)).encode())
    if msg.has_error():
        digest.update(msg.error.reason.encode())
        return digest.hexdigest()
    for key, record in msg.content.items():
        digest.update(key.encode())
        if isinstance(record, ArrayRecord):
            for name, array in record.items():
                digest.update(repr((name, array.dtype, array.shape, array.stype)).encode())
                digest.update(bytes(array.data))
        else:
            digest.update(repr(sorted(record.items())).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------- the fuzz
INNERS: dict[str, Callable[[AuditTrail], object]] = {
    "flower_ext FedAvg": lambda audit: FedAvg(
        min_train_nodes=2, min_available_nodes=2, audit=audit
    ),
    "flower_ext Median": lambda audit: Median(
        min_train_nodes=2, min_available_nodes=2, audit=audit
    ),
    "flwr FedAvg": lambda audit: FlowerFedAvg(min_train_nodes=2, min_available_nodes=2),
}


def send(strategy, server_round, arrays, ids: dict[int, str] | None = None) -> dict[int, Message]:
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
    for msg in messages:  # the Grid gives outgoing messages their ids when it sends them
        node = int(msg.metadata.dst_node_id)
        msg.metadata.__dict__["_message_id"] = ids[node] if ids else msg.object_id
    return {int(m.metadata.dst_node_id): m for m in messages}


def run_fuzz(name: str) -> Counter:
    rng = np.random.default_rng(SEED)
    model = initial_model()
    audit = AuditTrail()
    strategy = TopKCompression(INNERS[name](audit), ratio=RATIOS[0], audit=audit)
    mods = {
        n: TopKMod(values=VALUE_DTYPES[n % 3], scope=("global", "layer")[(n // 3) % 2], seed=n)
        for n in NODES
    }
    contexts = {
        n: Context(
            run_id=9, node_id=n, node_config={"partition-id": n}, state=RecordDict(), run_config={}
        )
        for n in NODES
    }
    kinds = list(MUTATIONS)
    used: Counter = Counter()
    global_arrays = as_record(model)
    for server_round, ratio in enumerate(RATIOS, start=1):
        strategy.ratio = ratio
        sent = send(strategy, server_round, global_arrays)
        sizes = tuple(int(a.numpy().size) for a in global_arrays.values())
        allowed = {expected_count(sizes, ratio, s) for s in ("global", "layer")}
        order = rng.permutation(NODES)
        malformed = {int(n) for n in order[:MALFORMED_PER_ROUND]}
        dense = {int(n) for n in order[MALFORMED_PER_ROUND : MALFORMED_PER_ROUND + DENSE_HONEST]}
        replies, honest, bad_ids = [], [], set()
        for n in NODES:
            local = honest_local(global_arrays, rng)

            def handler(m, c, lo=local, n=n):
                return reply(m, lo, {"num-examples": 10 + n}, label=f"bank-{n}")

            if n in dense:
                out = handler(sent[n], contexts[n])
            else:
                out = mods[n](sent[n], contexts[n], handler)
                assert RECORD_KEY in out.content
            if n in malformed:
                kind = kinds[(used.total() + server_round) % len(kinds)]
                used[kind] += 1
                out = MUTATIONS[kind](Parts(out), rng, allowed)
                bad_ids.add(int(out.metadata.src_node_id))
            else:
                honest.append(out)
            replies.append(out)
        before = [fingerprint(m) for m in replies]

        result, _ = strategy.aggregate_train(server_round, replies)  # must not raise

        assert [fingerprint(m) for m in replies] == before, "a reply was mutated"
        report = strategy.compression_reports[server_round]
        assert set(report["rejected"]) == bad_ids, f"{name}, round {server_round}"
        for node, reason in report["rejected"].items():
            assert 0 < len(reason) <= 300 and f"bank-{node % 10_000}" in reason, reason
        if name.startswith("flower_ext"):
            events = [
                e
                for e in audit.events
                if e["event"] == "topk_reply_rejected" and e["round"] == server_round
            ]
            assert {e["node_id"] for e in events} == bad_ids
            assert all(e["reason"] and e["label"] for e in events)
            round_report = strategy.round_reports[server_round]
            assert sorted(round_report.accepted) == sorted(set(NODES) - malformed)
            assert not round_report.skipped_reason
        assert result is not None
        assert list(result.keys()) == list(model)
        for key, value in model.items():
            got = result[key].numpy()
            assert got.shape == value.shape and got.dtype == value.dtype, key
            assert np.isfinite(got).all(), key
        # The same strategy given only the honest replies reaches the same model.
        ids = {n: m.metadata.message_id for n, m in sent.items()}
        reference = TopKCompression(INNERS[name](AuditTrail()), ratio=ratio)
        send(reference, server_round, global_arrays, ids)
        expected, _ = reference.aggregate_train(server_round, honest)
        for key in model:
            np.testing.assert_allclose(
                result[key].numpy(), expected[key].numpy(), rtol=1e-6, err_msg=key
            )
        global_arrays = result
    return used


@pytest.mark.parametrize("name", sorted(INNERS))
def test_malformed_sparse_replies_never_cost_the_round(as_server, name):
    used = run_fuzz(name)
    assert used.total() == MALFORMED_PER_ROUND * len(RATIOS)  # 120 per strategy, 360 in all
    assert len(used) >= 20
