"""The risk committee's answers at the end of a run: per-bank verdicts and a real ceiling.

- :func:`per_bank_row` reads one bank's final evaluation (the summary it computed on its
  own test rows: AUC interval, paired DeLong comparison with its local-only model,
  calibration) into the ``per_bank`` table of ``metrics.json``.
- :func:`train_ceiling`: the centralized ceiling, one model trained on all banks'
  pooled training rows *to convergence*: up to ``CEILING_MAX_EPOCHS`` epochs, early
  stopping on the validation AUC of a stratified 20% validation split (patience
  ``CEILING_PATIENCE``) picks the number of epochs, then the model is refit on all pooled
  training rows for that many epochs. Possible only where the server can read the
  banks' data (simulation). The federated model is compared with it on the same pooled
  test rows (paired DeLong), and when federated comes out above it the report says
  whether that is noise or not, and why it can happen.
"""

from __future__ import annotations

import copy
import math
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.supercore import log
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from flower_ext.data import DataError, load_all_banks
from flower_ext.metrics import risk_metrics_from_logits
from flower_ext.model import build_model
from flower_ext.training import predict_logits, train_local
from flower_ext.verdict import (
    GAINS,
    LOSES,
    NO_DIFFERENCE,
    NOT_AVAILABLE_DP,
    holm_rejections,
    paired_auc_comparison,
    verdict_from_interval,
)

from .settings import BankAppSettings

#: Warn when the federated model is more than this AUC below the centralized ceiling and the
#: paired DeLong difference is significant (``ceiling_gap_warning``).
CEILING_GAP_AUC = 0.02
CEILING_MAX_EPOCHS = 100
CEILING_PATIENCE = 8
CEILING_VALIDATION_FRACTION = 0.2
CEILING_LABEL = (
    "centralized ceiling: the same model on all banks' pooled training rows, trained to "
    "convergence (epochs chosen by early stopping on the validation AUC of a 20% validation "
    "split, then refit on all pooled training rows)"
)


def no_verdict_reason(settings: BankAppSettings, bank_note: str = "") -> str:
    """Why a bank has no federated-vs-local verdict."""
    if not settings.local_only_baseline:
        return "local-only baseline off (local-only-baseline=false)"
    if settings.privacy() is not None:
        return NOT_AVAILABLE_DP
    return bank_note or "not computed"


def per_bank_row(client: dict[str, Any], settings: BankAppSettings) -> dict[str, Any]:
    """One bank's line of the verdict table, from its final evaluate reply."""
    fed, loc = client.get("auc"), client.get("local-only-auc")
    # The words follow from the interval the bank sent, whatever word it sent with it.
    low, high = client.get("gain-ci-low"), client.get("gain-ci-high")
    numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high))
    verdict = verdict_from_interval(low, high) if numbers and low <= high else None
    row = {
        "federated_auc": fed,
        "federated_auc_ci": _pair(client.get("auc-ci-low"), client.get("auc-ci-high")),
        "federated_gini": 2 * fed - 1 if fed is not None else None,
        "federated_ks": client.get("ks"),
        "local_only_auc": loc,
        "local_only_ks": client.get("local-only-ks"),
        "federation_gain": (fed - loc) if fed is not None and loc is not None else None,
        "gain_ci": _pair(client.get("gain-ci-low"), client.get("gain-ci-high")),
        "gain_p_value": client.get("gain-p-value"),
        "verdict": verdict,
        "verdict_note": None
        if verdict
        else no_verdict_reason(
            settings,
            str(client.get("verdict-unavailable") or client.get("local-only-skipped") or ""),
        ),
        "num_test_examples": client.get("num-examples"),
        "test_default_rate": client.get("default-rate"),
        "predicted_default_rate": client.get("predicted-rate"),
        "brier": client.get("brier"),
        "reliability": {
            "predicted": list(client.get("reliability-predicted") or []),
            "observed": list(client.get("reliability-observed") or []),
        },
        "health": client.get("score-health") or None,
        "local_only_health": client.get("local-only-health") or None,
        "auc_null_reason": client.get("auc-undefined-reason") or None,
    }
    return row


