"""Every knob of the bank app, read once from the Flower run config and checked.

The defaults live in ``pyproject.toml`` under ``[tool.flwr.app.config]``; this
module gives them types and turns a bad value into one clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flower_ext.data import DataSource
from flower_ext.model import MODEL_KINDS, parse_hidden_units
from flower_ext.privacy import DPSGDConfig, UpdateDPConfig, privacy_config_from_run_config
from flower_ext.training import LR_SCHEDULES, TrainConfig, round_learning_rate


class SettingsError(ValueError):
    """A run-config value the app cannot use."""


#: What an injected fault does to a bank's train handler (test federations only).
FAULT_KINDS = ("none", "raise", "sleep", "nan")


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

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> BankAppSettings:
        try:
            settings = cls(
                num_rounds=int(_get(cfg, "num-server-rounds", 20)),  # type: ignore[arg-type]
                local_epochs=int(_get(cfg, "local-epochs", 1)),  # type: ignore[arg-type]
                learning_rate=float(_get(cfg, "learning-rate", 0.05)),  # type: ignore[arg-type]
                batch_size=int(_get(cfg, "batch-size", 64)),  # type: ignore[arg-type]
                model=str(_get(cfg, "model", "mlp")),
                hidden_units=str(_get(cfg, "hidden-units", "32,16")),
                aggregation=str(_get(cfg, "aggregation", "fedavg")),
                server_momentum=float(_get(cfg, "server-momentum", 0.0)),  # type: ignore[arg-type]
                server_learning_rate=float(_get(cfg, "server-learning-rate", 1.0)),  # type: ignore[arg-type]
                proximal_mu=float(_get(cfg, "proximal-mu", 0.0)),  # type: ignore[arg-type]
                local_only_baseline=bool(_get(cfg, "local-only-baseline", True)),
                centralized_baseline=bool(_get(cfg, "centralized-baseline", True)),
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
        if problems:
            raise SettingsError("invalid run config: " + "; ".join(problems))

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
