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
=============  ============================================  ==========================

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

ATTACKS = ("none", "sign-flip", "scaling", "gaussian", "label-flip", "alie", "ipm")
#: Attacks that need the colluders' honest updates.
COLLUDING_ATTACKS = ("alie", "ipm")

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

    def __post_init__(self) -> None:
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
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid attack run config: {err}") from err

    def z(self) -> float:
        if self.alie_z > 0:
            return self.alie_z
        return alie_z_max(self.num_clients, len(self.malicious))

    def is_malicious(self, index: int | None) -> bool:
        return self.attack != "none" and index is not None and index in self.malicious


def apply_attack(
    cfg: AttackConfig,
    update: FloatVector,
    *,
    honest: NDArray[np.floating[Any]] | None = None,
    rng: np.random.Generator | None = None,
) -> NDArray[np.float64]:
    """The malicious update for ``cfg.attack`` from the attacker's honest ``update``.

    ``honest`` (k, d) are the colluders' honest updates for ALIE and IPM (the
    attacker's own update is used alone if omitted). ``label-flip`` and ``none``
    return the update unchanged: label flipping acts during training.
    """
    u = np.asarray(update, dtype=np.float64)
    if cfg.attack in ("none", "label-flip"):
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
    return ipm(samples, cfg.ipm_epsilon)