def _pair(low: Any, high: Any) -> list[float] | None:
    return [float(low), float(high)] if low is not None and high is not None else None


def no_verdict_why(row: dict[str, Any]) -> str:
    """Why one bank has no verdict, most specific first (e.g. no defaults in its test rows)."""
    return str(row.get("auc_null_reason") or row.get("verdict_note") or "not computed")


def verdict_summary(per_bank: dict[str, Any]) -> dict[str, Any]:
    """The run's verdict count over the banks where a verdict is defined only, and why the
    others have none (``verdict_summary`` in ``metrics.json``; console and report)."""
    counts = verdict_counts(per_bank)
    without = {b: no_verdict_why(per_bank[b]) for b in counts["no verdict"]}
    with_verdict = len(per_bank) - len(without)
    if with_verdict:
        line = (
            f"gains at {len(counts[GAINS])}, no significant difference at "
            f"{len(counts[NO_DIFFERENCE])}, loses at {len(counts[LOSES])} of {with_verdict} "
            f"bank{'s' if with_verdict != 1 else ''} with a verdict"
        )
    else:
        line = f"no bank has a verdict (of {len(per_bank)})"
    holm = holm_counts(per_bank, counts)
    if holm is not None and with_verdict > 1:
        line += (
            f" (per-bank 95% intervals; after Holm's correction for {with_verdict} banks: "
            f"gains at {holm[GAINS]}, loses at {holm[LOSES]})"
        )
    if without:
        line += "; " + "; ".join(f"{b}: {why}" for b, why in without.items())
    return {
        "holm": holm,
        "banks": len(per_bank),
        "banks_with_verdict": with_verdict,
        GAINS: len(counts[GAINS]),
        NO_DIFFERENCE: len(counts[NO_DIFFERENCE]),
        LOSES: len(counts[LOSES]),
        "no_verdict": without,
        "line": line,
    }


def ceiling_gap_warning(ceiling: dict[str, Any], gap: float = CEILING_GAP_AUC) -> str | None:
    """A warning when the federated model is more than ``gap`` AUC below the centralized
    ceiling on the pooled test rows *and* the paired DeLong difference is significant
    (the ceiling is better beyond noise); None otherwise or where there is no comparison."""
    cmp = ceiling.get("federated_vs_ceiling") or {}
    diff, verdict = cmp.get("diff"), cmp.get("verdict")
    if diff is None or verdict != LOSES or diff >= -gap:
        return None
    return (
        f"the federated model is {-diff:.4f} AUC below the centralized ceiling (95% CI "
        f"{cmp['low']:+.4f} to {cmp['high']:+.4f}, p = {cmp['p_value']:.3g}): more than "
        f"{gap:g} and beyond noise. The federation underfits or drifts; try more local epochs "
        "(local-epochs), more rounds, lr-schedule='cosine', or the best round's model "
        "(best_model.npz)"
    )


def holm_counts(
    per_bank: dict[str, Any], counts: dict[str, list[str]]
) -> dict[str, int] | None:
    """Banks that gain / lose after Holm's correction over every bank with a verdict
    (``flower_ext.verdict.holm_rejections``); None when a bank with a verdict sent no
    p-value (an older bank app)."""
    names = [b for b in per_bank if b not in counts["no verdict"]]
    p_values = [per_bank[b].get("gain_p_value") for b in names]
    if not names or any(not isinstance(p, (int, float)) or not 0 <= p <= 1 for p in p_values):
        return None
    rejected = dict(zip(names, holm_rejections(p_values), strict=True))
    return {
        kind: sum(1 for b in counts[kind] if rejected.get(b)) for kind in (GAINS, LOSES)
    }


