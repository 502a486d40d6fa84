"""Server-side adaptive optimisers: FedAdagrad, FedAdam and FedYogi as pure kernels.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295),
Algorithm 2. The server treats the round's aggregated update ``delta_t`` (the
weighted mean, or a robust rule's aggregate, of ``local - global``) as a
pseudo-gradient with the sign of a descent step, and applies, per coordinate::

    m_t = beta1 * m_{t-1} + (1 - beta1) * delta_t              (adam, yogi)
    m_t = delta_t                                              (adagrad: beta1 = 0)
    v_t = v_{t-1} + delta_t**2                                 (adagrad)
    v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t**2           (adam)
    v_t = v_{t-1} - (1 - beta2) * delta_t**2 * sign(v_{t-1} - delta_t**2)   (yogi)
    x_{t+1} = x_t + eta_t * m_t / (sqrt(v_t) + tau)

with ``eta_t = eta`` for adagrad and yogi, and for adam the bias-corrected rate of
Kingma and Ba (ICLR 2015, the line before their Section 2.1)::

    eta_t = eta * sqrt(1 - beta2**t) / (1 - beta1**t),    t = 1, 2, ... the step count

Shapes: ``delta`` is one flat vector of d float values (the model's layout, as
:class:`flower_ext.records.FlatModel` flattens it); ``m`` and ``v`` have the same
shape and are kept in float64. Units: ``delta``, ``m`` and the returned increment
are in the model's weight units; ``v`` in weight units squared; ``tau`` in weight
units (it bounds the per-coordinate step at ``eta_t * |m| / tau``); ``eta`` is
dimensionless for adam and yogi (each coordinate moves by about ``eta`` per step
once ``|delta| >> tau``), so it is much smaller than an SGD server rate of 1:
Flower's defaults are 0.1 (FedAdam, FedAdagrad) and 0.01 (FedYogi).

Semantics against Flower 1.42's ``flwr.serverapp.strategy.FedAdagrad``,
``FedAdam`` and ``FedYogi`` (``fedopt.py``), on the same sequence of aggregates:

- the same ``m`` and ``v`` recursions, ``m_0 = v_0 = 0`` (the paper allows any
  ``v_{-1} >= tau**2``; Flower and we start at 0, ``tau`` outside the square root
  keeps the division defined), FedAdagrad's ``beta1 = 0``, ``tau`` added to
  ``sqrt(v)``, no bias correction for adagrad and yogi: identical results;
- **deliberate difference**, adam's bias correction: Flower uses
  ``t = server_round + 1`` (so its first step is already corrected as a second
  one: about 0.74x ``eta`` with the default betas); we use ``t`` = the number of
  steps this optimiser has applied, as Kingma and Ba define it, which also stays
  right when a round is skipped (no step) or a run is resumed. Started from
  ``ServerOptState(steps=1)`` our FedAdam reproduces Flower's exactly
  (``tests/test_server_opt.py`` checks it).

Nothing here imports Flower or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Server optimisers a strategy accepts (``server_optimizer``); "sgd" is ``w += lr * v``
#: with optional FedAvgM momentum, handled by the strategy itself.
SERVER_OPTIMIZERS = ("sgd", "adagrad", "adam", "yogi")
#: The adaptive ones, implemented by :class:`ServerOptimizer`.
ADAPTIVE_OPTIMIZERS = ("adagrad", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptState:
    """The optimiser's state: first and second moments (float64, shape (d,)), steps applied.

    ``m`` and ``v`` are ``None`` before the first step (then taken as zeros).
    """

    m: np.ndarray | None = None
    v: np.ndarray | None = None
    steps: int = 0

    def fits(self, dim: int) -> bool:
        """Whether the moments are for a model of ``dim`` values (or not started yet)."""
        return (self.m is None or self.m.shape == (dim,)) and (
            self.v is None or self.v.shape == (dim,)
        )


@dataclass(frozen=True)
class ServerOptimizer:
    """One adaptive server optimiser (``kind`` = "adagrad", "adam" or "yogi"), stateless.

    The state lives in a :class:`ServerOptState` that :meth:`step` takes and returns,
    so a caller can drop a step (e.g. when the new model would not be finite) without
    having changed anything.

    Parameters
    ----------
    kind : str
        "adagrad", "adam" or "yogi".
    eta : float
        Server learning rate, > 0 and finite.
    beta1 : float (default: 0.9)
        First-moment decay in [0, 1); not used by adagrad (``m_t = delta_t``, as
        Flower's FedAdagrad).
    beta2 : float (default: 0.99)
        Second-moment decay in [0, 1) for adam and yogi; not used by adagrad.
    tau : float (default: 1e-3)
        Adaptivity floor added to ``sqrt(v)``, > 0 and finite.

    Raises
    ------
    ValueError
        For an unknown ``kind`` or a parameter outside its range.
    """

    kind: str
    eta: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_server_optimizer(self.kind, self.eta, self.beta1, self.beta2, self.tau)
        if self.kind == "sgd":
            raise ValueError("ServerOptimizer is adaptive; 'sgd' (w += lr * v) is the strategy's")

    def step(self, state: ServerOptState, delta: np.ndarray) -> tuple[np.ndarray, ServerOptState]:
        """The increment ``x_{t+1} - x_t`` for the aggregate ``delta``, and the new state.

        Parameters
        ----------
        state : ServerOptState
            The state after the previous step (``ServerOptState()`` to start).
        delta : np.ndarray, shape (d,)
            The round's aggregated update (any float dtype; computed in float64).

        Returns
        -------
        (increment, new_state)
            ``increment`` is float64 of shape (d,); it may hold NaN/Inf if ``delta``
            does (the caller checks; ``state`` is never modified).

        Raises
        ------
        ValueError
            If ``delta`` is not one-dimensional or does not fit ``state``'s moments.
        """
        d = np.asarray(delta, dtype=np.float64)
        if d.ndim != 1:
            raise ValueError(f"delta must be a flat vector, got shape {d.shape}")
        if not state.fits(d.size):
            held = state.m if state.m is not None else state.v
            assert held is not None
            raise ValueError(
                f"delta has {d.size} values but the optimiser state holds {held.size} values"
            )
        m_prev = np.zeros_like(d) if state.m is None else state.m
        v_prev = np.zeros_like(d) if state.v is None else state.v
        t = state.steps + 1
        with np.errstate(over="ignore", invalid="ignore"):
            sq = d * d
            if self.kind == "adagrad":
                m = d.copy()
                v = v_prev + sq
                eta_t = self.eta
            elif self.kind == "adam":
                m = self.beta1 * m_prev + (1.0 - self.beta1) * d
                v = self.beta2 * v_prev + (1.0 - self.beta2) * sq
                eta_t = self.eta * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
            else:  # yogi
                m = self.beta1 * m_prev + (1.0 - self.beta1) * d
                v = v_prev - (1.0 - self.beta2) * sq * np.sign(v_prev - sq)
                eta_t = self.eta
            increment = eta_t * m / (np.sqrt(v) + self.tau)
        return increment, ServerOptState(m=m, v=v, steps=t)


def check_server_optimizer(
    kind: str, eta: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> None:
    """Raise ``ValueError`` naming the first server-optimiser setting out of range."""
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}, got {kind!r}")
    for name, value in (("server_beta1", beta1), ("server_beta2", beta2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau < math.inf:
        raise ValueError(f"server_tau must be > 0 and finite, got {tau!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 < eta < math.inf:
        raise ValueError(f"server_learning_rate (eta) must be > 0 and finite, got {eta!r}")
