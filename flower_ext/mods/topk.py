"""Client side of top-k compression: a ClientApp mod that sparsifies train replies.

On a TRAIN message the mod lets the handler train, then turns the reply's full
weights into the update ``local - global`` (``global`` is the ArrayRecord the
client received), adds the error-feedback residual kept in ``context.state``,
sends the ``k`` largest-magnitude entries (:func:`flower_ext.compression.topk_compress`)
and keeps what it did not send as the new residual. The reply's ArrayRecord is
replaced by a sparse payload (``topk.indices`` + ``topk.values``) and a
``topk`` ConfigRecord marks it, so :class:`flower_ext.strategies.TopKCompression`
can validate and densify it before any strategy aggregates. Other message types,
error replies and replies whose arrays do not match the model received pass
through untouched; the incoming message is never modified.

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
config (stable across restarts, unlike the node id). A residual whose model
layout differs from the current model is discarded.
"""

from __future__ import annotations

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
    RECORD_KEY,
    SCOPES,
    VALUE_DTYPES,
    check_ratio,
    layout_signature,
    payload_to_records,
    topk_compress,
)
from flower_ext.records import ArrayLayout, array_view

RATIO_KEY = "topk-ratio"
ERROR_FEEDBACK_KEY = "topk-error-feedback"
VALUES_KEY = "topk-values"
SCOPE_KEY = "topk-scope"
RESIDUAL_DIR_KEY = "topk-residual-dir"
STATE_ARRAYS_KEY = "topk.residual"
STATE_INFO_KEY = "topk.residual-info"


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
        """Settings for this message: server config, then arguments, then run config."""
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

        settings = TopKSettings(
            ratio=float(pick(RATIO_KEY, self.ratio, 0.0)),  # type: ignore[arg-type]
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
        if len(msg.content.array_records) != 1:
            log(WARNING, "topk_mod: train message has no single ArrayRecord; sending dense")
            return call_next(msg, context)
        global_arrays = next(iter(msg.content.array_records.values()))
        out = call_next(msg, context)
        if out.has_error() or not out.has_content() or len(out.content.array_records) != 1:
            return out
        arrays_key, local_arrays = next(iter(out.content.array_records.items()))
        layout = ArrayLayout.of(global_arrays)
        mismatch = layout.mismatch(local_arrays)
        if mismatch:
            log(WARNING, "topk_mod: reply does not match the model received (%s)", mismatch)
            return out
        start = time.perf_counter()
        update = layout.flatten(local_arrays, dtype=np.float32)
        update -= layout.flatten(global_arrays, dtype=np.float32)
        if not np.isfinite(update.sum(dtype=np.float64)):
            # Let the server reject it; a NaN must not poison the residual for good.
            log(WARNING, "topk_mod: update is not finite; sending it dense, residual kept")
            return out
        signature = layout_signature(layout.keys, layout.shapes, layout.dtypes)
        residual = (
            load_residual(context, signature, layout.dim, settings.residual_dir)
            if settings.error_feedback
            else None
        )
        result = topk_compress(
            update,
            settings.ratio,
            residual,
            value_dtype=settings.values,
            scope=settings.scope,
            offsets=layout.offsets,
            rng=self._rng,
        )
        if settings.error_feedback:
            store_residual(context, result.residual, signature, settings.residual_dir)
        sparse, marker = payload_to_records(result.payload, signature)
        content = RecordDict()
        for key, record in out.content.items():
            content[key] = sparse if key == arrays_key else record
        content[RECORD_KEY] = marker
        self.timings.append(time.perf_counter() - start)
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
        if vector.shape == (dim,):
            return vector  # read-only view; topk_compress does not write to it
    if residual_dir:
        path = _residual_file(context, residual_dir)
        if path.exists():
            try:
                with np.load(path) as saved:
                    if str(saved["layout"]) == signature and saved["residual"].shape == (dim,):
                        return saved["residual"].astype(np.float32)
            except (OSError, ValueError, KeyError) as err:
                log(WARNING, "topk_mod: ignoring unreadable residual file %s: %s", path, err)
    return None


def store_residual(
    context: Context, residual: np.ndarray, signature: str, residual_dir: str = ""
) -> None:
    context.state[STATE_ARRAYS_KEY] = ArrayRecord({"residual": Array(residual)})
    context.state[STATE_INFO_KEY] = ConfigRecord({"layout": signature})
    if residual_dir:
        path = _residual_file(context, residual_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, residual=residual, layout=np.array(signature))
        os.replace(tmp, path)
