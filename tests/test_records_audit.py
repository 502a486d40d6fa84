"""Zero-copy array reads, model hashing, wire size, and the hash-chained audit trail."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import arrays_of, outgoing
from flwr.app import Array

from flower_ext.audit import AuditTrail, verify_audit_trail
from flower_ext.records import ArrayLayout, RecordFormatError, array_view, arrays_sha256, wire_size


def test_array_view_is_zero_copy_and_exact():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = Array(x)
    view = array_view(arr)
    np.testing.assert_array_equal(view, x)
    assert not view.flags.writeable  # a view on the message's bytes, not a copy
    assert np.shares_memory(view, np.frombuffer(arr.data, dtype=np.uint8))


def test_array_view_rejects_lying_headers():
    good = Array(np.zeros((2, 3), dtype=np.float32))
    liar = Array(dtype="float32", shape=(3, 3), stype=good.stype, data=good.data)
    with pytest.raises(RecordFormatError, match="declares"):
        array_view(liar)
    truncated = Array(dtype="float32", shape=(2, 3), stype=good.stype, data=good.data[:-4])
    with pytest.raises(RecordFormatError, match="payload"):
        array_view(truncated)
    with pytest.raises(RecordFormatError, match=r"\.npy"):
        array_view(Array(dtype="float32", shape=(1,), stype=good.stype, data=b"garbage!!!!!"))


def test_layout_roundtrip_and_mismatch():
    rec = arrays_of({"a": np.ones((2, 2), np.float32), "b": np.arange(3, dtype=np.float32)})
    layout = ArrayLayout.of(rec)
    flat = layout.flatten(rec)
    assert flat.tolist() == [1, 1, 1, 1, 0, 1, 2]
    back = layout.unflatten(flat)
    assert arrays_sha256(back) == arrays_sha256(rec)
    other = arrays_of({"a": np.ones((2, 2), np.float32)})
    assert "missing ['b']" in layout.mismatch(other)


def test_wire_size_counts_the_payload(as_server):
    small = outgoing(arrays_of({"w": np.zeros(10, np.float32)}), 5)
    big = outgoing(arrays_of({"w": np.zeros(100_000, np.float32)}), 5)
    assert wire_size(big) - wire_size(small) >= 4 * (100_000 - 10)
    assert wire_size(big) < 4 * 100_000 * 1.01 + 2000


def test_audit_chain_detects_edits(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(path)
    for r in range(1, 4):
        trail.record("round_end", round=r, auc=0.7 + r / 100, nan=float("nan"))
    assert verify_audit_trail(path) is None
    lines = path.read_text().splitlines()
    event = json.loads(lines[1])
    event["auc"] = 0.99
    lines[1] = json.dumps(event)
    path.write_text("\n".join(lines) + "\n")
    problem = verify_audit_trail(path)
    assert problem is not None and problem.line == 2
    # A resumed trail continues the chain.
    path2 = tmp_path / "a2.jsonl"
    AuditTrail(path2).record("x")
    AuditTrail(path2).record("y")
    assert verify_audit_trail(path2) is None
    # Dropping a line breaks it too.
    lines = path2.read_text().splitlines()
    path2.write_text(lines[1] + "\n")
    assert verify_audit_trail(path2).line == 1
