"""Counts cannot buy influence by default: the weight policy (pinned weights + caps)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import arrays_of, reply
from test_robust_strategies import SHAPES, start_round, update_of

from flower_ext.aggregation import weight_policy
from flower_ext.strategies import (
    CenteredClipping,
    FedAvg,
    GeometricMedian,
    MultiKrum,
    NormBound,
)
from flower_ext.strategies.robust import DEFAULT_WEIGHT_MEDIAN_MULTIPLE

_RNG = np.random.default_rng(1414)


def model() -> dict[str, np.ndarray]:
    """A random model of test_robust_strategies' SHAPES, from this module's own RNG."""
    return {k: _RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def shifted(base: dict[str, np.ndarray], delta: float, noise: float = 0.0):
    return arrays_of(
        {
            k: (v + delta + noise * _RNG.normal(size=v.shape)).astype(np.float32)
            for k, v in base.items()
        }
    )


def test_weight_policy_kernel_pins_then_caps_with_reasons():
    w, reasons = weight_policy(
        np.array([100.0, 100.0, 1e6, 50.0]),
        pinned=np.array([100.0, np.nan, 120.0, 80.0]),
        max_weight_median_multiple=2.0,
    )
    # 1e6 pinned to 120; median of [100, 100, 120, 50] = 100 -> cap 200: nothing more.
    np.testing.assert_array_equal(w, [100.0, 100.0, 120.0, 50.0])
    assert reasons[2].startswith("num-examples 1e+06 above the pinned 120")
    assert reasons[0] == reasons[1] == reasons[3] == ""
    w, reasons = weight_policy(np.array([1.0, 1.0, 1.0, 9.0]), max_weight_median_multiple=2.0)
    assert w[3] == 2.0 and "2x the round's median" in reasons[3]
    w, reasons = weight_policy(np.array([5.0, 50.0]), max_weight=10.0)
    assert w.tolist() == [5.0, 10.0] and "max_weight 10" in reasons[1]
    with pytest.raises(ValueError, match="shape"):
        weight_policy(np.ones(3), pinned=np.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        weight_policy(np.ones(2), pinned=np.array([-1.0, 1.0]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: GeometricMedian(num_malicious_nodes=1),
        lambda: CenteredClipping(tau=100.0, num_malicious_nodes=1),
        lambda: NormBound(max_norm=100.0),
        lambda: MultiKrum(num_malicious_nodes=0),
    ],
)
def test_weight_using_robust_rules_cap_inflated_counts_by_default(as_server, make):
    """Two of seven liars claiming 100x rows get at most 2x the median each."""
    strategy = make()
    assert strategy.max_weight_median_multiple == DEFAULT_WEIGHT_MEDIAN_MULTIPLE
    nodes = list(range(1, 8))
    base = model()
    sent = start_round(strategy, arrays_of(base), nodes)
    replies = [
        reply(sent[n], shifted(base, 1.0), {"num-examples": 10_000 if n in (6, 7) else 100})
        for n in nodes
    ]
    strategy.aggregate_train(1, replies)
    clients = strategy.round_reports[1].clients
    for n in (6, 7):
        assert clients[n]["weight_capped"] is True
        assert "median" in clients[n]["weight_cap_reason"]
    assert all(clients[n]["weight_capped"] is False for n in range(1, 6))
    shares = [clients[n]["weight"] for n in (6, 7)]
    assert max(shares) <= 200 / (5 * 100 + 2 * 200) + 1e-9  # 2x median, not 100x


def test_default_cap_can_be_switched_off_explicitly():
    strategy = NormBound(max_norm=1.0, max_weight_median_multiple=None)
    assert strategy.max_weight_median_multiple is None


def test_pinned_weights_neutralise_inflation_in_fedavg(as_server):
    """Flower's FedAvg trusts counts; with pinned setup counts a liar gets its real share."""
    nodes = [1, 2, 3]
    base = model()
    for pinned, expect_shift in (({}, True), ({1: 100.0, 2: 100.0, 3: 100.0}, False)):
        strategy = FedAvg(pinned_weights=pinned)
        sent = start_round(strategy, arrays_of(base), nodes)
        replies = [
            reply(sent[1], shifted(base, 0.0), {"num-examples": 100}),
            reply(sent[2], shifted(base, 0.0), {"num-examples": 100}),
            reply(sent[3], shifted(base, -9.0), {"num-examples": 1_000_000}),
        ]
        out, _ = strategy.aggregate_train(1, replies)
        moved = float(np.abs(update_of(out, base)).max())
        clients = strategy.round_reports[1].clients
        if expect_shift:  # Flower's behaviour without a policy: the liar owns the mean
            assert moved > 8.9 and clients[3]["weight_capped"] is False
        else:
            assert moved == pytest.approx(3.0, rel=1e-4)
            assert clients[3]["weight_capped"] is True
            assert "pinned 100" in clients[3]["weight_cap_reason"]
            events = [e for e in strategy.audit.events if e.get("event") == "client_update"]
            assert any(e.get("weight_cap_reason") for e in events)


def test_pinned_weights_survive_a_resume() -> None:
    """A restarted server restores the pins: a bank cannot raise its count after a crash."""
    from flower_ext.strategies import FedAvg

    before = FedAvg(pinned_weights={11: 500.0, 12: 800.0})
    arrays, fields = before.export_state()
    after = FedAvg()
    after.import_state(arrays, fields)
    assert after.pinned_weights == {11: 500.0, 12: 800.0}
