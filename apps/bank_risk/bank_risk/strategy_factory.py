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
``secagg = true`` builds :class:`~flower_ext.strategies.SecureFedAvg` (keys ``secagg-*``,
distributed DP with ``secagg-dp``; refusals in :func:`secagg_problem`).
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
from flower_ext.privacy.accounting import DELTA_BOUNDS, EPSILON_BOUNDS
from flower_ext.scaffold import effective_steps
from flower_ext.secagg.dp import DistributedDP, DistributedDPError
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
    SecureFedAvg,
    TrimmedMean,
    UpdateAggregationStrategy,
)
from flower_ext.training import TrainConfig

from .encryption import build_encrypted_strategy, he_enabled
from .settings import BankAppSettings, SettingsError, secagg_dp_enabled, secagg_enabled
from .strategy_wrappers import wrap_strategy


@dataclass(frozen=True)
class RobustSettings:
    """The run-config keys of the robust rules, typed (defaults as in pyproject.toml)."""

    num_malicious: int = 1
    multikrum_select: int = 0  # 0: n - f
    multikrum_aggregate: str = "mean"  # or "geometric-median" of the selected
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
                multikrum_aggregate=str(cfg.get("multikrum-aggregate", d.multikrum_aggregate)),
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
        selected_aggregate=rs.multikrum_aggregate,
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
    problem = secagg_problem(settings) or scaffold_problem(settings) or fednova_problem(settings)
    if problem:
        raise SettingsError(problem)
    if secagg_enabled(settings.raw):  # secure aggregation: the server sees only the sum
        return build_secure_strategy(settings, common, num_nodes)
    if he_enabled(settings.raw):  # encrypted aggregation: EncryptedFedAvg or a clear refusal
        return build_encrypted_strategy(settings, name, common)
    try:
        if settings.scaffold:  # N: every bank of the run, sampled or not
            strategy = Scaffold(**common, num_clients=settings.data.num_banks)
        elif settings.fednova:
            # A small bank honestly takes min-local-steps (momentum-adjusted) however few
            # its rows: FedNova's band must not clamp it.
            floor = effective_steps(max(settings.min_local_steps, 0), TrainConfig().momentum)
            strategy = FedNova(**common, steps_floor=floor)
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


def _robust_rule_refused(settings: BankAppSettings, why: str) -> list[str]:
    """``["aggregation = '<rule>' (<why>: use 'fedavg')"]`` when the run's rule is not
    FedAvg, else ``[]``: the refusal a FedAvg-only feature starts its list with."""
    name = settings.aggregation.strip().lower()
    return [] if name == "fedavg" else [f"aggregation = '{name}' ({why}: use 'fedavg')"]


