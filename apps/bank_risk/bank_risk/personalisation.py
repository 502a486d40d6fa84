"""Personalisation (run config ``personalisation``): each bank ends with its own model.

After the last round the server sends every bank one more message, a QUERY
(``query = "personalise"``) carrying the final global model. The bank

1. adapts it on its own rows (:func:`flower_ext.personalise.personalise`: fine-tuning with
   early stopping on its validation rows, and/or an intercept correction to its own
   default rate on its training rows);
2. trains its local-only model, exactly as the verdict does
   (:func:`bank_risk.client_app.local_only_metrics`, same seeds: the same model);
   with ``mix`` / ``finetune+mix`` its personalised model is the mixture of the (fine-tuned)
   federated model and this local-only model, the weight chosen on its validation rows
   (:func:`flower_ext.personalise.choose_mix_weight`);
3. scores the three models on its own test rows and replies with a summary only
   (:func:`flower_ext.personalise.personalisation_summary`): AUCs, paired DeLong
   differences with 95% intervals (personalised - global, personalised - local-only),
   observed and predicted default rates, Brier scores. No array, no row-level value;
   the personalised model itself never leaves the bank. A synthetic bank adds the AUC of
   the generator's true risk on the same rows and its two paired differences
   (``auc-bayes``, ``bayes-vs-*``: the yardstick of how much room there was).

The server checks every reply (only known keys, finite numbers, AUCs and rates in
[0, 1], ordered intervals; a mixture's weight in [0, 1], its validation loss no worse
than either endpoint's, its AUC the global's at ``alpha = 1`` of ``mix`` and the
local-only's at ``alpha = 0``; verdicts recomputed from the intervals, never taken from
the bank) and writes the ``personalisation`` block of ``metrics.json`` and ``run_end``:
per bank, and the count of banks where the personalised model beats *both* the global
and the local-only model with a significant gain (both lower bounds > 0).

Under DP (``dp != "off"``) the run is refused before it starts: fine-tuning, the
intercept and the local-only comparison would all use the protected rows outside the
privacy accounting. Under HE it is refused too: the server holds only the encrypted
global model, which the personalise query would have to carry and the bank to decrypt
outside the per-round model pinning of ``he_mod``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import replace
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.audit import AuditTrail, short_reason
from flower_ext.data.scenarios import bayes_logit
from flower_ext.personalise import (
    MIX_GRID,
    PERSONALISATION_MODES,
    MixChoice,
    PersonalisationConfig,
    choose_mix_weight,
    mix_logits,
    personalisation_summary,
    personalise,
)
from flower_ext.privacy import PrivacyPolicyViolation, bank_privacy, policy_refusal
from flower_ext.training import predict_logits
from flower_ext.validation import CLIENT_INFO_KEY, client_label
from flower_ext.verdict import MIN_CLASS_ROWS, verdict_from_interval

from .bank_query import first_replies, query_banks

#: The QUERY a bank answers with its personalisation summary.
PERSONALISE_QUERY = "personalise"
#: Error code of a bank that cannot personalise (reason: one line).
PERSONALISE_ERROR_CODE = 4210
#: A mixture's figures in the reply: MixChoice field -> reply key.
MIX_KEYS = {
    "alpha": "mix-alpha",
    "offset": "mix-offset",
    "val_loss": "mix-val-loss",
    "val_loss_federated": "mix-val-loss-federated",
    "val_loss_local": "mix-val-loss-local-only",
}
#: The only numbers a bank's reply may carry (record ``personalisation``).
NUMERIC_KEYS = frozenset(
    {
        "num-examples",
        "observed-rate",
        *(f"{k}-{m}" for k in ("auc", "predicted-rate", "brier")
          for m in ("global", "personalised", "local-only")),
        *(f"{c}-{f}" for c in ("vs-global", "vs-local")
          for f in ("diff", "ci-low", "ci-high", "p-value")),
        # synthetic banks only: the generator's true risk, the yardstick of what is reachable
        "auc-bayes",
        *(f"{c}-{f}" for c in ("bayes-vs-global", "bayes-vs-local")
          for f in ("diff", "ci-low", "ci-high", "p-value")),
        "finetune-epochs-run",
        "finetune-best-epoch",
        "finetune-val-loss-before",
        "finetune-val-loss-after",
        "intercept-offset",
        *MIX_KEYS.values(),
        "seconds",
    }
)  # fmt: skip
#: The only words it may carry (record ``client-info``), each at most ``MAX_TEXT`` chars.
TEXT_KEYS = frozenset(
    {
        "bank",
        "mode",
        "note",
        "unavailable",
        "vs-global-verdict",
        "vs-local-verdict",
        "vs-global-unavailable",
        "vs-local-unavailable",
        "bayes-vs-global-verdict",
        "bayes-vs-local-verdict",
        "bayes-vs-global-unavailable",
        "bayes-vs-local-unavailable",
        "global-health",
        "personalised-health",
        "local-only-health",
    }
)
MAX_TEXT = 300
#: Values that must lie in [0, 1].
_UNIT_KEYS = frozenset(
    k for k in NUMERIC_KEYS if k.startswith(("auc-", "predicted-rate-", "brier-"))
) | {"observed-rate"}

PERSONALISATION_DP_REFUSAL = (
    "personalisation cannot run with dp = '{dp}': fine-tuning, the intercept correction and "
    "the local-only comparison would use each bank's protected rows outside the privacy "
    "accounting (no epsilon would cover them); set personalisation = 'off' or dp = 'off'"
)
PERSONALISATION_HE_REFUSAL = (
    "personalisation cannot run with he = true: the server holds only the encrypted global "
    "model, and the banks decrypt one model per round inside he_mod's pinning, which the "
    "personalise query does not go through; set personalisation = 'off' or he = false"
)

PERSONALISATION_MIX_REFUSAL = (
    "personalisation = '{mode}' chooses each bank's mixture weight on its validation rows, "
    "and validation-fraction = 0 gives it none; set validation-fraction > 0 (e.g. 0.15)"
)


def config_problems(settings: Any) -> list[str]:
    """What the settings check reports about ``personalisation`` (before anything starts):
    a run that personalises under DP or HE is refused (module docstring)."""
    from .encryption import he_enabled  # late: encryption imports the settings module

    if not settings.personalisation.enabled:
        return []
    try:
        dp_on = settings.privacy() is not None
    except (TypeError, ValueError):
        return []  # a bad dp setting is reported on its own
    if dp_on:
        return [PERSONALISATION_DP_REFUSAL.format(dp=settings.raw.get("dp"))]
    if he_enabled(settings.raw):
        return [PERSONALISATION_HE_REFUSAL]
    if settings.personalisation.mix and settings.data.validation_fraction <= 0:
        return [PERSONALISATION_MIX_REFUSAL.format(mode=settings.personalisation.mode)]
    return []


# ------------------------------------------------------------------------ the bank side
def personalise_reply(msg: Message, context: Context) -> Message:
    """A bank's answer to the personalise query: the summary of its three models."""
    from .client_app import _model_for, load_context_bank, local_only_metrics  # late: cycle

    started = time.perf_counter()
    settings, bank = load_context_bank(context, msg)
    cfg = PersonalisationConfig.from_run_config(context.run_config)

    def refuse(reason: str) -> Message:
        log(ERROR, "[bank-risk] %s: personalisation refused: %s", bank.name, reason)
        return Message(Error(code=PERSONALISE_ERROR_CODE, reason=reason), reply_to=msg)

    if not cfg.enabled:
        return refuse("personalisation = 'off' in this run's config")
    try:  # the bank's own DP policy (node config) wins, as in training
        privacy = bank_privacy(context, settings.privacy())
    except PrivacyPolicyViolation as err:
        return policy_refusal(msg, str(err))
    if privacy is not None:
        return refuse(PERSONALISATION_DP_REFUSAL.format(dp=context.run_config.get("dp")))
    if len(msg.content.array_records) != 1:
        return refuse("the query carries no single ArrayRecord holding the final global model")
    arrays = next(iter(msg.content.array_records.values()))
    try:
        global_model = _model_for(bank, settings, arrays)
    except Exception as err:  # whatever the server sent, the bank answers, never crashes
        return refuse(f"the final global model does not load ({type(err).__name__}: {err})")
    log(INFO, "[bank-risk] %s: personalising the final global model (%s)", bank.name, cfg.mode)
    mine = personalise(
        global_model,
        bank.x_train,
        bank.y_train,
        bank.x_val,
        bank.y_val,
        cfg,
        settings.train_config(seed=settings.seed, proximal_mu=0.0),
    )
    local_val, local_logits = local_only_logits(bank, settings, local_only_metrics)
    personal_logits = predict_logits(mine.model, bank.x_test)
    mix: MixChoice | None = None
    if cfg.mix:
        mix = choose_mix_weight(predict_logits(mine.model, bank.x_val), local_val, bank.y_val)
        personal_logits = mix_logits(personal_logits, local_logits, mix.alpha, mix.offset)
    summary = personalisation_summary(
        bank.y_test,
        predict_logits(global_model, bank.x_test),
        personal_logits,
        local_logits,
        bayes_logits=synthetic_bayes_logits(context, bank),
    )
    if mix is not None:
        summary.update({key: getattr(mix, field) for field, key in MIX_KEYS.items()})
    if mine.finetune is not None:
        summary.update(
            {
                "finetune-epochs-run": mine.finetune.epochs_run,
                "finetune-best-epoch": mine.finetune.best_epoch,
                "finetune-val-loss-before": mine.finetune.initial_val_loss,
                "finetune-val-loss-after": mine.finetune.best_val_loss,
            }
        )
    if mine.intercept_offset is not None:
        summary["intercept-offset"] = mine.intercept_offset
    notes = [n for n in (mine.note, mix.note if mix else "") if n]
    if notes:
        summary["note"] = "; ".join(notes)
    summary["seconds"] = time.perf_counter() - started
    numbers = {
        k: float(v)
        for k, v in summary.items()
        if k in NUMERIC_KEYS and isinstance(v, (int, float)) and math.isfinite(v)
    }
    words = {k: str(v)[:MAX_TEXT] for k, v in summary.items() if k in TEXT_KEYS}
    content = RecordDict(
        {
            "personalisation": MetricRecord(numbers),  # type: ignore[arg-type]
            CLIENT_INFO_KEY: ConfigRecord({**words, "bank": bank.name, "mode": cfg.mode}),
        }
    )
    # The personalised model stays here: it is not part of the reply.
    return Message(content=content, reply_to=msg)


