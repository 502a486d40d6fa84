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

On the TRAIN reply it computes ``s * n * (local - base)``, where ``n`` is the reply's
``num-examples`` and ``s`` the weight scale the server announces (the server sums
the same ``s * n`` in plaintext), packs all layers
into one flat vector and encrypts it into ``ceil(d / slots)`` ciphertexts. The
reply's ArrayRecord then holds only ``he.ciphertexts``: the ciphertexts'
coefficients, uint8 of shape (chunks, 2, N, 7) (:class:`flower_ext.crypto.CKKSCodec`);
an ``he`` ConfigRecord says the format, the key fingerprint, the
slots, the number of values and the weight used. Metrics pass unchanged.

Refusals (an error reply whose reason the server audits): a bank whose key
fingerprint differs from the one the server announces (wrong key), top-k
compression in the same federation (sparse updates have no shared index set),
a bank configured for HE whose server does not run ``EncryptedFedAvg`` (the
mod never lets a plaintext update leave a bank that asked for encryption; the
bank's node config ``he`` wins over the run config), and an update that, added
to those of the ``he-num-banks`` banks the server sampled, could pass the CKKS
range (:func:`check_sum_range`). Whatever the server sends, the mod answers
with a reply, never an exception.

Where the secret context comes from, first match wins: the ``secret_context``
argument; the node config ``he-secret-context`` (deployment:
``flower-supernode --node-config "he-secret-context='/keys/bank-secret.ckks'"``);
the run config ``he-secret-context`` (simulation); the per-run simulation key
directory (:func:`flower_ext.crypto.simulation_key_dir`) the bank app's server
fills in a simulation when both paths are empty - used only if this user owns it
and nobody else can read it, and never by a bank whose node config says
``he = true`` (a deployed bank uses its own key file).

The final model: :func:`decrypt_result` turns what ``EncryptedFedAvg.start``
returned (or saved) into the plaintext model, for a bank holding the key.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    context_fingerprint,
    context_slots,
    decrypt_packed,
    encrypt_packed,
    load_secret_context,
    max_abs_sum,
    simulation_key_dir,
)
from flower_ext.records import ArrayLayout, array_view

#: Train/evaluate config keys the server sets.
FINGERPRINT_KEY = "he-fingerprint"
SLOTS_KEY = "he-slots"
FORMAT_KEY = "he-format"
WEIGHT_KEY_KEY = "he-weight-key"
#: How many banks may add a ciphertext to this round's sum (the server's sample size):
#: each bank keeps its own contribution under ``max_abs_sum / num_banks``.
NUM_BANKS_KEY = "he-num-banks"
#: A public factor ``s`` every bank multiplies its weight by (``s * n_i``); the server
#: sums the same ``s * n_i``, so it cancels in ``sum / W`` and only trades precision for range.
WEIGHT_SCALE_KEY = "he-weight-scale"
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
    """The plain global model ``base + sum / W`` (just ``base`` before the first aggregate).

    Raises :class:`flower_ext.crypto.CryptoError` for anything that is not a
    well-formed encrypted global model under ``ctx`` (the server sends what it
    likes; the bank never crashes on it).
    """
    base, he = split_global(record)
    if CIPHERTEXTS not in he:
        return base
    try:
        layout = ArrayLayout.of(base)
        packed = array_view(he[CIPHERTEXTS])
        total = float(array_view(he[WEIGHT_TOTAL]).reshape(-1)[0])
    except CryptoError:
        raise
    except Exception as err:  # forged headers, missing keys: all "not a model"
        raise CryptoError(
            f"the encrypted global model is incomplete or malformed ({type(err).__name__}: "
            f"{str(err)[:200]})"
        ) from err
    if not np.isfinite(total) or total <= 0:
        raise CryptoError(f"the encrypted global model has total weight {total}")
    try:
        summed = decrypt_packed(ctx, packed, layout.dim)
    except CryptoError:
        raise
    except Exception as err:  # TenSEAL/SEAL raise several types on garbage
        raise CryptoError(
            f"the encrypted global model does not decrypt under this bank's key "
            f"({type(err).__name__}: {str(err)[:200]})"
        ) from err
    flat = layout.flatten(base, dtype=np.float64) + summed / total
    for dtype, start, stop in zip(
        layout.dtypes, layout.offsets[:-1], layout.offsets[1:], strict=True
    ):
        if np.dtype(dtype).kind in "iub":  # counters stay integers
            flat[start:stop] = np.rint(flat[start:stop])
    return layout.unflatten(flat)


