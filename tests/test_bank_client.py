"""The bank ClientApp's handlers on real Messages (no runtime): train, evaluate, query."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import outgoing
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from bank_risk.client_app import DATA_ERROR_CODE
from bank_risk.client_app import app as client_app
from bank_risk.settings import BankAppSettings, SettingsError
from flower_ext.model import build_model


def _csv(tmp_path) -> str:
    rng = np.random.default_rng(1)
    n = 300
    frame = pd.DataFrame(
        {"region": rng.integers(1, 4, n), "x1": rng.normal(size=n), "x2": rng.normal(size=n)}
    )
    frame["y"] = (frame["x1"] + rng.normal(size=n) > 1).astype(int)
    frame.loc[frame["region"] == 3, "y"] = 0  # a lender with no defaults yet
    path = tmp_path / "banks.csv"
    frame.to_csv(path, index=False)
    return str(path)


def _context(run_config: dict, partition: int, partitions: int = 3) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": partitions},
        state=RecordDict(),
        run_config=run_config,
    )


def _config(path: str) -> dict:
    return {
        "dataset": "csv",
        "csv-path": path,
        "csv-label-column": "y",
        "csv-drop-columns": "",
        "csv-partition-column": "region",
        "csv-partition-values": "",
        "num-banks": 3,
        "num-server-rounds": 2,
        "model": "logreg",
    }


def _global(num_features: int = 3) -> ArrayRecord:
    return ArrayRecord(build_model(num_features, "logreg").state_dict())


def _message(kind: str, round_: int, node: int):
    msg = outgoing(_global(), node, kind)
    msg.content["config"] = ConfigRecord({"server-round": round_, "num-server-rounds": 2})
    return msg


def test_train_replies_with_weights_and_num_examples(tmp_path, as_server):
    ctx = _context(_config(_csv(tmp_path)), partition=0)
    out = client_app(_message(MessageType.TRAIN, 1, 100), ctx)
    assert not out.has_error()
    arrays = out.content["arrays"]
    assert list(arrays.keys()) == list(_global().keys())
    assert out.content["metrics"]["num-examples"] > 50
    assert out.content["client-info"]["bank"] == "bank-0-region=1"
    # Training moved the weights.
    assert not np.allclose(arrays["net.0.weight"].numpy(), _global()["net.0.weight"].numpy())


def test_single_class_bank_reports_null_auc_with_reason_and_local_only(tmp_path, as_server):
    ctx = _context(_config(_csv(tmp_path)), partition=2)
    out = client_app(_message(MessageType.EVALUATE, 2, 102), ctx)
    metrics = out.content["metrics"]
    assert "auc" not in metrics and "ks" not in metrics
    assert "only non-defaults" in out.content["client-info"]["auc-undefined-reason"]
    assert metrics["num-examples"] > 0 and sum(metrics["hist-pos"]) == 0
    assert "local-only-logloss" in metrics  # final round: local-only baseline ran


def test_query_returns_feature_moments(tmp_path, as_server):
    ctx = _context(_config(_csv(tmp_path)), partition=1)
    out = client_app(_message(MessageType.QUERY, 0, 101), ctx)
    moments = out.content["moments"]
    assert len(moments["sum"]) == 3 and moments["num-examples"] > 0
    assert list(out.content["features"]["names"]) == ["region", "x1", "x2"]


def test_wrong_number_of_supernodes_is_explained(tmp_path, as_server):
    ctx = _context(_config(_csv(tmp_path)), partition=0, partitions=2)
    # A data problem is an error reply of one line naming the bank, not a raised exception.
    out = client_app(_message(MessageType.TRAIN, 1, 100), ctx)
    assert out.has_error() and out.error.code == DATA_ERROR_CODE
    assert "num-supernodes=3" in out.error.reason and "bank 0" in out.error.reason
    assert "\n" not in out.error.reason


def test_bad_settings_are_named():
    with pytest.raises(SettingsError, match="model must be one of"):
        BankAppSettings.from_config({"model": "cnn"})
    with pytest.raises(SettingsError, match="num-server-rounds"):
        BankAppSettings.from_config({"num-server-rounds": 0})
    with pytest.raises(SettingsError, match="hidden-units"):
        BankAppSettings.from_config({"hidden-units": "a,b"})


def test_evaluate_sketch_resolution_follows_the_run_and_the_banks_floor(tmp_path, as_server):
    """sketch-rows-per-bin = 1 sends exact sketches (every row on an edge); a bank's node
    config sketch-min-rows-per-bin raises it back, whatever the run asks."""
    config = {**_config(_csv(tmp_path)), "sketch-rows-per-bin": 1}

    def between_cells(node_config: dict) -> tuple[int, int]:
        ctx = _context(config, partition=0)
        ctx.node_config.update(node_config)
        metrics = client_app(_message(MessageType.EVALUATE, 1, 100), ctx).content["metrics"]
        rows = int(metrics["num-examples"])
        between = sum(metrics["hist-neg"][1::2]) + sum(metrics["hist-pos"][1::2])
        return rows, between

    rows, between = between_cells({})
    assert between == 0 and rows > 20  # exact: no row strictly between two edges
    rows, between = between_cells({"sketch-min-rows-per-bin": 4})
    assert between == rows  # about four rows a cell, none on an edge


def test_a_bad_sketch_resolution_is_named_before_the_run():
    with pytest.raises(SettingsError, match="sketch-rows-per-bin must be a whole number >= 1"):
        BankAppSettings.from_config({"sketch-rows-per-bin": 0})
