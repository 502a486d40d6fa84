"""Differential privacy for a bank's local training: DP-SGD (Opacus) with a ledger that lasts.

Two mechanisms, two threats:

* **DP-SGD (sample level)**, :func:`make_private`: every optimizer step clips each
  customer's gradient to ``max_grad_norm`` and adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm``; batches are drawn by Poisson sampling
  (each row independently with probability ``q = batch_size / N``), as the
  analysis of Abadi et al. (CCS 2016) and Mironov et al. (RDP, 2019) assumes.
  *Guarantee:* (epsilon, delta)-DP per bank with respect to adding or removing
  one customer row of that bank's training data, for the model updates the
  bank sends over all rounds (and anything computed from them, e.g. the final
  model), against the server, the other banks and whoever gets the model,
  provided the noise and the batches cannot be predicted (see below). *Not*
  covered: values released in clear next to the updates (the row count, the
  standardisation moments, evaluation metrics on held-out rows: declared
  public in the README), a customer with many rows as a whole (the unit is one
  row), and nothing holds once the budget is reset or the ledger lost.
* **Update level (client level)**, :func:`privatize_update`: the bank clips its
  whole update ``local - global`` to L2 norm ``clip_norm`` and adds
  ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate before it
  leaves the bank (local, no trust in the server). *Guarantee:* per round a
  Gaussian mechanism over the bank's update with neighbouring relation
  "replace the bank's whole contribution by any other" (sensitivity
  ``2 * clip_norm``: two clipped updates can lie ``2C`` apart), so the ledger
  accounts each release at noise multiplier ``noise_multiplier / 2``, composed
  over rounds with sample rate 1. It protects only what the update reveals:
  the bank's row count, its standardisation moments and its evaluation
  metrics are sent in clear and are outside the guarantee (README).

Noise nobody else can predict: unless Opacus's ``secure_mode`` is on (it needs
torchcsprng), every DP-SGD round draws its Gaussian noise *and* its Poisson
batches from a fresh ``torch.Generator`` seeded with 64 bits from the OS
CSPRNG (:func:`secure_torch_generator`), and every update-level release draws
from a fresh PCG64 seeded with 128 bits (:func:`secure_numpy_generator`). These
never touch the run seed or torch's global generator, so the server, which
knows the run config, cannot replay them, and no two banks share a stream; the
seed still makes everything else (initial model, splits) reproducible. Opacus
warns "Secure RNG turned off" because the draws themselves are Mersenne
Twister / PCG output, not CSPRNG output, and the floating-point attack on
Gaussian sampling (Mironov, CCS 2012) is only mitigated in ``secure_mode``;
the warning is left visible on purpose.

The privacy ledger (:class:`PrivacyLedger`) is what Flower's Opacus example
lacks: it keeps the accountant's full history ``[(noise_multiplier,
sample_rate, steps), ...]`` in ``context.state``, rebuilds an Opacus
accountant from it each round and lets Opacus step it, so the epsilon
reported after round r is the composition over every step the bank has taken,
and a round that would overspend the budget is refused *before* any step.

Grad-sample modes: ``"ew"`` (expanded weights) with :class:`FlatClipDPOptimizer`
is the default, the fastest mode that matches a one-sample-at-a-time reference
on the bank model (``benchmarks/bench_dp_speed.py``); models with an
``nn.Embedding``, whose integer inputs ``ew`` cannot expand, are switched to
``"hooks"``. ``"ew"`` cannot run an empty Poisson batch, which is handled by a
noise-only step (still one accounted step, as in DP-SGD's analysis);
``"hooks"`` and ``"functorch"`` are correct but slower; ``"ghost"`` (fast
gradient clipping) computes wrong gradients when the per-sample loss is not
one value per row (e.g. (B, 1) logits against (B, 1) targets broadcast the
clip coefficients), so the loss it wraps is checked and rejected unless
shaped (B,).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import secrets
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

# Opacus calls logging.basicConfig() when imported, which adds a handler to the
# root logger and makes every Flower log line print twice; undo just that.
_root_handlers = list(logging.getLogger().handlers)
from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.accountant import IAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.optimizers.optimizer import _mark_as_processed  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from .training import TrainConfig, make_loader  # noqa: E402

for _handler in logging.getLogger().handlers[:]:
    if _handler not in _root_handlers:
        logging.getLogger().removeHandler(_handler)

logger = logging.getLogger(__name__)

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
    if value is None or (math.isfinite(value) and value > 0):
        return []
    return [f"{name} must be a finite number > 0, got {value}"]


def _noise_problems(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    accountant: str,
) -> list[str]:
    """What is wrong with the noise settings both DP configurations share.

    A noise multiplier of 0 is refused: it is no privacy at all, and the
    accountants answer it with an overflow (PRV) or an infinite epsilon (RDP).
    """
    problems = []
    if (noise_multiplier is None) == (target_epsilon is None):
        problems.append("give exactly one of noise_multiplier and target_epsilon")
    problems += _positive("noise_multiplier", noise_multiplier)
    problems += _positive("target_epsilon", target_epsilon)
    if not 0 < delta < 1:
        problems.append(f"delta must be in (0, 1), got {delta}")
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
        What one "neighbour" differs by: ``"sample"`` (DP-SGD) or ``"client"``.
    """

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    rounds: int = 0
    unit: str = "sample"

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
        """The ledger held in ``values`` (the fields :meth:`values` writes).

        A ledger kept under the older add/remove relation for update-level DP
        (unit ``"client"``, sensitivity C) is converted to the replace relation
        (unit ``"bank-replace"``, sensitivity 2C) by halving its noise
        multipliers, which is exactly what those releases cost under it.
        """
        stored = str(values.get("accountant", accountant))
        if stored != accountant:
            raise PrivacyConfigError(
                f"the privacy ledger was kept with the '{stored}' accountant; switching to "
                f"'{accountant}' mid-run would restart the accounting"
            )
        sigmas = [float(v) for v in values.get("noise-multiplier", [])]
        rates = [float(v) for v in values.get("sample-rate", [])]
        steps = [int(v) for v in values.get("steps", [])]
        stored_unit = str(values.get("unit", unit))
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
            rounds=int(values.get("rounds", 0)),
            unit=stored_unit,
        )

    def values(self) -> dict[str, Any]:
        """The ledger as plain values (what :meth:`save` and :class:`LedgerFile` store)."""
        return {
            "accountant": self.accountant,
            "unit": self.unit,
            "rounds": self.rounds,
            "noise-multiplier": [float(h[0]) for h in self.history],
            "sample-rate": [float(h[1]) for h in self.history],
            "steps": [int(h[2]) for h in self.history],
        }

    def copy(self) -> PrivacyLedger:
        return PrivacyLedger(
            self.accountant, [tuple(h) for h in self.history], self.rounds, self.unit
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

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before the first step)."""
        return _epsilon(self.accountant, self.history, delta)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` steps, merged into the last entry as Opacus does."""
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
        return _epsilon(self.accountant, history, delta)

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
                f"(delta={delta:g}, {self.unit}-level, {self.accountant}); the next round "
                f"({steps} steps, noise multiplier {noise_multiplier:.4g}, sample rate "
                f"{sample_rate:.4g}) would reach {projected:.4g}, so this client does not train"
            )
            raise PrivacyBudgetExhausted(reason, spent, projected, budget)
        return projected


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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order.*")
        return float(get_noise_multiplier(**kwargs))


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
        problems += _positive("max_grad_norm", self.max_grad_norm)
        if self.rounds < 1 or self.local_epochs < 1:
            problems.append("rounds and local_epochs must be >= 1")
        problems += _positive("epsilon_budget", self.epsilon_budget)
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
        return float(
            _quiet_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=sample_rate,
                steps=total,
                accountant=self.accountant,
            )
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
            self.noise_multiplier, self.target_epsilon, self.delta, self.accountant
        )
        problems += _positive("clip_norm", self.clip_norm)
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        problems += _positive("epsilon_budget", self.epsilon_budget)
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


