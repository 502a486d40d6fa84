"""Conformance with Flower's own FedAvg on the models Flower's examples use (issue 12).

For each model type (BatchNorm-style 0-d int64 buffer, scikit-learn's
Fortran-ordered float64 ``coef_``, float64 weights with an int64 counter, mixed
float16/bool/int/uint buffers, zero-size arrays, many small arrays) and each
flower-ext strategy, three rounds are played on the same replies as
``flwr.serverapp.strategy.FedAvg``. Each round must return exactly the global
model's keys, shapes and dtypes; FedAvg's values must equal Flower's within the
dtype's precision (integers: Flower's float64 mean, rounded); robust rules, fed
identical updates, must return that update; metrics must be Flower's.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, reply, sent
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from flower_ext.strategies import (
    Bulyan,
    CenteredClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    NormBound,
    TrimmedMean,
)

NODES = [11, 12, 13, 14, 15, 16, 17]


def _models() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    many = {f"layer{i}.weight": rng.normal(size=(3, 2)).astype(np.float32) for i in range(40)}
    return {
        "cnn_batchnorm": {
            "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
            "conv.bias": np.zeros(4, np.float32),
            "bn.running_mean": np.zeros(4, np.float32),
            "bn.running_var": np.ones(4, np.float32),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # shape ()
        },
        "sklearn_logreg": {
            "coef": np.asfortranarray(rng.normal(size=(3, 5))),  # saga's coef_ is F-ordered
            "intercept": rng.normal(size=3),
        },
        "float64_with_counter": {
            "w": np.array([1000.123456789, -3.5e-9, 12.0]),
            "counter": np.array([100000002], dtype=np.int64),
        },
        "mixed_buffers": {
            "half": rng.normal(size=6).astype(np.float16),
            "mask": np.array([True, False, True]),
            "idx": np.arange(4, dtype=np.int32).reshape(2, 2),
            "bytes": np.arange(5, dtype=np.uint8),
            "w": rng.normal(size=5).astype(np.float32),
        },
        "zero_size": {
            "empty2d": np.zeros((0, 3), np.float32),
            "empty1d": np.zeros((0,), np.float32),
            "w": rng.normal(size=2).astype(np.float32),
        },
        "many_arrays": many,
    }


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    # Array(ndarray) keeps the memory order: F-ordered arrays go out F-ordered.
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _client_values(global_values: dict[str, np.ndarray], client: int, rnd: int, same: bool):
    """What client ``client`` sends in round ``rnd``: a small update of every array."""
    rng = np.random.default_rng(1000 * rnd + (0 if same else client))
    out = {}
    for key, value in global_values.items():
        if value.dtype == np.bool_:
            out[key] = value if (same or client % 2) else ~value
        elif value.dtype.kind in "iu":
            out[key] = value + np.asarray(rng.integers(0, 3, size=value.shape), value.dtype)
        else:
            step = rng.normal(scale=1e-3, size=value.shape)
            if key == "w" and value.dtype == np.float64:
                step = np.full(value.shape, 1e-6)  # issue 12's +1e-6 on 1000.123456789
            new = (value.astype(np.float64) + step).astype(value.dtype)
            out[key] = np.asfortranarray(new) if value.flags.f_contiguous else new
    return out


def _play_round(strategy, flower: FlowerFedAvg, global_values, rnd: int, same: bool):
    arrays = _record(global_values)
    out = sent(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(NODES)))
    replies = []
    for i, msg in enumerate(out):
        values = _client_values(global_values, i, rnd, same)
        metrics = {"num-examples": 10 + 7 * i, "train-loss": 0.5 + 0.1 * i, "hist": [float(i), 1.0]}
        replies.append(reply(msg, _record(values), metrics))
    ours, our_metrics = strategy.aggregate_train(rnd, replies)
    theirs, their_metrics = flower.aggregate_train(rnd, replies)
    return ours, our_metrics, theirs, their_metrics, replies


def _assert_same_layout(result: ArrayRecord, global_values: dict[str, np.ndarray]) -> None:
    assert list(result.keys()) == list(global_values)
    for key, value in global_values.items():
        got = result[key].numpy()
        assert got.shape == value.shape, (key, got.shape, value.shape)
        assert got.dtype == value.dtype, (key, got.dtype, value.dtype)


def _assert_matches_flower(result: ArrayRecord, flower: ArrayRecord, global_values) -> None:
    for key, value in global_values.items():
        ours = result[key].numpy()
        ref = flower[key].numpy().astype(np.float64)
        if value.dtype == np.bool_:
            np.testing.assert_array_equal(ours, ref >= 0.5, err_msg=key)
        elif value.dtype.kind in "iu":
            np.testing.assert_array_equal(ours, np.rint(ref).astype(value.dtype), err_msg=key)
        else:
            rtol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}[value.dtype.type]
            scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
            np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale, err_msg=key)


def _strategies():
    big = {"tau": 1e6}
    return {
        "FedAvg": lambda: FedAvg(),
        "Median": lambda: Median(),
        "FedMedian": lambda: FedMedian(),
        "TrimmedMean": lambda: TrimmedMean(beta=0.2),
        "FedTrimmedAvg": lambda: FedTrimmedAvg(1.0, 1.0, 2, 2, 2, "num-examples"),
        "Krum": lambda: Krum(num_malicious_nodes=1),
        "MultiKrum": lambda: MultiKrum(num_malicious_nodes=1),
        "Bulyan": lambda: Bulyan(num_malicious_nodes=1),
        "GeometricMedian": lambda: GeometricMedian(),
        "CenteredClipping": lambda: CenteredClipping(**big),
        "NormBound": lambda: NormBound(max_norm=1e6),
    }


@pytest.mark.parametrize("model", list(_models()))
def test_fedavg_equals_flower_fedavg_for_three_rounds(as_server, model: str) -> None:
    global_values = _models()[model]
    ours_strategy, flower = FedAvg(), FlowerFedAvg()
    for rnd in (1, 2, 3):
        ours, our_metrics, theirs, their_metrics, _ = _play_round(
            ours_strategy, flower, global_values, rnd, same=False
        )
        assert ours is not None and theirs is not None, ours_strategy.round_reports[rnd]
        _assert_same_layout(ours, global_values)
        _assert_matches_flower(ours, theirs, global_values)
        # Flower's train metrics, same values; ours add only clients-* counts.
        assert set(their_metrics) <= set(our_metrics)
        for key, value in their_metrics.items():
            np.testing.assert_allclose(our_metrics[key], value, rtol=1e-12)
        assert set(our_metrics) - set(their_metrics) == {
            "clients-accepted",
            "clients-rejected",
            "clients-missing",
            "clients-selected",
        }
        global_values = {k: ours[k].numpy() for k in global_values}


@pytest.mark.parametrize("model", list(_models()))
@pytest.mark.parametrize("name", list(_strategies()))
def test_every_rule_keeps_layout_and_agrees_on_identical_updates(
    as_server, model: str, name: str
) -> None:
    """All clients send the same update: every rule must return it, as Flower's FedAvg does."""
    global_values = _models()[model]
    strategy, flower = _strategies()[name](), FlowerFedAvg()
    for rnd in (1, 2, 3):
        ours, _, theirs, _, _ = _play_round(strategy, flower, global_values, rnd, same=True)
        assert ours is not None, strategy.round_reports[rnd]
        assert not strategy.round_reports[rnd].rejected
        _assert_same_layout(ours, global_values)
        _assert_matches_flower(ours, theirs, global_values)
        global_values = {k: ours[k].numpy() for k in global_values}