def decrypt_result(result: Any, secret_context: str | Path | bytes | ts.Context) -> ArrayRecord:
    """The final plaintext model from what an encrypted run returned or saved.

    ``EncryptedFedAvg.start`` returns a Flower ``Result`` whose ``arrays`` is the
    *encrypted* global model (public base, ``he.ciphertexts``, ``he.weight-total``):
    the server cannot read it. A bank holding the secret context turns it into
    the model Flower's FedAvg would have produced (equal up to CKKS noise).

    Parameters
    ----------
    result : flwr.serverapp.strategy.Result | ArrayRecord | Mapping | str | Path
        The ``Result`` itself, its ``arrays``, a mapping of array name to array
        (e.g. ``dict(np.load("final.npz"))`` or ``result.arrays.to_numpy_ndarrays``
        keyed by name), or the path of an ``.npz`` file saved with
        ``np.savez(path, **{k: a.numpy() for k, a in result.arrays.items()})``.
    secret_context : str | Path | bytes | tenseal.Context
        The banks' secret context (``bank-secret.ckks``).

    Returns
    -------
    ArrayRecord
        The plaintext model, same keys, shapes and dtypes as the initial model.

    Raises
    ------
    CryptoError
        The input is not an encrypted global model under this key, or the
        context holds no secret key.

    Examples
    --------
    >>> result = strategy.start(grid, initial_arrays, num_rounds=5)
    >>> np.savez("final-encrypted.npz", **{k: a.numpy() for k, a in result.arrays.items()})
    >>> # ... later, at a bank:
    >>> model = decrypt_result("final-encrypted.npz", "/keys/bank-secret.ckks")
    >>> torch_model.load_state_dict(model.to_torch_state_dict())
    """
    ctx = load_secret_context(secret_context)
    record = _as_record(result)
    if CIPHERTEXTS not in record:
        raise CryptoError(
            f"no '{CIPHERTEXTS}' in the given model: it is not an encrypted global model "
            "(no round was aggregated, or the run did not use EncryptedFedAvg)"
        )
    return decrypt_global(ctx, record)


