"""Defects an adversarial review found in reply intake, each pinned by a test (issue 11).

Built on real Messages (``conftest.reply``); every case names what used to go wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, reply, sent
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.strategies import FedAvg, Median, MultiKrum
from flower_ext.validation import finite_metrics, short_reason


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _round(strategy, global_values, client_values, nodes=(2, 3, 4), weights=None):
    out = sent(strategy.configure_train(1, _record(global_values), ConfigRecord(), FakeGrid(nodes)))
    replies = [
        reply(m, _record(client_values), {"num-examples": (weights or {}).get(i, 10)})
        for i, m in enumerate(out)
    ]
    return strategy.aggregate_train(1, replies), out


def test_megabytes_of_newlines_in_an_error_reason_are_summarised_at_once() -> None:
    """The traceback regex used to rescan from every line start (quadratic in newlines)."""
    assert short_reason("\n" * 4_000_000 + "ValueError: x") == "ValueError: x"
    frames = '  File "a.py", line 1\n' * 200_000
    assert short_reason("Traceback (most recent call last):\n" + frames + "KeyError: 'k'") == (
        "KeyError: 'k'"
    )


def test_an_integer_too_large_for_a_float_is_a_dropped_metric() -> None:
    clean, dropped = finite_metrics({"ok": 1.0, "huge": 10**400, "lst": [1, 10**400]})
    assert clean == {"ok": 1.0}
    assert sorted(dropped) == ["huge", "lst"]


@pytest.mark.parametrize("strategy_cls", [FedAvg, Median, MultiKrum])
@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        (np.int64, 1_700_000_000_123_456_789),  # a nanosecond timestamp
        (np.int64, 2**63 - 1),
        (np.int64, 2**53 + 1),
        (np.uint64, 2**64 - 1),
    ],
)
def test_large_integer_buffers_come_back_exact(as_server, strategy_cls, dtype, value) -> None:
    """Values past 2**53 used to be rejected as "too large", rounded, or wrap around."""
    global_values = {"w": np.zeros(4, np.float32), "t": np.array([value], dtype=dtype)}
    client = {"w": np.full(4, 0.1, np.float32), "t": np.array([value], dtype=dtype)}
    (arrays, _), _ = _round(strategy_cls(), global_values, client)
    assert arrays is not None
    got = arrays["t"].numpy()
    assert got.dtype == dtype and int(got[0]) == value


def test_a_counter_moved_past_float32_precision_is_exact(as_server) -> None:
    """0 -> 16,777,217 (2**24 + 1) by every client used to come back as 16,777,216.

    (FedAvg averages integer updates in float64. Rules that stack a float32 update
    matrix hold an integer update exactly up to 2**24 per round, as documented.)"""
    strategy_cls = FedAvg
    global_values = {"w": np.zeros(4, np.float32), "n": np.array(0, dtype=np.int64)}
    client = {"w": np.full(4, 0.1, np.float32), "n": np.array(16_777_217, dtype=np.int64)}
    (arrays, _), _ = _round(strategy_cls(), global_values, client)
    assert arrays is not None
    assert arrays["n"].numpy().shape == () and int(arrays["n"].numpy()) == 16_777_217


def test_integer_ties_round_like_the_mean_itself(as_server) -> None:
    """global 3, clients 3 and 4: the mean 3.5 rounds half-to-even to 4, as rint would."""
    strategy = FedAvg()
    global_values = {"c": np.array([3, 4], dtype=np.int32)}
    out = sent(
        strategy.configure_train(1, _record(global_values), ConfigRecord(), FakeGrid([2, 3]))
    )
    replies = [
        reply(out[0], _record({"c": np.array([3, 4], np.int32)}), {"num-examples": 1}),
        reply(out[1], _record({"c": np.array([4, 5], np.int32)}), {"num-examples": 1}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_array_equal(arrays["c"].numpy(), np.rint([3.5, 4.5]).astype(np.int32))


@pytest.mark.parametrize(
    "strategy",
    [FedAvg(server_learning_rate=2.0), Median(server_learning_rate=2.0)],
    ids=["FedAvg", "Median"],
)
def test_float16_overflow_skips_the_round_instead_of_writing_inf(as_server, strategy) -> None:
    global_values = {"h": np.array([60000.0, 10.0], dtype=np.float16)}
    client = {"h": np.array([65000.0, 10.0], dtype=np.float16)}
    (arrays, _), _ = _round(strategy, global_values, client)
    assert arrays is None
    assert "not finite" in strategy.round_reports[1].skipped_reason


def _forged_reply(sender: int, to: Message, content: RecordDict | Error) -> Message:
    TaskIdentity.node_id = sender
    try:
        if isinstance(content, Error):
            message = Message(content, reply_to=to)
        else:
            message = Message(content=content, reply_to=to)
    finally:
        TaskIdentity.node_id = 1
    message.metadata.__dict__["_src_node_id"] = sender
    return message


def test_an_error_reply_in_another_banks_name_cannot_veto_it(as_server) -> None:
    strategy = FedAvg()
    values = {"w": np.zeros(3, np.float32)}
    out = sent(strategy.configure_train(1, _record(values), ConfigRecord(), FakeGrid([2, 3, 4])))
    by_node = {int(m.metadata.dst_node_id): m for m in out}
    replies = [reply(m, _record(values), {"num-examples": 5}) for m in out]
    replies.append(_forged_reply(4, by_node[2], Error(code=1, reason="node 2 failed (forged)")))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    report = strategy.round_reports[1]
    assert sorted(report.accepted) == [2, 3]
    assert 4 in report.rejected and "replies from this node" in report.rejected[4]


def test_a_bank_answering_another_banks_message_loses_its_own_reply_too(as_server) -> None:
    """A node that sends two replies (one in another's place) has both rejected; the node
    whose message it answered, silent itself, is reported missing."""
    strategy = FedAvg()
    values = {"w": np.zeros(3, np.float32)}
    out = sent(strategy.configure_train(1, _record(values), ConfigRecord(), FakeGrid([2, 3, 4])))
    by_node = {int(m.metadata.dst_node_id): m for m in out}
    content = RecordDict({"arrays": _record(values), "metrics": MetricRecord({"num-examples": 5})})
    replies = [
        reply(by_node[3], _record(values), {"num-examples": 5}),
        reply(by_node[4], _record(values), {"num-examples": 5}),
        _forged_reply(4, by_node[2], content),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    report = strategy.round_reports[1]
    assert report.accepted == [3]
    assert 4 in report.rejected
    assert report.missing == [2]


HUGE = [1.0, 1e200]


def test_huge_histogram_counts_give_no_pooled_figure_rather_than_nan(as_server) -> None:
    strategy = FedAvg()
    arrays = _record({"w": np.zeros(3, np.float32)})
    out = sent(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([2, 3])))
    replies = [
        reply(
            out[0], None, {"num-examples": 5, "hist-neg": [1e200, 1.0], "hist-pos": [1.0, 1e200]}
        ),
        reply(out[1], None, {"num-examples": 5, "hist-neg": [2.0, 1.0], "hist-pos": [1.0, 2.0]}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    for value in metrics.values():
        assert np.isfinite(value).all()


def test_colluding_huge_metrics_do_not_make_the_mean_infinite(as_server) -> None:
    strategy = FedAvg()
    arrays = _record({"w": np.zeros(3, np.float32)})
    out = sent(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([2, 3, 4])))
    replies = [
        reply(m, None, {"num-examples": w, "m": 1.7976931348623157e308, "ok": 1.0})
        for m, w in zip(out, (3, 10**9, 3), strict=True)
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics["ok"] == pytest.approx(1.0)
    assert all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("bad", [float("inf"), 1e20, 0.0, -1.0])
def test_max_update_norm_outside_its_safe_range_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="max_update_norm"):
        FedAvg(max_update_norm=bad)


def test_a_banks_bad_sketch_is_left_out_of_the_pooled_figure_not_everyones(as_server) -> None:
    """Review (issue 16): one fake sketch claiming a million rows moved the pooled AUC from
    0.75 to 0.0002, and an unsorted one removed the pooled figure for everyone. Now a
    sketch whose cells do not add up to the reply's num-examples, or that is malformed,
    is left out, audited (sketch_rejected) and counted (pooled-banks-left-out)."""
    from flower_ext.audit import AuditTrail
    from flower_ext.metrics import score_sketch, sketch_problem

    rng = np.random.default_rng(0)
    honest = []
    for _ in range(2):
        y = (rng.uniform(size=400) < 0.25).astype(int)
        edges, neg, pos = score_sketch(y, rng.normal(size=400) + y)
        honest.append({"num-examples": 400, "hist-edges": edges.tolist(),
                       "hist-neg": neg.tolist(), "hist-pos": pos.tolist()})  # fmt: skip
    inflated = {
        "num-examples": 400,
        "hist-edges": [-5.0, 0.0, 5.0],
        "hist-neg": [0.0, 0.0, 0.0, 1e6, 0.0],
        "hist-pos": [0.0, 1e6, 0.0, 0.0, 0.0],
    }
    unsorted = {**honest[0], "hist-edges": honest[0]["hist-edges"][::-1]}
    assert "claims 400 examples" in sketch_problem(inflated)
    assert "sorted" in sketch_problem(unsorted)
    assert sketch_problem(honest[0]) == ""
    for liar in (inflated, unsorted):
        audit = AuditTrail()
        strategy = FedAvg(audit=audit)
        arrays = _record({"w": np.zeros(3, np.float32)})
        out = sent(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([2, 3, 4])))
        replies = [reply(m, None, v) for m, v in zip(out, [*honest, liar], strict=True)]
        metrics = strategy.aggregate_evaluate(1, replies)
        assert metrics is not None and metrics["pooled-auc"] > 0.6  # the honest two, pooled
        assert metrics["pooled-banks-left-out"] == 1
        events = [e for e in audit.events if e["event"] == "sketch_rejected"]
        assert [e["node_id"] for e in events] == [out[2].metadata.dst_node_id]