def synthetic_bayes_logits(context: Context, bank: Any) -> np.ndarray | None:
    """The generator's true risk log-odds on a synthetic bank's test rows, shape
    ``(n_test,)`` (:func:`flower_ext.data.scenarios.bayes_logit`); ``None`` for real data."""
    from .client_app import bank_index, context_source  # late: cycle

    settings, source = context_source(context)
    if source.dataset != "synthetic":
        return None
    x_test = np.asarray(bank.x_test, dtype=np.float64)
    columns = dict(zip(bank.feature_names, x_test.T, strict=True))
    return bayes_logit(source.scenario, bank_index(context, settings), columns)


def local_only_logits(
    bank: Any, settings: Any, local_only_metrics: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The bank's local-only model's log-odds on its validation and its test rows:
    ``(shape (n_val,), shape (n_test,))``.

    ``local_only_metrics`` is :func:`bank_risk.client_app.local_only_metrics` (passed in:
    that module imports this one). It trains on the training rows only and scores the
    test rows it is given, so handing it the validation rows followed by the test rows
    gives the verdict's very model (same rows, same seeds) on both, trained once.
    """
    n_val = len(bank.y_val)
    x_val = np.asarray(bank.x_val, dtype=bank.x_test.dtype).reshape(n_val, bank.x_test.shape[1])
    both = replace(
        bank,
        x_test=np.concatenate([x_val, bank.x_test]),
        y_test=np.concatenate([bank.y_val, bank.y_test]).astype(bank.y_test.dtype),
    )
    _, logits = local_only_metrics(both, settings)
    return logits[:n_val], logits[n_val:]


# ---------------------------------------------------------------------- the server side
def read_reply(reply: Message) -> dict[str, Any]:
    """One bank's checked summary; ``ValueError`` naming what is wrong with it."""
    try:
        numbers = reply.content["personalisation"]
        info = reply.content[CLIENT_INFO_KEY]
    except (KeyError, TypeError):
        raise ValueError("no 'personalisation' summary in the reply") from None
    if not isinstance(numbers, MetricRecord) or not isinstance(info, ConfigRecord):
        raise ValueError("malformed personalisation summary")
    row: dict[str, Any] = {}
    for key, value in numbers.items():
        if key not in NUMERIC_KEYS:
            raise ValueError(f"unexpected field '{key}'")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{key}' is not one number")
        if not math.isfinite(value):
            raise ValueError(f"'{key}' is not finite")
        if key in _UNIT_KEYS and not 0.0 <= value <= 1.0:
            raise ValueError(f"'{key}' = {value} is outside [0, 1]")
        row[key] = float(value)
    for key, value in info.items():
        if key not in TEXT_KEYS or not isinstance(value, str):
            raise ValueError(f"unexpected field '{key}'")
        row[key] = short_reason(value, MAX_TEXT)
    _check_consistency(row)
    return row


#: Whole counts a reply may carry: each >= 0 and a whole number.
_COUNT_KEYS = ("num-examples", "finetune-epochs-run", "finetune-best-epoch")
#: Each comparison: its prefix and the two AUCs its difference is about (a - b).
_COMPARED = {
    "vs-global": ("personalised", "global"),
    "vs-local": ("personalised", "local-only"),
    "bayes-vs-global": ("bayes", "global"),
    "bayes-vs-local": ("bayes", "local-only"),
}
#: How far a sent AUC difference may be from the difference of the sent AUCs.
DIFF_TOLERANCE = 1e-9


def _check_consistency(row: Mapping[str, Any]) -> None:
    """``ValueError`` naming the first way the summary contradicts itself (every check is
    one a summary made by :func:`flower_ext.personalise.personalisation_summary` passes)."""
    for key in _COUNT_KEYS:
        value = row.get(key)
        if value is not None and (value < 0 or value != int(value)):
            raise ValueError(f"'{key}' = {value:g} is not a whole count >= 0")
    if "finetune-best-epoch" in row:
        if "finetune-epochs-run" not in row:
            raise ValueError("'finetune-best-epoch' without 'finetune-epochs-run'")
        if row["finetune-best-epoch"] > row["finetune-epochs-run"]:
            raise ValueError(
                f"'finetune-best-epoch' = {row['finetune-best-epoch']:g} is after the last "
                f"epoch run ({row['finetune-epochs-run']:g})"
            )
    if row.get("seconds", 0.0) < 0:
        raise ValueError(f"'seconds' = {row['seconds']:g} is negative")
    mode = row.get("mode")
    if mode is not None and mode not in PERSONALISATION_MODES:
        raise ValueError(f"'mode' = {mode!r} is not one of {PERSONALISATION_MODES}")
    _check_mix(row)
    minority = _minority_rows(row)
    for prefix, (a, b) in _COMPARED.items():
        low, diff, high, p = (
            row.get(f"{prefix}-{f}") for f in ("ci-low", "diff", "ci-high", "p-value")
        )
        for name, value in (("diff", diff), ("ci-low", low), ("ci-high", high)):
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"'{prefix}-{name}' = {value:g} is outside [-1, 1]")
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"'{prefix}-p-value' = {p:g} is outside [0, 1]")
        sent = [f for f, v in (("diff", diff), ("ci-low", low), ("ci-high", high), ("p-value", p))
                if v is not None]  # fmt: skip
        if not sent:
            continue
        reason = row.get(f"{prefix}-unavailable") or row.get("unavailable")
        if reason:
            raise ValueError(
                f"'{prefix}' sends {', '.join(sent)} together with an unavailable reason ({reason})"
            )
        if low is None or high is None or diff is None:
            raise ValueError(f"'{prefix}' is incomplete: it needs diff, ci-low and ci-high")
        if low > high:
            raise ValueError(f"'{prefix}' interval has low {low:g} > high {high:g}")
        if not low <= diff <= high:
            raise ValueError(
                f"'{prefix}-diff' = {diff:g} is outside its interval [{low:g}, {high:g}]"
            )
        auc_a, auc_b = row.get(f"auc-{a}"), row.get(f"auc-{b}")
        if auc_a is None or auc_b is None:
            raise ValueError(f"'{prefix}-diff' is sent without 'auc-{a}' and 'auc-{b}'")
        if abs(diff - (auc_a - auc_b)) > DIFF_TOLERANCE:
            raise ValueError(
                f"'{prefix}-diff' = {diff:g} is not auc-{a} - auc-{b} = {auc_a - auc_b:g}"
            )
        if minority is not None and minority < MIN_CLASS_ROWS:
            raise ValueError(
                f"'{prefix}' interval from {minority:g} test rows of one class (a paired "
                f"interval needs at least {MIN_CLASS_ROWS} of each)"
            )


