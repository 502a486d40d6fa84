"""Build the server strategy named by the run config's ``aggregation`` key.

=====================  =====================================  ======================
``aggregation``        class                                  run-config parameters
=====================  =====================================  ======================
``fedavg``             :class:`~flower_ext.strategies.FedAvg`
``krum``               ``Krum``                               ``num-malicious``
``multikrum``          ``MultiKrum``                          ``num-malicious``,
                                                              ``multikrum-select``
``median``             ``Median``                             ``num-malicious``
``trimmed-mean``       ``TrimmedMean``                        ``trim-beta``,
                                                              ``num-malicious``
``bulyan``             ``Bulyan``                             ``num-malicious``
``geometric-median``   ``GeometricMedian``                    ``num-malicious``,
                                                              ``geomed-max-iter``
``centered-clipping``  ``CenteredClipping``                   ``clip-tau``,
                                                              ``clip-iterations``,
                                                              ``clip-tau-factor``
``norm-bound``         ``NormBound``                          ``max-norm``,
                                                              ``norm-factor``
=====================  =====================================  ======================

``bucket-size`` (every robust rule; 1 = off) puts bucketing (Karimireddy et al.,
ICLR 2022) in front of the rule. ``norm-factor`` / ``clip-tau-factor`` > 0 make
the radius adaptive: that multiple of the round's median norm (distance to the
center), with ``max-norm`` / ``clip-tau`` as ceilings.

Every rule also takes ``max-weight`` and ``max-weight-median-multiple`` (caps
on the banks' ``num-examples``; 0: no absolute cap, and the rule's own median
cap, 2x for the weight-using robust rules and none for FedAvg) and the app's
server step (``server-learning-rate``, ``server-momentum``, ``proximal-mu``, and
``server-optimizer`` = adagrad / adam / yogi with ``server-beta1``, ``server-beta2``,
``server-tau``). ``scaffold = true`` builds :class:`~flower_ext.strategies.Scaffold`
instead of ``FedAvg`` (refused with a robust rule, dp, he or top-k: :func:`scaffold_problem`).
Whatever the caps, the server app pins every bank's train weight to the row
count it reported at standardisation (capped at 3x the median there), so a count
claimed later cannot buy influence (``weight_capped`` in the audit says why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flower_ext.attacks import LABEL_FLIP_ATTACKS
from flower_ext.audit import AuditTrail
from flower_ext.mods.he import TOPK_RATIO_KEY
from flower_ext.privacy import privacy_train_metrics_aggr_fn
from flower_ext.strategies import (
    Bulyan,
    CenteredClipping,
    FedAvg,
    FedNova,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    RobustStrategy,
    Scaffold,
    TrimmedMean,
    UpdateAggregationStrategy,
)

from .encryption import build_encrypted_strategy, he_enabled
from .settings import BankAppSettings, SettingsError
from .strategy_wrappers import wrap_strategy


@dataclass(frozen=True)
class RobustSettings:
    """The run-config keys of the robust rules, typed (defaults as in pyproject.toml)."""

    num_malicious: int = 1
    multikrum_select: int = 0  # 0: n - f
    trim_beta: float = 0.2
    clip_tau: float = 1.0
    clip_iterations: int = 1
    max_norm: float = 1.0
    geomed_max_iter: int = 100
    max_weight: float = 0.0  # 0: no cap
    max_weight_median_multiple: float = 0.0  # 0: the rule's default
    bucket_size: int = 1  # 1: no bucketing
    norm_factor: float = 1.5  # 0: fixed max-norm; 1.5 measured (README Figures)
    clip_tau_factor: float = 0.0  # 0: fixed clip-tau
    seed: int = 42  # the run's seed; seeds the bucket shuffles

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> RobustSettings:
        d = cls()
        try:
            return cls(
                num_malicious=int(cfg.get("num-malicious", d.num_malicious)),  # type: ignore[arg-type]
                multikrum_select=int(cfg.get("multikrum-select", d.multikrum_select)),  # type: ignore[arg-type]
                trim_beta=float(cfg.get("trim-beta", d.trim_beta)),  # type: ignore[arg-type]
                clip_tau=float(cfg.get("clip-tau", d.clip_tau)),  # type: ignore[arg-type]
                clip_iterations=int(cfg.get("clip-iterations", d.clip_iterations)),  # type: ignore[arg-type]
                max_norm=float(cfg.get("max-norm", d.max_norm)),  # type: ignore[arg-type]
                geomed_max_iter=int(cfg.get("geomed-max-iter", d.geomed_max_iter)),  # type: ignore[arg-type]
                max_weight=float(cfg.get("max-weight", d.max_weight)),  # type: ignore[arg-type]
                max_weight_median_multiple=float(
                    cfg.get("max-weight-median-multiple", d.max_weight_median_multiple)  # type: ignore[arg-type]
                ),
                bucket_size=int(cfg.get("bucket-size", d.bucket_size)),  # type: ignore[arg-type]
                norm_factor=float(cfg.get("norm-factor", d.norm_factor)),  # type: ignore[arg-type]
                clip_tau_factor=float(cfg.get("clip-tau-factor", d.clip_tau_factor)),  # type: ignore[arg-type]
                seed=int(cfg.get("seed", d.seed)),  # type: ignore[arg-type]
            )
        except (TypeError, ValueError) as err:
            raise SettingsError(f"invalid run config for robust aggregation: {err}") from err


def _robust(cls: type, **params: Any) -> Callable[[RobustSettings, dict[str, Any]], Any]:
    """A builder passing ``num-malicious``, ``bucket-size`` and the named rule parameters.

    A parameter mapped to a ``*_factor`` attribute is passed only when > 0 (0: off).
    """

    def build(rs: RobustSettings, common: dict[str, Any]) -> UpdateAggregationStrategy:
        values = {name: getattr(rs, attr) for name, attr in params.items()}
        values = {k: v for k, v in values.items() if not (k.endswith("_factor") and v <= 0)}
        return cls(  # type: ignore[no-any-return]
            **common,
            num_malicious_nodes=rs.num_malicious,
            bucket_size=rs.bucket_size,
            bucket_seed=rs.seed,
            **values,
        )

    return build


def _multikrum(rs: RobustSettings, common: dict[str, Any]) -> UpdateAggregationStrategy:
    select = rs.multikrum_select if rs.multikrum_select > 0 else None
    return MultiKrum(
        **common,
        num_malicious_nodes=rs.num_malicious,
        num_nodes_to_select=select,
        bucket_size=rs.bucket_size,
        bucket_seed=rs.seed,
    )


BUILDERS: dict[str, Callable[[RobustSettings, dict[str, Any]], UpdateAggregationStrategy]] = {
    "fedavg": lambda rs, common: FedAvg(**common),
    "krum": _robust(Krum),
    "multikrum": _multikrum,
    "median": _robust(Median),
    "trimmed-mean": _robust(TrimmedMean, beta="trim_beta"),
    "bulyan": _robust(Bulyan),
    "geometric-median": _robust(GeometricMedian, max_iter="geomed_max_iter"),
    "centered-clipping": _robust(
        CenteredClipping,
        tau="clip_tau",
        iterations="clip_iterations",
        tau_factor="clip_tau_factor",
    ),
    "norm-bound": _robust(NormBound, max_norm="max_norm", norm_factor="norm_factor"),
}
AGGREGATIONS = tuple(BUILDERS)


def build_strategy(
    settings: BankAppSettings, audit: AuditTrail, num_nodes: int
) -> UpdateAggregationStrategy:
    """The strategy for ``settings.aggregation``; its f is checked against ``num_nodes`` now."""
    name = settings.aggregation.strip().lower()
    if name not in BUILDERS:
        raise SettingsError(
            f"aggregation must be one of {', '.join(AGGREGATIONS)}; got '{settings.aggregation}'"
        )
    rs = RobustSettings.from_config(settings.raw)
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": num_nodes,
        "min_evaluate_nodes": num_nodes,
        "min_available_nodes": num_nodes,
        "server_learning_rate": settings.server_learning_rate,
        "server_momentum": settings.server_momentum,
        "proximal_mu": settings.proximal_mu,
        "server_optimizer": settings.server_optimizer,
        "server_beta1": settings.server_beta1,
        "server_beta2": settings.server_beta2,
        "server_tau": settings.server_tau,
        "max_weight": rs.max_weight if rs.max_weight > 0 else None,
        "audit": audit,
        # Privacy figures are reported as the worst bank's (dp-epsilon-max), never a mean.
        "train_metrics_aggr_fn": privacy_train_metrics_aggr_fn,
    }
    if rs.max_weight_median_multiple > 0:  # 0: the rule's default (2x for weight-using rules)
        common["max_weight_median_multiple"] = rs.max_weight_median_multiple
    problem = scaffold_problem(settings) or fednova_problem(settings)
    if problem:
        raise SettingsError(problem)
    if he_enabled(settings.raw):  # encrypted aggregation: EncryptedFedAvg or a clear refusal
        return build_encrypted_strategy(settings, name, common)
    try:
        if settings.scaffold:  # N: every bank of the run, sampled or not
            strategy = Scaffold(**common, num_clients=settings.data.num_banks)
        elif settings.fednova:
            strategy = FedNova(**common)
        else:
            strategy = BUILDERS[name](rs, common)
    except ValueError as err:
        raise SettingsError(f"aggregation '{name}': {in_run_config_words(str(err))}") from err
    # Fail before any training if the federation is too small for the rule's f, in the
    # run config's own words.
    if isinstance(strategy, RobustStrategy) and num_nodes < strategy.min_clients():
        raise SettingsError(
            f"aggregation '{name}' with num-malicious={rs.num_malicious} needs at least "
            f"{strategy.min_clients()} banks per round ({strategy.requirement()}), but the run "
            f"has {num_nodes} (num-banks={settings.data.num_banks}, min-banks="
            f"{settings.min_banks}); lower num-malicious or add banks"
        )
    return strategy


def scaffold_problem(settings: BankAppSettings) -> str:
    """Why ``scaffold = true`` cannot run with these settings ("" when it can, or is off).

    SCAFFOLD needs each bank's control delta in clear next to a plain model update
    (:mod:`flower_ext.scaffold`): DP would leave the deltas unprotected, HE hides
    them from the server, top-k sends one sparse ArrayRecord, and a robust rule
    would still let an attacker's delta move ``c`` for every bank.
    """
    if not settings.scaffold:
        return ""
    refused = []
    name = settings.aggregation.strip().lower()
    if name != "fedavg":
        refused.append(
            f"aggregation = '{name}' (a robust rule; an attacker's control delta would still "
            "move c for every bank: use 'fedavg')"
        )
    if settings.privacy() is not None:
        refused.append(
            f"dp = '{settings.raw.get('dp')}' (each bank's control delta reveals as much as its "
            "update and would leave unprotected)"
        )
    if he_enabled(settings.raw):
        refused.append("he = true (the server must read each bank's control delta in clear)")
    ratio = settings.raw.get(TOPK_RATIO_KEY, 0.0)
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
        refused.append(f"topk-ratio = {ratio} (top-k compresses a reply of one ArrayRecord)")
    if _proximal(settings):
        refused.append(_proximal(settings))
    attack = str(settings.raw.get("attack", "none") or "none").strip().lower()
    if attack not in ("none", *LABEL_FLIP_ATTACKS):
        refused.append(
            f"attack = '{attack}' (the attack mod rewrites a reply of one ArrayRecord; a "
            "SCAFFOLD reply holds two, so the attack would silently do nothing)"
        )
    if not refused:
        return ""
    return (
        "scaffold = true cannot be combined with "
        + "; ".join(refused)
        + " (set scaffold = false, or change those keys)"
    )


#: Strategy argument names and the run-config keys a user typed for them.
RUN_CONFIG_NAMES = {
    "server_learning_rate": "server-learning-rate",
    "server_optimizer": "server-optimizer",
    "server_momentum": "server-momentum",
    "server_beta1": "server-beta1",
    "server_beta2": "server-beta2",
    "server_tau": "server-tau",
    "proximal_mu": "proximal-mu",
}


def in_run_config_words(message: str) -> str:
    """A strategy's ValueError with its argument names as the run-config keys."""
    for argument, key in RUN_CONFIG_NAMES.items():
        message = message.replace(argument, key)
    return message