def _run_float(cfg: Mapping[str, Any], key: str, default: float) -> float:
    value = cfg.get(key, default)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise PrivacyConfigError(f"run config {key} must be a number, got {value!r}") from err
    if not math.isfinite(out):
        raise PrivacyConfigError(f"run config {key} must be finite, got {value!r}")
    return out


def privacy_config_from_run_config(
    cfg: Mapping[str, Any], rounds: int, local_epochs: int
) -> DPSGDConfig | UpdateDPConfig | None:
    """The DP settings of a Flower run config (keys ``dp``, ``dp-*``); None when off.

    ``dp-target-epsilon`` > 0 picks the noise for the whole run; 0 (the app's
    default, meaning "not set") uses ``dp-noise-multiplier``, which must then
    be > 0. ``dp-epsilon-budget`` > 0 is the enforced budget; 0 means the target
    epsilon (or none). Every impossible value is refused here, before any
    training, with the run-config key named.

    Raises
    ------
    PrivacyConfigError
        Naming every bad ``dp-*`` key and value.
    """
    mode = str(cfg.get("dp", "off"))
    if mode not in DP_MODES:
        raise PrivacyConfigError(f"dp must be one of {DP_MODES}, got '{mode}'")
    if mode == "off":
        return None
    target = _run_float(cfg, "dp-target-epsilon", 0.0)
    budget = _run_float(cfg, "dp-epsilon-budget", 0.0)
    sigma = _run_float(cfg, "dp-noise-multiplier", 1.0)
    delta = _run_float(cfg, "dp-delta", 1e-5)
    norm = _run_float(cfg, "dp-max-grad-norm", 1.0)
    accountant = str(cfg.get("dp-accountant", "rdp"))
    mode_name = str(cfg.get("dp-grad-sample-mode", DEFAULT_GRAD_SAMPLE_MODE))
    problems = []
    if target < 0:
        problems.append(
            f"dp-target-epsilon must be > 0 (or 0 to use dp-noise-multiplier), got {target:g}"
        )
    if target == 0 and not sigma > 0:
        problems.append(
            f"dp-noise-multiplier must be > 0 when dp-target-epsilon is not set, got {sigma:g} "
            "(0 would be no privacy at all)"
        )
    if budget < 0:
        problems.append(f"dp-epsilon-budget must be > 0 (or 0 for none), got {budget:g}")
    if not 0 < delta < 1:
        problems.append(f"dp-delta must be in (0, 1), got {delta:g}")
    if not norm > 0:
        problems.append(f"dp-max-grad-norm must be > 0, got {norm:g}")
    if accountant not in ACCOUNTANTS:
        problems.append(f"dp-accountant must be one of {ACCOUNTANTS}, got '{accountant}'")
    if mode == "dp-sgd" and mode_name not in GRAD_SAMPLE_MODES:
        problems.append(
            f"dp-grad-sample-mode must be one of {GRAD_SAMPLE_MODES}, got '{mode_name}'"
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


# --------------------------------------------------------------------------- DP-SGD
@dataclass
class PrivacyReport:
    """What a round of private training spent; ``as_metrics()`` goes in the reply."""

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    total_steps: int
    accountant: str
    unit: str = "sample"

    def as_metrics(self) -> dict[str, float | int]:
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-noise-multiplier": self.noise_multiplier,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-sample-rate": self.sample_rate,
            "dp-steps": self.total_steps,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _GhostLossGuard:
    """Wraps Opacus's ghost-clipping loss: per-sample losses must be shaped (B,).

    With (B, 1) logits and (B, 1) targets the per-sample loss is (B, 1) and
    Opacus multiplies it by (B,) clip coefficients, broadcasting to (B, B): the
    gradients are silently wrong. We refuse that shape with a clear message.
    """

    def __init__(self, dp_loss: Callable[..., Any]) -> None:
        self.dp_loss = dp_loss

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.dp_loss(*args, **kwargs)
        per_sample = out.loss_per_sample
        if per_sample.dim() != 1:
            raise PrivacyConfigError(
                "ghost clipping needs one loss per row, shape (B,); got "
                f"{tuple(per_sample.shape)}. Flatten logits and targets (e.g. "
                "logits.reshape(-1), y.reshape(-1)) or use grad_sample_mode='hooks'"
            )
        return out


@dataclass
class PrivateTraining:
    """The private counterparts of the user's model, optimizer and loader (+ accounting).

    Train with :attr:`module`, :attr:`optimizer` and :attr:`data_loader` as
    usual (or :func:`train_private_epochs`), evaluate inside
    :meth:`evaluating`, then call :meth:`finish` to write the steps taken into
    the ledger and get the :class:`PrivacyReport`.
    """

    module: nn.Module
    optimizer: Any  # opacus DPOptimizer
    data_loader: DataLoader
    criterion: Callable[..., Any] | None
    ledger: PrivacyLedger
    accountant: IAccountant
    config: DPSGDConfig
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    planned_epsilon: float
    original_module: nn.Module
    mode: str = DEFAULT_GRAD_SAMPLE_MODE
    planned_steps: int = 0
    ledger_file: LedgerFile | None = None
    default_criterion: bool = True
    _finished: bool = False

    @property
    def grad_sample_mode(self) -> str:
        """The per-sample-gradient mode in use (``"ew"`` may have become ``"hooks"``)."""
        return self.mode

    def epsilon(self) -> float:
        """Epsilon including the steps taken so far this round."""
        return _epsilon(self.ledger.accountant, self.accountant.history, self.config.delta)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """Eval mode, no grad, per-sample hooks off; training state restored after."""
        was_training = self.module.training
        hooks_off = getattr(self.module, "disable_hooks", None)
        hooks_on = getattr(self.module, "enable_hooks", None)
        self.module.eval()
        if hooks_off is not None:
            hooks_off()
        try:
            with torch.no_grad():
                yield self.original_module
        finally:
            if hooks_on is not None:
                hooks_on()
            self.module.train(was_training)

    def finish(self) -> PrivacyReport:
        """Record the round's steps in the ledger, detach Opacus from the user's model."""
        steps_before = self.ledger.total_steps
        if not self._finished:
            self.ledger.absorb(self.accountant)
            self.ledger.rounds += 1
            self._finished = True
            if self.ledger_file is not None:  # the file holds the reservation (and others')
                taken = self.ledger.total_steps - steps_before
                settled = self.ledger_file.settle(
                    taken - self.planned_steps,
                    noise_multiplier=self.noise_multiplier,
                    sample_rate=self.sample_rate,
                    accountant=self.ledger.accountant,
                    unit=self.ledger.unit,
                )
                self.ledger.history, self.ledger.rounds = settled.history, settled.rounds
                steps_before = self.ledger.total_steps - taken
            cleanup = getattr(self.module, "_close", None) or getattr(
                self.module, "remove_hooks", None
            )
            if cleanup is not None:
                with contextlib.suppress(Exception):
                    cleanup()
            for p in self.original_module.parameters():
                for attr in ("grad_sample", "_current_grad_sample", "_forward_counter"):
                    if hasattr(p, attr):
                        with contextlib.suppress(AttributeError):
                            delattr(p, attr)
        total = self.ledger.total_steps
        return PrivacyReport(
            epsilon=self.ledger.epsilon(self.config.delta),
            delta=self.config.delta,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            sample_rate=self.sample_rate,
            steps=total - steps_before,
            total_steps=total,
            accountant=self.ledger.accountant,
        )


def check_module(module: nn.Module, fix: bool = False) -> nn.Module:
    """Opacus's ModuleValidator: a clear error for layers DP-SGD cannot handle.

    With ``fix=True`` the model is repaired by ``ModuleValidator.fix`` (e.g.
    BatchNorm -> GroupNorm) and the fixed model returned. That changes its
    architecture: build the optimizer from the fixed model, and have the server
    and every bank use the same fixed definition (``make_private`` only
    validates, it never swaps the model under the user's optimizer).
    """
    errors = ModuleValidator.validate(module, strict=False)
    if not errors:
        return module
    if fix:
        fixed = ModuleValidator.fix(module)
        remaining = ModuleValidator.validate(fixed, strict=False)
        if not remaining:
            return fixed
        errors = remaining
    listed = "; ".join(str(e) for e in errors)
    raise PrivacyConfigError(
        f"the model cannot be trained with DP-SGD as is: {listed}. Per-sample gradients "
        "need layers that never mix samples of a batch (no BatchNorm; use GroupNorm or "
        "LayerNorm), or pass fix_module=True to use opacus ModuleValidator.fix (then the "
        "server and every bank must use the fixed model)"
    )


def poisson_loader(
    dataset: TensorDataset, sample_rate: float, generator: torch.Generator | None = None
) -> DataLoader:
    """Poisson-sampled batches of a TensorDataset fetched with one indexing op per batch.

    Same sampler as Opacus's ``DPDataLoader`` (``UniformWithReplacementSampler``,
    ``1/q`` batches per epoch, each row in each batch with probability ``q``;
    an empty batch comes out as tensors of shape (0, ...)), without its
    per-row ``__getitem__`` + collate cost.
    """
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator
    )
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def secure_torch_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with 64 bits from the OS CSPRNG.

    Independent of the run seed and of torch's global generator, and different
    for every call, so no other party can replay what it draws.
    """
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(secrets.randbits(64))
    return generator


def secure_numpy_generator() -> np.random.Generator:
    """A fresh NumPy PCG64 generator seeded with 128 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def resolve_grad_sample_mode(module: nn.Module, mode: str) -> str:
    """``mode``, except ``"ew"`` becomes ``"hooks"`` for models with embeddings.

    PyTorch's expanded weights need a float input with a batch dimension; an
    ``nn.Embedding`` fed a 1-D index column fails with "Expanded Weights needs
    an input with a batch size", where Opacus's hooks work.
    """
    if mode == "ew" and any(
        isinstance(m, nn.Embedding | nn.EmbeddingBag) for m in module.modules()
    ):
        logger.info("DP-SGD: the model has an embedding, so per-sample gradients use 'hooks'")
        return "hooks"
    return mode


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    config: DPSGDConfig,
    ledger: PrivacyLedger,
    criterion: Callable[..., Any] | None = None,
    noise_generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
    ledger_file: LedgerFile | None = None,
    note: Mapping[str, Any] | None = None,
) -> PrivateTraining:
    """Make one round of a client's local training DP-SGD, charged to ``ledger``.

    Like ``opacus.PrivacyEngine.make_private`` (it calls it), on the user's own
    model, optimizer and loader, with these differences: the accountant starts
    from the ledger's history (cumulative epsilon across rounds); the round is
    refused with :class:`PrivacyBudgetExhausted` *before* any step when its
    planned steps (``local_epochs x 1/q``) would push epsilon past the budget;
    the noise and the Poisson batches come from generators seeded from the OS
    CSPRNG (unpredictable by the server, independent of any seed); and the
    model is checked (:func:`check_module`) with a clear error.

    The sample rate is ``1 / len(data_loader)`` (``batch_size / N``), as in Opacus.
    A ``TensorDataset`` gets :func:`poisson_loader`, others Opacus's
    ``DPDataLoader``. Parameters are trained in place: ``module`` keeps the
    result after :meth:`PrivateTraining.finish`.

    Parameters
    ----------
    module, optimizer, data_loader
        The user's own model, optimizer and (non-private) loader.
    config : DPSGDConfig
    ledger : PrivacyLedger
        The bank's ledger; updated in place by :meth:`PrivateTraining.finish`.
    criterion : callable, optional
        The loss, needed only by ``grad_sample_mode="ghost"`` (default binary
        log-loss on logits).
    noise_generator, sampling_generator : torch.Generator, optional
        Only for tests that must reproduce a run: a generator anyone can
        seed voids the guarantee against whoever knows the seed. Default: a
        fresh :func:`secure_torch_generator` each (Opacus's own secure RNG
        with ``config.secure_mode``).
    ledger_file : LedgerFile, optional
        The ledger on disk: the round is reserved in it under its lock before
        any step, and the ledger is replaced by the file's (which also holds
        other runs' charges).
    note : mapping, optional
        Added to the file's ``runs`` entry for this round (run id, round).

    Raises
    ------
    PrivacyBudgetExhausted
        Before any step, if the round would exceed the budget.
    PrivacyConfigError
        For a model, loader or setting DP-SGD cannot use.
    """
    if config.accountant != ledger.accountant:
        raise PrivacyConfigError(
            f"config accountant '{config.accountant}' differs from the ledger's "
            f"'{ledger.accountant}'"
        )
    if config.secure_mode and (noise_generator is not None or sampling_generator is not None):
        raise PrivacyConfigError("secure_mode draws from Opacus's own CSPRNG: pass no generator")
    check_module(module)  # a clear error; fixing changes the model, see check_module
    mode = resolve_grad_sample_mode(module, config.grad_sample_mode)
    steps_per_epoch = len(data_loader)
    if steps_per_epoch < 1:
        raise PrivacyConfigError("the data loader is empty")
    sample_rate = 1.0 / steps_per_epoch
    sigma = config.noise_for(sample_rate, steps_per_epoch)
    planned = config.local_epochs * steps_per_epoch
    # Opacus warns "Secure RNG turned off" without secure_mode: left visible on purpose,
    # since our generators are CSPRNG-seeded but their draws are not CSPRNG output.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        try:
            engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        except ImportError as err:
            raise PrivacyConfigError(
                f"secure_mode needs torchcsprng ({err}); without secure_mode flower-ext "
                "already draws noise and batches from CSPRNG-seeded generators"
            ) from err
    if ledger_file is not None:  # charged on disk, under the lock, before any step
        before, _ = ledger_file.reserve(
            ledger,
            budget=config.budget,
            delta=config.delta,
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=planned,
            note=note,
        )
        ledger.history, ledger.rounds = before.history, before.rounds
    projected = ledger.check_budget(config.budget, config.delta, sigma, sample_rate, planned)
    if not config.secure_mode:
        first = next(iter(module.parameters()), None)
        device = first.device if first is not None else None
        if noise_generator is None:
            noise_generator = secure_torch_generator(device)
        if sampling_generator is None:
            sampling_generator = secure_torch_generator()

    engine.accountant = ledger.make_accountant()
    loss = criterion if criterion is not None else nn.BCEWithLogitsLoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        out = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            criterion=loss,
            noise_multiplier=sigma,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            noise_generator=noise_generator,
        )
    if mode == "ghost":
        wrapped, dp_optimizer, dp_criterion, dp_loader = out
        dp_criterion = _GhostLossGuard(dp_criterion)
    else:
        wrapped, dp_optimizer, dp_loader = out
        dp_criterion = criterion
    if config.fused_clipping and type(dp_optimizer) is DPOptimizer and not config.secure_mode:
        dp_optimizer.__class__ = FlatClipDPOptimizer  # same state, fewer kernel launches
    if not config.secure_mode:
        if isinstance(data_loader.dataset, TensorDataset):
            dp_loader = poisson_loader(data_loader.dataset, sample_rate, sampling_generator)
        else:  # Opacus's DPDataLoader would sample from the loader's (seeded) generator
            dp_loader.batch_sampler.generator = sampling_generator  # type: ignore[union-attr]
    return PrivateTraining(
        module=wrapped,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        criterion=dp_criterion,
        ledger=ledger,
        accountant=engine.accountant,
        config=config,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        planned_epsilon=projected,
        original_module=module,
        mode=mode,
        planned_steps=planned,
        ledger_file=ledger_file,
        default_criterion=criterion is None,
    )