def verdict_counts(per_bank: dict[str, Any]) -> dict[str, list[str]]:
    """Banks by verdict: gains / no significant difference / loses / no verdict."""
    out: dict[str, list[str]] = {GAINS: [], NO_DIFFERENCE: [], LOSES: [], "no verdict": []}
    for name, row in per_bank.items():
        out.get(row.get("verdict") or "no verdict", out["no verdict"]).append(name)
    return out


def best_round_summary(
    best: dict[str, Any], final_round: int, final_eval: dict[str, Any], settings: BankAppSettings
) -> dict[str, Any]:
    """``best_round`` of ``metrics.json``: the round with the best pooled *validation* AUC
    (never chosen on the test rows), its pooled test AUC, and the final round next to it."""
    out: dict[str, Any] = {
        "final_round": final_round,
        "final_auc": final_eval.get("auc"),
        "final_validation_auc": final_eval.get("validation_auc"),
    }
    if not best:
        reason = (
            "no validation rows (validation-fraction = 0)"
            if settings.data.validation_fraction <= 0
            else "no pooled validation AUC in any round (validation rows of one class only?)"
        )
        return {"round": None, "null_reason": reason, **out}
    return {**best, **out}


def train_ceiling(
    settings: BankAppSettings,
    final_arrays: ArrayRecord | None = None,
    federated_auc: float | None = None,
) -> dict[str, Any]:
    """The centralized ceiling (see the module docstring); ``{"auc": None, "null_reason"}``
    where the pooled data is not reachable. With ``final_arrays`` the federated model is
    compared with it on the same pooled test rows."""
    try:
        banks = load_all_banks(settings.data)
    except (DataError, OSError) as err:
        return {"auc": None, "null_reason": f"pooled data not reachable from the server: {err}"}
    x_all = np.concatenate([b.x_train for b in banks])
    y_all = np.concatenate([b.y_train for b in banks])
    x_te = np.concatenate([b.x_test for b in banks])
    y_te = np.concatenate([b.y_test for b in banks])
    if len(np.unique(y_all)) < 2 or len(np.unique(y_te)) < 2:
        return {"auc": None, "null_reason": "the pooled data holds one class only"}
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_all,
        y_all,
        test_size=CEILING_VALIDATION_FRACTION,
        stratify=y_all,
        random_state=settings.seed,
    )
    model = build_model(x_all.shape[1], settings.model, settings.hidden_units, seed=settings.seed)
    std = x_fit.std(axis=0)
    std[std < 1e-8] = 1.0
    model.set_standardisation(x_fit.mean(axis=0), std)
    cfg = settings.train_config(seed=settings.seed, proximal_mu=0.0)
    best_auc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    started = time.perf_counter()
    log(
        INFO,
        "[bank-risk] centralized ceiling: training on %d pooled rows (%d held for validation), "
        "up to %d epochs with early stopping",
        len(y_fit),
        len(y_val),
        CEILING_MAX_EPOCHS,
    )
    epoch = 0
    for epoch in range(1, CEILING_MAX_EPOCHS + 1):
        # a new shuffle each epoch (train_local seeds its loader from cfg.seed)
        train_local(model, x_fit, y_fit, _with_seed(cfg, settings.seed * 1000 + epoch))
        val_logits = predict_logits(model, x_val)
        val_auc = float(roc_auc_score(y_val, val_logits)) if np.isfinite(val_logits).all() else -1.0
        if val_auc > best_auc:
            best_auc, best_epoch, best_state = val_auc, epoch, copy.deepcopy(model.state_dict())
        if epoch % 5 == 0:
            log(
                INFO,
                "[bank-risk] centralized ceiling: epoch %d, validation AUC %.4f (best %.4f at "
                "epoch %d), %.0fs",
                epoch,
                val_auc,
                best_auc,
                best_epoch,
                time.perf_counter() - started,
            )
        if epoch - best_epoch >= CEILING_PATIENCE:
            break
    # Early stopping picked the number of epochs; the ceiling then trains that long on all
    # pooled training rows (validation rows included), the usual refit, same shuffles.
    val_model = model
    model = build_model(x_all.shape[1], settings.model, settings.hidden_units, seed=settings.seed)
    std = x_all.std(axis=0)
    std[std < 1e-8] = 1.0
    model.set_standardisation(x_all.mean(axis=0), std)
    for refit_epoch in range(1, best_epoch + 1):
        train_local(model, x_all, y_all, _with_seed(cfg, settings.seed * 1000 + refit_epoch))
    logits = predict_logits(model, x_te)
    if not np.isfinite(logits).all():  # the refit diverged: keep the early-stopped model
        val_model.load_state_dict(best_state)
        model, logits = val_model, predict_logits(val_model, x_te)
    metrics = risk_metrics_from_logits(y_te, logits)
    out: dict[str, Any] = {
        "auc": metrics.auc,
        "ks": metrics.ks,
        "label": CEILING_LABEL,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "validation_auc": best_auc,
        "seconds": time.perf_counter() - started,
        "per_bank": {},
        "null_reason": metrics.undefined_reason or None,
    }
    offset = 0
    for bank in banks:
        part = slice(offset, offset + len(bank.y_test))
        offset += len(bank.y_test)
        if len(np.unique(bank.y_test)) == 2:
            out["per_bank"][bank.name] = float(roc_auc_score(bank.y_test, logits[part]))
    log(
        INFO,
        "[bank-risk] centralized ceiling: AUC %s on the pooled test rows (best epoch %d of %d, "
        "%.0fs)",
        f"{metrics.auc:.4f}" if metrics.auc is not None else "n/a",
        best_epoch,
        epoch,
        out["seconds"],
    )
    if final_arrays is not None:
        try:
            fed_model = build_model(x_all.shape[1], settings.model, settings.hidden_units)
            fed_model.load_state_dict(final_arrays.to_torch_state_dict(), strict=True)
            fed_logits = predict_logits(fed_model, x_te)
            cmp = paired_auc_comparison(y_te, fed_logits, logits)
            out["federated_vs_ceiling"] = cmp.as_dict()
            out["explanation"] = ceiling_explanation(cmp.diff, cmp.low, cmp.high, cmp.verdict)
        except Exception as err:  # e.g. a diverged federated model: no paired figure
            log(WARNING, "[bank-risk] federated vs ceiling not compared: %s", err)
            out["explanation"] = ceiling_explanation(
                None
                if federated_auc is None or metrics.auc is None
                else federated_auc - metrics.auc
            )
    return out


