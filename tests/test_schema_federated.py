"""The federated preprocessing on the bank app: server query, banks' answers, plan on every
message. Three banks, three raw files (written here), driven through the real ClientApp
handlers by an in-process grid (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import sent
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from bank_risk.client_app import app as client_app
from bank_risk.preprocessing_query import PlanGrid, with_preprocessing
from bank_risk.server_app import federated_standardisation
from bank_risk.settings import BankAppSettings
from flower_ext.audit import AuditTrail
from flower_ext.data import DataSource, load_all_banks
from flower_ext.model import build_model

SCHEMA = """
delimiter = ";"
[label]
column = "status"
positive = ["bad"]
negative = ["good"]
[columns]
id = ["customer"]
categorical = ["purpose"]
money = ["amount"]
log1p = ["amount"]
[categorical]
min-count = 2
"""
ROWS = (90, 150, 60)


def _bank_file(path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows)
    purposes = ["car", "home"] + (["boat"] if seed == 2 else [])  # 'boat' only at bank 2
    frame = pd.DataFrame(
        {
            "customer": [f"C{seed}-{i}" for i in range(rows)],
            "purpose": rng.choice(purposes, size=rows),
            "amount": [f"${v:,.2f}" for v in rng.lognormal(7, 1, size=rows)],
            "income": np.where(rng.random(rows) < 0.2 * (seed == 1), "", np.round(x * 10 + 50, 1)),
            "status": np.where(x + rng.normal(size=rows) > 0.6, "bad", "good"),
        }
    )
    frame.to_csv(path, sep=";", index=False)


@pytest.fixture
def federation(tmp_path):
    folder = tmp_path / "banks"
    folder.mkdir()
    for i, rows in enumerate(ROWS):
        _bank_file(folder / f"bank-{i}.csv", rows, seed=i)
    schema = tmp_path / "schema.toml"
    schema.write_text(SCHEMA)
    config = {
        "dataset": "csv",
        "csv-source": "per-bank",
        "csv-schema": str(schema),
        "num-banks": 3,
        "num-server-rounds": 1,
        "model": "logreg",
        "round-timeout": 5.0,
    }
    return folder, config


class BankGrid:
    """Delivers each message to the bank app of its node, as the runtime would."""

    def __init__(self, folder, config: dict) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"bank-index": i, "csv-path": str(folder / f"bank-{i}.csv")},
                state=RecordDict(),
                run_config=config,
            )
            for i in range(len(ROWS))
        }
        self.seen: list[Message] = []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in sent(messages):
            self.seen.append(msg)
            node = int(msg.metadata.dst_node_id)
            TaskIdentity.node_id = node
            try:
                replies.append(client_app(msg, self.contexts[node]))
            except Exception as err:  # what the runtime turns a raising ClientApp into
                replies.append(Message(Error(code=2, reason=str(err)), reply_to=msg))
        TaskIdentity.node_id = 1
        return replies


def test_federated_preprocessing_then_standardisation_then_training(federation, as_server):
    folder, config = federation
    settings = BankAppSettings.from_config(config)
    grid = BankGrid(folder, config)
    audit = AuditTrail()
    nodes = sorted(grid.contexts)
    sending = with_preprocessing(grid, nodes, settings, audit)
    assert isinstance(sending, PlanGrid)
    plan_event = next(e for e in audit.events if e["event"] == "preprocessing")
    assert plan_event["banks"] == 3
    features = plan_event["features"]
    # customer id dropped; 'boat' (only at one bank, 60 rows) is in the vocabulary by count;
    # income has gaps at bank 1 only, yet every bank gets the indicator column.
    assert "customer" not in " ".join(features)
    assert {"purpose=boat", "purpose=car", "purpose=<other>", "income:missing"} <= set(features)
    stats = federated_standardisation(sending, nodes, 5.0, audit)
    assert stats.features == features
    assert np.isfinite(stats.mean).all() and (stats.std > 0).all()
    # Every later message carries the plan; a bank trains on the agreed features.
    model = build_model(len(features), "logreg")
    msg = Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "config": ConfigRecord({"server-round": 1, "num-server-rounds": 1}),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=101,
    )
    (reply,) = sending.send_and_receive([msg], timeout=5.0)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    train_rows = ROWS[1] - int(np.ceil(ROWS[1] * 0.25))  # less the validation-fraction 0.15
    assert reply.content["metrics"]["num-examples"] == train_rows - round(0.15 * train_rows)
    assert all("preprocessing" in m.content["config"] for m in grid.seen[3:])
    # The server's own pooled copy (simulation: csv-dir) builds the same features.
    pooled = DataSource.from_config({**config, "csv-dir": str(folder)})
    assert list(load_all_banks(pooled)[0].feature_names) == features


def test_a_bank_with_a_bad_file_is_named_in_one_line(federation, as_server):
    folder, config = federation
    text = (folder / "bank-2.csv").read_text().splitlines()
    text[3] = text[3].rsplit(";", 1)[0] + ";unknown"
    (folder / "bank-2.csv").write_text("\n".join(text) + "\n")
    settings = BankAppSettings.from_config(config)
    grid = BankGrid(folder, config)
    audit = AuditTrail()
    with pytest.raises(RuntimeError) as caught:
        with_preprocessing(grid, sorted(grid.contexts), settings, audit)
    message = str(caught.value)
    assert "2 of 3 banks" in message and "bank-2.csv', column 'status', row 4" in message
    assert "\n" not in message
    failed = [e for e in audit.events if e["event"] == "prep_stats_failed"]
    assert [e["node_id"] for e in failed] == [102]


def test_without_a_schema_nothing_changes(as_server):
    settings = BankAppSettings.from_config({"num-banks": 2})
    grid = object()
    assert with_preprocessing(grid, [1, 2], settings, AuditTrail()) is grid
