"""Privacy-utility table: final AUC of the bank app at target epsilon 1, 3, 8 and inf.

Each run is the real bank app on Flower's Ray simulation (``run_bank_simulation``),
with ``dp = "dp-sgd"`` and ``dp-target-epsilon = eps`` (noise chosen so each bank
spends at most eps over the whole run, delta = 1e-5), or DP off for eps = inf.
Runs are sequential. Prints JSON and writes benchmarks/results/dp_privacy_utility.json.

    python benchmarks/bench_dp_utility.py [--rounds 20] [--banks 5] [--epsilons 1,3,8,inf]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "apps" / "bank_risk")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epsilons", default="1,3,8,inf")
    parser.add_argument("--model", default="mlp", help="the app's model: mlp or logreg")
    parser.add_argument(
        "--dp-batch-size", type=int, default=0, help="batch size of the DP runs (0: app default)"
    )
    parser.add_argument(
        "--dp-learning-rate", type=float, default=0.0, help="DP runs learning rate (0: default)"
    )
    parser.add_argument(
        "--output", default=str(ROOT / "benchmarks/results/dp_privacy_utility.json")
    )
    args = parser.parse_args()

    from bank_risk.simulate import run_bank_simulation

    out_dir = Path(tempfile.mkdtemp(prefix="bench-dp-utility-"))
    base = {
        "num-server-rounds": args.rounds,
        "num-banks": args.banks,
        "local-epochs": args.local_epochs,
        "model": args.model,
        "local-only-baseline": False,
        "centralized-baseline": False,
        "output-dir": str(out_dir),
    }
    rows = []
    for text in args.epsilons.split(","):
        eps = float(text)
        overrides = dict(base, **{"run-name": f"eps-{text}"})
        if math.isfinite(eps):
            overrides.update(
                {
                    "dp": "dp-sgd",
                    "dp-target-epsilon": eps,
                    "dp-delta": args.delta,
                    "dp-max-grad-norm": args.max_grad_norm,
                }
            )
            # DP-SGD wants larger batches (less noise per example) and larger steps.
            overrides.update({"batch-size": args.dp_batch_size} if args.dp_batch_size else {})
            overrides.update(
                {"learning-rate": args.dp_learning_rate} if args.dp_learning_rate else {}
            )
        start = time.perf_counter()
        run_dir = run_bank_simulation(overrides)
        seconds = time.perf_counter() - start
        metrics = json.loads((run_dir / "metrics.json").read_text())
        per_bank = metrics.get("per_bank", {})
        last = metrics["rounds"][-1].get("privacy", {}) if metrics["rounds"] else {}
        rows.append(
            {
                "target_epsilon": eps if math.isfinite(eps) else "inf",
                "final_auc": metrics["final"].get("auc"),
                "final_ks": metrics["final"].get("ks"),
                "max_bank_epsilon": max(
                    (r["epsilon"] for r in per_bank.values() if r.get("epsilon") is not None),
                    default=None,
                ),
                "noise_multipliers": sorted(
                    {round(r["noise_multiplier"], 4) for r in last.values() if "epsilon" in r}
                ),
                "banks_refused": sum(1 for r in per_bank.values() if r.get("privacy_refused")),
                "status": metrics["status"],
                "seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ref = next((r["final_auc"] for r in rows if r["target_epsilon"] == "inf"), None)
    for r in rows:
        r["auc_drop_vs_no_dp"] = (
            ref - r["final_auc"] if ref is not None and r["final_auc"] is not None else None
        )
    result = {
        "benchmark": "dp_privacy_utility",
        "rounds": args.rounds,
        "banks": args.banks,
        "local_epochs": args.local_epochs,
        "delta": args.delta,
        "max_grad_norm": args.max_grad_norm,
        "model": args.model,
        "dp_batch_size": args.dp_batch_size or None,
        "dp_learning_rate": args.dp_learning_rate or None,
        "guarantee": "sample-level (one customer row) (epsilon, delta)-DP per bank, whole run",
        "table": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
