"""A plain Flower FedAvg app on the bank model and data: the baseline for bench_app_overhead.

What a Flower user writes without flower-ext: ``flwr.serverapp.strategy.FedAvg``,
a ClientApp that trains and evaluates, nothing else (no validation, audit,
byte metering, pooled metrics, federated standardisation or baselines). Each
bank standardises with its own statistics, kept in the model's buffers.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bank_risk.client_app import load_context_bank
from flower_ext.data import FEATURES
from flower_ext.model import build_model
from flower_ext.training import evaluate_model, train_local

server_app = ServerApp()
client_app = ClientApp()


def _local_model(context: Context, arrays: ArrayRecord | None):  # type: ignore[no-untyped-def]
    settings, bank = load_context_bank(context)
    model = build_model(bank.num_features, settings.model, settings.hidden_units)
    if arrays is not None:
        model.load_state_dict(arrays.to_torch_state_dict())
    std = bank.x_train.std(axis=0)
    std[std < 1e-8] = 1.0
    model.set_standardisation(bank.x_train.mean(axis=0), std)
    return settings, bank, model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    settings, bank, model = _local_model(context, msg.content["arrays"])
    round_ = int(msg.content["config"]["server-round"])
    loss = train_local(
        model, bank.x_train, bank.y_train, settings.train_config(settings.seed * 1000 + round_, 0.0)
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(bank.y_train), "train-loss": loss}),
        }
    )
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, bank, model = _local_model(context, msg.content["arrays"])
    metrics, _ = evaluate_model(model, bank.x_test, bank.y_test)
    values = {"num-examples": len(bank.y_test), "logloss": metrics.log_loss}
    if metrics.auc is not None:
        values["auc"] = metrics.auc
    content = RecordDict({"metrics": MetricRecord(values)})
    return Message(content=content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_banks = int(cfg["num-banks"])
    num_features = len(FEATURES)  # synthetic banks
    model = build_model(num_features, str(cfg["model"]), str(cfg["hidden-units"]))
    strategy = FedAvg(
        min_train_nodes=num_banks, min_evaluate_nodes=num_banks, min_available_nodes=num_banks
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
