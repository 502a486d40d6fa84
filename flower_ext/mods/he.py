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

Two more refusals guard against an *active* server: a contribution whose weighted
update would sink into the CKKS noise (:func:`check_precision`, a weight scale
too small), and a message that breaks what the bank pinned earlier in the run
(:meth:`HEMod.pin`: the public base model, one global model per round, the
round's range settings). These narrow, but do not close, the server's use of a
bank as a decryption oracle through its clear metrics (README, "What HE
protects, and what it does not").

Where the secret context comes from, first match wins: the ``secret_context``
argument; the node config ``he-secret-context`` (deployment:
``flower-supernode --node-config "he-secret-context='/keys/bank-secret.ckks'"``);
then, **only for a bank whose node config does not say** ``he = true``, the run
config ``he-secret-context`` (simulation) and the per-run simulation key
directory (:func:`flower_ext.crypto.simulation_key_dir`) the bank app's server
fills in a simulation when both paths are empty - used only if this user owns it
and nobody else can read it. A bank whose node config says ``he = true`` and
names no key refuses: the run config is the server's, and a key file the server
names could be one the server made.

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
    MetricRecord,
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
    noise_floor,
    simulation_key_dir,
)
from flower_ext.records import ArrayLayout, array_view, arrays_sha256

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
#: Flower's round number in every train/evaluate config, and the run's round count.
ROUND_KEY = "server-round"
NUM_ROUNDS_KEY = "num-server-rounds"
#: ``context.state`` record where a bank pins what the server showed it (see :meth:`HEMod.pin`).
PINS_STATE_KEY = "he-pins"
#: Precision floor (:func:`check_precision`): a bank's ciphertext noise, in model units,
#: may exceed neither ``ABS_TOLERANCE`` nor ``2^-MIN_SIGNAL_BITS`` of its largest update
#: coordinate.
ABS_TOLERANCE = 1e-6
MIN_SIGNAL_BITS = 8
#: Node config (the bank's own; the run config cannot set it): ``false`` makes the bank
#: send no number computed from a decrypted model - train replies keep only the weight
#: and the DP accounting values (which do not depend on the model), evaluation is refused.
CLEAR_METRICS_KEY = "he-clear-metrics"
#: Train metrics that do not depend on the model (the privacy ledger's spending).
MODEL_FREE_METRICS = (
    "dp-epsilon",
    "dp-delta",
    "dp-noise-multiplier",
    "dp-max-grad-norm",
    "dp-sample-rate",
    "dp-steps",
)


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
        Omitted: node config ``he-secret-context``; then, unless the node config says
        ``he = true``, run config ``he-secret-context`` and (simulation only) the
        per-run key directory.
    enabled : bool, optional
        Force the mod on or off. Omitted: the bank's own node config ``he`` when it
        has one (the bank's setting wins over the run config), else on when the
        server announces HE (``he-fingerprint`` in the config) or the run config
        says ``he = true``.
    clear_metrics : bool, optional
        ``False``: send no number computed from a decrypted model, so an active
        server cannot use this bank as a decryption oracle through its metrics
        (train replies keep only the weight and the DP accounting values; evaluate
        messages are refused). Omitted: the node config ``he-clear-metrics``
        (default true; the run config, the server's, cannot turn it on or off).

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
        clear_metrics: bool | None = None,
    ) -> None:
        self.secret_context = secret_context
        self.enabled = enabled
        self.clear_metrics = clear_metrics
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

    def sends_metrics(self, context: Context) -> bool:
        """Whether this bank sends metrics of decrypted models (the bank's own setting)."""
        if self.clear_metrics is not None:
            return self.clear_metrics
        return _as_bool(context.node_config.get(CLEAR_METRICS_KEY, True))

    def context_for(self, context: Context) -> ts.Context:
        """The bank's secret context (see the module docstring for where it comes from)."""
        if self.secret_context is not None:
            return load_secret_context(self.secret_context)
        node_path = str(context.node_config.get(SECRET_CONTEXT_KEY, "") or "")
        if node_path:
            return load_secret_context(node_path)
        if _as_bool(context.node_config.get(ENABLED_KEY, False)):
            # A bank that asked for HE in its own node config is a deployed bank: its key
            # comes from its own node config only, never from a path the run config (the
            # server) names, nor from keys someone else generated on this host.
            raise HEConfigError(
                "this bank's node config says he = true but names no key: set the node "
                f"config '{SECRET_CONTEXT_KEY}' to this bank's bank-secret.ckks (flower-supernode "
                f"--node-config \"he=true {SECRET_CONTEXT_KEY}='/keys/bank-secret.ckks'\"); a "
                f"bank configured for HE never loads the key file the run config "
                f"'{SECRET_CONTEXT_KEY}' names (the server chooses the run config)"
            )
        run_path = str(context.run_config.get(SECRET_CONTEXT_KEY, "") or "")
        if run_path:
            return load_secret_context(run_path)
        how = (
            "set the node config "
            f"'{SECRET_CONTEXT_KEY}' (deployment) or the run config '{SECRET_CONTEXT_KEY}' "
            "(simulation) to the bank-secret.ckks written by `flower-ext keygen`"
        )
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
        if kind == MessageType.EVALUATE and not self.sends_metrics(context):
            return _error_reply(
                msg,
                f"he_mod: this bank sends no metrics of a decrypted model (node config "
                f"{CLEAR_METRICS_KEY} = false): evaluation refused",
            )
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
            return self._encrypt_reply(msg, out, ctx, base, round_cfg, context)
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
        base, he_arrays = split_global(record)
        pins = self.pin(msg, context, base, he_arrays, round_cfg)
        start = time.perf_counter()
        plain = decrypt_global(ctx, record)
        self._last_decrypt = time.perf_counter() - start
        context.state[PINS_STATE_KEY] = pins  # only a model that decrypted is pinned
        content = RecordDict()
        for key, value in msg.content.items():
            content[key] = plain if key == arrays_key else value
        return ctx, Message(metadata=msg.metadata, content=content), base, round_cfg

    def pin(
        self,
        msg: Message,
        context: Context,
        base: ArrayRecord,
        he_arrays: ArrayRecord,
        round_cfg: tuple[int, float],
    ) -> ConfigRecord:
        """Check a message against what this bank pinned earlier in the run; the new pins.

        Against an *active* server that uses the bank as a decryption oracle (it sends
        another bank's ciphertext as "the global model" with a crafted public base
        and reads the clear metrics, see the README), the bank keeps in
        ``context.state`` (per run, per node: Flower keeps it between messages):

        * the public base model of its first message: a later message with another
          base is refused (the base of :class:`EncryptedFedAvg` never changes within
          a run; changing it is how a server isolates one input or pins the bias);
        * one global model per model index (train round ``r`` carries model
          ``r - 1``, evaluate round ``r`` model ``r``, as Flower's loop sends them): a
          second, different model (ciphertexts or total weight) for an index already
          seen, or a model older than the newest seen, is refused; so is a round past
          the run config's ``num-server-rounds``. Each bank thus decrypts at most one
          model per round, and evaluates the very model it then trains on;
        * the train round's ``he-num-banks`` and ``he-weight-scale``: a repeated train
          message for the same round must announce the same ones (one range or
          precision refusal per round, not a binary search).

        Raises :class:`HEConfigError` saying which rule the message broke.
        """
        config = _config(msg)
        if ROUND_KEY not in config:
            raise HEConfigError(
                f"the message has no '{ROUND_KEY}': this bank decrypts one global model per "
                "round and cannot tell which round this one is"
            )
        rnd = _number(config[ROUND_KEY], ROUND_KEY)
        if rnd < 1 or rnd != int(rnd):
            raise HEConfigError(f"'{ROUND_KEY}' must be a positive integer, got {rnd:g}")
        rnd_i = int(rnd)
        rounds = context.run_config.get(NUM_ROUNDS_KEY)
        if (
            isinstance(rounds, int)
            and not isinstance(rounds, bool)
            and rounds > 0
            and rnd_i > rounds
        ):
            raise HEConfigError(
                f"round {rnd_i} is past the run's {NUM_ROUNDS_KEY} = {rounds}; refused"
            )
        is_train = msg.metadata.message_type == MessageType.TRAIN
        slot = rnd_i - 1 if is_train else rnd_i
        base_digest = arrays_sha256(base)
        model_digest = arrays_sha256(he_arrays) if len(he_arrays) else "base"
        num_banks, scale = round_cfg
        old = context.state.config_records.get(PINS_STATE_KEY)
        if old is None:
            pins = ConfigRecord(
                {
                    "base": base_digest,
                    "slot": slot,
                    "model": model_digest,
                    "train-round": 0,
                    "num-banks": 0,
                    "weight-scale": 0.0,
                }
            )
        else:
            pins = ConfigRecord(dict(old))
            if old["base"] != base_digest:
                raise HEConfigError(
                    "the server sent a public base model different from the one this bank "
                    f"received first in this run (sha256 {str(old['base'])[:12]}..., now "
                    f"{base_digest[:12]}...): the base of an encrypted federation never "
                    "changes within a run, and a crafted base would let the server read "
                    "another bank's update through this bank's metrics; refused"
                )
            pinned_slot = int(old["slot"])  # type: ignore[arg-type]
            if slot < pinned_slot:
                raise HEConfigError(
                    f"the server sent global model {slot} after this bank already received "
                    f"model {pinned_slot}: an older model is refused"
                )
            if slot == pinned_slot and old["model"] != model_digest:
                raise HEConfigError(
                    f"the server sent a second, different global model {slot} (round "
                    f"{rnd_i}): a bank decrypts one model per round, evaluates it and trains "
                    "on that same model; refused"
                )
            pins["slot"] = slot
            pins["model"] = model_digest
        if is_train:
            if int(pins["train-round"]) == rnd_i and (  # type: ignore[arg-type]
                int(pins["num-banks"]) != num_banks  # type: ignore[arg-type]
                or float(pins["weight-scale"]) != scale  # type: ignore[arg-type]
            ):
                raise HEConfigError(
                    f"the server repeated train round {rnd_i} with other '{NUM_BANKS_KEY}' or "
                    f"'{WEIGHT_SCALE_KEY}' than it announced first; refused"
                )
            pins["train-round"] = rnd_i
            pins["num-banks"] = num_banks
            pins["weight-scale"] = scale
        return pins

    def _encrypt_reply(
        self,
        msg: Message,
        out: Message,
        ctx: ts.Context,
        base: ArrayRecord,
        round_cfg: tuple[int, float],
        context: Context,
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
        check_precision(ctx, peak, weight=weight, scale=scale, weight_key=weight_key)
        packed = encrypt_packed(ctx, update)
        seconds = time.perf_counter() - start
        keep = None if self.sends_metrics(context) else {weight_key, *MODEL_FREE_METRICS}
        content = RecordDict()
        for key, value in out.content.items():
            if key == arrays_key:
                content[key] = ArrayRecord({CIPHERTEXTS: Array(packed)})
            elif keep is not None and isinstance(value, MetricRecord):
                content[key] = MetricRecord({k: v for k, v in value.items() if k in keep})
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

    The refusal goes to the server, which chose ``num_banks``: it never states
    ``peak``, only the largest power-of-two weight scale that fits. That tells the
    server the power-of-two bucket of this bank's largest weighted update
    coordinate (one bucket per round: the bank pins the round's ``he-num-banks``).
    """
    limit = max_abs_sum(ctx)
    if peak * num_banks <= limit:
        return
    fit = limit / (num_banks * peak / scale) if peak > 0 else scale
    fit = 2.0 ** math.floor(math.log2(fit)) if fit > 0 else 0.0
    raise HEConfigError(
        f"{num_banks} banks x max|{scale:g} x {weight_key} x (local - base)| could exceed "
        f"the {limit:.3g} the CKKS modulus holds for the sum (it would decrypt to garbage); "
        f"nothing was sent. Set the server's weight scale to {fit:g} or less (a power of "
        "two; EncryptedFedAvg(weight_scale=...), run config he-weight-scale), or generate "
        "keys with a smaller --scale-bits"
    )


def check_precision(
    ctx: ts.Context,
    peak: float,
    *,
    weight: float = 1.0,
    scale: float = 1.0,
    weight_key: str = "num-examples",
) -> None:
    """Refuse a contribution that would sink into the CKKS noise.

    One ciphertext adds about ``e = noise_floor(ctx)`` (2.4e-7 with the default
    keys) to every value it carries, so this bank's update comes back with an error
    of about ``e / (s n)`` per coordinate. The bank refuses when that error exceeds
    both ``ABS_TOLERANCE`` (1e-6) and ``2^-MIN_SIGNAL_BITS`` (1/256) of its largest
    update coordinate, i.e. it encrypts only if ``s n >= e / 1e-6`` (0.24) or
    ``s n max|u| = peak >= 256 e`` (6.1e-5). A server weight scale of 1e-9 with
    1,000 rows (error 0.2 on updates of 0.01) is refused instead of silently ruining
    the model. ``peak`` is ``max |s n u|``.
    """
    floor = noise_floor(ctx)
    if floor <= ABS_TOLERANCE * scale * weight or floor <= peak * 2.0**-MIN_SIGNAL_BITS:
        return
    raise HEConfigError(
        f"the weight scale {scale:g} x {weight_key}={weight:g} is too small: this bank's "
        f"update would decrypt with an error of about {floor / (scale * weight):.1g} per "
        f"weight, above {ABS_TOLERANCE:g} and above 1/{2**MIN_SIGNAL_BITS} of its largest "
        f"coordinate (CKKS noise {floor:.2g} per value); nothing was sent. Raise the "
        "server's weight scale (EncryptedFedAvg(weight_scale=...), run config "
        "he-weight-scale)"
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