def _proximal(settings: BankAppSettings) -> str:
    """The refusal text for the FedProx term next to a step-count based correction."""
    if settings.proximal_mu > 0:
        return (
            f"proximal-mu = {settings.proximal_mu:g} (the bank's steps are no longer plain "
            "gradient steps: the correction's step count would be wrong)"
        )
    return ""


def fednova_problem(settings: BankAppSettings) -> str:
    """Why ``fednova = true`` cannot run with these settings ("" when it can, or is off).

    FedNova reweights plain FedAvg by each bank's reported local steps: a robust rule
    weighs updates its own way, DP-SGD's steps and HE's sums are not the server's to
    reweight, top-k wraps a reply FedNova does not read, and SCAFFOLD is the other
    correction of local training (one at a time)."""
    if not settings.fednova:
        return ""
    refused = []
    name = settings.aggregation.strip().lower()
    if name != "fedavg":
        refused.append(f"aggregation = '{name}' (FedNova reweights FedAvg: use 'fedavg')")
    if settings.privacy() is not None:
        refused.append(f"dp = '{settings.raw.get('dp')}' (the banks do not report steps under DP)")
    if he_enabled(settings.raw):
        refused.append("he = true (the server cannot reweight encrypted updates)")
    ratio = settings.raw.get(TOPK_RATIO_KEY, 0.0)
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
        refused.append(f"topk-ratio = {ratio}")
    if settings.scaffold:
        refused.append("scaffold = true (one correction of local training at a time)")
    if _proximal(settings):
        refused.append(_proximal(settings))
    if not refused:
        return ""
    return (
        "fednova = true cannot be combined with "
        + "; ".join(refused)
        + " (set fednova = false, or change those keys)"
    )


