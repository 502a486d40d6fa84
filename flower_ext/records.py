"""Moving model weights between Flower records and flat NumPy vectors.

Flower stores each ``Array`` as ``.npy`` bytes. ``Array.numpy()`` parses them
through ``np.load`` and copies; with 50 clients of 1M parameters that copy costs
more than the aggregation itself. :func:`array_view` reads the header once and
returns a read-only view on the payload (no copy), after checking that the bytes
say what the ``Array`` claims (dtype, shape, memory order) so a client cannot
smuggle a different shape past validation. A malformed ``.npy`` header (forged by a
client, it survives Flower's wire format) is a :class:`RecordFormatError`, never a
crash.
"""

from __future__ import annotations

import ast
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from numpy.typing import NDArray

NUMPY_STYPE = "numpy.ndarray"
_NPY_MAGIC = b"\x93NUMPY"


class RecordFormatError(ValueError):
    """An ArrayRecord or Array is not what it claims to be."""


#: dtype kinds a model array may have: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = frozenset("biuf")
#: Integer (and bool) values are exact in float32 only up to 2**24.
_FLOAT32_EXACT_INT = 2**24


def _npy_payload_offset(data: bytes | memoryview) -> tuple[int, dict[str, object]]:
    """Offset of the array payload in ``.npy`` bytes, and the parsed, checked header."""
    if len(data) < 10 or bytes(data[:6]) != _NPY_MAGIC:
        raise RecordFormatError("array bytes are not in .npy format")
    major = data[6]
    if major == 1:
        header_len = int.from_bytes(bytes(data[8:10]), "little")
        start = 10
    elif major in (2, 3):
        if len(data) < 12:
            raise RecordFormatError("truncated .npy header")
        header_len = int.from_bytes(bytes(data[8:12]), "little")
        start = 12
    else:
        raise RecordFormatError(f"unsupported .npy version {major}")
    if header_len > 65536 or start + header_len > len(data):
        raise RecordFormatError(f".npy header length {header_len} does not fit the bytes")
    return start + header_len, _parse_npy_header(bytes(data[start : start + header_len]))


@lru_cache(maxsize=1024)
def _parse_npy_header(header_bytes: bytes) -> dict[str, object]:
    """The ``.npy`` header dict, checked field by field (cached: every client's layer has
    the same header, and parsing it dominates decoding at small sizes). Callers must not
    modify it.

    A forged header can hold anything ``ast.literal_eval`` accepts (unhashable keys,
    strings for shapes, deep nesting); every such case is a :class:`RecordFormatError`.
    """
    try:
        header = ast.literal_eval(header_bytes.decode("latin1"))
    except Exception as err:  # SyntaxError, ValueError, TypeError, MemoryError, RecursionError
        raise RecordFormatError(f"unreadable .npy header ({type(err).__name__})") from err
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise RecordFormatError("the .npy header must have exactly descr, fortran_order, shape")
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(type(s) is int and 0 <= s < 2**62 for s in shape):
        raise RecordFormatError(f"the .npy header shape {str(shape)[:60]!r} is not a shape")
    if len(shape) > 32:
        raise RecordFormatError(f"the .npy header shape has {len(shape)} dimensions (max 32)")
    if type(header["fortran_order"]) is not bool:
        raise RecordFormatError("the .npy header fortran_order is not True or False")
    try:
        dtype = np.dtype(header["descr"])  # type: ignore[call-overload]
    except Exception as err:
        raise RecordFormatError(
            f"the .npy header descr {str(header['descr'])[:60]!r} is not a dtype"
        ) from err
    return {"descr": dtype, "fortran_order": header["fortran_order"], "shape": shape}


def numeric_dtype(text: object) -> np.dtype:
    """The NumPy dtype an ``Array`` declares, if it is one a model can hold.

    Raises
    ------
    RecordFormatError
        Unknown dtype, or not bool / integer / float (complex, strings, objects,
        structured and datetime arrays cannot be averaged).
    """
    try:
        dtype = np.dtype(str(text))
    except Exception as err:
        raise RecordFormatError(f"unknown dtype {str(text)[:40]!r}") from err
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise RecordFormatError(f"dtype {dtype} is not a numeric (bool, int or float) dtype")
    return dtype


