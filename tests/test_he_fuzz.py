"""Seeded fuzz of EncryptedFedAvg's intake: malformed replies built from the real he_mod's output.

Every round mixes honest banks (real HEMod replies) with malicious ones, each sending one
reply mutated in one of the kinds below, plus binding attacks (duplicates, replays, replies
from nodes not sampled, copies of another bank's ciphertext). Asserted: no exception escapes,
every honest bank is accepted, the decrypted aggregate equals the plaintext weighted mean of
the honest banks, every malformed reply is one audited rejection with a reason, and no reply
object is changed by the strategy.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

import numpy as np
import pytest
from conftest import FakeGrid, _as_server, arrays_of, reply, sent
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.audit import AuditTrail
from flower_ext.crypto import (
    CKKSParameters,
    context_fingerprint,
    encrypt_packed,
    load_secret_context,
    write_keys,
)
from flower_ext.mods import HEMod
from flower_ext.mods.he import CIPHERTEXTS, RECORD_KEY, decrypt_global
from flower_ext.strategies import EncryptedFedAvg

SEED = 20260311
ROUNDS = 8
HONEST = [101, 102, 103, 104]
WEIGHTS = {101: 1200, 102: 300, 103: 2500, 104: 800}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("fuzz-keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("fuzz-other"))


@pytest.fixture(scope="module")
def big_n_keys(tmp_path_factory):
    # other parameters: N = 8192, so its ciphertexts have another shape
    return write_keys(
        tmp_path_factory.mktemp("fuzz-8192"),
        CKKSParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(56, 53)),
    )


def _content(msg: Message) -> dict:
    return {k: v for k, v in msg.content.items()}


def _with(msg_or_content, **changes) -> RecordDict:
    """A copy of a reply's content with records replaced (None removes one)."""
    base = _content(msg_or_content) if isinstance(msg_or_content, Message) else msg_or_content
    out = RecordDict()
    for key, value in {**base, **changes}.items():
        if value is not None:
            out[key] = value
    return out


def _he(msg: Message, **changes) -> ConfigRecord:
    values = dict(msg.content[RECORD_KEY])
    for key, value in changes.items():
        if value is _DROP:
            values.pop(key, None)
        else:
            values[key] = value
    return ConfigRecord(values)


def _metrics(msg: Message, **changes) -> MetricRecord:
    values = dict(msg.content["metrics"])
    values.update(changes)
    return MetricRecord(values)


_DROP = object()


def _packed(msg: Message) -> np.ndarray:
    return msg.content["arrays"][CIPHERTEXTS].numpy()


def _raw_array(template: Array, data: bytes, shape=None, dtype=None) -> Array:
    return Array(
        dtype=dtype or template.dtype,
        shape=tuple(shape or template.shape),
        stype=template.stype,
        data=data,
    )


