"""Differential privacy for a bank's local training: DP-SGD (Opacus) with a ledger that lasts.

Two mechanisms, two threats:

* **DP-SGD (sample level)**, :func:`make_private`: every optimizer step clips each
  customer's gradient to ``max_grad_norm`` and adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm``; batches are drawn by Poisson sampling
  (each row independently with probability ``q = batch_size / N``), as the
  analysis of Abadi et al. (CCS 2016) and Mironov et al. (RDP, 2019) assumes.
  *Guarantee:* (epsilon, delta)-DP per bank with respect to adding or removing
  one customer row of that bank's training data, over everything the bank
  ever sends (all its updates, all rounds), whoever looks: the server, the
  other banks, anyone who gets the final model. *Not* guaranteed: protection
  of a customer with many rows (the unit is one row), of the bank's data as a
  whole (its portfolio mix, default rate), of data used outside the training
  loop (e.g. the standardisation moments the app sends, or evaluation
  metrics), and nothing holds once the budget is reset or the ledger lost.
* **Update level (client level)**, :func:`privatize_update`: the bank clips its
  whole update ``local - global`` to L2 norm ``clip_norm`` and adds
  ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate before it
  leaves the bank (local, no trust in the server). *Guarantee:* per round a
  Gaussian mechanism over the bank's entire contribution (neighbouring = the
  bank's data vs. no contribution, sensitivity ``clip_norm``), composed over
  rounds with sample rate 1. It hides whether the bank took part and what its
  whole portfolio looks like, but needs far more noise for the same epsilon
  (one bank's update is a single "sample").

The privacy ledger (:class:`PrivacyLedger`) is what Flower's Opacus example
lacks: it keeps the accountant's full history ``[(noise_multiplier,
sample_rate, steps), ...]`` in ``context.state``, rebuilds an Opacus
accountant from it each round and lets Opacus step it, so the epsilon
reported after round r is the composition over every step the bank has taken,
and a round that would overspend the budget is refused *before* any step.

Grad-sample modes: ``"ew"`` (expanded weights) with :class:`FlatClipDPOptimizer`
is the default, the fastest mode that matches a one-sample-at-a-time reference
on the bank model (``benchmarks/bench_dp_speed.py``). ``"ew"`` cannot run an
empty Poisson batch, which is handled by a noise-only step (still one
accounted step, as in DP-SGD's analysis); ``"hooks"`` and ``"functorch"`` are
correct but slower; ``"ghost"`` (fast gradient clipping) computes wrong
gradients when the per-sample loss is not one value per row (e.g. (B, 1)
logits against (B, 1) targets broadcast the clip coefficients), so the loss it
wraps is checked and rejected unless shaped (B,).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Error, Message, RecordDict

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
def _noise_problems(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    accountant: str,
    *,
    zero_ok: bool,
) -> list[str]:
    """What is wrong with the noise settings both DP configurations share."""
    problems = []
    if (noise_multiplier is None) == (target_epsilon is None):
        problems.append("give exactly one of noise_multiplier and target_epsilon")
    if noise_multiplier is not None and (
        noise_multiplier < 0 if zero_ok else not noise_multiplier > 0
    ):
        bound = ">= 0" if zero_ok else "> 0"
        problems.append(f"noise_multiplier must be {bound}, got {noise_multiplier}")
    if target_epsilon is not None and not target_epsilon > 0:
        problems.append(f"target_epsilon must be > 0, got {target_epsilon}")
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
        stored = str(rec["accountant"])
        if stored != accountant:
            raise PrivacyConfigError(
                f"the privacy ledger was kept with the '{stored}' accountant; switching to "
                f"'{accountant}' mid-run would restart the accounting"
            )
        sigmas = [float(v) for v in rec.get("noise-multiplier", [])]  # type: ignore[union-attr]
        rates = [float(v) for v in rec.get("sample-rate", [])]  # type: ignore[union-attr]
        steps = [int(v) for v in rec.get("steps", [])]  # type: ignore[union-attr]
        return cls(
            accountant=stored,
            history=list(zip(sigmas, rates, steps, strict=True)),
            rounds=int(rec.get("rounds", 0)),  # type: ignore[arg-type]
            unit=str(rec.get("unit", unit)),
        )

    def save(self, state: RecordDict, key: str = SAMPLE_LEDGER_KEY) -> None:
        state[key] = ConfigRecord(
            {
                "accountant": self.accountant,
                "unit": self.unit,
                "rounds": self.rounds,
                "noise-multiplier": [float(h[0]) for h in self.history],
                "sample-rate": [float(h[1]) for h in self.history],
                "steps": [int(h[2]) for h in self.history],
            }
        )

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
            self.noise_multiplier, self.target_epsilon, self.delta, self.accountant, zero_ok=True
        )
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.rounds < 1 or self.local_epochs < 1:
            problems.append("rounds and local_epochs must be >= 1")
        if self.epsilon_budget is not None and not self.epsilon_budget > 0:
            problems.append(f"epsilon_budget must be > 0, got {self.epsilon_budget}")
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


@dataclass(frozen=True)
class UpdateDPConfig:
    """Update-level (client-level, local) DP: clip the update, add Gaussian noise."""

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: str = "rdp"
    rounds: int = 1
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        problems = _noise_problems(
            self.noise_multiplier, self.target_epsilon, self.delta, self.accountant, zero_ok=False
        )
        if not self.clip_norm > 0:
            problems.append(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.rounds < 1:
            problems.append("rounds must be >= 1")
        if problems:
            raise PrivacyConfigError("invalid update-level DP settings: " + "; ".join(problems))

    @property
    def budget(self) -> float | None:
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    def noise(self) -> float:
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None
        return float(
            _quiet_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=1.0,
                steps=self.rounds,
                accountant=self.accountant,
            )
        )


def privacy_config_from_run_config(
    cfg: Mapping[str, Any], rounds: int, local_epochs: int
) -> DPSGDConfig | UpdateDPConfig | None:
    """The DP settings of a Flower run config (keys ``dp``, ``dp-*``); None when off.

    ``dp-target-epsilon`` > 0 picks the noise for the whole run; 0 uses
    ``dp-noise-multiplier``. ``dp-epsilon-budget`` > 0 is the enforced budget
    (default: the target epsilon, or none).
    """
    mode = str(cfg.get("dp", "off"))
    if mode not in DP_MODES:
        raise PrivacyConfigError(f"dp must be one of {DP_MODES}, got '{mode}'")
    if mode == "off":
        return None
    target = float(cfg.get("dp-target-epsilon", 0.0))  # type: ignore[arg-type]
    budget = float(cfg.get("dp-epsilon-budget", 0.0))  # type: ignore[arg-type]
    sigma = float(cfg.get("dp-noise-multiplier", 1.0))  # type: ignore[arg-type]
    common: dict[str, Any] = {
        "noise_multiplier": None if target > 0 else sigma,
        "target_epsilon": target if target > 0 else None,
        "delta": float(cfg.get("dp-delta", 1e-5)),  # type: ignore[arg-type]
        "accountant": str(cfg.get("dp-accountant", "rdp")),
        "rounds": int(rounds),
        "epsilon_budget": budget if budget > 0 else None,
    }
    norm = float(cfg.get("dp-max-grad-norm", 1.0))  # type: ignore[arg-type]
    if mode == "update":
        return UpdateDPConfig(clip_norm=norm, **common)
    return DPSGDConfig(
        max_grad_norm=norm,
        local_epochs=int(local_epochs),
        grad_sample_mode=str(cfg.get("dp-grad-sample-mode", DEFAULT_GRAD_SAMPLE_MODE)),
        **common,
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
    _finished: bool = False

    @property
    def grad_sample_mode(self) -> str:
        return self.config.grad_sample_mode

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


def make_private(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    config: DPSGDConfig,
    ledger: PrivacyLedger,
    criterion: Callable[..., Any] | None = None,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Make one round of a client's local training DP-SGD, charged to ``ledger``.

    Like ``opacus.PrivacyEngine.make_private`` (it calls it), on the user's own
    model, optimizer and loader, with three differences: the accountant starts
    from the ledger's history (cumulative epsilon across rounds); the round is
    refused with :class:`PrivacyBudgetExhausted` *before* any step when its
    planned steps (``local_epochs x 1/q``) would push epsilon past the budget;
    and the model is checked (:func:`check_module`) with a clear error.

    The sample rate is ``1 / len(data_loader)`` (``batch_size / N``), as in Opacus.
    A ``TensorDataset`` gets :func:`poisson_loader`, others Opacus's
    ``DPDataLoader``. Parameters are trained in place: ``module`` keeps the
    result after :meth:`PrivateTraining.finish`.
    """
    if config.accountant != ledger.accountant:
        raise PrivacyConfigError(
            f"config accountant '{config.accountant}' differs from the ledger's "
            f"'{ledger.accountant}'"
        )
    check_module(module)  # a clear error; fixing changes the model, see check_module
    steps_per_epoch = len(data_loader)
    if steps_per_epoch < 1:
        raise PrivacyConfigError("the data loader is empty")
    sample_rate = 1.0 / steps_per_epoch
    sigma = config.noise_for(sample_rate, steps_per_epoch)
    planned = config.local_epochs * steps_per_epoch
    projected = ledger.check_budget(config.budget, config.delta, sigma, sample_rate, planned)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
        engine.accountant = ledger.make_accountant()
        loss = criterion if criterion is not None else nn.BCEWithLogitsLoss()
        out = engine.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            criterion=loss,
            noise_multiplier=sigma,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=config.grad_sample_mode,
            noise_generator=noise_generator,
        )
    if config.grad_sample_mode == "ghost":
        wrapped, dp_optimizer, dp_criterion, dp_loader = out
        dp_criterion = _GhostLossGuard(dp_criterion)
    else:
        wrapped, dp_optimizer, dp_loader = out
        dp_criterion = criterion
    if config.fused_clipping and type(dp_optimizer) is DPOptimizer and not config.secure_mode:
        dp_optimizer.__class__ = FlatClipDPOptimizer  # same state, fewer kernel launches
    if isinstance(data_loader.dataset, TensorDataset) and not config.secure_mode:
        dp_loader = poisson_loader(data_loader.dataset, sample_rate, data_loader.generator)
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


