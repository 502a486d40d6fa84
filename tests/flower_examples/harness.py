"""Run several strategies, one after another, in one Flower simulation of an example app.

Starting Ray dominates a small simulation, so one ``run_simulation`` call serves every
strategy under test: the ServerApp's ``@app.main()`` calls ``strategy.start(...)`` once per
strategy, each from the same initial model, exactly as a quickstart's ``main`` calls it once.
What each run produced is kept in :class:`StrategyRun` objects, which the ServerApp (it runs
in a thread of this process) fills in.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

NUM_CLIENTS = 3
NUM_ROUNDS = 3

#: (shape, dtype name) per array key: what the tests compare round by round.
Layout = dict[str, tuple[tuple[int, ...], str]]


def layout_of(arrays: ArrayRecord) -> Layout:
    """Keys, shapes and dtypes of an ArrayRecord, in its order."""
    return {key: (tuple(array.shape), str(array.dtype)) for key, array in arrays.items()}


@dataclass
class StrategyRun:
    """What one ``strategy.start(...)`` call produced."""

    name: str
    strategy: Strategy | None = None
    result: Result | None = None
    #: Traceback text when ``strategy.start`` raised; empty otherwise.
    error: str = ""
    #: Server-side ``evaluate_fn`` metrics by round (0 = the initial model).
    central: dict[int, dict[str, float]] = field(default_factory=dict)
    #: Layout of the global model ``evaluate_fn`` received, by round.
    layouts: dict[int, Layout] = field(default_factory=dict)
    #: The global model's arrays after each round, as NumPy (round 0 = initial).
    models: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def accuracy(self, server_round: int) -> float:
        return self.central[server_round]["accuracy"]


def make_server_app(
    strategies: dict[str, Callable[[], Strategy]],
    initial_arrays: Callable[[], ArrayRecord],
    central_evaluate: Callable[[int, ArrayRecord], MetricRecord],
    runs: dict[str, StrategyRun],
) -> ServerApp:
    """A ServerApp whose ``main`` runs each strategy for :data:`NUM_ROUNDS` rounds."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, factory in strategies.items():
            run = runs[name] = StrategyRun(name)

            def evaluate_fn(server_round: int, arrays: ArrayRecord, run=run) -> MetricRecord:
                run.layouts[server_round] = layout_of(arrays)
                run.models[server_round] = {k: a.numpy() for k, a in arrays.items()}
                metrics = central_evaluate(server_round, arrays)
                run.central[server_round] = dict(metrics)
                return metrics

            try:
                run.strategy = factory()
                run.result = run.strategy.start(
                    grid=grid,
                    initial_arrays=initial_arrays(),
                    num_rounds=NUM_ROUNDS,
                    evaluate_fn=evaluate_fn,
                )
            except Exception:  # one strategy's failure is its own tests' finding
                run.error = traceback.format_exc()

    return app


def simulate(
    client_app: ClientApp,
    strategies: dict[str, Callable[[], Strategy]],
    initial_arrays: Callable[[], ArrayRecord],
    central_evaluate: Callable[[int, ArrayRecord], MetricRecord],
) -> dict[str, StrategyRun]:
    """One Flower simulation (Ray backend, 3 SuperNodes, 1 CPU each) running every strategy."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    runs: dict[str, StrategyRun] = {}
    server_app = make_server_app(strategies, initial_arrays, central_evaluate, runs)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    return runs


def flower_kwargs() -> dict[str, Any]:
    """FedAvg's arguments every strategy gets: all 3 clients train and evaluate each round."""
    return {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": NUM_CLIENTS,
        "min_evaluate_nodes": NUM_CLIENTS,
        "min_available_nodes": NUM_CLIENTS,
    }