#: How far a mixture's AUC at an endpoint may be from that endpoint model's AUC (the
#: offset is one constant, so only float rounding in the last bits can move a rank).
ENDPOINT_AUC_TOLERANCE = 1e-6
#: How much a mixture's validation loss may exceed an endpoint's (float rounding).
LOSS_TOLERANCE = 1e-9


def _check_mix(row: Mapping[str, Any]) -> None:
    """``ValueError`` naming how a mixture's figures contradict themselves or the mode:
    figures only from a ``mix`` mode and then a weight; the weight on :data:`MIX_GRID`;
    losses >= 0 and the kept one no worse than either endpoint's (both are candidates);
    at ``alpha = 1`` of ``mix`` (the global model plus a constant) the global AUC, at
    ``alpha = 0`` (the local-only model plus a constant) the local-only AUC."""
    sent = [k for k in MIX_KEYS.values() if k in row]
    mixing = str(row.get("mode", "")).endswith("mix")
    if not mixing:
        if sent:
            raise ValueError(f"{', '.join(sent)} sent by mode {row.get('mode')!r} (not a mix)")
        return
    alpha = row.get("mix-alpha")
    if alpha is None:
        raise ValueError(f"mode {row.get('mode')!r} sends no 'mix-alpha'")
    if not any(abs(alpha - a) <= 1e-9 for a in MIX_GRID):
        raise ValueError(f"'mix-alpha' = {alpha:g} is not one of the weights {MIX_GRID}")
    losses = {k: row[k] for k in sent if k.startswith("mix-val-loss")}
    for key, value in losses.items():
        if value < 0:
            raise ValueError(f"'{key}' = {value:g} is negative")
    kept = losses.get("mix-val-loss")
    for key in ("mix-val-loss-federated", "mix-val-loss-local-only"):
        if kept is not None and key in losses and kept > losses[key] + LOSS_TOLERANCE:
            raise ValueError(
                f"'mix-val-loss' = {kept:g} is worse than '{key}' = {losses[key]:g}, a "
                "candidate the choice had"
            )
    ends = {0.0: "local-only"} | ({1.0: "global"} if row.get("mode") == "mix" else {})
    for weight, model in ends.items():
        auc_p, auc_m = row.get("auc-personalised"), row.get(f"auc-{model}")
        if auc_p is None or auc_m is None or abs(alpha - weight) > 1e-9:
            continue
        if abs(auc_p - auc_m) > ENDPOINT_AUC_TOLERANCE:
            raise ValueError(
                f"'mix-alpha' = {alpha:g} makes the {model} model, but auc-personalised "
                f"= {auc_p:g} is not auc-{model} = {auc_m:g}"
            )


