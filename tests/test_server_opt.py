"""Adaptive server optimisers (FedAdagrad, FedAdam, FedYogi): hand-computed steps, Flower's
own strategies on the same replies, the strategy wiring (refusals, skips, resume)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import FakeGrid, arrays_of, reply
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdagrad as FlowerFedAdagrad
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi

from flower_ext.aggregation import ServerOptimizer, ServerOptState
from flower_ext.strategies import FedAvg, Median, SecureFedAvg

D1 = np.array([1.0, -2.0, 2.0])
D2 = np.array([0.5, 1.0, 0.1])
TAU = 1e-3


def two_steps(opt: ServerOptimizer) -> tuple[np.ndarray, np.ndarray, ServerOptState]:
    inc1, state = opt.step(ServerOptState(), D1)
    inc2, state = opt.step(state, D2)
    return inc1, inc2, state


# --------------------------------------------------------------------- kernels, by hand
def test_adagrad_first_two_steps_by_hand():
    inc1, inc2, state = two_steps(ServerOptimizer("adagrad", eta=0.1, tau=TAU))
    # step 1: m = d1, v = d1^2 = [1, 4, 4], x += 0.1 * m / (sqrt(v) + tau)
    np.testing.assert_allclose(inc1, [0.1 * 1 / 1.001, 0.1 * -2 / 2.001, 0.1 * 2 / 2.001])
    # step 2: m = d2 (beta1 = 0, as Flower's FedAdagrad), v = [1.25, 5, 4.01]
    np.testing.assert_allclose(
        inc2,
        [
            0.1 * 0.5 / (math.sqrt(1.25) + TAU),
            0.1 * 1.0 / (math.sqrt(5.0) + TAU),
            0.1 * 0.1 / (math.sqrt(4.01) + TAU),
        ],
    )
    np.testing.assert_allclose(state.v, [1.25, 5.0, 4.01])
    assert state.steps == 2


def test_adam_first_two_steps_by_hand():
    inc1, inc2, state = two_steps(ServerOptimizer("adam", eta=0.1, beta1=0.9, beta2=0.99, tau=TAU))
    # step 1: m = 0.1 d1 = [0.1, -0.2, 0.2]; v = 0.01 d1^2 = [0.01, 0.04, 0.04]
    # bias-corrected eta_1 = 0.1 * sqrt(1 - 0.99) / (1 - 0.9) = 0.1
    np.testing.assert_allclose(
        inc1, [0.1 * 0.1 / (0.1 + TAU), 0.1 * -0.2 / (0.2 + TAU), 0.1 * 0.2 / (0.2 + TAU)]
    )
    # step 2: m = 0.9 m + 0.1 d2 = [0.14, -0.08, 0.19]
    #         v = 0.99 v + 0.01 d2^2 = [0.0124, 0.0496, 0.0397]
    #         eta_2 = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2) = 0.1 * sqrt(0.0199) / 0.19
    eta2 = 0.1 * math.sqrt(0.0199) / 0.19
    np.testing.assert_allclose(state.m, [0.14, -0.08, 0.19])
    np.testing.assert_allclose(state.v, [0.0124, 0.0496, 0.0397])
    np.testing.assert_allclose(
        inc2,
        [
            eta2 * 0.14 / (math.sqrt(0.0124) + TAU),
            eta2 * -0.08 / (math.sqrt(0.0496) + TAU),
            eta2 * 0.19 / (math.sqrt(0.0397) + TAU),
        ],
    )


def test_yogi_first_two_steps_by_hand():
    inc1, inc2, state = two_steps(ServerOptimizer("yogi", eta=0.01, beta1=0.9, beta2=0.99, tau=TAU))
    # step 1 from v = 0: v = 0 - 0.01 d^2 sign(0 - d^2) = 0.01 d^2 = [0.01, 0.04, 0.04]
    np.testing.assert_allclose(
        inc1, [0.01 * 0.1 / (0.1 + TAU), 0.01 * -0.2 / (0.2 + TAU), 0.01 * 0.2 / (0.2 + TAU)]
    )
    # step 2: d2^2 = [0.25, 1, 0.01]; v - d2^2 = [<0, <0, >0]
    #   v = [0.01 + 0.0025, 0.04 + 0.01, 0.04 - 0.0001] (Adam would give 0.0397 in the last)
    np.testing.assert_allclose(state.v, [0.0125, 0.05, 0.0399])
    np.testing.assert_allclose(
        inc2,
        [
            0.01 * 0.14 / (math.sqrt(0.0125) + TAU),
            0.01 * -0.08 / (math.sqrt(0.05) + TAU),
            0.01 * 0.19 / (math.sqrt(0.0399) + TAU),
        ],
    )


def test_kernel_leaves_the_state_it_was_given_and_refuses_bad_settings():
    opt = ServerOptimizer("adam", eta=0.1)
    state = ServerOptState()
    _, after = opt.step(state, D1)
    assert state.m is None and state.steps == 0 and after.steps == 1
    with pytest.raises(ValueError, match="flat vector"):
        opt.step(after, D1.reshape(1, 3))
    with pytest.raises(ValueError, match="3 values"):
        opt.step(after, np.zeros(4))
    for kwargs, match in [
        ({"kind": "rmsprop", "eta": 0.1}, "server_optimizer must be one of"),
        ({"kind": "sgd", "eta": 0.1}, "adaptive"),
        ({"kind": "adam", "eta": 0.0}, "eta"),
        ({"kind": "adam", "eta": 0.1, "beta1": 1.0}, "server_beta1"),
        ({"kind": "yogi", "eta": 0.1, "beta2": -0.1}, "server_beta2"),
        ({"kind": "adam", "eta": 0.1, "tau": 0.0}, "server_tau"),
        ({"kind": "adam", "eta": 0.1, "tau": float("inf")}, "server_tau"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServerOptimizer(**kwargs)


# --------------------------------------------------------------------- against Flower
def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": rng.normal(size=(2, 3)).astype(np.float32),
        "b": rng.normal(size=3).astype(np.float32),
    }


def _run_three_rounds(ours, flower) -> None:
    """Feed both strategies the same replies for 3 rounds; their models must agree."""
    rng = np.random.default_rng(7)
    nodes = [5, 6, 7]
    ours_global = flower_global = arrays_of(_model())
    for rnd in (1, 2, 3):
        sent = list(ours.configure_train(rnd, ours_global, ConfigRecord(), FakeGrid(nodes)))
        flower.current_arrays = {k: a.numpy() for k, a in flower_global.items()}
        base = {k: a.numpy() for k, a in ours_global.items()}
        replies = []
        for message, n in zip(sent, (10, 30, 60), strict=True):
            noisy = {k: v + rng.normal(scale=0.05, size=v.shape) for k, v in base.items()}
            local = {k: v.astype(base[k].dtype) for k, v in noisy.items()}
            replies.append(reply(message, arrays_of(local), {"num-examples": n}))
        ours_global, _ = ours.aggregate_train(rnd, replies)
        flower_global, _ = flower.aggregate_train(rnd, replies)
        for key in ours_global:
            np.testing.assert_allclose(
                ours_global[key].numpy(), flower_global[key].numpy(), rtol=2e-5, atol=2e-6
            )


def _ours(kind: str, **kwargs) -> FedAvg:
    return FedAvg(min_train_nodes=3, min_available_nodes=3, server_optimizer=kind, **kwargs)


def test_fedyogi_and_fedadagrad_equal_flowers_on_the_same_replies(as_server):
    _run_three_rounds(
        _ours("yogi", server_learning_rate=0.01, server_beta1=0.9, server_beta2=0.99),
        FlowerFedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3),
    )
    _run_three_rounds(
        _ours("adagrad", server_learning_rate=0.1, server_tau=1e-3),
        FlowerFedAdagrad(eta=0.1, tau=1e-3),
    )


def test_fedadam_equals_flowers_with_its_step_offset(as_server):
    """Flower's FedAdam bias-corrects with t = server_round + 1 (documented difference):
    started one step ahead (steps=1), ours gives Flower's models round after round."""
    ours = _ours("adam", server_learning_rate=0.1, server_beta1=0.9, server_beta2=0.99)
    ours._opt_state = ServerOptState(steps=1)
    _run_three_rounds(ours, FlowerFedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3))


