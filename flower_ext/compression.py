"""Top-k sparsification with error feedback, and a compact wire format for it.

Pure NumPy kernels (no Flower, no torch) used by the client mod
(:mod:`flower_ext.mods.topk`) and the server wrapper
(:class:`flower_ext.strategies.TopKCompression`); the last section packs a
:class:`SparsePayload` into Flower records and back.

Top-k with error feedback (Stich et al., "Sparsified SGD with Memory",
NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", ICML 2019): a client adds the residual it kept
from earlier rounds to its update, sends the ``k`` entries of largest
magnitude, and keeps everything it did not send (including the rounding error
of the sent values) as the new residual::

    acc       = update + residual
    sent      = Q(acc restricted to top-k(|acc|))        Q: float32, float16 or int8
    residual' = acc - sent                               (exactly: sent + residual' == acc)

Selection is **global** by default: the ``k = ceil(ratio * d)`` largest entries of the
whole flattened update, whatever layer they sit in. Per-layer selection
(``scope="layer"``) spends ``ceil(ratio * n_l)`` entries on every layer; it guarantees every
layer moves each round but spends entries on layers whose updates are small
(biases, the output layer) at the expense of the ones that matter. With error
feedback the global rule starves no layer for long: what a layer does not send
accumulates in the residual until it is large enough to be sent.

Wire format of the indices: the sorted indices become gaps (first index, then
differences, all >= 1 after the first), written in the smallest unsigned dtype
with an escape: a token equal to the dtype's maximum ``M`` means "add ``M`` and
keep reading", so a gap ``g`` costs ``g // M + 1`` tokens. At 1% density the mean
gap is 100, so ``gap-u8`` costs about 1.1 bytes per entry (8.6 bits, close to
the ~8.6 bits of an Elias-Fano code for the same density). When the selection is
dense (above about 1 in 8), a ``bitmap`` of ``ceil(d / 8)`` bytes is smaller, and
the encoder picks whichever of ``gap-u8``, ``gap-u16``, ``gap-u32`` and ``bitmap``
is smallest for the payload at hand. Decoding is vectorised:
``indices = cumsum(tokens)[tokens != M]``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flower_ext.records import as_c_array

FORMAT_VERSION = 1
VALUE_DTYPES = ("float32", "float16", "int8")
SCOPES = ("global", "layer")
INDEX_ENCODINGS = ("gap-u8", "gap-u16", "gap-u32", "bitmap")
_GAP_DTYPES: dict[str, type[np.unsignedinteger]] = {
    "gap-u8": np.uint8,
    "gap-u16": np.uint16,
    "gap-u32": np.uint32,
}
FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
INT8_LEVELS = 127
#: The largest int8 scale whose decoded values (|q| <= 127) stay finite in float32.
INT8_MAX_SCALE = float(np.finfo(np.float32).max) / INT8_LEVELS / (1 + 1e-6)


class SparsePayloadError(ValueError):
    """A sparse payload that cannot be decoded safely (the reason is the message)."""


# --------------------------------------------------------------------------- selection
def num_selected(dim: int, ratio: float) -> int:
    """``k = ceil(ratio * dim)``, at least 1 and at most ``dim`` (0 when ``dim`` is 0)."""
    check_ratio(ratio)
    if dim <= 0:
        return 0
    return int(min(dim, max(1, math.ceil(ratio * dim - 1e-9))))


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
        raise ValueError(f"top-k ratio must be in (0, 1], got {ratio!r}")


def topk_indices(vector: NDArray[np.floating], k: int) -> NDArray[np.int64]:
    """Sorted indices of the ``k`` entries of largest magnitude (ties broken arbitrarily)."""
    dim = vector.shape[0]
    if k >= dim:
        return np.arange(dim, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    magnitude = np.abs(vector)
    idx = np.argpartition(magnitude, dim - k)[dim - k :]
    idx.sort()
    return idx.astype(np.int64, copy=False)


def select_indices(
    vector: NDArray[np.floating],
    ratio: float,
    scope: str = "global",
    offsets: tuple[int, ...] | None = None,
) -> NDArray[np.int64]:
    """Indices to send: global top-k, or top-k of each layer (``offsets`` delimit layers)."""
    if scope == "global":
        return topk_indices(vector, num_selected(vector.shape[0], ratio))
    if scope != "layer":
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if offsets is None:
        raise ValueError("scope='layer' needs the layer offsets")
    parts = []
    for start, stop in itertools.pairwise(offsets):
        chunk = vector[start:stop]
        parts.append(topk_indices(chunk, num_selected(stop - start, ratio)) + start)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


# --------------------------------------------------------------------------- indices
def index_encoding_sizes(indices: NDArray[np.int64], dim: int) -> dict[str, int]:
    """Bytes each index encoding would take for these sorted indices."""
    gaps = np.diff(indices, prepend=0) if indices.size else np.empty(0, dtype=np.int64)
    sizes = {}
    for name, dtype in _GAP_DTYPES.items():
        escape = int(np.iinfo(dtype).max)
        tokens = int(gaps.size + (gaps // escape).sum())
        sizes[name] = tokens * np.dtype(dtype).itemsize
    sizes["bitmap"] = (dim + 7) // 8
    return sizes


def encode_indices(
    indices: NDArray[np.integer], dim: int, encoding: str | None = None
) -> tuple[str, NDArray[np.unsignedinteger]]:
    """Encode sorted unique indices in ``[0, dim)``; ``encoding=None`` picks the smallest."""
    indices = np.asarray(indices, dtype=np.int64)
    if encoding is None:
        sizes = index_encoding_sizes(indices, dim)
        encoding = min(INDEX_ENCODINGS, key=lambda name: sizes[name])
    if encoding == "bitmap":
        bits = np.zeros(dim, dtype=np.bool_)
        bits[indices] = True
        return encoding, np.packbits(bits, bitorder="little")
    if encoding not in _GAP_DTYPES:
        raise ValueError(f"index encoding must be one of {INDEX_ENCODINGS}, got {encoding!r}")
    dtype = _GAP_DTYPES[encoding]
    escape = int(np.iinfo(dtype).max)
    gaps = np.diff(indices, prepend=0) if indices.size else np.empty(0, dtype=np.int64)
    escapes = gaps // escape
    ends = np.cumsum(escapes + 1) - 1  # position of each gap's final token
    tokens = np.full(int(ends[-1]) + 1 if ends.size else 0, escape, dtype=dtype)
    tokens[ends] = (gaps % escape).astype(dtype)
    return encoding, tokens


def decode_indices(
    encoding: str, data: NDArray[np.generic], dim: int, count: int
) -> NDArray[np.int64]:
    """Decode and validate: exactly ``count`` strictly increasing indices in ``[0, dim)``."""
    if data.ndim != 1:
        raise SparsePayloadError(f"indices must be a 1-D array, got shape {data.shape}")
    if encoding == "bitmap":
        if data.dtype != np.uint8:
            raise SparsePayloadError(f"bitmap indices must be uint8, got {data.dtype}")
        if data.size != (dim + 7) // 8:
            raise SparsePayloadError(
                f"bitmap has {data.size} bytes, a dimension of {dim} needs {(dim + 7) // 8}"
            )
        bits = np.unpackbits(data, bitorder="little")
        indices = np.flatnonzero(bits).astype(np.int64)
        if indices.size and indices[-1] >= dim:
            raise SparsePayloadError(f"index {int(indices[-1])} out of range [0, {dim})")
    elif encoding in _GAP_DTYPES:
        dtype = np.dtype(_GAP_DTYPES[encoding])
        if data.dtype != dtype:
            raise SparsePayloadError(f"'{encoding}' indices must be {dtype}, got {data.dtype}")
        escape = int(np.iinfo(dtype).max)
        if data.size and int(data[-1]) == escape:
            raise SparsePayloadError("indices end with an escape token (truncated gap)")
        positions = np.cumsum(data, dtype=np.int64)
        terminal = data != escape
        indices = positions[terminal]
        if indices.size > 1:
            steps = np.diff(indices)
            if (steps <= 0).any():
                raise SparsePayloadError("duplicate indices")
        if indices.size and indices[-1] >= dim:
            raise SparsePayloadError(f"index {int(indices[-1])} out of range [0, {dim})")
    else:
        raise SparsePayloadError(
            f"unknown index encoding {encoding!r}; known: {', '.join(INDEX_ENCODINGS)}"
        )
    if indices.size != count:
        raise SparsePayloadError(f"length mismatch: {indices.size} indices but {count} values")
    return indices


# --------------------------------------------------------------------------- values
def quantize_values(
    values: NDArray[np.floating], value_dtype: str, rng: np.random.Generator | None = None
) -> tuple[NDArray[np.generic], float]:
    """Values as sent, and the int8 scale (0.0 for float dtypes).

    ``int8`` is unbiased stochastic rounding on ``INT8_LEVELS`` levels per sign with one
    scale ``max|v| / 127`` per payload: ``q = floor(v / s + u)``, ``u ~ U[0, 1)``, so
    ``E[q * s] = v``. ``float16`` saturates at +-65504 (the excess stays in the residual).
    """
    values = np.asarray(values, dtype=np.float32)
    if value_dtype == "float32":
        return values, 0.0
    if value_dtype == "float16":
        return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), 0.0
    if value_dtype == "int8":
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale32 = np.float32(peak / INT8_LEVELS)
        if not scale32 >= FLOAT32_TINY:
            # Zero, or so small that the scale would be subnormal: send zeros (the values stay
            # in the residual) rather than a scale the decoder rejects or divides by.
            return np.zeros(values.shape, dtype=np.int8), 0.0
        rng = rng if rng is not None else np.random.default_rng()
        scaled = values / scale32 + rng.random(values.shape, dtype=np.float32)
        q = np.clip(np.floor(scaled), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        return q, float(scale32)
    raise ValueError(f"value dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")


def dequantize_values(
    data: NDArray[np.generic], value_dtype: str, scale: float = 0.0
) -> NDArray[np.float32]:
    """Float32 values from what was sent; validates dtype, shape and finiteness."""
    if value_dtype not in VALUE_DTYPES:
        raise SparsePayloadError(f"unknown value dtype {value_dtype!r}")
    if data.ndim != 1:
        raise SparsePayloadError(f"values must be a 1-D array, got shape {data.shape}")
    if data.dtype != np.dtype(value_dtype):
        raise SparsePayloadError(f"values declared {value_dtype} but hold {data.dtype}")
    if value_dtype == "int8":
        check_int8_scale(scale)
        return data.astype(np.float32) * np.float32(scale)
    if scale != 0.0:
        raise SparsePayloadError(f"scale must be 0 for {value_dtype} values, got {scale:.3g}")
    out = data.astype(np.float32)
    if not np.isfinite(out.sum(dtype=np.float64)):  # one pass; float64 cannot overflow here
        raise SparsePayloadError("values contain NaN or Inf")
    return out


def check_int8_scale(scale: float) -> None:
    """Reject an int8 scale that is not finite, negative, subnormal or absurd.

    Absurd means ``127 * scale`` overflows float32: every decoded value must be a
    finite float32, and an encoder never produces a scale above ``max|v| / 127``.
    """
    if not math.isfinite(scale) or scale < 0.0:
        raise SparsePayloadError(f"int8 scale must be finite and >= 0, got {scale:.3g}")
    if scale > INT8_MAX_SCALE:
        raise SparsePayloadError(
            f"int8 scale {scale:.3g} is absurd: 127 x scale overflows float32 "
            f"(at most {INT8_MAX_SCALE:.3g})"
        )
    if 0.0 < scale < FLOAT32_TINY:
        raise SparsePayloadError(f"int8 scale {scale:.3g} is subnormal in float32")


# --------------------------------------------------------------------------- payload
@dataclass(frozen=True)
class SparsePayload:
    """What a client sends instead of a dense update."""

    dim: int
    index_encoding: str
    indices: NDArray[np.unsignedinteger]  # encoded
    value_dtype: str
    values: NDArray[np.generic]  # as sent (float32, float16 or int8)
    scale: float = 0.0  # int8 only

    @property
    def count(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        """Raw bytes of indices and values (the message envelope comes on top)."""
        return int(self.indices.nbytes + self.values.nbytes)

    def decode(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Validated ``(indices, float32 values)``; raises :class:`SparsePayloadError`."""
        if self.dim < 0:
            raise SparsePayloadError(f"dimension must be >= 0, got {self.dim}")
        if self.value_dtype == "int8" and self.values.dtype == np.int8:
            check_int8_consistency(self.values, self.scale)
        values = dequantize_values(self.values, self.value_dtype, self.scale)
        if not np.isfinite(values.sum(dtype=np.float64)):
            raise SparsePayloadError("decoded values are not finite")
        indices = decode_indices(self.index_encoding, self.indices, self.dim, values.shape[0])
        return indices, values

    def to_dense(self) -> NDArray[np.float32]:
        indices, values = self.decode()
        dense = np.zeros(self.dim, dtype=np.float32)
        dense[indices] = values
        return dense