def array_view(array: Array) -> NDArray[np.generic]:
    """A read-only NumPy view on an ``Array``'s payload, without copying.

    C-ordered payloads (what ``Array(ndarray)`` writes for almost every array) are
    viewed in place; Fortran-ordered ones (e.g. scikit-learn's ``coef_``) come back
    as a transposed view with the declared logical shape, so ``reshape(-1)`` gives
    the same element order for both.

    Raises
    ------
    RecordFormatError
        If the bytes are not ``.npy``, their header is malformed, the dtype is not
        numeric, or their dtype, shape or length disagree with the ``Array``'s
        declared ``dtype`` and ``shape``.
    """
    if array.stype != NUMPY_STYPE:
        raise RecordFormatError(f"unsupported array serialisation {str(array.stype)[:40]!r}")
    data = array.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordFormatError(f"array data is {type(data).__name__}, not bytes")
    offset, header = _npy_payload_offset(data)
    dtype = header["descr"]
    assert isinstance(dtype, np.dtype)
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise RecordFormatError(f"dtype {dtype} is not a numeric (bool, int or float) dtype")
    shape = header["shape"]
    assert isinstance(shape, tuple)
    try:
        declared_shape = tuple(int(s) for s in array.shape)
    except Exception as err:
        raise RecordFormatError("array declares an unreadable shape") from err
    if numeric_dtype(array.dtype) != dtype or declared_shape != shape:
        raise RecordFormatError(
            f"array declares {array.dtype}{declared_shape} but its bytes hold {dtype}{shape}"
        )
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise RecordFormatError(
            f"array payload has {len(data) - offset} bytes, expected {count * dtype.itemsize}"
        )
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if header["fortran_order"] and len(shape) > 1:
        return view.reshape(shape[::-1]).T
    return view.reshape(shape)


def as_c_array(values: object) -> NDArray[np.generic]:
    """``values`` as a C-ordered ndarray of the same shape, 0-d included.

    ``np.ascontiguousarray`` returns at least 1-d arrays: a BatchNorm
    ``num_batches_tracked`` of shape ``()`` would become ``(1,)`` and every later
    reply would disagree with the model's layout.
    """
    array = np.asarray(values)
    return array if array.flags.c_contiguous else np.array(array, order="C")


def cast_to(values: NDArray[np.floating], dtype: np.dtype | str) -> NDArray[np.generic]:
    """``values`` (float) in a model array's ``dtype``, by flower-ext's dtype rule.

    Floats are cast (rounded to nearest); integers are rounded half-to-even and
    saturate at the dtype's range (never wrap: ``float(2**63 - 1)`` is ``2**63``);
    bool is ``value >= 0.5`` (a majority vote when the value is a mean of 0/1
    flags). Flower's own FedAvg returns float64 for integer and bool arrays;
    flower-ext keeps the model's dtype so that ``load_state_dict`` and the next
    round's layout are unchanged.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            return values.astype(dtype)
    if dtype.kind == "b":
        return np.asarray(values >= 0.5)
    info = np.iinfo(dtype)
    rounded = np.rint(np.asarray(values, dtype=np.float64))
    high, low = rounded >= float(info.max), rounded <= float(info.min)
    out = np.where(high | low, 0.0, rounded).astype(dtype)
    out[high] = info.max
    out[low] = info.min
    return out


def integer_difference(values: NDArray[np.generic], base: NDArray[np.generic]) -> NDArray:
    """``values - base`` for integer or bool arrays, exact in int64.

    64-bit arrays are subtracted in their own width (uint64 with wrap-around, then
    read as signed), so counters and timestamps beyond 2**53 keep every unit; the
    result is exact whenever the true difference fits in int64.
    """
    with np.errstate(over="ignore"):
        if base.dtype == np.uint64:
            return np.subtract(values, base, dtype=np.uint64).view(np.int64)
        return np.subtract(values.astype(np.int64), base.astype(np.int64), dtype=np.int64)


def add_integer_steps(
    base: NDArray[np.generic], steps: NDArray[np.floating], dtype: np.dtype | str
) -> NDArray[np.generic]:
    """``base + rint(steps)`` in ``base``'s integer dtype, exact, saturating at its range.

    bool arrays follow :func:`cast_to`'s rule on ``base + steps``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.asarray(base.astype(np.float64) + steps >= 0.5)
    info = np.iinfo(dtype)
    steps = np.asarray(steps, dtype=np.float64)
    # rint(base + steps) without leaving integers: rint(steps), except that a tie
    # (x.5) rounds to the even *sum*, as rounding the float mean itself would.
    floor = np.floor(steps)
    tie = steps - floor == 0.5
    whole = np.rint(steps)
    if tie.any():
        parity = (base[tie] % 2 + np.abs(floor[tie]) % 2).astype(np.int64) % 2
        whole[tie] = floor[tie] + parity
    if dtype.itemsize < 8:  # int64 holds every sum exactly; clip to the dtype
        limit = float(2**40)
        total = base.astype(np.int64) + np.clip(whole, -limit, limit).astype(np.int64)
        return np.clip(total, info.min, info.max).astype(dtype)
    limit = float(2**62)
    step = np.clip(whole, -limit, limit).astype(np.int64)
    with np.errstate(over="ignore"):  # modulo 2**64; a wrap is detected and saturated
        total = base + (step.view(np.uint64) if dtype == np.uint64 else step)
    past_top = (step > 0) & (total < base)
    past_bottom = (step < 0) & (total > base)
    out = np.array(total, dtype=dtype)
    out[past_top] = info.max
    out[past_bottom] = info.min
    return out


