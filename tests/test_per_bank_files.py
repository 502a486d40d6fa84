"""One file per bank, the deployment case: every bank uses all rows of its own file.

The files are written by the tests (no real data). Deployment-style tests drive the
bank ClientApp's handlers with the node config the deploy script gives each
SuperNode (``csv-path``) and the run config ``deploy.py run`` passes.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
from conftest import APP_DIR, outgoing
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from bank_risk.client_app import app as client_app
from bank_risk.settings import BankAppSettings
from flower_ext.data import DataError, DataSource, load_all_banks, load_bank
from flower_ext.model import build_model

ROWS = (120, 257, 61)  # three banks of very different sizes


def _bank_file(path, rows: int, seed: int, id_column: bool = True) -> None:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x1": rng.normal(size=rows), "x2": rng.normal(size=rows)})
    frame["y"] = (frame["x1"] + rng.normal(size=rows) > 0.8).astype(int)
    if id_column:
        frame.insert(0, "ID", np.arange(1, rows + 1) + 1000 * seed)
    frame.to_csv(path, index=False)


@pytest.fixture
def bank_dir(tmp_path):
    folder = tmp_path / "banks"
    folder.mkdir()
    for i, rows in enumerate(ROWS):
        _bank_file(folder / f"bank-{i}.csv", rows, seed=i)
    return folder


def _run_config(**extra) -> dict:
    return {
        "dataset": "csv",
        "csv-source": "per-bank",
        "csv-label-column": "y",
        "csv-drop-columns": "ID",
        "num-banks": 3,
        "num-server-rounds": 2,
        "model": "logreg",
        **extra,
    }


def _context(run_config: dict, node_config: dict, node: int) -> Context:
    return Context(
        run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _message(kind: str, node: int, num_features: int = 2, config: dict | None = None):
    msg = outgoing(ArrayRecord(build_model(num_features, "logreg").state_dict()), node, kind)
    msg.content["config"] = ConfigRecord(
        {"server-round": 2, "num-server-rounds": 2, **(config or {})}
    )
    return msg


def test_server_needs_no_file_in_per_bank_mode():
    settings = BankAppSettings.from_config(_run_config())
    assert settings.data.csv is not None and settings.data.csv.source == "per-bank"
    with pytest.raises(DataError, match="csv-source='per-bank'"):
        DataSource.from_config({"dataset": "csv"})  # a table needs csv-path, and says why
    with pytest.raises(DataError, match="nothing can be pooled"):
        load_all_banks(settings.data)  # the server of a deployment: no ceiling, a reason


def test_three_banks_three_files_every_row_used(bank_dir):
    """Deployment style: each SuperNode's node config points at its own file."""
    totals = []
    for i, rows in enumerate(ROWS):
        node_config = {"bank-index": i, "csv-path": str(bank_dir / f"bank-{i}.csv")}
        ctx = _context(_run_config(), node_config, node=100 + i)
        query = client_app(_message(MessageType.QUERY, 100 + i, config={"query": "x"}), ctx)
        train = client_app(_message(MessageType.TRAIN, 100 + i), ctx)
        assert not train.has_error(), train.error if train.has_error() else None
        ctx_eval = _context(_run_config(local_only_baseline=False), node_config, 100 + i)
        ev = client_app(_message(MessageType.EVALUATE, 100 + i), ctx_eval)
        n_train = int(train.content["metrics"]["num-examples"])
        n_test = int(ev.content["metrics"]["num-examples"])
        # validation rows (validation-fraction of the training rows): their sketch's counts
        metrics = ev.content["metrics"]
        n_val = int(sum(metrics["val-hist-neg"]) + sum(metrics["val-hist-pos"]))
        assert query.content["moments"]["num-examples"] == n_train
        assert list(query.content["features"]["names"]) == ["x1", "x2"]  # ID dropped
        assert n_val > 0
        assert n_train + n_val + n_test == rows  # all of the bank's rows, none re-split away
        assert train.content["client-info"]["bank"] == f"bank-{i}"
        totals.append(n_train + n_val + n_test)
    assert totals == list(ROWS)


