"""Secure aggregation on the bank app: cost vs plaintext FedAvg and CKKS, and distributed DP.

Part 1, overhead (10 banks, the ``512,256`` MLP of ~138k parameters): the real bank
app run three ways on the same run config and seed, alternating (plain, secagg, he,
plain, ...) so machine noise hits all: plaintext FedAvg, ``secagg = true`` and
``he = true`` (CKKS). Reported per variant (median over repeats): the server's
federation time (``metrics.json`` ``total_seconds``: standardisation and every round,
without start-up), the mean seconds per round, uplink bytes per bank and round (all
traffic, and train traffic only, which is where the variants differ), the final pooled
AUC; and the ratios against plaintext. The issue's goals: <= 1.5x wall time,
<= 1.2x uplink, |AUC difference| <= 1e-3.

Part 2, privacy at the same epsilon (10 banks, delta 1e-5, every run's noise chosen by
the app for the target epsilon over its rounds): distributed DP over secure aggregation
(``secagg-dp``, central epsilon against the server with ``t`` honest banks) vs
update-level local DP (``dp = "update"``, the same epsilon per bank, against everyone),
same L2 clip; no-DP FedAvg as the reference. Both DP mechanisms draw their noise from
the OS CSPRNG, so repeats differ: the AUCs are reported per repeat and as mean and std.
Run on the 138k MLP (client-level DP with 10 banks and ~138k coordinates leaves both near
chance at epsilon 3; said here, not hidden) and on the logistic-regression model, where
the noise per coordinate is small enough for the difference to show.

The in-process runtime (``bank_risk.simulate.run_bank_inprocess``: the same ServerApp
and ClientApp, every Message serialised as on the wire, the banks one after the other
in this process) is the default; ``--runtime ray`` uses Flower's Ray simulation. One
unrecorded run comes first (imports, caches).

    python benchmarks/bench_secagg.py --out benchmarks/results/secagg.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "apps" / "bank_risk")]

FROZEN = ("feature_mean", "feature_std")  # the standardisation buffers: never trained
COMMON = {"local-only-baseline": False, "centralized-baseline": False}
OVERHEAD_VARIANTS = {"plain": {}, "secagg": {"secagg": True}, "he": {"he": True}}


def dp_variants(epsilon: float, clip: float) -> dict[str, dict[str, Any]]:
    return {
        "no-dp": {},
        "secagg-distributed-dp": {
            "secagg": True,
            "secagg-dp": True,
            "secagg-dp-target-epsilon": epsilon,
            "secagg-dp-clip-norm": clip,
        },
        "update-level-local-dp": {
            "dp": "update",
            "dp-target-epsilon": epsilon,
            "dp-max-grad-norm": clip,
        },
    }


def run_once(overrides: dict[str, Any], runtime: str) -> dict[str, Any]:
    """One app run; its figures from ``metrics.json``."""
    from bank_risk.simulate import run_bank_inprocess, run_bank_simulation

    run = run_bank_inprocess if runtime == "inprocess" else run_bank_simulation
    start = time.perf_counter()
    run_dir = run(overrides)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics["status"] != "finished":
        raise RuntimeError(f"{overrides.get('run-name')}: {metrics.get('error')}")
    rounds = metrics["rounds"]
    banks = int(overrides["num-banks"])
    last = rounds[-1]["train"]
    return {
        "run_dir": str(run_dir),
        "wall_seconds": wall,
        "federation_seconds": metrics["total_seconds"],
        "seconds_per_round": statistics.mean(r["seconds"] for r in rounds),
        "uplink_bytes_per_bank_round": sum(r["bytes_up"] for r in rounds) / banks / len(rounds),
        "uplink_train_bytes_per_bank_round": sum(
            r["bytes_by_type"]["up"].get("train", 0) for r in rounds
        )
        / banks
        / len(rounds),
        "final_auc": metrics["final"].get("auc"),
        "auc_by_round": [r["evaluate"].get("auc") for r in rounds],
        "num_parameters": metrics["model"]["num_parameters"],
        "secagg_dp": {k: v for k, v in last.items() if k.startswith("secagg-dp")} or None,
        "local_dp_epsilon": max(
            (row.get("epsilon") or 0.0 for row in metrics.get("per_bank", {}).values()),
            default=None,
        ),
    }


def model_distance(run_dir: str, reference_dir: str) -> float:
    """L2 distance between two runs' final models, trained arrays only (not the buffers)."""
    import numpy as np

    from flower_ext.runlog import load_checkpoint

    def flat(path: str) -> Any:
        arrays = load_checkpoint(path).arrays
        return np.concatenate(
            [arrays[k].numpy().ravel() for k in arrays if k not in FROZEN], dtype=np.float64
        )

    return float(np.linalg.norm(flat(run_dir) - flat(reference_dir)))


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def overhead(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    config = {
        **COMMON,
        "num-server-rounds": args.rounds,
        "num-banks": args.banks,
        "hidden-units": args.hidden_units,
        "seed": args.seed,
        "output-dir": str(out),
    }
    from flower_ext.crypto import PUBLIC_FILE, SECRET_FILE, write_keys

    # A CKKS key set for the he runs (the app generates one itself only on Ray's grid).
    write_keys(out / "keys")
    he_keys = {
        "he-secret-context": str(out / "keys" / SECRET_FILE),
        "he-public-context": str(out / "keys" / PUBLIC_FILE),
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in OVERHEAD_VARIANTS}
    # One unrecorded plain run first: imports, data generation and caches are paid there.
    run_once({**config, "num-server-rounds": 1, "run-name": "warm-up"}, args.runtime)
    for i in range(args.repeats):
        for name, extra in OVERHEAD_VARIANTS.items():
            keys = he_keys if name == "he" else {}
            overrides = {**config, **extra, **keys, "run-name": f"{name}-{i}"}
            runs[name].append(run_once(overrides, args.runtime))
            print("overhead", name, i, json.dumps(runs[name][-1]), flush=True)
    keys = (
        "wall_seconds",
        "federation_seconds",
        "seconds_per_round",
        "uplink_bytes_per_bank_round",
        "uplink_train_bytes_per_bank_round",
    )
    medians = {v: {k: median_of(r, k) for k in keys} for v, r in runs.items()}
    ratios = {v: {k: medians[v][k] / medians["plain"][k] for k in keys} for v in ("secagg", "he")}
    auc = {v: r[0]["final_auc"] for v, r in runs.items()}
    diff = {v: abs(auc[v] - auc["plain"]) for v in ("secagg", "he")}
    return {
        "config": {k: v for k, v in config.items() if k != "output-dir"},
        "num_parameters": runs["plain"][0]["num_parameters"],
        "runs": runs,
        "median": medians,
        "ratio_over_plain": ratios,
        "final_auc": auc,
        "final_auc_abs_difference": diff,
        "goals_secagg": {
            "wall_ratio_le_1.5": ratios["secagg"]["federation_seconds"] <= 1.5,
            "uplink_ratio_le_1.2": ratios["secagg"]["uplink_bytes_per_bank_round"] <= 1.2,
            "auc_difference_le_1e-3": diff["secagg"] <= 1e-3,
        },
    }


def privacy(
    args: argparse.Namespace, out: Path, model: str, rounds: int, repeats: int
) -> dict[str, Any]:
    config = {
        **COMMON,
        "num-server-rounds": rounds,
        "num-banks": args.banks,
        "model": model,
        "hidden-units": args.hidden_units,
        "seed": args.seed,
        "output-dir": str(out),
    }
    variants = dp_variants(args.epsilon, args.dp_clip_norm)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(repeats):
        for name, extra in variants.items():
            if name == "no-dp" and i > 0:
                continue  # deterministic: one run is the reference
            overrides = {**config, **extra, "run-name": f"{model}-{name}-{i}"}
            runs[name].append(run_once(overrides, args.runtime))
            print("privacy", model, name, i, runs[name][-1]["final_auc"], flush=True)

    reference_dir = runs["no-dp"][0]["run_dir"]
    for name in variants:
        for r in runs[name]:
            r["distance_to_no_dp_model"] = model_distance(r["run_dir"], reference_dir)

    def summary(name: str) -> dict[str, Any]:
        aucs = [r["final_auc"] for r in runs[name]]
        distances = [r["distance_to_no_dp_model"] for r in runs[name]]
        return {
            "final_auc": aucs,
            "mean": statistics.mean(aucs),
            "std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "sem": statistics.stdev(aucs) / len(aucs) ** 0.5 if len(aucs) > 1 else 0.0,
            "mean_distance_to_no_dp_model": statistics.mean(distances),
        }

    table = {name: summary(name) for name in variants}
    reference = table["no-dp"]["mean"]
    for row in table.values():
        row["gap_to_no_dp"] = reference - row["mean"]
    dp_last = runs["secagg-distributed-dp"][0]["secagg_dp"] or {}
    return {
        "config": {k: v for k, v in config.items() if k != "output-dir"},
        "epsilon": args.epsilon,
        "delta": 1e-5,
        "clip_norm": args.dp_clip_norm,
        "num_parameters": runs["no-dp"][0]["num_parameters"],
        "auc": table,
        "distributed_dp_figures": dp_last,
        "local_dp_epsilon_per_bank": runs["update-level-local-dp"][0]["local_dp_epsilon"],
        "distributed_closer_to_no_dp": table["secagg-distributed-dp"]["gap_to_no_dp"]
        < table["update-level-local-dp"]["gap_to_no_dp"],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="overhead runs")
    parser.add_argument("--repeats", type=int, default=3, help="overhead runs per variant")
    parser.add_argument("--hidden-units", default="512,256")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--dp-clip-norm", type=float, default=0.5)
    parser.add_argument("--dp-rounds-mlp", type=int, default=5)
    parser.add_argument("--dp-rounds-logreg", type=int, default=3)
    parser.add_argument("--dp-repeats", type=int, default=5, help="MLP runs per DP variant")
    parser.add_argument("--dp-repeats-logreg", type=int, default=20)
    parser.add_argument("--runtime", choices=("inprocess", "ray"), default="inprocess")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: overhead,dp")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/secagg.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    skip = set(filter(None, args.skip.split(",")))
    out = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "secagg",
        "runtime": args.runtime,
        "command": "python benchmarks/bench_secagg.py " + " ".join(sys.argv[1:]),
        "machine_cpus": os.cpu_count(),
    }
    if "overhead" not in skip:
        result["overhead"] = overhead(args, out)
    if "dp" not in skip:
        result["privacy"] = {
            "mlp": privacy(args, out, "mlp", args.dp_rounds_mlp, args.dp_repeats),
            "logreg": privacy(args, out, "logreg", args.dp_rounds_logreg, args.dp_repeats_logreg),
        }
    result["total_seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    brief = {
        "overhead": {
            k: result["overhead"][k]
            for k in ("median", "ratio_over_plain", "final_auc", "goals_secagg")
        }
        if "overhead" in result
        else None,
        "privacy": {
            m: {k: p[k] for k in ("auc", "distributed_closer_to_no_dp", "distributed_dp_figures")}
            for m, p in result.get("privacy", {}).items()
        },
    }
    for part in brief.get("privacy", {}).values():
        for row in part["auc"].values():
            row.pop("final_auc", None)
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
