"""FedAvg on validated updates: equals Flower's FedAvg, rejects bad replies, never mutates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_of, reply
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flower_ext.audit import AuditTrail
from flower_ext.strategies import FedAvg

RNG = np.random.default_rng(0)


def model(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "layer.weight": (RNG.normal(size=(4, 3)) * scale).astype(np.float32),
        "layer.bias": (RNG.normal(size=4) * scale).astype(np.float32),
    }


def start_round(strategy, global_arrays, nodes, server_round=1):
    messages = list(
        strategy.configure_train(server_round, global_arrays, ConfigRecord(), FakeGrid(nodes))
    )
    return {m.metadata.dst_node_id: m for m in messages}


def test_fedavg_matches_flower_fedavg(as_server):
    nodes = [11, 12, 13]
    global_arrays = arrays_of(model())
    ours = FedAvg(min_train_nodes=3, min_available_nodes=3)
    sent = start_round(ours, global_arrays, nodes)
    replies = [
        reply(sent[n], arrays_of(model()), {"num-examples": k, "train-loss": float(k)})
        for n, k in zip(nodes, [10, 30, 60], strict=True)
    ]
    flower_arrays, _ = FlowerFedAvg().aggregate_train(1, replies)
    our_arrays, metrics = ours.aggregate_train(1, replies)
    for key in flower_arrays:
        np.testing.assert_allclose(
            our_arrays[key].numpy(), flower_arrays[key].numpy(), rtol=1e-5, atol=1e-6
        )
    assert metrics["train-loss"] == pytest.approx((10 * 10 + 30 * 30 + 60 * 60) / 100)
    assert metrics["clients-accepted"] == 3


def test_bad_replies_are_rejected_with_reasons_and_round_goes_on(as_server):
    nodes = [21, 22, 23, 24, 25, 26, 27]
    base = model()
    global_arrays = arrays_of(base)
    audit = AuditTrail()
    strategy = FedAvg(min_train_nodes=7, min_available_nodes=7, audit=audit)
    sent = start_round(strategy, global_arrays, nodes)
    good = arrays_of({k: v + 1.0 for k, v in base.items()})
    nan = {k: v.copy() for k, v in base.items()}
    nan["layer.bias"][0] = np.nan
    wrong_shape = {"layer.weight": base["layer.weight"][:2], "layer.bias": base["layer.bias"]}
    replies = [
        reply(sent[21], good, {"num-examples": 10}, label="good"),
        reply(sent[22], arrays_of(nan), {"num-examples": 10}, label="nan"),
        reply(sent[23], arrays_of(wrong_shape), {"num-examples": 10}, label="shape"),
        reply(sent[24], good, {"num-examples": -5}, label="negative"),
        reply(sent[25], good, {"loss": 1.0}, label="no-weight"),
        reply(sent[26], error="out of memory"),
        reply(sent[27], good, {"num-examples": 1e12}, label="absurd"),
    ]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.round_reports[1]
    assert report.accepted == [21]
    assert "NaN" in report.rejected[22]
    assert "shape" in report.rejected[23]
    assert "positive" in report.rejected[24]
    assert "missing" in report.rejected[25]
    assert "out of memory" in report.rejected[26]
    assert "plausible" in report.rejected[27]
    # The only accepted client moved every weight by +1.
    np.testing.assert_allclose(
        new_arrays["layer.bias"].numpy(), base["layer.bias"] + 1.0, rtol=1e-6
    )
    rejected_events = [e for e in audit.events if e["event"] == "reply_rejected"]
    assert {e["node_id"] for e in rejected_events} == {22, 23, 24, 25, 26, 27}
    assert metrics["clients-rejected"] == 6


def test_replies_are_not_mutated(as_server):
    nodes = [31, 32]
    global_arrays = arrays_of(model())
    strategy = FedAvg()
    sent = start_round(strategy, global_arrays, nodes)
    replies = [reply(sent[n], arrays_of(model()), {"num-examples": 5}) for n in nodes]
    before = [{k: bytes(a.data) for k, a in r.content["arrays"].items()} for r in replies]
    strategy.aggregate_train(1, replies)
    after = [{k: bytes(a.data) for k, a in r.content["arrays"].items()} for r in replies]
    assert before == after
    assert all(r.content["metrics"]["num-examples"] == 5 for r in replies)


def test_weight_cap_limits_an_inflated_num_examples(as_server):
    nodes = [41, 42, 43]
    base = model()
    global_arrays = arrays_of(base)
    honest = arrays_of(base)  # zero update
    liar = arrays_of({k: v + 10.0 for k, v in base.items()})
    capped = FedAvg(max_weight_median_multiple=2.0)
    sent = start_round(capped, global_arrays, nodes)
    replies = [
        reply(sent[41], honest, {"num-examples": 100}),
        reply(sent[42], honest, {"num-examples": 100}),
        reply(sent[43], liar, {"num-examples": 100_000}),
    ]
    out, _ = capped.aggregate_train(1, replies)
    # Liar capped at 2x median=200 -> weight 200/400 -> moves weights by 5, not ~10.
    shift = out["layer.bias"].numpy() - base["layer.bias"]
    np.testing.assert_allclose(shift, 5.0, rtol=1e-5)
    assert capped.round_reports[1].clients[43]["weight_capped"] is True


def test_server_momentum_accumulates(as_server):
    base = model()
    strategy = FedAvg(server_momentum=0.5)
    arrays = arrays_of(base)
    for server_round in (1, 2):
        sent = start_round(strategy, arrays, [51, 52], server_round)
        moved = arrays_of({k: a.numpy() + 1.0 for k, a in arrays.items()})
        replies = [reply(sent[n], moved, {"num-examples": 1}) for n in (51, 52)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    # Round 1 steps by 1; round 2 by 0.5 * 1 + 1 = 1.5; total 2.5.
    np.testing.assert_allclose(arrays["layer.bias"].numpy(), base["layer.bias"] + 2.5, rtol=1e-5)


def test_too_few_valid_replies_keeps_the_global_model(as_server):
    base = model()
    strategy = FedAvg(min_valid_replies=2)
    sent = start_round(strategy, arrays_of(base), [61, 62])
    replies = [reply(sent[61], arrays_of(base), {"num-examples": 1}), reply(sent[62], error="x")]
    out, metrics = strategy.aggregate_train(1, replies)
    assert out is None
    assert "needs at least 2" in strategy.round_reports[1].skipped_reason
    assert metrics["clients-accepted"] == 1


def test_missing_clients_are_audited(as_server):
    base = model()
    strategy = FedAvg()
    sent = start_round(strategy, arrays_of(base), [71, 72, 73])
    strategy.aggregate_train(1, [reply(sent[71], arrays_of(base), {"num-examples": 1})])
    assert sorted(strategy.round_reports[1].missing) == [72, 73]
    assert sum(e["event"] == "client_missing" for e in strategy.audit.events) == 2


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="server_momentum"):
        FedAvg(server_momentum=1.0)
    with pytest.raises(ValueError, match="max_weight"):
        FedAvg(max_weight=0)


def test_weighted_sum_into_matches_the_matrix_product():
    from flower_ext.aggregation import weighted_sum_into

    rows = [RNG.normal(size=1000).astype(np.float32) for _ in range(7)]
    weights = RNG.uniform(size=7)
    for dtype in (np.float32, np.float64):
        out = np.full(1000, 5.0, dtype=dtype)  # stale content must not leak in
        weighted_sum_into(out, [r.astype(dtype) for r in rows], weights)
        np.testing.assert_allclose(
            out, weights @ np.stack(rows).astype(np.float64), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="weights"):
        weighted_sum_into(np.zeros(1000, np.float32), rows, weights[:3])


def test_superlink_error_reply_is_attributed_to_the_dropped_bank(as_server):
    from flwr.app import Error, Message

    base = model()
    strategy = FedAvg()
    sent = start_round(strategy, arrays_of(base), [81, 82])
    for node, msg in sent.items():  # what the Grid does when it pushes them
        msg.metadata.__dict__["_message_id"] = f"msg-{node}"
    ok = reply(sent[81], arrays_of(base), {"num-examples": 3})
    # The SuperLink (node 1) answers for node 82, which went offline mid-round.
    lost = Message(Error(code=3, reason="node unavailable"), reply_to=sent[82])
    lost.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink sends it
    strategy.aggregate_train(1, [ok, lost])
    report = strategy.round_reports[1]
    assert "node unavailable" in report.rejected[82]
    assert report.missing == []
    event = next(e for e in strategy.audit.events if e["event"] == "reply_rejected")
    assert event["node_id"] == 82