def test_fedadam_first_step_is_kingma_bias_corrected(as_server):
    """Without the offset, round 1 moves by eta * m / (sqrt(v) + tau) with eta_1 = eta,
    about 1 / 0.742 of Flower's first step (the documented difference)."""
    strategy = _ours("adam", server_learning_rate=0.1)
    base = _model()
    sent = list(strategy.configure_train(1, arrays_of(base), ConfigRecord(), FakeGrid([5, 6, 7])))
    moved = {k: v + 0.5 for k, v in base.items()}
    replies = [reply(m, arrays_of(moved), {"num-examples": 10}) for m in sent]
    new, _ = strategy.aggregate_train(1, replies)
    # delta = 0.5 everywhere: m = 0.05, sqrt(v) = 0.05, eta_1 = 0.1
    expected = 0.1 * 0.05 / (0.05 + 1e-3)
    for key in base:
        np.testing.assert_allclose(new[key].numpy() - base[key], expected, rtol=1e-5)


# --------------------------------------------------------------------- strategy wiring
def test_strategy_refuses_bad_settings_with_clear_errors():
    with pytest.raises(ValueError, match="server_optimizer must be one of"):
        FedAvg(server_optimizer="Adam")
    with pytest.raises(ValueError, match=r"server_momentum=0\.9 cannot be combined"):
        FedAvg(server_optimizer="adam", server_momentum=0.9, server_learning_rate=0.1)
    with pytest.raises(ValueError, match="server_beta2"):
        FedAvg(server_optimizer="yogi", server_beta2=1.5)
    with pytest.raises(ValueError, match="server_tau"):
        FedAvg(server_optimizer="adagrad", server_tau=-1.0)
    with pytest.raises(ValueError, match="server_learning_rate"):
        FedAvg(server_optimizer="adam", server_learning_rate=0.0)
    FedAvg(server_momentum=0.9)  # sgd with FedAvgM momentum stays as it was


