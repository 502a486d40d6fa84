"""FedAvg over CKKS ciphertexts: the server adds updates it cannot read.

The banks run :class:`flower_ext.mods.HEMod` and encrypt ``n_i * (local_i - base)``
(all layers packed into ``ceil(d / slots)`` ciphertexts, :mod:`flower_ext.crypto`).
This strategy holds the *public* TenSEAL context only (it refuses a private one)
and, per round:

1. binds replies to this round's messages (one per sampled node; duplicates,
   replays, strangers and error replies sent in another bank's name are
   rejected), then checks every reply: error replies, the ``he`` record (format, key
   fingerprint, slots, number of values, layout), a positive plausible
   ``num-examples`` equal to the weight the bank multiplied by, the shape of the
   ciphertext array and that every coefficient is below the modulus ``q``. A
   bad reply is rejected with a reason in the audit trail, before any of it
   touches the sum; the round goes on with the rest;
2. adds the accepted ciphertexts (coefficient arrays, mod ``q``: no TenSEAL
   object is built on the server) and the plaintext weights;
3. returns the new *encrypted global model*: an ArrayRecord with the public
   base model, ``he.ciphertexts`` (the sum) and ``he.weight-total`` (``W``).
   Flower's ``start`` loop passes it on like any model; the banks decrypt
   ``base + sum / W`` before training or evaluating.

What "the global model stays encrypted" means here: everything the server holds
that depends on the banks' data is ciphertext; the base (initial model) is the
server's own. Central evaluation is impossible by design (an ``evaluate_fn``
receives the encrypted record): evaluation runs on the banks, and the strategy
aggregates their plaintext metrics as :class:`FedAvg` does.

The server only adds: no server learning rate or momentum, no weight caps (each
would multiply a ciphertext). Robust rules need plaintext updates, and top-k
sends different coordinates per bank: both are refused (the latter when a
``topk-ratio > 0`` reaches the train config).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.audit import AuditTrail
from flower_ext.crypto import (
    FORMAT,
    CiphertextError,
    CryptoError,
    codec_for,
    context_fingerprint,
    load_public_context,
    max_abs_sum,
    noise_floor,
    num_chunks,
)
from flower_ext.mods.he import (
    ABS_TOLERANCE,
    CIPHERTEXTS,
    FINGERPRINT_KEY,
    FORMAT_KEY,
    NUM_BANKS_KEY,
    RECORD_KEY,
    SLOTS_KEY,
    TOPK_RATIO_KEY,
    WEIGHT_KEY_KEY,
    WEIGHT_SCALE_KEY,
    WEIGHT_TOTAL,
    layout_signature,
    split_global,
)
from flower_ext.records import ArrayLayout, array_view, arrays_sha256
from flower_ext.validation import (
    Rejection,
    bind_replies,
    check_weight,
    client_label,
    short_reason,
)

from .base import RoundReport, UpdateAggregationStrategy, fedavg_arguments, weighted_scalar_metrics


@dataclass
class EncryptedReply:
    node_id: int
    label: str
    weight: float
    metrics: MetricRecord
    packed: np.ndarray  # uint8 (chunks, 2, N, coeff_bytes): a zero-copy view on the reply
    nbytes: int
    digest: bytes = b""


#: Attribute that marks an ``evaluate_fn`` as knowing it receives the encrypted model.
ENCRYPTED_HOOK_ATTR = "__flower_ext_reads_encrypted_model__"


def encrypted_model_hook(fn: Callable[[int, ArrayRecord], MetricRecord | None]) -> Callable:
    """Mark ``fn`` as an ``evaluate_fn`` that expects the *encrypted* global model.

    :meth:`EncryptedFedAvg.start` refuses an ordinary ``evaluate_fn`` (it would get
    ciphertexts, not weights). A hook that only records or checkpoints what the
    server holds (the bank app's round recorder does) is marked with this and passes.
    """
    setattr(fn, ENCRYPTED_HOOK_ATTR, True)
    return fn


def _safe_label(msg: Message) -> str:
    try:
        return client_label(msg)[:100]
    except Exception:
        return ""


def _real(value: object, what: str) -> float:
    """A finite real number from a client record, or ``CiphertextError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CiphertextError(f"'{what}' must be one number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise CiphertextError(f"'{what}' is not finite ({number})")
    return number


def _replay_digest(packed: np.ndarray) -> bytes:
    """A digest of a spread sample of a reply's ciphertext bytes, to spot exact copies.

    Fresh CKKS ciphertexts are uniformly random mod q, so two honest ones never
    share these bytes; a copy shares all of them. Sampling (every 4099th byte,
    about 7 kB of a 28 MB update) keeps this ~1000x cheaper than hashing it all.
    It cannot catch a re-randomised copy (anyone with the public key can add an
    encryption of zero): there is no integrity in CKKS.
    """
    flat = packed.reshape(-1)
    digest = hashlib.blake2b(repr(packed.shape).encode(), digest_size=16)
    digest.update(flat[::4099].tobytes())
    digest.update(flat[-64:].tobytes())
    return digest.digest()


class EncryptedFedAvg(UpdateAggregationStrategy):
    """Federated Averaging of CKKS-encrypted, client-weighted updates (add-only server).

    McMahan et al. 2017 (FedAvg) with the banks' updates encrypted under CKKS
    (Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate
    Numbers", ASIACRYPT 2017) through TenSEAL. Equal, up to CKKS noise (~1e-9
    relative with the default keys), to :class:`FedAvg` weighted by ``num-examples``.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    context : str | Path | bytes | tenseal.Context
        The *public* context (``server-public.ckks`` from ``flower-ext keygen``).
        A context holding the secret key is refused.
    weight_scale : float (default: 1.0)
        A public factor ``s`` every bank multiplies its weight by: banks encrypt
        ``s * n_i * (local_i - base)`` and the server sums ``W = sum_i s * n_i``, so
        ``s`` cancels in ``sum / W``. Large federations lower it (e.g. 1e-3 for
        banks with a million rows) so the encrypted sum stays in the CKKS range;
        a bank refuses, naming the largest power-of-two ``s`` that fits, rather than
        let the sum wrap. Precision is about ``2e-7 * sqrt(banks) / W`` per parameter;
        a bank also refuses an ``s`` so small its update would sink into the CKKS noise
        (:func:`flower_ext.mods.he.check_precision`), and ``s`` outside
        ``[noise_floor / (1e-6 * max_plausible_examples), max_abs_sum]`` is refused
        here.
    proximal_mu, max_plausible_examples, min_valid_replies, audit
        As in :class:`UpdateAggregationStrategy`.
    server_learning_rate, server_momentum, max_weight, max_weight_median_multiple
        Accepted for signature compatibility; anything but the defaults is
        refused (each needs a ciphertext multiplication).
    server_optimizer, server_beta1, server_beta2, server_tau
        Accepted for signature compatibility; an adaptive ``server_optimizer``
        ("adagrad", "adam", "yogi") is refused: its per-coordinate division by
        ``sqrt(v)`` needs the aggregate in clear.

    Notes
    -----
    Sum range: the server announces each round the number of banks sampled
    (``he-num-banks``, k) and the weight scale; each bank checks
    ``k * max|s n_i (local_i - base)|`` against the context's range
    (:func:`flower_ext.crypto.max_abs_sum`) before encrypting. The server adds at
    most one ciphertext per sampled bank (replies are bound to this round's
    messages, :func:`flower_ext.validation.bind_replies`), so the sum of honest
    contributions cannot wrap. A bank that sends garbage can still spoil the sum:
    CKKS has no integrity.

    Threat model: the banks' updates are protected against an honest-but-curious
    server. An active server could send one bank's ciphertext to another as the
    global model and read the receiver's clear metrics; the banks refuse what they
    can check (:meth:`flower_ext.mods.HEMod.pin`), and the README states what remains.

    Central evaluation: :meth:`start` refuses an ``evaluate_fn`` (the server holds
    ciphertexts); banks evaluate, and a key-holding bank gets the final model
    with :func:`flower_ext.mods.he.decrypt_result`.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        *,
        context: str | Path | bytes | ts.Context,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        proximal_mu: float = 0.0,
        max_weight: float | None = None,
        max_weight_median_multiple: float | None = None,
        max_plausible_examples: float = 1e9,
        min_valid_replies: int = 1,
        audit: AuditTrail | None = None,
        weight_scale: float = 1.0,
        server_optimizer: str = "sgd",
        server_beta1: float = 0.9,
        server_beta2: float = 0.99,
        server_tau: float = 1e-3,
    ) -> None:
        if (
            isinstance(weight_scale, bool)
            or not isinstance(weight_scale, (int, float))
            or not math.isfinite(weight_scale)
            or weight_scale <= 0
        ):
            raise ValueError(f"weight_scale must be a positive finite number, got {weight_scale!r}")
        refused = []
        if server_learning_rate != 1.0:
            refused.append(f"server_learning_rate={server_learning_rate}")
        if server_momentum != 0.0:
            refused.append(f"server_momentum={server_momentum}")
        if max_weight is not None or max_weight_median_multiple is not None:
            refused.append("weight caps")
        if server_optimizer != "sgd":
            raise ValueError(
                f"EncryptedFedAvg cannot apply server_optimizer='{server_optimizer}': an adaptive "
                "server optimiser divides each coordinate of the aggregate by the root of its "
                "running square, which needs the aggregate in clear; the server only adds "
                "ciphertexts (use server_optimizer='sgd' or he = false)"
            )
        if refused:
            raise ValueError(
                f"EncryptedFedAvg cannot apply {', '.join(refused)}: the server only adds "
                "ciphertexts, and each of these would multiply one"
            )
        super().__init__(
            **fedavg_arguments(locals()),
            proximal_mu=proximal_mu,
            max_plausible_examples=max_plausible_examples,
            min_valid_replies=min_valid_replies,
            audit=audit,
        )
        #: The public TenSEAL context (never a secret key: checked here).
        self.context = load_public_context(context)
        self.fingerprint = context_fingerprint(self.context)
        try:
            self.codec = codec_for(self.context)
        except CryptoError as err:
            raise ValueError(f"EncryptedFedAvg cannot use this context: {err}") from err
        self.slots = self.codec.slots
        # The scale's useful range: above it one example moving a weight by 1 already
        # overflows the sum; below it even a bank of max_plausible_examples rows would
        # decrypt with more than 1e-6 of CKKS noise per weight (banks refuse then too,
        # HEMod's check_precision; this fails at construction instead of every round).
        low = noise_floor(self.context) / (ABS_TOLERANCE * self.max_plausible_examples)
        high = max_abs_sum(self.context)
        if not low <= weight_scale <= high:
            raise ValueError(
                f"weight_scale {weight_scale:g} is outside [{low:.2g}, {high:.3g}] for these "
                f"keys: above, one example moving a weight by 1 overflows the encrypted sum; "
                f"below, even a bank of max_plausible_examples={self.max_plausible_examples:g} "
                f"rows would decrypt with more CKKS noise (about {noise_floor(self.context):.2g}"
                f" / (scale x rows)) than {ABS_TOLERANCE:g} per weight"
            )
        self.weight_scale = float(weight_scale)
        #: Digests of every ciphertext accepted so far (exact replays are refused).
        self._seen_digests: dict[bytes, int] = {}
        self._base: ArrayRecord | None = None
        self._base_layout: ArrayLayout | None = None
        #: Per round: seconds deserializing+checking, adding, serializing.
        self.timings: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ summary
    def rule_summary(self) -> str:
        return (
            f"sum of CKKS ciphertexts pre-weighted by the banks (add-only; {self.slots} slots, "
            f"key {self.fingerprint[:12]}...)"
        )

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t\t└── Encrypted: the server holds the public context only")
        log(
            INFO,
            "\t\t└── Weight scale: %g (banks encrypt scale x num-examples x update)",
            self.weight_scale,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Any:
        """Flower's ``Strategy.start``, refusing a central ``evaluate_fn`` before any round.

        The server only ever holds the encrypted global model, so an ``evaluate_fn``
        would be handed ciphertext arrays. Evaluate on the banks instead
        (``fraction_evaluate > 0`` and the ClientApp's ``@app.evaluate``), and decrypt
        the returned ``Result`` at a bank with :func:`flower_ext.mods.he.decrypt_result`.
        A hook that knows it gets the encrypted record (to save or log it) can be
        marked with :func:`encrypted_model_hook`.
        """
        if evaluate_fn is not None and not getattr(evaluate_fn, ENCRYPTED_HOOK_ATTR, False):
            raise ValueError(
                "EncryptedFedAvg cannot run a central evaluate_fn: the server holds only the "
                "encrypted global model (public base + ciphertexts), never the weights, so "
                "evaluate_fn would receive ciphertext arrays. Evaluate on the banks "
                "(fraction_evaluate > 0, the ClientApp's evaluate), and after the run let a "
                "bank holding bank-secret.ckks call "
                "flower_ext.mods.he.decrypt_result(result, secret_context) for the plaintext "
                "model. A hook that only saves or logs the encrypted record can be passed as "
                "encrypted_model_hook(fn)."
            )
        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    # ------------------------------------------------------------------ global model
    def set_global_model(self, arrays: ArrayRecord) -> None:
        """Keep the encrypted global record; its plaintext part is the public base model."""
        base, _ = split_global(arrays)
        layout = ArrayLayout.of(base)
        if self._base_layout is not None and layout != self._base_layout:
            raise ValueError("the model layout changed between rounds under encryption")
        self._base = base
        self._base_layout = layout
        self._global = arrays

    def _he_config(self, config: ConfigRecord) -> ConfigRecord:
        ratio = config.get(TOPK_RATIO_KEY, 0.0)
        if float(ratio or 0.0) > 0:  # type: ignore[arg-type]
            raise ValueError(
                "EncryptedFedAvg cannot be combined with top-k compression (topk-ratio > 0): "
                "the banks would send different coordinates, which ciphertexts cannot be "
                "added over"
            )
        config[FINGERPRINT_KEY] = self.fingerprint
        config[SLOTS_KEY] = self.slots
        config[FORMAT_KEY] = FORMAT
        config[WEIGHT_KEY_KEY] = self.weighted_by_key
        config[WEIGHT_SCALE_KEY] = self.weight_scale
        return config

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        # Sampling is done: every bank learns how many ciphertexts the sum may hold.
        config = record.get(self.configrecord_key)
        if isinstance(config, ConfigRecord):
            config[NUM_BANKS_KEY] = max(1, len(node_ids))
        return super()._construct_messages(record, node_ids, message_type)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, self._he_config(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, self._he_config(config), grid)

    # ------------------------------------------------------------------ aggregation
    def check_encrypted_reply(
        self, msg: Message, node_id: int, num_banks: int | None = None
    ) -> EncryptedReply:
        """Check one reply bound to ``node_id``; raises ``CiphertextError`` with the reason.

        Only the checks on the reply itself; binding to this round's messages comes
        first (:func:`flower_ext.validation.bind_replies`), the coefficient range
        check after (:meth:`CKKSCodec.unpack`).
        """
        if msg.has_error():
            raise CiphertextError(f"error reply: {short_reason(msg.error.reason, 250)}")
        if not msg.has_content():
            raise CiphertextError("empty reply")
        assert self._base_layout is not None
        he = msg.content.config_records.get(RECORD_KEY)
        if he is None:
            raise CiphertextError(
                "reply is not encrypted (no 'he' record): every bank must run he_mod"
            )
        if he.get("format") != FORMAT:
            raise CiphertextError(
                f"format {short_reason(repr(he.get('format')), 60)}, expected {FORMAT!r}"
            )
        if he.get("fingerprint") != self.fingerprint:
            raise CiphertextError(
                f"ciphertexts made under a different context (key fingerprint "
                f"{short_reason(he.get('fingerprint'), 16)}..., the federation's is "
                f"{self.fingerprint[:16]}...)"
            )
        if he.get("slots") != self.slots or isinstance(he.get("slots"), bool):
            raise CiphertextError(
                f"ciphertexts with {short_reason(he.get('slots'), 40)} slots, the federation's "
                f"context has {self.slots}"
            )
        dim = self._base_layout.dim
        values = he.get("num-values")
        if (
            isinstance(values, bool)
            or values != dim
            or he.get("layout") != layout_signature(self._base_layout)
        ):
            raise CiphertextError(
                f"encrypted update of {short_reason(values, 40)} values in another layout; the "
                f"model has {dim}"
            )
        metrics = msg.content.metric_records.get("metrics")
        if metrics is None and len(msg.content.metric_records) == 1:
            metrics = next(iter(msg.content.metric_records.values()))
        if metrics is None:
            raise CiphertextError("reply has no MetricRecord")
        weight, why = check_weight(metrics, self.weighted_by_key, self.max_plausible_examples)
        if why or weight is None:
            raise CiphertextError(why or f"metric '{self.weighted_by_key}' is unusable")
        he_weight = _real(he.get("weight"), "he.weight")
        if he_weight != weight:
            raise CiphertextError(
                f"the bank multiplied by {he_weight:g} but reports "
                f"{self.weighted_by_key}={weight:g}"
            )
        scale = _real(he.get("weight-scale"), "he.weight-scale")
        if scale != self.weight_scale:
            raise CiphertextError(
                f"the bank used weight scale {scale:g}, the server announced {self.weight_scale:g}"
            )
        if num_banks is not None:
            used = _real(he.get("num-banks"), "he.num-banks")
            if used < num_banks:
                raise CiphertextError(
                    f"the bank bounded its update for {used:g} banks, but {num_banks} were "
                    "sampled: its ciphertext could make the sum overflow"
                )
        if len(msg.content.array_records) != 1:
            raise CiphertextError("reply has no single ArrayRecord")
        record = next(iter(msg.content.array_records.values()))
        if set(record.keys()) != {CIPHERTEXTS}:
            raise CiphertextError(
                f"encrypted reply holds {short_reason(sorted(record.keys()), 120)}, "
                f"expected only {CIPHERTEXTS!r}"
            )
        try:
            packed = array_view(record[CIPHERTEXTS])
        except Exception as err:  # forged .npy headers raise ValueError, TypeError, ...
            raise CiphertextError(f"unreadable ciphertext array: {short_reason(err, 200)}") from err
        expected = self.codec.wire_shape(num_chunks(dim, self.slots))
        if packed.dtype != np.uint8 or tuple(packed.shape) != expected:
            raise CiphertextError(
                f"ciphertext array is {packed.dtype}{tuple(packed.shape)}, expected uint8"
                f"{expected} (chunks, 2, N, bytes per coefficient) for {dim} values"
            )
        return EncryptedReply(
            node_id=node_id,
            label=_safe_label(msg),
            weight=weight,
            metrics=metrics,
            packed=packed,
            nbytes=int(packed.nbytes),
            digest=_replay_digest(packed),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._base is None or self._base_layout is None or self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        start = time.perf_counter()
        replies = list(replies)
        sampled = list(self._sampled.get(server_round, []))
        report = RoundReport(server_round, sampled=sampled)
        self.round_reports[server_round] = report
        # One reply per sampled node, answering this round's messages: duplicates and
        # replays never reach the sum (under HE a duplicate would be added twice).
        origins = self.origins("train")
        bound, rejected = bind_replies(replies, origins=origins, sampled=sampled or None)
        accepted: list[EncryptedReply] = []
        # Check each reply whole (metadata, then every coefficient < q while widening it
        # into a scratch buffer) before its coefficients touch the sum: a malformed
        # reply is rejected and never half-added.
        codec = self.codec
        acc: np.ndarray | None = None
        scratch: np.ndarray | None = None
        pending = 0
        t_add = 0.0
        this_round: dict[bytes, int] = {}
        for msg, node in bound:
            try:
                rep = self.check_encrypted_reply(msg, node, num_banks=len(sampled) or None)
                earlier = self._seen_digests.get(rep.digest)
                if earlier is not None and earlier != server_round:  # a redone round may repeat
                    raise CiphertextError(
                        f"ciphertext identical to one accepted in round {earlier} "
                        "(a replayed update)"
                    )
                if rep.digest in this_round:
                    raise CiphertextError(
                        f"ciphertext identical to node {this_round[rep.digest]}'s in this "
                        "round (a copied update)"
                    )
                scratch = codec.unpack(rep.packed, out=scratch)
            except CiphertextError as err:
                rejected.append(Rejection(node, short_reason(err), _safe_label(msg)))
                continue
            except Exception as err:  # anything a client can provoke is its rejection
                rejected.append(
                    Rejection(
                        node,
                        short_reason(f"malformed reply ({type(err).__name__}: {err})"),
                        _safe_label(msg),
                    )
                )
                continue
            this_round[rep.digest] = node
            t0 = time.perf_counter()
            if acc is None:
                acc, scratch, pending = scratch, None, 1
            else:
                if pending == codec.max_terms:
                    np.remainder(acc, np.uint64(codec.q), out=acc)
                    pending = 1
                np.add(acc, scratch, out=acc)
                pending += 1
            t_add += time.perf_counter() - t0
            accepted.append(rep)
        t_loaded = time.perf_counter()
        # Missing: sampled nodes with no reply bound to them (a replay is not an answer).
        self.record_participation(server_round, report, [m for m, _ in bound], rejected, accepted)
        if len(accepted) < self.min_replies():
            self.skip_round(server_round, report, len(accepted))
            metrics = self._encrypted_metrics(report, accepted)
            report.train_metrics = dict(metrics)
            return None, metrics

        assert acc is not None
        for rep in accepted:
            self._seen_digests[rep.digest] = server_round
        t_reduce = time.perf_counter()
        np.remainder(acc, np.uint64(codec.q), out=acc)
        t_added = time.perf_counter()
        total = float(sum(r.weight for r in accepted)) * self.weight_scale
        packed = codec.pack(acc)
        new_arrays = ArrayRecord(
            {
                **dict(self._base.items()),
                CIPHERTEXTS: Array(packed),
                WEIGHT_TOTAL: Array(np.array([total], dtype=np.float64)),
            }
        )
        end = time.perf_counter()
        self.timings[server_round] = {
            "load_seconds": t_loaded - start - t_add,
            "add_seconds": t_add + (t_added - t_reduce),
            "serialize_seconds": end - t_added,
        }
        report.aggregate_seconds = end - start
        report.model_sha256 = arrays_sha256(new_arrays)
        weight_sum = float(sum(r.weight for r in accepted))
        for rep in accepted:
            client_report = {
                "selected": True,
                "weight": rep.weight / weight_sum,
                "num_examples": rep.weight,
                "ciphertext_bytes": rep.nbytes,
                "label": self.labels.get(rep.node_id, ""),
            }
            report.clients[rep.node_id] = client_report
            self.audit.record(
                "client_update", round=server_round, node_id=rep.node_id, **client_report
            )
        self.audit.record(
            "round_aggregated",
            round=server_round,
            rule=type(self).__name__,
            accepted=len(accepted),
            rejected=len(rejected),
            missing=len(report.missing),
            selected=len(accepted),
            weight_total=total,
            weight_scale=self.weight_scale,
            ciphertext_bytes_in=sum(r.nbytes for r in accepted),
            ciphertext_bytes_out=int(packed.nbytes),
            aggregate_seconds=report.aggregate_seconds,
            **self.timings[server_round],
            model_sha256=report.model_sha256,
        )
        metrics = self._encrypted_metrics(report, accepted)
        report.train_metrics = dict(metrics)
        return new_arrays, metrics

    def _encrypted_metrics(
        self, report: RoundReport, accepted: list[EncryptedReply]
    ) -> MetricRecord:
        if self._custom_train_metrics and accepted:
            metrics = self.train_metrics_aggr_fn(
                [RecordDict({"metrics": r.metrics}) for r in accepted], self.weighted_by_key
            )
        else:
            metrics = weighted_scalar_metrics(
                [(r.metrics, r.weight) for r in accepted], skip={self.weighted_by_key}
            )
        metrics["clients-accepted"] = len(report.accepted)
        metrics["clients-rejected"] = len(report.rejected)
        metrics["clients-missing"] = len(report.missing)
        metrics["clients-selected"] = len(report.accepted)
        return metrics

    def aggregate_updates(self, updates: Any, weights: Any, server_round: int) -> Any:
        raise NotImplementedError("EncryptedFedAvg never sees plaintext updates")
