"""Seeded fuzz of reply intake: one bank can neither stop nor veto a round (issue 11).

Every flower-ext plaintext strategy plays several rounds in which honest banks
send valid replies and attacker banks send malformed ones, drawn with a fixed
seed from the kinds below (forged ``.npy`` headers, wrong records, absurd
weights, NaN/Inf and huge-but-finite values, replays, duplicates, replies from
nodes that were not sampled, ...). For every strategy and round:

- nothing raises out of ``configure_train`` / ``aggregate_train`` /
  ``aggregate_evaluate``;
- the new global model is finite, in the global model's keys, shapes and dtypes;
- every honest reply is accepted, and FedAvg's model is the weighted mean of
  exactly the honest replies;
- every malformed reply is rejected with a short reason in the audit trail;
- no reply is mutated.

(Top-k payloads and CKKS ciphertexts have fuzz tests of their own, built from the
real ``topk_mod`` and ``he_mod`` output: ``test_topk_fuzz.py``, ``test_he_fuzz.py``.)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from conftest import FakeGrid, outgoing, reply, sent
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.strategies import (
    Bulyan,
    CenteredClipping,
    FedAvg,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    TrimmedMean,
)

SEED = 20261129
HONEST = list(range(101, 109))  # 8 honest banks
ATTACKERS = list(range(201, 241))  # 40 attacker banks, one malformed reply each per round
ROUNDS = 3
MAGIC = b"\x93NUMPY"


def _global_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(6, 4)).astype(np.float32),
        "b": np.zeros(4, np.float32),
        "steps": np.array(3, dtype=np.int64),
    }


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _npy(header: str, payload: bytes, version: int = 1) -> bytes:
    body = header.encode("latin1")
    if version == 1:
        return MAGIC + bytes([1, 0]) + len(body).to_bytes(2, "little") + body + payload
    return MAGIC + bytes([version, 0]) + len(body).to_bytes(4, "little") + body + payload


def _forged(dtype: str, shape: list[int], data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def _with_array(values: dict[str, np.ndarray], key: str, array: Array) -> ArrayRecord:
    record = _record(values)
    record[key] = array
    return record


# ----------------------------------------------------------------- malformations
# Each kind builds (arrays, metrics, content_override) for an attacker's reply; the
# reply itself is made by _attacker_reply. ``w`` is float32 (6, 4): 96 payload bytes.
W_PAYLOAD = np.zeros((6, 4), np.float32).tobytes()
GOOD_W_HEADER = "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 4), }"


def _header_kind(header: str, payload: bytes = W_PAYLOAD, version: int = 1):
    def build(values):
        return _with_array(values, "w", _forged("float32", [6, 4], _npy(header, payload, version)))

    return build


def _array_kind(array_fn: Callable[[dict[str, np.ndarray]], Array], key: str = "w"):
    def build(values):
        return _with_array(values, key, array_fn(values))

    return build


def _values_kind(fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]):
    def build(values):
        return _record(fn({k: np.array(v, copy=True) for k, v in values.items()}))

    return build


def _set(key: str, where, value):
    def fn(v):
        v[key][where] = value
        return v

    return fn


ARRAY_KINDS: dict[str, Callable] = {
    # forged .npy headers (these bytes survive Flower's wire format)
    "header-shape-string": _header_kind("{'descr': '<f4', 'fortran_order': False, 'shape': 'ab'}"),
    "header-shape-int": _header_kind("{'descr': '<f4', 'fortran_order': False, 'shape': 48}"),
    "header-shape-negative": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-6, -4)}"
    ),
    "header-shape-bools": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (True, 4)}"
    ),
    "header-shape-floats": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (6.0, 4.0)}"
    ),
    "header-shape-huge": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4)}"
    ),
    "header-many-dims": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1," * 70 + ")}"
    ),
    "header-unhashable-key": _header_kind("{['descr']: '<f4', 'fortran_order': False}"),
    "header-set": _header_kind("{'descr', 'fortran_order', 'shape'}"),
    "header-not-dict": _header_kind("[1, 2, 3]"),
    "header-missing-key": _header_kind("{'descr': '<f4', 'shape': (6, 4)}"),
    "header-extra-key": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 4), 'x': 1}"
    ),
    "header-fortran-not-bool": _header_kind(
        "{'descr': '<f4', 'fortran_order': 'yes', 'shape': (6, 4)}"
    ),
    "header-duplicate-fields": _header_kind(
        "{'descr': [('a', '<f4'), ('a', '<f4')], 'fortran_order': False, 'shape': (6, 4)}"
    ),
    "header-unknown-descr": _header_kind(
        "{'descr': '<x9', 'fortran_order': False, 'shape': (6, 4)}"
    ),
    "header-descr-int": _header_kind("{'descr': 7, 'fortran_order': False, 'shape': (6, 4)}"),
    "header-object-descr": _header_kind("{'descr': '|O', 'fortran_order': False, 'shape': (6, 4)}"),
    "header-complex-descr": _header_kind(
        "{'descr': '<c8', 'fortran_order': False, 'shape': (6, 2)}"
    ),
    "header-syntax-error": _header_kind("{'descr': '<f4', 'fortran_order': Fal"),
    "header-deep-nesting": _header_kind("[" * 5000 + "]" * 5000),
    "header-call": _header_kind("__import__('os').getcwd()"),
    "header-latin1-garbage": _header_kind("\xff\xfe\x00{'descr'"),
    "header-version-9": _header_kind(GOOD_W_HEADER, version=9),
    "header-length-past-end": lambda values: _with_array(
        values,
        "w",
        _forged("float32", [6, 4], MAGIC + bytes([1, 0]) + (60000).to_bytes(2, "little")),
    ),
    "header-v2-truncated": lambda values: _with_array(
        values, "w", _forged("float32", [6, 4], MAGIC + bytes([2, 0, 1]) + b"\x00")
    ),
    "payload-truncated": _header_kind(GOOD_W_HEADER, W_PAYLOAD[:-3]),
    "payload-extra-bytes": _header_kind(GOOD_W_HEADER, W_PAYLOAD + b"\x00" * 4),
    "payload-empty": _array_kind(lambda v: _forged("float32", [6, 4], b"")),
    "bad-magic": _array_kind(lambda v: _forged("float32", [6, 4], b"NOTNPY" + W_PAYLOAD)),
    "bytes-say-float64": _header_kind(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (6, 4)}", W_PAYLOAD * 2
    ),
    "bytes-say-other-shape": _header_kind(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 6)}"
    ),
    "big-endian": _array_kind(lambda v: Array(v["w"].astype(">f4"))),
    "stype-not-numpy": _array_kind(lambda v: _forged("float32", [6, 4], b"\x00" * 96, "torch")),
    "declared-dtype-garbage": _array_kind(
        lambda v: _forged("not-a-dtype", [6, 4], Array(v["w"]).data)
    ),
    "declared-dtype-complex": _array_kind(
        lambda v: _forged("complex64", [6, 2], Array(v["w"]).data)
    ),
    "wrong-shape": _array_kind(lambda v: Array(np.zeros((4, 6), np.float32))),
    "wrong-dtype": _array_kind(lambda v: Array(v["w"].astype(np.float64))),
    "zero-d-instead-of-vector": _array_kind(lambda v: Array(np.array(1.0, np.float32)), "b"),
    "int-buffer-as-float": _array_kind(lambda v: Array(np.array(3.0)), "steps"),
    "missing-key": lambda values: _record({k: values[k] for k in ("w", "b")}),
    "extra-key": lambda values: _record({**values, "extra": np.zeros(2, np.float32)}),
    "nan-value": _values_kind(_set("w", (0, 0), np.nan)),
    "inf-value": _values_kind(_set("b", 2, np.inf)),
    "minus-inf-value": _values_kind(_set("w", (5, 3), -np.inf)),
    "huge-finite-3e37": _values_kind(lambda v: {**v, "w": np.full((6, 4), 3e37, np.float32)}),
    "one-value-3e38": _values_kind(_set("w", (2, 2), 3.0e38)),
    "norm-above-bound": _values_kind(_set("b", 0, 1e20)),
}

METRIC_KINDS: dict[str, dict] = {
    "weight-missing": {"train-loss": 1.0},
    "weight-zero": {"num-examples": 0},
    "weight-negative": {"num-examples": -5},
    "weight-nan": {"num-examples": float("nan")},
    "weight-inf": {"num-examples": float("inf")},
    "weight-absurd": {"num-examples": 1e300},
    "weight-list": {"num-examples": [1.0, 2.0]},
}

CONTENT_KINDS = [
    "no-arrayrecord",
    "two-arrayrecords",
    "no-metricrecord",
    "two-metricrecords",
    "empty-content",
    "error-reply",
]
BINDING_KINDS = [
    "duplicate-after-rejected",  # a malformed reply, then a valid one from the same node
    "replay-previous-round",
    "not-sampled",
    "other-nodes-message",
]
KINDS = list(ARRAY_KINDS) + list(METRIC_KINDS) + CONTENT_KINDS + BINDING_KINDS


def _reply_from(sender: int, to: Message, content: RecordDict) -> Message:
    """A reply to ``to`` that says it comes from ``sender`` (Flower would set ``to``'s
    destination; a forged or mis-routed reply can say otherwise)."""
    TaskIdentity.node_id = sender
    try:
        message = Message(content=content, reply_to=to)
    finally:
        TaskIdentity.node_id = 1
    message.metadata.__dict__["_src_node_id"] = sender
    return message


def _content(arrays: ArrayRecord | None, metrics: dict) -> RecordDict:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    content["metrics"] = MetricRecord(metrics)
    return content


def _attack(
    kind: str, msg: Message, values, previous: list[Message], stray: Message
) -> list[Message]:
    """The reply (or replies) an attacker sends for ``msg``."""
    node = int(msg.metadata.dst_node_id)
    good = _record(values)
    if kind in ARRAY_KINDS:
        return [reply(msg, ARRAY_KINDS[kind](values), {"num-examples": 50})]
    if kind in METRIC_KINDS:
        return [reply(msg, good, METRIC_KINDS[kind])]
    if kind == "no-arrayrecord":
        return [reply(msg, None, {"num-examples": 50})]
    if kind == "two-arrayrecords":
        content = _content(good, {"num-examples": 50})
        content["more"] = _record(values)
        return [_reply_from(node, msg, content)]
    if kind == "no-metricrecord":
        return [_reply_from(node, msg, RecordDict({"arrays": good}))]
    if kind == "two-metricrecords":
        content = _content(good, {"num-examples": 50})
        content["more"] = MetricRecord({"num-examples": 50})
        return [_reply_from(node, msg, content)]
    if kind == "empty-content":
        return [_reply_from(node, msg, RecordDict())]
    if kind == "error-reply":
        return [reply(msg, error="\x1b[31mTraceback (most recent call last):\x1b[0m " + "x" * 3000)]
    if kind == "duplicate-after-rejected":
        return [
            reply(msg, ARRAY_KINDS["header-shape-string"](values), {"num-examples": 50}),
            reply(msg, good, {"num-examples": 50}),
        ]
    if kind == "replay-previous-round":
        old = previous[node % len(previous)]
        return [_reply_from(node, old, _content(good, {"num-examples": 50}))]
    if kind == "not-sampled":
        return [reply(stray, good, {"num-examples": 50})]
    if kind == "other-nodes-message":
        return [
            _reply_from(
                node, previous_honest_message(msg, previous), _content(good, {"num-examples": 5})
            )
        ]
    raise AssertionError(kind)


def previous_honest_message(msg: Message, outgoing_now: list[Message]) -> Message:
    """A message this round sent to an honest bank (the attacker answers it as itself)."""
    for other in outgoing_now:
        if int(other.metadata.dst_node_id) in HONEST:
            return other
    raise AssertionError("no honest message")


def _fingerprint(message: Message) -> str:
    digest = hashlib.sha256()
    if message.has_content():
        for name, record in message.content.array_records.items():
            for key, array in record.items():
                digest.update(f"{name}/{key}/{array.dtype}/{list(array.shape)}".encode())
                digest.update(array.data)
        for name, record in message.content.metric_records.items():
            digest.update(f"{name}{sorted((k, repr(v)) for k, v in record.items())}".encode())
    return digest.hexdigest()


def _strategies():
    return {
        "FedAvg": lambda: FedAvg(),
        "FedAvgM": lambda: FedAvg(server_momentum=0.9, server_learning_rate=0.5),
        "Median": lambda: Median(num_malicious_nodes=2),
        "TrimmedMean": lambda: TrimmedMean(beta=0.25, num_malicious_nodes=2),
        "Krum": lambda: Krum(num_malicious_nodes=2),
        "MultiKrum": lambda: MultiKrum(num_malicious_nodes=2),
        "Bulyan": lambda: Bulyan(num_malicious_nodes=1),
        "GeometricMedian": lambda: GeometricMedian(num_malicious_nodes=2),
        "CenteredClipping": lambda: CenteredClipping(tau=0.5),
        "NormBound": lambda: NormBound(max_norm=1.0),
    }


def _honest_values(global_values, node: int, rnd: int):
    rng = np.random.default_rng(node * 100 + rnd)
    return {
        "w": (global_values["w"] + rng.normal(scale=0.01, size=(6, 4))).astype(np.float32),
        "b": (global_values["b"] + rng.normal(scale=0.01, size=4)).astype(np.float32),
        "steps": np.array(int(global_values["steps"]) + 2, dtype=np.int64),
    }


@pytest.mark.parametrize("name", list(_strategies()))
def test_fuzzed_replies_never_stop_or_veto_a_round(as_server, name: str) -> None:
    rng = np.random.default_rng(SEED + sum(map(ord, name)))
    strategy = _strategies()[name]()
    global_values = _global_values()
    previous: list[Message] = []
    kinds_seen: Counter[str] = Counter()
    malformed = 0
    for rnd in range(1, ROUNDS + 1):
        grid = FakeGrid(HONEST + ATTACKERS)
        out = sent(strategy.configure_train(rnd, _record(global_values), ConfigRecord(), grid))
        assert sorted(int(m.metadata.dst_node_id) for m in out) == sorted(HONEST + ATTACKERS)
        stray = sent([outgoing(_record(global_values), 999)])[0]
        replies: list[Message] = []
        honest_values = {}
        for msg in out:
            node = int(msg.metadata.dst_node_id)
            if node in HONEST:
                honest_values[node] = _honest_values(global_values, node, rnd)
                metrics = {"num-examples": 100 + node, "train-loss": 0.3}
                replies.append(reply(msg, _record(honest_values[node]), metrics))
        attackers = [m for m in out if int(m.metadata.dst_node_id) in ATTACKERS]
        round_kinds: dict[int, str] = {}
        for msg in attackers:
            kind = (
                KINDS[int(rng.integers(len(KINDS)))]
                if kinds_seen.total() >= len(KINDS)
                else (KINDS[kinds_seen.total()])
            )
            kinds_seen[kind] += 1
            round_kinds[int(msg.metadata.dst_node_id)] = kind
            made = _attack(kind, msg, global_values, previous or out, stray)
            malformed += len(made)
            replies += made
        rng.shuffle(replies)  # arrival order must not matter
        before = [_fingerprint(m) for m in replies]

        new_arrays, metrics = strategy.aggregate_train(rnd, replies)
        eval_metrics = strategy.aggregate_evaluate(rnd, replies)  # train replies: no crash

        assert [_fingerprint(m) for m in replies] == before, "a reply was mutated"
        report = strategy.round_reports[rnd]
        assert sorted(report.accepted) == HONEST, (report.rejected, report.accepted)
        # An attacker whose kind is "not-sampled" let node 999 answer for it: 999 is
        # rejected, the attacker itself is missing.
        silent = {n for n, k in round_kinds.items() if k == "not-sampled"}
        expected_rejected = set(ATTACKERS) - silent | ({999} if silent else set())
        assert set(report.rejected) == expected_rejected
        assert set(report.missing) == silent
        for node, reason in report.rejected.items():
            assert reason and len(reason) <= 300 and "\x1b" not in reason, (node, reason)
        events = [
            e for e in strategy.audit.events if e["event"] == "reply_rejected" and e["round"] == rnd
        ]
        assert {e["node_id"] for e in events} == expected_rejected
        assert all(e["reason"] for e in events)
        assert new_arrays is not None and metrics is not None
        assert metrics["clients-accepted"] == len(HONEST)
        assert eval_metrics is None or all(np.isfinite(v) for v in eval_metrics.values())
        for key, value in global_values.items():
            got = new_arrays[key].numpy()
            assert got.shape == value.shape and got.dtype == value.dtype
            assert np.isfinite(got).all()
        if name == "FedAvg":
            weights = np.array([100 + n for n in HONEST], dtype=np.float64)
            expected = (
                sum(
                    w * honest_values[n]["w"].astype(np.float64)
                    for w, n in zip(weights, HONEST, strict=True)
                )
                / weights.sum()
            )
            np.testing.assert_allclose(new_arrays["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
            assert int(new_arrays["steps"].numpy()) == int(global_values["steps"]) + 2
        previous = out
        global_values = {k: new_arrays[k].numpy() for k in global_values}
    assert malformed >= len(ATTACKERS) * ROUNDS
    assert len(kinds_seen) >= 50


def test_fuzz_covers_a_thousand_replies_of_fifty_kinds() -> None:
    """The suite above sends 40 malformed replies x 3 rounds x 10 strategies."""
    assert len(KINDS) >= 60
    assert len(ATTACKERS) * ROUNDS * len(_strategies()) >= 1000


def test_overflowing_reply_is_blamed_alone(as_server) -> None:
    """One finite 3e37 reply: the honest replies are averaged, the reason says "too large"."""
    strategy = FedAvg()
    values = _global_values()
    out = sent(strategy.configure_train(1, _record(values), ConfigRecord(), FakeGrid([1, 2, 3])))
    huge = {**values, "w": np.full((6, 4), 3e37, np.float32)}
    replies = [
        reply(out[0], _record(values), {"num-examples": 10}),
        reply(out[1], _record(values), {"num-examples": 10}),
        reply(out[2], _record(huge), {"num-examples": 10}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    report = strategy.round_reports[1]
    liar = int(out[2].metadata.dst_node_id)
    assert sorted(report.accepted) == sorted({1, 2, 3} - {liar})
    assert "too large" in report.rejected[liar]
    median = Median()
    out = sent(median.configure_train(1, _record(values), ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = [
        reply(m, _record(huge if i == 2 else values), {"num-examples": 10})
        for i, m in enumerate(out)
    ]
    assert median.aggregate_train(1, replies)[0] is not None
    assert "too large" in median.round_reports[1].rejected[int(out[2].metadata.dst_node_id)]
