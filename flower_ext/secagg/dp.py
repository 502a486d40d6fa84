"""Distributed differential privacy on top of secure aggregation: the maths, no Flower.

Each bank clips its update to L2 norm ``C`` and adds its *share* of Gaussian noise
before masking; the server unmasks only the sum, so the noise it sees is the sum of
the honest banks' shares. The target is the noise a trusted server would add to the
sum of clipped updates, ``N(0, (sigma C)^2)`` per coordinate (Kairouz, Liu and
Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML 2021, with continuous instead of discrete noise; the
secure aggregation of Bonawitz et al., CCS 2017 and Bell et al., CCS 2020).

**Who must be honest.** Each of the ``n`` sampled banks adds
``N(0, (sigma C)^2 / t)`` per coordinate, ``t`` the secure-aggregation threshold.
A sum is only ever unmasked with at least ``t`` survivors (below ``t`` the round is
abandoned and nothing is released), so if every survivor is honest the sum carries
at least ``t (sigma C)^2 / t = (sigma C)^2``: the trusted-server noise. A bank that
drops out takes its noise with it; a bank that colludes with the server knows its
own noise, so it does not count either. With ``k`` banks dropped or colluding the
honest noise is ``(n - k) / t`` times the target variance: the guarantee stated
for ``k = n - t`` is the nominal one, and every ``k < n - t`` is better.
:func:`epsilon_if_missing` gives the whole table ``k = 0 .. n - t``.

**Neighbouring relation and weights.** As the app's update-level DP
(:data:`flower_ext.privacy.accounting.UPDATE_SENSITIVITY`): replace one bank's
whole contribution by any other. Under DP every bank has the *same* weight: it
sends ``clip(update) + noise``, the server divides the sum by the number of
survivors (public). The L2 sensitivity of the sum is then ``2C`` whatever the
banks' row counts, and a bank that inflates its count gains nothing. The
alternative (clip, then pre-scale by ``n_i / N``) has sensitivity
``2 max_i (n_i / N) C``, which needs every count to be true and public and wastes
noise on every smaller bank; it is not offered. The accountant (Opacus RDP or PRV)
sees the multiplier ``sigma sqrt(h / t) / 2`` per round (``h`` honest survivors)
at sample rate 1: the server chooses the banks, so no amplification by sampling
is claimed. A round abandoned before ``t`` banks answered its unmask request costs
nothing; one abandoned after that is counted (the server could compute its sum).

**Quantisation, clamping and the modulus.** The noise is added in floating point
*before* the fixed-point encoding of :mod:`flower_ext.secagg.protocol`:

- stochastic rounding adds a zero-mean error below one quantum ``Delta = 2c / R``
  per bank and coordinate (std at most ``Delta / 2``), which depends on the noised
  value: it is not covered by the analysis, and :func:`rounding_to_noise_ratio`
  states its size against the noise (about ``2e-6`` with the app's defaults).
  The exact treatment is the discrete Gaussian of Kairouz et al. (not done here);
- every coordinate is clamped to ``[-c, c]`` after the noise. A clamp is a
  non-linear step the Gaussian analysis does not cover;
  :func:`clamp_probability` bounds its chance per coordinate and
  :func:`dp_clipping_range` picks ``c = C + 8 s`` (``s`` the per-bank noise std)
  by default, where the bound is below ``7e-16``. Under DP the banks do not
  report how many coordinates they clamped (that count would be a statistic of
  their update outside the guarantee);
- the sum of at most :attr:`~flower_ext.secagg.protocol.SecAggParams.max_banks`
  quantised values never wraps modulo ``2^m``, so the modular arithmetic is exact
  and changes nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: L2 sensitivity of the sum, in units of the clip norm: replacing one bank's clipped
#: update by another moves the sum by at most ``2C`` (as the app's update-level DP).
SENSITIVITY = 2.0
ACCOUNTANTS = ("rdp", "prv")
#: Default clamping range in per-bank noise stds above the clip norm (see the module).
DEFAULT_TAIL = 8.0


class DistributedDPError(ValueError):
    """A distributed-DP setting that cannot work; the message names it."""


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DistributedDPError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise DistributedDPError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def _check_banks(honest: int, min_honest: int) -> None:
    if int(min_honest) < 1:
        raise DistributedDPError(f"min_honest must be at least 1, got {min_honest}")
    if int(honest) < 1:
        raise DistributedDPError(f"at least one honest bank is needed, got {honest}")


def per_bank_noise_std(noise_multiplier: float, clip_norm: float, min_honest: int) -> float:
    """Std of the Gaussian noise each bank adds per coordinate: ``sigma C / sqrt(t)``.

    ``min_honest`` (``t``) banks' shares add up to the target ``N(0, (sigma C)^2)``.
    Same unit as the update (model-parameter units).
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    norm = _check_positive("clip_norm", clip_norm)
    _check_banks(min_honest, min_honest)
    return sigma * norm / math.sqrt(int(min_honest))


