"""The bank side: each SuperNode is one bank training on its own customers.

Which bank a node is comes from its node config: ``bank-index`` in a deployment
(``flower-supernode --node-config "bank-index=2"``), or the simulation's
``partition-id``. A node config ``csv-path`` points a deployed bank at its own
file. Nothing but model weights and aggregate statistics leaves the bank.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from logging import ERROR, INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from flower_ext.data import BankData, DataError, DataSource, load_bank
from flower_ext.data.banks import bank_preprocessing_stats, raw_bank
from flower_ext.metrics import (
    HIST_EDGES_KEY,
    MIN_ROWS_PER_BIN,
    RiskMetrics,
    risk_metrics_from_logits,
    score_sketch,
    sketch_rows_per_bin,
)
from flower_ext.model import CreditRiskModel, build_model, feature_moments
from flower_ext.mods.attack import training_labels
from flower_ext.privacy import (
    DPSGDConfig,
    PrivacyBudgetExhausted,
    PrivacyPolicyViolation,
    bank_privacy,
    budget_refusal,
    ledger_file_for,
    policy_refusal,
    train_local_private,
)
from flower_ext.scaffold import (
    CONTROL_DELTA_KEY,
    CONTROL_KEY,
    ScaffoldError,
    effective_steps,
    scaffold_refusal,
    scaffold_train,
    server_control,
)
from flower_ext.strategies.fednova import LOCAL_STEPS_KEY, REPORT_STEPS_KEY
from flower_ext.training import evaluate_model, train_local, train_local_steps
from flower_ext.validation import CLIENT_INFO_KEY
from flower_ext.verdict import bank_summary

from .client_mods import BANK_MODS
from .settings import BankAppSettings, secagg_dp_enabled

app = ClientApp(mods=BANK_MODS)

#: Error code of a bank's reply when its own data cannot be read (reason: one line).
DATA_ERROR_CODE = 4200


def _which_bank(context: Context) -> str:
    node = context.node_config
    for key in ("bank-index", "partition-id"):
        if key in node:
            return f"bank {node[key]}"
    return f"node {context.node_id}"


def one_line_data_errors(
    handler: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """A bank whose data cannot be read answers with one line (error ``DATA_ERROR_CODE``:
    which bank, the file, column and row the ``DataError`` names) instead of raising: the
    server audits it and names the bank, and no ClientApp traceback floods the console."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except DataError as err:
            reason = f"data error at {_which_bank(context)}: " + " ".join(str(err).split())
            log(ERROR, "[bank-risk] %s", reason)
            return Message(Error(code=DATA_ERROR_CODE, reason=reason), reply_to=msg)

    return wrapped


@lru_cache(maxsize=8)
def _cached_bank(source: DataSource, index: int, preprocessing: str = "") -> BankData:
    return load_bank(source, index, json.loads(preprocessing) if preprocessing else None)


#: Where a bank keeps the federation's preprocessing plan (csv-schema runs) between messages.
PREPROCESSING_STATE_KEY = "preprocessing"


def _preprocessing(msg: Message | None, context: Context) -> str:
    """The federation's preprocessing plan (JSON text): from the server's message, else the
    copy kept in ``context.state`` from an earlier one; empty when there is none."""
    config = msg.content.config_records.get("config") if msg is not None else None
    text = str(config.get("preprocessing", "")) if config is not None else ""
    if text:
        context.state[PREPROCESSING_STATE_KEY] = ConfigRecord({"json": text})
        return text
    kept = context.state.config_records.get(PREPROCESSING_STATE_KEY)
    return str(kept["json"]) if kept is not None else ""


def bank_index(context: Context, settings: BankAppSettings) -> int:
    node = context.node_config
    if "bank-index" in node:
        return int(node["bank-index"])  # type: ignore[arg-type]
    if "partition-id" in node:
        partitions = int(node.get("num-partitions", settings.data.num_banks))  # type: ignore[arg-type]
        if partitions != settings.data.num_banks:
            raise DataError(
                f"the simulation has {partitions} SuperNodes but the run config says "
                f"num-banks={settings.data.num_banks}; run with "
                f'--federation-config "num-supernodes={settings.data.num_banks}"'
            )
        return int(node["partition-id"])  # type: ignore[arg-type]
    raise DataError("node config has neither 'bank-index' nor 'partition-id'")