def test_node_csv_path_wins_over_a_table_run_config(bank_dir, tmp_path):
    """The deploy script's node config csv-path is the bank's whole file even when the run
    config still says csv-source='table' (it used to re-split the file: 1/N of the rows)."""
    table = tmp_path / "table.csv"
    _bank_file(table, 50, seed=9)
    cfg = _run_config(**{"csv-source": "table", "csv-path": str(table), "csv-split": "iid"})
    ctx = _context(cfg, {"bank-index": 1, "csv-path": str(bank_dir / "bank-1.csv")}, 101)
    out = client_app(_message(MessageType.QUERY, 101, config={"query": "x"}), ctx)
    all_rows_but_the_test_quarter = ROWS[1] - int(np.ceil(ROWS[1] * 0.25))
    validation = round(0.15 * all_rows_but_the_test_quarter)  # validation-fraction default
    assert out.content["moments"]["num-examples"] == all_rows_but_the_test_quarter - validation


def test_simulation_emulates_per_bank_files_with_a_directory(bank_dir):
    source = DataSource.from_config(_run_config(**{"csv-dir": str(bank_dir)}))
    banks = load_all_banks(source)  # the server in simulation: the ceiling can pool them
    assert [b.name for b in banks] == ["bank-0", "bank-1", "bank-2"]
    assert [len(b.y_train) + len(b.y_val) + len(b.y_test) for b in banks] == list(ROWS)
    one = load_bank(source, 2)
    assert len(one.y_train) + len(one.y_val) + len(one.y_test) == ROWS[2]
    ctx = _context(_run_config(**{"csv-dir": str(bank_dir)}), {"partition-id": 1}, 101)
    ctx.node_config["num-partitions"] = 3
    out = client_app(_message(MessageType.QUERY, 101, config={"query": "x"}), ctx)
    assert out.content["client-info"]["bank"] == "bank-1"


def test_directory_files_in_natural_order_and_count_checked(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in (0, 1, 2, 10):
        _bank_file(folder / f"bank-{i}.csv", 30, seed=i)
    source = DataSource.from_config(_run_config(**{"csv-dir": str(folder), "num-banks": 4}))
    assert [b.name for b in load_all_banks(source)] == ["bank-0", "bank-1", "bank-2", "bank-10"]
    wrong = DataSource.from_config(_run_config(**{"csv-dir": str(folder), "num-banks": 3}))
    with pytest.raises(DataError, match=r"holds 4 \.csv file"):
        load_bank(wrong, 0)
    with pytest.raises(DataError, match="relative"):
        DataSource.from_config(_run_config(**{"csv-dir": "banks"}))


def test_a_bank_without_a_file_is_told_how_to_give_one():
    source = DataSource.from_config(_run_config())
    with pytest.raises(DataError, match="node config csv-path"):
        load_bank(source, 0)


def test_deploy_script_passes_per_bank_files(tmp_path, bank_dir):
    sys.path.insert(0, str(APP_DIR / "deploy"))
    try:
        import deploy
    finally:
        sys.path.remove(str(APP_DIR / "deploy"))
    from flower_ext.deploy import LocalDeployment

    dep = LocalDeployment(tmp_path / "work", tls=False, auth=False)
    settings = {"banks": 3, "csv_dir": str(bank_dir), "csv_schema": "/s/schema.toml"}
    deploy.settings_file(dep).write_text(__import__("json").dumps(settings))
    assert deploy.bank_node_config(dep, 2, settings)["csv-path"] == str(bank_dir / "bank-2.csv")
    command = deploy.run_command(dep, ["num-server-rounds=1"])
    text = command[command.index("--run-config") + 1]
    assert "dataset='csv'" in text or 'dataset="csv"' in text
    assert "per-bank" in text and "csv-schema=" in text and "num-server-rounds=1" in text
    # The argument parser knows the new option.
    with pytest.raises(SystemExit):
        deploy.main(["up", "--help"])
