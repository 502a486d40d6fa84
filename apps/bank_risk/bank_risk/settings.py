"""Every knob of the bank app, read once from the Flower run config and checked.

The defaults live in ``pyproject.toml`` under ``[tool.flwr.app.config]``; this
module gives them types and turns a bad value into one clear message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flower_ext.attacks import AttackConfig
from flower_ext.data import DataSource
from flower_ext.metrics import sketch_rows_per_bin
from flower_ext.model import MODEL_KINDS, parse_hidden_units
from flower_ext.personalise import PersonalisationConfig
from flower_ext.privacy import DPSGDConfig, UpdateDPConfig, privacy_config_from_run_config
from flower_ext.training import (
    LR_SCHEDULES,
    TrainConfig,
    epochs_for_min_steps,
    round_learning_rate,
)


class SettingsError(ValueError):
    """A run-config value the app cannot use."""


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _flag(cfg: Mapping[str, object], key: str, default: bool) -> bool:
    """A run-config switch: a bool, or text such as 'false' (``bool('false')`` is True)."""
    value = cfg.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{key} must be true or false, got {value!r}")


def secagg_enabled(cfg: Mapping[str, object]) -> bool:
    """Run config ``secagg``: secure aggregation (SecureFedAvg + secagg_mod)."""
    return _flag(cfg, "secagg", False)


def secagg_dp_enabled(cfg: Mapping[str, object]) -> bool:
    """Run config ``secagg-dp`` (only with ``secagg``): distributed DP over secure aggregation."""
    return secagg_enabled(cfg) and _flag(cfg, "secagg-dp", False)


def _whole(cfg: Mapping[str, object], key: str, default: int) -> int:
    """A run-config count: a whole number (2.9 rounds is a mistake, not 2)."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    return int(value)  # type: ignore[arg-type]


#: What an injected fault does to a bank's train handler (test federations only).
FAULT_KINDS = ("none", "raise", "sleep", "nan")
#: Default of run config ``min-local-steps`` (``flower_ext.training.epochs_for_min_steps``).
MIN_LOCAL_STEPS = 10


@dataclass(frozen=True)
class FaultInjection:
    """Test-only faults for chosen banks (run config ``fault-*``), to test fault handling.

    Parameters
    ----------
    banks : frozenset[int]
        Indices of the faulty banks (node config ``bank-index`` / ``partition-id``).
    kind : str
        ``"raise"``: the train handler raises; ``"sleep"``: it answers only after
        ``sleep_seconds`` (longer than ``round-timeout`` makes the bank missing);
        ``"nan"``: its reply's weights are all NaN.
    sleep_seconds : float
        How long a ``"sleep"`` bank stalls before training.
    """

    banks: frozenset[int]
    kind: str
    sleep_seconds: float = 0.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> FaultInjection | None:
        """``None`` when off (the default); :class:`SettingsError` naming a bad key."""
        kind = str(cfg.get("fault-kind", "none") or "none").strip()
        text = str(cfg.get("fault-banks", "") or "").strip()
        if kind not in FAULT_KINDS:
            raise SettingsError(f"fault-kind must be one of {FAULT_KINDS}, got '{kind}'")
        if kind == "none" and not text:
            return None
        if kind == "none" or not text:
            raise SettingsError(
                'fault injection needs both fault-banks (e.g. "1") and fault-kind '
                f"(one of {FAULT_KINDS[1:]}); got fault-banks='{text}', fault-kind='{kind}'"
            )
        banks = []
        num_banks = cfg.get("num-banks", 5)
        for item in text.split(","):
            try:
                index = int(item.strip())
            except ValueError:
                raise SettingsError(
                    f"fault-banks must be comma-separated bank indices, got '{text}'"
                ) from None
            if not 0 <= index < int(num_banks):  # type: ignore[call-overload]
                raise SettingsError(
                    f"fault-banks: bank index {index} is outside 0..{int(num_banks) - 1}"  # type: ignore[call-overload]
                )
            banks.append(index)
        try:
            sleep = float(cfg.get("fault-sleep", 0.0))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise SettingsError(
                f"fault-sleep must be seconds, got {cfg.get('fault-sleep')!r}"
            ) from None
        if kind == "sleep" and not 0 < sleep < float("inf"):
            raise SettingsError(f"fault-kind 'sleep' needs fault-sleep > 0 seconds, got {sleep}")
        return cls(frozenset(banks), kind, sleep)


def _get(cfg: Mapping[str, object], key: str, default: object) -> object:
    return cfg.get(key, default)