def context_source(context: Context) -> tuple[BankAppSettings, DataSource]:
    """The run's settings and this bank's data source: a node config ``csv-path`` is the
    bank's own file, all of its rows (``csv-source = "per-bank"``); a node config
    ``csv-schema`` is its own copy of the schema."""
    settings = BankAppSettings.from_config(context.run_config)
    source = settings.data
    node = context.node_config
    if "csv-path" in node:  # a deployed bank reads its own file
        if source.csv is None:
            raise DataError("node config sets csv-path but the run config's dataset is not 'csv'")
        path = str(node["csv-path"])
        source = replace(source, csv=replace(source.csv, path=path, source="per-bank"))
    if "csv-schema" in node and source.csv is not None:
        source = replace(source, csv=replace(source.csv, schema_path=str(node["csv-schema"])))
    return settings, source


def load_context_bank(
    context: Context, msg: Message | None = None
) -> tuple[BankAppSettings, BankData]:
    settings, source = context_source(context)
    index = bank_index(context, settings)
    return settings, _cached_bank(source, index, _preprocessing(msg, context))


def _model_for(bank: BankData, settings: BankAppSettings, arrays: ArrayRecord) -> CreditRiskModel:
    model = build_model(bank.num_features, settings.model, settings.hidden_units)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _info(bank: BankData, **extra: object) -> ConfigRecord:
    return ConfigRecord({"bank": bank.name, **extra})  # type: ignore[dict-item]