@pytest.mark.parametrize("name", list(_strategies()))
def test_every_rule_keeps_layout_on_different_updates(as_server, name: str) -> None:
    """Round 2 and 3 must accept every reply (issue 12: a 0-d buffer came back as (1,))."""
    global_values = _models()["cnn_batchnorm"]
    strategy, flower = _strategies()[name](), FlowerFedAvg()
    for rnd in (1, 2, 3):
        ours, _, _, _, _ = _play_round(strategy, flower, global_values, rnd, same=False)
        assert ours is not None
        assert strategy.round_reports[rnd].rejected == {}
        assert len(strategy.round_reports[rnd].accepted) == len(NODES)
        _assert_same_layout(ours, global_values)
        global_values = {k: ours[k].numpy() for k in global_values}


def test_evaluate_metrics_are_flowers_plus_pooled_extras(as_server) -> None:
    """Client ``auc``/``ks`` and list metrics are averaged as Flower does; no num-examples."""
    strategy, flower = FedAvg(), FlowerFedAvg()
    arrays = _record({"w": np.zeros(3, np.float32)})
    out = sent(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES[:3])))
    replies = []
    for i, msg in enumerate(out):
        metrics = {
            "num-examples": 100 * (i + 1),
            "auc": 0.6 + 0.1 * i,
            "ks": 0.2 + 0.05 * i,
            "per-class": [0.1 * i, 1.0],
            "hist-neg": [5.0, 3.0, 1.0],
            "hist-pos": [1.0, 2.0, 6.0],
        }
        replies.append(reply(msg, None, metrics))
    ours = strategy.aggregate_evaluate(1, replies)
    theirs = flower.aggregate_evaluate(1, replies)
    assert ours is not None and theirs is not None
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-12, err_msg=key)
    assert set(ours) - set(theirs) == {"pooled-auc", "pooled-ks"}
    assert "num-examples" not in ours