class FlatClipDPOptimizer(DPOptimizer):
    """Opacus's flat-clipping ``DPOptimizer`` with clipping and noise done in one pass each.

    Same maths as the parent: per-sample norms over all parameters, clip factor
    ``min(1, C / (norm + 1e-6))``, clipped sum, then ``N(0, (sigma C)^2)`` noise.
    The parent loops over parameter tensors (about 25 small ops per step for the
    bank MLP); here the per-sample gradients are concatenated into one (B, D)
    matrix, clipped and summed with one matrix-vector product, and the noise is
    drawn in one call. On small models, where per-op overhead dominates, this
    is what brings DP-SGD under 2x plain training (benchmarks/bench_dp_speed.py).
    Checked against a one-sample-at-a-time reference in tests/test_privacy.py.
    Not used with secure_mode (Opacus's secure noise path is kept intact).
    """

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        batch = samples[0].shape[0] if samples else 0
        if batch == 0:
            super().clip_and_accumulate()
            return
        flat = torch.cat([g.reshape(batch, -1) for g in samples], dim=1)
        norms = torch.linalg.vector_norm(flat, dim=1)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        summed = factor.to(flat.dtype) @ flat
        offset = 0
        for p in self.params:
            grad = summed[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        total = sum(p.numel() for p in self.params)
        std = self.noise_multiplier * self.max_grad_norm
        first = self.params[0].summed_grad
        noise = torch.normal(
            0.0,
            std,
            size=(total,),
            device=first.device,
            dtype=first.dtype,
            generator=self.generator,
        )
        offset = 0
        for p in self.params:
            p.grad = (p.summed_grad + noise[offset : offset + p.numel()].view_as(p)).view_as(p)
            offset += p.numel()
            _mark_as_processed(p.summed_grad)


def _noise_only_step(private: PrivateTraining) -> None:
    """An empty Poisson batch still costs (and takes) a step: zero gradient + noise."""
    for p in private.optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


#: Batch keys tried, in order, for the model input and the target of a dict batch.
INPUT_KEYS = ("img", "image", "x", "features", "input", "inputs", "pixel_values")
TARGET_KEYS = ("label", "labels", "y", "target", "targets", "fine_label")


def split_batch(
    batch: Any, input_key: str | None = None, target_key: str | None = None
) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch: an ``(x, y)`` pair or a dict.

    Dict batches (Flower's examples: ``batch["img"]``, ``batch["label"]``) use
    ``input_key`` / ``target_key`` when given, else the first of
    :data:`INPUT_KEYS` / :data:`TARGET_KEYS` present.

    Raises
    ------
    PrivacyConfigError
        Naming the batch's type or keys when neither form fits.
    """
    if isinstance(batch, Mapping):
        keys = list(batch.keys())
        x_key = input_key or next((k for k in INPUT_KEYS if k in batch), None)
        y_key = target_key or next((k for k in TARGET_KEYS if k in batch), None)
        if x_key not in batch or y_key not in batch:
            raise PrivacyConfigError(
                f"dict batch with keys {keys}: cannot tell the model input and the target; "
                "pass input_key= and target_key= (or batch_to_xy=) to train_private_epochs"
            )
        return batch[x_key], batch[y_key]
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise PrivacyConfigError(
        f"a batch must be an (inputs, targets) pair or a dict, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
        + "; pass batch_to_xy= to train_private_epochs to split it"
    )


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for (B, K > 1) logits and class indices; else binary log-loss on logits."""
    if outputs.dim() >= 2 and outputs.shape[-1] > 1:
        return nn.functional.cross_entropy(outputs, targets.long())
    return nn.functional.binary_cross_entropy_with_logits(
        outputs.reshape(-1), targets.reshape(-1).to(outputs.dtype)
    )


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else 1
    if isinstance(x, list | tuple) and x and isinstance(x[0], torch.Tensor):
        return _rows(x[0])
    return len(x)


def train_private_epochs(
    private: PrivateTraining,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    *,
    batch_to_xy: Callable[[Any], tuple[Any, torch.Tensor]] | None = None,
    input_key: str | None = None,
    target_key: str | None = None,
) -> float:
    """DP-SGD passes over ``private.data_loader``; returns the mean training loss.

    Parameters
    ----------
    private : PrivateTraining
        From :func:`make_private`.
    epochs : int, optional
        Default: the config's ``local_epochs`` (what the round was charged for).
    proximal_mu : float
        FedProx coefficient. Its gradient ``mu (w - w_global)`` does not depend
        on the data: it is added after clipping and noise, at no privacy cost
        (Opacus would silently drop it from a loss, as it only uses per-sample grads).
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> scalar``, the batch *mean* (reduction
        ``"mean"``, which is how Opacus scales per-sample gradients), e.g.
        ``nn.CrossEntropyLoss()``. Default :func:`default_loss`: cross-entropy
        for multi-class logits, binary log-loss otherwise. With
        ``grad_sample_mode="ghost"`` the loss is the ``criterion`` given to
        :func:`make_private` instead.
    batch_to_xy : callable, optional
        ``batch -> (inputs, targets)``; default :func:`split_batch` (pairs and
        dicts). Tuple inputs are passed to the model as ``model(*inputs)``.
    input_key, target_key : str, optional
        The keys of dict batches for :func:`split_batch`.

    Every Poisson batch is a step, an empty one included (noise only), so the
    steps taken equal the steps accounted and planned.
    """
    epochs = private.config.local_epochs if epochs is None else epochs
    split = batch_to_xy or (lambda b: split_batch(b, input_key, target_key))
    if private.grad_sample_mode == "ghost":
        crit = private.criterion
        assert crit is not None
        if private.default_criterion:

            def loss_of(out: Any, y: torch.Tensor) -> Any:
                return crit(out.reshape(-1), y.reshape(-1).float())
        else:
            loss_of = crit
    else:
        base = loss_fn or default_loss

        def loss_of(out: Any, y: torch.Tensor) -> Any:
            loss = base(out, y)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss)
                raise PrivacyConfigError(
                    f"loss_fn must return one scalar, the mean over the batch (reduction="
                    f"'mean', as Opacus scales per-sample gradients by it); got {shape}"
                )
            return loss

    model, optimizer = private.module, private.optimizer
    anchor = [p.detach().clone() for p in optimizer.params] if proximal_mu > 0 else []
    model.train()
    total, batches = 0.0, 0
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    for _ in range(epochs):
        for batch in private.data_loader:
            xb, yb = split(batch)
            optimizer.zero_grad()
            empty = _rows(xb) == 0
            if empty and private.grad_sample_mode != "ghost":
                _noise_only_step(private)
            else:
                _drop_stale_activations(private.original_module)
                out = model(*xb) if isinstance(xb, list | tuple) else model(xb)
                loss = loss_of(out, yb)
                loss.backward()
            if not optimizer.pre_step():  # clip, accumulate, noise, scale, account
                continue
            if proximal_mu > 0:
                with torch.no_grad():
                    for p, a in zip(optimizer.params, anchor, strict=True):
                        p.grad.add_(p.detach() - a, alpha=proximal_mu)
            optimizer.original_optimizer.step()
            if not empty:
                total += float(loss.item())
                batches += 1
    return total / max(batches, 1)


def _drop_stale_activations(module: nn.Module) -> None:
    """Forget activations captured by a forward pass that had no backward.

    Opacus's hooks push activations on every training-mode forward with grad
    enabled and pop them on backward; a stray forward (say a validation loss
    computed in train mode) would otherwise pair the next backward with the
    wrong activations (and its forward counter would stop Opacus from ever
    completing the per-sample gradient).
    """
    for sub in module.modules():
        acts = getattr(sub, "activations", None)
        if isinstance(acts, list) and acts:
            acts.clear()
            for p in sub.parameters(recurse=False):
                if hasattr(p, "_forward_counter"):  # else the grad sample is never promoted
                    p._forward_counter = 0


# --------------------------------------------------------------------------- update level
def privatize_update(
    update: Sequence[np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Clip the whole update to L2 ``clip_norm``, add N(0, (sigma * clip_norm)^2) per entry.

    Returns only the noised update (float32 where the input was not float): the
    norm before clipping is data and never leaves this function. ``rng``
    defaults to a fresh :func:`secure_numpy_generator`; pass one only in tests,
    since whoever can reproduce it can subtract the noise.
    """
    rng = rng if rng is not None else secure_numpy_generator()
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = []
    for u in update:
        noised = u.astype(np.float64) * scale + rng.normal(0.0, std, size=u.shape)
        out.append(noised.astype(u.dtype if np.issubdtype(u.dtype, np.floating) else np.float32))
    return out


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

    def __init__(self, path: str | os.PathLike[str], key: str = SAMPLE_LEDGER_KEY) -> None:
        self.path = Path(path)
        self.key = key

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the exclusive lock of this ledger (blocks until it is free)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

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
            projected = after.check_budget(budget, delta, noise_multiplier, sample_rate, steps)
            after.record(noise_multiplier, sample_rate, steps)
            after.rounds += 1
            runs.append(
                {
                    "time": time.time(),
                    "pid": os.getpid(),
                    "steps": int(steps),
                    "noise-multiplier": float(noise_multiplier),
                    "sample-rate": float(sample_rate),
                    "delta": float(delta),
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
    ``partition-id``), which stays the same when the SuperNode restarts.
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
    return LedgerFile(Path(directory) / f"{ident}.{key}.json", key)


def train_local_private(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    privacy: DPSGDConfig,
    state: RecordDict,
    ledger_key: str = SAMPLE_LEDGER_KEY,
    ledger_file: LedgerFile | None = None,
    note: Mapping[str, Any] | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, PrivacyReport]:
    """:func:`flower_ext.training.train_local` with DP-SGD, charged to the ledger in ``state``.

    Raises :class:`PrivacyBudgetExhausted` (nothing trained, nothing spent)
    when the round would exceed the budget. With ``ledger_file`` the round is
    reserved on disk before any step (see :class:`LedgerFile`); else the ledger
    lives in ``state`` and is saved in a ``finally``, so a crash mid-round
    cannot under-report. ``cfg.seed`` seeds only what is not private (torch's
    global generator); the noise and the Poisson batches come from
    CSPRNG-seeded generators (:func:`make_private`).
    """
    torch.manual_seed(cfg.seed)
    ledger = PrivacyLedger.load(state, ledger_key, accountant=privacy.accountant)
    loader = make_loader(x, y, cfg.batch_size, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    try:
        private = make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            config=privacy,
            ledger=ledger,
            ledger_file=ledger_file,
            note=note,
        )
    except PrivacyBudgetExhausted:
        if ledger_file is not None:  # the state mirrors what the file (all runs) spent
            ledger_file.restore(state, privacy.accountant, ledger.unit)
        raise
    try:
        loss = train_private_epochs(
            private, cfg.epochs, proximal_mu=cfg.proximal_mu, loss_fn=loss_fn
        )
    finally:
        report = private.finish()
        ledger.save(state, ledger_key)
    return loss, report


def budget_refusal(msg: Message, err: PrivacyBudgetExhausted) -> Message:
    """The reply of a client that will not train: an error the server audits as rejected."""
    return Message(Error(code=PRIVACY_BUDGET_ERROR_CODE, reason=err.reason), reply_to=msg)


def is_budget_refusal(reason: str) -> bool:
    """Whether a rejection reason recorded by the server is a budget refusal."""
    return f"client error {PRIVACY_BUDGET_ERROR_CODE}:" in reason or reason.startswith(
        "privacy budget exhausted"
    )


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
    for budget get ``{"refused": reason}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for node, metrics in client_metrics.items():
        if "dp-epsilon" not in metrics:
            continue
        name = labels.get(node) or str(node)
        out[name] = {new: metrics[old] for old, new in _REPORT_FIELDS.items() if old in metrics}
    for node, reason in rejected.items():
        if is_budget_refusal(reason):
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
