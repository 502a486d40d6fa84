"""Final AUC of the bank app per (aggregation rule, attack): the robustness table.

Each cell is one run of the real bank app (ServerApp + ClientApp with the attack
mod) on Flower's Ray simulation, in this process (``run_bank_simulation``): 10
banks of the default synthetic data, 2 of them malicious (banks 2 and 7 by
default), every rule told f = 2 (``num-malicious``), except Bulyan, which needs
n >= 4f + 3 and so runs with f = 1 at n = 10 (said in the JSON). Attack strengths
are the app's defaults (``attack-scale`` 10, ``attack-noise-std`` 1,
``attack-ipm-epsilon`` 5, ALIE's z from Baruch et al.'s formula), unless overridden.

    python benchmarks/bench_robustness_table.py \\
        --out benchmarks/results/robustness_table.json           # ~25 min on 2 cores
    python benchmarks/bench_robustness_table.py --rules fedavg,median --attacks none,ipm

Prints JSON (and, with ``--markdown``, a markdown table on stderr) with the final
pooled AUC of every cell, the clean FedAvg reference, and per attack the best
rule and its gap to clean FedAvg.
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
ATTACKS = ("none", "sign-flip", "scaling", "gaussian", "label-flip", "alie", "ipm")


def cell_overrides(rule: str, attack: str, args: argparse.Namespace) -> dict[str, Any]:
    f = min(args.num_malicious, (args.banks - 3) // 4) if rule == "bulyan" else args.num_malicious
    return {
        "num-banks": args.banks,
        "num-server-rounds": args.rounds,
        "aggregation": rule,
        "num-malicious": f,
        "trim-beta": args.trim_beta,
        "attack": attack,
        "malicious-banks": args.malicious if attack != "none" else "",
        "local-only-baseline": False,
        "centralized-baseline": False,
        "seed": args.seed,
        **json.loads(args.extra),
    }


def final_auc(run_dir: Path) -> tuple[float | None, dict[str, Any]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics.get("rounds", [])
    rejected = [r.get("train", {}).get("robust-rejected") for r in rounds]
    info = {
        "status": metrics.get("status"),
        "auc_by_round": [r.get("evaluate", {}).get("auc") for r in rounds],
        "robust_rejected_by_round": rejected,
    }
    return metrics.get("final", {}).get("auc"), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--malicious", default="2,7", help="indices of the malicious banks")
    parser.add_argument("--num-malicious", type=int, default=2, help="f told to the rules")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--trim-beta", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--extra", default="{}", help="JSON of further run-config overrides")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]

    from bank_risk.simulate import run_bank_simulation

    workdir = Path(tempfile.mkdtemp(prefix="robustness-table-"))
    table: dict[str, dict[str, float | None]] = {r: {} for r in rules}
    details: dict[str, dict[str, Any]] = {r: {} for r in rules}
    started = time.perf_counter()
    for attack in attacks:
        for rule in rules:
            overrides = {
                **cell_overrides(rule, attack, args),
                "output-dir": str(workdir),
                "run-name": f"{rule}--{attack}",
            }
            t0 = time.perf_counter()
            try:
                run_dir = run_bank_simulation(overrides)
                auc, info = final_auc(run_dir)
            except Exception as err:  # a failed cell is a result too; keep going
                auc, info = None, {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            info["seconds"] = time.perf_counter() - t0
            info["num_malicious_told"] = overrides["num-malicious"]
            table[rule][attack] = auc
            details[rule][attack] = info
            if args.out:  # partial results survive an interrupted table
                partial = summarise(table, details, rules, attacks, args, started)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(partial, indent=2) + "\n")
            print(
                f"{rule:<18} {attack:<11} AUC {auc if auc is None else round(auc, 4)}  "
                f"({info['seconds']:.0f}s, total {time.perf_counter() - started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )

    result = summarise(table, details, rules, attacks, args, started)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.markdown:
        print(markdown(table, rules, attacks), file=sys.stderr)


def summarise(
    table: dict[str, dict[str, float | None]],
    details: dict[str, dict[str, Any]],
    rules: list[str],
    attacks: list[str],
    args: argparse.Namespace,
    started: float,
) -> dict[str, Any]:
    clean = table.get("fedavg", {}).get("none")
    best: dict[str, Any] = {}
    for attack in attacks:
        scored = [(table[r][attack], r) for r in rules if table[r].get(attack) is not None]
        if scored:
            auc, rule = max(scored)
            best[attack] = {
                "rule": rule,
                "auc": auc,
                "gap_to_clean_fedavg": (clean - auc) if clean is not None else None,
                "fedavg_auc": table.get("fedavg", {}).get(attack),
            }
    return {
        "benchmark": "robustness_table",
        "what": "final pooled test AUC of the bank app, per aggregation rule (rows) and attack",
        "setup": {
            "banks": args.banks,
            "malicious_banks": args.malicious,
            "num_malicious_told": args.num_malicious,
            "bulyan_num_malicious": min(args.num_malicious, (args.banks - 3) // 4),
            "rounds": args.rounds,
            "trim_beta": args.trim_beta,
            "seed": args.seed,
            "extra": json.loads(args.extra),
            "attack_defaults": "attack-scale 10, attack-noise-std 1, attack-ipm-epsilon 5, "
            "ALIE z = z_max(n, f) of Baruch et al. (0.253 for n=10, f=2)",
        },
        "clean_fedavg_auc": clean,
        "table": table,
        "best_per_attack": best,
        "details": details,
        "total_seconds": time.perf_counter() - started,
    }


def markdown(
    table: dict[str, dict[str, float | None]], rules: list[str], attacks: list[str]
) -> str:
    lines = ["| rule | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for rule in rules:
        cells = ["-" if table[rule].get(a) is None else f"{table[rule][a]:.3f}" for a in attacks]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