def test_evaluate_metrics_partial_keys_are_averaged_over_senders(as_server) -> None:
    """Flower stops the run when metric keys differ; flower-ext averages what each sent."""
    strategy = FedAvg()
    arrays = _record({"w": np.zeros(3, np.float32)})
    out = sent(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES[:3])))
    replies = [
        reply(out[0], None, {"num-examples": 10, "auc": 0.7, "loss": 1.0}),
        reply(out[1], None, {"num-examples": 30, "auc": 0.9}),
        reply(out[2], None, {"num-examples": 10, "loss": float("nan")}),
    ]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    assert metrics["auc"] == pytest.approx((0.7 * 10 + 0.9 * 30) / 40)
    assert metrics["loss"] == pytest.approx(1.0)  # the NaN is left out, and audited
    dropped = [e for e in strategy.audit.events if e["event"] == "client_metric_dropped"]
    assert [e["node_id"] for e in dropped] == [int(out[2].metadata.dst_node_id)]


def test_train_metrics_weighted_by_num_examples_under_robust_rules(as_server) -> None:
    """A robust rule's share is not the metric weight: Flower weights by num-examples."""
    global_values = _models()["cnn_batchnorm"]
    ours, our_metrics, _, their_metrics, _ = _play_round(
        Krum(num_malicious_nodes=1), FlowerFedAvg(), global_values, 1, same=False
    )
    assert ours is not None
    assert our_metrics["train-loss"] == pytest.approx(their_metrics["train-loss"], rel=1e-12)


def test_flower_positional_signatures() -> None:
    """Flower passes num_malicious_nodes 6th (Krum, MultiKrum, Bulyan) and beta 11th."""
    assert Krum(1.0, 1.0, 2, 2, 2, 1).num_malicious_nodes == 1
    multi = MultiKrum(1.0, 1.0, 2, 2, 2, 1, 3)
    assert (multi.num_malicious_nodes, multi.num_nodes_to_select) == (1, 3)
    assert multi.weighted_by_key == "num-examples"
    assert Bulyan(1.0, 1.0, 2, 2, 2, 1).num_malicious_nodes == 1
    assert Bulyan(selection_rule=None).num_malicious_nodes == 0
    with pytest.raises(ValueError, match="selection_rule"):
        Bulyan(selection_rule=lambda records, f, m: records)
    trimmed = FedTrimmedAvg(1.0, 1.0, 2, 2, 2, "num-examples", "arrays", "config", None, None, 0.3)
    assert trimmed.beta == 0.3
    assert FedMedian(0.5).fraction_train == 0.5


