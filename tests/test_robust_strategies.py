"""The robust strategies end to end with real Messages, and the bank app's factory."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_of, reply
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum

from flower_ext.audit import AuditTrail
from flower_ext.strategies import (
    Bulyan,
    CenteredClipping,
    FedAvg,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    RobustStrategy,
    TrimmedMean,
)

RNG = np.random.default_rng(7)
SHAPES = {"layer.weight": (6, 5), "layer.bias": (6,)}


def model() -> dict[str, np.ndarray]:
    return {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def shifted(base: dict[str, np.ndarray], delta: float, noise: float = 0.0):
    return arrays_of(
        {
            k: (v + delta + noise * RNG.normal(size=v.shape)).astype(np.float32)
            for k, v in base.items()
        }
    )


def start_round(strategy, global_arrays, nodes, server_round=1):
    messages = list(
        strategy.configure_train(server_round, global_arrays, ConfigRecord(), FakeGrid(nodes))
    )
    return {m.metadata.dst_node_id: m for m in messages}


def planted_round(strategy, num_nodes=11, attackers=(101, 102), attack_shift=50.0):
    """Honest clients move every weight by ~+1, attackers by ``attack_shift``."""
    nodes = list(range(100, 100 + num_nodes))
    base = model()
    sent = start_round(strategy, arrays_of(base), nodes)
    replies = [
        reply(
            sent[n],
            shifted(base, attack_shift if n in attackers else 1.0, 0.0 if n in attackers else 0.05),
            {"num-examples": 100, "train-loss": 0.5},
            label=f"bank-{n}",
        )
        for n in nodes
    ]
    return base, replies


def update_of(new_arrays, base):
    return np.concatenate([new_arrays[k].numpy().ravel() - base[k].ravel() for k in SHAPES])


ALL_RULES = [
    lambda **kw: Krum(num_malicious_nodes=2, **kw),
    lambda **kw: MultiKrum(num_malicious_nodes=2, **kw),
    lambda **kw: Median(num_malicious_nodes=2, **kw),
    lambda **kw: TrimmedMean(beta=0.2, num_malicious_nodes=2, **kw),
    lambda **kw: Bulyan(num_malicious_nodes=2, **kw),
    lambda **kw: GeometricMedian(num_malicious_nodes=2, **kw),
    lambda **kw: CenteredClipping(tau=1.0, num_malicious_nodes=2, **kw),
    lambda **kw: NormBound(max_norm=10.0, **kw),
]
RULE_IDS = ["krum", "multikrum", "median", "trimmed", "bulyan", "geomed", "cclip", "normbound"]


@pytest.mark.parametrize("make", ALL_RULES, ids=RULE_IDS)
def test_each_rule_end_to_end_resists_planted_attackers(as_server, make):
    audit = AuditTrail()
    strategy = make(min_train_nodes=11, min_available_nodes=11, audit=audit)
    assert isinstance(strategy, RobustStrategy)
    strategy.summary()  # logs settings, including how weights are used
    base, replies = planted_round(strategy)
    before = [{k: bytes(a.data) for k, a in r.content["arrays"].items()} for r in replies]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    after = [{k: bytes(a.data) for k, a in r.content["arrays"].items()} for r in replies]
    assert before == after  # replies never mutated (Flower's FedMedian empties them)
    assert all(r.content["metrics"]["num-examples"] == 100 for r in replies)

    step = update_of(new_arrays, base)
    fedavg_step = (9 * 1.0 + 2 * 50.0) / 11  # what FedAvg would do: ~9.9
    if isinstance(strategy, NormBound):
        # Attackers are clipped, not removed: their pull is bounded by max_norm each.
        assert np.linalg.norm(step) < np.linalg.norm(np.full_like(step, fedavg_step)) / 3
    elif isinstance(strategy, CenteredClipping):
        # From a zero center, one round: each update contributes at most tau / n in norm.
        assert np.linalg.norm(step) <= 1.0 + 1e-5
    else:
        np.testing.assert_allclose(step, 1.0, atol=0.25)  # Krum: one noisy update
    assert metrics["clients-accepted"] == 11
    for key in ("robust-rejected", "robust-clipped", "robust-mean-clip-factor", "robust-max-share"):
        assert key in metrics
    updates = [e for e in audit.events if e["event"] == "client_update"]
    assert {e["node_id"] for e in updates} == set(range(100, 111))
    assert {e["label"] for e in updates if e["node_id"] == 101} == {"bank-101"}


def test_krum_drops_the_attacker_and_says_why(as_server):
    audit = AuditTrail()
    strategy = Krum(num_malicious_nodes=2, audit=audit)
    _, replies = planted_round(strategy)
    _, metrics = strategy.aggregate_train(1, replies)
    events = {e["node_id"]: e for e in audit.events if e["event"] == "client_update"}
    for attacker in (101, 102):
        assert events[attacker]["selected"] is False
        assert "krum score" in events[attacker]["reason"]
        assert events[attacker]["weight"] == 0.0
    assert sum(e["selected"] for e in events.values()) == 1
    assert metrics["robust-rejected"] == 10
    assert metrics["robust-max-score"] == max(e["score"] for e in events.values())
    report = strategy.round_reports[1]
    assert report.clients[101]["label"] == "bank-101"


def test_multikrum_keeps_n_minus_f_and_weights_only_the_selected(as_server):
    strategy = MultiKrum(num_malicious_nodes=2)
    _, replies = planted_round(strategy)
    strategy.aggregate_train(1, replies)
    clients = strategy.round_reports[1].clients
    assert [n for n, c in clients.items() if not c["selected"]] == [101, 102]
    assert sum(c["weight"] for c in clients.values()) == pytest.approx(1.0)


def test_multikrum_geometric_median_keeps_the_selection_and_changes_the_combination(as_server):
    plain, composed = (
        MultiKrum(num_malicious_nodes=2),
        MultiKrum(num_malicious_nodes=2, selected_aggregate="geometric-median"),
    )
    _, replies = planted_round(plain)
    mean_arrays, _ = plain.aggregate_train(1, replies)
    _, replies = planted_round(composed)
    median_arrays, _ = composed.aggregate_train(1, replies)
    clients = composed.round_reports[1].clients
    assert [n for n, c in clients.items() if not c["selected"]] == [101, 102]
    assert sum(c["weight"] for c in clients.values()) == pytest.approx(1.0)
    assert "geometric median" in composed.rule_summary()
    assert "weighted mean" in plain.rule_summary()
    a = mean_arrays.to_numpy_ndarrays()
    b = median_arrays.to_numpy_ndarrays()
    assert any(not np.allclose(x, y) for x, y in zip(a, b, strict=True))


def test_bulyan_and_trimmed_mean_report_their_decisions(as_server):
    bulyan = Bulyan(num_malicious_nodes=2)
    _, replies = planted_round(bulyan)
    bulyan.aggregate_train(1, replies)
    clients = bulyan.round_reports[1].clients
    # Identical colluders can survive Bulyan's last Krum round (one neighbour left);
    # the coordinate stage then cuts them everywhere. Either way the audit says so.
    for attacker in (101, 102):
        reason = clients[attacker]["reason"]
        assert "not picked" in reason or "median in 100.0% of coordinates" in reason
    assert sum(not c["selected"] for c in clients.values()) == 4  # n - theta = 2f
    trimmed = TrimmedMean(beta=0.2, num_malicious_nodes=2)
    _, replies = planted_round(trimmed)
    trimmed.aggregate_train(1, replies)
    clients = trimmed.round_reports[1].clients
    assert clients[101]["score"] == 1.0 and "trimmed in 100.0%" in clients[101]["reason"]


def test_norm_bound_and_centered_clipping_report_clip_factors(as_server):
    strategy = NormBound(max_norm=10.0)
    _, replies = planted_round(strategy)
    _, metrics = strategy.aggregate_train(1, replies)
    clients = strategy.round_reports[1].clients
    assert clients[101]["clip_factor"] < 0.1 and "max_norm" in clients[101]["reason"]
    assert clients[100]["clip_factor"] == 1.0
    assert metrics["robust-clipped"] == 2
    assert metrics["robust-mean-clip-factor"] < 1.0


def test_centered_clipping_centers_on_the_previous_aggregate(as_server):
    strategy = CenteredClipping(tau=0.5)
    base = model()
    arrays = arrays_of(base)
    for server_round in (1, 2):
        sent = start_round(strategy, arrays, [1, 2, 3], server_round)
        moved = arrays_of({k: a.numpy() + 1.0 for k, a in arrays.items()})
        replies = [reply(sent[n], moved, {"num-examples": 1}) for n in (1, 2, 3)]
        first_center = None if strategy.center is None else strategy.center.copy()
        arrays, _ = strategy.aggregate_train(server_round, replies)
        if server_round == 1:
            assert first_center is None
            # Zero center: the all-ones update (norm sqrt(36)) is clipped to norm 0.5.
            assert np.linalg.norm(strategy.center) == pytest.approx(0.5, rel=1e-5)
    # Round 2 starts from the round-1 aggregate and moves at most tau further.
    assert np.linalg.norm(strategy.center) == pytest.approx(1.0, rel=1e-5)


def test_f_against_n_is_checked_with_a_clear_message(as_server):
    base = arrays_of(model())
    cases = [
        (Krum(num_malicious_nodes=2), "needs at least 7 nodes .*n > 2f \\+ 2"),
        (MultiKrum(num_malicious_nodes=1, num_nodes_to_select=9), "m = 9"),
        (Bulyan(num_malicious_nodes=1), "4f \\+ 3"),
        (Median(num_malicious_nodes=3), "2f \\+ 1"),
        (TrimmedMean(beta=0.1, num_malicious_nodes=1), "floor\\(beta \\* n\\) >= f"),
    ]
    for strategy, message in cases:
        with pytest.raises(ValueError, match=message):
            start_round(strategy, base, [1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Krum(num_malicious_nodes=-1), "non-negative integer"),
        (lambda: Bulyan(num_malicious_nodes=1.5), "non-negative integer"),
        (lambda: MultiKrum(num_nodes_to_select=0), "positive integer"),
        (lambda: MultiKrum(selected_aggregate="median"), "selected_aggregate must be one of"),
        (lambda: TrimmedMean(beta=0.5), "beta must be in"),
        (lambda: TrimmedMean(beta=0.0, num_malicious_nodes=1), "trims nothing"),
        (lambda: CenteredClipping(tau=0.0), "tau"),
        (lambda: CenteredClipping(tau=1.0, iterations=0), "iterations"),
        (lambda: NormBound(max_norm=-1.0), "max_norm"),
        (lambda: GeometricMedian(max_iter=0), "max_iter"),
    ],
)
def test_constructor_rejects_bad_parameters(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_too_few_valid_replies_skip_the_round(as_server):
    strategy = Krum(num_malicious_nodes=1)  # needs 5
    base = model()
    sent = start_round(strategy, arrays_of(base), [1, 2, 3, 4, 5])
    replies = [reply(sent[n], shifted(base, 1.0), {"num-examples": 1}) for n in (1, 2, 3)]
    replies += [reply(sent[4], error="timeout"), reply(sent[5], error="crash")]
    out, metrics = strategy.aggregate_train(1, replies)
    assert out is None
    assert "needs at least 5" in strategy.round_reports[1].skipped_reason
    assert metrics["clients-rejected"] == 2
    assert any(e["event"] == "round_skipped" for e in strategy.audit.events)


def test_bad_replies_are_rejected_and_the_round_goes_on(as_server):
    strategy = Median(num_malicious_nodes=1)
    nodes = list(range(1, 9))
    base = model()
    sent = start_round(strategy, arrays_of(base), nodes)
    nan = {k: v + 1.0 for k, v in base.items()}
    nan["layer.bias"][2] = np.inf
    wrong = {"layer.weight": base["layer.weight"][:3], "layer.bias": base["layer.bias"]}
    replies = [reply(sent[n], shifted(base, 1.0), {"num-examples": 10}) for n in nodes[:5]]
    replies += [
        reply(sent[6], arrays_of(nan), {"num-examples": 10}),
        reply(sent[7], arrays_of(wrong), {"num-examples": 10}),
        reply(sent[8], error="out of memory"),
    ]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.round_reports[1]
    assert report.accepted == [1, 2, 3, 4, 5]
    assert metrics["clients-rejected"] == 3
    assert "NaN or Inf" in report.rejected[6]
    assert "shape" in report.rejected[7]
    assert "out of memory" in report.rejected[8]
    np.testing.assert_allclose(update_of(new_arrays, base), 1.0, atol=1e-5)
    rejected = {e["node_id"] for e in strategy.audit.events if e["event"] == "reply_rejected"}
    assert rejected == {6, 7, 8}


def test_median_and_trimmed_mean_match_flower(as_server):
    nodes = list(range(1, 11))
    base = model()
    for ours, flower in (
        (Median(), FedMedian()),
        (TrimmedMean(beta=0.2), FedTrimmedAvg(beta=0.2)),
    ):
        sent = start_round(ours, arrays_of(base), nodes)
        make = [
            (n, shifted(base, 0.0, 1.0 if n % 3 else 0.1), 10 * n) for n in nodes
        ]  # mixed spreads
        ours_out, _ = ours.aggregate_train(
            1, [reply(sent[n], a, {"num-examples": w}) for n, a, w in make]
        )
        theirs, _ = flower.aggregate_train(
            1, [reply(sent[n], a, {"num-examples": w}) for n, a, w in make]
        )
        for key in SHAPES:
            np.testing.assert_allclose(
                ours_out[key].numpy(), theirs[key].numpy(), rtol=1e-5, atol=1e-5
            )


def test_krum_matches_flower_when_flower_is_accurate(as_server):
    # Large, well-separated updates: Flower's float32 distances are accurate enough here.
    nodes = list(range(1, 8))
    base = model()
    ours = Krum(num_malicious_nodes=1)
    sent = start_round(ours, arrays_of(base), nodes)
    make = [(n, shifted(base, 0.0, 0.5 + 0.2 * n)) for n in nodes]
    ours_out, _ = ours.aggregate_train(1, [reply(sent[n], a, {"num-examples": 5}) for n, a in make])
    theirs, _ = FlowerKrum(num_malicious_nodes=1).aggregate_train(
        1, [reply(sent[n], a, {"num-examples": 5}) for n, a in make]
    )
    for key in SHAPES:
        np.testing.assert_allclose(ours_out[key].numpy(), theirs[key].numpy(), rtol=1e-6)


def test_weight_caps_apply_to_robust_rules(as_server):
    strategy = GeometricMedian(max_weight_median_multiple=2.0)
    nodes = [1, 2, 3]
    base = model()
    sent = start_round(strategy, arrays_of(base), nodes)
    replies = [
        reply(sent[1], shifted(base, 0.0), {"num-examples": 100}),
        reply(sent[2], shifted(base, 0.0), {"num-examples": 100}),
        reply(sent[3], shifted(base, 9.0), {"num-examples": 1_000_000}),
    ]
    out, _ = strategy.aggregate_train(1, replies)
    clients = strategy.round_reports[1].clients
    assert clients[3]["weight_capped"] is True
    # Capped to 200 of 400: a tie in weight, so the median sits between, not on, the liar.
    assert np.abs(update_of(out, base)).max() < 9.0 - 1e-3


# ---------------------------------------------------------------------------
# The bank app's strategy factory
# ---------------------------------------------------------------------------


def settings_with(**overrides):
    from bank_risk.settings import BankAppSettings

    return BankAppSettings.from_config({k.replace("_", "-"): v for k, v in overrides.items()})


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("fedavg", FedAvg, {}),
        ("krum", Krum, {"num_malicious": 2}),
        ("multikrum", MultiKrum, {"num_malicious": 2, "multikrum_select": 5}),
        ("multikrum", MultiKrum, {"num_malicious": 2, "multikrum_aggregate": "geometric-median"}),
        ("median", Median, {}),
        ("trimmed-mean", TrimmedMean, {"trim_beta": 0.3}),
        ("bulyan", Bulyan, {"num_malicious": 1}),
        ("geometric-median", GeometricMedian, {"geomed_max_iter": 7}),
        ("centered-clipping", CenteredClipping, {"clip_tau": 2.5, "clip_iterations": 3}),
        ("norm-bound", NormBound, {"max_norm": 4.0}),
    ],
)
def test_factory_builds_each_rule_from_the_run_config(name, cls, extra):
    from bank_risk.strategy_factory import build_strategy

    settings = settings_with(aggregation=name, max_weight_median_multiple=3.0, **extra)
    strategy = build_strategy(settings, AuditTrail(), num_nodes=10)
    assert type(strategy) is cls
    assert strategy.max_weight_median_multiple == 3.0 and strategy.max_weight is None
    if "num_malicious" in extra:
        assert strategy.num_malicious_nodes == extra["num_malicious"]
    expected = {
        "multikrum": ("num_nodes_to_select", extra.get("multikrum_select")),
        "trimmed-mean": ("beta", 0.3),
        "geometric-median": ("max_iter", 7),
        "centered-clipping": ("tau", 2.5),
        "norm-bound": ("max_norm", 4.0),
    }
    if name in expected:
        attr, value = expected[name]
        assert getattr(strategy, attr) == value
    if name == "multikrum":
        assert strategy.selected_aggregate == extra.get("multikrum_aggregate", "mean")


def test_factory_rejects_unknown_rules_and_impossible_f():
    from bank_risk.settings import SettingsError
    from bank_risk.strategy_factory import build_strategy

    with pytest.raises(SettingsError, match="aggregation must be one of fedavg, krum"):
        build_strategy(settings_with(aggregation="krumm"), AuditTrail(), num_nodes=10)
    with pytest.raises(SettingsError, match="Bulyan needs n >= 4f \\+ 3"):
        build_strategy(
            settings_with(aggregation="bulyan", num_malicious=2), AuditTrail(), num_nodes=10
        )
    with pytest.raises(SettingsError, match=r"robust aggregation: invalid literal"):
        build_strategy(
            settings_with(aggregation="krum", num_malicious="two"), AuditTrail(), num_nodes=10
        )
