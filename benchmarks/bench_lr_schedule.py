"""Local learning-rate schedules of the bank app: constant, cosine, step (run config
``lr-schedule``), on the synthetic default federation and on the UCI table by EDUCATION.

Not run by the test suite. One in-process simulation at a time (2-core machine), the app's
defaults otherwise, without the baselines (they do not depend on the schedule's rounds).
Prints JSON per data set and schedule: final pooled test AUC, the highest test AUC of any
round, the best round by pooled validation AUC and its test AUC, and the mean absolute
round-to-round change of the test AUC over the last 10 rounds (the wobble).

    python benchmarks/bench_lr_schedule.py [--rounds 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "bank_risk"))
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "uci_default_credit_card.csv"
SCHEDULES = ("constant", "cosine", "step")


def summary(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    auc = [r["evaluate"].get("auc") for r in metrics["rounds"]]
    best = metrics.get("best_round") or {}
    return {
        "final_auc": auc[-1],
        "max_test_auc": max(auc),
        "best_round": best.get("round"),
        "best_round_validation_auc": best.get("validation_auc"),
        "best_round_test_auc": best.get("auc"),
        "last10_mean_abs_change": float(np.mean(np.abs(np.diff(auc[-10:])))),
        "learning_rates": [r.get("learning_rate") for r in metrics["rounds"]],
        "auc_by_round": auc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from bank_risk.simulate import run_bank_simulation

    data = {"synthetic": {}}
    if Path(args.csv).is_file():
        data["uci"] = {
            "dataset": "csv",
            "csv-path": str(Path(args.csv).resolve()),
            "num-banks": 3,
            "csv-partition-column": "EDUCATION",
            "csv-partition-values": "1,2,3",
            "csv-drop-columns": "ID",
        }
    work = Path(tempfile.mkdtemp(prefix="bench-lr-schedule-"))
    results: dict = {"rounds": args.rounds}
    for name, config in data.items():
        for schedule in SCHEDULES:
            run_dir = run_bank_simulation(
                {
                    **config,
                    "lr-schedule": schedule,
                    "num-server-rounds": args.rounds,
                    "local-only-baseline": False,
                    "centralized-baseline": False,
                    "output-dir": str(work),
                    "run-name": f"{name}-{schedule}",
                }
            )
            results[f"{name}/{schedule}"] = summary(run_dir)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