def test_evaluation_only_skips_training_as_flower_does(as_server) -> None:
    """fraction_train=0 sends no training messages instead of failing the f check."""
    strategy = Krum(fraction_train=0.0, num_malicious_nodes=1)
    arrays = _record({"w": np.zeros(3, np.float32)})
    assert list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(NODES))) == []


def test_precision_example_from_the_issue(as_server) -> None:
    """float64 1000.123456789 + 1e-6 and an untouched int64 100000002 come back exact."""
    global_values = {
        "w": np.array([1000.123456789]),
        "counter": np.array([100000002], dtype=np.int64),
    }
    strategy = FedAvg()
    out = sent(
        strategy.configure_train(1, _record(global_values), ConfigRecord(), FakeGrid([2, 3]))
    )
    values = {"w": np.array([1000.123457789]), "counter": np.array([100000002], dtype=np.int64)}
    replies = [reply(m, _record(values), {"num-examples": 5}) for m in out]
    result, _ = strategy.aggregate_train(1, replies)
    assert result is not None
    assert result["w"].numpy()[0] == pytest.approx(1000.123457789, abs=1e-12)
    assert result["counter"].numpy()[0] == 100000002
    assert isinstance(result, ArrayRecord) and isinstance(MetricRecord(), MetricRecord)


def test_arrays_in_another_key_order_are_read_by_key(as_server) -> None:
    """Flower averages by key; a reply listing the same arrays in another order is valid."""
    global_values = {"a": np.zeros(2, np.float32), "b": np.ones(3, np.float32)}
    strategy, flower = FedAvg(), FlowerFedAvg()
    out = sent(
        strategy.configure_train(1, _record(global_values), ConfigRecord(), FakeGrid([2, 3]))
    )
    first = {"a": np.full(2, 1.0, np.float32), "b": np.full(3, 2.0, np.float32)}
    second = {"b": np.full(3, 4.0, np.float32), "a": np.full(2, 3.0, np.float32)}
    replies = [
        reply(out[0], _record(first), {"num-examples": 1}),
        reply(out[1], _record(second), {"num-examples": 1}),
    ]
    ours, _ = strategy.aggregate_train(1, replies)
    theirs, _ = flower.aggregate_train(1, replies)
    assert ours is not None and list(ours.keys()) == ["a", "b"]
    np.testing.assert_allclose(ours["a"].numpy(), theirs["a"].numpy())
    np.testing.assert_allclose(ours["b"].numpy(), theirs["b"].numpy())
    np.testing.assert_allclose(ours["a"].numpy(), [2.0, 2.0])


def test_multikrum_default_selects_n_minus_f_and_says_it_differs(as_server) -> None:
    """flower-ext's MultiKrum averages n - f replies by default (Flower's selects 1)."""
    strategy = MultiKrum(num_malicious_nodes=1)
    assert strategy.num_nodes_to_select is None
    assert "Flower's MultiKrum defaults to m = 1" in strategy.rule_summary()
    global_values = _models()["cnn_batchnorm"]
    ours, metrics, _, _, _ = _play_round(strategy, FlowerFedAvg(), global_values, 1, same=False)
    assert ours is not None
    assert metrics["clients-selected"] == len(NODES) - 1
    flower_like = MultiKrum(1.0, 1.0, 2, 2, 2, 1, 1)
    ours, metrics, _, _, _ = _play_round(flower_like, FlowerFedAvg(), global_values, 1, same=False)
    assert ours is not None and metrics["clients-selected"] == 1