@dataclass(frozen=True)
class ArrayLayout:
    """The keys, shapes and dtypes of a model, and where each lives in a flat vector."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> ArrayLayout:
        """The layout of ``record``; ``ValueError`` if an array is not numeric."""
        dtypes = []
        for key, array in record.items():
            try:
                dtypes.append(str(numeric_dtype(array.dtype)))
            except RecordFormatError as err:
                raise ValueError(f"model array '{key}': {err}") from err
        return cls(
            keys=tuple(record.keys()),
            shapes=tuple(tuple(int(s) for s in a.shape) for a in record.values()),
            dtypes=tuple(dtypes),
        )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]))

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    @cached_property
    def compute_dtype(self) -> np.dtype:
        """float64 if the model has a float64 array, else float32.

        Updates of float16/32 models are averaged in float32 (at least their own
        precision, at float32 speed); float64 models are averaged in float64.
        Integer and bool arrays are handled exactly by :class:`FlatModel`.
        """
        return np.dtype(np.float64 if "float64" in self.dtypes else np.float32)

    @cached_property
    def integer_indices(self) -> tuple[int, ...]:
        """Positions of the integer and bool arrays (kept exact, rounded back)."""
        return tuple(i for i, d in enumerate(self.dtypes) if np.dtype(d).kind in "biu")

    def mismatch(self, record: ArrayRecord) -> str | None:
        """Why ``record`` does not fit this layout, or ``None`` if it does."""
        keys = set(record.keys())
        if keys != set(self.keys):  # the order may differ: arrays are read by key
            missing = sorted(set(self.keys) - keys)
            extra = sorted(keys - set(self.keys))
            return f"array keys differ: missing {missing[:5]}, unexpected {extra[:5]}"[:300]
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            arr = record[key]
            try:
                got_shape = tuple(int(s) for s in arr.shape)
                got_dtype = str(numeric_dtype(arr.dtype))
            except (RecordFormatError, TypeError, ValueError) as err:
                return f"array '{key}': {err}"
            if got_shape != shape:
                return f"array '{key}' has shape {got_shape}, expected {shape}"
            if got_dtype != dtype:
                return f"array '{key}' has dtype {got_dtype}, expected {dtype}"
        return None

    def flatten_into(self, record: ArrayRecord, out: NDArray[np.floating]) -> None:
        """Write ``record``'s arrays into the 1-D ``out`` (one copy, no temporaries)."""
        offsets = self.offsets
        for i, key in enumerate(self.keys):
            view = array_view(record[key])
            out[offsets[i] : offsets[i + 1]] = view.reshape(-1)

    def flatten(self, record: ArrayRecord, dtype: np.dtype | type | None = None) -> NDArray:
        """The model as one flat vector (``compute_dtype`` unless ``dtype`` is given)."""
        out = np.empty(self.dim, dtype=self.compute_dtype if dtype is None else dtype)
        self.flatten_into(record, out)
        return out

    def unflatten(self, vector: NDArray[np.floating]) -> ArrayRecord:
        """An ArrayRecord in this layout from a flat vector (each key cast by :func:`cast_to`).

        Shapes are kept exactly, 0-d arrays included (``np.ascontiguousarray`` would
        turn them into shape ``(1,)``).
        """
        if vector.shape != (self.dim,):
            raise ValueError(f"vector has shape {vector.shape}, layout needs ({self.dim},)")
        offsets = self.offsets
        arrays = {}
        for i, key in enumerate(self.keys):
            chunk = vector[offsets[i] : offsets[i + 1]].reshape(self.shapes[i])
            arrays[key] = Array(np.array(cast_to(chunk, self.dtypes[i]), order="C", copy=True))
        return ArrayRecord(arrays)


