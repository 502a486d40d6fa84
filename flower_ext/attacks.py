"""Attack kernels for testing defences: pure functions over update vectors.

A simulated attacker trains honestly, turns its reply into the update
``u = local - global`` and replaces it with one of these (the ClientApp mod
:mod:`flower_ext.mods.attack` does the plumbing). Nothing here imports Flower or
torch. Updates are 1-D float vectors (a flattened model); "honest" inputs are
``(k, d)`` matrices whose rows are honest updates the attackers know.

=============  ============================================  ==========================
name           sends                                         reference
=============  ============================================  ==========================
``sign-flip``  :math:`-s\\,u`                                 Damaskinos et al. 2018;
                                                             Allen-Zhu et al. 2020
``scaling``    :math:`s\\,u` (model replacement boost)        Bagdasaryan et al., AISTATS
                                                             2020
``gaussian``   :math:`\\mathcal N(0, \\sigma^2 I)`              Blanchard et al., NeurIPS
                                                             2017
``label-flip`` the honest update of training on ``1 - y``     Biggio et al., ICML 2012;
                                                             Fang et al., USENIX 2020
``alie``       :math:`\\mu - z\\,\\sigma` per coordinate        Baruch et al., NeurIPS 2019
``ipm``        :math:`-\\epsilon\\,\\mu`                        Xie et al., UAI 2019
``min-max``    :math:`\\mu + \\gamma p`, largest gamma whose     Shejwalkar & Houmansadr,
               farthest distance to an honest update is      NDSS 2021
               within the honest pairwise maximum
``min-sum``    as ``min-max``, with sums of squared          Shejwalkar & Houmansadr,
               distances                                     NDSS 2021
``fang-trim``  per coordinate, values just beyond the        Fang et al., USENIX
               honest extreme against the honest direction   Security 2020
``fang-krum``  :math:`-\\lambda s`, s = sign(mu), the        Fang et al., USENIX
               largest lambda Krum still selects             Security 2020
``mimic``      one honest client's update, copied by all     Karimireddy, He, Jaggi,
               (the one farthest from the honest mean)       ICLR 2022
``weight-``    trains on flipped labels and multiplies its   issue 14
``inflation``  reported ``num-examples`` (default 100x)
``poisoned-``  honest updates; its feature moments           issue 14
``standard-``  (standardisation query) have sum-sq x 1e4
``isation``
=============  ============================================  ==========================

Any attack also inflates the reported ``num-examples`` by ``count_factor`` when it
is above 1 (run config ``attack-count-factor``).

Where ALIE and IPM get :math:`\\mu` and :math:`\\sigma`: from the colluding
attackers' *own honest updates* (each malicious bank trains honestly on its
data; they pool those updates). That is the threat model of the ALIE paper
("the attackers use the mean and standard deviation of their own correct
gradients"); IPM assumes an omniscient attacker knowing the honest mean, and the
colluders' honest mean is its standard non-omniscient estimate. With one
attacker (k = 1) the standard deviation is 0, ALIE sends the honest update and
IPM sends ``-epsilon`` times it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import NDArray

ATTACKS = (
    "none",
    "sign-flip",
    "scaling",
    "gaussian",
    "label-flip",
    "alie",
    "ipm",
    "min-max",
    "min-sum",
    "fang-trim",
    "fang-krum",
    "mimic",
    "weight-inflation",
    "poisoned-standardisation",
)
#: Attacks that need the colluders' (or, with knowledge "all", every bank's) honest updates.
COLLUDING_ATTACKS = ("alie", "ipm", "min-max", "min-sum", "fang-trim", "fang-krum", "mimic")
#: Attacks whose malicious banks train on flipped labels.
LABEL_FLIP_ATTACKS = ("label-flip", "weight-inflation")
#: Who the attackers know the honest updates of: their own ("colluders"), or every bank.
KNOWLEDGE = ("colluders", "all")
PERTURBATIONS = ("std", "unit", "sign")

FloatVector = NDArray[np.floating[Any]]


def sign_flip(update: FloatVector, scale: float = 1.0) -> FloatVector:
    """The update reversed and scaled: ``-scale * u``."""
    return -float(scale) * np.asarray(update)


def scaling(update: FloatVector, scale: float) -> FloatVector:
    """Model replacement boost: ``scale * u`` (scale ~ n cancels the averaging)."""
    return float(scale) * np.asarray(update)


def gaussian_noise(update: FloatVector, std: float, rng: np.random.Generator) -> FloatVector:
    """Pure noise of the update's shape and dtype: ``N(0, std^2)`` per coordinate."""
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std!r}")
    u = np.asarray(update)
    return rng.normal(0.0, float(std), size=u.shape).astype(u.dtype, copy=False)


