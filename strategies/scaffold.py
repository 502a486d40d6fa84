"""SCAFFOLD: FedAvg with server and client control variates against client drift.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 (option II for the client control variates).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.records import RecordFormatError, array_view, numeric_dtype
from flower_ext.scaffold import CONTROL_DELTA_KEY, CONTROL_KEY
from flower_ext.validation import CheckedReply, Rejection

from .base import MAX_UPDATE_NORM_LIMIT, fedavg_arguments
from .fedavg import FedAvg

#: Default bound on the L2 norm of one bank's ``delta c_i``: a control variate is a
#: mean gradient, of order 1-10 on standardised features; this catches garbage and
#: keeps every float64 sum of a round finite.
MAX_CONTROL_DELTA_NORM = 1e6
#: A delta longer than this many times the round's median delta norm is rejected.
CONTROL_DELTA_FACTOR = 10.0
#: Prefix of every rejection this strategy adds (the audit trail's reason).
REJECTION_PREFIX = "SCAFFOLD control delta"


class Scaffold(FedAvg):
    """FedAvg whose banks correct their local steps with control variates (SCAFFOLD).

    Karimireddy et al., ICML 2020, Algorithm 1, option II. Each round the server
    sends its control variate ``c`` (keys and shapes of the model, float) as an
    extra ArrayRecord ``"scaffold-control"`` next to the model; each bank trains
    with ``g + c - c_i`` and replies with its model and ``delta c_i`` under
    ``"scaffold-control-delta"`` (:func:`flower_ext.scaffold.scaffold_train` does
    the bank's part). The server then

    - averages the models exactly as :class:`FedAvg` does (weighted by the
      validated, capped ``num-examples``; server learning rate, momentum or an
      adaptive ``server_optimizer`` as configured: the paper's global step size
      ``eta_g`` is ``server_learning_rate``);
    - sets ``c += (1/N) * sum_{i in S} delta c_i = (|S|/N) * mean_S(delta c_i)``, S
      the accepted replies and N the number of banks (``num_clients``; by default
      the nodes connected when the round was configured). Unweighted, as in the
      paper: with every ``c_i`` and ``c`` starting at 0, ``c`` stays the mean of the
      banks' ``c_i``.

    Intake: besides every check :class:`FedAvg` makes, a reply whose control delta
    is missing, not an ArrayRecord, has other keys, shapes or a non-float dtype, holds
    NaN/Inf, or has an L2 norm above ``max_control_delta_norm`` is rejected with the
    reason (``reply_rejected`` in the audit trail, ``round_reports[r].rejected``)
    and the round goes on: a rejected reply counts for neither the model nor ``c``.
    A round skipped (too few replies, a non-finite model) leaves ``c`` as it was.

    Privacy: ``delta c_i`` reveals as much about a bank's data as its model update
    (it is that update rescaled, minus the known ``c``), in clear. SCAFFOLD needs
    the server to read each delta, so it cannot run under HE or secure aggregation,
    and it is not combined with DP, top-k or the robust rules (the bank app refuses
    these with the reason); with a robust rule an attacker's delta would still move
    ``c`` for every bank.

    Parameters
    ----------
    fraction_train, ..., evaluate_metrics_aggr_fn
        As in ``flwr.serverapp.strategy.FedAvg``.
    num_clients : int, optional
        N, the number of banks in the federation; ``None``: the nodes connected
        each round.
    max_control_delta_norm : float (default: 1e6)
        Replies whose ``delta c_i`` has a larger L2 norm are rejected.
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
        num_clients: int | None = None,
        max_control_delta_norm: float = MAX_CONTROL_DELTA_NORM,
        control_delta_factor: float = CONTROL_DELTA_FACTOR,
        **kwargs: Any,
    ) -> None:
        finite = isinstance(control_delta_factor, (int, float)) and math.isfinite(
            control_delta_factor
        )
        if not finite or control_delta_factor < 0 or 0 < control_delta_factor < 1:
            raise ValueError(
                f"control_delta_factor must be 0 (off) or >= 1, got {control_delta_factor!r}"
            )
        if num_clients is not None and (
            isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1
        ):
            raise ValueError(f"num_clients must be a positive integer or None, got {num_clients!r}")
        if not 0 < max_control_delta_norm <= MAX_UPDATE_NORM_LIMIT:
            raise ValueError(
                f"max_control_delta_norm must be in (0, {MAX_UPDATE_NORM_LIMIT:g}], "
                f"got {max_control_delta_norm}"
            )
        if arrayrecord_key in (CONTROL_KEY, CONTROL_DELTA_KEY):
            raise ValueError(f"arrayrecord_key '{arrayrecord_key}' is SCAFFOLD's own key")
        super().__init__(**fedavg_arguments(locals()), **kwargs)
        self.num_clients = num_clients
        self.max_control_delta_norm = float(max_control_delta_norm)
        self.control_delta_factor = float(control_delta_factor)
        #: The server control variate ``c`` (float64, the model's flat layout).
        self._control: np.ndarray | None = None
        self._population = num_clients or 0
        self._deltas: dict[int, ArrayRecord | str | None] = {}  # id(reply) -> what it sent
        self._delta_values: dict[int, np.ndarray] = {}  # node id -> checked delta c_i
        #: Per round: contributors, N and the norm of ``c`` after the update.
        self.control_reports: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ summary
    def rule_summary(self) -> str:
        return "weighted mean of updates, SCAFFOLD control variates (option II)"

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t\t└── SCAFFOLD: c += (1/N) sum of accepted delta c_i, N = %s; "
            "delta c_i norm bound %.3g",
            self.num_clients or "the connected nodes",
            self.max_control_delta_norm,
        )

    # ------------------------------------------------------------------ control variate
    @property
    def control(self) -> np.ndarray | None:
        """A copy of the server's control variate ``c`` (flat, float64), once set."""
        return None if self._control is None else self._control.copy()

    def set_global_model(self, arrays: ArrayRecord) -> None:
        previous = self._layout
        super().set_global_model(arrays)
        assert self._layout is not None
        changed = previous is not None and previous != self._layout
        if self._control is None or changed or self._control.shape != (self._layout.dim,):
            self._control = np.zeros(self._layout.dim, dtype=np.float64)

    def control_record(self) -> ArrayRecord:
        """``c`` as an ArrayRecord in the model's keys and shapes, in its float dtype."""
        assert self._layout is not None and self._control is not None
        layout, offsets = self._layout, self._layout.offsets
        dtype = layout.compute_dtype
        arrays = {}
        for j, key in enumerate(layout.keys):
            chunk = self._control[offsets[j] : offsets[j + 1]].astype(dtype)
            arrays[key] = Array(np.array(chunk.reshape(layout.shapes[j]), order="C", copy=True))
        return ArrayRecord(arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not messages:
            return messages
        if self.num_clients is None:
            self._population = max(len(list(grid.get_node_ids())), len(messages))
        record = self.control_record()
        for message in messages:  # Flower's messages share one RecordDict: set once each
            message.content[CONTROL_KEY] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._deltas, self._delta_values = {}, {}
        passed = [self._strip(message) for message in replies]
        try:
            arrays, metrics = super().aggregate_train(server_round, passed)
            report = self.round_reports.get(server_round)
            if arrays is not None and report is not None:
                norm = self._update_control(server_round, report.accepted)
                if metrics is not None and norm is not None:
                    metrics["scaffold-control-norm"] = norm
                    report.train_metrics["scaffold-control-norm"] = norm
            return arrays, metrics
        finally:
            self._deltas, self._delta_values = {}, {}

    def _strip(self, message: Message) -> Message:
        """The reply without its control delta (kept aside for :meth:`check_reply_extras`)."""
        try:
            if message.has_error() or not message.has_content():
                return message
            content = message.content
            if CONTROL_DELTA_KEY not in content:
                self._deltas[id(message)] = None
                return message
            found = content[CONTROL_DELTA_KEY]
            stripped = RecordDict()
            for key, record in content.items():
                if key != CONTROL_DELTA_KEY:
                    stripped[key] = record
            out = Message(metadata=copy.copy(message.metadata), content=stripped)
            self._deltas[id(out)] = (
                found
                if isinstance(found, ArrayRecord)
                else f"is a {type(found).__name__}, not an ArrayRecord"
            )
            return out
        except Exception as err:  # never let one reply end the round: the base rejects it
            self._deltas[id(message)] = f"unreadable reply ({type(err).__name__}: {err})"
            return message

    def check_reply_extras(
        self, server_round: int, accepted: list[CheckedReply]
    ) -> tuple[list[CheckedReply], list[Rejection]]:
        """Reject replies whose control delta is missing or unusable (the reason says why)."""
        good: list[CheckedReply] = []
        rejected: list[Rejection] = []
        for rep in accepted:
            try:
                flat, problem = self._read_delta(self._deltas.get(id(rep.message)))
            except Exception as err:  # a malformed record must never stop the round
                flat, problem = None, f"unreadable ({type(err).__name__}: {err})"
            if flat is None:
                rejected.append(Rejection(rep.node_id, f"{REJECTION_PREFIX} {problem}", rep.label))
                continue
            self._delta_values[rep.node_id] = flat
            good.append(rep)
        return self._relative_bound(good, rejected)

    def _relative_bound(
        self, good: list[CheckedReply], rejected: list[Rejection]
    ) -> tuple[list[CheckedReply], list[Rejection]]:
        """Reject deltas longer than ``control_delta_factor`` x the round's median delta
        norm (with 3 or more deltas): one bank could otherwise move ``c``, and so every
        bank's training, by up to the absolute bound every round, and the lie never washes
        out (honest deltas do not cancel it)."""
        if self.control_delta_factor <= 0 or len(good) < 3:
            return good, rejected
        norms = {r.node_id: float(np.linalg.norm(self._delta_values[r.node_id])) for r in good}
        median = float(np.median(list(norms.values())))
        bound = self.control_delta_factor * median
        kept = []
        for rep in good:
            if norms[rep.node_id] > bound and norms[rep.node_id] > 0:
                del self._delta_values[rep.node_id]
                reason = (
                    f"{REJECTION_PREFIX} too long: L2 norm {norms[rep.node_id]:.3g} is more "
                    f"than {self.control_delta_factor:g}x the round's median {median:.3g}"
                )
                rejected.append(Rejection(rep.node_id, reason, rep.label))
            else:
                kept.append(rep)
        return kept, rejected

    def _read_delta(self, entry: ArrayRecord | str | None) -> tuple[np.ndarray | None, str]:
        """``delta c_i`` as a flat float64 vector, or ``None`` and why it is unusable."""
        if entry is None:
            return None, (
                f"missing: the reply has no '{CONTROL_DELTA_KEY}' ArrayRecord "
                "(a bank not running SCAFFOLD?)"
            )
        if isinstance(entry, str):
            return None, entry
        layout = self._layout
        assert layout is not None
        keys = set(entry.keys())
        if keys != set(layout.keys):
            missing = sorted(set(layout.keys) - keys)[:5]
            extra = sorted(keys - set(layout.keys))[:5]
            return None, f"has other arrays than the model: missing {missing}, unexpected {extra}"
        flat = np.empty(layout.dim, dtype=np.float64)
        offsets = layout.offsets
        integers = set(layout.integer_indices)
        for j, (key, shape) in enumerate(zip(layout.keys, layout.shapes, strict=True)):
            array = entry[key]
            try:
                dtype = numeric_dtype(array.dtype)
                got = tuple(int(s) for s in array.shape)
                if got != shape:
                    return None, f"array '{key}' has shape {got}, the model {shape}"
                if dtype.kind != "f":
                    return None, f"array '{key}' has dtype {dtype}, a float is needed"
                values = array_view(array).reshape(-1)
            except (RecordFormatError, TypeError, ValueError) as err:
                return None, f"array '{key}': {err}"
            if j in integers:  # counters have no control variate: their entries stay 0
                flat[offsets[j] : offsets[j + 1]] = 0.0
            else:
                flat[offsets[j] : offsets[j + 1]] = values
        if not np.isfinite(flat).all():
            return None, "contains NaN or Inf"
        with np.errstate(over="ignore"):
            norm = float(np.linalg.norm(flat))
        if not math.isfinite(norm) or norm > self.max_control_delta_norm:
            return None, (
                f"values too large: L2 norm {norm:.3g} exceeds max_control_delta_norm "
                f"{self.max_control_delta_norm:.3g}"
            )
        return flat, ""

    def _update_control(self, server_round: int, accepted: list[int]) -> float | None:
        """``c += (1/N) sum_{i in S} delta c_i`` over the accepted replies; the new norm."""
        assert self._control is not None
        contributors = [n for n in accepted if n in self._delta_values]
        if not contributors:
            return None
        deltas = np.stack([self._delta_values[n] for n in contributors])
        population = max(self._population, len(contributors))
        # Weighted as the models are (validated, pinned, capped num-examples): with every
        # bank in, c stays the weighted mean of the c_i, so the corrected steps follow the
        # same objective FedAvg's weighted mean does. The paper averages both unweighted;
        # an unweighted c under a weighted model average steers to the equal-weight optimum.
        report = self.round_reports.get(server_round)
        raw = np.array(
            [float((report.clients.get(n) or {}).get("num_examples", 1.0)) if report else 1.0
             for n in contributors]
        )  # fmt: skip
        weights, _ = self.policy_weights(contributors, raw)
        shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        total = len(contributors) * (shares @ deltas)
        updated = self._control + total / population
        if not np.isfinite(updated).all():  # cannot happen with bounded deltas; never keep it
            return None
        self._control = updated
        norm = float(np.linalg.norm(updated))
        self.control_reports[server_round] = {
            "contributors": [n for n in accepted if n in self._delta_values],
            "population": population,
            "control_norm": norm,
        }
        self.audit.record(
            "scaffold_control_updated",
            round=server_round,
            contributors=len(deltas),
            population=population,
            control_norm=norm,
        )
        return norm

    # ------------------------------------------------------------------ resume
    def export_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The base's state plus ``c`` (array ``scaffold-control``) and N."""
        arrays, fields = super().export_state()
        if self._control is not None:
            arrays[CONTROL_KEY] = self._control.copy()
        fields["scaffold"] = {"population": int(self._population)}
        return arrays, fields

    def import_state(self, arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
        """The base's state. ``c`` restarts at 0: a resumed run is a new Flower run, so
        every bank's ``c_i`` (in its Context state) restarts at 0 too, and ``c`` must stay
        the mean of the ``c_i`` (the saved ``c`` against fresh ``c_i`` steered a resumed
        run to 0.89 where the optimum was 0.5)."""
        super().import_state(arrays, fields)
        if arrays.get(CONTROL_KEY) is not None:
            self._control = None  # set to zeros with the model's layout (set_global_model)
        saved = fields.get("scaffold") or {}
        if self.num_clients is None and saved.get("population"):
            self._population = int(saved["population"])


__all__ = ["CONTROL_DELTA_KEY", "CONTROL_KEY", "Scaffold"]