def scaffold_problem(settings: BankAppSettings) -> str:
    """Why ``scaffold = true`` cannot run with these settings ("" when it can, or is off).

    SCAFFOLD needs each bank's control delta in clear next to a plain model update
    (:mod:`flower_ext.scaffold`): DP would leave the deltas unprotected, HE hides
    them from the server, top-k sends one sparse ArrayRecord, and a robust rule
    would still let an attacker's delta move ``c`` for every bank.
    """
    if not settings.scaffold:
        return ""
    refused = _robust_rule_refused(
        settings, "a robust rule; an attacker's control delta would still move c for every bank"
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
    refused = _robust_rule_refused(settings, "FedNova reweights FedAvg")
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
    problem = secagg_problem(settings) or scaffold_problem(settings) or fednova_problem(settings)
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


# --------------------------------------------------------------------------- secagg
def _number(raw: Mapping[str, object], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{key} must be a number, got {value!r}")
    return float(value)


def secagg_threshold(raw: Mapping[str, object], num_nodes: int) -> int | float:
    """``secagg-threshold``: 0 = 2/3; a fraction in (0.5, 1]; or a whole count in [2, banks]."""
    value = _number(raw, "secagg-threshold", 0.0)
    if value == 0:
        return 2 / 3
    if 0.5 < value <= 1.0:
        return value
    if value >= 2 and value.is_integer():
        if value > num_nodes:
            raise SettingsError(
                f"secagg-threshold = {int(value)} exceeds the {num_nodes} banks a round needs "
                "(num-banks / min-banks): lower it, or give a fraction such as 0.67"
            )
        if 2 * value <= num_nodes:  # the banks refuse it too (2t > n)
            raise SettingsError(
                f"secagg-threshold = {int(value)} is not above half of the {num_nodes} banks: "
                "two disjoint groups of t banks could each help unmask one bank; raise it, or "
                "give a fraction such as 0.67"
            )
        return int(value)
    raise SettingsError(
        f"secagg-threshold must be 0 (= 2/3), a fraction in (0.5, 1] or a whole count >= 2, "
        f"got {value:g} (at or below half, two disjoint halves could each unmask)"
    )


def secagg_dp(settings: BankAppSettings) -> DistributedDP | None:
    """The distributed-DP settings (``secagg-dp-*``), checked; None when ``secagg-dp`` is off."""
    raw = settings.raw
    if not secagg_dp_enabled(raw):
        return None
    target = _number(raw, "secagg-dp-target-epsilon", 0.0)
    sigma = _number(raw, "secagg-dp-noise-multiplier", 1.0)
    clip = _number(raw, "secagg-dp-clip-norm", 1.0)
    delta = _number(raw, "secagg-dp-delta", 1e-5)
    accountant = str(raw.get("secagg-dp-accountant", "rdp"))
    problems = []
    if target != 0 and not EPSILON_BOUNDS[0] <= target <= EPSILON_BOUNDS[1]:
        problems.append(
            f"secagg-dp-target-epsilon must be in [{EPSILON_BOUNDS[0]:g}, "
            f"{EPSILON_BOUNDS[1]:g}] (or 0: use secagg-dp-noise-multiplier), got {target:g}"
        )
    if not DELTA_BOUNDS[0] <= delta <= DELTA_BOUNDS[1]:
        problems.append(
            f"secagg-dp-delta must be in [{DELTA_BOUNDS[0]:g}, {DELTA_BOUNDS[1]:g}], got {delta:g}"
        )
    if not clip > 0:
        problems.append(f"secagg-dp-clip-norm must be > 0, got {clip:g}")
    if target == 0 and not sigma > 0:
        problems.append(f"secagg-dp-noise-multiplier must be > 0 (0 is no privacy), got {sigma:g}")
    if problems:
        raise SettingsError("invalid distributed-DP settings: " + "; ".join(problems))
    try:
        if target > 0:
            return DistributedDP.for_target_epsilon(
                target, settings.num_rounds, clip, delta, accountant
            )
        return DistributedDP(sigma, clip, delta, accountant)
    except DistributedDPError as err:
        raise SettingsError(f"invalid distributed-DP settings (secagg-dp-*): {err}") from err


def secagg_problem(settings: BankAppSettings) -> str:
    """Why ``secagg = true`` (or ``secagg-dp``) cannot run with these settings ("" if it can).

    Secure aggregation shows the server only the sum of dense, pre-scaled updates:
    robust rules, top-k, weight caps, SCAFFOLD's control deltas and FedNova's
    reweighting all need each bank's reply in clear; HE is a second, unnecessary
    layer. ``secagg-dp`` adds its own noise: update-level or DP-SGD noise on top
    would be a second mechanism, and personalisation / the local-only baseline would
    use the rows outside the accounting.
    """
    raw = settings.raw
    if not secagg_enabled(raw):
        if _flag_on(raw, "secagg-dp"):
            return "secagg-dp = true needs secagg = true (the noise shares only add up in the sum)"
        return ""
    refused = _robust_rule_refused(
        settings,
        "a robust rule needs every bank's plaintext update; the server sees only their sum",
    )
    if he_enabled(raw):
        refused.append("he = true (encrypting the masked updates as well is unnecessary)")
    ratio = raw.get(TOPK_RATIO_KEY, 0.0)
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0:
        refused.append(
            f"topk-ratio = {ratio} (masks cancel only over one shared set of coordinates)"
        )
    if settings.scaffold:
        refused.append("scaffold = true (the server must read each bank's control delta)")
    if settings.fednova:
        refused.append("fednova = true (the server cannot reweight updates it never sees)")
    for key in ("max-weight", "max-weight-median-multiple"):
        value = raw.get(key, 0.0)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            refused.append(f"{key} = {value} (banks pre-scale by their own count)")
    if secagg_dp_enabled(raw):
        mode = str(raw.get("dp", "off"))
        if mode != "off":
            refused.append(
                f"dp = '{mode}' together with secagg-dp = true (one DP mechanism at a time: "
                "set dp = 'off' for distributed DP)"
            )
        if settings.personalisation.enabled:
            refused.append(
                "personalisation with secagg-dp = true (it would use the protected rows "
                "outside the accounting)"
            )
    if not refused:
        return ""
    return (
        "secagg = true cannot be combined with "
        + "; ".join(refused)
        + " (set secagg = false, or change those keys)"
    )


def _flag_on(raw: Mapping[str, object], key: str) -> bool:
    value = raw.get(key, False)
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on")


def build_secure_strategy(
    settings: BankAppSettings, common: dict[str, Any], num_nodes: int
) -> SecureFedAvg:
    """``SecureFedAvg`` from the ``secagg-*`` keys (after :func:`secagg_problem`)."""
    raw = settings.raw
    bits = raw.get("secagg-quantization-bits", 22)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise SettingsError(f"secagg-quantization-bits must be a whole number, got {bits!r}")
    clipping = _number(raw, "secagg-clipping-range", 0.0)
    if clipping < 0:
        raise SettingsError(f"secagg-clipping-range must be > 0 (0 = automatic), got {clipping:g}")
    arguments = {k: v for k, v in common.items() if k not in ("max_weight",)}
    try:
        strategy = SecureFedAvg(
            **arguments,
            threshold=secagg_threshold(raw, num_nodes),
            clipping_range=clipping or None,
            quantization_bits=bits,
            step_timeout=settings.round_timeout,
            dp=secagg_dp(settings),
        )
        strategy.params_for(num_nodes)  # t, the range under DP and the modulus: checked now
        return strategy
    except ValueError as err:
        if isinstance(err, SettingsError):
            raise
        message = in_run_config_words(str(err))
        for argument, key in (
            ("clipping_range", "secagg-clipping-range"),
            ("quantization_bits", "secagg-quantization-bits"),
            ("threshold", "secagg-threshold"),
        ):
            message = message.replace(argument, key)
        raise SettingsError(f"secagg = true: {message}") from err