def flip_labels(labels: NDArray[Any], num_classes: int = 2) -> NDArray[Any]:
    """Label ``y`` becomes ``num_classes - 1 - y`` (for 0/1 defaults: ``1 - y``)."""
    y = np.asarray(labels)
    return (num_classes - 1) - y


def alie_z_max(num_clients: int, num_malicious: int) -> float:
    r"""Baruch et al.'s largest z that still hides the attackers.

    :math:`s = \lfloor n/2 + 1 \rfloor - f` honest clients must look farther
    from the mean than the attackers; :math:`z = \Phi^{-1}((n - s)/n)`.
    """
    n, f = int(num_clients), int(num_malicious)
    if n < 2 or not 0 < f < n:
        raise ValueError(f"ALIE needs 0 < f < n and n >= 2, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(f"ALIE's z_max is undefined for n={n}, f={f}")
    return NormalDist().inv_cdf(p)


def _honest_matrix(honest: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    h = np.asarray(honest, dtype=np.float64)
    if h.ndim == 1:
        h = h[None, :]
    if h.ndim != 2 or h.shape[0] == 0:
        raise ValueError(f"honest updates must be a non-empty (k, d) matrix, got {h.shape}")
    return h


def alie(honest: NDArray[np.floating[Any]], z: float) -> NDArray[np.float64]:
    r"""A Little Is Enough: :math:`\mu_j - z\,\sigma_j` per coordinate.

    :math:`\mu, \sigma` are the mean and (population) standard deviation of the
    rows of ``honest``. Every attacker sends the same vector: close enough to
    the honest cloud to survive distance- and coordinate-based rules, always
    pushed the same way.
    """
    h = _honest_matrix(honest)
    return h.mean(axis=0) - float(z) * h.std(axis=0)


def ipm(honest: NDArray[np.floating[Any]], epsilon: float) -> NDArray[np.float64]:
    r"""Inner product manipulation: :math:`-\epsilon\,\mu`.

    With a small ``epsilon`` the malicious update stays close to the honest ones,
    yet makes the aggregate's inner product with the true gradient negative
    once enough attackers join.
    """
    h = _honest_matrix(honest)
    return -float(epsilon) * h.mean(axis=0)


def _perturbation(h: NDArray[np.float64], kind: str) -> NDArray[np.float64]:
    """Shejwalkar & Houmansadr's perturbation directions ``p`` (pushing against mu)."""
    mu = h.mean(axis=0)
    if kind == "std":  # inverse standard deviation: -sigma
        return -h.std(axis=0)
    if kind == "unit":  # inverse unit vector: -mu / |mu|
        norm = float(np.linalg.norm(mu))
        return -mu / norm if norm > 0 else np.zeros_like(mu)
    if kind == "sign":  # inverse sign: -sign(mu)
        return -np.sign(mu)
    raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")


def _largest_gamma(
    fits: Any, gamma: float = 10.0, tol: float = 1e-5, max_steps: int = 200
) -> float:
    """Largest gamma with ``fits(gamma)`` by the paper's halving search (Alg. 1).

    From ``gamma``, step ``gamma / 2``: go up by the step while it fits, down
    while it does not, halving the step each time, until the step is below ``tol``.
    """
    step, best = gamma / 2.0, 0.0
    for _ in range(max_steps):
        if fits(gamma):
            best = max(best, gamma)
            gamma += step
        else:
            gamma -= step
        step /= 2.0
        if step < tol:
            break
    return best


def min_max(
    honest: NDArray[np.floating[Any]], perturbation: str = "std", gamma_init: float = 10.0
) -> NDArray[np.float64]:
    r"""Min-Max (AGR-agnostic): :math:`m = \mu + \gamma p` with the largest gamma such that

    .. math:: \max_i \lVert m - h_i \rVert \le \max_{i,j} \lVert h_i - h_j \rVert

    so the malicious update is never farther from an honest one than two honest
    updates are from each other. Shejwalkar & Houmansadr, "Manipulating the
    Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated
    Learning", NDSS 2021. ``honest`` (k, d); returns (d,) float64. With k = 1 the
    bound is 0 and the honest update itself is returned.
    """
    h = _honest_matrix(honest)
    mu, p = h.mean(axis=0), _perturbation(h, perturbation)
    diff = h[:, None, :] - h[None, :, :]
    bound = float(np.sqrt((diff**2).sum(axis=2)).max())

    def fits(gamma: float) -> bool:
        m = mu + gamma * p
        return float(np.linalg.norm(h - m, axis=1).max()) <= bound

    return mu + _largest_gamma(fits, gamma_init) * p


def min_sum(
    honest: NDArray[np.floating[Any]], perturbation: str = "std", gamma_init: float = 10.0
) -> NDArray[np.float64]:
    r"""Min-Sum (AGR-agnostic): :math:`m = \mu + \gamma p`, the largest gamma with

    .. math:: \sum_i \lVert m - h_i \rVert^2 \le \max_i \sum_j \lVert h_i - h_j \rVert^2

    (no farther from the honest updates, in total, than the most remote honest
    one). Shejwalkar & Houmansadr, NDSS 2021. ``honest`` (k, d); returns (d,).
    """
    h = _honest_matrix(honest)
    mu, p = h.mean(axis=0), _perturbation(h, perturbation)
    diff = h[:, None, :] - h[None, :, :]
    bound = float((diff**2).sum(axis=2).sum(axis=1).max())

    def fits(gamma: float) -> bool:
        m = mu + gamma * p
        return float(((h - m) ** 2).sum()) <= bound

    return mu + _largest_gamma(fits, gamma_init) * p


def fang_trimmed_mean(
    honest: NDArray[np.floating[Any]], num_malicious: int, rng: np.random.Generator, b: float = 2.0
) -> NDArray[np.float64]:
    r"""Fang et al.'s full-knowledge attack on trimmed mean and median, one row per attacker.

    Per coordinate j, with :math:`s_j = \mathrm{sign}(\mu_j)` the honest direction
    and :math:`w_{\max,j}, w_{\min,j}` the honest extremes: if :math:`s_j > 0`
    every attacker sends a value drawn uniformly from
    :math:`[w_{\min,j}/b, w_{\min,j}]` (when :math:`w_{\min,j} > 0`) or
    :math:`[b\,w_{\min,j}, w_{\min,j}]` (otherwise); if :math:`s_j \le 0`, from
    :math:`[w_{\max,j}, b\,w_{\max,j}]` or :math:`[w_{\max,j}, w_{\max,j}/b]`.
    The values sit just past the honest extreme, against the honest direction,
    so trimming keeps pulling the aggregate the wrong way. Fang, Cao, Jia, Gong,
    "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
    USENIX Security 2020 (``b = 2`` as there).

    Returns (num_malicious, d) float64.
    """
    h = _honest_matrix(honest)
    if not b > 1:
        raise ValueError(f"b must be > 1, got {b!r}")
    mu, w_max, w_min = h.mean(axis=0), h.max(axis=0), h.min(axis=0)
    lo = np.where(
        mu > 0,
        np.where(w_min > 0, w_min / b, b * w_min),
        w_max,
    )
    hi = np.where(
        mu > 0,
        w_min,
        np.where(w_max > 0, b * w_max, w_max / b),
    )
    u = rng.uniform(size=(int(num_malicious), h.shape[1]))
    return lo + u * (hi - lo)


def fang_krum(
    honest: NDArray[np.floating[Any]],
    num_malicious: int,
    lambda_init: float | None = None,
    tol: float = 1e-5,
) -> NDArray[np.float64]:
    r"""Fang et al.'s full-knowledge attack on Krum: :math:`m = -\lambda\,\mathrm{sign}(\mu)`.

    All ``num_malicious`` = c attackers send m (their copies make each other's
    Krum neighbours). lambda starts at ``lambda_init`` (default: the largest honest
    norm / sqrt(d) x 10) and is halved until Krum, told f = c, selects m, down to
    ``tol`` (then m at ``tol``: the attack has not found a winning lambda). Fang et
    al., USENIX Security 2020, Sec. 4.2 (the crafted update relative to the
    global model; here the global model is the origin of the update space).

    Returns (d,) float64.
    """
    from flower_ext.aggregation import krum  # attacks stay importable without SciPy paths

    h = _honest_matrix(honest)
    c = int(num_malicious)
    if c < 1:
        raise ValueError(f"num_malicious must be >= 1, got {num_malicious!r}")
    direction = -np.sign(h.mean(axis=0))
    d = h.shape[1]
    lam = lambda_init
    if lam is None:
        lam = 10.0 * float(np.linalg.norm(h, axis=1).max()) / np.sqrt(d)
    n = h.shape[0] + c
    if n < 2 * c + 3:  # Krum cannot run; send the largest candidate
        return lam * direction
    while lam >= tol:
        m = lam * direction
        stacked = np.vstack([h, np.repeat(m[None, :], c, axis=0)])
        chosen = krum(stacked, np.ones(n), c).selected_rows
        if chosen and chosen[0] >= h.shape[0]:
            return m
        lam /= 2.0
    return tol * direction


def mimic(honest: NDArray[np.floating[Any]], target: int | None = None) -> NDArray[np.float64]:
    r"""Mimic: every attacker sends the same honest client's update.

    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing", ICLR 2022: in non-IID training, over-representing one honest
    client biases the model towards its data while every rule sees only honest
    values. The paper picks the client most aligned with the top principal
    direction of the honest updates; this kernel picks the honest row farthest
    from the honest mean (the same client when one direction dominates), or
    ``target``. Returns (d,) float64.
    """
    h = _honest_matrix(honest)
    if target is None:
        target = int(np.argmax(np.linalg.norm(h - h.mean(axis=0), axis=1)))
    return h[int(target)].copy()


def inflate_count(count: float, factor: float) -> int:
    """A reported ``num-examples`` multiplied by ``factor`` (weight inflation), as an int."""
    if not factor >= 1:
        raise ValueError(f"count factor must be >= 1, got {factor!r}")
    return round(float(count) * float(factor))


def poison_moments(
    count: int, total: NDArray[Any], total_sq: NDArray[Any], factor: float = 1e4
) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """Poisoned standardisation: the sum of squares multiplied by ``factor``.

    Plain sums then make every feature's std about ``sqrt(factor / n_banks)``
    times too large for the whole run (issue 14); the counts and sums are kept so
    the bank looks consistent. Returns (count, sum, sum-sq) in float64.
    """
    return (
        int(count),
        np.asarray(total, dtype=np.float64),
        np.asarray(total_sq, dtype=np.float64) * float(factor),
    )


@dataclass(frozen=True)
class AttackConfig:
    """Which attack, by whom, with what strength (read from the run config)."""

    attack: str = "none"
    malicious: tuple[int, ...] = ()
    scale: float = 10.0
    noise_std: float = 1.0
    alie_z: float = 0.0  # 0: alie_z_max(num_clients, len(malicious))
    ipm_epsilon: float = 5.0
    seed: int = 0
    num_clients: int = 0  # for ALIE's z_max
    count_factor: float = 0.0  # 0: 100 for weight-inflation, else 1 (no inflation)
    moments_factor: float = 1e4  # poisoned-standardisation: sum-sq multiplier
    knowledge: str = "colluders"  # or "all": honest updates of every bank
    perturbation: str = "std"  # min-max / min-sum direction: std, unit or sign

    def __post_init__(self) -> None:
        if self.knowledge not in KNOWLEDGE:
            raise ValueError(f"attack-knowledge must be one of {', '.join(KNOWLEDGE)}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"attack-perturbation must be one of {', '.join(PERTURBATIONS)}")
        if self.count_factor != 0 and not self.count_factor >= 1:
            raise ValueError(f"attack-count-factor must be 0 or >= 1, got {self.count_factor}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}; got '{self.attack}'")
        if any(i < 0 for i in self.malicious):
            raise ValueError(f"malicious indices must be >= 0, got {self.malicious}")
        if self.attack == "gaussian" and not self.noise_std >= 0:
            raise ValueError(f"attack-noise-std must be >= 0, got {self.noise_std}")

    @classmethod
    def from_config(cls, cfg: Any, num_clients: int = 0) -> AttackConfig:
        """From run-config keys ``attack``, ``malicious-banks``, ``attack-scale``, ..."""
        d = cls()
        text = str(cfg.get("malicious-banks", "")).strip()
        try:
            malicious = tuple(sorted({int(p) for p in text.replace(" ", "").split(",") if p}))
            return cls(
                attack=str(cfg.get("attack", d.attack)).strip().lower() or "none",
                malicious=malicious,
                scale=float(cfg.get("attack-scale", d.scale)),
                noise_std=float(cfg.get("attack-noise-std", d.noise_std)),
                alie_z=float(cfg.get("attack-alie-z", d.alie_z)),
                ipm_epsilon=float(cfg.get("attack-ipm-epsilon", d.ipm_epsilon)),
                seed=int(cfg.get("attack-seed", d.seed)),
                num_clients=int(cfg.get("num-banks", num_clients) or num_clients),
                count_factor=float(cfg.get("attack-count-factor", d.count_factor)),
                moments_factor=float(cfg.get("attack-moments-factor", d.moments_factor)),
                knowledge=str(cfg.get("attack-knowledge", d.knowledge)).strip().lower(),
                perturbation=str(cfg.get("attack-perturbation", d.perturbation)).strip().lower(),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid attack run config: {err}") from err

    def z(self) -> float:
        if self.alie_z > 0:
            return self.alie_z
        return alie_z_max(self.num_clients, len(self.malicious))

    def effective_count_factor(self) -> float:
        """The ``num-examples`` multiplier: ``count_factor``, or the attack's default."""
        if self.count_factor >= 1:
            return self.count_factor
        return 100.0 if self.attack == "weight-inflation" else 1.0

    def is_malicious(self, index: int | None) -> bool:
        return self.attack != "none" and index is not None and index in self.malicious


def apply_attack(
    cfg: AttackConfig,
    update: FloatVector,
    *,
    honest: NDArray[np.floating[Any]] | None = None,
    rng: np.random.Generator | None = None,
    attacker_rank: int = 0,
    server_round: int = 0,
) -> NDArray[np.float64]:
    """The malicious update for ``cfg.attack`` from the attacker's honest ``update``.

    ``honest`` (k, d) are the honest updates the attackers know (COLLUDING_ATTACKS;
    the attacker's own update is used alone if omitted). ``label-flip``,
    ``weight-inflation``, ``poisoned-standardisation`` and ``none`` return the
    update unchanged: they act during training, on the count, or on the
    standardisation query. ``fang-trim`` returns attacker ``attacker_rank``'s row
    (0-based among the malicious banks), drawn from a generator seeded by
    ``(seed, server_round)`` so every colluder draws the same rows.
    """
    u = np.asarray(update, dtype=np.float64)
    if cfg.attack in ("none", "label-flip", "weight-inflation", "poisoned-standardisation"):
        return u
    if cfg.attack == "sign-flip":
        return sign_flip(u, cfg.scale)
    if cfg.attack == "scaling":
        return scaling(u, cfg.scale)
    if cfg.attack == "gaussian":
        return gaussian_noise(u, cfg.noise_std, rng or np.random.default_rng(cfg.seed))
    samples = u[None, :] if honest is None else _honest_matrix(honest)
    if cfg.attack == "alie":
        return alie(samples, cfg.z())
    if cfg.attack == "ipm":
        return ipm(samples, cfg.ipm_epsilon)
    if cfg.attack == "min-max":
        return min_max(samples, cfg.perturbation)
    if cfg.attack == "min-sum":
        return min_sum(samples, cfg.perturbation)
    if cfg.attack == "fang-trim":
        rows = fang_trimmed_mean(
            samples, len(cfg.malicious) or 1, np.random.default_rng([cfg.seed, 1, server_round])
        )
        return rows[min(attacker_rank, rows.shape[0] - 1)]
    if cfg.attack == "fang-krum":
        return fang_krum(samples, len(cfg.malicious) or 1)
    return mimic(samples)
