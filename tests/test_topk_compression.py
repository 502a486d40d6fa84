"""Top-k kernels: selection, index encodings, quantisation, error feedback, validation."""

from __future__ import annotations

import numpy as np
import pytest

from flower_ext.compression import (
    INDEX_ENCODINGS,
    SparsePayload,
    SparsePayloadError,
    decode_indices,
    encode_indices,
    encode_sparse,
    num_selected,
    select_indices,
    topk_compress,
    topk_indices,
)

RNG = np.random.default_rng(7)


def test_topk_indices_are_the_largest_magnitudes_sorted():
    v = np.array([0.1, -5.0, 0.0, 3.0, -0.2, 4.0], dtype=np.float32)
    np.testing.assert_array_equal(topk_indices(v, 3), [1, 3, 5])
    assert num_selected(1000, 0.01) == 10
    assert num_selected(5, 0.01) == 1  # never zero
    assert num_selected(10, 1.0) == 10
    with pytest.raises(ValueError, match="ratio"):
        num_selected(10, 0.0)


def test_per_layer_scope_gives_every_layer_entries():
    big = np.full(100, 10.0, dtype=np.float32)
    small = np.full(100, 0.01, dtype=np.float32)
    v = np.concatenate([big, small])
    glob = select_indices(v, 0.05, "global")
    layer = select_indices(v, 0.05, "layer", offsets=(0, 100, 200))
    assert (glob < 100).all()  # global top-k ignores the small layer
    assert (layer < 100).sum() == 5 and (layer >= 100).sum() == 5


@pytest.mark.parametrize("encoding", INDEX_ENCODINGS)
@pytest.mark.parametrize("density", [0.0005, 0.01, 0.3])
def test_index_encodings_round_trip(encoding, density):
    dim = 200_003
    idx = np.sort(RNG.choice(dim, size=max(1, int(density * dim)), replace=False))
    idx[0] = 0 if density > 0.1 else idx[0]
    idx[-1] = dim - 1  # the extreme gap and the last index
    idx = np.unique(idx)
    name, data = encode_indices(idx, dim, encoding)
    assert name == encoding
    np.testing.assert_array_equal(decode_indices(name, data, dim, idx.size), idx)


def test_large_gaps_use_escapes():
    dim = 1_000_000
    idx = np.array([0, 70_000, 999_999])  # gaps > 65535 and > 255
    for encoding in ("gap-u8", "gap-u16"):
        name, data = encode_indices(idx, dim, encoding)
        np.testing.assert_array_equal(decode_indices(name, data, dim, 3), idx)


def test_encoder_picks_the_smallest_encoding():
    dim = 100_000
    sparse = np.sort(RNG.choice(dim, 1000, replace=False))
    dense = np.sort(RNG.choice(dim, 40_000, replace=False))
    assert encode_indices(sparse, dim)[0] == "gap-u8"
    assert encode_indices(dense, dim)[0] == "bitmap"
    # 1% density: about 1.1 bytes per index, not 4 (int32) or 2 (uint16)
    assert encode_indices(sparse, dim)[1].nbytes < 1.2 * sparse.size


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "int8"])
def test_encode_decode_round_trip(value_dtype):
    dim = 10_000
    update = RNG.normal(size=dim).astype(np.float32)
    result = topk_compress(update, 0.02, value_dtype=value_dtype, rng=np.random.default_rng(0))
    idx, values = result.payload.decode()
    np.testing.assert_array_equal(idx, result.indices)
    np.testing.assert_array_equal(values, result.sent)
    assert idx.size == 200
    dense = result.payload.to_dense()
    assert np.count_nonzero(dense) <= 200
    tol = {"float32": 0, "float16": 1e-3, "int8": 2 * np.abs(update).max() / 127}[value_dtype]
    np.testing.assert_allclose(values, update[idx], atol=tol, rtol=1e-3 if tol else 0)
    # The selected entries are the largest: every unsent entry is smaller.
    unsent = np.delete(np.abs(update), idx)
    assert unsent.max() <= np.abs(update[idx]).min()


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "int8"])
def test_error_feedback_carries_exactly_the_unsent_mass(value_dtype):
    dim = 5_000
    rng = np.random.default_rng(1)
    residual = np.zeros(dim, dtype=np.float32)
    total_update = np.zeros(dim, dtype=np.float64)
    total_sent = np.zeros(dim, dtype=np.float64)
    for _ in range(5):
        update = rng.normal(size=dim).astype(np.float32)
        result = topk_compress(update, 0.01, residual, value_dtype=value_dtype, rng=rng)
        sent = result.payload.to_dense()
        # sent + new residual == update + old residual, entry by entry (exact in float32)
        np.testing.assert_array_equal(sent + result.residual, update + residual)
        total_update += update
        total_sent += sent
        residual = result.residual
    # Nothing is lost over rounds: everything not yet sent is in the residual.
    np.testing.assert_allclose(total_sent + residual, total_update, atol=1e-4)


