"""Does top-k compression cost accuracy? The bank app, dense vs top-k, same rounds.

Each run is the real bank app on Flower's Ray simulation (``run_bank_simulation``):
10 banks, the MLP widened to "512,256" (~137k parameters, so the payload and not
the message envelope decides the bytes), the same seed and rounds. Rows: dense;
top-k 1% with error feedback; top-k 1% without error feedback; top-k 0.1% with
error feedback, with and without error feedback; top-k 1% with int8 values
(values float16 unless said or ``--values``).

The app draws the initial model from torch's global RNG in the ServerApp, which
runs in this process: the benchmark seeds it before every run, so every row
starts from the same model (round 1 of the runs with and without error
feedback, where no residual exists yet, must then agree exactly).

Bytes are read from each run's ``metrics.json``: ``bytes_by_type.up.train`` is the
serialized size of the train replies (the compressed uplink); ``bytes_up`` also
counts evaluate replies (score histograms, the same for every row).

    python benchmarks/bench_topk_learning.py [--rounds 12] [--banks 10]

Prints JSON and writes benchmarks/results/topk_learning.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "apps" / "bank_risk")]

CONFIGS = {
    "dense": {"topk-ratio": 0.0},
    "topk-1%-ef": {"topk-ratio": 0.01, "topk-error-feedback": True},
    "topk-1%-no-ef": {"topk-ratio": 0.01, "topk-error-feedback": False},
    "topk-0.1%-ef": {"topk-ratio": 0.001, "topk-error-feedback": True},
    "topk-0.1%-no-ef": {"topk-ratio": 0.001, "topk-error-feedback": False},
    "topk-1%-ef-int8": {"topk-ratio": 0.01, "topk-error-feedback": True, "topk-values": "int8"},
}


def summarise(name: str, metrics: dict, seconds: float) -> dict:
    rounds = metrics["rounds"]
    train_up = sum(r["bytes_by_type"]["up"].get("train", 0) for r in rounds)
    return {
        "config": name,
        "status": metrics["status"],
        "final_auc": metrics["final"].get("auc"),
        "final_ks": metrics["final"].get("ks"),
        "auc_by_round": [r["evaluate"].get("auc") for r in rounds],
        "train_uplink_bytes": train_up,
        "train_uplink_bytes_per_reply": train_up
        / max(1, sum(r["clients"]["accepted"] for r in rounds)),
        "total_uplink_bytes": sum(r["bytes_up"] for r in rounds),
        "total_downlink_bytes": sum(r["bytes_down"] for r in rounds),
        "num_parameters": metrics.get("model", {}).get("num_parameters"),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--hidden-units", default="512,256")
    parser.add_argument("--values", default="float16", choices=["float32", "float16", "int8"])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial model")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/topk_learning.json"))
    args = parser.parse_args()

    import torch

    from bank_risk.simulate import run_bank_simulation

    rows = []
    with tempfile.TemporaryDirectory(prefix="topk-learning-") as tmp:
        for name in args.configs.split(","):
            overrides = {
                "num-server-rounds": args.rounds,
                "num-banks": args.banks,
                "hidden-units": args.hidden_units,
                "local-only-baseline": False,
                "centralized-baseline": False,
                "output-dir": tmp,
                "run-name": name.replace("%", "pct"),
                "topk-values": args.values,
                **CONFIGS[name],
            }
            torch.manual_seed(args.seed)  # the same initial model for every row
            start = time.perf_counter()
            run_dir = run_bank_simulation(overrides)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append(summarise(name, metrics, time.perf_counter() - start))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    dense = next((r for r in rows if r["config"] == "dense"), None)
    for r in rows:
        if dense and r["final_auc"] is not None and dense["final_auc"] is not None:
            r["auc_minus_dense"] = r["final_auc"] - dense["final_auc"]
            r["train_uplink_reduction_x"] = dense["train_uplink_bytes"] / r["train_uplink_bytes"]
    result = {
        "benchmark": "topk_learning",
        "rounds": args.rounds,
        "banks": args.banks,
        "hidden_units": args.hidden_units,
        "values": args.values,
        "initial_model_seed": args.seed,
        "targets": "top-k 1% + EF within 0.005 AUC of dense; >= 100x fewer train uplink bytes "
        "for <= 0.005 AUC loss",
        "table": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