def _content_kinds(other: Message, big_n: Message) -> dict[str, Callable[[Message], RecordDict]]:
    """Each kind turns a real encrypted reply into a malformed content."""

    def arrays(a: np.ndarray | Array) -> ArrayRecord:
        return ArrayRecord({CIPHERTEXTS: a if isinstance(a, Array) else Array(a)})

    def over_q(m: Message) -> RecordDict:
        bad = _packed(m).copy()
        bad[0, 1, 7, :] = 0xFF  # 2^56 - 1: above the 56-bit prime q
        return _with(m, arrays=arrays(bad))

    def garbage_bytes(m: Message) -> RecordDict:
        arr = m.content["arrays"][CIPHERTEXTS]
        rng = np.random.default_rng(len(arr.data))
        return _with(m, arrays=arrays(_raw_array(arr, rng.bytes(len(arr.data)))))

    def truncated_bytes(m: Message) -> RecordDict:
        arr = m.content["arrays"][CIPHERTEXTS]
        return _with(m, arrays=arrays(_raw_array(arr, bytes(arr.data)[: len(arr.data) // 3])))

    def forged_header(m: Message) -> RecordDict:
        arr = m.content["arrays"][CIPHERTEXTS]
        data = bytearray(arr.data)
        head = b"{'descr': '|u1', 'fortran_order': False, 'shape': 'ab', }"
        data[10 : 10 + len(head)] = head
        return _with(m, arrays=arrays(_raw_array(arr, bytes(data))))

    def lying_shape(m: Message) -> RecordDict:
        arr = m.content["arrays"][CIPHERTEXTS]
        return _with(m, arrays=arrays(_raw_array(arr, bytes(arr.data), shape=(3, 2, 4096, 7))))

    return {
        "weight-list": lambda m: _with(m, he=_he(m, weight=[1200.0])),
        "weight-string": lambda m: _with(m, he=_he(m, weight="1200")),
        "weight-nan": lambda m: _with(m, he=_he(m, weight=float("nan"))),
        "weight-bool": lambda m: _with(m, he=_he(m, weight=True)),
        "weight-missing": lambda m: _with(m, he=_he(m, weight=_DROP)),
        "weight-mismatch": lambda m: _with(
            m, he=_he(m, weight=2.0 * m.content["metrics"]["num-examples"])
        ),
        "weight-scale-wrong": lambda m: _with(m, he=_he(m, **{"weight-scale": 0.5})),
        "num-banks-too-low": lambda m: _with(m, he=_he(m, **{"num-banks": 1})),
        "num-banks-string": lambda m: _with(m, he=_he(m, **{"num-banks": "all"})),
        "num-examples-nan": lambda m: _with(
            m, metrics=_metrics(m, **{"num-examples": float("nan")})
        ),
        "num-examples-negative": lambda m: _with(m, metrics=_metrics(m, **{"num-examples": -5})),
        "num-examples-huge": lambda m: _with(m, metrics=_metrics(m, **{"num-examples": 1e15})),
        "num-examples-list": lambda m: _with(
            m, metrics=_metrics(m, **{"num-examples": [1.0, 2.0]})
        ),
        "no-metrics": lambda m: _with(m, metrics=None),
        "two-metric-records": lambda m: _with(
            m, metrics=None, a=MetricRecord({"x": 1}), b=MetricRecord({"y": 2})
        ),
        "no-he-record": lambda m: _with(m, he=None),
        "he-record-bytes": lambda m: _with(m, he=ConfigRecord({"format": b"ckks-raw/1"})),
        "format-wrong": lambda m: _with(m, he=_he(m, format="ckks-raw/0")),
        "fingerprint-wrong": lambda m: _with(m, he=_he(m, fingerprint="0" * 64)),
        "fingerprint-list": lambda m: _with(m, he=_he(m, fingerprint=["a", "b"])),
        "slots-wrong": lambda m: _with(m, he=_he(m, slots=4096)),
        "slots-bool": lambda m: _with(m, he=_he(m, slots=True)),
        "num-values-wrong": lambda m: _with(m, he=_he(m, **{"num-values": 21})),
        "layout-wrong": lambda m: _with(m, he=_he(m, layout="0123456789abcdef")),
        "no-arrays": lambda m: _with(m, arrays=None),
        "two-array-records": lambda m: _with(m, extra=ArrayRecord({"x": Array(np.zeros(3))})),
        "extra-array-key": lambda m: _with(
            m,
            arrays=ArrayRecord(
                {CIPHERTEXTS: m.content["arrays"][CIPHERTEXTS], "w": Array(np.zeros(3))}
            ),
        ),
        "plaintext-arrays": lambda m: _with(
            m, arrays=ArrayRecord({CIPHERTEXTS: Array(np.zeros(20))})
        ),
        "chunk-missing": lambda m: _with(m, arrays=arrays(_packed(m)[:0])),
        "chunk-extra": lambda m: _with(m, arrays=arrays(np.concatenate([_packed(m)] * 2))),
        "wrong-dtype": lambda m: _with(
            m, arrays=arrays(_packed(m).reshape(1, 2, 4096 * 7).view(np.uint16)[..., :-1])
        ),
        "float-ciphertext": lambda m: _with(m, arrays=arrays(_packed(m).astype(np.float32))),
        "wrong-n": lambda m: _with(m, arrays=arrays(_packed(m).reshape(1, 2, 2048, 14))),
        "coefficient-over-q": over_q,
        "garbage-bytes": garbage_bytes,
        "truncated-bytes": truncated_bytes,
        "forged-npy-header": forged_header,
        "array-lies-about-shape": lying_shape,
        # another key set: its own fingerprint; other parameters: another shape
        "other-key-set": lambda m: _with(
            m, arrays=other.content["arrays"], he=other.content[RECORD_KEY]
        ),
        "other-parameters": lambda m: _with(m, arrays=big_n.content["arrays"], he=_he(m)),
        "empty-content": lambda m: RecordDict(),
    }


def _fingerprint(msg: Message) -> str:
    """A digest of everything a reply holds, to prove the strategy changed nothing."""
    digest = hashlib.sha256()
    digest.update(repr(msg.metadata.__dict__).encode())
    if msg.has_error():
        digest.update(repr((msg.error.code, msg.error.reason)).encode())
        return digest.hexdigest()
    for key, record in sorted(msg.content.items()):
        digest.update(key.encode())
        if isinstance(record, ArrayRecord):
            for name, arr in record.items():
                digest.update(name.encode() + repr((arr.dtype, arr.shape)).encode())
                digest.update(bytes(arr.data))
        else:
            digest.update(repr(sorted(dict(record).items(), key=str)).encode())
    return digest.hexdigest()


def _as_node(node: int, build: Callable[[], Message]) -> Message:
    TaskIdentity.node_id = node
    try:
        return build()
    finally:
        _as_server()


def test_fuzzed_encrypted_rounds_never_crash_and_never_drop_an_honest_bank(
    keys, other_keys, big_n_keys, as_server
):
    rng = random.Random(SEED)
    nprng = np.random.default_rng(SEED)
    secret = load_secret_context(keys.secret)
    audit = AuditTrail()
    strategy = EncryptedFedAvg(
        min_train_nodes=1, min_available_nodes=1, context=keys.public, audit=audit
    )
    g0 = {"w": nprng.normal(size=(3, 5)), "b": nprng.normal(size=5)}  # 20 values: one chunk
    arrays = arrays_of(g0)
    mod = HEMod(keys.secret)
    other_ctx = load_secret_context(other_keys.secret)
    big_ctx = load_secret_context(big_n_keys.secret)
    ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})

    def bank(msg: Message, node: int, weight: int, locals_: dict, key_mod=mod) -> Message:
        def handler(plain: Message, context: Context) -> Message:
            got = {k: a.numpy() for k, a in plain.content["arrays"].items()}
            local = {k: v + nprng.normal(scale=0.05, size=v.shape) for k, v in got.items()}
            locals_[node] = local
            return reply(plain, arrays_of(local), {"num-examples": weight, "train-loss": 0.3})

        return _as_node(node, lambda: key_mod(msg, ctx, handler))

    kinds_seen: set[str] = set()
    malformed = 0
    previous_honest: list[Message] = []
    plain_global: dict | None = None
    for rnd in range(1, ROUNDS + 1):
        malicious = list(range(200, 260))
        grid = FakeGrid(HONEST + malicious)
        msgs = sent(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        by_node = {int(m.metadata.dst_node_id): m for m in msgs}
        locals_: dict[int, dict[str, np.ndarray]] = {}
        honest = [bank(by_node[n], n, WEIGHTS[n], locals_) for n in HONEST]
        assert not any(r.has_error() for r in honest), [r.error.reason for r in honest]
        # real he_mod output to mutate: a template bank, another key set, other parameters
        sink: dict = {}
        template = bank(by_node[malicious[0]], malicious[0], 500, sink)
        # ciphertexts a liar makes with another key set (claiming its own fingerprint)
        # and with other CKKS parameters (N = 8192)
        other_payload = RecordDict(
            {
                "arrays": ArrayRecord({CIPHERTEXTS: Array(encrypt_packed(other_ctx, np.ones(20)))}),
                RECORD_KEY: _he(template, fingerprint=context_fingerprint(other_ctx)),
            }
        )
        big_payload = RecordDict(
            {"arrays": ArrayRecord({CIPHERTEXTS: Array(encrypt_packed(big_ctx, np.ones(20)))})}
        )
        kinds = _content_kinds(
            _wrap(other_payload, by_node[malicious[1]], malicious[1]),
            _wrap(big_payload, by_node[malicious[2]], malicious[2]),
        )
        names = sorted(kinds)
        rng.shuffle(names)
        bad: list[Message] = []
        kind_of: dict[int, str] = {}
        attackers = iter(malicious[3:])
        for name in names:
            node = next(attackers)
            content = kinds[name](template)
            msg = _from(node, by_node[node], content)
            bad.append(msg)
            kind_of[node] = name
            kinds_seen.add(name)
        # error reply with escape codes and a long reason
        node = next(attackers)
        bad.append(
            _from(node, by_node[node], Error(code=1, reason="\x1b[31mboom\x1b[0m " + "x" * 5000))
        )
        kinds_seen.add("error-reply")
        # malformed first, then a valid-looking second reply from the same node
        node = next(attackers)
        first = _from(node, by_node[node], kinds["weight-string"](template))
        second = _from(node, by_node[node], _with(template))
        bad.append(first)
        kinds_seen.add("second-reply-after-rejection")
        # a node that was not sampled
        _as_server()
        outsider_msg = Message(
            content=RecordDict({"config": ConfigRecord({})}), message_type="train", dst_node_id=999
        )
        outsider_msg.metadata.__dict__["_message_id"] = outsider_msg.object_id
        bad.append(_from(999, outsider_msg, _with(template)))
        kinds_seen.add("not-sampled")
        # an error reply sent by one bank in another (honest) bank's name, before its reply
        node = next(attackers)
        forged = _from(node, by_node[HONEST[0]], Error(code=1, reason="dropped"), src=node)
        kinds_seen.add("forged-error-for-another-bank")
        # another node's message answered by an attacker (reply_to someone else)
        node = next(attackers)
        impostor = _from(node, by_node[HONEST[1]], _with(honest[1]), src=node)
        kinds_seen.add("answers-another-nodes-message")
        late: list[Message] = [second]  # after its rejected first reply
        # a copy of an honest bank's ciphertext under the attacker's own message (after it)
        node = next(attackers)
        late.append(_from(node, by_node[node], _with(honest[2])))
        kinds_seen.add("copied-honest-ciphertext")
        # a well-formed reply delivered twice (one reply per node: neither counts)
        node = next(attackers)
        twice = _from(node, by_node[node], _with(template))
        late += [twice, twice]
        kinds_seen.add("same-reply-twice")
        if previous_honest:
            # last round's honest reply replayed as is, and its ciphertext in a fresh message
            late.append(previous_honest[0])
            node = next(attackers)
            late.append(_from(node, by_node[node], _with(previous_honest[1])))
            kinds_seen.update({"replayed-previous-round-message", "replayed-previous-ciphertext"})
        mixed = honest + bad
        rng.shuffle(mixed)
        # the impersonations arrive first (the worst case), the copies last (they need
        # the original first)
        replies = [forged, impostor, *mixed, *late]
        before = [_fingerprint(r) for r in replies]
        n_events = len(audit.events)

        new_arrays, metrics = strategy.aggregate_train(rnd, replies)  # must not raise

        assert [_fingerprint(r) for r in replies] == before, "a reply was mutated"
        report = strategy.round_reports[rnd]
        assert sorted(report.accepted) == HONEST, [kind_of.get(n) for n in report.accepted]
        n_bad = len(replies) - len(HONEST)
        malformed += n_bad
        events = audit.events[n_events:]
        rejections = [e for e in events if e["event"] == "reply_rejected"]
        assert len(rejections) == n_bad
        assert all(e["reason"] and len(e["reason"]) <= 300 for e in rejections)
        assert not any("\x1b" in e["reason"] for e in rejections)
        assert metrics["clients-accepted"] == len(HONEST)
        assert new_arrays is not None
        total = sum(WEIGHTS.values())
        want = {k: sum(WEIGHTS[n] * locals_[n][k] for n in HONEST) / total for k in g0}
        got = decrypt_global(secret, new_arrays)
        for key in g0:
            np.testing.assert_allclose(got[key].numpy(), want[key], rtol=0, atol=1e-6)
            assert np.isfinite(got[key].numpy()).all()
        plain_global = want
        arrays = new_arrays
        previous_honest = honest

    assert plain_global is not None
    print(f"fuzz: {malformed} malformed replies of {len(kinds_seen)} kinds")
    assert len(kinds_seen) >= 20, sorted(kinds_seen)
    assert malformed >= 300, malformed


def _wrap(content: RecordDict, to: Message, node: int) -> Message:
    return _from(node, to, content)


def _from(node: int, to: Message, content: RecordDict | Error, src: int | None = None) -> Message:
    """A reply to ``to`` built as node ``node`` would build it; ``src`` forges its sender."""
    TaskIdentity.node_id = node
    try:
        msg = Message(content, reply_to=to)
    finally:
        _as_server()
    if src is not None:
        msg.metadata.__dict__["_src_node_id"] = src
    return msg