def encode_sparse(
    indices: NDArray[np.integer],
    values: NDArray[np.floating],
    dim: int,
    value_dtype: str = "float32",
    *,
    index_encoding: str | None = None,
    rng: np.random.Generator | None = None,
) -> SparsePayload:
    """Pack sorted unique indices and their values (quantised as ``value_dtype``)."""
    encoding, encoded = encode_indices(indices, dim, index_encoding)
    data, scale = quantize_values(values, value_dtype, rng)
    return SparsePayload(dim, encoding, encoded, value_dtype, data, scale)


def check_int8_consistency(data: NDArray[np.int8], scale: float) -> None:
    """The encoder's invariants: a zero scale sends zeros; a positive one reaches |q| >= 126.

    With ``scale = max|v| / 127`` the largest entry quantises to 127, or to 126 when float32
    rounding puts it a hair below 127 and the random offset is 0; a payload whose largest
    ``|q|`` is smaller carries an inflated scale.
    """
    if not data.size:
        if scale != 0.0:
            raise SparsePayloadError(f"int8 scale {scale:.3g} for an empty payload (must be 0)")
        return
    peak = int(np.abs(data.astype(np.int16)).max())
    if scale == 0.0 and peak:
        raise SparsePayloadError("int8 values are nonzero but the scale is 0")
    if scale > 0.0 and peak < INT8_LEVELS - 1:
        raise SparsePayloadError(
            f"int8 scale {scale:.3g} does not match the values (largest |q| is {peak}; "
            f"the encoder always reaches {INT8_LEVELS - 1} or {INT8_LEVELS})"
        )


