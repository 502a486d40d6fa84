"""Moving model weights between Flower records and flat NumPy vectors.

Flower stores each ``Array`` as ``.npy`` bytes. ``Array.numpy()`` parses them
through ``np.load`` and copies; with 50 clients of 1M parameters that copy costs
more than the aggregation itself. :func:`array_view` reads the header once and
returns a read-only view on the payload (no copy), after checking that the bytes
say what the ``Array`` claims (dtype, shape, C order) so a client cannot smuggle
a different shape past validation.
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


def _npy_payload_offset(data: bytes | memoryview) -> tuple[int, dict[str, object]]:
    """Offset of the array payload in ``.npy`` bytes, and the parsed header."""
    if len(data) < 10 or bytes(data[:6]) != _NPY_MAGIC:
        raise RecordFormatError("array bytes are not in .npy format")
    major = data[6]
    if major == 1:
        header_len = int.from_bytes(bytes(data[8:10]), "little")
        start = 10
    elif major in (2, 3):
        header_len = int.from_bytes(bytes(data[8:12]), "little")
        start = 12
    else:
        raise RecordFormatError(f"unsupported .npy version {major}")
    return start + header_len, _parse_npy_header(bytes(data[start : start + header_len]))


@lru_cache(maxsize=1024)
def _parse_npy_header(header_bytes: bytes) -> dict[str, object]:
    """The ``.npy`` header dict (cached: every client's layer has the same header, and
    parsing it dominates decoding at small sizes). Callers must not modify it."""
    try:
        header = ast.literal_eval(header_bytes.decode("latin1"))
    except (ValueError, SyntaxError) as err:
        raise RecordFormatError("unreadable .npy header") from err
    if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
        raise RecordFormatError("incomplete .npy header")
    return header


def array_view(array: Array) -> NDArray[np.generic]:
    """A read-only NumPy view on an ``Array``'s payload, without copying.

    Raises
    ------
    RecordFormatError
        If the bytes are not ``.npy``, or their dtype, shape or length disagree
        with the ``Array``'s declared ``dtype`` and ``shape``.
    """
    if array.stype != NUMPY_STYPE:
        raise RecordFormatError(f"unsupported array serialisation '{array.stype}'")
    data = array.data
    offset, header = _npy_payload_offset(data)
    if header["fortran_order"]:
        raise RecordFormatError("Fortran-ordered arrays are not accepted")
    try:
        dtype = np.dtype(header["descr"])  # type: ignore[arg-type]
    except TypeError as err:
        raise RecordFormatError(f"unknown dtype {header['descr']!r}") from err
    if dtype.hasobject:
        raise RecordFormatError("object arrays are not accepted")
    shape = tuple(int(s) for s in header["shape"])  # type: ignore[union-attr]
    if np.dtype(array.dtype) != dtype or tuple(array.shape) != shape:
        raise RecordFormatError(
            f"array declares {array.dtype}{tuple(array.shape)} but its bytes hold {dtype}{shape}"
        )
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise RecordFormatError(
            f"array payload has {len(data) - offset} bytes, expected {count * dtype.itemsize}"
        )
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return view.reshape(shape)


@dataclass(frozen=True)
class ArrayLayout:
    """The keys, shapes and dtypes of a model, and where each lives in a flat vector."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, record: ArrayRecord) -> ArrayLayout:
        return cls(
            keys=tuple(record.keys()),
            shapes=tuple(tuple(int(s) for s in a.shape) for a in record.values()),
            dtypes=tuple(str(a.dtype) for a in record.values()),
        )

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)]))

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def mismatch(self, record: ArrayRecord) -> str | None:
        """Why ``record`` does not fit this layout, or ``None`` if it does."""
        keys = tuple(record.keys())
        if keys != self.keys:
            missing = sorted(set(self.keys) - set(keys))
            extra = sorted(set(keys) - set(self.keys))
            if missing or extra:
                return f"array keys differ: missing {missing}, unexpected {extra}"
            return "array keys are in a different order"
        for key, shape, dtype in zip(self.keys, self.shapes, self.dtypes, strict=True):
            arr = record[key]
            if tuple(arr.shape) != shape:
                return f"array '{key}' has shape {tuple(arr.shape)}, expected {shape}"
            if str(arr.dtype) != dtype:
                return f"array '{key}' has dtype {arr.dtype}, expected {dtype}"
        return None

    def flatten_into(self, record: ArrayRecord, out: NDArray[np.floating]) -> None:
        """Write ``record``'s arrays into the 1-D ``out`` (one copy, no temporaries)."""
        offsets = self.offsets
        for i, key in enumerate(self.keys):
            view = array_view(record[key])
            out[offsets[i] : offsets[i + 1]] = view.reshape(-1)

    def flatten(self, record: ArrayRecord, dtype: np.dtype | type = np.float64) -> NDArray:
        out = np.empty(self.dim, dtype=dtype)
        self.flatten_into(record, out)
        return out

    def unflatten(self, vector: NDArray[np.floating]) -> ArrayRecord:
        """An ArrayRecord in this layout from a flat vector (cast to each key's dtype)."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector has shape {vector.shape}, layout needs ({self.dim},)")
        offsets = self.offsets
        arrays = {}
        for i, key in enumerate(self.keys):
            chunk = vector[offsets[i] : offsets[i + 1]]
            arrays[key] = Array(
                np.ascontiguousarray(
                    chunk.reshape(self.shapes[i]).astype(self.dtypes[i], copy=False)
                )
            )
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