def check_run_config(settings: BankAppSettings) -> None:
    """Refuse, before anything starts (nodes, keys, Ray), an aggregation the run cannot use.

    Builds the strategy once on an in-memory audit trail with the number of banks
    a round needs, so an unknown ``aggregation``, bad rule parameters, a
    ``num-malicious`` the banks cannot outvote, and HE with a robust rule or top-k
    are reported at once, naming the run-config keys.
    """
    name = settings.aggregation.strip().lower()
    problem = scaffold_problem(settings) or fednova_problem(settings)
    if problem:
        raise SettingsError(problem)
    if he_enabled(settings.raw):
        if settings.server_optimizer != "sgd":
            raise SettingsError(
                f"he = true cannot be combined with server-optimizer = "
                f"'{settings.server_optimizer}': an adaptive optimiser divides each coordinate "
                "of the aggregate by its running root mean square, which needs the aggregate in "
                "clear (use server-optimizer = 'sgd' or he = false)"
            )
        if name != "fedavg":
            raise SettingsError(
                f"he = true cannot be combined with aggregation = '{name}': robust rules "
                "compare the banks' plaintext updates, which an encrypting server never sees; "
                "use aggregation = 'fedavg' (or he = false)"
            )
        ratio = settings.raw.get(TOPK_RATIO_KEY, 0.0)
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
            raise SettingsError(
                f"he = true cannot be combined with topk-ratio = {ratio}: each bank would send "
                "a different set of coordinates, and ciphertexts can only be added position by "
                "position (set topk-ratio = 0 or he = false)"
            )
        return  # the rest needs the keys (checked when the strategy is built)
    strategy = build_strategy(settings, AuditTrail(), num_nodes=settings.required_banks)
    try:  # top-k settings are checked when the wrapper is built: build it now, not after Ray
        wrap_strategy(strategy, settings, AuditTrail())
    except (TypeError, ValueError) as err:
        raise SettingsError(f"invalid run config: {err}") from err
