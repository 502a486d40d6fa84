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
from dataclasses import dataclass, field
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


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "DP_MODES",
    "GRAD_SAMPLE_MODES",
    "METRIC_KEYS",
    "PRIVACY_BUDGET_ERROR_CODE",
    "PRIVACY_METRIC_KEYS",
    "SAMPLE_LEDGER_KEY",
    "UPDATE_LEDGER_KEY",
    "UPDATE_LEDGER_UNIT",
    "UPDATE_SENSITIVITY",
    "DPSGDConfig",
    "LedgerFile",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "PrivacyLedger",
    "UpdateDPConfig",
    "budget_refusal",
    "is_budget_refusal",
    "ledger_file_for",
    "privacy_config_from_run_config",
    "privacy_train_metrics_aggr_fn",
    "round_privacy",
]
