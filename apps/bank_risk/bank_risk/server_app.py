"""The federation server: standardise, train, evaluate, and write it all down.

A run goes:

1. wait until every bank's SuperNode is connected;
2. ask each bank for per-feature moments and build one standardisation for all
   (no customer row leaves a bank);
3. run the strategy for ``num-server-rounds`` rounds (train, then evaluate on
   every bank's held-out split); after each round a line of progress and a new
   ``metrics.json``;
4. the last evaluation also has each bank train a local-only model, which
   answers "is federation worth it for this bank?";
5. where the data is reachable from the server (simulation), a centralized
   model on the pooled data gives the ceiling.

After every round the server writes ``checkpoint.npz`` (global model, round,
strategy state). A run started with ``resume-from=<run dir>`` continues that
directory: same ``audit.jsonl`` chain (``run_resumed``, and ``round_abandoned``
for a round the stopped server had begun but not checkpointed), same
``metrics.json``, rounds r+1..N from the checkpointed model of round r, no
standardisation query (the model carries it). With ``min-banks`` below
``num-banks`` a round goes on without banks that dropped out.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flower_ext.aggregation.moments import robust_feature_moments
from flower_ext.audit import AuditTrail, record_exchange, server_signer, short_reason
from flower_ext.audit.signing import SERVER_KEY_ENV
from flower_ext.data import DataError, load_all_banks
from flower_ext.grid import MeteredGrid
from flower_ext.model import build_model, count_parameters
from flower_ext.privacy import round_privacy
from flower_ext.records import arrays_sha256
from flower_ext.report import build_report
from flower_ext.runlog import (
    BEST_MODEL_FILE,
    Checkpoint,
    MetricsFile,
    load_checkpoint,
    resolve_run_dir,
    save_checkpoint,
)
from flower_ext.strategies import UpdateAggregationStrategy
from flower_ext.training import evaluate_model, train_local
from flower_ext.validation import client_label

from .bank_query import first_replies, query_banks
from .encryption import he_enabled, prepare_keys
from .personalisation import personalisation_lines, personalise_banks
from .preprocessing_query import with_preprocessing
from .settings import BankAppSettings, SettingsError
from .strategy_factory import build_strategy, check_run_config
from .strategy_wrappers import wrap_strategy
from .verdicts import (
    app_config_defaults,
    best_round_summary,
    ceiling_gap_warning,
    per_bank_row,
    train_ceiling,
    verdict_counts,
    verdict_lines,
    verdict_summary,
)

app = ServerApp()


#: Seconds the simulated SuperNodes' count must stay the same before it is final.
SIMULATION_SETTLE_SECONDS = 2.0


def is_simulation(grid: Grid) -> bool:
    """Whether the ServerApp runs in Flower's simulation (its in-memory Grid)."""
    return (
        type(grid).__name__ == "InMemoryGrid"
        or type(getattr(grid, "grid", None)).__name__ == "InMemoryGrid"
    )