def train_private_epochs(
    private: PrivateTraining,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """DP-SGD passes over ``private.data_loader``; returns the mean training loss.

    Binary log-loss on flattened logits by default (one loss per row, which is
    also what ghost clipping needs). Every Poisson batch is a step, an empty one
    included (noise only), so the steps taken equal the steps accounted and
    planned. The FedProx term's gradient ``mu (w - w_global)`` does not depend
    on the data: it is added after clipping and noise, at no privacy cost
    (Opacus would silently drop it from a loss, as it only uses per-sample grads).
    """
    epochs = private.config.local_epochs if epochs is None else epochs
    if private.grad_sample_mode == "ghost":
        crit = private.criterion
        assert crit is not None

        def loss_of(out: torch.Tensor, y: torch.Tensor) -> Any:
            return crit(out.reshape(-1), y.reshape(-1).float())
    else:
        base = loss_fn or nn.BCEWithLogitsLoss()

        def loss_of(out: torch.Tensor, y: torch.Tensor) -> Any:
            return base(out.reshape(-1), y.reshape(-1).float())

    model, optimizer = private.module, private.optimizer
    anchor = [p.detach().clone() for p in optimizer.params] if proximal_mu > 0 else []
    model.train()
    total, batches = 0.0, 0
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    for _ in range(epochs):
        for xb, yb in private.data_loader:
            optimizer.zero_grad()
            empty = len(xb) == 0
            if empty and private.grad_sample_mode != "ghost":
                _noise_only_step(private)
            else:
                _drop_stale_activations(private.original_module)
                loss = loss_of(model(xb), yb)
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
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """Clip the whole update to L2 ``clip_norm``, add N(0, (sigma * clip_norm)^2) per entry.

    Returns the noised update (float32 where the input was float) and the
    update's norm before clipping.
    """
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = []
    for u in update:
        noised = u.astype(np.float64) * scale + rng.normal(0.0, std, size=u.shape)
        out.append(noised.astype(u.dtype if np.issubdtype(u.dtype, np.floating) else np.float32))
    return out, norm


# --------------------------------------------------------------------------- client helpers
class LedgerFile:
    """A bank's privacy ledger kept on disk as well as in ``context.state``.

    Flower 1.42 keeps ``context.state`` in the SuperNode's memory only: a restarted
    SuperNode or a new run would start the ledger at zero and silently re-spend
    the budget. With a ledger file the bank's spending survives both: it is read
    into the state when the state has none, and written (atomically) after every
    round. The file is per bank, not per run, so it accumulates over every run the
    bank takes part in, which is what a privacy budget means; deleting it is the
    data owner's decision.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = SAMPLE_LEDGER_KEY) -> None:
        self.path = Path(path)
        self.key = key

    def restore(self, state: RecordDict) -> None:
        if self.key in state or not self.path.is_file():
            return
        try:
            values = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PrivacyConfigError(
                f"privacy ledger file {self.path} is unreadable ({err}); refusing to train "
                "rather than restart the budget at zero"
            ) from err
        state[self.key] = ConfigRecord(values)

    def persist(self, state: RecordDict) -> None:
        if self.key not in state:
            return
        record = state[self.key]
        assert isinstance(record, ConfigRecord)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(dict(record.items())))
        os.replace(tmp, self.path)


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
) -> tuple[float, PrivacyReport]:
    """:func:`flower_ext.training.train_local` with DP-SGD, charged to the ledger in ``state``.

    Raises :class:`PrivacyBudgetExhausted` (nothing trained, nothing spent)
    when the round would exceed the budget. The ledger is saved only after the
    round's steps are taken, so a crash mid-round cannot under-report: it is
    saved in a ``finally``.
    """
    torch.manual_seed(cfg.seed)
    ledger = PrivacyLedger.load(state, ledger_key, accountant=privacy.accountant)
    loader = make_loader(x, y, cfg.batch_size, cfg.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    private = make_private(
        module=model, optimizer=optimizer, data_loader=loader, config=privacy, ledger=ledger
    )
    try:
        loss = train_private_epochs(private, cfg.epochs, proximal_mu=cfg.proximal_mu)
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