def honest_noise_multiplier(noise_multiplier: float, min_honest: int, honest: int) -> float:
    """Std of the honest noise in the sum over ``C``: ``sigma sqrt(h / t)``.

    ``h = honest`` banks' shares each of variance ``(sigma C)^2 / t``.
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier)
    _check_banks(honest, min_honest)
    return sigma * math.sqrt(int(honest) / int(min_honest))


def accounted_noise_multiplier(noise_multiplier: float, min_honest: int, honest: int) -> float:
    """What the accountant sees for one round: honest noise std over the sensitivity ``2C``."""
    return honest_noise_multiplier(noise_multiplier, min_honest, honest) / SENSITIVITY


def central_epsilon(
    accounted_multipliers: Sequence[float], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of releasing one Gaussian sum per entry (sample rate 1), composed (Opacus).

    ``accounted_multipliers``: one per released round, noise std over sensitivity.
    Returns 0.0 for no rounds. Raises :class:`DistributedDPError` for a bad delta,
    accountant or multiplier.
    """
    if accountant not in ACCOUNTANTS:
        raise DistributedDPError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0 < float(delta) < 1:
        raise DistributedDPError(f"delta must be in (0, 1), got {delta!r}")
    history: list[tuple[float, float, int]] = []
    for value in accounted_multipliers:
        sigma = _check_positive("accounted noise multiplier", value)
        if history and history[-1][0] == sigma:
            history[-1] = (sigma, 1.0, history[-1][2] + 1)
        else:
            history.append((sigma, 1.0, 1))
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = history  # type: ignore[assignment]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": still a bound
        warnings.filterwarnings("ignore", message=".*[Oo]ptimal order.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # PRV at q = 1: log(0)
        return float(acc.get_epsilon(delta=float(delta)))


def noise_multiplier_for_epsilon(
    target_epsilon: float, delta: float, rounds: int, accountant: str = "rdp"
) -> float:
    """The smallest ``sigma`` whose sum with ``t`` honest banks spends ``target_epsilon``.

    Opacus's ``get_noise_multiplier`` at sample rate 1 over ``rounds`` releases gives
    the accounted multiplier; ``sigma`` is that times :data:`SENSITIVITY`.
    """
    target = _check_positive("target_epsilon", target_epsilon)
    if int(rounds) < 1:
        raise DistributedDPError(f"rounds must be at least 1, got {rounds}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]ptimal order.*")
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            accounted = get_noise_multiplier(
                target_epsilon=target,
                target_delta=float(delta),
                sample_rate=1.0,
                steps=int(rounds),
                accountant=accountant,
            )
    except (ValueError, OverflowError) as err:
        raise DistributedDPError(
            f"target epsilon {target} cannot be reached at delta {delta} over {rounds} "
            f"rounds: {err}"
        ) from err
    return float(accounted) * SENSITIVITY


def epsilon_if_missing(
    noise_multiplier: float,
    rounds: Sequence[tuple[int, int]],
    delta: float,
    accountant: str = "rdp",
) -> dict[int, float]:
    """``{k: epsilon}`` when ``k`` banks of every round drop out or collude, ``k = 0..n - t``.

    ``rounds``: one ``(n, t)`` per released round (banks sampled, threshold). ``k`` runs
    up to the smallest ``n - t`` (beyond it a round would have been abandoned, or the
    coalition could unmask). ``epsilon[n - t]`` is the nominal guarantee.
    """
    if not rounds:
        return {0: 0.0}
    for n, t in rounds:
        if not 1 <= int(t) <= int(n):
            raise DistributedDPError(f"a round needs 1 <= t <= n, got n={n}, t={t}")
    most = min(int(n) - int(t) for n, t in rounds)
    return {
        k: central_epsilon(
            [accounted_noise_multiplier(noise_multiplier, t, n - k) for n, t in rounds],
            delta,
            accountant,
        )
        for k in range(most + 1)
    }


def clip_to_norm(vector: np.ndarray, clip_norm: float) -> np.ndarray:
    """``vector * min(1, C / ||vector||_2)`` (float64, shape kept); the norm never leaves.

    Raises :class:`DistributedDPError` on NaN or Inf (a NaN norm would skip the clip).
    """
    norm_bound = _check_positive("clip_norm", clip_norm)
    values = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise DistributedDPError("the update has NaN or Inf values: it cannot be clipped")
    norm = float(np.linalg.norm(values.reshape(-1)))
    return values * min(1.0, norm_bound / norm) if norm > 0 else values.copy()


def noised_share(
    update: np.ndarray,
    clip_norm: float,
    noise_std: float,
    rng: np.random.Generator,
    free: np.ndarray | None = None,
) -> np.ndarray:
    """One bank's DP contribution: ``clip(update, C) + N(0, noise_std^2)`` per coordinate.

    ``free`` (bool, the shape of ``update``; default all True) marks the coordinates
    training may change; the others (frozen buffers) are sent as exactly 0, without
    noise, and do not count towards the norm. ``rng`` must be unpredictable to
    everyone else (the app passes :func:`flower_ext.privacy.secure_numpy_generator`);
    a seeded one only in tests.
    """
    std = _check_positive("noise_std", noise_std)
    values = np.asarray(update, dtype=np.float64)
    if free is None:
        return clip_to_norm(values, clip_norm) + rng.normal(0.0, std, size=values.shape)
    free = np.asarray(free, dtype=bool)
    if free.shape != values.shape:
        raise DistributedDPError(f"free has shape {free.shape}, the update {values.shape}")
    out = np.zeros_like(values)
    out[free] = clip_to_norm(values[free], clip_norm) + rng.normal(0.0, std, size=int(free.sum()))
    return out


def clamp_probability(clipping_range: float, clip_norm: float, noise_std: float) -> float:
    """Upper bound on ``P(|x + z| > c)`` for one coordinate, ``|x| <= C``, ``z ~ N(0, s^2)``.

    ``Phi(-(c - C) / s) + Phi(-(c + C) / s)`` (the worst case ``|x| = C``); 1.0 when
    ``c <= C``.
    """
    c = _check_positive("clipping_range", clipping_range)
    norm = _check_positive("clip_norm", clip_norm)
    s = _check_positive("noise_std", noise_std)
    if c <= norm:
        return 1.0
    tail = 0.5 * math.erfc((c - norm) / (s * math.sqrt(2.0)))
    return tail + 0.5 * math.erfc((c + norm) / (s * math.sqrt(2.0)))


def dp_clipping_range(clip_norm: float, noise_std: float, tail: float = DEFAULT_TAIL) -> float:
    """Coordinate range ``c = C + tail * s`` that a clipped, noised coordinate rarely leaves."""
    return _check_positive("clip_norm", clip_norm) + _check_positive(
        "tail", tail
    ) * _check_positive("noise_std", noise_std)


def rounding_to_noise_ratio(quantum: float, noise_std: float) -> float:
    """Std bound of one bank's stochastic-rounding error (``quantum / 2``) over its noise std."""
    return _check_positive("quantum", quantum) / 2.0 / _check_positive("noise_std", noise_std)


@dataclass(frozen=True)
class DistributedDP:
    """Distributed-DP settings of a federation (server side; the banks get ``C`` and ``s``).

    Parameters
    ----------
    noise_multiplier : float
        ``sigma``: std of the honest noise in the unmasked sum over ``C`` when exactly
        ``t`` honest banks contribute (more honest banks: more noise).
    clip_norm : float
        ``C``: L2 bound of each bank's update (model-parameter units).
    delta : float
        The ``delta`` epsilon is reported for.
    accountant : str
        ``"rdp"`` or ``"prv"`` (Opacus).
    """

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _check_positive("noise_multiplier", self.noise_multiplier)
        _check_positive("clip_norm", self.clip_norm)
        if not 0 < float(self.delta) < 1:
            raise DistributedDPError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise DistributedDPError(
                f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}"
            )

    @classmethod
    def for_target_epsilon(
        cls,
        target_epsilon: float,
        rounds: int,
        clip_norm: float,
        delta: float = 1e-5,
        accountant: str = "rdp",
    ) -> DistributedDP:
        """Noise such that ``rounds`` releases with ``t`` honest banks spend the target."""
        sigma = noise_multiplier_for_epsilon(target_epsilon, delta, rounds, accountant)
        return cls(sigma, clip_norm, delta, accountant)

    def noise_std(self, threshold: int) -> float:
        """Per-bank noise std for threshold ``t`` (:func:`per_bank_noise_std`)."""
        return per_bank_noise_std(self.noise_multiplier, self.clip_norm, threshold)

    def epsilon(self, rounds: Sequence[tuple[int, int]]) -> float:
        """Epsilon after ``(honest, t)`` per released round."""
        return central_epsilon(
            [accounted_noise_multiplier(self.noise_multiplier, t, h) for h, t in rounds],
            self.delta,
            self.accountant,
        )

    def if_missing(self, rounds: Sequence[tuple[int, int]]) -> dict[int, float]:
        """:func:`epsilon_if_missing` for ``(n, t)`` per released round."""
        return epsilon_if_missing(self.noise_multiplier, rounds, self.delta, self.accountant)

    def to_dict(self) -> dict[str, float | str]:
        return {
            "noise-multiplier": float(self.noise_multiplier),
            "clip-norm": float(self.clip_norm),
            "delta": float(self.delta),
            "accountant": self.accountant,
        }