def test_int8_stochastic_rounding_is_unbiased():
    values = np.full(20_000, 0.3, dtype=np.float32)
    values[0] = 1.0  # sets the scale: 1/127
    payload = encode_sparse(np.arange(20_000), values, 20_000, "int8", rng=np.random.default_rng(3))
    _, decoded = payload.decode()
    assert abs(decoded[1:].mean() - 0.3) < 1e-3
    assert payload.values.dtype == np.int8


def _payload(**changes) -> SparsePayload:
    base = encode_sparse(
        np.array([1, 5, 9]), np.array([1.0, -2.0, 3.0]), 10, index_encoding="gap-u8"
    )
    fields = {**base.__dict__, **changes}
    return SparsePayload(**fields)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"indices": np.array([1, 4, 20], dtype=np.uint8)}, "out of range"),
        ({"indices": np.array([1, 0, 4], dtype=np.uint8)}, "duplicate"),
        ({"indices": np.array([1, 4], dtype=np.uint8)}, "length mismatch"),
        ({"indices": np.array([1, 4, 4], dtype=np.int32)}, "must be uint8"),
        ({"indices": np.array([1, 4, 255], dtype=np.uint8)}, "escape"),
        ({"values": np.array([1.0, 2.0, 3.0])}, "float64"),
        ({"values": np.array([1.0, np.nan, 3.0], dtype=np.float32)}, "NaN"),
        ({"values": np.array([1.0, np.inf, 3.0], dtype=np.float32)}, "NaN or Inf"),
        ({"index_encoding": "zip"}, "unknown index encoding"),
        ({"value_dtype": "int4"}, "unknown value dtype"),
        ({"value_dtype": "int8", "values": np.ones(3, np.int8), "scale": float("nan")}, "scale"),
        ({"index_encoding": "bitmap", "indices": np.array([0xFF, 0xFF], np.uint8)}, "range"),
        ({"index_encoding": "bitmap", "indices": np.array([0x01], np.uint8)}, "bytes"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(changes, reason):
    with pytest.raises(SparsePayloadError, match=reason):
        _payload(**changes).decode()


def test_one_million_parameters_at_one_percent_is_small():
    dim = 1_000_000
    update = RNG.normal(size=dim).astype(np.float32)
    f32 = topk_compress(update, 0.01).payload
    f16 = topk_compress(update, 0.01, value_dtype="float16").payload
    assert f32.nbytes < 0.013 * 4 * dim
    assert f16.nbytes < 0.008 * 4 * dim


def test_int8_scales_that_cannot_come_from_the_encoder_are_rejected():
    """Issue 11 item 5: a scale of 3e38 used to decode to +Inf and pass."""
    idx = np.array([0, 2], dtype=np.int64)

    def payload(q, scale):
        return SparsePayload(
            4, *encode_indices(idx, 4, "gap-u8"), "int8", np.array(q, np.int8), scale
        )

    cases = {
        3e38: "absurd",
        float("inf"): "finite",
        float("nan"): "finite",
        -1.0: ">= 0",
        1e-45: "subnormal",
    }
    for scale, reason in cases.items():
        with pytest.raises(SparsePayloadError, match=reason):
            payload([127, -127], scale).decode()
    with pytest.raises(SparsePayloadError, match="largest"):
        payload([1, -1], 1e36).decode()  # finite, but the scale was inflated 127 times
    with pytest.raises(SparsePayloadError, match="scale is 0"):
        payload([127, 3], 0.0).decode()
    _, values = payload([127, -126], 0.5).decode()
    np.testing.assert_allclose(values, [63.5, -63.0])
    with pytest.raises(SparsePayloadError, match="scale must be 0"):
        SparsePayload(
            4, *encode_indices(idx, 4, "gap-u8"), "float32", np.ones(2, np.float32), 2.0
        ).decode()


def test_int8_encoder_always_passes_its_own_checks():
    rng = np.random.default_rng(3)
    for magnitude in (1e-40, 1e-30, 1e-3, 1.0, 1e30, 3e38):
        for _ in range(20):
            values = np.clip(rng.normal(size=50) * magnitude, -3e38, 3e38).astype(np.float32)
            idx = np.sort(rng.choice(1000, size=50, replace=False))
            payload = encode_sparse(idx, values, 1000, "int8", rng=rng)
            _, decoded = payload.decode()  # never raises on honest input
            assert np.isfinite(decoded).all()