def _minority_rows(row: Mapping[str, Any]) -> float | None:
    """Test rows of the rarer class, from ``num-examples`` and ``observed-rate``; with no
    rate, the most it can be (half the rows); ``None`` without ``num-examples``."""
    n = row.get("num-examples")
    if n is None:
        return None
    rate = row.get("observed-rate")
    if rate is None:
        return math.floor(n / 2)
    defaults = rate * n
    if abs(defaults - round(defaults)) > 1e-6 * max(1.0, n):
        raise ValueError(
            f"'observed-rate' = {rate:g} of {n:g} test rows is not a whole number of defaults"
        )
    return float(min(round(defaults), n - round(defaults)))


def _comparison(row: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    low, high = row.get(f"{prefix}-ci-low"), row.get(f"{prefix}-ci-high")
    if low is None or high is None:
        reason = row.get(f"{prefix}-unavailable") or row.get("unavailable")
        return (
            {"diff": None, "ci": None, "verdict": None, "null_reason": reason} if reason else None
        )
    return {
        "diff": row.get(f"{prefix}-diff"),
        "ci": [low, high],
        "p_value": row.get(f"{prefix}-p-value"),
        "verdict": verdict_from_interval(low, high),  # the server's own reading
    }


def true_risk_keys(row: Mapping[str, Any]) -> list[str]:
    """The true-risk (``bayes``) figures a summary carries, sorted (synthetic banks only)."""
    return sorted(k for k in row if k.startswith(("auc-bayes", "bayes-")))


def check_fits_run(row: Mapping[str, Any], mode: str, dataset: str) -> None:
    """``ValueError`` when a checked summary does not belong to this run: another
    personalisation mode, or true-risk (``bayes``) figures from a run whose data is not the
    synthetic generator (real data has no known risk function to score with)."""
    if row.get("mode") not in (None, mode):
        raise ValueError(f"mode {row['mode']!r}, the run's is {mode!r}")
    sent = true_risk_keys(row)
    if dataset != "synthetic" and sent:
        raise ValueError(
            f"{', '.join(sent)} from a run whose data is {dataset!r}, not the synthetic "
            "generator (real data has no known risk function)"
        )


def _both_gain(*cmps: Mapping[str, Any] | None) -> bool:
    """Whether every comparison has an interval whose lower bound is above 0."""
    return all(c is not None and c.get("ci") and c["ci"][0] > 0 for c in cmps)


def bank_entry(node: int, row: Mapping[str, Any]) -> dict[str, Any]:
    """One bank's line of the ``personalisation`` block (from a checked reply)."""
    entry: dict[str, Any] = {
        "node_id": node,
        "mode": row.get("mode"),
        "num_test_examples": int(row["num-examples"]) if "num-examples" in row else None,
        "global_auc": row.get("auc-global"),
        "personalised_auc": row.get("auc-personalised"),
        "local_only_auc": row.get("auc-local-only"),
        "vs_global": _comparison(row, "vs-global"),
        "vs_local_only": _comparison(row, "vs-local"),
        "observed_default_rate": row.get("observed-rate"),
        "predicted_default_rate": {
            m: row.get(f"predicted-rate-{m}") for m in ("global", "personalised", "local-only")
        },
        "brier": {m: row.get(f"brier-{m}") for m in ("global", "personalised", "local-only")},
        "beats_both": False,  # below: from the checked intervals only
        "seconds": row.get("seconds"),
    }
    entry["beats_both"] = _both_gain(entry["vs_global"], entry["vs_local_only"])
    if true_risk_keys(row):
        # synthetic banks: could the generator's true risk itself show a gain over both?
        bayes = {
            "auc": row.get("auc-bayes"),
            "vs_global": _comparison(row, "bayes-vs-global"),
            "vs_local_only": _comparison(row, "bayes-vs-local"),
        }
        bayes["beats_both"] = _both_gain(bayes["vs_global"], bayes["vs_local_only"])
        entry["bayes"] = bayes
    if "finetune-epochs-run" in row:
        entry["finetune"] = {
            "epochs_run": int(row["finetune-epochs-run"]),
            "best_epoch": int(row.get("finetune-best-epoch", 0)),
            "validation_loss_before": row.get("finetune-val-loss-before"),
            "validation_loss_after": row.get("finetune-val-loss-after"),
        }
    if "intercept-offset" in row:
        entry["intercept_offset"] = row["intercept-offset"]
    if "mix-alpha" in row:
        entry["mix"] = {
            "alpha": row["mix-alpha"],
            "offset": row.get("mix-offset"),
            "validation_loss": {
                "mixture": row.get("mix-val-loss"),
                "federated": row.get("mix-val-loss-federated"),
                "local_only": row.get("mix-val-loss-local-only"),
            },
        }
    notes = [
        str(row[k])
        for k in (
            "note",
            "unavailable",
            "global-health",
            "personalised-health",
            "local-only-health",
        )
        if row.get(k)
    ]
    entry["note"] = "; ".join(notes) or None
    return entry


def personalise_banks(
    grid: Grid,
    nodes: list[int],
    arrays: Any,
    settings: Any,
    audit: AuditTrail,
    labels: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Ask every bank to personalise ``arrays`` (the final global model); the
    ``personalisation`` block of ``metrics.json``, or ``{}`` when it is off."""
    cfg: PersonalisationConfig = settings.personalisation
    if not cfg.enabled:
        return {}
    started = time.perf_counter()
    log(
        INFO,
        "[bank-risk] personalisation (%s): each bank adapts the final global model on its own "
        "rows and reports global vs personalised vs local-only on its test rows",
        cfg.mode,
    )
    live = set(grid.get_node_ids())  # a bank that dropped out is not waited for
    replies, origins = query_banks(
        grid,
        [node for node in nodes if node in live],
        PERSONALISE_QUERY,
        audit,
        settings.round_timeout,
        arrays=arrays,
        extra={"server-round": settings.num_rounds, "num-server-rounds": settings.num_rounds},
    )
    per_bank: dict[str, Any] = {}
    failed: dict[str, str] = {}
    answered: set[int] = set()
    for node, reply in first_replies(replies, origins):
        answered.add(node)
        name = short_reason(client_label(reply), 100) or (labels or {}).get(node) or str(node)
        if reply.has_error():
            failed[name] = short_reason(f"error reply {reply.error.code}: {reply.error.reason}")
            continue
        try:
            row = read_reply(reply)
            check_fits_run(row, cfg.mode, settings.data.dataset)
        except ValueError as err:
            failed[name] = f"reply rejected: {err}"
            continue
        per_bank[name] = bank_entry(node, row)
    for node in nodes:
        if node not in answered:
            name = (labels or {}).get(node) or str(node)
            failed[name] = (
                f"no reply within {settings.round_timeout:g}s"
                if node in live
                else "not connected any more"
            )
    for name, why in failed.items():
        log(WARNING, "[bank-risk] personalisation: %s: %s", name, why)
    per_bank = dict(sorted(per_bank.items()))
    winners = [b for b, r in per_bank.items() if r["beats_both"]]
    with_bayes = {b: r["bayes"] for b, r in per_bank.items() if "bayes" in r}
    block: dict[str, Any] = {
        "mode": cfg.mode,
        "epochs": cfg.epochs if cfg.finetune else None,
        "learning_rate": (cfg.learning_rate or settings.learning_rate) if cfg.finetune else None,
        "patience": cfg.patience if cfg.finetune else None,
        "mix_grid": list(MIX_GRID) if cfg.mix else None,
        "per_bank": per_bank,
        "failed": failed,
        "banks": len(nodes),
        "banks_answered": len(per_bank),
        "banks_beating_both": len(winners),
        "banks_beating_both_names": winners,
        "seconds": time.perf_counter() - started,
    }
    if with_bayes:  # synthetic banks: where a significant gain over both is reachable at all
        reachable = [b for b, r in with_bayes.items() if r["beats_both"]]
        block["banks_reachable"] = len(reachable)
        block["banks_reachable_names"] = reachable
        block["banks_with_true_risk"] = len(with_bayes)
    block["line"] = summary_line(block)
    return block


def summary_line(block: Mapping[str, Any]) -> str:
    """The count, in words."""
    n = block.get("banks_answered", 0)
    return (
        f"personalised ({block.get('mode')}) beats both the global and the local-only model "
        f"with a significant gain (paired 95% DeLong, lower bounds > 0) at "
        f"{block.get('banks_beating_both', 0)} of {n} bank{'s' if n != 1 else ''}"
        + (
            f"; the generator's true risk itself does at {block['banks_reachable']} of "
            f"{block.get('banks_with_true_risk', n)} (reachable)"
            if "banks_reachable" in block
            else ""
        )
        + (f"; no answer from {', '.join(block['failed'])}" if block.get("failed") else "")
    )


def _f(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _cmp_text(cmp: Mapping[str, Any] | None) -> str:
    if not cmp or cmp.get("ci") is None:
        return "n/a"
    low, high = cmp["ci"]
    word = {"gains": "GAINS", "loses": "LOSES"}.get(str(cmp.get("verdict")), "n.s.")
    return f"{cmp['diff']:+.4f} [{low:+.4f}, {high:+.4f}] {word}"


def _bayes_text(bayes: Mapping[str, Any]) -> str:
    return (
        f"  true risk {_f(bayes.get('auc'))} (vs global {_cmp_text(bayes.get('vs_global'))}, "
        f"vs local-only {_cmp_text(bayes.get('vs_local_only'))})"
    )


def personalisation_lines(block: Mapping[str, Any]) -> list[str]:
    """The console's closing lines: the count, then one line per bank."""
    if not block:
        return []
    lines = [str(block.get("line") or summary_line(block))]
    for name, r in (block.get("per_bank") or {}).items():
        rates = r.get("predicted_default_rate") or {}
        lines.append(
            f"  {name:<34} global {_f(r.get('global_auc'))}  personalised "
            f"{_f(r.get('personalised_auc'))}  local-only {_f(r.get('local_only_auc'))}  "
            f"vs global {_cmp_text(r.get('vs_global'))}  vs local-only "
            f"{_cmp_text(r.get('vs_local_only'))}  default rate observed "
            f"{_f(r.get('observed_default_rate'))} / predicted global "
            f"{_f(rates.get('global'))}, personalised {_f(rates.get('personalised'))}"
            + (f"  mix alpha {r['mix']['alpha']:.1f}" if r.get("mix") else "")
            + (_bayes_text(r["bayes"]) if r.get("bayes") else "")
            + (f"  ({r['note']})" if r.get("note") else "")
        )
    return lines
