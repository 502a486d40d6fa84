"""Non-IID scenarios x federated methods: final AUC, rounds-to-target, worst bank, bytes.

Runs the bank app on Flower's Ray simulation (``run_bank_simulation``; or, with
``--runtime inprocess --jobs N``, on the app's in-process Grid, N runs at once) once per
(scenario, method, local epochs, seed) and prints JSON (stdout, and ``--out``) plus a
markdown table per local-epochs setting: rows = methods, columns = scenarios, cells =

    final pooled test AUC / rounds-to-target / worst bank's AUC / MB up+down

where rounds-to-target is the first round whose pooled test AUC reaches 0.99 x the
scenario's centralized ceiling (the app's ``centralized_auc`` in ``metrics.json``: one
model on the pooled rows, trained to convergence), "never" when no round does.
``--plot FILE.png`` draws each scenario's round-by-round pooled AUC per method.

Scenarios are the synthetic ones of :mod:`flower_ext.data.scenarios` (run config
``scenario``) and real-data splits of the UCI table (skipped when ``../shared/data`` is
not there). Methods are run-config overrides; add one to :data:`METHODS`. A method whose
keys the app does not know (yet) is skipped with a message. Personalisation's per-bank
results (``metrics.json``'s ``personalisation`` block) add the column "banks where the
personalised model beats both the global and the local-only model" (:func:`personalised`).
``--rows-per-bank`` sets the synthetic banks' mean size (each setting gets its own table);
``--table-from a.json,b.json`` prints saved results together.

    python benchmarks/bench_non_iid.py [--scenarios segments,hard] [--methods fedavg,fedprox]
        [--rounds 30] [--seeds 42] [--local-epochs 1,5] [--rows-per-bank 8000]
        [--out FILE.json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "bank_risk"
sys.path.insert(0, str(APP))
UCI = ROOT.parent / "shared" / "data" / "uci_default_credit_card.csv"

#: 0.99 x the centralized ceiling: the issue's target.
TARGET_FRACTION = 0.99

#: Data scenarios: name -> run-config overrides. The synthetic ones are
#: flower_ext.data.scenarios' names; the "uci-*" ones split the real UCI table.
DATA_SCENARIOS: dict[str, dict[str, Any]] = {
    name: {"scenario": name}
    for name in (
        "segments",
        "feature-shift",
        "label-shift",
        "concept-shift",
        "unequal-sizes",
        "hard",
    )
}
#: The UCI table by credit-limit band: a subprime issuer (limits < 50k NTD, 36% defaults)
#: next to mass-market, upper and premium issuers (25%, 17%, 14%); sizes 4.3k to 11k rows.
DATA_SCENARIOS["uci-limit"] = {
    "dataset": "csv",
    "csv-path": str(UCI),
    "csv-drop-columns": "ID",
    "csv-partition-column": "LIMIT_BAL",
    "csv-partition-values": "",
    "csv-partition-edges": "50000,150000,300000",
    "num-banks": 4,
}

#: Methods: name -> run-config overrides. Keys the app does not know yet are skipped.
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"proximal-mu": 0.1},
    "fedavgm": {"server-momentum": 0.5},
    # eta 0.1: the best of 0.01 / 0.03 / 0.1 on `hard` (30 rounds, seed 42)
    "fedadam": {"server-optimizer": "adam", "server-learning-rate": 0.1},
    "fedyogi": {"server-optimizer": "yogi", "server-learning-rate": 0.1},
    "scaffold": {"scaffold": True},
    "fednova": {"fednova": True},
    "fednova+adam": {"fednova": True, "server-optimizer": "adam", "server-learning-rate": 0.1},
    # FedAvg's global model, then each bank fine-tunes it and recalibrates its intercept
    "fedavg+personalised": {"personalisation": "finetune+intercept"},
    # FedAvg's global model mixed with each bank's local-only model, the weight chosen on
    # the bank's validation rows (Mansour et al. 2020's model interpolation)
    "fedavg+mix": {"personalisation": "mix"},
    "fedavg+finetune+mix": {"personalisation": "finetune+mix"},
    # the same with up to 20 fine-tuning epochs (patience 3) instead of 5 (patience 2)
    "fedavg+finetune20+mix": {
        "personalisation": "finetune+mix",
        "personalisation-epochs": 20,
        "personalisation-patience": 3,
    },
    # FedNova + FedAdam's global model (the best on `hard`), fine-tuned and mixed
    "fednova+adam+finetune+mix": {
        "fednova": True,
        "server-optimizer": "adam",
        "server-learning-rate": 0.1,
        "personalisation": "finetune+mix",
    },
    "fednova+adam+personalised": {
        "fednova": True,
        "server-optimizer": "adam",
        "server-learning-rate": 0.1,
        "personalisation": "finetune+intercept",
    },
}


def app_config() -> dict[str, Any]:
    """The app's run config with its defaults (``[tool.flwr.app.config]``)."""
    project = tomllib.loads((APP / "pyproject.toml").read_text())
    return dict(project["tool"]["flwr"]["app"]["config"])


