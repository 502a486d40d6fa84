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


def read_run(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics.get("rounds", [])
    aucs = [r.get("evaluate", {}).get("auc") for r in rounds]
    seen = [a for a in aucs if a is not None]
    return {
        "status": metrics.get("status"),
        "final_auc": metrics.get("final", {}).get("auc"),
        "min_auc": min(seen) if seen else None,
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
    args = parser.parse_args()
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


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def summarise(
    cells: list[dict[str, Any]], args: argparse.Namespace, started: float
) -> dict[str, Any]:
    # Clean FedAvg per seed: its final AUC and its own minimum over rounds (early rounds
    # are low for everyone, so a cell's minimum is compared with clean FedAvg's minimum).
    clean = {
        c["seed"]: {"final": c["final_auc"], "min": c["min_auc"]}
        for c in cells
        if c["rule"] == "fedavg" and c["attack"] == "none" and c.get("final_auc") is not None
    }
    # Per (rule, attack, #malicious): worst seed's final and minimum AUC, and gaps to clean.
    table: dict[str, dict[str, Any]] = {}
    for c in cells:
        key = f"{c['attack']}, f={c['num_malicious_banks']}"
        row = table.setdefault(c["rule"], {}).setdefault(
            key, {"final_auc": None, "min_auc": None, "gap_final": None, "gap_min": None}
        )
        if c.get("final_auc") is None:
            continue
        ref = clean.get(c["seed"])
        for what in ("final", "min"):
            auc = c[f"{what}_auc"]
            if row[f"{what}_auc"] is None or auc < row[f"{what}_auc"]:
                row[f"{what}_auc"] = auc
            if ref is not None and auc is not None and ref[what] is not None:
                gap = auc - ref[what]
                if row[f"gap_{what}"] is None or gap < row[f"gap_{what}"]:
                    row[f"gap_{what}"] = gap
    best: dict[str, Any] = {}
    for key in sorted({k for row in table.values() for k in row}):
        scored = [
            (min(row[key]["gap_final"], row[key]["gap_min"]), rule)
            for rule, row in table.items()
            if key in row and row[key]["gap_final"] is not None and row[key]["gap_min"] is not None
        ]
        if scored:
            gap, rule = max(scored)
            best[key] = {"rule": rule, "worst_gap_final_or_min": gap}
    return {
        "benchmark": "robustness_table",
        "what": "pooled test AUC of the bank app per rule and attack: the final round's and the "
        "minimum over rounds, worst over seeds; gaps to clean FedAvg of the same seed",
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
        "table": table,
        "best_per_attack": best,
        "cells": cells,
        "total_seconds": time.perf_counter() - started,
    }


def markdown(result: dict[str, Any]) -> str:
    table = result["table"]
    keys = sorted({k for row in table.values() for k in row})
    lines = [
        "| rule | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for rule, row in table.items():
        cells = []
        for k in keys:
            v = row.get(k)
            if not v or v["final_auc"] is None:
                cells.append("-")
            else:
                cells.append(f"{v['final_auc']:.3f} / {v['min_auc']:.3f}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(final / minimum-over-rounds AUC, worst seed)"


if __name__ == "__main__":
    main()
