"""FedAvg whose server only ever sees masked updates and their sum (secure aggregation).

The banks run :func:`flower_ext.secagg.mod.secagg_mod`. One Flower round is one
protocol run (:mod:`flower_ext.secagg.protocol`): Flower's ``start`` sends the train
messages from :meth:`SecureFedAvg.configure_train`; the replies that come back to
:meth:`SecureFedAvg.aggregate_train` hold public keys and train metrics, no
arrays. ``aggregate_train`` then runs the three remaining steps as Flower Messages
through the Grid it kept from ``configure_train`` (``share-keys``,
``masked-input``, ``unmask``), removes the masks and applies the server step.

Weights: banks pre-scale by ``n_i / N`` (``n_i`` their reported ``num-examples``,
``N`` the total over the banks that replied to the train message, announced by the
server). The counts are public to the server, as with plain FedAvg. After the
unmask the server divides by the survivors' ``sum n_i / N``, so the result is
the ``num-examples``-weighted mean of the survivors' updates. A bank can still
inflate its count (the server cannot check it under masking): weight caps are
refused rather than silently not applied.

Distributed DP (``dp=DistributedDP(...)``, :mod:`flower_ext.secagg.dp`): every bank
clips its update to L2 ``C`` and adds ``N(0, (sigma C)^2 / t)`` before masking, with
the *same* weight for every bank (sensitivity ``2C`` whatever the counts); the
server divides the unmasked sum by the number of survivors. Each round's metrics
and the audit (``secagg_dp``) give the epsilon so far against the server with the
survivors honest (``secagg-dp-epsilon``), with only ``t`` honest banks per round
(``secagg-dp-epsilon-nominal``, the stated guarantee) and with ``k = 0 .. s - t``
of each round's ``s`` survivors colluding (``secagg-dp-epsilon-if-missing``, a list
indexed by k; drop-outs already counted).

Signed keys (banks with node config ``secagg-identity-key`` / ``secagg-trusted-keys``,
see :mod:`flower_ext.secagg.mod`): the server forwards each bank's signature with the
roster, and when every bank signed it runs the consistency check (each survivor signs
the survivor list; ``t`` signatures go with the unmask request) before the unmask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.audit import AuditTrail
from flower_ext.audit.receipts import record_exchange
from flower_ext.records import arrays_sha256
from flower_ext.secagg.dp import DistributedDP, clamp_probability, dp_clipping_range
from flower_ext.secagg.mod import (
    DP_CLIP_KEY,
    DP_STD_KEY,
    MASKED_KEY,
    RECORD_KEY,
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SHARE_KEYS,
    STAGE_TRAIN,
    STAGE_UNMASK,
)
from flower_ext.secagg.protocol import (
    SecAggError,
    SecAggParams,
    ServerRound,
    TooFewSurvivors,
    dequantize_sum,
)
from flower_ext.validation import bind_replies, check_weight, client_label, short_reason

from .base import RoundReport, UpdateAggregationStrategy, fedavg_arguments

KEY_BYTES = 32
#: Largest per-coordinate clamp chance (:func:`clamp_probability`) accepted under DP.
MAX_CLAMP_PROBABILITY = 1e-6


@dataclass
class _Bank:
    node_id: int
    label: str
    weight: float
    metrics: MetricRecord
    c_pk: bytes = b""
    s_pk: bytes = b""
    signer: str = ""  # hex Ed25519 identity key, when the bank signs its keys
    sig: str = ""


def composition_problem(part: object) -> str | None:
    """Why ``part`` (a strategy, mod or name) cannot be combined with secure aggregation."""
    from .encrypted_fedavg import EncryptedFedAvg
    from .robust import RobustStrategy
    from .topk import TopKCompression

    name = part if isinstance(part, str) else getattr(part, "__name__", type(part).__name__)
    name = str(name).lower()
    if isinstance(part, RobustStrategy) or name in {
        "krum", "multikrum", "bulyan", "median", "fedmedian", "trimmedmean", "fedtrimmedavg",
        "geometricmedian", "centeredclipping", "normbound",
    }:  # fmt: skip
        return (
            f"{part if isinstance(part, str) else type(part).__name__} is a robust rule: it "
            "needs every bank's plaintext update (distances, medians, norms), and secure "
            "aggregation shows the server only their sum"
        )
    if isinstance(part, TopKCompression) or "topk" in name:
        return (
            "top-k compression sends different coordinates from each bank; masks only cancel "
            "over one shared index set (not implemented), so the dense update is needed"
        )
    if isinstance(part, EncryptedFedAvg) or name in {"he_mod", "hemod", "encryptedfedavg"}:
        return (
            "secure aggregation together with HE is unnecessary: either one already keeps "
            "single updates from the server; pick one"
        )
    return None


def _bad_x25519(public: bytes) -> bool:
    """Whether an X25519 public key gives no usable shared secret (low-order point)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    try:
        shared = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except Exception:
        return True
    return shared == bytes(len(shared))


