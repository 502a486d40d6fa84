"""Client side of encrypted aggregation: a ClientApp mod that decrypts in and encrypts out.

Place it **first** (outermost) in ``ClientApp(mods=[he_mod, ...])``: it is the
last thing a train reply passes before leaving the bank and the first thing a
message meets on arrival.

Incoming TRAIN and EVALUATE messages from :class:`flower_ext.strategies.EncryptedFedAvg`
carry the encrypted global model (the public base model, the ciphertexts of
``sum_i n_i (local_i - base)`` and the plaintext total weight ``W``, see
:mod:`flower_ext.crypto`). The mod decrypts it into the plain model
``base + sum / W`` and hands the inner mods and the handler an ordinary message:
training, DP-SGD, evaluation run unchanged.

On the TRAIN reply it computes ``n * (local - base)``, where ``n`` is the reply's
``num-examples`` (the server sums the same ``n`` in plaintext), packs all layers
into one flat vector and encrypts it into ``ceil(d / slots)`` ciphertexts. The
reply's ArrayRecord then holds only ``he.ciphertexts``: the ciphertexts'
coefficients, uint8 of shape (chunks, 2, N, 7) (:class:`flower_ext.crypto.CKKSCodec`);
an ``he`` ConfigRecord says the format, the key fingerprint, the
slots, the number of values and the weight used. Metrics pass unchanged.

Refusals (an error reply whose reason the server audits): a bank whose key
fingerprint differs from the one the server announces (wrong key), top-k
compression in the same federation (sparse updates have no shared index set),
a bank configured for HE whose server does not run ``EncryptedFedAvg`` (the
mod never lets a plaintext update leave a bank that asked for encryption), and
an update too large for the CKKS modulus.

Where the secret context comes from, first match wins: the ``secret_context``
argument; the node config ``he-secret-context`` (deployment:
``flower-supernode --node-config "he-secret-context='/keys/bank-secret.ckks'"``);
the run config ``he-secret-context`` (simulation); the per-run simulation key
directory (:func:`flower_ext.crypto.simulation_key_dir`) the bank app's server
fills when both paths are empty.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import tenseal as ts
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from flower_ext.crypto import (
    FORMAT,
    SECRET_FILE,
    CryptoError,
    codec_for,
    context_data_bits,
    context_fingerprint,
    context_slots,
    decrypt_packed,
    encrypt_packed,
    load_secret_context,
    simulation_key_dir,
)
from flower_ext.records import ArrayLayout, RecordFormatError, array_view

#: Train/evaluate config keys the server sets.
FINGERPRINT_KEY = "he-fingerprint"
SLOTS_KEY = "he-slots"
FORMAT_KEY = "he-format"
WEIGHT_KEY_KEY = "he-weight-key"
#: Run config / node config keys.
ENABLED_KEY = "he"
SECRET_CONTEXT_KEY = "he-secret-context"
PUBLIC_CONTEXT_KEY = "he-public-context"
#: Reply records and reserved array names.
RECORD_KEY = "he"
CIPHERTEXTS = "he.ciphertexts"
WEIGHT_TOTAL = "he.weight-total"
RESERVED_PREFIX = "he."
TOPK_RATIO_KEY = "topk-ratio"


class HEConfigError(RuntimeError):
    """The bank cannot take part in the encrypted federation; the message says why."""


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def split_global(record: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord]:
    """(base model, HE arrays) of an encrypted global model record."""
    base = ArrayRecord({k: v for k, v in record.items() if not k.startswith(RESERVED_PREFIX)})
    he = ArrayRecord({k: v for k, v in record.items() if k.startswith(RESERVED_PREFIX)})
    return base, he


def decrypt_global(ctx: ts.Context, record: ArrayRecord) -> ArrayRecord:
    """The plain global model ``base + sum / W`` (just ``base`` before the first aggregate)."""
    base, he = split_global(record)
    if CIPHERTEXTS not in he:
        return base
    layout = ArrayLayout.of(base)
    try:
        packed = array_view(he[CIPHERTEXTS])
        total = float(array_view(he[WEIGHT_TOTAL]).reshape(-1)[0])
    except (KeyError, RecordFormatError, IndexError) as err:
        raise CryptoError(f"the encrypted global model is incomplete: {err}") from err
    if not np.isfinite(total) or total <= 0:
        raise CryptoError(f"the encrypted global model has total weight {total}")
    summed = decrypt_packed(ctx, packed, layout.dim)
    flat = layout.flatten(base, dtype=np.float64) + summed / total
    for dtype, start, stop in zip(
        layout.dtypes, layout.offsets[:-1], layout.offsets[1:], strict=True
    ):
        if np.dtype(dtype).kind in "iub":  # counters stay integers
            flat[start:stop] = np.rint(flat[start:stop])
    return layout.unflatten(flat)


class HEMod:
    """A ClientApp mod: decrypt the incoming global model, encrypt the outgoing update.

    Parameters
    ----------
    secret_context : str | Path | tenseal.Context, optional
        The banks' secret context (``bank-secret.ckks`` from ``flower-ext keygen``).
        Omitted: node config, then run config ``he-secret-context``, then the
        simulation key directory.
    enabled : bool, optional
        Force the mod on or off. Omitted: on when the server announces HE
        (``he-fingerprint`` in the config) or the run config says ``he = true``.

    Examples
    --------
    >>> app = ClientApp(mods=[HEMod("/keys/bank-secret.ckks"), other_mod])
    """

    def __init__(
        self,
        secret_context: str | Path | ts.Context | None = None,
        *,
        enabled: bool | None = None,
    ) -> None:
        self.secret_context = secret_context
        self.enabled = enabled
        #: (seconds decrypting, seconds encrypting, ciphertext bytes) per train reply.
        self.timings: list[tuple[float, float, int]] = []
        self._last_decrypt = 0.0

    def __repr__(self) -> str:
        return f"HEMod(secret_context={self.secret_context!r}, enabled={self.enabled})"

    # ------------------------------------------------------------------ settings
    def is_active(self, msg: Message, context: Context) -> bool:
        if self.enabled is not None:
            return self.enabled
        if _config(msg).get(FINGERPRINT_KEY):
            return True
        return _as_bool(context.run_config.get(ENABLED_KEY, False))

    def context_for(self, context: Context) -> ts.Context:
        """The bank's secret context (see the module docstring for where it comes from)."""
        if self.secret_context is not None:
            return load_secret_context(self.secret_context)
        for source in (context.node_config, context.run_config):
            path = str(source.get(SECRET_CONTEXT_KEY, "") or "")
            if path:
                return load_secret_context(path)
        fallback = simulation_key_dir(context.run_id) / SECRET_FILE
        if fallback.is_file():
            return load_secret_context(fallback)
        raise HEConfigError(
            "HE is on but this bank has no secret context: set the node config "
            f"'{SECRET_CONTEXT_KEY}' (deployment) or the run config '{SECRET_CONTEXT_KEY}' "
            "(simulation) to the bank-secret.ckks written by `flower-ext keygen`"
        )

    # ------------------------------------------------------------------ the mod
    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
            return call_next(msg, context)
        if not self.is_active(msg, context):
            return call_next(msg, context)
        try:
            ctx, plain_msg, base = self._decrypt_incoming(msg, context)
        except (HEConfigError, CryptoError, OSError) as err:
            return _error_reply(msg, f"he_mod: {err}")
        out = call_next(plain_msg, context)
        if kind != MessageType.TRAIN or out.has_error() or not out.has_content():
            return out
        try:
            return self._encrypt_reply(msg, out, ctx, base)
        except (HEConfigError, CryptoError) as err:
            return _error_reply(msg, f"he_mod: {err}")

    def _decrypt_incoming(
        self, msg: Message, context: Context
    ) -> tuple[ts.Context, Message, ArrayRecord]:
        config = _config(msg)
        announced = str(config.get(FINGERPRINT_KEY, "") or "")
        if not announced:
            raise HEConfigError(
                "this bank is configured for encrypted aggregation (he = true) but the server "
                "does not run EncryptedFedAvg; refusing to send a plaintext update"
            )
        ratio = config.get(TOPK_RATIO_KEY, context.run_config.get(TOPK_RATIO_KEY, 0.0))
        if float(ratio or 0.0) > 0:  # type: ignore[arg-type]
            raise HEConfigError(
                "top-k compression cannot be combined with encrypted aggregation: each bank "
                "would send a different index set, and the server cannot add ciphertexts of "
                "different coordinates (set topk-ratio = 0 or he = false)"
            )
        fmt = str(config.get(FORMAT_KEY, FORMAT))
        if fmt != FORMAT:
            raise HEConfigError(f"the server speaks {fmt}, this bank {FORMAT}")
        ctx = self.context_for(context)
        own = context_fingerprint(ctx)
        if own != announced:
            raise HEConfigError(
                f"this bank's key (fingerprint {own[:16]}...) is not the federation's "
                f"({announced[:16]}...): it was generated by another `flower-ext keygen` run"
            )
        slots = int(config.get(SLOTS_KEY, context_slots(ctx)))  # type: ignore[arg-type]
        if slots != context_slots(ctx):
            raise HEConfigError(
                f"the server uses {slots} slots, this bank's context has {context_slots(ctx)}"
            )
        if len(msg.content.array_records) != 1:
            raise HEConfigError("the message has no single ArrayRecord holding the global model")
        arrays_key, record = next(iter(msg.content.array_records.items()))
        base, _ = split_global(record)
        start = time.perf_counter()
        plain = decrypt_global(ctx, record)
        self._last_decrypt = time.perf_counter() - start
        content = RecordDict()
        for key, value in msg.content.items():
            content[key] = plain if key == arrays_key else value
        return ctx, Message(metadata=msg.metadata, content=content), base

    def _encrypt_reply(
        self, msg: Message, out: Message, ctx: ts.Context, base: ArrayRecord
    ) -> Message:
        if RECORD_KEY in out.content.config_records or any(
            k.startswith("topk") for k in out.content.config_records
        ):
            raise HEConfigError(
                "the reply is already compressed or encrypted by an inner mod: with HE, "
                "he_mod must be the only mod that rewrites the update (no top-k)"
            )
        if len(out.content.array_records) != 1:
            raise HEConfigError("the train reply has no single ArrayRecord to encrypt")
        arrays_key, local = next(iter(out.content.array_records.items()))
        layout = ArrayLayout.of(base)
        mismatch = layout.mismatch(local)
        if mismatch:
            raise HEConfigError(f"the trained model does not match the global model: {mismatch}")
        weight_key = str(_config(msg).get(WEIGHT_KEY_KEY, "num-examples"))
        metrics = out.content.metric_records.get("metrics")
        if metrics is None or weight_key not in metrics:
            metrics = next(
                (m for m in out.content.metric_records.values() if weight_key in m), None
            )
        if metrics is None:
            raise HEConfigError(f"the train reply has no '{weight_key}' metric to weight by")
        weight = float(metrics[weight_key])  # type: ignore[arg-type]
        if not np.isfinite(weight) or weight <= 0:
            raise HEConfigError(f"'{weight_key}' must be positive, got {weight}")
        start = time.perf_counter()
        update = layout.flatten(local, dtype=np.float64)
        update -= layout.flatten(base, dtype=np.float64)
        update *= weight
        peak = float(np.max(np.abs(update))) if update.size else 0.0
        if not np.isfinite(peak):
            raise HEConfigError("the update is not finite (NaN or Inf); nothing was encrypted")
        limit = 2.0 ** (context_data_bits(ctx) - np.log2(ctx.global_scale) - 3)
        if peak > limit:
            raise HEConfigError(
                f"|{weight_key} x (local - base)| reaches {peak:.3g}, above the {limit:.3g} the "
                "CKKS modulus holds at this scale; generate keys with a smaller --scale-bits"
            )
        packed = encrypt_packed(ctx, update)
        seconds = time.perf_counter() - start
        content = RecordDict()
        for key, value in out.content.items():
            if key == arrays_key:
                content[key] = ArrayRecord({CIPHERTEXTS: Array(packed)})
            else:
                content[key] = value
        content[RECORD_KEY] = ConfigRecord(
            {
                "format": FORMAT,
                "fingerprint": context_fingerprint(ctx),
                "slots": codec_for(ctx).slots,
                "num-values": layout.dim,
                "chunks": int(packed.shape[0]),
                "weight": weight,
                "layout": layout_signature(layout),
                "encrypt-seconds": seconds,
                "decrypt-seconds": self._last_decrypt,
            }
        )
        self.timings.append((self._last_decrypt, seconds, int(packed.nbytes)))
        return Message(metadata=out.metadata, content=content)


def layout_signature(layout: ArrayLayout) -> str:
    """A short fingerprint of a model layout (keys, shapes, dtypes)."""
    text = repr((layout.keys, layout.shapes, layout.dtypes))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _config(msg: Message) -> dict[str, object]:
    values: dict[str, object] = {}
    if msg.has_content():
        for record in msg.content.config_records.values():
            values.update(record)
    return values


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


#: The ready-made mod: key path from the node or run config.
he_mod = HEMod()