def app_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A strategy's evaluate metrics in the app's terms: ``auc``/``ks`` are the pooled
    figures (the banks send score histograms, the strategy pools them)."""
    out = {  # the sketches themselves (test and validation rows) are not figures
        k: v for k, v in metrics.items() if not str(k).startswith(("hist-", "val-hist-"))
    }
    for pooled, key in (
        ("pooled-auc", "auc"),
        ("pooled-ks", "ks"),
        ("pooled-val-auc", "validation_auc"),
        ("pooled-val-ks", "validation_ks"),
    ):
        if pooled in out:
            out[key] = out.pop(pooled)
    if out.get("auc") is not None:
        out["gini"] = 2 * out["auc"] - 1
    return out


def wait_for_banks(
    grid: Grid,
    num_banks: int,
    timeout: float,
    minimum: int | None = None,
    simulation: bool = False,
) -> list[int]:
    """Node ids once ``num_banks`` nodes are connected.

    After ``timeout`` the run starts anyway if ``minimum`` (``min-banks``) are there;
    otherwise a clear error. In simulation every SuperNode registers at once, so a
    count that differs from ``num-banks`` fails within seconds, not after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last_count, stable_since = -1, time.monotonic()
    while True:
        nodes = list(grid.get_node_ids())
        if simulation and nodes:
            if len(nodes) != last_count:
                last_count, stable_since = len(nodes), time.monotonic()
            elif (
                len(nodes) != num_banks
                and time.monotonic() - stable_since >= SIMULATION_SETTLE_SECONDS
            ):
                raise SettingsError(
                    f"the simulation has {len(nodes)} SuperNode(s) but the run config says "
                    f"num-banks={num_banks}: run with --federation-config "
                    f'"num-supernodes={num_banks}" (one SuperNode per bank), or set '
                    f"--run-config num-banks={len(nodes)}"
                )
        if len(nodes) >= num_banks and not (simulation and len(nodes) != num_banks):
            return nodes
        if time.monotonic() > deadline:
            if minimum is not None and len(nodes) >= minimum:
                log(
                    WARNING,
                    "[bank-risk] %d of %d banks connected after %.0fs; starting with them "
                    "(min-banks=%d)",
                    len(nodes),
                    num_banks,
                    timeout,
                    minimum,
                )
                return nodes
            raise RuntimeError(
                f"only {len(nodes)} SuperNode(s) connected after {timeout:.0f}s but the run "
                f"config says num-banks={num_banks}. In simulation run with "
                f'--federation-config "num-supernodes={num_banks}"; in a deployment start '
                "one SuperNode per bank."
            )
        time.sleep(1.0)


#: Longest bank label the server keeps (labels are self-reported and written everywhere).
MAX_LABEL_CHARS = 100


@dataclass
class Standardisation:
    """What the feature-statistics query gave: the global scaling and who the banks are."""

    mean: np.ndarray
    std: np.ndarray
    features: list[str]
    #: node id -> bank label, from every bank that answered (also rejected answers).
    labels: dict[int, str]
    #: node id -> the row count the bank may weigh with in training (its reported count,
    #: capped relative to the federation): the strategy pins train weights to it.
    counts: dict[int, float] = field(default_factory=dict)