class FlatModel:
    """A global model as one flat vector, with exact copies of its integer arrays.

    The update of a client is ``reply - global``. Float arrays are read into a
    vector of the layout's ``compute_dtype``. Integer and bool arrays (BatchNorm's
    ``num_batches_tracked``, counters, timestamps) are kept in their own dtype:
    their updates are exact integer differences (:func:`integer_difference`) and
    the next model is ``global + rint(update)`` in the array's own dtype
    (:func:`add_integer_steps`). In an update *matrix* of float32 (robust rules) an
    integer update is exact up to 2**24 per round; the streamed FedAvg mean keeps
    integer updates in float64.
    """

    def __init__(self, record: ArrayRecord) -> None:
        self.layout = ArrayLayout.of(record)
        self.record = record
        self.flat = self.layout.flatten(record)
        self.integers: dict[int, NDArray[np.generic]] = {
            j: np.array(array_view(record[self.layout.keys[j]]).reshape(-1))
            for j in self.layout.integer_indices
        }

    def integer_update(self, j: int, values: NDArray[np.generic]) -> NDArray:
        """``values - global`` for integer array ``j`` (flat), exact in int64."""
        return integer_difference(values.reshape(-1), self.integers[j])

    def subtract_into(self, record: ArrayRecord, row: NDArray[np.floating]) -> None:
        """``row = record - global`` (in ``row``'s dtype), reading ``record`` in place."""
        layout, offsets = self.layout, self.layout.offsets
        with np.errstate(over="ignore", invalid="ignore"):
            for j, key in enumerate(layout.keys):
                lo, hi = offsets[j], offsets[j + 1]
                if lo == hi:
                    continue
                view = array_view(record[key]).reshape(-1)
                if j in self.integers:
                    row[lo:hi] = self.integer_update(j, view)
                else:
                    np.subtract(view, self.flat[lo:hi], out=row[lo:hi], casting="unsafe")

    def apply(self, step: NDArray[np.floating], lr: float = 1.0) -> ArrayRecord | None:
        """The model ``global + lr * step`` in the layout's shapes and dtypes, or ``None``
        if a value would not be finite in its array's dtype."""
        with np.errstate(over="ignore", invalid="ignore"):
            new_flat = self.flat + np.asarray(lr, dtype=self.flat.dtype) * step.astype(
                self.flat.dtype, copy=False
            )
        return self.with_values(new_flat, step, lr)

    def with_values(
        self,
        new_flat: NDArray[np.floating],
        step: NDArray[np.floating],
        lr: float = 1.0,
        integer_steps: dict[int, NDArray[np.float64]] | None = None,
    ) -> ArrayRecord | None:
        """Build the record from ``new_flat``; integer arrays from ``global + lr * step``
        (``integer_steps[j]``, float64, when given). ``None`` if a float value overflows
        its dtype (e.g. float16 past 65504)."""
        layout, offsets = self.layout, self.layout.offsets
        arrays = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for j, key in enumerate(layout.keys):
                lo, hi = offsets[j], offsets[j + 1]
                dtype = np.dtype(layout.dtypes[j])
                if j in self.integers:
                    delta = (
                        integer_steps[j]
                        if integer_steps is not None and j in integer_steps
                        else step[lo:hi].astype(np.float64)
                    )
                    chunk = add_integer_steps(self.integers[j], lr * delta, dtype)
                else:
                    chunk = cast_to(new_flat[lo:hi], dtype)
                    # Only a dtype narrower than the computation can overflow here.
                    if dtype.itemsize < new_flat.dtype.itemsize and not np.isfinite(chunk).all():
                        return None
                chunk = chunk.reshape(layout.shapes[j])
                arrays[key] = Array(np.array(chunk, order="C", copy=True))
        return ArrayRecord(arrays)


def arrays_sha256(record: ArrayRecord) -> str:
    """SHA-256 over a model's keys, dtypes, shapes and raw bytes, in key order."""
    digest = hashlib.sha256()
    for key, array in record.items():
        digest.update(key.encode())
        digest.update(str(array.dtype).encode())
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(array.data)
    return digest.hexdigest()


def wire_size(message: Message) -> int:
    """Bytes a Message occupies when Flower serialises it for the network.

    Flower 1.42 ships a Message as a tree of inflatable objects (the message, its
    records, each array and its chunks); the sum of their deflated sizes is what
    crosses the wire, before gRPC framing.
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