@dataclass(frozen=True)
class TopKResult:
    payload: SparsePayload
    indices: NDArray[np.int64]  # sorted, decoded
    sent: NDArray[np.float32]  # the values the server will see (after quantisation)
    residual: NDArray[np.float32]  # acc - sent: what is carried to the next round


def topk_compress(
    update: NDArray[np.floating],
    ratio: float,
    residual: NDArray[np.floating] | None = None,
    *,
    value_dtype: str = "float32",
    scope: str = "global",
    offsets: tuple[int, ...] | None = None,
    index_encoding: str | None = None,
    rng: np.random.Generator | None = None,
) -> TopKResult:
    """Top-k of ``update + residual`` and the new residual (error feedback).

    Pass ``residual=None`` for no memory (the returned residual is then what
    this round dropped, which a caller without error feedback discards).
    ``sent + residual' == update + residual`` holds entry by entry: the new
    residual is the accumulator with the sent values subtracted, quantisation
    error included.
    """
    acc = np.asarray(update, dtype=np.float32)
    if acc.ndim != 1:
        raise ValueError(f"update must be a flat vector, got shape {acc.shape}")
    if residual is not None:
        if residual.shape != acc.shape:
            raise ValueError(f"residual shape {residual.shape} != update shape {acc.shape}")
        acc = acc + residual.astype(np.float32, copy=False)
    else:
        acc = acc.copy()
    indices = select_indices(acc, ratio, scope, offsets)
    payload = encode_sparse(
        indices, acc[indices], acc.shape[0], value_dtype, index_encoding=index_encoding, rng=rng
    )
    sent = dequantize_values(payload.values, value_dtype, payload.scale)
    acc[indices] -= sent  # acc becomes the new residual
    return TopKResult(payload, indices, sent, acc)


