"""The robustness table: final and minimum-over-rounds AUC per (rule, attack, f, seed).

Each cell is one run of the real bank app (ServerApp + ClientApp with the attack
mod) on Flower's Ray simulation, in this process (``run_bank_simulation``): 10
banks of the default synthetic data, with 2 or 3 of them malicious
(``--malicious-sets``, default ``2,7`` and ``2,5,7``), every rule told f = the
number of malicious banks (``num-malicious``) except Bulyan, which needs
n >= 4f + 3 and so runs with f = min(f, (n - 3) // 4) (said in the JSON).

Rules are run-config ``aggregation`` names, optionally with overrides after a
colon: ``median:bucket-size=2`` or ``norm-bound:norm-factor=1.5,max-norm=1e9``.
Attacks are ``flower_ext.attacks.ATTACKS``; ``--knowledge all`` gives the
attackers every bank's honest update (the papers' omniscient attacker; each
attacker then trains every bank each round, ~3x slower).

    # the full acceptance table of issue 14 (hours on 2 cores; see README):
    python benchmarks/bench_robustness_table.py --rounds 20 --seeds 42,43 \\
        --knowledge all --out benchmarks/results/robustness_table.json --markdown
    # a small table:
    python benchmarks/bench_robustness_table.py --rules fedavg,median \\
        --attacks none,min-sum --malicious-sets 2,7 --rounds 10 --seeds 42

``--runtime inprocess`` runs each cell on the app's in-process Grid
(``bank_risk.simulate.run_bank_inprocess``: the same ServerApp and ClientApp, no Ray;
same figures as Ray within 0.003 AUC, ``tests/test_inprocess_grid.py``) and
``--jobs N`` runs N cells at once in separate processes: the way to get the full
table in hours instead of a day on 2 cores.

Prints JSON: per cell the final AUC, the minimum AUC over the rounds, what the
rule rejected, and seconds; per rule and (attack, f) the worst seed's final and
minimum AUC and their gaps to clean FedAvg's final and minimum (same seed); per
(attack, f) the best rule by its worse gap; with ``--markdown`` a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "bank_risk"))

RULES = (
    "fedavg",
    "krum",
    "multikrum",
    "median",
    "trimmed-mean",
    "bulyan",
    "geometric-median",
    "centered-clipping",
    "norm-bound",
)
ATTACKS = (
    "none",
    "sign-flip",
    "gaussian",
    "label-flip",
    "alie",
    "ipm",
    "min-max",
    "min-sum",
    "fang-trim",
    "fang-krum",
    "mimic",
    "weight-inflation",
    "poisoned-standardisation",
)


#: Pseudo-attack of the yardstick cells: FedAvg over the honest banks only (the malicious
#: banks crash in training, ``fault-kind = "raise"``, and are left out; they still
#: take part in standardisation and evaluation, as in the attacked cells). No rule can
#: be expected to beat it: it is what perfect detection of the attackers gives.
HONEST_ONLY = "honest-only"

#: Issue 14: no rule the README recommends may lose more than this (final or minimum AUC,
#: against clean FedAvg of the same seed) under any attack.
WORST_RULE_LIMIT = 0.05


def parse_rule(spec: str) -> tuple[str, dict[str, Any]]:
    """``"median:bucket-size=2,trim-beta=0.3"`` -> ``("median", {...})`` (values as JSON)."""
    name, _, rest = spec.partition(":")
    extra: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = item.partition("=")
        try:
            extra[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.strip()] = value
    return name.strip(), extra


def cell_overrides(
    rule_spec: str, attack: str, malicious: str, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    rule, rule_extra = parse_rule(rule_spec)
    f = len([m for m in malicious.split(",") if m.strip()])
    if attack == HONEST_ONLY:  # the yardstick: the malicious banks take no part in training
        return {
            **cell_overrides("fedavg", "none", "", seed, args),
            "num-malicious": 0,
            "fault-banks": malicious,
            "fault-kind": "raise",
            "min-banks": args.banks - f,
        }
    if rule == "bulyan":
        f = min(f, (args.banks - 3) // 4)
    return {
        "num-banks": args.banks,
        "num-server-rounds": args.rounds,
        "aggregation": rule,
        "num-malicious": f,
        "trim-beta": args.trim_beta,
        "attack": attack,
        "malicious-banks": malicious if attack != "none" else "",
        "attack-knowledge": args.knowledge,
        "local-only-baseline": False,
        "centralized-baseline": False,
        "seed": seed,
        **json.loads(args.extra),
        **rule_extra,
    }


def _min_after_first(aucs: list[float | None]) -> float | None:
    """Minimum AUC over rounds 2.. (round 1 starts from the random model and is the
    steepest, most seed-dependent point of every curve)."""
    later = [a for a in aucs[1:] if a is not None]
    return min(later) if later else None


def read_run(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics.get("rounds", [])
    aucs = [r.get("evaluate", {}).get("auc") for r in rounds]
    seen = [a for a in aucs if a is not None]
    return {
        "status": metrics.get("status"),
        "final_auc": metrics.get("final", {}).get("auc"),
        "min_auc": min(seen) if seen else None,
        "min_auc_after_round_1": _min_after_first(aucs),
        "auc_by_round": aucs,
        "robust_rejected_by_round": [r.get("train", {}).get("robust-rejected") for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default=",".join(RULES), help="';'- or ','-separated")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument(
        "--malicious-sets", default="2,7;2,5,7", help="';'-separated sets of malicious banks"
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--trim-beta", type=float, default=0.3)
    parser.add_argument("--knowledge", default="colluders", choices=("colluders", "all"))
    parser.add_argument("--extra", default="{}", help="JSON of run-config overrides (all cells)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--runtime", default="ray", choices=("ray", "inprocess"))
    parser.add_argument("--jobs", type=int, default=1, help="cells at once (--runtime inprocess)")
    parser.add_argument(
        "--no-honest-only",
        action="store_true",
        help="skip the yardstick cells (FedAvg over the honest banks only)",
    )
    parser.add_argument(
        "--table-from",
        help="','-separated JSON files of earlier runs: summarise their cells (a later "
        "file's cell replaces an earlier one of the same rule, attack, set and seed); no runs",
    )
    args = parser.parse_args()
    if args.table_from:
        table_from(args)
        return
    if args.jobs > 1 and args.runtime != "inprocess":
        parser.error("--jobs > 1 needs --runtime inprocess (Ray already uses every core)")
    # Rules may carry ','-separated overrides, so ';' separates rules when present.
    sep = ";" if ";" in args.rules else ","
    rules = [r.strip() for r in args.rules.split(sep) if r.strip()]
    if sep == "," and any(":" in r for r in rules):
        parser.error("separate rules with ';' when a rule carries overrides")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    sets = [s.strip() for s in args.malicious_sets.split(";") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    workdir = Path(tempfile.mkdtemp(prefix="robustness-table-"))
    cells: list[dict[str, Any]] = []
    started = time.perf_counter()
    # Clean FedAvg first (the reference of every gap), then attack by attack.
    plan = [("fedavg", "none", sets[0], seed) for seed in seeds]
    if not args.no_honest_only:
        plan += [("fedavg", HONEST_ONLY, m, seed) for m in sets for seed in seeds]
    for attack in attacks:
        for malicious in sets if attack != "none" else sets[:1]:
            for rule in rules:
                for seed in seeds:
                    if (rule, attack, malicious, seed) not in plan:
                        plan.append((rule, attack, malicious, seed))
    overrides_of = [
        {
            **cell_overrides(rule, attack, malicious, seed, args),
            "output-dir": str(workdir),
            "run-name": f"{index}",
        }
        for index, (rule, attack, malicious, seed) in enumerate(plan)
    ]
    from bank_risk.simulate import run_many

    results = (
        read_run(run_dir) | {"seconds": seconds}
        if run_dir is not None
        else {"status": "failed", "error": error, "seconds": seconds}
        for run_dir, error, seconds in run_many(
            overrides_of, args.runtime, args.jobs, str(workdir) if args.jobs > 1 else ""
        )
    )
    for (rule, attack, malicious, seed), overrides, info in zip(
        plan, overrides_of, results, strict=True
    ):
        num_bad = len([m for m in malicious.split(",") if m.strip()]) if attack != "none" else 0
        cells.append(
            {
                "rule": rule,
                "attack": attack,
                "malicious": malicious if attack != "none" else "",
                "num_malicious_banks": num_bad,
                "num_malicious_told": overrides["num-malicious"],
                "seed": seed,
                **info,
            }
        )
        if args.out:  # partial results survive an interrupted table
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summarise(cells, args, started), indent=2) + "\n")
        print(
            f"{rule:<28} {attack:<25} f={num_bad} seed={seed} final {_r(info.get('final_auc'))} "
            f"min {_r(info.get('min_auc'))} ({cells[-1]['seconds']:.0f}s, "
            f"total {time.perf_counter() - started:.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    result = summarise(cells, args, started)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        print(markdown(result), file=sys.stderr)


#: ``setup`` keys of a JSON output that are this script's arguments of the same name.
SETUP_KEYS = ("banks", "rounds", "trim_beta", "knowledge", "runtime", "extra")


def table_from(args: argparse.Namespace) -> None:
    """Summarise the cells of earlier JSON outputs (``--table-from``)."""
    merged: dict[tuple, dict[str, Any]] = {}
    setups = []
    for name in [p.strip() for p in args.table_from.split(",") if p.strip()]:
        data = json.loads(Path(name).read_text())
        setups.append(data.get("setup", {}))
        for c in data["cells"]:
            merged[(c["rule"], c["attack"], c["malicious"], c["seed"])] = c
    cells = list(merged.values())
    args.seeds = ",".join(str(s) for s in sorted({c["seed"] for c in cells}))
    args.malicious_sets = ";".join(sorted({c["malicious"] for c in cells if c["malicious"]}))
    # The files' setup, not this command's defaults: one value where they agree, all of
    # them (by file) where they differ, so a merge of unlike runs says so.
    differs: dict[str, list[Any]] = {}
    for key in SETUP_KEYS:
        values = [setup[key] for setup in setups if key in setup]
        if not values:
            continue
        if all(value == values[0] for value in values):
            setattr(args, key, json.dumps(values[0]) if key == "extra" else values[0])
        else:
            differs[key] = values
            if key == "extra":
                args.extra = json.dumps({"differs_by_file": values})
    result = summarise(cells, args, time.perf_counter())
    result["setup"]["merged_from"] = args.table_from
    if differs:
        result["setup"]["differs_by_file"] = differs
    result["total_seconds"] = sum(c.get("seconds", 0.0) for c in cells)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result), file=sys.stderr)


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _worst(row: dict[str, Any], key: str, value: float | None) -> None:
    if value is not None and (row[key] is None or value < row[key]):
        row[key] = value


def summarise(
    cells: list[dict[str, Any]], args: argparse.Namespace, started: float
) -> dict[str, Any]:
    # Clean FedAvg per seed: its final AUC and its own minimum over rounds (early rounds
    # are low for everyone, so a cell's minimum is compared with clean FedAvg's minimum).
    clean = {
        c["seed"]: {
            "final": c["final_auc"],
            "min": c["min_auc"],
            "min_after_1": c.get("min_auc_after_round_1", _min_after_first(c["auc_by_round"])),
        }
        for c in cells
        if c["rule"] == "fedavg" and c["attack"] == "none" and c.get("final_auc") is not None
    }
    # The yardstick per (seed, malicious set): FedAvg over the honest banks only.
    honest_only = {
        (c["seed"], c["malicious"]): {"final": c["final_auc"], "min": c["min_auc"]}
        for c in cells
        if c["attack"] == HONEST_ONLY and c.get("final_auc") is not None
    }
    # Per (rule, attack, #malicious): worst seed's final and minimum AUC, and gaps to
    # clean FedAvg and to honest-only FedAvg (same seed, same malicious set).
    table: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c["attack"] == HONEST_ONLY:
            continue
        key = f"{c['attack']}, f={c['num_malicious_banks']}"
        row = table.setdefault(c["rule"], {}).setdefault(
            key,
            {
                "final_auc": None,
                "min_auc": None,
                "gap_final": None,
                "gap_min": None,
                "gap_honest_only_final": None,
                "gap_honest_only_min": None,
                "gap_min_after_1": None,
                # seeds without a result (the run failed, or clean FedAvg of that seed
                # did): the row is then incomplete and never ranked, since its worst
                # seed may be the missing one
                "failed_seeds": [],
            },
        )
        if c.get("final_auc") is None or clean.get(c["seed"]) is None:
            row["failed_seeds"].append(c["seed"])
            continue
        refs = {"gap": clean.get(c["seed"]), "gap_honest_only": None}
        if c["malicious"]:
            refs["gap_honest_only"] = honest_only.get((c["seed"], c["malicious"]))
        for what in ("final", "min"):
            auc = c[f"{what}_auc"]
            _worst(row, f"{what}_auc", auc)
            for name, ref in refs.items():
                if ref is not None and auc is not None and ref[what] is not None:
                    _worst(row, f"{name}_{what}", auc - ref[what])
        later = c.get("min_auc_after_round_1", _min_after_first(c["auc_by_round"]))
        ref = clean.get(c["seed"])
        if later is not None and ref is not None and ref["min_after_1"] is not None:
            _worst(row, "gap_min_after_1", later - ref["min_after_1"])
    best: dict[str, Any] = {}
    for key in sorted({k for row in table.values() for k in row}):
        scored = [
            (min(row[key]["gap_final"], row[key]["gap_min"]), rule)
            for rule, row in table.items()
            if key in row
            and not row[key]["failed_seeds"]
            and row[key]["gap_final"] is not None
            and row[key]["gap_min"] is not None
            # clean FedAvg is the reference of the gaps, not a rule to rank against itself
            and not (rule == "fedavg" and key.startswith("none,"))
        ]
        if scored:
            gap, rule = max(scored)
            cell = table[rule][key]
            to_honest = [cell["gap_honest_only_final"], cell["gap_honest_only_min"]]
            after_1 = [
                min(row[key]["gap_final"], row[key]["gap_min_after_1"])
                for row in table.values()
                if key in row
                and not row[key]["failed_seeds"]
                and row[key]["gap_min_after_1"] is not None
            ]
            worst_gap, worst_rule = min(scored)
            best[key] = {
                "rule": rule,
                "worst_gap_final_or_min": gap,
                "worst_gap_to_honest_only": None if None in to_honest else min(to_honest),
                "best_worst_gap_final_or_min_after_round_1": max(after_1) if after_1 else None,
                # the other goal: no recommended rule loses more than 0.05 anywhere
                "worst_rule": worst_rule,
                "worst_rule_gap_final_or_min": worst_gap,
            }
    return {
        "benchmark": "robustness_table",
        "what": "pooled test AUC of the bank app per rule and attack: the final round's and the "
        "minimum over rounds, worst over seeds; gaps to clean FedAvg of the same seed and to "
        "FedAvg over the honest banks only (same seed and malicious set)",
        "setup": {
            "banks": args.banks,
            "malicious_sets": args.malicious_sets,
            "rounds": args.rounds,
            "seeds": args.seeds,
            "trim_beta": args.trim_beta,
            "knowledge": args.knowledge,
            "runtime": args.runtime,
            "extra": json.loads(args.extra),
            "bulyan_num_malicious": f"min(f, {(args.banks - 3) // 4})",
        },
        "clean_fedavg_auc_by_seed": clean,
        "honest_only_fedavg_auc": {f"{s} / {m}": v for (s, m), v in honest_only.items()},
        "table": table,
        "best_per_attack": best,
        "cells": cells,
        "total_seconds": time.perf_counter() - started,
    }


def _pair(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    if v.get("failed_seeds"):
        return "no result for seed " + ", ".join(str(s) for s in sorted(v["failed_seeds"]))
    if v["final_auc"] is None:
        return "-"
    return f"{v['final_auc']:.3f} / {v['min_auc']:.3f}"


def _gap(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def markdown(result: dict[str, Any]) -> str:
    """One row per (attack, f): each rule's final / minimum AUC (worst seed), then the
    best rule's worse gap to clean FedAvg (the issue's goal: >= -0.01 at f = 2,
    >= -0.02 at f = 3) and its worse gap to FedAvg over the honest banks only."""
    table = result["table"]
    rules = list(table)
    keys = sorted({k for row in table.values() for k in row})
    lines = [
        "| attack | f | "
        + " | ".join(f"{r} final / min" for r in rules)
        + " | best rule: worse gap to clean FedAvg | its gap to honest-only FedAvg"
        + " | best worse gap, minimum over rounds 2.. | worst rule: worse gap |",
        "|---|---|" + "---|" * len(rules) + "---|---|---|---|",
    ]
    for key in keys:
        attack, _, f = key.partition(", f=")
        best = result["best_per_attack"].get(key)
        goal = {"2": -0.01, "3": -0.02}.get(f)
        verdict = "-"
        if best:
            miss = goal is not None and best["worst_gap_final_or_min"] < goal
            verdict = f"{_gap(best['worst_gap_final_or_min'])} ({best['rule']})" + (
                " **misses the goal**" if miss else ""
            )
        honest = _gap(best["worst_gap_to_honest_only"]) if best else "-"
        later = _gap(best.get("best_worst_gap_final_or_min_after_round_1")) if best else "-"
        worst = "-"
        if best and best.get("worst_rule") is not None:
            worst = f"{_gap(best['worst_rule_gap_final_or_min'])} ({best['worst_rule']})"
            if best["worst_rule_gap_final_or_min"] < -WORST_RULE_LIMIT:
                worst += " **over 0.05**"
        lines.append(
            f"| {attack} | {f} | "
            + " | ".join(_pair(table[r].get(key)) for r in rules)
            + f" | {verdict} | {honest} | {later} | {worst} |"
        )
    clean = result["clean_fedavg_auc_by_seed"]
    honest_only = result.get("honest_only_fedavg_auc", {})
    lines.append("")
    lines.append(
        "Clean FedAvg final / min by seed: "
        + ", ".join(f"{s}: {v['final']:.3f} / {v['min']:.3f}" for s, v in clean.items())
        + ". Honest-only FedAvg by seed / malicious set: "
        + ", ".join(f"{k}: {v['final']:.3f} / {v['min']:.3f}" for k, v in honest_only.items())
        + ". (final / minimum-over-rounds AUC, worst seed)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