def known_keys() -> set[str]:
    """The app's run-config keys; Flower refuses any other."""
    return set(app_config())


def rounds_to_target(curve: list[float | None], ceiling: float | None) -> int | None:
    """First round (1-based) whose pooled AUC >= TARGET_FRACTION x ceiling; None: never."""
    if ceiling is None:
        return None
    for i, auc in enumerate(curve, start=1):
        if auc is not None and auc >= TARGET_FRACTION * ceiling:
            return i
    return None


def oscillation(curve: list[float | None]) -> dict[str, float | None]:
    """How much the pooled AUC wobbles over the last half of the rounds: the mean absolute
    round-to-round change, the largest drop, and the final AUC's distance to the best."""
    values = [v for v in curve if v is not None]
    tail = values[len(values) // 2 :]
    steps = [b - a for a, b in itertools.pairwise(tail)]
    if not steps:
        return {"mean_abs_step": None, "max_drop": None, "below_best": None}
    return {
        "mean_abs_step": statistics.fmean(abs(s) for s in steps),
        "max_drop": max(0.0, -min(steps)),
        "below_best": max(values) - values[-1],
    }


def personalised(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The personalisation hook: from ``metrics.json``'s ``personalisation`` block, the banks
    where the personalised model beats both the global and the local-only model (a
    significant gain over each), and the worst bank's personalised AUC; None when the run
    did not personalise."""
    block = metrics.get("personalisation") or {}
    if not block:
        return None
    rows = block.get("per_bank") or {}
    aucs = [r.get("personalised_auc") for r in rows.values() if r.get("personalised_auc")]
    return {
        "mode": block.get("mode"),
        "banks_beating_both": block.get("banks_beating_both"),
        "banks": block.get("banks"),
        "banks_answered": block.get("banks_answered"),
        "failed": block.get("failed") or {},
        "names": block.get("banks_beating_both_names"),
        # synthetic banks: where the generator's true risk itself beats both significantly
        "banks_reachable": block.get("banks_reachable"),
        "reachable_names": block.get("banks_reachable_names"),
        "worst_bank_personalised_auc": min(aucs) if aucs else None,
        "per_bank_personalised_auc": {b: r.get("personalised_auc") for b, r in rows.items()},
        "per_bank": {b: bank_figures(r) for b, r in rows.items()},
    }


def bank_figures(row: dict[str, Any]) -> dict[str, Any]:
    """One bank's personalisation figures, as the server checked them: test rows, the
    three AUCs, both paired 95% intervals, and the mixture weight (``mix`` modes); on
    synthetic banks the generator's true-risk AUC and its two intervals too."""
    bayes = row.get("bayes") or {}
    return {
        "test_rows": row.get("num_test_examples"),
        "global_auc": row.get("global_auc"),
        "personalised_auc": row.get("personalised_auc"),
        "local_only_auc": row.get("local_only_auc"),
        "vs_global_ci": (row.get("vs_global") or {}).get("ci"),
        "vs_local_only_ci": (row.get("vs_local_only") or {}).get("ci"),
        "beats_both": row.get("beats_both"),
        "mix_alpha": (row.get("mix") or {}).get("alpha"),
        "bayes_auc": bayes.get("auc"),
        "bayes_vs_global_ci": (bayes.get("vs_global") or {}).get("ci"),
        "bayes_vs_local_only_ci": (bayes.get("vs_local_only") or {}).get("ci"),
        "bayes_beats_both": bayes.get("beats_both"),
    }


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """One run's figures from its ``metrics.json``."""
    curve = [r.get("evaluate", {}).get("auc") for r in metrics["rounds"]]
    ceiling = metrics.get("centralized_auc")
    per_bank = metrics.get("per_bank") or {}
    fed = {b: r.get("federated_auc") for b, r in per_bank.items()}
    local = {b: r.get("local_only_auc") for b, r in per_bank.items()}
    worst = min((a, b) for b, a in fed.items() if a is not None) if fed else (None, None)
    gaps = {b: fed[b] - local[b] for b in fed if fed[b] is not None and local[b] is not None}
    verdicts = [r.get("verdict") for r in per_bank.values()]
    bytes_total = sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in metrics["rounds"])
    return {
        "final_auc": metrics["final"].get("auc"),
        "best_auc": max((v for v in curve if v is not None), default=None),
        "centralized_auc": ceiling,
        "rounds_to_target": rounds_to_target(curve, ceiling),
        "worst_bank": worst[1],
        "worst_bank_auc": worst[0],
        "per_bank_auc": fed,
        "per_bank_ceiling_auc": {b: r.get("ceiling_auc") for b, r in per_bank.items()},
        "per_bank_gain_vs_local": gaps,
        "banks_federation_gains": verdicts.count("gains"),
        "banks_local_better": sum(1 for b, g in gaps.items() if g < 0),
        "bytes_up_down": bytes_total,
        "oscillation": oscillation(curve),
        "personalised": personalised(metrics),
        "auc_curve": curve,
    }


def read_one(scenario: str, method: str, run_dir: Path, seconds: float) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "scenario": scenario,
        "method": method,
        "seconds": seconds,
        "run_dir": str(run_dir),
        **summarise(metrics),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def cell(runs: list[dict[str, Any]]) -> str:
    """A table cell over seeds: means, and every seed's rounds-to-target."""
    auc = _mean([r["final_auc"] for r in runs])
    worst = _mean([r["worst_bank_auc"] for r in runs])
    mb = _mean([r["bytes_up_down"] / 1e6 for r in runs])
    rtt = "/".join(str(r["rounds_to_target"] or "never") for r in runs)
    text = f"{auc:.3f} / {rtt} / {worst:.3f} / {mb:.1f}"
    pers = [(r, r["personalised"]) for r in runs if r["personalised"]]
    if pers:
        text += " / " + "/".join(
            f"{p['banks_beating_both']} sig, {point_wins(r)} pt"
            f"{reachable_text(p)}{failed_text(p)} of {p['banks']}"
            for r, p in pers
        )
    return text


def failed_text(pers: dict[str, Any]) -> str:
    """``", N failed"`` when banks did not answer the personalise query (their reasons are
    in the JSON's ``failed``): a count of 0 from banks that never answered is no result."""
    failed = pers.get("failed") or {}
    return f", {len(failed)} failed" if failed else ""


def reachable_text(pers: dict[str, Any]) -> str:
    """``", N reachable"``: banks where the generator's true risk itself beats both the
    global and the local-only model significantly (where there is room for a personalised
    model to show a gain; a yardstick, not a cap); "" for real data or runs saved before it."""
    reach = pers.get("banks_reachable")
    return f", {reach} reachable" if reach is not None else ""


def point_wins(row: dict[str, Any]) -> int:
    """Banks whose personalised AUC is above both the global (federated) and the local-only
    AUC as point estimates (no interval): what "beats" means without significance."""
    pers = (row.get("personalised") or {}).get("per_bank_personalised_auc") or {}
    fed, gain = row.get("per_bank_auc") or {}, row.get("per_bank_gain_vs_local") or {}
    wins = 0
    for bank, auc in pers.items():
        if auc is None or fed.get(bank) is None or gain.get(bank) is None:
            continue
        local = fed[bank] - gain[bank]
        wins += int(auc > fed[bank] and auc > local)
    return wins


def tables(rows: list[dict[str, Any]], scenarios: list[str], methods: list[str]) -> str:
    """One markdown table per (local epochs, rows per bank) setting. A row saved before
    ``--rows-per-bank`` existed counts as the app's default (2000 then and now)."""
    out = []
    sizes = sorted({r.get("rows_per_bank", 2000) for r in rows})
    for epochs, size in itertools.product(sorted({r["local_epochs"] for r in rows}), sizes):
        subset = [
            r for r in rows if r["local_epochs"] == epochs and r.get("rows_per_bank", 2000) == size
        ]
        if not subset:
            continue
        ceilings = {
            s: _mean([r["centralized_auc"] for r in subset if r["scenario"] == s])
            for s in scenarios
        }
        shown = [s for s in scenarios if any(r["scenario"] == s for r in subset)]
        out.append(
            f"local-epochs = {epochs}, rows-per-bank = {size}; cell: final pooled AUC / rounds to "
            f"{TARGET_FRACTION} x centralized / worst bank's AUC / MB up+down"
            " (/ personalised: banks where the personalised model beats both the global and"
            " the local-only model, with a significant gain / as point estimates)\n"
        )
        out.append("| method | " + " | ".join(shown) + " |")
        out.append("| --- |" + " --- |" * len(shown))
        out.append(
            "| *centralized ceiling* | "
            + " | ".join(f"{ceilings[s]:.3f}" if ceilings[s] else "n/a" for s in shown)
            + " |"
        )
        for method in methods:
            cells = []
            for s in shown:
                runs = [r for r in subset if r["scenario"] == s and r["method"] == method]
                cells.append(cell(runs) if runs else "-")
            if any(c != "-" for c in cells):
                out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def personalised_table(rows: list[dict[str, Any]], scenarios: list[str], methods: list[str]) -> str:
    """The personalisation count alone: rows = (method, rows per bank), columns = scenarios,
    cell = banks where the personalised model beats both the global and the local-only
    model with a significant gain (both paired 95% DeLong lower bounds > 0) / as point
    estimates / of the banks, the median test rows per bank in brackets; "" without
    personalised rows."""
    pers = [r for r in rows if r.get("personalised")]
    if not pers:
        return ""
    shown = [s for s in scenarios if any(r["scenario"] == s for r in pers)]
    out = [
        "banks where the personalised model beats both the global and the local-only model: "
        "significant (both paired 95% DeLong lower bounds > 0) / point estimate / banks "
        "[median test rows per bank]\n",
        "| method | rows-per-bank | " + " | ".join(shown) + " |",
        "| --- | --- |" + " --- |" * len(shown),
    ]
    sizes = sorted({r.get("rows_per_bank", 2000) for r in pers})
    for method, size in itertools.product(methods, sizes):
        cells = []
        for s in shown:
            runs = [
                r
                for r in pers
                if r["scenario"] == s and r["method"] == method
                and r.get("rows_per_bank", 2000) == size
            ]  # fmt: skip
            cells.append(" ; ".join(count_cell(r) for r in runs) if runs else "-")
        if any(c != "-" for c in cells):
            out.append(f"| {method} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def count_cell(row: dict[str, Any]) -> str:
    """``sig / pt / banks [median test rows]`` of one run."""
    p = row["personalised"]
    tests = [b.get("test_rows") for b in (p.get("per_bank") or {}).values()]
    tests = [t for t in tests if t]
    median = f" [{statistics.median(tests):.0f}]" if tests else ""
    counts = f"{p['banks_beating_both']} / {point_wins(row)} / {p['banks']}"
    return counts + median + reachable_text(p) + failed_text(p)


def merge_saved(saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Several saved results as one: their rows in order, scenarios and methods in order
    of first appearance (``--table-from a.json,b.json``)."""
    scenarios: dict[str, None] = {}
    methods: dict[str, None] = {}
    rows: list[dict[str, Any]] = []
    for one in saved:
        scenarios.update(dict.fromkeys(one["scenarios"]))
        methods.update(dict.fromkeys(one["methods"]))
        rows.extend(one["rows"])
    return {"scenarios": list(scenarios), "methods": list(methods), "rows": rows}


def plot(rows: list[dict[str, Any]], scenarios: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in scenarios if any(r["scenario"] == s for r in rows)]
    cols = min(3, len(shown))
    nrows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    epochs_seen = sorted({r["local_epochs"] for r in rows})
    colours: dict[str, str] = {}
    for ax, scenario in zip(axes.flat, shown, strict=False):
        runs = [r for r in rows if r["scenario"] == scenario]
        for r in runs:
            if r["seed"] != runs[0]["seed"]:
                continue  # one seed per curve keeps the wobble visible
            colour = colours.setdefault(r["method"], f"C{len(colours)}")
            style = styles[epochs_seen.index(r["local_epochs"]) % len(styles)]
            curve = r["auc_curve"]
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                style,
                color=colour,
                label=f"{r['method']} E={r['local_epochs']}",
                linewidth=1.3,
            )
        ceiling = _mean([r["centralized_auc"] for r in runs])
        if ceiling:
            ax.axhline(ceiling, color="black", linewidth=0.8, label="centralized")
            ax.axhline(TARGET_FRACTION * ceiling, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(scenario)
        ax.set_xlabel("round")
        ax.set_ylabel("pooled test AUC")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(DATA_SCENARIOS))
    parser.add_argument("--methods", default="fedavg,fedprox,fedavgm")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="42", help="comma-separated seeds")
    parser.add_argument("--local-epochs", default="1", help="comma-separated, e.g. 1,5")
    parser.add_argument("--banks", type=int, default=5, help="synthetic scenarios' banks")
    parser.add_argument(
        "--rows-per-bank",
        type=int,
        default=0,
        help="synthetic banks' mean rows (run config rows-per-bank; 0 = the app's default)",
    )
    parser.add_argument("--out", default="", help="write the JSON here too")
    parser.add_argument("--plot", default="", help="round-by-round AUC curves (PNG)")
    parser.add_argument(
        "--table-from", default="", help="print the tables of saved JSON files (comma-separated)"
    )
    parser.add_argument("--runtime", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (--runtime inprocess)")
    args = parser.parse_args()
    if args.jobs > 1 and args.runtime != "inprocess":
        parser.error("--jobs > 1 needs --runtime inprocess (Ray already uses every core)")
    if args.table_from:  # re-render finished runs' tables (and curves) without running
        saved = merge_saved([json.loads(Path(f).read_text()) for f in args.table_from.split(",")])
        print(tables(saved["rows"], saved["scenarios"], saved["methods"]))
        print(personalised_table(saved["rows"], saved["scenarios"], saved["methods"]))
        if args.plot:
            plot(saved["rows"], saved["scenarios"], args.plot)
        return

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, table, what in (
        (scenarios, DATA_SCENARIOS, "scenario"),
        (methods, METHODS, "method"),
    ):
        unknown = [n for n in name if n not in table]
        if unknown:
            parser.error(f"unknown {what}(s) {unknown}; known: {list(table)}")
    keys = known_keys()
    skipped: dict[str, str] = {}
    for method in list(methods):
        missing = sorted(set(METHODS[method]) - keys)
        if missing:
            skipped[method] = f"the app has no run-config key(s) {missing} yet"
            print(f"[bench] skipping {method}: {skipped[method]}", file=sys.stderr)
            methods.remove(method)
    if "uci-limit" in scenarios and not UCI.is_file():
        skipped["uci-limit"] = f"{UCI} not found"
        print(f"[bench] skipping uci-limit: {skipped['uci-limit']}", file=sys.stderr)
        scenarios.remove("uci-limit")

    from bank_risk.simulate import run_many

    rows_per_bank = args.rows_per_bank or int(app_config()["rows-per-bank"])
    output = Path(tempfile.mkdtemp(prefix="bench-noniid-"))
    plan = [
        (epochs, seed, scenario, method)
        for epochs in [int(e) for e in args.local_epochs.split(",")]
        for seed in [int(s) for s in args.seeds.split(",")]
        for scenario in scenarios
        for method in methods
    ]
    overrides_of = [
        {
            "num-server-rounds": args.rounds,
            "num-banks": args.banks,
            **({"rows-per-bank": args.rows_per_bank} if args.rows_per_bank else {}),
            "local-epochs": epochs,
            "seed": seed,
            "local-only-baseline": True,
            "centralized-baseline": True,
            "run-name": f"{scenario}-{method}-e{epochs}-s{seed}-r{rows_per_bank}",
            "output-dir": str(output),
            **DATA_SCENARIOS[scenario],
            **METHODS[method],
        }
        for epochs, seed, scenario, method in plan
    ]
    rows: list[dict[str, Any]] = []
    results = run_many(overrides_of, args.runtime, args.jobs, str(output) if args.jobs > 1 else "")
    for (epochs, seed, scenario, method), (run_dir, error, seconds) in zip(
        plan, results, strict=True
    ):
        if run_dir is None:
            skipped[f"{scenario}-{method}-e{epochs}-s{seed}"] = f"run failed: {error}"
            print(f"[bench] {scenario} {method}: FAILED {error}", file=sys.stderr, flush=True)
            continue
        row = {"local_epochs": epochs, "seed": seed, "rows_per_bank": rows_per_bank} | read_one(
            scenario, method, run_dir, seconds
        )
        rows.append(row)
        brief = {k: v for k, v in row.items() if k not in ("auc_curve",)}
        print(json.dumps(brief), file=sys.stderr, flush=True)
    result = {
        "benchmark": "non_iid",
        "rounds": args.rounds,
        "banks": args.banks,
        "rows_per_bank": rows_per_bank,
        "seeds": args.seeds,
        "local_epochs": args.local_epochs,
        "runtime": args.runtime,
        "target": f"{TARGET_FRACTION} x centralized_auc",
        "methods": {m: METHODS[m] for m in methods},
        "scenarios": {s: DATA_SCENARIOS[s] for s in scenarios},
        "skipped": skipped,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print(tables(rows, scenarios, methods), file=sys.stderr)
    print(personalised_table(rows, scenarios, methods), file=sys.stderr)
    if args.plot:
        plot(rows, scenarios, args.plot)
        print(f"[bench] curves: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