def preprocessing_stats_reply(msg: Message, context: Context) -> Message:
    """A csv-schema run's first query: what the federated preprocessing needs from this
    bank (README privacy section: per-column counts, sums, quantiles, category counts)."""
    settings, source = context_source(context)
    index = bank_index(context, settings)
    stats = bank_preprocessing_stats(source, index)
    name = raw_bank(source, index)[0]
    content = RecordDict(
        {
            "preprocessing-stats": ConfigRecord({"json": json.dumps(stats)}),
            CLIENT_INFO_KEY: ConfigRecord({"bank": name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query()
@one_line_data_errors
def query(msg: Message, context: Context) -> Message:
    """Per-feature count, sum and sum of squares of the training rows (for standardisation);
    in a csv-schema run first the preprocessing statistics (``query = preprocessing-stats``)."""
    config = msg.content.config_records.get("config")
    if config is not None and config.get("query") == "preprocessing-stats":
        return preprocessing_stats_reply(msg, context)
    if config is not None and config.get("query") == "personalise":  # after the last round
        from .personalisation import personalise_reply  # late: it imports this module

        return personalise_reply(msg, context)
    _, bank = load_context_bank(context, msg)
    count, total, total_sq = feature_moments(bank.x_train)
    content = RecordDict(
        {
            "moments": MetricRecord(
                {
                    "num-examples": count,
                    "sum": total.tolist(),
                    "sum-sq": total_sq.tolist(),
                }
            ),
            "features": ConfigRecord({"names": list(bank.feature_names)}),
            CLIENT_INFO_KEY: _info(bank),
        }
    )
    return Message(content=content, reply_to=msg)


def round_learning_rate_of(
    config: ConfigRecord, settings: BankAppSettings, server_round: int
) -> float:
    """The round's learning rate as the server sent it (``learning-rate``, its ``lr-schedule``);
    a missing or unusable value falls back to the bank's own computation of the schedule."""
    try:
        value = float(config.get("learning-rate", float("nan")))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if np.isfinite(value) and 0.0 < value <= 10.0 * settings.learning_rate:
        return value
    return settings.round_learning_rate(server_round)


@app.train()
@one_line_data_errors
def train(msg: Message, context: Context) -> Message:
    settings, bank = load_context_bank(context, msg)
    config = msg.content["config"]
    arrays = next(a for k, a in msg.content.array_records.items() if k != CONTROL_KEY)
    model = _model_for(bank, settings, arrays)
    server_round = int(config.get("server-round", 0))
    train_cfg = settings.train_config(
        seed=settings.seed * 1000 + server_round,
        proximal_mu=float(config.get("proximal-mu", settings.proximal_mu)),
        learning_rate=round_learning_rate_of(config, settings, server_round),
    )
    # The labels as they are, unless the attack mod flips them (test federations only).
    labels = training_labels(bank.y_train, context)
    try:  # the bank's own DP policy (node config dp-required, ...) wins over the run config
        privacy = bank_privacy(context, settings.privacy())
    except PrivacyPolicyViolation as err:
        return policy_refusal(msg, str(err))
    control = server_control(msg.content)  # SCAFFOLD (run config scaffold): the server's c
    control_delta: ArrayRecord | None = None
    if control is not None and privacy is not None:
        reason = "SCAFFOLD refused: this bank trains under DP; its control delta is not protected"
        return policy_refusal(msg, reason)
    dp_metrics: dict[str, float | int] = {}
    steps = 0  # optimizer steps taken (FedNova asks for them; DP runs do not report them)
    if isinstance(privacy, DPSGDConfig):  # sample-level DP-SGD, charged to the bank's ledger
        try:
            loss, spent = train_local_private(
                model,
                bank.x_train,
                labels,
                train_cfg,
                privacy,
                context.state,
                ledger_file=ledger_file_for(context),  # reserved on disk before any step
                note={"run-id": int(context.run_id), "round": server_round, "bank": bank.name},
            )
        except PrivacyBudgetExhausted as err:  # no training, no spending: the server audits it
            return budget_refusal(msg, err)
        dp_metrics = spent.as_metrics()
    elif control is not None:  # corrected local steps; the bank's c_i stays in context.state
        train_cfg = replace(train_cfg, epochs=settings.local_epochs_for(len(labels)))
        try:
            loss, control_delta, steps = scaffold_train(
                model, bank.x_train, labels, train_cfg, control, context.state
            )
        except ScaffoldError as err:
            return scaffold_refusal(msg, str(err))
    else:  # a small bank runs more epochs, to min-local-steps (not under DP-SGD: above)
        train_cfg = replace(train_cfg, epochs=settings.local_epochs_for(len(labels)))
        loss, steps = train_local_steps(model, bank.x_train, labels, train_cfg)
    step_metrics: dict[str, float] = {}
    if config.get(REPORT_STEPS_KEY) and privacy is None:  # FedNova's normalising factor a_i
        step_metrics[LOCAL_STEPS_KEY] = effective_steps(steps, train_cfg.momentum)
    # Under DP the training loss is a statistic of the protected rows outside the
    # guarantee: it is not sent. The row count is declared public (README).
    dp_on = privacy is not None or secagg_dp_enabled(context.run_config)
    loss_metric = {} if dp_on else {"train-loss": loss}
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"num-examples": len(bank.y_train), **loss_metric, **dp_metrics, **step_metrics}
            ),
            CLIENT_INFO_KEY: _info(bank),
        }
    )
    if control_delta is not None:  # SCAFFOLD: delta c_i, next to the model
        content[CONTROL_DELTA_KEY] = control_delta
    return Message(content=content, reply_to=msg)


def _metric_entries(prefix: str, metrics: RiskMetrics) -> dict[str, float]:
    out = {f"{prefix}logloss": metrics.log_loss, f"{prefix}accuracy": metrics.accuracy}
    if np.isfinite(metrics.brier):  # weighted by num-examples these pool exactly
        out[f"{prefix}brier"] = metrics.brier
        out[f"{prefix}predicted-rate"] = metrics.predicted_rate
    if metrics.auc is not None:
        out[f"{prefix}auc"] = metrics.auc
        out[f"{prefix}ks"] = metrics.ks
    return out


