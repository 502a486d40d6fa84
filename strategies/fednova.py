"""FedNova: FedAvg with each bank's update normalised by its number of local steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.aggregation.fednova import STEPS_BAND, bounded_steps, fednova_weights
from flower_ext.validation import CheckedReply, Rejection

from .base import fedavg_arguments
from .fedavg import FedAvg

#: Train-config key that asks the banks to report their local steps, and the reply
#: metric that carries them (the normalising factor a_i, a float).
REPORT_STEPS_KEY = "report-local-steps"
LOCAL_STEPS_KEY = "local-steps"
#: Most local steps a reply may claim: 1e7 steps of one round is no bank's training.
MAX_LOCAL_STEPS = 1e7


class FedNova(FedAvg):
    """FedAvg whose banks' updates are normalised by their local steps (FedNova).

    Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization", NeurIPS 2020. FedAvg weights a bank that trains more
    steps (one epoch over more rows) twice: by its rows and again by its longer
    update, so it converges to an objective where a 20x larger bank counts 400x.
    FedNova asks each bank for its normalising factor ``a_i`` (train config
    ``report-local-steps``; the reply's metric ``local-steps``: the bank's optimizer
    steps, momentum-adjusted, :func:`flower_ext.scaffold.effective_steps`) and applies
    ``tau_eff * sum_i p_i Delta_i / a_i`` (:func:`flower_ext.aggregation.fednova.fednova_weights`),
    ``p_i`` the validated, capped ``num-examples`` shares. With equal steps at every
    bank it is FedAvg exactly.

    Differs from Flower's FedAvg on purpose in that one step. Intake: a reply without
    a finite ``local-steps`` in (0, 1e7] is rejected with the reason (audited as
    ``reply_rejected``) and the round goes on. A claim is then held within
    ``steps_band`` (10x) of the steps the bank's validated, pinned rows imply at the
    round's median steps per row (:func:`flower_ext.aggregation.fednova.bounded_steps`;
    audited in ``client_update.weight_cap_reason`` and ``fednova_normalised``), so a
    bank lying about its steps moves its own weight by at most 10x and cannot blow up
    everyone's step (unbounded, 1e-6 steps bought the whole round and 1e7 scaled the
    step x22,000). ``steps_floor`` (keyword, default 0): the fewest momentum-adjusted
    steps an honest bank takes whatever its rows (the app passes its ``min-local-steps``),
    so a small bank that ran more epochs to reach it is not clamped. Like FedAvg, FedNova
    is not a robust rule: a bank can send any update.

    Assumes plain local SGD with small ``lr * steps`` (the paper's normaliser for
    momentum SGD is used); with the proximal term, whose normaliser differs, the app
    refuses it.

    Parameters
    ----------
    fraction_train, ..., evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    **kwargs
        Everything :class:`~flower_ext.strategies.UpdateAggregationStrategy` takes.
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
        steps_band: float = STEPS_BAND,
        steps_floor: float = 0.0,
        **kwargs: Any,
    ) -> None:
        finite = isinstance(steps_band, (int, float)) and math.isfinite(steps_band)
        if not finite or steps_band < 1:
            raise ValueError(f"steps_band must be a finite number >= 1, got {steps_band!r}")
        super().__init__(**fedavg_arguments(locals()), **kwargs)
        self.steps_band = float(steps_band)
        if not (isinstance(steps_floor, (int, float)) and math.isfinite(steps_floor)) or (
            steps_floor < 0
        ):
            raise ValueError(f"steps_floor must be a finite number >= 0, got {steps_floor!r}")
        self.steps_floor = float(steps_floor)
        self._clamped: dict[int, float] = {}  # node id -> its claim, where it was held
        self._steps: dict[int, float] = {}  # node id -> a_i, this round
        self._scale = 1.0
        #: Per round: tau_eff-style scale applied and each bank's a_i.
        self.normalisation_reports: dict[int, dict[str, Any]] = {}

    def rule_summary(self) -> str:
        return "weighted mean of updates normalised by local steps (FedNova)"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), REPORT_STEPS_KEY: True})
        return super().configure_train(server_round, arrays, config, grid)

    def check_reply_extras(
        self, server_round: int, accepted: list[CheckedReply]
    ) -> tuple[list[CheckedReply], list[Rejection]]:
        accepted, rejected = super().check_reply_extras(server_round, accepted)
        kept: list[CheckedReply] = []
        self._steps = {}
        for rep in accepted:
            value = rep.metrics.get(LOCAL_STEPS_KEY)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problem = f"no number '{LOCAL_STEPS_KEY}' in its metrics"
            elif not (math.isfinite(value) and 0 < value <= MAX_LOCAL_STEPS):
                problem = f"'{LOCAL_STEPS_KEY}' = {value!r} is not in (0, {MAX_LOCAL_STEPS:g}]"
            else:
                self._steps[rep.node_id] = float(value)
                kept.append(rep)
                continue
            rejected.append(Rejection(rep.node_id, f"FedNova: {problem}", rep.label))
        return kept, rejected

    def policy_weights(self, node_ids: list[int], raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
        capped, reasons = super().policy_weights(node_ids, raw)
        if not self._steps:  # outside a train round (no steps read): FedAvg's weights
            return capped, reasons
        claimed = np.array([self._steps[n] for n in node_ids], dtype=np.float64)
        steps, clamped = bounded_steps(capped, claimed, self.steps_band, self.steps_floor)
        shares, self._scale = fednova_weights(capped, steps)
        for i, node in enumerate(node_ids):
            if clamped[i]:
                note = (
                    f"FedNova: claimed {claimed[i]:.4g} local steps, held to {steps[i]:.4g} "
                    f"(within {self.steps_band:g}x of what its rows imply)"
                )
                reasons[i] = f"{reasons[i]}; {note}" if reasons[i] else note
                self._clamped[node] = float(claimed[i])
        return shares, reasons

    def server_step(self, aggregate: np.ndarray) -> ArrayRecord | None:
        if self._scale == 1.0:
            return super().server_step(aggregate)
        return super().server_step(aggregate * self._scale)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._scale, self._steps, self._clamped = 1.0, {}, {}
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None and metrics is not None:
                metrics["fednova-scale"] = self._scale
                report = {
                    "scale": self._scale,
                    "local_steps": dict(self._steps),
                    "clamped_claims": dict(self._clamped),
                }
                self.normalisation_reports[server_round] = report
                self.audit.record("fednova_normalised", round=server_round, **report)
                log(INFO, "FedNova: step scale %.4g over %d banks", self._scale, len(self._steps))
            return arrays, metrics
        finally:
            self._scale, self._steps = 1.0, {}