def layout_signature(keys: tuple[str, ...], shapes: tuple, dtypes: tuple[str, ...]) -> str:
    """A short fingerprint of a model layout (keys, shapes, dtypes)."""
    digest = hashlib.sha256(repr((tuple(keys), tuple(shapes), tuple(dtypes))).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- Flower records
# A compressed train reply carries, in place of its ArrayRecord of weights, an
# ArrayRecord with INDICES_KEY and VALUES_KEY, plus a ConfigRecord under
# RECORD_KEY saying how to read them. Everything else in the reply (metrics,
# client info) is untouched. The two arrays hold raw little-endian bytes
# (stype RAW_STYPE) rather than ``.npy``: the 128-byte ``.npy`` header per array
# would be 5-10% of a small payload.
RECORD_KEY = "topk"
#: ConfigRecord a reply carries when topk_mod had to send it dense: {"reason": str}.
DENSE_RECORD_KEY = "topk.dense"
INDICES_KEY = "topk.indices"
VALUES_KEY = "topk.values"
RAW_STYPE = "flower_ext.raw-le"
_RAW_DTYPES = ("uint8", "uint16", "uint32", "float32", "float16", "int8")
_CONFIG_FIELDS = {
    "format": int,
    "dim": int,
    "count": int,
    "index-encoding": str,
    "values": str,
    "scale": float,
    "layout": str,
}


def raw_array(data: NDArray[np.generic]) -> Any:
    """A Flower ``Array`` holding a 1-D array's raw little-endian bytes."""
    from flwr.app import Array

    data = np.ascontiguousarray(data)
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    return Array(
        dtype=str(data.dtype), shape=(int(data.size),), stype=RAW_STYPE, data=little.tobytes()
    )


def raw_view(array: Any) -> NDArray[np.generic]:
    """Zero-copy view on a :func:`raw_array`; raises :class:`SparsePayloadError`."""
    if array.stype != RAW_STYPE:
        raise SparsePayloadError(f"unsupported array serialisation '{array.stype}'")
    if array.dtype not in _RAW_DTYPES:
        raise SparsePayloadError(f"dtype '{array.dtype}' not allowed in a sparse payload")
    shape = tuple(array.shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 0:
        raise SparsePayloadError(f"payload arrays must be 1-D, got shape {shape}")
    dtype = np.dtype(array.dtype).newbyteorder("<")
    if len(array.data) != shape[0] * dtype.itemsize:
        raise SparsePayloadError(
            f"array declares {shape[0]} x {array.dtype} but holds {len(array.data)} bytes"
        )
    return np.frombuffer(array.data, dtype=dtype)


def payload_to_records(
    payload: SparsePayload, layout_sig: str, extra: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """``(ArrayRecord, ConfigRecord)`` carrying ``payload``."""
    from flwr.app import ArrayRecord, ConfigRecord

    arrays = ArrayRecord(
        {INDICES_KEY: raw_array(payload.indices), VALUES_KEY: raw_array(payload.values)}
    )
    config = ConfigRecord(
        {
            "format": FORMAT_VERSION,
            "dim": int(payload.dim),
            "count": payload.count,
            "index-encoding": payload.index_encoding,
            "values": payload.value_dtype,
            "scale": float(payload.scale),
            "layout": layout_sig,
            **(extra or {}),
        }
    )
    return arrays, config


def payload_from_records(arrays: Any, config: Any) -> tuple[SparsePayload, dict[str, Any]]:
    """Read a payload back (zero-copy views); raises :class:`SparsePayloadError`.

    Returns the payload (not yet decoded: call :meth:`SparsePayload.decode`) and
    the marker record's fields.
    """
    fields: dict[str, Any] = {}
    for name, kind in _CONFIG_FIELDS.items():
        if name not in config:
            raise SparsePayloadError(f"topk record lacks '{name}'")
        value = config[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SparsePayloadError(f"topk record '{name}' must be {kind.__name__}")
        fields[name] = value
    if fields["format"] != FORMAT_VERSION:
        raise SparsePayloadError(
            f"topk format {fields['format']} not supported (this server reads {FORMAT_VERSION})"
        )
    if set(arrays.keys()) != {INDICES_KEY, VALUES_KEY}:
        raise SparsePayloadError(
            f"sparse ArrayRecord must hold exactly '{INDICES_KEY}' and '{VALUES_KEY}', "
            f"got {sorted(arrays.keys())}"
        )
    indices = raw_view(arrays[INDICES_KEY])
    values = raw_view(arrays[VALUES_KEY])
    if values.shape[0] != fields["count"]:
        raise SparsePayloadError(
            f"length mismatch: record says {fields['count']} values, array holds {values.shape[0]}"
        )
    payload = SparsePayload(
        dim=fields["dim"],
        index_encoding=fields["index-encoding"],
        indices=indices,  # type: ignore[arg-type]
        value_dtype=fields["values"],
        values=values,
        scale=fields["scale"],
    )
    return payload, fields


# --------------------------------------------------------------------------- dense models
# Both sides read the round's global model into a GlobalModel: the client from what it
# received, the server from what it sent. They agree on the flat order (arrays in key
# order, each in C order whatever its memory order), the dimension and the fingerprint.
# Arrays are read with ``Array.numpy()``: the global model and the client's own weights
# are trusted input, and ``numpy()`` accepts every layout Flower's FedAvg accepts
# (0-d, Fortran order, zero-size); untrusted client bytes only ever go through
# :func:`raw_view`.
class ModelFormatError(ValueError):
    """A model (or a reply's weights) that top-k cannot compress or rebuild."""


def expected_count(sizes: tuple[int, ...], ratio: float, scope: str) -> int:
    """How many entries a client sends for arrays of ``sizes`` at ``ratio`` and ``scope``."""
    if scope == "global":
        return num_selected(int(sum(sizes)), ratio)
    if scope == "layer":
        return int(sum(num_selected(size, ratio) for size in sizes))
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _numeric(key: str, array: Any) -> NDArray[np.generic]:
    from flower_ext.records import array_view

    try:
        value = array_view(array)  # zero-copy, read-only: 8x faster than numpy() at 1M
    except Exception:
        try:  # layouts array_view may refuse (Fortran order, ...): numpy() reads them all
            value = np.asarray(array.numpy())
        except Exception as err:
            raise ModelFormatError(f"array '{key}' is unreadable ({type(err).__name__})") from err
    if value.dtype.kind not in "biuf" or value.dtype.itemsize > 8:
        raise ModelFormatError(
            f"array '{key}' has dtype {value.dtype}; top-k handles bool, integer and "
            "float16/32/64 arrays"
        )
    return value


def _int_bounds(dtype: np.dtype) -> tuple[float, float]:
    """The integer range of ``dtype`` as floats that convert back without overflow."""
    info = np.iinfo(dtype)
    low, high = float(info.min), float(info.max)
    if high > info.max:  # 2**63 - 1 rounds up to 2**63 in float64
        high = float(np.nextafter(high, 0.0))
    return low, high


def _float_to(values: NDArray[np.floating], dtype: np.dtype) -> NDArray[np.generic]:
    """``values`` in ``dtype``: integers rounded half-to-even and saturated, bools rounded
    and clipped to {0, 1}, floats rounded (may overflow to Inf; the caller checks)."""
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            return values.astype(dtype)
    if dtype.kind == "b":
        return np.rint(values) >= 1.0
    low, high = _int_bounds(dtype)
    return np.clip(np.rint(values), low, high).astype(dtype)


def _all_finite(values: NDArray[np.generic]) -> bool:
    if values.dtype.kind != "f":
        return True
    if values.dtype.itemsize <= 4:  # one pass, no temporary; a float64 sum cannot overflow
        return bool(np.isfinite(values.sum(dtype=np.float64)))
    return bool(np.isfinite(values).all())


class GlobalModel:
    """A round's global model, read once: its arrays, layout and fingerprint.

    Handles every array Flower's FedAvg averages: bool, signed and unsigned integer and
    float16/32/64 dtypes, 0-d, zero-size and Fortran-ordered arrays.

    Parameters
    ----------
    record : ArrayRecord
        The global model.

    Raises
    ------
    ModelFormatError
        If an array is unreadable or of a dtype top-k cannot carry (complex, object, ...).
    """

    def __init__(self, record: Any) -> None:
        arrays = {str(key): _numeric(str(key), array) for key, array in record.items()}
        self.records: tuple[Any, ...] = tuple(record.values())
        self.keys: tuple[str, ...] = tuple(arrays)
        self.arrays: tuple[NDArray[np.generic], ...] = tuple(arrays.values())
        self.shapes: tuple[tuple[int, ...], ...] = tuple(a.shape for a in self.arrays)
        self.dtypes: tuple[str, ...] = tuple(str(a.dtype) for a in self.arrays)
        self.sizes: tuple[int, ...] = tuple(int(a.size) for a in self.arrays)
        self.offsets: tuple[int, ...] = (0, *itertools.accumulate(self.sizes))
        self.dim = self.offsets[-1]
        self.signature = layout_signature(self.keys, self.shapes, self.dtypes)

    def mismatch(self, record: Any) -> str | None:
        """Why ``record`` cannot be an update of this model (keys or shapes), or ``None``.

        Dtypes may differ: the update is computed in float and rebuilt in the model's dtypes.
        """
        keys = tuple(record.keys())
        if keys != self.keys:
            missing = sorted(set(self.keys) - set(keys))
            extra = sorted(set(keys) - set(self.keys))
            if missing or extra:
                return f"array keys differ: missing {missing[:5]}, unexpected {extra[:5]}"
            return "array keys are in a different order"
        for key, shape in zip(self.keys, self.shapes, strict=True):
            got = tuple(record[key].shape)
            if got != shape:
                return f"array '{key}' has shape {got}, expected {shape}"
        return None

    def update_of(self, record: Any) -> NDArray[np.float32]:
        """``record - self`` as one flat float32 vector (each difference taken in float64,
        so an int64 counter or a float64 weight loses nothing before the final rounding)."""
        why = self.mismatch(record)
        if why:
            raise ModelFormatError(why)
        out = np.empty(self.dim, dtype=np.float32)
        for i, key in enumerate(self.keys):
            local = _numeric(key, record[key])
            start, stop = self.offsets[i], self.offsets[i + 1]
            if local.dtype == self.arrays[i].dtype == np.float32:
                np.subtract(local, self.arrays[i], out=out[start:stop].reshape(local.shape))
                continue
            diff = local.astype(np.float64) - self.arrays[i].astype(np.float64)
            with np.errstate(over="ignore"):
                out[start:stop] = diff.reshape(-1)
        return out

    def apply(self, update: NDArray[np.float32]) -> Any:
        """A new ArrayRecord ``self + update`` (a dense flat update); see :meth:`apply_sparse`."""
        update = np.asarray(update, dtype=np.float32)
        if update.shape != (self.dim,):
            raise SparsePayloadError(f"update has shape {update.shape}, model needs ({self.dim},)")
        return self.apply_sparse(np.arange(self.dim, dtype=np.int64), update)

    def apply_sparse(self, indices: NDArray[np.int64], values: NDArray[np.float32]) -> Any:
        """A new ArrayRecord: this model with ``values`` added at the flat ``indices``.

        ``indices`` must be sorted, unique and in range (:meth:`SparsePayload.decode`
        guarantees it). Result in this model's keys, shapes and dtypes, C order. Floats
        are added at least in float32 (float64 arrays in float64); integer and bool arrays
        in float64, then rounded half-to-even and saturated to their range. An array no
        index falls in is shared with the model, not copied.

        Raises
        ------
        SparsePayloadError
            If a float array would overflow its dtype (a value beyond float16's 65504, say).
        """
        from flwr.app import Array, ArrayRecord

        bounds = np.searchsorted(indices, self.offsets)
        out = {}
        for i, key in enumerate(self.keys):
            base = self.arrays[i]
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if lo == hi and base.flags.c_contiguous and base.dtype.isnative:
                out[key] = self.records[i]  # untouched: the very Array that was sent
                continue
            where = indices[lo:hi] - self.offsets[i]
            new = np.array(base, order="C", copy=True)
            flat = new.reshape(-1)
            if base.dtype == np.float32 or base.dtype == np.float64:
                flat[where] += values[lo:hi].astype(base.dtype, copy=False)
            else:  # float16 via float32; integers and bools via float64, touched entries only
                work = np.float32 if base.dtype.kind == "f" else np.float64
                flat[where] = _float_to(flat[where].astype(work) + values[lo:hi], base.dtype)
            if base.dtype.kind == "f" and not np.isfinite(flat[where]).all():
                raise SparsePayloadError(f"update makes array '{key}' overflow {base.dtype}")
            out[key] = Array(new)
        return ArrayRecord(out)

    def cast(self, record: Any) -> tuple[Any, list[str]]:
        """``record`` with every array of this model's keys in this model's shape and dtype.

        What an inner strategy returns may differ from the model it was given: Flower's
        FedAvg returns an int64 or bool buffer as float64. Such arrays are cast back
        (integers rounded half-to-even and saturated; bools rounded); arrays already right
        are kept as they are, unknown keys pass through. Returns the record and a note for
        each array that could not be cast (wrong size, non-finite values for an integer).
        """
        from flwr.app import Array, ArrayRecord

        index = {key: i for i, key in enumerate(self.keys)}
        notes: list[str] = []
        changed = False
        out = {}
        for key, array in record.items():
            i = index.get(key)
            if i is None or (
                tuple(array.shape) == self.shapes[i] and str(array.dtype) == self.dtypes[i]
            ):
                out[key] = array
                continue
            value = np.asarray(array.numpy())
            if value.size != self.sizes[i] or value.dtype.kind not in "biuf":
                notes.append(f"'{key}' is {value.dtype}{value.shape}, not {self.dtypes[i]}")
                out[key] = array
                continue
            target = np.dtype(self.dtypes[i])
            if target.kind != "f" and not _all_finite(value):
                notes.append(f"'{key}' holds NaN or Inf and cannot become {target}")
                out[key] = array
                continue
            source = value.astype(np.float64) if value.dtype.kind != "f" else value
            new = _float_to(source.reshape(self.shapes[i]), target)
            out[key] = Array(as_c_array(new))
            changed = True
        return (ArrayRecord(out) if changed else record), notes