@dataclass(frozen=True)
class BankAppSettings:
    num_rounds: int
    local_epochs: int
    learning_rate: float
    batch_size: int
    model: str
    hidden_units: str
    aggregation: str
    server_momentum: float
    server_learning_rate: float
    proximal_mu: float
    local_only_baseline: bool
    centralized_baseline: bool
    output_dir: str
    run_name: str
    round_timeout: float
    wait_for_nodes: float
    seed: int
    data: DataSource
    raw: dict[str, object]
    #: Fewest banks a round needs (sampled, and valid replies); 0 = all ``num-banks``.
    min_banks: int = 0
    #: A run directory whose ``checkpoint.npz`` this run continues; empty: a new run.
    resume_from: str = ""
    #: Local learning rate over the rounds: "constant", "cosine" or "step" (README).
    lr_schedule: str = "constant"
    #: Server optimiser: "sgd" (server-learning-rate, server-momentum) or adagrad/adam/yogi.
    server_optimizer: str = "sgd"
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    #: SCAFFOLD control variates (``scaffold``; fedavg without dp, he or top-k).
    scaffold: bool = False
    #: FedNova's step-normalised averaging (``fednova``; fedavg without dp, he, top-k).
    fednova: bool = False
    #: Per-bank personalisation after the last round (``personalisation*`` keys; README).
    personalisation: PersonalisationConfig = field(default_factory=PersonalisationConfig)

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> BankAppSettings:
        try:
            settings = cls(
                num_rounds=_whole(cfg, "num-server-rounds", 20),
                local_epochs=int(_get(cfg, "local-epochs", 1)),  # type: ignore[arg-type]
                learning_rate=float(_get(cfg, "learning-rate", 0.05)),  # type: ignore[arg-type]
                batch_size=int(_get(cfg, "batch-size", 64)),  # type: ignore[arg-type]
                model=str(_get(cfg, "model", "mlp")),
                hidden_units=str(_get(cfg, "hidden-units", "32,16")),
                aggregation=str(_get(cfg, "aggregation", "fedavg")),
                server_momentum=float(_get(cfg, "server-momentum", 0.0)),  # type: ignore[arg-type]
                server_learning_rate=float(_get(cfg, "server-learning-rate", 1.0)),  # type: ignore[arg-type]
                proximal_mu=float(_get(cfg, "proximal-mu", 0.0)),  # type: ignore[arg-type]
                server_optimizer=str(_get(cfg, "server-optimizer", "sgd") or "sgd").strip(),
                server_beta1=float(_get(cfg, "server-beta1", 0.9)),  # type: ignore[arg-type]
                server_beta2=float(_get(cfg, "server-beta2", 0.99)),  # type: ignore[arg-type]
                server_tau=float(_get(cfg, "server-tau", 1e-3)),  # type: ignore[arg-type]
                scaffold=_flag(cfg, "scaffold", False),
                fednova=_flag(cfg, "fednova", False),
                local_only_baseline=_flag(cfg, "local-only-baseline", True),
                centralized_baseline=_flag(cfg, "centralized-baseline", True),
                output_dir=str(_get(cfg, "output-dir", "")),
                run_name=str(_get(cfg, "run-name", "")),
                round_timeout=float(_get(cfg, "round-timeout", 600.0)),  # type: ignore[arg-type]
                wait_for_nodes=float(_get(cfg, "wait-for-nodes", 60.0)),  # type: ignore[arg-type]
                seed=int(_get(cfg, "seed", 42)),  # type: ignore[arg-type]
                data=DataSource.from_config(cfg),
                raw=dict(cfg),
                min_banks=int(_get(cfg, "min-banks", 0)),  # type: ignore[arg-type]
                resume_from=str(_get(cfg, "resume-from", "") or ""),
                lr_schedule=str(_get(cfg, "lr-schedule", "constant") or "constant"),
                personalisation=PersonalisationConfig.from_run_config(cfg),
            )
        except (TypeError, ValueError) as err:
            raise SettingsError(f"invalid run config: {err}") from err
        settings.check()
        return settings

    def check(self) -> None:
        problems = []
        if self.num_rounds < 1:
            problems.append(f"num-server-rounds must be >= 1, got {self.num_rounds}")
        if self.local_epochs < 1:
            problems.append(f"local-epochs must be >= 1, got {self.local_epochs}")
        if self.learning_rate <= 0:
            problems.append(f"learning-rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr-schedule must be one of {LR_SCHEDULES}, got '{self.lr_schedule}'")
        if self.batch_size < 1:
            problems.append(f"batch-size must be >= 1, got {self.batch_size}")
        if self.model not in MODEL_KINDS:
            problems.append(f"model must be one of {MODEL_KINDS}, got '{self.model}'")
        try:
            parse_hidden_units(self.hidden_units)
        except ValueError as err:
            problems.append(str(err))
        if self.data.num_banks < 1:
            problems.append(f"num-banks must be >= 1, got {self.data.num_banks}")
        if not 0 <= self.min_banks <= self.data.num_banks:
            problems.append(
                f"min-banks must be in [0, num-banks={self.data.num_banks}] "
                f"(0 = all banks), got {self.min_banks}"
            )
        try:
            self.privacy()
        except (TypeError, ValueError) as err:
            problems.append(str(err))
        try:
            self.faults()
        except SettingsError as err:
            problems.append(str(err))
        problems += self._more_problems()
        from .personalisation import config_problems  # DP / HE refusals (module docstring)

        problems += config_problems(self)
        if problems:
            raise SettingsError("invalid run config: " + "; ".join(problems))

    def _more_problems(self) -> list[str]:
        """Run-config mistakes a newcomer makes that would otherwise show up late or never."""
        problems = []
        raw = self.raw
        if self.min_local_steps < 0:
            raw_steps = raw.get("min-local-steps")
            problems.append(f"min-local-steps must be a whole number >= 0, got {raw_steps!r}")
        for key in ("num-banks", "rows-per-bank", "local-epochs", "batch-size", "min-banks"):
            value = raw.get(key)
            if isinstance(value, float) and not value.is_integer():
                problems.append(f"{key} must be a whole number, got {value}")
        if self.data.dataset == "synthetic" and self.data.rows_per_bank < 1:
            problems.append(f"rows-per-bank must be >= 1, got {self.data.rows_per_bank}")
        if not self.round_timeout > 0:
            problems.append(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if not self.wait_for_nodes >= 0:
            problems.append(f"wait-for-nodes must be >= 0 seconds, got {self.wait_for_nodes}")
        for key in ("max-weight", "max-weight-median-multiple"):
            value = raw.get(key, 0)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                problems.append(f"{key} must be >= 0 (0 = no cap), got {value}")
        if self.output_dir and not Path(self.output_dir).expanduser().is_absolute():
            problems.append(
                f"output-dir '{self.output_dir}' is relative; the apps do not run in your "
                f"working directory, so give an absolute path, e.g. output-dir='$PWD/"
                f"{self.output_dir}'"
            )
        if self.resume_from and not Path(self.resume_from).expanduser().is_absolute():
            problems.append(f"resume-from '{self.resume_from}' must be an absolute path")
        try:
            sketch_rows_per_bin(raw.get("sketch-rows-per-bin"))
        except ValueError as err:
            problems.append(str(err))
        try:
            attack = AttackConfig.from_config(raw, self.data.num_banks)
        except (TypeError, ValueError) as err:
            problems.append(str(err))
        else:
            if attack.attack != "none":
                outside = [i for i in attack.malicious if i >= self.data.num_banks]
                if not attack.malicious:
                    problems.append(
                        f"attack='{attack.attack}' needs malicious-banks (bank indices "
                        f"0..{self.data.num_banks - 1}); without it nothing is attacked"
                    )
                elif outside:
                    problems.append(
                        f"malicious-banks {outside} are not banks of this run (indices "
                        f"0..{self.data.num_banks - 1})"
                    )
        return problems

    @property
    def required_banks(self) -> int:
        """Banks a round needs: ``min-banks``, or every bank when it is 0."""
        return self.min_banks or self.data.num_banks

    def privacy(self) -> DPSGDConfig | UpdateDPConfig | None:
        """The DP settings (run config ``dp``, ``dp-*``); None when ``dp = "off"``."""
        return privacy_config_from_run_config(self.raw, self.num_rounds, self.local_epochs)

    def faults(self) -> FaultInjection | None:
        """Test-only fault injection (run config ``fault-*``); None when off."""
        return FaultInjection.from_config(self.raw)

    def round_learning_rate(self, server_round: int) -> float:
        """The local learning rate of a round under ``lr-schedule`` (the server sends it)."""
        return round_learning_rate(
            self.lr_schedule, self.learning_rate, server_round, self.num_rounds
        )

    @property
    def min_local_steps(self) -> int:
        """Run config ``min-local-steps``: every bank takes at least this many local steps
        a round (more epochs for a small bank; not under DP-SGD, whose noise is calibrated
        to ``local-epochs``). -1 when the value is not a whole number >= 0 (``check`` says so)."""
        value = self.raw.get("min-local-steps", MIN_LOCAL_STEPS)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return -1
        if not (math.isfinite(value) and float(value).is_integer() and value >= 0):
            return -1
        return int(value)

    def local_epochs_for(self, num_rows: int) -> int:
        """The local epochs a bank of ``num_rows`` training rows runs each round."""
        return epochs_for_min_steps(
            self.local_epochs, num_rows, self.batch_size, max(self.min_local_steps, 0)
        )

    def train_config(
        self, seed: int, proximal_mu: float, learning_rate: float | None = None
    ) -> TrainConfig:
        return TrainConfig(
            epochs=self.local_epochs,
            learning_rate=self.learning_rate if learning_rate is None else learning_rate,
            batch_size=self.batch_size,
            proximal_mu=proximal_mu,
            seed=seed,
        )