def _as_record(result: Any) -> ArrayRecord:
    if isinstance(result, (str, Path)):
        path = Path(os.path.expanduser(str(result)))
        if not path.is_file():
            raise CryptoError(f"{path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as saved:
                return ArrayRecord({k: Array(np.asarray(saved[k])) for k in saved.files})
        except CryptoError:
            raise
        except Exception as err:
            raise CryptoError(f"{path} is not an .npz of arrays: {err}") from err
    arrays = getattr(result, "arrays", result)  # a Flower Result, or the record itself
    if isinstance(arrays, ArrayRecord):
        return arrays
    if isinstance(arrays, Mapping):
        try:
            return ArrayRecord(
                {
                    str(k): v if isinstance(v, Array) else Array(np.asarray(v))
                    for k, v in arrays.items()
                }
            )
        except Exception as err:
            raise CryptoError(f"the given mapping does not hold arrays: {err}") from err
    raise CryptoError(
        f"cannot read a model from {type(result).__name__}: pass a Result, an ArrayRecord, a "
        "mapping of arrays or an .npz path"
    )


class HEMod:
    """A ClientApp mod: decrypt the incoming global model, encrypt the outgoing update.

    Parameters
    ----------
    secret_context : str | Path | tenseal.Context, optional
        The banks' secret context (``bank-secret.ckks`` from ``flower-ext keygen``).
        Omitted: node config, then run config ``he-secret-context``, then (simulation
        only) the per-run key directory.
    enabled : bool, optional
        Force the mod on or off. Omitted: the bank's own node config ``he`` when it
        has one (the bank's setting wins over the run config), else on when the
        server announces HE (``he-fingerprint`` in the config) or the run config
        says ``he = true``.

    Notes
    -----
    A bank that is on (``enabled=True`` or node config ``he = true``) never lets a
    plaintext update leave: if the server does not announce encrypted
    aggregation it answers with an error reply saying so, whatever the run config.

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
        """Whether this message is handled encrypted (see the class docstring for the order)."""
        if self.enabled is not None:
            return self.enabled
        if ENABLED_KEY in context.node_config:  # the bank's own setting wins
            return _as_bool(context.node_config[ENABLED_KEY])
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
        how = (
            "set the node config "
            f"'{SECRET_CONTEXT_KEY}' (deployment) or the run config '{SECRET_CONTEXT_KEY}' "
            "(simulation) to the bank-secret.ckks written by `flower-ext keygen`"
        )
        if _as_bool(context.node_config.get(ENABLED_KEY, False)):
            # A bank that asked for HE in its own node config is a deployed bank: it
            # never takes keys someone else generated on this host.
            raise HEConfigError(f"this bank's node config says he = true but names no key: {how}")
        fallback = simulation_key_dir(context.run_id) / SECRET_FILE
        if fallback.is_file():
            _check_private(fallback)
            return load_secret_context(fallback)
        raise HEConfigError(f"HE is on but this bank has no secret context: {how}")

    # ------------------------------------------------------------------ the mod
    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
            return call_next(msg, context)
        if not self.is_active(msg, context):
            return call_next(msg, context)
        try:
            ctx, plain_msg, base, round_cfg = self._decrypt_incoming(msg, context)
        except (HEConfigError, CryptoError, OSError) as err:
            return _error_reply(msg, f"he_mod: {err}")
        except Exception as err:  # whatever the server sent, the bank answers, never crashes
            return _error_reply(msg, f"he_mod: unreadable message ({type(err).__name__}: {err})")
        out = call_next(plain_msg, context)
        if kind != MessageType.TRAIN or out.has_error() or not out.has_content():
            return out
        try:
            return self._encrypt_reply(msg, out, ctx, base, round_cfg)
        except (HEConfigError, CryptoError) as err:
            return _error_reply(msg, f"he_mod: {err}")
        except Exception as err:  # never let an unencrypted reply out on an unexpected error
            return _error_reply(
                msg, f"he_mod: could not encrypt the update ({type(err).__name__}: {err})"
            )

    def _decrypt_incoming(
        self, msg: Message, context: Context
    ) -> tuple[ts.Context, Message, ArrayRecord, tuple[int, float]]:
        config = _config(msg)
        announced = str(config.get(FINGERPRINT_KEY, "") or "")
        if not announced:
            raise HEConfigError(
                "this bank is configured for encrypted aggregation (he = true) but the server "
                "does not run EncryptedFedAvg; refusing to send a plaintext update"
            )
        ratio = config.get(TOPK_RATIO_KEY, context.run_config.get(TOPK_RATIO_KEY, 0.0))
        if _number(ratio, TOPK_RATIO_KEY) > 0:
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
        slots = config.get(SLOTS_KEY, context_slots(ctx))
        if _number(slots, SLOTS_KEY) != context_slots(ctx):
            raise HEConfigError(
                f"the server uses {slots} slots, this bank's context has {context_slots(ctx)}"
            )
        round_cfg = (
            _round_bounds(config) if msg.metadata.message_type == MessageType.TRAIN else (1, 1.0)
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
        return ctx, Message(metadata=msg.metadata, content=content), base, round_cfg

    def _encrypt_reply(
        self,
        msg: Message,
        out: Message,
        ctx: ts.Context,
        base: ArrayRecord,
        round_cfg: tuple[int, float],
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
        weight = _number(metrics[weight_key], weight_key)
        if weight <= 0:
            raise HEConfigError(f"'{weight_key}' must be positive, got {weight}")
        num_banks, scale = round_cfg
        start = time.perf_counter()
        update = layout.flatten(local, dtype=np.float64)
        update -= layout.flatten(base, dtype=np.float64)
        update *= weight * scale
        peak = float(np.max(np.abs(update))) if update.size else 0.0
        if not np.isfinite(peak):
            raise HEConfigError("the update is not finite (NaN or Inf); nothing was encrypted")
        check_sum_range(ctx, peak, num_banks, weight=weight, scale=scale, weight_key=weight_key)
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
                "weight-scale": scale,
                "num-banks": num_banks,
                "layout": layout_signature(layout),
                "encrypt-seconds": seconds,
                "decrypt-seconds": self._last_decrypt,
            }
        )
        self.timings.append((self._last_decrypt, seconds, int(packed.nbytes)))
        return Message(metadata=out.metadata, content=content)


def check_sum_range(
    ctx: ts.Context,
    peak: float,
    num_banks: int,
    *,
    weight: float = 1.0,
    scale: float = 1.0,
    weight_key: str = "num-examples",
) -> None:
    """Refuse a contribution that could make the *sum* of ``num_banks`` of them wrap.

    The server adds at most ``num_banks`` ciphertexts (one per sampled bank; it
    rejects any other reply), so if every bank keeps ``num_banks * |s n_i u_i|``
    under :func:`flower_ext.crypto.max_abs_sum`, the sum's ``|sum_i s n_i u_i|``
    stays under it too, whatever the others send. ``peak`` is ``max |s n u|``.
    """
    limit = max_abs_sum(ctx)
    if peak * num_banks <= limit:
        return
    fit = limit / (num_banks * peak / scale) if peak > 0 else scale
    fit = 2.0 ** math.floor(math.log2(fit)) if fit > 0 else 0.0
    raise HEConfigError(
        f"{num_banks} banks x |{scale:g} x {weight_key}={weight:g} x (local - base)| = "
        f"{num_banks} x {peak:.3g} could reach {num_banks * peak:.3g}, above the {limit:.3g} "
        "the CKKS modulus holds for the sum (it would decrypt to garbage); nothing was sent. "
        f"Set the server's weight scale to {fit:g} or less (EncryptedFedAvg(weight_scale=...), "
        "run config he-weight-scale), or generate keys with a smaller --scale-bits"
    )


def _number(value: object, what: str) -> float:
    """A finite real number, or :class:`HEConfigError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise HEConfigError(f"'{what}' must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise HEConfigError(f"'{what}' is not finite ({number})")
    return number


def _round_bounds(config: Mapping[str, object]) -> tuple[int, float]:
    """(number of banks, weight scale) the server announced for this round."""
    if NUM_BANKS_KEY not in config:
        raise HEConfigError(
            f"the server did not announce '{NUM_BANKS_KEY}', so this bank cannot keep the "
            "encrypted sum in range (the server runs an older EncryptedFedAvg)"
        )
    banks = _number(config[NUM_BANKS_KEY], NUM_BANKS_KEY)
    if banks < 1 or banks != int(banks):
        raise HEConfigError(f"'{NUM_BANKS_KEY}' must be a positive integer, got {banks}")
    scale = _number(config.get(WEIGHT_SCALE_KEY, 1.0), WEIGHT_SCALE_KEY)
    if scale <= 0:
        raise HEConfigError(f"'{WEIGHT_SCALE_KEY}' must be positive, got {scale}")
    return int(banks), scale


def _check_private(path: Path) -> None:
    """A simulation key file is used only if this user owns it and nobody else can read it."""
    for item in (path.parent, path):
        info = item.stat()
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise HEConfigError(
                f"{item} is not owner-only or not owned by this user: refusing keys someone "
                "else may have made; use `flower-ext keygen` and he-secret-context"
            )


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