def local_only_metrics(bank: BankData, settings: BankAppSettings) -> tuple[RiskMetrics, np.ndarray]:
    """Train a bank-only model for as many epochs as the federation ran, on the same split.

    Returns its metrics and its log-odds on the bank's test rows (for the paired comparison).
    """
    model = build_model(
        bank.num_features, settings.model, settings.hidden_units, seed=settings.seed
    )
    mean = bank.x_train.mean(axis=0)
    std = bank.x_train.std(axis=0)
    std[std < 1e-8] = 1.0
    model.set_standardisation(mean, std)  # the bank's own statistics: it has no others
    cfg = replace(
        settings.train_config(seed=settings.seed, proximal_mu=0.0),
        epochs=settings.num_rounds * settings.local_epochs,
    )
    started = time.perf_counter()
    log(INFO, "[bank-risk] %s: training the local-only baseline (%d epochs)", bank.name, cfg.epochs)
    if settings.lr_schedule == "constant":
        train_local(model, bank.x_train, bank.y_train, cfg)
    else:  # the federation's schedule, round by round, so the comparison stays like for like
        for rnd in range(1, settings.num_rounds + 1):
            step = settings.train_config(
                seed=settings.seed * 1000 + rnd,
                proximal_mu=0.0,
                learning_rate=settings.round_learning_rate(rnd),
            )
            train_local(model, bank.x_train, bank.y_train, step)
    _, logits = evaluate_model(model, bank.x_test, bank.y_test)
    log(
        INFO,
        "[bank-risk] %s: local-only baseline trained in %.1fs",
        bank.name,
        time.perf_counter() - started,
    )
    return risk_metrics_from_logits(bank.y_test, logits), logits


#: Keys of a bank's validation sketch in its evaluate reply (pooled by the strategy).
VAL_HIST_KEYS = ("val-hist-edges", "val-hist-neg", "val-hist-pos")


def validation_sketch(
    model: CreditRiskModel, bank: BankData, rows_per_bin: int = MIN_ROWS_PER_BIN
) -> dict[str, object]:
    """The score sketch of the bank's validation rows (best-round selection); empty when it
    has none. Same sketch as the test rows' (``flower_ext.metrics.score_sketch``)."""
    if len(bank.y_val) == 0:
        return {}
    _, logits = evaluate_model(model, bank.x_val, bank.y_val)
    edges, neg, pos = score_sketch(bank.y_val, logits, rows_per_bin=rows_per_bin)
    return dict(zip(VAL_HIST_KEYS, (edges.tolist(), neg.tolist(), pos.tolist()), strict=True))


@app.evaluate()
@one_line_data_errors
def evaluate(msg: Message, context: Context) -> Message:
    settings, bank = load_context_bank(context, msg)
    config = msg.content["config"]
    arrays = next(iter(msg.content.array_records.values()))
    model = _model_for(bank, settings, arrays)
    _, logits = evaluate_model(model, bank.x_test, bank.y_test)
    metrics = risk_metrics_from_logits(bank.y_test, logits)  # exact AUC even if diverged
    # for the pooled AUC/KS, at the resolution the run asks and the bank's floor allows
    rows_per_bin = sketch_rows_per_bin(
        context.run_config.get("sketch-rows-per-bin"),
        context.node_config.get("sketch-min-rows-per-bin"),
    )
    edges, neg, pos = score_sketch(bank.y_test, logits, rows_per_bin=rows_per_bin)
    values: dict[str, object] = {
        "num-examples": len(bank.y_test),
        "default-rate": float(np.mean(bank.y_test)),
        HIST_EDGES_KEY: edges.tolist(),
        "hist-neg": neg.tolist(),
        "hist-pos": pos.tolist(),
        **_metric_entries("", metrics),
        **validation_sketch(model, bank, rows_per_bin),
    }
    notes: dict[str, object] = {}
    if metrics.undefined_reason:
        notes["auc-undefined-reason"] = metrics.undefined_reason
    if metrics.health:
        notes["score-health"] = metrics.health
    is_final = int(config.get("server-round", 0)) >= int(config.get("num-server-rounds", 10**9))
    local_logits = None
    if is_final and settings.local_only_baseline:
        if settings.privacy() is None and not secagg_dp_enabled(context.run_config):
            local, local_logits = local_only_metrics(bank, settings)
            values.update(_metric_entries("local-only-", local))
        else:  # it would be a non-private model of the protected rows: never sent under DP
            notes["local-only-skipped"] = "dp is on: a non-private local model is not shared"
    if is_final:  # intervals, verdict and calibration, computed here; only summaries leave
        notes.update(bank_summary(bank.y_test, logits, local_logits))
    content = RecordDict(
        {
            "metrics": MetricRecord(values),  # type: ignore[arg-type]
            CLIENT_INFO_KEY: _info(bank, **notes),
        }
    )
    return Message(content=content, reply_to=msg)