def _with_seed(cfg: Any, seed: int) -> Any:
    from dataclasses import replace

    return replace(cfg, epochs=1, seed=seed)


def ceiling_explanation(
    diff: float | None,
    low: float | None = None,
    high: float | None = None,
    verdict: str | None = None,
) -> str:
    """What the committee should read into federated vs ceiling."""
    if diff is None:
        return ""
    ci = f" (95% CI {low:+.4f} to {high:+.4f})" if low is not None and high is not None else ""
    if diff <= 0:
        return f"The federated model is {-diff:.4f} AUC below the centralized ceiling{ci}" + (
            ": within noise." if verdict == NO_DIFFERENCE else "."
        )
    if verdict == GAINS:
        return (
            f"The federated model is {diff:.4f} AUC above the ceiling{ci}, more than noise. "
            "The ceiling is an estimate, not a bound: one SGD run whose length early stopping "
            "chose on a noisy validation split, while averaging bank models acts as a "
            "regulariser and a small ensemble. Read it as: pooling the data would not have "
            "done better."
        )
    return (
        f"The federated model is {diff:.4f} AUC above the ceiling{ci}, within noise: on these "
        "test rows the two are equivalent, i.e. federation reached what pooling the data "
        "gives (the ceiling is one SGD run, its length chosen by early stopping)."
    )


