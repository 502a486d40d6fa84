"""Centered clipping around the previous round's aggregate."""

from __future__ import annotations

from typing import Any

import numpy as np

from flower_ext.aggregation import AggregationResult, centered_clipping, median_min_clients

from .robust import RobustStrategy


class CenteredClipping(RobustStrategy):
    r"""Centered clipping (Karimireddy, He, Jaggi, ICML 2021).

    "Learning from History for Byzantine Robust Optimization". From the center
    :math:`v_0`, ``iterations`` times:

    .. math:: v \leftarrow v + \sum_i \alpha_i (u_i - v)
        \min\!\left(1, \frac{\tau}{\lVert u_i - v \rVert}\right)

    The center is the previous round's aggregate (the strategy keeps it; zeros in
    the first round and after the model's layout changes). That is the paper's
    "history": there the center is the server momentum, and honest updates move
    slowly from round to round, so a Byzantine update can move the aggregate by at
    most :math:`\tau` times its weight per round.

    Parameters
    ----------
    *args, **kwargs
        ``flwr.serverapp.strategy.FedAvg``'s arguments, plus the keyword arguments
        of :class:`~flower_ext.strategies.UpdateAggregationStrategy`.
    tau : float
        Clipping radius, in the units of the update's L2 norm. Pick it near the
        typical distance of honest updates to their mean (the audit's ``score``
        shows it for every client, every round).
    iterations : int (default: 1)
        Clipping iterations per round (the paper uses 1 with a momentum center).
    tau_factor : float, optional
        Adaptive radius: each iteration ``tau_l = min(tau, tau_factor x median
        distance to the center)`` of the round's updates; ``tau`` is then a
        ceiling (``float("inf")`` allowed).
    num_malicious_nodes : int (default: 0)
        f; ``n >= 2f + 1`` is checked.

    Weights
    -------
    :math:`\alpha_i` = (capped) ``num-examples`` share; a client's pull on the
    aggregate is at most :math:`\alpha_i \tau`, so the count is policed.
    By default capped at 2x the round's median (``max_weight_median_multiple=2.0``;
    ``None`` turns it off) and at ``pinned_weights`` where given; every lowered
    weight is audited (``weight_capped``, ``weight_cap_reason``).
    """

    uses_weights = True
    rule_name = "centered-clipping"

    def __init__(
        self,
        *args: Any,
        tau: float,
        iterations: int = 1,
        tau_factor: float | None = None,
        num_malicious_nodes: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_malicious_nodes=num_malicious_nodes, **kwargs)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self.tau = float(tau)
        if tau_factor is not None and (
            isinstance(tau_factor, bool)
            or not isinstance(tau_factor, (int, float))
            or not 0 < tau_factor < float("inf")
        ):
            raise ValueError(f"tau_factor must be a positive number, got {tau_factor!r}")
        self.tau_factor = None if tau_factor is None else float(tau_factor)
        self.iterations = iterations
        self.center: np.ndarray | None = None

    def rule_min_clients(self) -> int:
        return median_min_clients(self.num_malicious_nodes)

    def requirement(self) -> str:
        return "attackers must be a strict minority, n >= 2f + 1"

    def rule_summary(self) -> str:
        return (
            f"centered clipping (tau={self.tau:g}"
            f"{'' if self.tau_factor is None else f' capping {self.tau_factor:g} x median'}"
            f", {self.iterations} iteration(s)) around the "
            "previous round's aggregate, weighted by num-examples"
        )

    def robust_aggregate(
        self, updates: np.ndarray, weights: np.ndarray, server_round: int
    ) -> AggregationResult:
        center = self.center
        if center is not None and center.shape != (updates.shape[1],):
            center = None  # the model changed shape: the history no longer applies
        result = centered_clipping(
            updates,
            weights,
            tau=self.tau,
            center=center,
            iterations=self.iterations,
            tau_factor=self.tau_factor,
        )
        self.center = np.array(result.update, dtype=np.float32)
        return result
