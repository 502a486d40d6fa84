"""flower-ext in ordinary Flower apps, end to end on Flower's simulation (issue 12 acceptance).

Two apps written the way Flower's quickstarts are (``tests/flower_examples``): a CNN with
BatchNorm2d (quickstart-pytorch) and a saga logistic regression (quickstart-sklearn, arrays
from ``coef_`` / ``intercept_``). Each runs for 3 rounds on 3 simulated clients with:

- Flower's own ``FedAvg``: the reference;
- ``flower_ext.strategies.FedAvg``: must give the same global model as Flower's, round by round;
- ``flower_ext.strategies.Median``: a robust rule;
- ``TopKCompression`` around flower-ext's FedAvg, and around Flower's FedAvg (as the README's
  top-k section shows it), with ``topk_mod`` on the ClientApp at 30% of the entries.

The apps change in exactly one place per variant: the strategy class on the server, and
``mods=[topk_mod]`` on the ClientApp for top-k. Everything else is the user's code.

One Flower simulation (one Ray start) runs every strategy that shares a ClientApp, so the
module needs four simulations: about 2 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import pytest
from flower_examples import pytorch_cnn, sklearn_logreg
from flower_examples.data import CLIENT_SIZES
from flower_examples.harness import NUM_CLIENTS, NUM_ROUNDS, StrategyRun, flower_kwargs, simulate
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from flower_ext.strategies import FedAvg, Median, TopKCompression

pytestmark = pytest.mark.slow

MODELS: dict[str, ModuleType] = {"cnn": pytorch_cnn, "logreg": sklearn_logreg}

TOPK_RATIO = 0.3

#: Runs on the quickstart's plain ClientApp.
PLAIN_RUNS: dict[str, Callable[[], Strategy]] = {
    "flower-fedavg": lambda: FlowerFedAvg(**flower_kwargs()),
    "fedavg": lambda: FedAvg(**flower_kwargs()),
    "median": lambda: Median(**flower_kwargs()),
}
#: Runs on the same ClientApp with ``mods=[topk_mod]``.
TOPK_RUNS: dict[str, Callable[[], Strategy]] = {
    "topk-fedavg": lambda: TopKCompression(FedAvg(**flower_kwargs()), ratio=TOPK_RATIO),
    "topk-flower-fedavg": lambda: TopKCompression(
        FlowerFedAvg(**flower_kwargs()), ratio=TOPK_RATIO
    ),
}
REFERENCE = "flower-fedavg"
#: Runs whose global model keeps the initial model's dtypes: flower-ext's strategies, and
#: TopKCompression, which casts what Flower's FedAvg returns back to the model's dtypes.
KEEPS_DTYPES = ("fedavg", "median", "topk-fedavg", "topk-flower-fedavg")
RUN_NAMES = [*PLAIN_RUNS, *TOPK_RUNS]

#: Accuracy after round 3 must beat the initial model's by this much (4 classes: chance 0.25;
#: Flower's FedAvg reaches about 0.75 (CNN) and 0.92 (logreg) here).
MIN_GAIN = {"cnn": 0.25, "logreg": 0.4}
#: ... and be no more than this below Flower's FedAvg after round 3 (600 test images).
ACCURACY_TOLERANCE = 0.05
#: flower-ext FedAvg against Flower's FedAvg, per float dtype: summation order differs (ours
#: adds updates to the global model, Flower averages the weights), nothing else may.
FLOAT_TOLERANCE = {
    "float32": {"rtol": 1e-5, "atol": 1e-6},
    "float64": {"rtol": 1e-10, "atol": 1e-12},
}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, StrategyRun]]:
    """Every model x strategy run: four simulations (plain and top-k ClientApp per model)."""
    out: dict[str, dict[str, StrategyRun]] = {}
    for model_name, example in MODELS.items():
        out[model_name] = {
            **simulate(example.app, PLAIN_RUNS, example.initial_arrays, example.central_evaluate),
            **simulate(
                example.topk_app, TOPK_RUNS, example.initial_arrays, example.central_evaluate
            ),
        }
    return out


def finished(runs: dict[str, dict[str, StrategyRun]], model: str, name: str) -> StrategyRun:
    run = runs[model][name]
    assert not run.error, f"{model}/{name}: strategy.start raised:\n{run.error}"
    assert run.result is not None, f"{model}/{name}: no Result"
    return run


def by_model_and_run() -> list:
    return [pytest.param(m, r, id=f"{m}-{r}") for m in MODELS for r in RUN_NAMES]


@pytest.mark.parametrize(("model", "name"), by_model_and_run())
def test_every_round_trains_every_client(runs, model, name):
    run = finished(runs, model, name)
    rounds = set(range(1, NUM_ROUNDS + 1))
    assert set(run.central) == {0, *rounds}, f"{model}/{name}: evaluated rounds {set(run.central)}"
    # A round whose replies were all rejected has no aggregated train metrics.
    assert set(run.result.train_metrics_clientapp) == rounds
    assert set(run.result.evaluate_metrics_clientapp) == rounds
    reports = getattr(run.strategy, "round_reports", None)
    if reports is not None:  # flower-ext strategies say who was accepted and why not
        for rnd in rounds:
            report = reports[rnd]
            assert report.rejected == {}, f"{model}/{name} round {rnd}: {report.rejected}"
            assert len(report.accepted) == NUM_CLIENTS, f"{model}/{name} round {rnd}: {report}"
            assert not report.skipped_reason, report.skipped_reason
    compression = getattr(run.strategy, "compression_reports", None)
    if compression is not None:  # top-k must stay on: every reply sparse, every round
        for rnd in rounds:
            counts = {k: compression[rnd][k] for k in ("sparse", "dense")}
            assert counts == {"sparse": NUM_CLIENTS, "dense": 0}, (
                f"{model}/{name} round {rnd}: {counts}, rejected {compression[rnd]['rejected']}"
            )


@pytest.mark.parametrize(("model", "name"), by_model_and_run())
def test_global_model_keeps_keys_shapes_and_dtypes(runs, model, name):
    run = finished(runs, model, name)
    initial = run.layouts[0]
    final = {k: (tuple(a.shape), str(a.dtype)) for k, a in run.result.arrays.items()}
    for rnd, layout in [*((r, run.layouts[r]) for r in range(1, NUM_ROUNDS + 1)), ("final", final)]:
        assert list(layout) == list(initial), f"{model}/{name} round {rnd}: keys {list(layout)}"
        shapes = {k: shape for k, (shape, _) in layout.items()}
        assert shapes == {k: shape for k, (shape, _) in initial.items()}, f"round {rnd}"
        dtypes = {k: dtype for k, (_, dtype) in layout.items()}
        if name in KEEPS_DTYPES:
            # 0-d stays 0-d (above), int64 stays int64, float64 stays float64.
            assert dtypes == {k: dtype for k, (_, dtype) in initial.items()}, f"round {rnd}"
        else:
            # Flower's FedAvg: floats keep their dtype, integer buffers come back float64.
            expected = {
                k: (dtype if dtype.startswith("float") else "float64")
                for k, (_, dtype) in initial.items()
            }
            assert dtypes == expected, f"{model}/{name} round {rnd}"


@pytest.mark.parametrize("name", RUN_NAMES)
def test_batchnorm_counter_counts_every_clients_batches(runs, name):
    """``num_batches_tracked`` (int64, shape ()) grows by each round's local batches."""
    run = finished(runs, "cnn", name)
    batches = {-(-size // pytorch_cnn.BATCH_SIZE) for size in CLIENT_SIZES}
    assert len(batches) == 1, "the example's clients should run equally many batches"
    per_round = batches.pop() * pytorch_cnn.LOCAL_EPOCHS
    for rnd in range(NUM_ROUNDS + 1):
        for key in ("bn1.num_batches_tracked", "bn2.num_batches_tracked"):
            counter = run.models[rnd][key]
            assert counter.shape == (), f"{name} round {rnd} {key}: shape {counter.shape}"
            if name in KEEPS_DTYPES:
                assert counter.dtype == np.int64 and counter == per_round * rnd, (
                    f"{name} round {rnd} {key}: {counter!r}, expected {per_round * rnd}"
                )
            else:  # Flower: a float64 weighted mean of equal integers
                assert counter == pytest.approx(per_round * rnd, abs=1e-9), f"{name} {rnd}"


@pytest.mark.parametrize(("model", "name"), by_model_and_run())
def test_global_model_changes_every_round(runs, model, name):
    run = finished(runs, model, name)
    for rnd in range(1, NUM_ROUNDS + 1):
        before, after = run.models[rnd - 1], run.models[rnd]
        moved = [
            k
            for k in after
            if after[k].dtype.kind == "f" and not np.array_equal(after[k], before[k])
        ]
        assert moved, f"{model}/{name}: round {rnd} left every float array unchanged"


@pytest.mark.parametrize(("model", "name"), by_model_and_run())
def test_accuracy_rises_as_with_flowers_fedavg(runs, model, name):
    run = finished(runs, model, name)
    reference = finished(runs, model, REFERENCE)
    start, end = run.accuracy(0), run.accuracy(NUM_ROUNDS)
    assert end >= start + MIN_GAIN[model], (
        f"{model}/{name}: accuracy {start:.3f} -> {end:.3f}, by round: "
        f"{ {r: round(m['accuracy'], 3) for r, m in sorted(run.central.items())} }"
    )
    flower_end = reference.accuracy(NUM_ROUNDS)
    assert end >= flower_end - ACCURACY_TOLERANCE, (
        f"{model}/{name}: {end:.3f} after round {NUM_ROUNDS}, Flower's FedAvg {flower_end:.3f}"
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_fedavg_equals_flowers_fedavg_round_by_round(runs, model):
    ours, flower = finished(runs, model, "fedavg"), finished(runs, model, REFERENCE)
    for rnd in range(1, NUM_ROUNDS + 1):
        for key, theirs in flower.models[rnd].items():
            mine = ours.models[rnd][key]
            where = f"{model} round {rnd} {key!r}"
            if mine.dtype.kind == "f":
                np.testing.assert_allclose(
                    mine, theirs, **FLOAT_TOLERANCE[str(mine.dtype)], err_msg=where
                )
            else:
                # Every client adds the same whole number of batches, so the weighted mean is
                # a whole number: Flower's float64 result must round to ours exactly.
                assert mine.dtype == np.int64, where
                np.testing.assert_array_equal(mine, np.rint(theirs).astype(np.int64), where)


@pytest.mark.parametrize("model", list(MODELS))
def test_fedavg_metrics_equal_flowers(runs, model):
    """Flower's aggregated train and evaluate metrics, key for key, in flower-ext's result."""
    ours, flower = finished(runs, model, "fedavg"), finished(runs, model, REFERENCE)
    for kind in ("train_metrics_clientapp", "evaluate_metrics_clientapp"):
        for rnd, theirs in getattr(flower.result, kind).items():
            mine = getattr(ours.result, kind)[rnd]
            for key, value in theirs.items():
                assert key in mine, f"{model} {kind} round {rnd}: {key!r} missing from {mine}"
                assert mine[key] == pytest.approx(value, rel=1e-5), f"{model} {kind} {rnd} {key}"