def test_encrypted_fedavg_refuses_an_adaptive_optimiser():
    from flower_ext.strategies import EncryptedFedAvg

    with pytest.raises(ValueError, match="needs the aggregate in clear"):
        EncryptedFedAvg(context=b"unused: refused first", server_optimizer="adam")


def test_secure_fedavg_and_robust_rules_accept_the_optimiser():
    secure = SecureFedAvg(server_optimizer="yogi", server_learning_rate=0.01)
    assert secure._server_opt is not None and secure._server_opt.kind == "yogi"
    robust = Median(server_optimizer="adam", server_learning_rate=0.1, num_malicious_nodes=0)
    assert robust._server_opt is not None and robust._server_opt.kind == "adam"


def _started(strategy, base: dict[str, np.ndarray]):
    strategy.configure_train(1, arrays_of(base), ConfigRecord(), FakeGrid([5, 6, 7]))
    return strategy


def test_non_finite_step_skips_and_keeps_the_state(as_server):
    strategy = _started(_ours("adam", server_learning_rate=0.1), _model())
    assert strategy.server_step(np.full(9, 0.5, dtype=np.float32)) is not None
    state = strategy._opt_state
    bad = np.full(9, 0.5, dtype=np.float32)
    bad[2] = np.inf
    assert strategy.server_step(bad) is None
    assert strategy._opt_state is state and state.steps == 1


def test_integer_arrays_take_the_mean_step_not_the_adaptive_one(as_server):
    base = {"w": np.zeros(3, dtype=np.float32), "count": np.array(4, dtype=np.int64)}
    strategy = _started(_ours("adam", server_learning_rate=0.1), base)
    new = strategy.server_step(np.array([0.5, 0.5, 0.5, 2.0], dtype=np.float32))
    assert int(new["count"].numpy()) == 6
    np.testing.assert_allclose(new["w"].numpy(), 0.1 * 0.05 / (0.05 + 1e-3), rtol=1e-5)


def test_state_round_trips_through_export_import(as_server):
    base = _model()
    steps = [np.linspace(-1, 1, 9, dtype=np.float32) * s for s in (0.3, -0.2, 0.5)]
    first = _started(_ours("yogi", server_learning_rate=0.01), base)
    first.server_step(steps[0])
    first.server_step(steps[1])
    arrays, fields = first.export_state()
    assert set(arrays) == {"server-opt-m", "server-opt-v"}
    assert fields["server_optimizer"] == {"kind": "yogi", "steps": 2}
    resumed = _ours("yogi", server_learning_rate=0.01)
    resumed.import_state({k: v.copy() for k, v in arrays.items()}, fields)
    _started(resumed, base)
    a, b = first.server_step(steps[2]), resumed.server_step(steps[2])
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert resumed._opt_state.steps == 3
    # Another optimiser in the checkpoint: its moments are not used.
    other = _ours("adam", server_learning_rate=0.1)
    other.import_state(arrays, fields)
    assert other._opt_state.steps == 0 and other._opt_state.m is None


def test_state_resets_when_the_model_layout_changes(as_server):
    strategy = _started(_ours("adagrad", server_learning_rate=0.1), _model())
    strategy.server_step(np.ones(9, dtype=np.float32))
    assert strategy._opt_state.steps == 1
    _started(strategy, {"w": np.zeros(4, dtype=np.float32)})
    assert strategy._opt_state.steps == 0 and strategy._opt_state.m is None