def _moments_of(reply: Message, names: list[str] | None) -> tuple[list[str], tuple]:
    """Checked ``(feature names, (count, sum, sum of squares))`` of one bank's answer.

    Raises ``ValueError`` with the reason when the answer cannot be used (a bank may
    send anything; DESIGN.md's threat model).
    """
    try:
        moments = reply.content["moments"]
        bank_names = [str(n) for n in reply.content["features"]["names"]]  # type: ignore[union-attr]
        count = moments["num-examples"]
        total = np.asarray(moments["sum"], dtype=np.float64)
        total_sq = np.asarray(moments["sum-sq"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed feature statistics ({type(err).__name__}: {err})") from None
    if names is not None and bank_names != names:
        raise ValueError("different feature columns")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num-examples must be a positive integer, got {count!r}")
    if total.shape != (len(bank_names),) or total_sq.shape != (len(bank_names),):
        raise ValueError(f"sum/sum-sq must hold one value per feature ({len(bank_names)})")
    if not (np.isfinite(total).all() and np.isfinite(total_sq).all()):
        raise ValueError("sum/sum-sq contain NaN or Inf")
    return bank_names, (int(count), total, total_sq)


def federated_standardisation(
    grid: Grid,
    nodes: list[int],
    timeout: float,
    audit: AuditTrail,
    required: int | None = None,
) -> Standardisation:
    """Global feature mean/std from the banks' moments (a QUERY round).

    Every bank that does not answer usefully is audited on its own line:
    ``stats_missing`` (no reply within ``timeout``), ``stats_failed`` (an error
    reply, with its reason) or ``stats_rejected`` (an unusable answer). The run
    goes on when at least ``required`` banks (``min-banks``; default: all of
    ``nodes``) answered, and otherwise stops with an error naming the banks
    that did not.
    """
    required = len(nodes) if required is None else required
    replies, origins = query_banks(grid, nodes, "feature-moments", audit, timeout)
    parts, names, part_nodes = [], None, []
    labels: dict[int, str] = {}
    problems: dict[int, str] = {}  # node -> why it is not in the standardisation
    answered: set[int] = set()
    for node, reply in first_replies(replies, origins):
        answered.add(node)
        label = short_reason(client_label(reply), MAX_LABEL_CHARS)
        if label:
            labels[node] = label
        if reply.has_error():
            reason = f"error reply {reply.error.code}: {reply.error.reason}"
            problems[node] = audit.record("stats_failed", node_id=node, label=label, reason=reason)[
                "reason"
            ]
            where = f"node {node}" + (f" ({label})" if label else "")
            log(ERROR, "[bank-risk] %s: %s", where, short_reason(problems[node], 300))
            continue
        try:
            bank_names, part = _moments_of(reply, names)
        except ValueError as err:
            problems[node] = audit.record(
                "stats_rejected", node_id=node, label=label, reason=str(err)
            )["reason"]
            continue
        names = names if names is not None else bank_names
        parts.append(part)
        part_nodes.append(node)
    for node in nodes:
        if node not in answered:
            problems[node] = audit.record(
                "stats_missing",
                node_id=node,
                label="",
                reason=f"no reply to the feature-statistics query within {timeout:g}s",
            )["reason"]
    if len(parts) < max(required, 1) or names is None:
        missing = "; ".join(
            f"node {n}{f' ({labels[n]})' if n in labels else ''}: {short_reason(why, 300)}"
            for n, why in sorted(problems.items())
        )
        raise RuntimeError(
            f"only {len(parts)} of {len(nodes)} banks answered the feature-statistics query "
            f"usefully, {max(required, 1)} needed (min-banks); not usable: {missing}. "
            "A short round-timeout or a slow first start of the banks can cause this; "
            "see audit.jsonl"
        )
    mean, std, counts, left_out, replaced = combine_standardisation(
        parts, part_nodes, names, labels, audit
    )
    audit.record(
        "standardisation",
        banks=len(parts) - len(left_out),
        outliers=sorted(set(left_out) | set(replaced)),
        left_out=left_out,
        replaced=replaced,
        features=names,
        labels={str(n): lbl for n, lbl in labels.items()},
        missing=sorted(problems),
    )
    return Standardisation(mean, std, names, labels, counts)


def combine_standardisation(
    parts: list[tuple],
    nodes: list[int],
    names: list[str],
    labels: dict[int, str],
    audit: AuditTrail,
) -> tuple[np.ndarray, np.ndarray, dict[int, float], list[int], list[int]]:
    """Robust combine of the banks' moments (``flower_ext.aggregation.moments``).

    A bank whose moments break a bound is left out of the standardisation and
    audited (``stats_rejected``); a bank's outlying statistics (one feature's mean
    or std) are replaced by the median over banks and audited (``stats_replaced``),
    its other statistics used; a row count above 3x the median is capped
    (``stats_count_capped``). Returns mean, std, the per-node counts training
    weights are pinned to, the nodes left out and the nodes with replaced statistics.
    """
    try:
        result = robust_feature_moments(parts, names=names)
    except ValueError as err:
        raise RuntimeError(f"the banks' feature statistics cannot be combined: {err}") from None
    for event, found in (("stats_rejected", result.rejected), ("stats_replaced", result.replaced)):
        for i, reason in sorted(found.items()):
            node = nodes[i]
            audit.record(event, node_id=node, label=labels.get(node, ""), reason=reason)
            log(WARNING, "[bank-risk] standardisation: node %s: %s", node, reason)
    for i, reason in sorted(result.capped.items()):
        node = nodes[i]
        audit.record("stats_count_capped", node_id=node, label=labels.get(node, ""), reason=reason)
    counts = {node: float(result.counts[i]) for i, node in enumerate(nodes)}
    left_out = sorted(nodes[i] for i in result.rejected)
    return result.mean, result.std, counts, left_out, sorted(nodes[i] for i in result.replaced)


def centralized_ceiling(
    settings: BankAppSettings, final_arrays: ArrayRecord | None = None
) -> dict[str, Any]:
    """The ceiling: one model on all banks' pooled rows, trained to convergence with early
    stopping on a validation split (simulation only; ``bank_risk.verdicts``)."""
    return train_ceiling(settings, final_arrays)


def same_budget_centralized(settings: BankAppSettings, epochs: int) -> tuple[float | None, str]:
    """AUC of one model on the pooled rows with the federation's SGD budget (not a ceiling)."""
    try:
        banks = load_all_banks(settings.data)
    except (DataError, OSError) as err:
        return None, f"pooled data not reachable from the server: {err}"
    x_tr = np.concatenate([b.x_train for b in banks])
    y_tr = np.concatenate([b.y_train for b in banks])
    x_te = np.concatenate([b.x_test for b in banks])
    y_te = np.concatenate([b.y_test for b in banks])
    model = build_model(x_tr.shape[1], settings.model, settings.hidden_units, seed=settings.seed)
    std = x_tr.std(axis=0)
    std[std < 1e-8] = 1.0
    model.set_standardisation(x_tr.mean(axis=0), std)
    cfg = settings.train_config(seed=settings.seed, proximal_mu=0.0)
    from dataclasses import replace

    train_local(model, x_tr, y_tr, replace(cfg, epochs=epochs))
    metrics, _ = evaluate_model(model, x_te, y_te)
    return metrics.auc, metrics.undefined_reason


class RoundRecorder:
    """Called by ``Strategy.start`` after each round (its ``evaluate_fn`` hook)."""

    def __init__(
        self,
        settings: BankAppSettings,
        strategy: UpdateAggregationStrategy,
        grid: MeteredGrid,
        metrics: MetricsFile,
        audit: AuditTrail,
        run_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.strategy = strategy
        self.grid = grid
        self.metrics = metrics
        self.audit = audit
        self.run_dir = run_dir  # where checkpoint.npz goes; None: no checkpoints
        self.last = time.perf_counter()
        self.privacy_by_bank: dict[str, dict[str, Any]] = {}  # latest DP figures per bank
        #: The round with the best pooled validation AUC so far (``best_round`` in metrics).
        self.best: dict[str, Any] = {}

    def checkpoint(self, server_round: int, arrays: ArrayRecord, model_sha256: str) -> None:
        """``checkpoint.npz`` after the round: model, round, strategy state, DP figures."""
        if self.run_dir is None:
            return
        state_arrays, state_fields = self.strategy.export_state()
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                server_round,
                arrays,
                model_sha256,
                state_arrays,
                {
                    "num_rounds": self.settings.num_rounds,
                    "strategy": state_fields,
                    "privacy_by_bank": self.privacy_by_bank,
                    "best": self.best,
                },
            ),
        )

    def restore(self, checkpoint: Checkpoint) -> None:
        """Take over a checkpoint's strategy state (before the first resumed round)."""
        self.strategy.import_state(checkpoint.state_arrays, checkpoint.meta.get("strategy", {}))
        self.privacy_by_bank.update(checkpoint.meta.get("privacy_by_bank", {}))
        self.best.update(checkpoint.meta.get("best", {}))

    def track_best(
        self, server_round: int, arrays: ArrayRecord, eval_metrics: Mapping[str, Any], sha: str
    ) -> None:
        """Keep the round with the best pooled validation AUC (never the test AUC) and its
        model (``best_model.npz``); ties keep the earlier round."""
        val = eval_metrics.get("validation_auc")
        if val is None or not np.isfinite(val):
            return
        if self.best and float(val) <= float(self.best["validation_auc"]):
            return
        self.best = {
            "round": server_round,
            "validation_auc": float(val),
            "auc": eval_metrics.get("auc"),
            "ks": eval_metrics.get("ks"),
            "model_sha256": sha,
        }
        if self.run_dir is not None:
            save_checkpoint(
                self.run_dir,
                Checkpoint(server_round, arrays, sha, {}, {"best": self.best}),
                filename=BEST_MODEL_FILE,
            )
            self.best["file"] = BEST_MODEL_FILE

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        bytes_up = int(sum(self.grid.bytes_up.values()))
        bytes_down = int(sum(self.grid.bytes_down.values()))
        traffic = {"up": dict(self.grid.bytes_up), "down": dict(self.grid.bytes_down)}
        self.grid.reset()
        if server_round == 0:
            self.metrics.update(
                setup={"seconds": seconds, "bytes_up": bytes_up, "bytes_down": bytes_down}
            )
            return None
        report = self.strategy.round_reports.get(server_round)
        evaluation = self.strategy.evaluation_reports.get(server_round, {})
        eval_metrics = app_metrics(evaluation.get("metrics", {}))
        entry: dict[str, Any] = {
            "round": server_round,
            "evaluate": eval_metrics,
            "train": dict(report.train_metrics) if report else {},
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "bytes_by_type": traffic,
            "seconds": seconds,
            "clients": {
                "sampled": len(report.sampled) if report else 0,
                "accepted": len(report.accepted) if report else 0,
                "rejected": {str(k): v for k, v in report.rejected.items()} if report else {},
                "missing": report.missing if report else [],
            },
            "model_sha256": arrays_sha256(arrays),
            "learning_rate": self.settings.round_learning_rate(server_round),
        }
        privacy = (
            round_privacy(report.client_metrics, report.rejected, self.strategy.labels)
            if report
            else {}
        )
        if privacy:  # per bank: epsilon spent so far, delta, noise, clip, sample rate
            entry["privacy"] = privacy
            self.audit.record("privacy", round=server_round, banks=privacy)
            for bank, row in privacy.items():
                self.privacy_by_bank.setdefault(bank, {}).update(row)
        self.metrics.add_round(entry)
        self.audit.record(
            "round_end",
            round=server_round,
            seconds=seconds,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            model_sha256=entry["model_sha256"],
            evaluate=eval_metrics,
        )
        self.track_best(server_round, arrays, eval_metrics, entry["model_sha256"])
        self.checkpoint(server_round, arrays, entry["model_sha256"])
        auc, ks = eval_metrics.get("auc"), eval_metrics.get("ks")
        val = eval_metrics.get("validation_auc")
        log(
            INFO,
            "[bank-risk] round %d/%d  AUC %s  KS %s  validation AUC %s  %.1fs  up %.1f kB  "
            "down %.1f kB  clients %d ok, %d rejected, %d missing",
            server_round,
            self.settings.num_rounds,
            f"{auc:.4f}" if auc is not None else "n/a",
            f"{ks:.4f}" if ks is not None else "n/a",
            f"{val:.4f}" if val is not None else "n/a",
            seconds,
            bytes_up / 1e3,
            bytes_down / 1e3,
            entry["clients"]["accepted"],
            len(entry["clients"]["rejected"]),
            len(entry["clients"]["missing"]),
        )
        return None


def per_bank_table(
    strategy: UpdateAggregationStrategy, final_round: int, settings: BankAppSettings
) -> dict[str, Any]:
    """Per bank: federated vs local-only AUC with the paired interval and verdict the bank
    computed on its own test rows, Gini, KS, calibration and model health."""
    clients = strategy.evaluation_reports.get(final_round, {}).get("clients", {})
    table: dict[str, Any] = {}
    for node_id, c in sorted(clients.items(), key=lambda kv: str(kv[1].get("label"))):
        name = str(c.get("label") or node_id)
        table[name] = {"node_id": node_id, **per_bank_row(c, settings)}
    return table


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        settings = BankAppSettings.from_config(context.run_config)
        check_run_config(settings)  # before any node, key or Ray work: fail in seconds
    except SettingsError as err:
        log(ERROR, "[bank-risk] FAILED before starting: %s", err)
        raise
    settings = prepare_keys(settings, context.run_id, grid)  # HE: simulation-only key set
    checkpoint: Checkpoint | None = None
    if settings.resume_from:
        run_dir = Path(settings.resume_from).expanduser().resolve()
        checkpoint = load_checkpoint(run_dir)
        # Continues the chain; heads signed with $FLOWER_EXT_AUDIT_KEY or a fresh key.
        if not os.environ.get(SERVER_KEY_ENV):
            log(
                WARNING,
                "[bank-risk] resuming without $%s: this start signs with a new key, so the "
                "banks' receipts record a key change and `flower-ext verify --receipts` fails "
                "on this run; keep one key file for every start of a run (the deploy script "
                "does)",
                SERVER_KEY_ENV,
            )
        audit = AuditTrail(run_dir / "audit.jsonl", signer=server_signer())
        metrics = MetricsFile.resume(run_dir, settings.raw, checkpoint.server_round)
        record_resume(audit, run_dir, checkpoint, context.run_id, settings)
        audit.announce_key()
    else:
        run_dir = resolve_run_dir(settings.output_dir, settings.run_name, context.run_id)
        audit = AuditTrail(run_dir / "audit.jsonl", signer=server_signer())
        metrics = MetricsFile(run_dir, settings.raw)
        audit.record("run_start", run_id=context.run_id, config=settings.raw)
        audit.announce_key()  # audit_key + audit-public-key.pem; the banks get it too
    log(INFO, "[bank-risk] writing metrics and audit trail to %s", run_dir)
    try:
        run_federation(grid, settings, audit, metrics, run_dir=run_dir, checkpoint=checkpoint)
    except Exception as err:
        metrics.update(status="failed", error=f"{type(err).__name__}: {err}")
        audit.record("run_failed", error=f"{type(err).__name__}: {err}")
        # Flower logs the traceback of what the ServerApp raises; ours is one line.
        log(ERROR, "[bank-risk] FAILED: %s (outputs in %s)", short_reason(str(err)), run_dir)
        raise
    finally:
        audit.sign_head(final=True)  # the report's banner verifies a fully signed trail
        write_report(run_dir)
        audit.seal_file(run_dir / "report.html")  # its hash, signed: verify checks the file
    log(INFO, "[bank-risk] metrics: %s", Path(metrics.path))
    log(INFO, "[bank-risk] audit trail: %s", run_dir / "audit.jsonl")
    log(INFO, "[bank-risk] FINISHED: %d rounds; outputs in %s", settings.num_rounds, run_dir)


def record_resume(
    audit: AuditTrail,
    run_dir: Path,
    checkpoint: Checkpoint,
    run_id: int,
    settings: BankAppSettings,
) -> None:
    """Audit the restart: rounds begun after the checkpoint are abandoned (and redone)."""
    started: dict[int, bool] = {}  # train round -> closed?
    path = run_dir / "audit.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            kind, rnd = event.get("event"), event.get("round")
            if kind == "run_resumed":
                started = {r: c for r, c in started.items() if r <= int(event["from_round"])}
            elif kind == "round_start" and event.get("phase", "train") == "train":
                started[int(rnd)] = False
            elif kind in ("round_aggregated", "round_skipped"):
                started[int(rnd)] = True
    for rnd in sorted(r for r in started if r > checkpoint.server_round):
        audit.record(
            "round_abandoned",
            round=rnd,
            closed=started[rnd],
            reason="the server stopped before this round was checkpointed; it is redone",
        )
    if checkpoint.server_round >= settings.num_rounds:
        log(WARNING, "[bank-risk] %s already finished all its rounds", run_dir)
    audit.record(
        "run_resumed",
        run_id=run_id,
        from_round=checkpoint.server_round,
        model_sha256=checkpoint.model_sha256,
        num_rounds=settings.num_rounds,
        config=settings.raw,
    )
    log(
        INFO,
        "[bank-risk] resuming %s after round %d of %d",
        run_dir,
        checkpoint.server_round,
        settings.num_rounds,
    )


def run_rounds(
    strategy: UpdateAggregationStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    timeout: float,
    recorder: RoundRecorder,
) -> ArrayRecord:
    """Rounds ``first_round``..``num_rounds``, exactly as ``Strategy.start`` runs each one.

    ``Strategy.start`` always counts from round 1; a resumed run needs to begin
    later, so this is its loop (train, client-side evaluate, then the
    ``evaluate_fn`` hook: here the round recorder, which also checkpoints).
    Every run uses it, fresh or resumed, so both behave the same.
    """
    audit = recorder.audit
    strategy.summary()
    if first_round == 1:
        recorder(0, arrays)  # the setup figures (standardisation query bytes, seconds)
    for current_round in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
        audit.sign_head(before_round=current_round)  # the banks get it in their config
        config = {"num-server-rounds": num_rounds, **audit.published()}
        # The round's learning rate under lr-schedule: the banks need no state for it.
        rate = recorder.settings.round_learning_rate(current_round)
        train_config = {**config, "learning-rate": rate}
        messages = list(
            strategy.configure_train(current_round, arrays, ConfigRecord(train_config), grid)
        )
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        record_exchange(audit, current_round, "train", messages, replies)  # receipts match it
        new_arrays, train_metrics = strategy.aggregate_train(current_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
        messages = list(
            strategy.configure_evaluate(current_round, arrays, ConfigRecord(dict(config)), grid)
        )
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        record_exchange(audit, current_round, "evaluate", messages, replies)
        eval_metrics = strategy.aggregate_evaluate(current_round, replies)
        if eval_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", eval_metrics)
        recorder(current_round, arrays)
    return arrays


def write_report(run_dir: Path) -> None:
    """The HTML report, also for a failed run (it covers the rounds that completed)."""
    try:
        report = build_report(run_dir)
    except Exception as err:  # a report problem must never hide the run's own outcome
        log(WARNING, "[bank-risk] could not write the report: %s", err)
        return
    log(INFO, "[bank-risk] report: %s (flower-ext report %s)", report.html_path, run_dir)


def run_federation(
    grid: Grid,
    settings: BankAppSettings,
    audit: AuditTrail,
    metrics: MetricsFile,
    run_dir: Path | None = None,
    checkpoint: Checkpoint | None = None,
) -> None:
    metered = MeteredGrid(grid)
    started = time.perf_counter()
    minimum = settings.min_banks or None
    nodes = wait_for_banks(
        metered,
        settings.data.num_banks,
        settings.wait_for_nodes,
        minimum=minimum,
        simulation=is_simulation(grid),
    )
    # csv-schema runs: the federated preprocessing first; its plan rides on every message.
    sending = with_preprocessing(metered, nodes, settings, audit)
    if checkpoint is None:
        stats = federated_standardisation(
            sending, nodes, settings.round_timeout, audit, required=settings.min_banks or None
        )
        labels = stats.labels
        features = stats.features
        model = build_model(
            len(features), settings.model, settings.hidden_units, seed=settings.seed
        )
        model.set_standardisation(stats.mean, stats.std)
        initial = ArrayRecord(model.state_dict())
        metrics.update(
            model={
                "kind": settings.model,
                "num_parameters": count_parameters(model),
                "features": features,
            }
        )
    else:  # the checkpointed model already holds the federation's standardisation
        initial = checkpoint.arrays
        labels = {}  # the checkpoint's strategy state carries the labels seen so far

    # Robust rules check their f against the fewest banks a round may have.
    inner = build_strategy(settings, audit, num_nodes=settings.min_banks or len(nodes))
    if settings.min_banks:  # fewer valid replies than min-banks: the round is skipped
        inner.min_valid_replies = settings.min_banks
    # The banks' labels from the query, so even a bank failing round 1 is audited by name.
    inner.labels.update(labels)
    # Counts cannot buy influence: train weights pinned to the setup counts (with HE the banks
    # pre-multiply by their own weight, so the server has nothing to pin; README says so).
    if checkpoint is None and not he_enabled(settings.raw):
        inner.pinned_weights.update(stats.counts)
    strategy = wrap_strategy(inner, settings, audit)
    recorder = RoundRecorder(settings, strategy, metered, metrics, audit, run_dir=run_dir)
    first_round = 1
    if checkpoint is not None:
        recorder.restore(checkpoint)
        first_round = checkpoint.server_round + 1
    num_rounds = settings.num_rounds
    if settings.local_only_baseline and settings.privacy() is None:
        log(
            INFO,
            "[bank-risk] after round %d each bank also trains its local-only baseline "
            "(%d epochs); then the server trains the centralized ceiling",
            num_rounds,
            num_rounds * settings.local_epochs,
        )
    final_arrays = run_rounds(
        strategy, sending, initial, first_round, num_rounds, settings.round_timeout, recorder
    )
    final_eval = app_metrics(strategy.evaluation_reports.get(num_rounds, {}).get("metrics", {}))
    per_bank = per_bank_table(strategy, num_rounds, settings)
    for bank, row in recorder.privacy_by_bank.items():  # DP runs: what each bank spent
        per_bank.setdefault(bank, {}).update(
            epsilon=row.get("epsilon"), delta=row.get("delta"), privacy_refused=row.get("refused")
        )
    # personalisation != "off": each bank adapts the final model; only its summary comes back
    personalised = personalise_banks(sending, nodes, final_arrays, settings, audit, labels)
    ceiling: dict[str, Any] = {"auc": None, "null_reason": "disabled by centralized-baseline=false"}
    if settings.centralized_baseline:
        ceiling = centralized_ceiling(settings, final_arrays)
        for bank, auc in (ceiling.get("per_bank") or {}).items():
            if bank in per_bank:
                per_bank[bank]["ceiling_auc"] = auc
    centralized, reason = ceiling.get("auc"), ceiling.get("null_reason") or ""
    final_sha = arrays_sha256(final_arrays)
    best = best_round_summary(recorder.best, num_rounds, final_eval, settings)
    gap_warning = ceiling_gap_warning(ceiling)
    warnings = [gap_warning] if gap_warning else []
    # Banks where the gain is significant (the verdict), not every positive point estimate.
    beats = [b for b, r in per_bank.items() if r.get("verdict") == "gains"]
    verdicts = verdict_counts(per_bank)
    health = {b: r["health"] for b, r in per_bank.items() if r.get("health")}
    # Every final figure metrics.json shows is also in run_end, so verify checks them all.
    summary: dict[str, Any] = {
        "per_bank": per_bank,
        "centralized_auc": centralized,
        "centralized_null_reason": reason or None,
        "federated_vs_centralized": (
            final_eval["auc"] / centralized
            if centralized and final_eval.get("auc") is not None
            else None
        ),
        "banks_where_federation_beats_local": len(beats),
        "ceiling": ceiling,
        "verdicts": verdicts,
        "verdict_summary": verdict_summary(per_bank),
        "best_round": best,
        "warnings": warnings,
        "model_health": health,
    }
    if personalised:  # the personalisation block (bank_risk.personalisation)
        summary["personalisation"] = personalised
    secure = getattr(inner, "secagg_summary", None)  # secagg = true: what the server learned
    if callable(secure):
        summary["secure_aggregation"] = secure()
        dp = summary["secure_aggregation"]["distributed_dp"] or {}
        log(
            INFO,
            "[bank-risk] secure aggregation: the server saw only the sum each round%s",
            (
                f"; distributed DP epsilon {dp['secagg-dp-epsilon']:.3f} (all survivors "
                f"honest), {dp['secagg-dp-epsilon-nominal']:.3f} with only t honest, at delta "
                f"{dp['secagg-dp-delta']:g}"
                if dp
                else ""
            ),
        )
    metrics.update(
        status="finished",
        final={**final_eval, "model_sha256": final_sha},
        **summary,
        config_defaults=app_config_defaults(),
        total_seconds=time.perf_counter() - started,
    )
    audit.record("run_end", rounds=num_rounds, final=final_eval, model_sha256=final_sha, **summary)
    for line in verdict_lines(final_eval, ceiling, per_bank, verdicts, settings, best, gap_warning):
        log(WARNING if line.startswith("WARNING") else INFO, "[bank-risk] %s", line)
    for line in personalisation_lines(personalised):
        log(INFO, "[bank-risk] %s", line)


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "null"
