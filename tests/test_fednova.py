"""FedNova: the normalised weights by hand, the strategy's step against the paper's
formula, equal steps = FedAvg, replies without steps rejected with the reason, the
bank reporting its steps, and the app's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_of, reply
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from flower_ext.aggregation.fednova import bounded_steps, fednova_weights
from flower_ext.audit import AuditTrail
from flower_ext.scaffold import effective_steps
from flower_ext.strategies import FedAvg, FedNova
from flower_ext.strategies.fednova import LOCAL_STEPS_KEY, REPORT_STEPS_KEY


def test_weights_by_hand():
    # p = [0.25, 0.75], a = [2, 6]: p/a = [0.125, 0.125] -> shares [0.5, 0.5];
    # tau_eff = 0.25*2 + 0.75*6 = 5; scale = 5 * 0.25 = 1.25
    shares, scale = fednova_weights(np.array([100.0, 300.0]), np.array([2.0, 6.0]))
    np.testing.assert_allclose(shares, [0.5, 0.5])
    assert scale == pytest.approx(1.25)
    shares, scale = fednova_weights(np.array([1.0, 3.0, 6.0]), np.array([4.0, 4.0, 4.0]))
    np.testing.assert_allclose(shares, [0.1, 0.3, 0.6])  # equal steps: FedAvg exactly
    assert scale == pytest.approx(1.0)
    for weights, steps in [([1.0], [0.0]), ([1.0], [np.inf]), ([-1.0, 2.0], [1, 1]),
                           ([0.0, 0.0], [1, 1]), ([1.0, 2.0], [1.0])]:  # fmt: skip
        with pytest.raises(ValueError):
            fednova_weights(np.array(weights), np.array(steps, dtype=float))


def _record(values: list[float]) -> ArrayRecord:
    return arrays_of({"w": np.array(values, dtype=np.float32)})


def _round(strategy, replies_of, nodes=(5, 6, 7)):
    sent = strategy.configure_train(1, _record([0.0, 0.0]), ConfigRecord(), FakeGrid(list(nodes)))
    sent = {m.metadata.dst_node_id: m for m in sent}
    asks = isinstance(strategy, FedNova)  # FedNova asks the banks for their steps
    assert all((REPORT_STEPS_KEY in m.content["config"]) == asks for m in sent.values())
    return strategy.aggregate_train(1, [replies_of(sent, node) for node in nodes])


def test_step_is_tau_eff_times_the_normalised_mean(as_server):
    """Bank 5: 10 rows, 2 steps, update [1, 2]; bank 6: 30 rows, 6 steps, update [3, -2].
    FedNova: tau_eff * sum p_i Delta_i / a_i = 5 * (0.25 [1, 2]/2 + 0.75 [3, -2]/6)
    = [2.5, 0.0]; FedAvg would give 0.25 [1, 2] + 0.75 [3, -2] = [2.5, -1.0]."""
    rows = {5: (10, 2.0, [1.0, 2.0]), 6: (30, 6.0, [3.0, -2.0])}

    def replies_of(sent, node):
        n, steps, update = rows[node]
        return reply(sent[node], _record(update), {"num-examples": n, LOCAL_STEPS_KEY: steps})

    audit = AuditTrail()
    strategy = FedNova(min_train_nodes=2, min_available_nodes=2, audit=audit)
    new, metrics = _round(strategy, replies_of, nodes=(5, 6))
    np.testing.assert_allclose(new["w"].numpy(), [2.5, 0.0], atol=1e-6)
    assert metrics["fednova-scale"] == pytest.approx(1.25)
    event = next(e for e in audit.events if e["event"] == "fednova_normalised")
    assert event["scale"] == pytest.approx(1.25)


def test_equal_steps_give_fedavgs_model(as_server):
    updates = {5: [1.0, 2.0], 6: [3.0, -2.0], 7: [-1.0, 0.5]}
    counts = {5: 10, 6: 30, 7: 60}

    def replies_of(sent, node):
        return reply(sent[node], _record(updates[node]),
                     {"num-examples": counts[node], LOCAL_STEPS_KEY: 7.0})  # fmt: skip

    nova, _ = _round(FedNova(min_train_nodes=3, min_available_nodes=3), replies_of)
    plain, _ = _round(FedAvg(min_train_nodes=3, min_available_nodes=3), replies_of)
    np.testing.assert_allclose(nova["w"].numpy(), plain["w"].numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        (None, "no number 'local-steps'"),
        (0.0, "is not in (0, 1e+07]"),
        (float("nan"), "is not in"),
        (5e7, "is not in"),
        ([4.0], "no number"),
    ],
)
def test_a_reply_without_usable_steps_is_rejected_and_the_round_goes_on(as_server, steps, words):
    def replies_of(sent, node):
        metrics = {"num-examples": 10}
        if node != 7:
            metrics[LOCAL_STEPS_KEY] = 4.0
        elif steps is not None:
            metrics[LOCAL_STEPS_KEY] = steps
        return reply(sent[node], _record([float(node), 0.0]), metrics)

    audit = AuditTrail()
    strategy = FedNova(min_train_nodes=2, min_available_nodes=2, audit=audit)
    new, _ = _round(strategy, replies_of)
    report = strategy.round_reports[1]
    assert report.accepted == [5, 6] and report.rejected[7].startswith("FedNova: ")
    assert words in report.rejected[7]
    np.testing.assert_allclose(new["w"].numpy(), [5.5, 0.0], atol=1e-6)  # the other two
    assert any(e["event"] == "reply_rejected" and e["node_id"] == 7 for e in audit.events)


def test_the_bank_reports_its_momentum_adjusted_steps_when_asked(tmp_path, as_server):
    from test_bank_client import _config, _context, _csv, _message

    from bank_risk.client_app import app as client_app

    config = {**_config(_csv(tmp_path)), "batch-size": 16, "min-local-steps": 0}
    plain = client_app(_message(MessageType.TRAIN, 1, 100), _context(config, partition=0))
    assert LOCAL_STEPS_KEY not in plain.content["metrics"]  # FedAvg's reply is unchanged
    msg = _message(MessageType.TRAIN, 1, 100)
    msg.content["config"][REPORT_STEPS_KEY] = True
    metrics = client_app(msg, _context(config, partition=0)).content["metrics"]
    rows = int(metrics["num-examples"])
    steps = -(-rows // 16)  # one epoch of batches of 16
    assert metrics[LOCAL_STEPS_KEY] == pytest.approx(effective_steps(steps, 0.9))
    # min-local-steps: this small bank runs whole epochs until it has taken at least 4x
    # its one-epoch steps (run config min-local-steps; default 10).
    msg = _message(MessageType.TRAIN, 1, 100)
    msg.content["config"][REPORT_STEPS_KEY] = True
    more = {**config, "min-local-steps": 4 * steps + 1}
    metrics = client_app(msg, _context(more, partition=0)).content["metrics"]
    assert metrics[LOCAL_STEPS_KEY] == pytest.approx(effective_steps(5 * steps, 0.9))


def test_the_band_is_floored_at_the_steps_a_small_bank_honestly_takes():
    """Banks of 1000, 1000 and 50 rows: 100, 100 and (min-local-steps) 40 steps. Without a
    floor the small bank's 40 is held to 10x the 5 its rows imply, i.e. kept (< 50); with
    200 honest steps it would be clamped to 50; a floor of 40 keeps it."""
    weights = np.array([1000.0, 1000.0, 50.0])
    steps, clamped = bounded_steps(weights, np.array([100.0, 100.0, 200.0]))
    assert clamped.tolist() == [False, False, True] and steps[2] == pytest.approx(50.0)
    steps, clamped = bounded_steps(weights, np.array([100.0, 100.0, 200.0]), floor=40.0)
    assert not clamped.any() and steps[2] == 200.0  # implied max(5, 40) = 40; 10x = 400
    steps, clamped = bounded_steps(weights, np.array([100.0, 100.0, 1e6]), floor=40.0)
    assert steps[2] == pytest.approx(400.0)  # a liar is still held
    with pytest.raises(ValueError, match="floor"):
        bounded_steps(weights, weights, floor=-1.0)
    with pytest.raises(ValueError, match="steps_floor"):
        FedNova(steps_floor=-1.0)


def test_the_app_floors_fednovas_band_at_min_local_steps():
    from bank_risk.settings import BankAppSettings
    from bank_risk.strategy_factory import build_strategy

    settings = BankAppSettings.from_config({"num-banks": 3, "fednova": True})
    strategy = build_strategy(settings, AuditTrail(), num_nodes=3)
    assert isinstance(strategy, FedNova)
    assert strategy.steps_floor == pytest.approx(effective_steps(10, 0.9))
    off = BankAppSettings.from_config({"num-banks": 3, "fednova": True, "min-local-steps": 0})
    assert build_strategy(off, AuditTrail(), num_nodes=3).steps_floor == 0.0


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"aggregation": "median"}, "aggregation = 'median'"),
        ({"dp": "update"}, "dp = 'update'"),
        ({"he": True}, "he = true"),
        ({"topk-ratio": 0.1}, "topk-ratio = 0.1"),
        ({"scaffold": True}, "scaffold = true"),
        ({"proximal-mu": 0.1}, "proximal-mu = 0.1"),
    ],
)
def test_app_refuses_fednova_combinations_naming_the_key(overrides, words):
    from bank_risk.settings import BankAppSettings, SettingsError
    from bank_risk.strategy_factory import build_strategy, check_run_config

    settings = BankAppSettings.from_config({"num-banks": 5, "fednova": True, **overrides})
    with pytest.raises(SettingsError) as err:
        check_run_config(settings)
    assert words in str(err.value)
    ok = BankAppSettings.from_config({"num-banks": 3, "fednova": "true"})
    assert isinstance(build_strategy(ok, AuditTrail(), num_nodes=3), FedNova)


@pytest.mark.parametrize(("claim", "expected_w"), [(1e-6, -28.0 / 15.0), (1e7, 2.8 * 19 / 21)])
def test_a_lying_banks_steps_are_held_within_the_band(as_server, claim, expected_w):
    """Review: 3 banks of 1000 rows, two honest (100 steps, update +1), a liar (update -1).
    Unbounded, 1e-6 steps gave w = -2.2e7 and 1e7 steps x22,000. Held within 10x of the
    median steps per row, the claim becomes 10 or 1000 steps and the step stays bounded:
    a = [100, 100, 10]: shares [1, 1, 10]/12, scale 70 * 0.04 = 2.8 -> w = 2.8 * (-8/12);
    a = [100, 100, 1000]: shares [10, 10, 1]/21, scale 400 * 0.007 = 2.8 -> 2.8 * 19/21."""

    def replies_of(sent, node):
        steps, update = (claim, -1.0) if node == 7 else (100.0, 1.0)
        return reply(sent[node], _record([update, 0.0]),
                     {"num-examples": 1000, LOCAL_STEPS_KEY: steps})  # fmt: skip

    audit = AuditTrail()
    strategy = FedNova(min_train_nodes=3, min_available_nodes=3, audit=audit)
    new, metrics = _round(strategy, replies_of)
    np.testing.assert_allclose(new["w"].numpy()[0], expected_w, rtol=1e-5)
    assert metrics["fednova-scale"] == pytest.approx(2.8)
    event = next(e for e in audit.events if e["event"] == "fednova_normalised")
    assert event["clamped_claims"] == {"7": claim}  # JSON keys
    update = next(e for e in audit.events if e["event"] == "client_update" and e["node_id"] == 7)
    assert "held to" in update["weight_cap_reason"]
    with pytest.raises(ValueError, match="steps_band"):
        FedNova(steps_band=0.5)
