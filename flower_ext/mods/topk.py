"""Client side of top-k compression: a ClientApp mod that sparsifies train replies.

On a TRAIN message the mod lets the handler train, then turns the reply's full
weights into the update ``local - global`` (``global`` is the ArrayRecord the
client received), adds the error-feedback residual kept in ``context.state``,
sends the ``k`` largest-magnitude entries (:func:`flower_ext.compression.topk_compress`)
and keeps what it did not send as the new residual. The reply's ArrayRecord is
replaced by a sparse payload (``topk.indices`` + ``topk.values``) and a
``topk`` ConfigRecord marks it, so :class:`flower_ext.strategies.TopKCompression`
can validate and densify it before any strategy aggregates. Other message types
and error replies pass through untouched; the incoming message is never modified.

Any model Flower's FedAvg averages works: bool, integer and float16/32/64 arrays,
0-d arrays (BatchNorm's ``num_batches_tracked``), zero-size and Fortran-ordered
arrays. The reply must have the keys and shapes of the model received; its dtypes
may differ (an app that returns float64 for a float32 model, say): the update is
computed in float64, sent as float32/float16/int8, and the server rebuilds it in
the dtypes of the model it sent. A reply that cannot be compressed (no single
ArrayRecord, other keys or shapes, a non-numeric dtype, a non-finite update) is
never dropped and never sent dense silently: it goes out dense with a WARNING and
a ``topk.dense`` ConfigRecord ``{"reason": ...}`` that :class:`TopKCompression`
writes to its audit trail.

Where the settings come from, first match wins:

1. the train message's config (``topk-ratio``, ``topk-error-feedback``,
   ``topk-values``, ``topk-scope``): :class:`TopKCompression` puts them there, so
   the server controls the whole federation from one place;
2. the arguments given to :class:`TopKMod`;
3. the run config (same keys);
4. defaults: ratio 0 (off), error feedback on, float32 values, global scope.

What survives what: the residual lives in ``context.state``, which Flower keeps
per node for the whole run (across rounds, in simulation and in deployment). A
SuperNode restart starts with an empty state; pass ``residual_dir`` (run config
``topk-residual-dir``) to also write the residual to disk after every round and
read it back after a restart. The file is named after the run id and the node
config (stable across restarts, unlike the node id) and is readable by its owner
only (0o600). A residual whose model layout differs from the current model, or
that is not finite, is discarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import deque
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from flower_ext.compression import (
    DENSE_RECORD_KEY,
    RECORD_KEY,
    SCOPES,
    VALUE_DTYPES,
    GlobalModel,
    ModelFormatError,
    check_ratio,
    payload_to_records,
    topk_compress,
)
from flower_ext.records import array_view

RATIO_KEY = "topk-ratio"
ERROR_FEEDBACK_KEY = "topk-error-feedback"
VALUES_KEY = "topk-values"
SCOPE_KEY = "topk-scope"
RESIDUAL_DIR_KEY = "topk-residual-dir"
STATE_ARRAYS_KEY = "topk.residual"
STATE_INFO_KEY = "topk.residual-info"
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class TopKSettings:
    ratio: float = 0.0
    error_feedback: bool = True
    values: str = "float32"
    scope: str = "global"
    residual_dir: str = ""

    def check(self) -> None:
        if self.ratio != 0.0:
            check_ratio(self.ratio)
        if self.values not in VALUE_DTYPES:
            raise ValueError(f"{VALUES_KEY} must be one of {VALUE_DTYPES}, got {self.values!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"{SCOPE_KEY} must be one of {SCOPES}, got {self.scope!r}")


def as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class TopKMod:
    """A ClientApp mod compressing train replies to top-k with error feedback.

    Parameters
    ----------
    ratio : float, optional
        Fraction of the update's entries sent (0 < ratio <= 1; 0 turns the mod
        off). The server's ``topk-ratio`` overrides it.
    error_feedback : bool, optional
        Keep what was not sent and add it to the next update (default on).
    values : {"float32", "float16", "int8"}, optional
        How the sent values travel; int8 is unbiased stochastic rounding with one
        scale per payload. Rounding error goes into the residual too.
    scope : {"global", "layer"}, optional
        Top-k over the whole flattened update (default) or within each layer.
    residual_dir : str, optional
        Also persist the residual there, so it survives a SuperNode restart.
    seed : int, optional
        Seed for int8 stochastic rounding (default: fresh entropy).

    Examples
    --------
    >>> app = ClientApp(mods=[TopKMod(ratio=0.01, values="float16")])
    """

    def __init__(
        self,
        ratio: float | None = None,
        *,
        error_feedback: bool | None = None,
        values: str | None = None,
        scope: str | None = None,
        residual_dir: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.ratio = ratio
        self.error_feedback = error_feedback
        self.values = values
        self.scope = scope
        self.residual_dir = residual_dir
        self._rng = np.random.default_rng(seed)
        # Fail at construction, not in round 1.
        TopKSettings(
            ratio=float(ratio or 0.0), values=values or "float32", scope=scope or "global"
        ).check()
        #: Seconds spent compressing each reply (for benchmarks), the last 1000, newest last.
        self.timings: deque[float] = deque(maxlen=1000)

    def __repr__(self) -> str:
        return (
            f"TopKMod(ratio={self.ratio}, error_feedback={self.error_feedback}, "
            f"values={self.values!r}, scope={self.scope!r})"
        )

    # ------------------------------------------------------------------ settings
    def settings(self, msg: Message, context: Context) -> TopKSettings:
        """Settings for this message: server config, then arguments, then run config.

        Raises
        ------
        ValueError
            If a setting is of the wrong type or out of range (raised before training, so
            the server gets an error reply naming the setting instead of a wasted round).
        """
        server: dict[str, object] = {}
        if msg.has_content():
            for record in msg.content.config_records.values():
                server.update({k: v for k, v in record.items() if k.startswith("topk-")})
        run = context.run_config

        def pick(key: str, own: object, default: object) -> object:
            if key in server:
                return server[key]
            if own is not None:
                return own
            return run.get(key, default)

        ratio = pick(RATIO_KEY, self.ratio, 0.0)
        if isinstance(ratio, str):
            with contextlib.suppress(ValueError):  # a run config may hold "0.01"
                ratio = float(ratio)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"{RATIO_KEY} must be a number in (0, 1] or 0, got {ratio!r}")
        settings = TopKSettings(
            ratio=float(ratio),
            error_feedback=as_bool(pick(ERROR_FEEDBACK_KEY, self.error_feedback, True)),
            values=str(pick(VALUES_KEY, self.values, "float32")),
            scope=str(pick(SCOPE_KEY, self.scope, "global")),
            residual_dir=str(
                self.residual_dir
                if self.residual_dir is not None
                else run.get(RESIDUAL_DIR_KEY, "")
            ),
        )
        settings.check()
        return settings

    # ------------------------------------------------------------------ the mod
    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        settings = self.settings(msg, context)
        if settings.ratio <= 0.0:
            return call_next(msg, context)
        received = list(msg.content.array_records.values())
        out = call_next(msg, context)
        if out.has_error() or not out.has_content():
            return out
        try:
            return self.compress(received, out, context, settings)
        except (ModelFormatError, _SendDense) as why:
            return send_dense(out, str(why))
        except Exception as err:  # the bank's reply must go out, even if compression breaks
            return send_dense(out, f"compression failed ({type(err).__name__}: {err})")

    def compress(
        self, received: list[ArrayRecord], out: Message, context: Context, settings: TopKSettings
    ) -> Message:
        """The sparse version of the reply ``out``; raises when it must go out dense."""
        if len(received) != 1:
            raise _SendDense(
                f"the train message carries {len(received)} ArrayRecords; "
                "top-k needs exactly one (the global model)"
            )
        if len(out.content.array_records) != 1:
            raise _SendDense(
                f"the reply carries {len(out.content.array_records)} ArrayRecords; "
                "top-k compresses exactly one"
            )
        arrays_key, local_arrays = next(iter(out.content.array_records.items()))
        start = time.perf_counter()
        model = GlobalModel(received[0])
        mismatch = model.mismatch(local_arrays)
        if mismatch:
            raise _SendDense(f"reply does not match the model received ({mismatch})")
        update = model.update_of(local_arrays)
        if not np.isfinite(update.sum(dtype=np.float64)):
            # Let the server reject it; a NaN must not poison the residual for good.
            raise _SendDense("update is not finite in float32 (residual kept)")
        residual = (
            load_residual(context, model.signature, model.dim, settings.residual_dir)
            if settings.error_feedback
            else None
        )
        result = topk_compress(
            update,
            settings.ratio,
            residual,
            value_dtype=settings.values,
            scope=settings.scope,
            offsets=model.offsets,
            rng=self._rng,
        )
        sparse, marker = payload_to_records(result.payload, model.signature)
        content = RecordDict()
        for key, record in out.content.items():
            if key != DENSE_RECORD_KEY:
                content[key] = sparse if key == arrays_key else record
        content[RECORD_KEY] = marker
        sparse_reply = Message(metadata=out.metadata, content=content)
        # Last: if anything above fails the reply goes out dense, and the residual must
        # then stay what it was (the dense reply carries this round's whole update).
        if settings.error_feedback:
            store_residual(context, result.residual, model.signature, settings.residual_dir)
        self.timings.append(time.perf_counter() - start)
        return sparse_reply


class _SendDense(Exception):
    """This reply cannot be compressed; the message says why."""


def send_dense(out: Message, reason: str) -> Message:
    """``out`` as it is, plus a ``topk.dense`` ConfigRecord saying why it is not sparse.

    The reason travels in a ConfigRecord rather than the MetricRecord: it is text, and
    an extra metric key in some replies only would make Flower's FedAvg refuse the round
    (it requires the same metric keys in every reply). :class:`TopKCompression` strips
    the record before aggregating and writes the reason to its audit trail.
    """
    reason = " ".join(reason.split())[:MAX_REASON_CHARS]
    log(WARNING, "topk_mod: sending this train reply dense, not top-k: %s", reason)
    content = RecordDict()
    for key, record in out.content.items():
        content[key] = record
    content[DENSE_RECORD_KEY] = ConfigRecord({"reason": reason})
    return Message(metadata=out.metadata, content=content)


#: The ready-made mod: everything from the server's train config or the run config.
topk_mod = TopKMod()


# ---------------------------------------------------------------------- residual state
def _residual_file(context: Context, residual_dir: str) -> Path:
    identity = repr(sorted((str(k), str(v)) for k, v in context.node_config.items()))
    if not context.node_config:
        identity = f"node-{context.node_id}"
    tag = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Path(os.path.expanduser(residual_dir)) / f"topk-residual-{context.run_id}-{tag}.npz"


def load_residual(
    context: Context, signature: str, dim: int, residual_dir: str = ""
) -> np.ndarray | None:
    """The residual of this node for this model layout, or ``None`` (start from zero)."""
    info = context.state.config_records.get(STATE_INFO_KEY)
    arrays = context.state.array_records.get(STATE_ARRAYS_KEY)
    if info is not None and arrays is not None and info.get("layout") == signature:
        vector = array_view(arrays["residual"])
        if vector.shape == (dim,) and vector.dtype == np.float32:
            return vector  # read-only view; topk_compress does not write to it
    if residual_dir:
        path = _residual_file(context, residual_dir)
        if path.exists():
            try:
                with np.load(path) as saved:
                    vector = saved["residual"]
                    if (
                        str(saved["layout"]) == signature
                        and vector.shape == (dim,)
                        and np.isfinite(vector.sum(dtype=np.float64))
                    ):
                        return vector.astype(np.float32)
            except (OSError, ValueError, KeyError) as err:
                log(WARNING, "topk_mod: ignoring unreadable residual file %s: %s", path, err)
    return None


def store_residual(
    context: Context, residual: np.ndarray, signature: str, residual_dir: str = ""
) -> None:
    """Keep the residual in ``context.state`` and, with ``residual_dir``, on disk.

    The file is written owner-only (0o600, in a 0o700 directory when created here): a
    residual is the part of the bank's update not yet sent, as sensitive as the update.
    It is written to a temporary file and renamed, so a crash never leaves half a file.
    """
    context.state[STATE_ARRAYS_KEY] = ArrayRecord({"residual": Array(residual)})
    context.state[STATE_INFO_KEY] = ConfigRecord({"layout": signature})
    if not residual_dir:
        return
    path = _residual_file(context, residual_dir)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o600)  # a stale temporary file keeps its old mode
            np.savez(fh, residual=residual, layout=np.array(signature))
        os.replace(tmp, path)
    except OSError as err:  # the residual in state still carries error feedback this run
        log(WARNING, "topk_mod: could not write the residual file %s: %s", path, err)
        with contextlib.suppress(OSError):
            tmp.unlink()