def _f(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def verdict_lines(
    final_eval: dict[str, Any],
    ceiling: dict[str, Any],
    per_bank: dict[str, Any],
    verdicts: dict[str, list[str]],
    settings: BankAppSettings,
    best: dict[str, Any] | None = None,
    warning: str | None = None,
) -> list[str]:
    """The console's closing lines: pooled figures, best round, ceiling, one verdict per bank."""
    auc = final_eval.get("auc")
    lines = [
        f"final pooled AUC {_f(auc)} (Gini {_f(final_eval.get('gini'))}, "
        f"KS {_f(final_eval.get('ks'))})"
        + (
            ": inverted ranking (AUC < 0.5), the KS is a distance in the wrong direction"
            if isinstance(auc, float) and auc < 0.5
            else ""
        )
    ]
    if best:
        lines.append(best_round_line(best))
    if ceiling.get("auc") is not None:
        ratio = auc / ceiling["auc"] if auc is not None and ceiling["auc"] else None
        cmp = ceiling.get("federated_vs_ceiling") or {}
        lines.append(
            f"centralized ceiling AUC {_f(ceiling['auc'])} (pooled data, early stopping "
            f"then refit: {ceiling.get('best_epoch')} epochs, {ceiling.get('epochs_run')} "
            "tried); "
            f"federated / ceiling {_f(ratio, '.3f')}"
            + (f", {cmp['verdict']}" if cmp.get("verdict") else "")
        )
        if auc is not None and auc > ceiling["auc"] and ceiling.get("explanation"):
            lines.append(ceiling["explanation"])
    else:
        lines.append(f"centralized ceiling n/a: {ceiling.get('null_reason')}")
    if warning:
        lines.append(f"WARNING: {warning}")
    n = len(per_bank)
    if verdicts["no verdict"] and len(verdicts["no verdict"]) == n:
        first = next(iter(per_bank.values()), {})
        lines.append(
            f"federated vs local-only per bank: {first.get('verdict_note') or 'not available'}"
        )
    else:
        lines.append(
            "federated vs local-only (paired 95% DeLong on each bank's test rows): "
            + verdict_summary(per_bank)["line"]
        )
    for name, row in per_bank.items():
        ci = row.get("gain_ci")
        text = (
            f"  {name:<34} federated {_f(row.get('federated_auc'))}  local-only "
            f"{_f(row.get('local_only_auc'))}"
        )
        if row.get("verdict") and ci:
            text += f"  gain {row['federation_gain']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]  "
            text += str(row["verdict"]).upper() if row["verdict"] != NO_DIFFERENCE else "n.s."
        if row.get("health"):
            text += f"  ({row['health']})"
        elif row.get("auc_null_reason"):
            text += f"  ({row['auc_null_reason']})"
        lines.append(text)
    return lines


def best_round_line(best: dict[str, Any]) -> str:
    """One line: best round by pooled validation AUC next to the final round."""
    if best.get("round") is None:
        return f"best round: n/a ({best.get('null_reason')})"
    return (
        f"best round by pooled validation AUC: round {best['round']} (validation "
        f"{_f(best.get('validation_auc'))}, test AUC {_f(best.get('auc'))}); final round "
        f"{best.get('final_round')}: validation {_f(best.get('final_validation_auc'))}, test AUC "
        f"{_f(best.get('final_auc'))}"
        + (f"; its model: {best['file']}" if best.get("file") else "")
    )


def app_config_defaults() -> dict[str, Any]:
    """The app's own run-config defaults (``[tool.flwr.app.config]`` of its pyproject.toml),
    so the report can show which keys a run changed; ``{}`` where it cannot be read."""
    try:
        import tomllib  # Python 3.11+; on 3.10 the report just shows every key
    except ImportError:
        return {}
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
        return dict(data["tool"]["flwr"]["app"]["config"])
    except (OSError, KeyError, ValueError):
        return {}