def _signature_problem(record: ConfigRecord) -> str:
    """Why an advertisement's optional signature fields are malformed ("" if fine or absent)."""
    signer, sig = record.get("signer"), record.get("sig")
    if signer is None and sig is None:
        return ""
    hexdigits = set("0123456789abcdef")
    if not (isinstance(signer, str) and len(signer) == 64 and set(signer) <= hexdigits):
        return "signer is not a 64-hex-digit Ed25519 public key"
    if not (isinstance(sig, str) and len(sig) == 128 and set(sig) <= hexdigits):
        return "sig is not a 128-hex-digit Ed25519 signature"
    return ""


class SecureFedAvg(UpdateAggregationStrategy):
    """Federated Averaging over secure aggregation (the server sees only the sum).

    McMahan et al. 2017 (FedAvg) on top of the secure aggregation of Bonawitz et
    al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
    CCS 2017 (per-round keys and Shamir-shared mask keys, as in Bell et al.,
    SecAgg+, CCS 2020). Equal to ``num-examples``-weighted FedAvg of the surviving
    banks' updates up to the quantisation error (below ``k * 2c / 2**bits / W``
    per coordinate for ``k`` survivors with weight share ``W``).

    Parameters
    ----------
    fraction_train, ..., evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    threshold : int | float (default: 2/3)
        ``t``. An int >= 2 is used as is and must be above half the banks sampled
        (``2t > n``: banks refuse less); a float in (0.5, 1] is a fraction of the
        banks sampled in the round (``max(2, n // 2 + 1, ceil(f * n))``). Fixed before any bank
        replies. The round survives up to ``n - t`` drop-outs after the keys are
        shared; the server with fewer than ``t`` banks learns no single update.
    clipping_range : float | None (default: None)
        ``c``: each coordinate of ``n_i / N * update`` (with DP: of the clipped,
        noised update) is clipped to ``[-c, c]`` (banks report how many they clipped,
        ``secagg-clipped``; not under DP). None: 1.0, or with DP ``C + 8 s``
        (:func:`~flower_ext.secagg.dp.dp_clipping_range`, ``s`` the per-bank noise
        std); an explicit ``c`` that DP noise would leave with chance above
        :data:`MAX_CLAMP_PROBABILITY` per coordinate is refused.
    quantization_bits, modulus_bits : int (default: 22, 32)
        Fixed point: ``2**quantization_bits`` levels over ``[-c, c]``, sums mod
        ``2**modulus_bits``; at most ``2**(modulus_bits - quantization_bits)`` banks.
    dp : DistributedDP | None (default: None)
        Distributed DP (see the module docstring and :mod:`flower_ext.secagg.dp`).
        A round counts in the accounting as soon as ``t`` banks answered its unmask
        request (the server could then compute the sum), released or not.
    trusted_keys : iterable of str | None (default: None)
        The banks' Ed25519 identity keys (hex). When given, the server verifies every
        advertisement's signature (run id from the Grid) and drops, audited, a bank whose
        keys are unsigned, signed by an unknown key or a key another bank used, so that
        one bad signature does not make every honest bank refuse the roster.
    step_timeout : float (default: 600)
        Seconds to wait for the banks in each extra protocol step.
    compose_with : sequence
        Strategies, mods or names the app combines with this one; a robust rule,
        top-k compression or HE is refused here with the reason.
    server_learning_rate, server_momentum, proximal_mu, max_plausible_examples, audit
        As in :class:`UpdateAggregationStrategy` (applied to the unmasked mean).
    server_optimizer, server_beta1, server_beta2, server_tau
        As in :class:`UpdateAggregationStrategy`: an adaptive server optimiser steps
        from the unmasked mean update, which the server holds in clear.
    max_weight, max_weight_median_multiple
        Refused: banks pre-scale by their own count, the server cannot cap it.
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
        threshold: int | float = 2 / 3,
        clipping_range: float | None = None,
        quantization_bits: int = 22,
        modulus_bits: int = 32,
        step_timeout: float = 600.0,
        compose_with: Sequence[object] = (),
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        proximal_mu: float = 0.0,
        max_weight: float | None = None,
        max_weight_median_multiple: float | None = None,
        max_plausible_examples: float = 1e9,
        min_valid_replies: int = 1,
        audit: AuditTrail | None = None,
        server_optimizer: str = "sgd",
        server_beta1: float = 0.9,
        server_beta2: float = 0.99,
        server_tau: float = 1e-3,
        dp: DistributedDP | None = None,
        trusted_keys: Iterable[str] | None = None,
    ) -> None:
        problems = [p for p in map(composition_problem, compose_with) if p]
        if problems:
            raise ValueError("SecureFedAvg cannot be combined: " + "; ".join(problems))
        if max_weight is not None or max_weight_median_multiple is not None:
            raise ValueError(
                "SecureFedAvg cannot cap weights: each bank pre-scales its own update by its "
                "count before masking, and the server never sees the update to re-weight it"
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be an int >= 2 or a fraction, got {threshold!r}")
        if isinstance(threshold, float) and not 0.5 < threshold <= 1.0:
            raise ValueError(f"a fractional threshold must be in (0.5, 1], got {threshold}")
        if isinstance(threshold, int) and threshold < 2:
            raise ValueError(f"threshold must be at least 2, got {threshold}")
        # Checks the fixed-point settings once, here (t is set per round).
        SecAggParams(2, clipping_range or 1.0, quantization_bits, modulus_bits)
        if dp is not None and not isinstance(dp, DistributedDP):
            raise ValueError(f"dp must be a DistributedDP or None, got {type(dp).__name__}")
        super().__init__(
            **fedavg_arguments(locals()),
            server_learning_rate=server_learning_rate,
            server_momentum=server_momentum,
            server_optimizer=server_optimizer,
            server_beta1=server_beta1,
            server_beta2=server_beta2,
            server_tau=server_tau,
            proximal_mu=proximal_mu,
            max_plausible_examples=max_plausible_examples,
            min_valid_replies=min_valid_replies,
            audit=audit,
        )
        self.threshold = threshold
        self.clipping_range = None if clipping_range is None else float(clipping_range)
        self.dp = dp
        #: Banks' identity keys (hex); when set, advertisements are verified here and a bank
        #: with a bad or unknown signature is dropped before the roster is sent.
        self.trusted_keys = (
            None if trusted_keys is None else frozenset(str(k).lower() for k in trusted_keys)
        )
        #: Per released round under DP: (banks given the keys n, threshold t, survivors).
        self.dp_rounds: dict[int, tuple[int, int, int]] = {}
        self.quantization_bits = int(quantization_bits)
        self.modulus_bits = int(modulus_bits)
        self.step_timeout = float(step_timeout)
        self._grid: Grid | None = None
        self._params: dict[int, SecAggParams] = {}

    # ------------------------------------------------------------------ summary
    def rule_summary(self) -> str:
        clip = "auto" if self.clipping_range is None else self.clipping_range
        dp = (
            f", distributed DP sigma={self.dp.noise_multiplier:.4g} C={self.dp.clip_norm:g}"
            if self.dp
            else ""
        )
        return (
            f"{'equal-weight' if self.dp else 'weighted'} mean via secure aggregation "
            f"(t={self.threshold}, clip {clip}, {self.quantization_bits}-bit quantisation mod "
            f"2^{self.modulus_bits}{dp})"
        )

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t\t└── Secure aggregation: the server sees masked updates and their sum")

    def clipping_range_for(self, threshold: int) -> float:
        """``c`` for a round with threshold ``t`` (see ``clipping_range``)."""
        if self.dp is None:
            return 1.0 if self.clipping_range is None else self.clipping_range
        std = self.dp.noise_std(threshold)
        if self.clipping_range is None:
            return dp_clipping_range(self.dp.clip_norm, std)
        chance = clamp_probability(self.clipping_range, self.dp.clip_norm, std)
        if chance > MAX_CLAMP_PROBABILITY:
            raise ValueError(
                f"clipping_range={self.clipping_range:g} is too small for distributed DP: a "
                f"coordinate of a clipped update (L2 clip {self.dp.clip_norm:g}) plus noise of "
                f"std {std:.3g} leaves it with chance up to {chance:.2g} (> "
                f"{MAX_CLAMP_PROBABILITY:g}); raise it to at least "
                f"{dp_clipping_range(self.dp.clip_norm, std):.4g} or leave it unset"
            )
        return self.clipping_range

    def dp_figures(self) -> dict[str, float | list[float]]:
        """The distributed-DP epsilons over the rounds released so far (empty without DP)."""
        if self.dp is None or not self.dp_rounds:
            return {}
        rounds = [self.dp_rounds[r] for r in sorted(self.dp_rounds)]
        # From the banks that actually survived each round (k of them colluding with the
        # server), not the banks sampled: drop-outs already lowered the honest noise.
        table = self.dp.if_missing([(k, t) for _, t, k in rounds])
        return {
            "secagg-dp-epsilon": self.dp.epsilon([(k, t) for _, t, k in rounds]),
            "secagg-dp-epsilon-nominal": self.dp.epsilon([(t, t) for _, t, _ in rounds]),
            "secagg-dp-epsilon-if-missing": [table[k] for k in sorted(table)],
            "secagg-dp-delta": float(self.dp.delta),
            "secagg-dp-noise-multiplier": float(self.dp.noise_multiplier),
            "secagg-dp-clip-norm": float(self.dp.clip_norm),
            "secagg-dp-rounds": len(rounds),
        }

    def params_for(self, num_banks: int) -> SecAggParams:
        """The round's public parameters for ``num_banks`` sampled banks."""
        if isinstance(self.threshold, float):
            # 2t > n always: the fraction's rounding slack must never give t = n / 2.
            t = max(2, num_banks // 2 + 1, math.ceil(self.threshold * num_banks - 1e-9))
        else:
            t = int(self.threshold)
            if 2 * t <= num_banks:
                raise ValueError(
                    f"SecureFedAvg threshold t={t} is not above half of the {num_banks} banks "
                    "sampled: two disjoint groups of t banks could each help unmask one bank "
                    "(both its secrets); raise threshold above n/2 or use a fraction"
                )
        if t > num_banks:
            raise ValueError(
                f"SecureFedAvg threshold t={t} exceeds the {num_banks} banks sampled: "
                "lower threshold or sample more banks"
            )
        params = SecAggParams(
            t, self.clipping_range_for(t), self.quantization_bits, self.modulus_bits
        )
        if num_banks > params.max_banks:
            raise ValueError(
                f"{num_banks} banks could wrap the masked sum: at most {params.max_banks} with "
                f"quantization_bits={self.quantization_bits}, modulus_bits={self.modulus_bits}"
            )
        return params

    def secagg_summary(self) -> dict[str, Any]:
        """For the run's report: what the server learned, the drop-outs, the DP figures."""
        reports = [self.round_reports[r] for r in sorted(self.round_reports)]
        metrics = [r.train_metrics for r in reports]
        return {
            "server_saw": (
                "per bank: two public keys, num-examples and train metrics, encrypted shares, "
                "one masked vector (uniform on its own); per round: the sum of the survivors' "
                "updates only"
            ),
            "threshold": self.threshold,
            "rounds_aggregated": sum(1 for m in metrics if "secagg-survivors" in m),
            "rounds_failed": sum(1 for m in metrics if m.get("secagg-failed")),
            "dropouts": int(sum(m.get("secagg-dropped", 0) for m in metrics)),  # type: ignore[misc]
            "distributed_dp": self.dp_figures() or None,
        }

    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The base state plus the distributed-DP rounds (a resumed run keeps counting)."""
        arrays, fields = super().export_state()
        if self.dp_rounds:
            fields["secagg_dp_rounds"] = {str(r): list(v) for r, v in self.dp_rounds.items()}
        return arrays, fields

    def import_state(self, arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
        super().import_state(arrays, fields)
        saved = fields.get("secagg_dp_rounds") or {}
        self.dp_rounds = {int(r): (int(v[0]), int(v[1]), int(v[2])) for r, v in saved.items()}

    # ------------------------------------------------------------------ Flower API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        for key, value in config.items():
            if key == "topk-ratio" and float(value or 0.0) > 0:  # type: ignore[arg-type]
                raise ValueError("SecureFedAvg: " + str(composition_problem("topk")))
            if key.startswith("he-"):
                raise ValueError("SecureFedAvg: " + str(composition_problem("he_mod")))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._grid = grid
        if not messages:
            return messages
        params = self.params_for(len(messages))
        self._params[server_round] = params
        for message in messages:
            message.content[RECORD_KEY] = ConfigRecord(
                {
                    "stage": STAGE_TRAIN,
                    "round": int(server_round),
                    **params.to_dict(),
                    "weight-key": self.weighted_by_key,
                    "arrays-key": self.arrayrecord_key,
                    **self._dp_record(params),
                }
            )
        self.audit.record(
            "secagg_step",
            round=server_round,
            stage=STAGE_TRAIN,
            banks=len(messages),
            **{k.replace("-", "_"): v for k, v in params.to_dict().items()},
            **{k.replace("-", "_"): v for k, v in self._dp_record(params).items()},
        )
        return messages

    def _dp_record(self, params: SecAggParams) -> dict[str, float]:
        if self.dp is None:
            return {}
        return {
            DP_CLIP_KEY: float(self.dp.clip_norm),
            DP_STD_KEY: float(self.dp.noise_std(params.threshold)),
        }

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None or self._grid is None:
            raise RuntimeError("aggregate_train called before configure_train")
        if server_round not in self._params:  # no train messages this round (fraction 0)
            return None, None
        replies = list(replies)
        params = self._params[server_round]
        report = RoundReport(server_round, sampled=list(self._sampled.get(server_round, [])))
        self.round_reports[server_round] = report
        banks, rejected = self._read_advertisements(server_round, replies, report)
        self.record_participation(server_round, report, replies, rejected, list(banks.values()))
        for bank in banks.values():  # per-bank train metrics (DP-SGD / update-level epsilon)
            report.client_metrics[bank.node_id] = {
                k: v for k, v in bank.metrics.items() if not isinstance(v, list)
            }
        try:
            mean, survivors, extra = self._run_protocol(server_round, params, banks)
        except (SecAggError, ValueError, TypeError, KeyError) as err:
            self.audit.record("secagg_failed", round=server_round, reason=str(err)[:500])
            self.skip_round(
                server_round, report, len(banks), reason=f"secure aggregation failed: {err}"
            )
            metrics = self._summary_metrics(report, [], None)
            metrics["secagg-failed"] = 1
            if self.dp is not None and server_round in self.dp_rounds:
                # t banks answered the unmask: the server could compute the sum, so the
                # round is in the accounting although it was not released.
                figures = self.dp_figures()
                for key, value in figures.items():
                    metrics[key] = value  # type: ignore[assignment]
                self.audit.record(
                    "secagg_dp", round=server_round, released=False,
                    **{k.replace("-", "_"): v for k, v in figures.items()},
                )  # fmt: skip
            report.train_metrics = dict(metrics)
            return None, metrics
        new_arrays = self.server_step(mean.astype(self._layout.compute_dtype))  # type: ignore
        kept = [banks[n] for n in survivors]
        # Accepted = the banks whose updates are in the sum; the others are in the audit's
        # secagg_dropout events and in secagg-dropped.
        report.accepted = [bank.node_id for bank in kept]
        if new_arrays is None:
            self.skip_round(server_round, report, len(kept), reason="aggregate is not finite")
            return None, self._summary_metrics(report, kept, None)
        report.model_sha256 = arrays_sha256(new_arrays)
        for bank in kept:
            report.clients[bank.node_id] = {
                "selected": True,
                "num_examples": bank.weight,
                "label": bank.label,
            }
        self.audit.record(
            "round_aggregated",
            round=server_round,
            rule=type(self).__name__,
            accepted=len(kept),
            rejected=len(report.rejected),
            missing=len(report.missing),
            selected=len(kept),
            model_sha256=report.model_sha256,
            server_saw="masked updates and the sum of the survivors' updates only",
        )
        metrics = self._summary_metrics(report, kept, None)  # type: ignore[arg-type]
        for key, value in extra.items():
            metrics[key] = value
        if self.dp is not None:
            self.dp_rounds[server_round] = (len(banks), params.threshold, len(survivors))
            figures = self.dp_figures()
            for key, value in figures.items():
                metrics[key] = value  # type: ignore[assignment]
            self.audit.record(
                "secagg_dp",
                round=server_round,
                banks=len(banks),
                threshold=params.threshold,
                survivors=len(survivors),
                noise_std_per_bank=self._dp_record(params)[DP_STD_KEY],
                **{k.replace("-", "_"): v for k, v in figures.items()},
                guarantee=(
                    "central (epsilon, delta)-DP of the released sums against the server, "
                    "replace-one-bank; epsilon_if_missing[k]: k of each round's surviving "
                    "banks colluding with the server (drop-outs already counted)"
                ),
            )
        report.train_metrics = dict(metrics)
        return new_arrays, metrics

    # ------------------------------------------------------------------ protocol
    def _read_advertisements(
        self, server_round: int, replies: list[Message], report: RoundReport
    ) -> tuple[dict[int, _Bank], list[Any]]:
        from flower_ext.validation import Rejection

        bound, rejected = bind_replies(
            replies, origins=self.origins("train"), sampled=report.sampled or None
        )
        banks: dict[int, _Bank] = {}
        keys_seen: set[bytes] = set()
        signers_seen: set[str] = set()
        for msg, node in bound:
            reason, label = "", ""
            if msg.has_error():
                reason = f"error reply: {short_reason(msg.error.reason, 250)}"
            else:
                label = client_label(msg)[:100]
                rec = msg.content.config_records.get(RECORD_KEY)
                metrics = msg.content.metric_records.get("metrics")
                if msg.content.array_records:
                    reason = "the reply carries arrays: under secure aggregation none may leave"
                elif rec is None or rec.get("stage") != "advertise":
                    reason = "no secure-aggregation keys in the reply: every bank needs secagg_mod"
                elif not all(
                    isinstance(rec.get(k), bytes) and len(rec[k]) == KEY_BYTES  # type: ignore
                    for k in ("c-pk", "s-pk")
                ):
                    reason = "public keys are not 32-byte X25519 keys"
                elif {rec["c-pk"], rec["s-pk"]} & keys_seen or rec["c-pk"] == rec["s-pk"]:
                    reason = "public key reused (another bank's, or twice)"
                elif _signature_problem(rec):
                    reason = _signature_problem(rec)
                elif _bad_x25519(rec["c-pk"]) or _bad_x25519(rec["s-pk"]):  # type: ignore
                    reason = (
                        "a public key is not a usable X25519 key (a low-order point: every "
                        "key agreement with it fails or gives an all-zero secret)"
                    )
                elif self.trusted_keys is not None and self._advert_problem(
                    server_round, node, rec, signers_seen
                ):
                    reason = self._advert_problem(server_round, node, rec, signers_seen)
                elif metrics is None:
                    reason = "no 'metrics' record"
                else:
                    weight, reason = check_weight(
                        metrics, self.weighted_by_key, self.max_plausible_examples
                    )
            if reason:
                rejected.append(Rejection(node, reason, label))
                continue
            keys_seen |= {rec["c-pk"], rec["s-pk"]}  # type: ignore[index]
            if rec.get("signer"):  # type: ignore[union-attr]
                signers_seen.add(str(rec["signer"]).lower())  # type: ignore[index]
            banks[node] = _Bank(
                node,
                label,
                float(weight),
                metrics,
                rec["c-pk"],  # type: ignore[arg-type]
                rec["s-pk"],  # type: ignore[arg-type]
                str(rec.get("signer", "")),
                str(rec.get("sig", "")),
            )
        return banks, rejected

    def _advert_problem(
        self, server_round: int, node: int, rec: ConfigRecord, signers_seen: set[str]
    ) -> str:
        """Why a bank's signed advertisement fails the server-side check ("" if fine)."""
        from flower_ext.audit.signing import verify_signature
        from flower_ext.secagg.protocol import advert_message

        signer, sig = str(rec.get("signer", "") or "").lower(), rec.get("sig")
        if not signer or not sig:
            return "the public keys are not signed (trusted_keys is set)"
        if signer not in self.trusted_keys:  # type: ignore[operator]
            return f"the keys are signed by an unknown key {signer[:16]}..."
        if signer in signers_seen:
            return "the keys are signed by a key another bank already used"
        run_id = self._run_id()
        message = advert_message(run_id, server_round, node, rec["c-pk"], rec["s-pk"])  # type: ignore
        if not verify_signature(signer, message, sig):
            return "the signature of the public keys does not verify"
        return ""

    def _run_id(self) -> int:
        try:
            return int(self._grid.run.run_id)  # type: ignore[union-attr]
        except Exception:
            return int(getattr(self, "run_id", 0) or 0)

    def _drop(self, server_round: int, stage: str, node: int, reason: str) -> None:
        """Audit one bank dropped by the server for a bad reply (the round goes on)."""
        self.audit.record(
            "secagg_dropout",
            round=server_round,
            stage=stage,
            node_id=node,
            label=self.labels.get(node, ""),
            reason=reason[:300],
        )
        log(WARNING, "Round %s: secagg %s: node %s dropped: %s", server_round, stage, node, reason)

    def _exchange(
        self, server_round: int, stage: str, payloads: dict[int, dict[str, Any]]
    ) -> dict[int, Message]:
        """Send one protocol step to each bank; the good replies by node (drop-outs audited)."""
        assert self._grid is not None
        messages = {
            node: Message(
                content=RecordDict(
                    {RECORD_KEY: ConfigRecord({"stage": stage, "round": server_round, **body})}
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node, body in payloads.items()
        }
        replies = list(self._grid.send_and_receive(messages.values(), timeout=self.step_timeout))
        # The step's hashes go into the audit so that the banks' receipts of it match
        # (``flower-ext verify --receipts``). A step carries no model and no "config", so a
        # bank's receipt files it under round 0; the round is inside the hashed secagg record.
        record_exchange(self.audit, 0, "train", messages.values(), replies)
        origins = {m.metadata.message_id: n for n, m in messages.items() if m.metadata.message_id}
        bound, rejected = bind_replies(replies, origins=origins, sampled=list(messages))
        good: dict[int, Message] = {}
        reasons = {r.node_id: r.reason for r in rejected if r.node_id in messages}
        for msg, node in bound:
            if msg.has_error():
                reasons[node] = f"error reply: {short_reason(msg.error.reason, 250)}"
            else:
                rec = msg.content.config_records.get(RECORD_KEY)
                if rec is None or rec.get("stage") != stage:
                    reasons[node] = f"reply is not a '{stage}' answer"
                else:
                    good[node] = msg
        for node in messages:
            if node not in good:
                reason = reasons.get(node, "no reply (timed out, or the node left)")
                self._drop(server_round, stage, node, reason)
        return good

    def _consistency(
        self, server_round: int, params: SecAggParams, survivors: list[int]
    ) -> dict[str, list[str]]:
        """Collect the survivors' signatures of the survivor list (Bonawitz et al.'s check)."""
        listed = {"survivors": [str(n) for n in survivors]}
        got = self._exchange(server_round, STAGE_CONSISTENCY, {n: listed for n in survivors})
        signed = {}
        for node, msg in got.items():
            sig = msg.content.config_records[RECORD_KEY].get("sig")
            if isinstance(sig, str) and len(sig) == 128:
                signed[node] = sig
        self.audit.record(
            "secagg_step", round=server_round, stage=STAGE_CONSISTENCY, survivors=survivors,
            signed=sorted(signed),
        )  # fmt: skip
        if len(signed) < params.threshold:
            raise TooFewSurvivors(
                f"only {len(signed)} banks signed the survivor list, fewer than the threshold "
                f"t={params.threshold}: the banks will not unmask"
            )
        nodes = sorted(signed)
        return {
            "consistency-nodes": [str(n) for n in nodes],
            "consistency-sigs": [signed[n] for n in nodes],
        }

    def _run_protocol(
        self, server_round: int, params: SecAggParams, banks: dict[int, _Bank]
    ) -> tuple[np.ndarray, list[int], dict[str, float | int]]:
        srv = ServerRound(server_round, params)
        if len(banks) < params.threshold:
            raise TooFewSurvivors(
                f"only {len(banks)} banks replied to the train message with keys, fewer than "
                f"the threshold t={params.threshold}"
            )
        params.check_banks(len(banks))
        nodes = sorted(banks)
        total_weight = float(sum(b.weight for b in banks.values()))
        adverts = {n: (banks[n].c_pk, banks[n].s_pk) for n in nodes}
        for node in nodes:
            srv.advertised(node, *adverts[node])
        self.audit.record(
            "secagg_step", round=server_round, stage="advertise", banks=nodes,
            weight_total=total_weight, signed=sum(1 for n in nodes if banks[n].signer),
        )  # fmt: skip
        body = {
            "nodes": [str(n) for n in nodes],
            "c-pk": [adverts[n][0] for n in nodes],
            "s-pk": [adverts[n][1] for n in nodes],
            "weight-total": total_weight,
        }
        if any(banks[n].signer for n in nodes):  # signed keys: the banks check them all
            body["signer"] = [banks[n].signer for n in nodes]
            body["sig"] = [banks[n].sig for n in nodes]
        got = self._exchange(server_round, STAGE_SHARE_KEYS, {n: body for n in nodes})
        sent = {}
        for node, msg in got.items():
            try:  # any malformed field drops that bank only
                rec = msg.content.config_records[RECORD_KEY]
                dsts, cts = rec["dst"], rec["ct"]
                if not isinstance(dsts, list) or not isinstance(cts, list):
                    raise ValueError("dst / ct are not lists")
                dsts = [int(d) for d in dsts]
                if sorted(dsts) != [n for n in nodes if n != node] or len(cts) != len(dsts):
                    raise ValueError("not one share for every other bank")
                sent[node] = (dict(zip(dsts, cts, strict=True)), rec["seed-digest"])
            except Exception as err:
                self._drop(server_round, STAGE_SHARE_KEYS, node, f"malformed shares: {err}"[:200])
        routed = srv.route_shares(sent)  # type: ignore[arg-type]
        for node, reason in srv.rejected.items():
            self._drop(server_round, STAGE_SHARE_KEYS, node, f"rejected shares: {reason}")
        reported = set(srv.rejected)
        self.audit.record(
            "secagg_step", round=server_round, stage=STAGE_SHARE_KEYS, banks=srv.u2,
        )  # fmt: skip
        payloads = {
            dst: {"src": [str(s) for s in sorted(cts)], "ct": [cts[s] for s in sorted(cts)]}
            for dst, cts in routed.items()
        }
        got = self._exchange(server_round, STAGE_MASKED_INPUT, payloads)
        clipped = 0
        dim = self._layout.dim  # type: ignore[union-attr]
        bad_senders: dict[int, list[int]] = {}  # reporting bank -> senders it reported
        for node, msg in got.items():
            try:  # every field is checked before the vector goes into the sum
                rec = msg.content.config_records[RECORD_KEY]
                arrays = msg.content.array_records.get(RECORD_KEY + ".masked")
                if arrays is None or MASKED_KEY not in arrays:
                    raise SecAggError("no masked array")
                vec = arrays[MASKED_KEY].numpy()
                if vec.shape != (dim,):
                    raise SecAggError(f"masked array has shape {vec.shape}, expected ({dim},)")
                count = rec.get("clipped", 0)
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    raise SecAggError(f"clipped is not a count: {str(count)[:40]!r}")
                bad = [int(x) for x in rec.get("bad-src", [])]  # type: ignore[union-attr]
                if set(bad) - set(srv.u2):
                    raise SecAggError("bad-src names banks outside U2")
                srv.add_masked(node, vec)
            except Exception as err:
                self._drop(server_round, STAGE_MASKED_INPUT, node, f"rejected masked input: {err}")
                continue
            clipped += count
            if bad:
                bad_senders[node] = bad
        for node, reason in srv.settle_views(bad_senders).items():
            self._drop(server_round, STAGE_MASKED_INPUT, node, reason)
            reported.add(node)
        for node, reason in srv.rejected.items():
            if node not in reported:
                self._drop(server_round, STAGE_MASKED_INPUT, node, reason)
                reported.add(node)
        survivors, dropped = srv.unmask_request()
        self.audit.record(
            "secagg_step", round=server_round, stage=STAGE_MASKED_INPUT, survivors=survivors,
            dropped=dropped, clipped=clipped,
        )  # fmt: skip
        body = {"survivors": [str(n) for n in survivors], "dropped": [str(n) for n in dropped]}
        if all(banks[n].signer for n in srv.u2):  # signed keys: the consistency check first
            body.update(self._consistency(server_round, params, survivors))
        got = self._exchange(server_round, STAGE_UNMASK, {n: body for n in survivors})
        answers = {}
        for node, msg in got.items():
            try:
                rec = msg.content.config_records[RECORD_KEY]
                seeds = dict(
                    zip([int(x) for x in rec["seed-nodes"]], rec["seed-shares"], strict=True)  # type: ignore
                )
                keys = dict(
                    zip([int(x) for x in rec["key-nodes"]], rec["key-shares"], strict=True)  # type: ignore
                )
                answers[node] = (seeds, keys)
            except Exception as err:
                self._drop(server_round, STAGE_UNMASK, node, f"malformed shares: {err}"[:200])
        answers = srv.valid_answers(answers)
        for node, reason in srv.rejected.items():
            if node not in reported:
                self._drop(server_round, STAGE_UNMASK, node, f"rejected unmask answer: {reason}")
                reported.add(node)
        if self.dp is not None and len(answers) >= params.threshold:
            # From here the server holds what it needs to compute the noisy sum: the round
            # counts in the DP accounting whether or not it is released.
            self.dp_rounds[server_round] = (len(banks), params.threshold, len(survivors))
        try:
            total = srv.unmask(answers)  # type: ignore[arg-type]
        finally:
            for node, reason in srv.bad_shares.items():
                self._drop(
                    server_round, STAGE_UNMASK, node,
                    f"bad unmask share: {reason} (not used; its masked input is in the sum)",
                )  # fmt: skip
            for node, reason in srv.bad_digests.items():
                self.audit.record(
                    "secagg_bad_reply", round=server_round, stage=STAGE_SHARE_KEYS, node_id=node,
                    reason=reason + " (its update stays in the sum: a bank can always spoil its "
                    "own input)",
                )  # fmt: skip
        if dropped:
            self.audit.record(
                "secagg_recovered", round=server_round, dropped=dropped,
                answered=sorted(answers), threshold=params.threshold,
                how="dropped banks' mask keys rebuilt from t shares; their pairwise masks removed",
            )  # fmt: skip
        self.audit.record(
            "secagg_step", round=server_round, stage=STAGE_UNMASK, answered=sorted(answers),
            survivors=survivors,
        )  # fmt: skip
        # Under DP every bank has weight 1: the mean is the sum over the survivors' count.
        share = (
            float(len(survivors))
            if self.dp is not None
            else sum(banks[n].weight for n in survivors) / total_weight
        )
        mean = dequantize_sum(total, len(survivors), params) / share
        extra = {
            "secagg-survivors": len(survivors),
            "secagg-dropped": len(dropped),
            "secagg-threshold": params.threshold,
            "secagg-clipped": clipped,
            "secagg-max-error": len(survivors) * params.quantum / share,
        }
        return mean, survivors, extra
