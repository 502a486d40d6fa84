"""Privacy accounting: settings, the cumulative ledger, its locked file, budget refusals.

See :mod:`flower_ext.privacy` for the guarantees.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
DEFAULT_GRAD_SAMPLE_MODE = "ew"
DP_MODES = ("off", "dp-sgd", "update")

SAMPLE_LEDGER_KEY = "privacy-ledger"  # context.state key of the DP-SGD ledger
UPDATE_LEDGER_KEY = "privacy-ledger-update"  # ... of the update-level ledger

#: ``Error.code`` of a train reply refused because the budget would be exceeded.
PRIVACY_BUDGET_ERROR_CODE = 4100

#: Reply metric names (``MetricRecord`` of every DP train reply).
METRIC_KEYS = (
    "dp-epsilon",
    "dp-delta",
    "dp-noise-multiplier",
    "dp-max-grad-norm",
    "dp-sample-rate",
    "dp-steps",
)


#: Sane bounds, enforced on the run config, the node config and the config classes.
#: Epsilon: below 0.1 Opacus's noise search fails ("budget too low"), above 50 it is no
#: privacy and the search takes ever longer (1e15 never ends).
EPSILON_BOUNDS = (0.1, 50.0)
#: Delta: should be far below 1 / rows; 1e-10 keeps the accountants' numerics sane.
DELTA_BOUNDS = (1e-10, 1e-2)
#: The noise multiplier the accountant sees (for update-level DP, ``dp-noise-multiplier
#: / 2``): below 0.3 epsilon is > 100 anyway and PRV needs minutes and gigabytes (at
#: ~0.05 it allocates 13.8 GiB and answers inf); above 1e4 nothing is learnt.
NOISE_BOUNDS = (0.3, 1e4)
#: Clip norm (per-sample gradient, or update L2).
CLIP_BOUNDS = (1e-6, 1e6)


class PrivacyConfigError(ValueError):
    """A DP setting, model or loader the wrapper cannot use."""


class PrivacyBudgetExhausted(RuntimeError):
    """Raised before any step when the planned round would exceed the epsilon budget."""

    def __init__(self, reason: str, spent: float, projected: float, budget: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.spent = spent
        self.projected = projected
        self.budget = budget


# --------------------------------------------------------------------------- ledger
def _positive(name: str, value: float | None) -> list[str]:
    """``[]`` if ``value`` is None or a finite number > 0, else the problem in words."""
    if value is None or (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return []
    return [f"{name} must be a finite number > 0, got {value!r}"]


def _within(name: str, value: float | None, bounds: tuple[float, float]) -> list[str]:
    """``[]`` if ``value`` is None or a number in ``bounds``, else the problem in words."""
    problems = _positive(name, value)
    if problems or value is None:
        return problems
    low, high = bounds
    if not low <= value <= high:
        return [f"{name} must be in [{low:g}, {high:g}], got {value:g}"]
    return []


def _noise_problems(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    accountant: str,
    sensitivity: float = 1.0,
) -> list[str]:
    """What is wrong with the noise settings both DP configurations share.

    A noise multiplier of 0 is refused: it is no privacy at all, and the
    accountants answer it with an overflow (PRV) or an infinite epsilon (RDP).
    """
    problems = []
    if (noise_multiplier is None) == (target_epsilon is None):
        problems.append("give exactly one of noise_multiplier and target_epsilon")
    # The library accepts any noise > 0 (tests compare against near-noiseless runs);
    # the run config enforces NOISE_BOUNDS. PRV below the floor would need gigabytes.
    problems += _positive("noise_multiplier", noise_multiplier)
    if (
        accountant == "prv"
        and not problems
        and noise_multiplier is not None
        and noise_multiplier / sensitivity < NOISE_BOUNDS[0]
    ):
        problems.append(
            f"noise_multiplier {noise_multiplier:g} is below {NOISE_BOUNDS[0] * sensitivity:g}, "
            "where the PRV accountant needs minutes and gigabytes (and epsilon is > 100); "
            "use more noise or accountant='rdp'"
        )
    problems += _within("target_epsilon", target_epsilon, EPSILON_BOUNDS)
    problems += _within("delta", delta, DELTA_BOUNDS)
    if accountant not in ACCOUNTANTS:
        problems.append(f"accountant must be one of {ACCOUNTANTS}, got '{accountant}'")
    return problems


@dataclass
class PrivacyLedger:
    """Cumulative privacy accounting of one client, persisted in ``context.state``.

    ``history`` is exactly an Opacus accountant's ``history``: a list of
    ``(noise_multiplier, sample_rate, num_steps)``, consecutive steps with the
    same parameters merged (as ``RDPAccountant.step`` does), so the ledger's
    epsilon equals that of one accountant fed every step in one go.

    Parameters
    ----------
    accountant : {"rdp", "prv"}
        Opacus accountant used for ``epsilon``; fixed for the ledger's life.
    history : list of (float, float, int)
    rounds : int
        Rounds in which the client spent budget.
    unit : str
        What one "neighbour" differs by: ``"sample"`` (DP-SGD) or ``"bank-replace"``.
    delta : float, optional
        The smallest delta any charge was made at (None before the first). Epsilon
        is always reported and enforced at ``min(delta asked, this)``: a run that
        asks for a larger delta (a smaller-looking epsilon) cannot re-spend the
        budget other runs spent at a stricter one.
    """

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: int = 0
    unit: str = "sample"
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise PrivacyConfigError(
                f"accountant must be one of {ACCOUNTANTS}, got '{self.accountant}'"
            )

    # -- persistence ---------------------------------------------------------
    @classmethod
    def load(
        cls,
        state: RecordDict,
        key: str = SAMPLE_LEDGER_KEY,
        accountant: str = "rdp",
        unit: str = "sample",
    ) -> PrivacyLedger:
        """The ledger stored under ``key`` in ``state``; an empty one if none is."""
        if key not in state:
            return cls(accountant=accountant, unit=unit)
        rec = state[key]
        if not isinstance(rec, ConfigRecord):
            raise PrivacyConfigError(f"context.state['{key}'] is not a privacy ledger")
        return cls.from_values(dict(rec.items()), accountant, unit)

    @classmethod
    def from_values(
        cls, values: Mapping[str, Any], accountant: str = "rdp", unit: str = "sample"
    ) -> PrivacyLedger:
        """The ledger held in ``values`` (the fields :meth:`values` writes), validated.

        Raises :class:`PrivacyConfigError` for anything that is not a ledger
        (missing fields, lists of different lengths, steps or rounds that are not
        non-negative integers, noise multipliers or sample rates out of range): a
        broken ledger is never read as a fresh or a negative spending.

        A ledger kept under the older add/remove relation for update-level DP
        (unit ``"client"``, sensitivity C) is converted to the replace relation
        (unit ``"bank-replace"``, sensitivity 2C) by halving its noise
        multipliers, which is exactly what those releases cost under it.
        """
        problems = _ledger_problems(values)
        if problems:
            raise PrivacyConfigError("not a valid privacy ledger: " + "; ".join(problems))
        stored = str(values["accountant"])
        if stored != accountant:
            raise PrivacyConfigError(
                f"the privacy ledger was kept with the '{stored}' accountant; switching to "
                f"'{accountant}' mid-run would restart the accounting"
            )
        sigmas = [float(v) for v in values["noise-multiplier"]]
        rates = [float(v) for v in values["sample-rate"]]
        steps = [int(v) for v in values["steps"]]
        stored_unit = str(values["unit"])
        if stored_unit == "client" and unit == UPDATE_LEDGER_UNIT:
            sigmas = [s / UPDATE_SENSITIVITY for s in sigmas]
            stored_unit = unit
        if stored_unit != unit:
            raise PrivacyConfigError(
                f"the privacy ledger counts '{stored_unit}'-level releases, this round would "
                f"charge '{unit}'-level ones; they cannot share one ledger"
            )
        return cls(
            accountant=stored,
            history=list(zip(sigmas, rates, steps, strict=True)),
            rounds=int(values["rounds"]),
            unit=stored_unit,
            delta=None if values.get("delta") is None else float(values["delta"]),
        )

    def values(self) -> dict[str, Any]:
        """The ledger as plain values (what :meth:`save` and :class:`LedgerFile` store)."""
        out: dict[str, Any] = {
            "accountant": self.accountant,
            "unit": self.unit,
            "rounds": self.rounds,
            "noise-multiplier": [float(h[0]) for h in self.history],
            "sample-rate": [float(h[1]) for h in self.history],
            "steps": [int(h[2]) for h in self.history],
        }
        if self.delta is not None:
            out["delta"] = float(self.delta)
        return out

    def copy(self) -> PrivacyLedger:
        return PrivacyLedger(
            self.accountant, [tuple(h) for h in self.history], self.rounds, self.unit, self.delta
        )  # type: ignore[misc]

    def save(self, state: RecordDict, key: str = SAMPLE_LEDGER_KEY) -> None:
        """Store the ledger under ``key`` in ``state`` (a ``ConfigRecord``)."""
        state[key] = ConfigRecord(self.values())

    # -- accounting ----------------------------------------------------------
    def make_accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding this ledger's whole history."""
        acc = create_accountant(mechanism=self.accountant)
        acc.history = [tuple(h) for h in self.history]  # type: ignore[misc]
        return acc

    @property
    def total_steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def strictest_delta(self, delta: float) -> float:
        """``delta``, or the smaller delta an earlier charge used."""
        return delta if self.delta is None else min(float(delta), self.delta)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at :meth:`strictest_delta` (0.0 before the first step)."""
        return _epsilon(self.accountant, self.history, self.strictest_delta(delta))

    def record(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float | None = None
    ) -> None:
        """Add ``steps`` steps, merged into the last entry as Opacus does.

        ``delta`` (the delta the charge was checked at) lowers :attr:`delta` if smaller.
        """
        if delta is not None:
            self.delta = self.strictest_delta(delta)
        if steps <= 0:
            return
        self.history = _extend(self.history, noise_multiplier, sample_rate, steps)

    def absorb(self, accountant: IAccountant) -> None:
        """Take the history of an accountant built by :meth:`make_accountant` and stepped."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in accountant.history]

    def projected_epsilon(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Epsilon after ``steps`` more steps at (noise_multiplier, sample_rate)."""
        history = _extend(self.history, noise_multiplier, sample_rate, steps)
        return _epsilon(self.accountant, history, self.strictest_delta(delta))

    def check_budget(
        self,
        budget: float | None,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Projected epsilon of the planned round; raises if it exceeds ``budget``."""
        projected = self.projected_epsilon(delta, noise_multiplier, sample_rate, steps)
        if budget is not None and projected > budget * (1 + 1e-9):
            spent = self.epsilon(delta)
            reason = (
                f"privacy budget exhausted: epsilon spent {spent:.4g} of budget {budget:g} "
                f"(delta={self.strictest_delta(delta):g}, {self.unit}-level, {self.accountant}); "
                f"the next round "
                f"({steps} steps, noise multiplier {noise_multiplier:.4g}, sample rate "
                f"{sample_rate:.4g}) would reach {projected:.4g}, so this client does not train"
            )
            raise PrivacyBudgetExhausted(reason, spent, projected, budget)
        return projected


def _ledger_problems(values: Mapping[str, Any]) -> list[str]:
    """What makes ``values`` not a ledger (empty when it is one)."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    problems = [
        f"field '{k}' is missing"
        for k in ("accountant", "unit", "rounds", "noise-multiplier", "sample-rate", "steps")
        if k not in values
    ]
    if problems:
        return problems
    lists = [values[k] for k in ("noise-multiplier", "sample-rate", "steps")]
    if not all(isinstance(v, list | tuple) for v in lists):
        return ["noise-multiplier, sample-rate and steps must be lists"]
    if len({len(v) for v in lists}) != 1:
        problems.append("noise-multiplier, sample-rate and steps differ in length")
    if not all(number(v) and v > 0 for v in values["noise-multiplier"]):
        problems.append("every noise multiplier must be a finite number > 0")
    if not all(number(v) and 0 < v <= 1 for v in values["sample-rate"]):
        problems.append("every sample rate must be in (0, 1]")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values["steps"]):
        problems.append("every steps entry must be an integer > 0")
    rounds = values["rounds"]
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0):
        problems.append(f"rounds must be an integer >= 0, got {rounds!r}")
    delta = values.get("delta")
    if delta is not None and not (number(delta) and 0 < delta < 1):
        problems.append(f"delta must be in (0, 1), got {delta!r}")
    return problems


def _extend(
    history: Sequence[tuple[float, float, int]], sigma: float, q: float, steps: int
) -> list[tuple[float, float, int]]:
    out = [tuple(h) for h in history]
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, int(out[-1][2]) + int(steps))
    else:
        out.append((float(sigma), float(q), int(steps)))
    return out  # type: ignore[return-value]


def _epsilon(accountant: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]  # type: ignore[misc]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": bound still valid
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        return float(acc.get_epsilon(delta=delta))


def _quiet_noise_multiplier(**kwargs: Any) -> float:
    """Opacus's noise search; its failures become a :class:`PrivacyConfigError`."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Optimal order.*")
            sigma = float(get_noise_multiplier(**kwargs))
    except (ValueError, OverflowError) as err:
        raise PrivacyConfigError(
            f"dp-target-epsilon {kwargs.get('target_epsilon')!r} cannot be reached at "
            f"delta {kwargs.get('target_delta')!r} over {kwargs.get('steps')} steps at sample "
            f"rate {kwargs.get('sample_rate')!r}: {err}"
        ) from err
    if not NOISE_BOUNDS[0] <= sigma <= NOISE_BOUNDS[1]:
        raise PrivacyConfigError(
            f"dp-target-epsilon {kwargs.get('target_epsilon')!r} needs noise multiplier "
            f"{sigma:.4g}, outside {NOISE_BOUNDS}; choose another target"
        )
    return sigma


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD settings for a whole federation.

    Give either ``noise_multiplier`` or ``target_epsilon``. With a target, the
    noise multiplier is the smallest one whose epsilon after ``rounds x
    local_epochs`` epochs (at the loader's sample rate) is at most the target
    (``opacus.accountants.utils.get_noise_multiplier``), and the target is also
    the enforced budget unless ``epsilon_budget`` says otherwise.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    rounds: int = 1
    local_epochs: int = 1
    epsilon_budget: float | None = None
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE
    secure_mode: bool = False
    fused_clipping: bool = True

    def __post_init__(self) -> None:
        problems = _noise_problems(
            self.noise_multiplier, self.target_epsilon, self.delta, self.accountant
        )
        problems += _within("max_grad_norm", self.max_grad_norm, CLIP_BOUNDS)
        if self.rounds < 1 or self.local_epochs < 1:
            problems.append("rounds and local_epochs must be >= 1")
        problems += _within("epsilon_budget", self.epsilon_budget, EPSILON_BOUNDS)
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            problems.append(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got "
                f"'{self.grad_sample_mode}'"
            )
        if problems:
            raise PrivacyConfigError("invalid DP-SGD settings: " + "; ".join(problems))

    @property
    def budget(self) -> float | None:
        """The enforced epsilon budget (None: none)."""
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    def noise_for(self, sample_rate: float, steps_per_epoch: int) -> float:
        """The noise multiplier to use at this sample rate."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None
        total = self.rounds * self.local_epochs * steps_per_epoch
        return _quiet_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=self.delta,
            sample_rate=sample_rate,
            steps=total,
            accountant=self.accountant,
        )


#: Sensitivity of a clipped update, in units of the clip norm, under "replace one bank's
#: whole contribution by any other": two updates of norm <= C can be 2C apart.
UPDATE_SENSITIVITY = 2.0

#: Ledger unit of update-level DP (the neighbouring relation the accountant uses).
UPDATE_LEDGER_UNIT = "bank-replace"


@dataclass(frozen=True)
class UpdateDPConfig:
    """Update-level (client-level, local) DP: clip the update, add Gaussian noise.

    ``noise_multiplier`` is the noise std over the clip norm (``std = sigma * C``),
    as in Opacus. The accountant sees the *effective* multiplier
    ``sigma / UPDATE_SENSITIVITY`` (std over the sensitivity ``2C`` of the
    replace-one-bank relation), so with ``target_epsilon`` the noise is twice
    what an add/remove accounting would pick.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: str = "rdp"
    rounds: int = 1
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        problems = _noise_problems(
            self.noise_multiplier,
            self.target_epsilon,
            self.delta,
            self.accountant,
            UPDATE_SENSITIVITY,
        )
        problems += _within("clip_norm", self.clip_norm, CLIP_BOUNDS)
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        problems += _within("epsilon_budget", self.epsilon_budget, EPSILON_BOUNDS)
        if problems:
            raise PrivacyConfigError("invalid update-level DP settings: " + "; ".join(problems))

    @property
    def budget(self) -> float | None:
        """The enforced epsilon budget (None: none)."""
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    def noise(self) -> float:
        """Noise std over the clip norm, ``sigma`` in ``N(0, (sigma C)^2)``."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None
        effective = _quiet_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=self.delta,
            sample_rate=1.0,
            steps=self.rounds,
            accountant=self.accountant,
        )
        return float(effective) * UPDATE_SENSITIVITY

    def accounted_noise(self) -> float:
        """The multiplier the ledger records: noise std over the sensitivity ``2C``."""
        return self.noise() / UPDATE_SENSITIVITY


def _run_float(
    cfg: Mapping[str, Any], key: str, default: float, where: str = "run config"
) -> float:
    """``cfg[key]`` as a float: an int or a float, finite; bools and strings are refused."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyConfigError(
            f"{where} {key} must be a number (int or float, not a bool or a string), got {value!r}"
        )
    out = float(value)
    if not math.isfinite(out):
        raise PrivacyConfigError(f"{where} {key} must be finite, got {value!r}")
    return out


def _in(key: str, value: float, bounds: tuple[float, float], unit: str = "") -> list[str]:
    low, high = bounds
    if low <= value <= high:
        return []
    return [f"{key} must be in [{low:g}, {high:g}]{unit}, got {value:g}"]


def privacy_config_from_run_config(
    cfg: Mapping[str, Any], rounds: int, local_epochs: int
) -> DPSGDConfig | UpdateDPConfig | None:
    """The DP settings of a Flower run config (keys ``dp``, ``dp-*``); None when off.

    ``dp-target-epsilon`` > 0 picks the noise for the whole run; 0 (the app's
    default, meaning "not set") uses ``dp-noise-multiplier``. ``dp-epsilon-budget``
    > 0 is the enforced budget (at least the target); 0 means the target epsilon
    (or none). Every impossible value is refused here, before any training, with
    the run-config key named: values must be ints or floats (no bools, no numeric
    strings) within :data:`EPSILON_BOUNDS`, :data:`DELTA_BOUNDS`,
    :data:`NOISE_BOUNDS` (the accounted multiplier: ``dp-noise-multiplier / 2`` for
    ``dp = "update"``) and :data:`CLIP_BOUNDS`. The bank's own node config can
    only tighten these (:class:`BankDPPolicy`).

    Raises
    ------
    PrivacyConfigError
        Naming every bad ``dp-*`` key and value.
    """
    mode = cfg.get("dp", "off")
    if not isinstance(mode, str) or mode not in DP_MODES:
        raise PrivacyConfigError(f"dp must be one of {DP_MODES}, got {mode!r}")
    if mode == "off":
        return None
    problems: list[str] = []
    values: dict[str, float] = {}
    for key, default in (
        ("dp-target-epsilon", 0.0),
        ("dp-epsilon-budget", 0.0),
        ("dp-noise-multiplier", 1.0),
        ("dp-delta", 1e-5),
        ("dp-max-grad-norm", 1.0),
    ):
        try:
            values[key] = _run_float(cfg, key, default)
        except PrivacyConfigError as err:
            problems.append(str(err).removeprefix("run config "))
    target = values.get("dp-target-epsilon", 0.0)
    budget = values.get("dp-epsilon-budget", 0.0)
    sigma = values.get("dp-noise-multiplier", 1.0)
    delta = values.get("dp-delta", 1e-5)
    norm = values.get("dp-max-grad-norm", 1.0)
    accountant = cfg.get("dp-accountant", "rdp")
    mode_name = cfg.get("dp-grad-sample-mode", DEFAULT_GRAD_SAMPLE_MODE)
    sensitivity = UPDATE_SENSITIVITY if mode == "update" else 1.0
    if target < 0:
        problems.append(
            f"dp-target-epsilon must be > 0 (or 0 to use dp-noise-multiplier), got {target:g}"
        )
    elif target > 0:
        problems += _in("dp-target-epsilon", target, EPSILON_BOUNDS, " (or 0: not set)")
    if not sigma > 0:
        problems.append(
            f"dp-noise-multiplier must be > 0, got {sigma:g} (0 would be no privacy at all)"
        )
    else:
        problems += _in(
            "dp-noise-multiplier",
            sigma,
            (NOISE_BOUNDS[0] * sensitivity, NOISE_BOUNDS[1] * sensitivity),
            f" for dp='{mode}'" if mode == "update" else "",
        )
    if budget < 0:
        problems.append(f"dp-epsilon-budget must be > 0 (or 0 for none), got {budget:g}")
    elif budget > 0:
        problems += _in("dp-epsilon-budget", budget, EPSILON_BOUNDS, " (or 0: none)")
        if target > 0 and budget < target:
            problems.append(
                f"dp-epsilon-budget {budget:g} is below dp-target-epsilon {target:g}: the "
                "noise is chosen to spend the target, so the run would stop partway"
            )
    if not 0 < delta < 1:
        problems.append(f"dp-delta must be in (0, 1), got {delta:g}")
    else:
        problems += _in("dp-delta", delta, DELTA_BOUNDS)
    if not norm > 0:
        problems.append(f"dp-max-grad-norm must be > 0, got {norm:g}")
    else:
        problems += _in("dp-max-grad-norm", norm, CLIP_BOUNDS)
    if accountant not in ACCOUNTANTS:
        problems.append(f"dp-accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if mode_name not in GRAD_SAMPLE_MODES:
        problems.append(
            f"dp-grad-sample-mode must be one of {GRAD_SAMPLE_MODES}, got {mode_name!r}"
        )
    if int(rounds) < 1 or int(local_epochs) < 1:
        problems.append("num-server-rounds and local-epochs must be >= 1")
    if problems:
        raise PrivacyConfigError(f"invalid DP settings (dp='{mode}'): " + "; ".join(problems))
    common: dict[str, Any] = {
        "noise_multiplier": None if target > 0 else sigma,
        "target_epsilon": target if target > 0 else None,
        "delta": delta,
        "accountant": accountant,
        "rounds": int(rounds),
        "epsilon_budget": budget if budget > 0 else None,
    }
    if mode == "update":
        return UpdateDPConfig(clip_norm=norm, **common)
    return DPSGDConfig(
        max_grad_norm=norm, local_epochs=int(local_epochs), grad_sample_mode=mode_name, **common
    )


# --------------------------------------------------------------------------- client helpers
class LedgerFile:
    """A bank's privacy ledger on disk, safe under concurrent and restarted runs.

    Flower 1.42 keeps ``context.state`` in the SuperNode's memory only: a restarted
    SuperNode or a new run would start the ledger at zero and silently re-spend
    the budget, and two runs sharing a bank would each keep their own ledger.
    With a ledger file the file is the ledger: every charge is a
    read-modify-write of the file under an exclusive ``fcntl.flock`` on
    ``<file>.lock``, written atomically (temporary file + ``os.replace``), mode
    0o600. A round is *reserved* (checked against the budget and recorded) under
    the lock before any step is taken, so two runs racing for the last bit of
    budget cannot both get it, and a run that crashes mid-round stays charged.
    The file also keeps ``runs``, one entry per charge (time, run, round, what it
    cost, epsilon after), for the data owner's audit. The file is per bank, not
    per run, so it accumulates over every run the bank takes part in, which is
    what a privacy budget means; deleting it is the data owner's decision.

    Parameters
    ----------
    path : path-like
        The ledger file; its folder is created (0o700) if missing.
    key : str
        The ``context.state`` key the ledger is mirrored under.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: str = SAMPLE_LEDGER_KEY,
        exclusive_with: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.exclusive_with = tuple(Path(p) for p in exclusive_with)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive lock of this ledger and of the ledgers it excludes.

        The locks are taken in path order, so two modes reserving at once cannot
        deadlock, and neither can slip a charge past the other's check.
        """
        paths = sorted({self.path, *self.exclusive_with})
        with contextlib.ExitStack() as stack:
            for path in paths:
                stack.enter_context(_flocked(path.with_name(path.name + ".lock")))
            yield

    def _check_siblings(self) -> None:
        """Refuse a charge when a ledger of the other DP mode (same bank) has charges.

        The two modes account different neighbouring relations (one customer row,
        one bank's whole contribution), so their spending cannot be composed into
        one budget; a bank that mixed them would hold two budgets at once. Called
        under :meth:`locked`.
        """
        for other in self.exclusive_with:
            if not other.is_file():
                continue
            values = LedgerFile(other)._read() or {}
            if values.get("steps"):
                raise PrivacyBudgetExhausted(
                    f"privacy ledger {other} already holds charges of the other DP mode; "
                    f"{self.path.name} and it cannot share one budget (different "
                    "neighbouring relations), so this bank refuses to mix DP modes in one "
                    "ledger-dir",
                    math.nan,
                    math.nan,
                    math.nan,
                )

    def _read(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            values = json.loads(self.path.read_text())
            if not isinstance(values, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise PrivacyConfigError(
                f"privacy ledger file {self.path} is unreadable ({err}); refusing to train "
                "rather than restart the budget at zero"
            ) from err
        return values

    def _write(self, values: Mapping[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:  # mkstemp creates the file 0o600: the ledger is the bank's private state
            with os.fdopen(fd, "w") as out:
                json.dump(values, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read(
        self, fallback: PrivacyLedger | None = None, accountant: str = "rdp", unit: str = "sample"
    ) -> PrivacyLedger:
        """The ledger in the file (``fallback`` or an empty one if there is no file yet)."""
        with self.locked():
            return self._ledger(fallback, accountant, unit)[0]

    def _ledger(
        self, fallback: PrivacyLedger | None, accountant: str, unit: str
    ) -> tuple[PrivacyLedger, list[Any]]:
        values = self._read()
        if values is None:  # first use of the file: start from what the state knew
            start = (
                fallback.copy() if fallback is not None else PrivacyLedger(accountant, unit=unit)
            )
            return start, []
        runs = values.get("runs", [])
        problems = _ledger_problems(values)
        if not isinstance(runs, list):
            problems.append("runs must be a list")
        if problems:
            raise PrivacyConfigError(
                f"privacy ledger file {self.path} is not a valid ledger ("
                + "; ".join(problems)
                + "); refusing to train rather than trust it"
            )
        return PrivacyLedger.from_values(values, accountant, unit), list(runs)

    def restore(self, state: RecordDict, accountant: str = "rdp", unit: str = "sample") -> None:
        """Mirror the file's ledger into ``state`` (the file wins over the state)."""
        fallback = (
            PrivacyLedger.load(state, self.key, accountant, unit) if self.key in state else None
        )
        self.read(fallback, accountant, unit).save(state, self.key)

    def reserve(
        self,
        ledger: PrivacyLedger,
        *,
        budget: float | None,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        note: Mapping[str, Any] | None = None,
    ) -> tuple[PrivacyLedger, PrivacyLedger]:
        """Charge a round before it runs; returns the ledger (before, after) the charge.

        Under the lock: read the file (``ledger`` is only the starting point when
        no file exists yet), refuse with :class:`PrivacyBudgetExhausted` if the
        round would exceed ``budget`` (nothing written), else record the
        ``steps`` and one round, append a ``runs`` entry, and write the file.
        """
        with self.locked():
            before, runs = self._ledger(ledger, ledger.accountant, ledger.unit)
            after = before.copy()
            self._check_siblings()
            projected = after.check_budget(budget, delta, noise_multiplier, sample_rate, steps)
            after.record(noise_multiplier, sample_rate, steps, delta)
            after.rounds += 1
            runs.append(
                {
                    "time": time.time(),
                    "pid": os.getpid(),
                    "steps": int(steps),
                    "noise-multiplier": float(noise_multiplier),
                    "sample-rate": float(sample_rate),
                    "delta": float(delta),
                    "delta-accounted": after.strictest_delta(delta),
                    "epsilon-after": projected,
                    **dict(note or {}),
                }
            )
            self._write({**after.values(), "runs": runs})
        return before, after

    def settle(
        self,
        extra_steps: int,
        *,
        noise_multiplier: float,
        sample_rate: float,
        accountant: str,
        unit: str,
    ) -> PrivacyLedger:
        """After a round: charge steps taken beyond the reservation (never a refund).

        Returns the file's ledger, which includes every other run's charges too.
        """
        with self.locked():
            ledger, runs = self._ledger(None, accountant, unit)
            if extra_steps > 0:
                ledger.record(noise_multiplier, sample_rate, extra_steps)
                runs.append(
                    {
                        "time": time.time(),
                        "pid": os.getpid(),
                        "steps": int(extra_steps),
                        "noise-multiplier": float(noise_multiplier),
                        "sample-rate": float(sample_rate),
                        "note": "steps taken beyond the reservation",
                    }
                )
                self._write({**ledger.values(), "runs": runs})
        return ledger

    def runs(self) -> list[dict[str, Any]]:
        """The charge history kept in the file (oldest first)."""
        with self.locked():
            values = self._read() or {}
        return list(values.get("runs", []))


def ledger_file_for(context: Any, key: str = SAMPLE_LEDGER_KEY) -> LedgerFile | None:
    """The ledger file of this node (node config ``ledger-dir``), or None if not configured.

    The file is named after the node's bank (``bank-index``, or the simulation's
    ``partition-id``), which stays the same when the SuperNode restarts. The
    DP-SGD and update-level ledgers of one bank exclude each other: once one has
    charges, the other mode is refused (:meth:`LedgerFile._check_siblings`).
    """
    node = context.node_config
    directory = str(node.get("ledger-dir", ""))
    if not directory:
        return None
    if "bank-index" in node:
        ident = f"bank-{node['bank-index']}"
    elif "partition-id" in node:
        ident = f"partition-{node['partition-id']}"
    else:
        raise PrivacyConfigError(
            "node config sets ledger-dir but neither bank-index nor partition-id, so the "
            "ledger file cannot be tied to this bank across restarts"
        )
    others = [k for k in (SAMPLE_LEDGER_KEY, UPDATE_LEDGER_KEY) if k != key]
    return LedgerFile(
        Path(directory) / f"{ident}.{key}.json",
        key,
        exclusive_with=[Path(directory) / f"{ident}.{k}.json" for k in others],
    )


@contextlib.contextmanager
def _flocked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------- bank policy
#: ``Error.code`` of a train reply the bank refuses under its own privacy policy (node
#: config), or because its update is not finite: nothing is sent.
PRIVACY_POLICY_ERROR_CODE = 4101

#: What node config ``dp-required`` accepts.
DP_REQUIREMENTS = ("none", "any", "dp-sgd", "update")


class PrivacyPolicyViolation(RuntimeError):
    """The run's DP settings break the bank's own policy: the bank does not train."""


@dataclass(frozen=True)
class BankDPPolicy:
    """The bank's own DP floor, from its node config; it always wins over the run config.

    The run config is written by whoever submits the run (the server side); a bank
    that must keep its own guarantee sets, in its SuperNode's node config:

    ``dp-required``
        ``"none"`` (default), ``"any"`` (or ``true``: some DP mode), ``"dp-sgd"``
        or ``"update"``: a run whose ``dp`` is off, or another mode, is refused
        (the modes protect different units, neither is "stronger").
    ``dp-epsilon-budget``
        The bank's own cap: the enforced budget is ``min(run's, bank's)``, also
        for a run that sets no budget at all.
    ``dp-max-delta``
        A run asking for a larger ``dp-delta`` is refused.

    Flower types node config values from the command line (``dp-max-delta=1e-5``
    is a float); numeric strings and bools are refused as numbers.
    """

    required: str = "none"
    epsilon_budget: float | None = None
    max_delta: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.required not in DP_REQUIREMENTS:
            problems.append(f"dp-required must be one of {DP_REQUIREMENTS}, got {self.required!r}")
        problems += _within("dp-epsilon-budget", self.epsilon_budget, EPSILON_BOUNDS)
        problems += _within("dp-max-delta", self.max_delta, DELTA_BOUNDS)
        if problems:
            raise PrivacyConfigError("invalid node config: " + "; ".join(problems))

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> BankDPPolicy:
        """The policy in a node config (keys ``dp-required``, ``dp-epsilon-budget``,
        ``dp-max-delta``); every key absent is no constraint."""
        required = node.get("dp-required", "none")
        if isinstance(required, bool):
            required = "any" if required else "none"
        elif isinstance(required, str):
            text = required.strip().lower()
            required = {"true": "any", "false": "none", "off": "none", "": "none"}.get(text, text)
        budget = (
            _run_float(node, "dp-epsilon-budget", 0.0, "node config")
            if "dp-epsilon-budget" in node
            else None
        )
        max_delta = (
            _run_float(node, "dp-max-delta", 0.0, "node config") if "dp-max-delta" in node else None
        )
        return cls(required=str(required), epsilon_budget=budget, max_delta=max_delta)

    def apply(
        self, cfg: DPSGDConfig | UpdateDPConfig | None
    ) -> DPSGDConfig | UpdateDPConfig | None:
        """The run's settings tightened by this policy; raises if they break it.

        Raises
        ------
        PrivacyPolicyViolation
            DP off or the wrong mode where the bank requires one, or a larger delta.
        """
        mode = "off" if cfg is None else "update" if isinstance(cfg, UpdateDPConfig) else "dp-sgd"
        if self.required != "none" and (cfg is None or self.required not in ("any", mode)):
            raise PrivacyPolicyViolation(
                f"bank privacy policy: node config dp-required='{self.required}' but the run "
                f"config has dp='{mode}'; this bank does not train without it"
            )
        if cfg is None:
            return None
        if self.max_delta is not None and cfg.delta > self.max_delta:
            raise PrivacyPolicyViolation(
                f"bank privacy policy: the run config's dp-delta {cfg.delta:g} exceeds the "
                f"node config's dp-max-delta {self.max_delta:g}; this bank does not train"
            )
        if self.epsilon_budget is not None:
            budget = cfg.budget
            capped = self.epsilon_budget if budget is None else min(budget, self.epsilon_budget)
            cfg = replace(cfg, epsilon_budget=capped)
        return cfg


def bank_privacy(
    context: Any, cfg: DPSGDConfig | UpdateDPConfig | None
) -> DPSGDConfig | UpdateDPConfig | None:
    """The run's DP settings after the bank's node-config policy (:class:`BankDPPolicy`)."""
    return BankDPPolicy.from_node_config(context.node_config).apply(cfg)


def policy_refusal(msg: Message, reason: str) -> Message:
    """The reply of a bank that refuses to train or send under its own privacy policy."""
    return Message(Error(code=PRIVACY_POLICY_ERROR_CODE, reason=reason), reply_to=msg)


def budget_refusal(msg: Message, err: PrivacyBudgetExhausted) -> Message:
    """The reply of a client that will not train: an error the server audits as rejected."""
    return Message(Error(code=PRIVACY_BUDGET_ERROR_CODE, reason=err.reason), reply_to=msg)


def is_budget_refusal(reason: str) -> bool:
    """Whether a rejection reason recorded by the server is a budget refusal."""
    return f"client error {PRIVACY_BUDGET_ERROR_CODE}:" in reason or reason.startswith(
        "privacy budget exhausted"
    )


def is_privacy_refusal(reason: str) -> bool:
    """A budget refusal, or a bank refusing under its own privacy policy (error 4101)."""
    return is_budget_refusal(reason) or f"client error {PRIVACY_POLICY_ERROR_CODE}:" in reason


# --------------------------------------------------------------------------- server helpers
_REPORT_FIELDS = {
    "dp-epsilon": "epsilon",
    "dp-delta": "delta",
    "dp-noise-multiplier": "noise_multiplier",
    "dp-max-grad-norm": "max_grad_norm",
    "dp-sample-rate": "sample_rate",
    "dp-steps": "steps",
}


def round_privacy(
    client_metrics: Mapping[int, Mapping[str, Any]],
    rejected: Mapping[int, str],
    labels: Mapping[int, str],
) -> dict[str, dict[str, Any]]:
    """Per-client privacy of one round, keyed by label (node id if none).

    Clients whose reply carried ``dp-*`` metrics get ``{epsilon, delta,
    noise_multiplier, max_grad_norm, sample_rate, steps}``; clients that refused
    for budget or under their own privacy policy get ``{"refused": reason}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for node, metrics in client_metrics.items():
        if "dp-epsilon" not in metrics:
            continue
        name = labels.get(node) or str(node)
        out[name] = {new: metrics[old] for old, new in _REPORT_FIELDS.items() if old in metrics}
    for node, reason in rejected.items():
        if is_privacy_refusal(reason):
            out[labels.get(node) or str(node)] = {"refused": reason}
    return out


#: Reply metrics that describe a bank's privacy: a weighted mean of them is no privacy
#: quantity (the federation's guarantee is the worst bank's), so they are aggregated by max.
PRIVACY_METRIC_KEYS = ("dp-epsilon", "dp-delta", "dp-steps")


def privacy_train_metrics_aggr_fn(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """A ``train_metrics_aggr_fn`` that reports privacy as the worst bank's, not a mean.

    Ordinary metrics get Flower's weighted mean (``aggregate_metricrecords``);
    each of :data:`PRIVACY_METRIC_KEYS` is replaced by ``<key>-max``, its maximum
    over the replies (e.g. ``dp-epsilon-max``: the largest epsilon any bank has
    spent), and the other ``dp-*`` settings (noise multiplier, clip, sample
    rate) by their max too, named the same way. Pass it to any Flower strategy:
    ``FedAvg(train_metrics_aggr_fn=privacy_train_metrics_aggr_fn)``.
    """
    plain: list[RecordDict] = []
    worst: dict[str, float] = {}
    for record in records:
        content = RecordDict()
        for name, item in record.items():
            if isinstance(item, MetricRecord):
                kept = MetricRecord()
                for key, value in item.items():
                    if key.startswith("dp-") and isinstance(value, int | float):
                        worst[f"{key}-max"] = max(worst.get(f"{key}-max", -math.inf), value)
                    else:
                        kept[key] = value
                content[name] = kept
            else:
                content[name] = item
        plain.append(content)
    out = aggregate_metricrecords(plain, weighting_key) if plain else MetricRecord()
    for key, value in worst.items():
        out[key] = value
    return out


__all__ = [
    "ACCOUNTANTS",
    "CLIP_BOUNDS",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "DELTA_BOUNDS",
    "DP_MODES",
    "DP_REQUIREMENTS",
    "EPSILON_BOUNDS",
    "GRAD_SAMPLE_MODES",
    "METRIC_KEYS",
    "NOISE_BOUNDS",
    "PRIVACY_BUDGET_ERROR_CODE",
    "PRIVACY_METRIC_KEYS",
    "PRIVACY_POLICY_ERROR_CODE",
    "SAMPLE_LEDGER_KEY",
    "UPDATE_LEDGER_KEY",
    "UPDATE_LEDGER_UNIT",
    "UPDATE_SENSITIVITY",
    "BankDPPolicy",
    "DPSGDConfig",
    "LedgerFile",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "PrivacyLedger",
    "PrivacyPolicyViolation",
    "UpdateDPConfig",
    "bank_privacy",
    "budget_refusal",
    "is_budget_refusal",
    "is_privacy_refusal",
    "ledger_file_for",
    "policy_refusal",
    "privacy_config_from_run_config",
    "privacy_train_metrics_aggr_fn",
    "round_privacy",
]
