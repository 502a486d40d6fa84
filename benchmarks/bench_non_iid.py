"""Final AUC against heterogeneity, with and without FedProx and server momentum (FedAvgM).

Runs the bank app on Flower's Ray simulation for each heterogeneity level and
mitigation, and prints JSON (plus a markdown table on stderr).

    python benchmarks/bench_non_iid.py [--rounds 20] [--banks 5] [--levels 0,0.5,0.8,1]
        [--local-epochs 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "bank_risk"))

MITIGATIONS = {
    "fedavg": {},
    "fedprox(mu=0.1)": {"proximal-mu": 0.1},
    "fedavgm(beta=0.5)": {"server-momentum": 0.5},
    "fedprox+fedavgm": {"proximal-mu": 0.1, "server-momentum": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--levels", default="0,0.5,0.8,1")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from bank_risk.simulate import run_bank_simulation

    output = Path(tempfile.mkdtemp(prefix="bench-noniid-"))
    rows = []
    for level in [float(v) for v in args.levels.split(",")]:
        for name, extra in MITIGATIONS.items():
            run_dir = run_bank_simulation(
                {
                    "num-server-rounds": args.rounds,
                    "num-banks": args.banks,
                    "heterogeneity": level,
                    "local-epochs": args.local_epochs,
                    "local-only-baseline": False,
                    "centralized-baseline": name == "fedavg",
                    "output-dir": str(output),
                    "run-name": f"h{level}-{name.split('(')[0]}",
                    **extra,
                }
            )
            metrics = json.loads((run_dir / "metrics.json").read_text())
            curve = [r["evaluate"].get("auc") for r in metrics["rounds"]]
            rows.append(
                {
                    "heterogeneity": level,
                    "local-epochs": args.local_epochs,
                    "mitigation": name,
                    "final_auc": metrics["final"].get("auc"),
                    "auc_round_5": curve[4] if len(curve) > 4 else None,
                    "centralized_auc": metrics["centralized_auc"],
                    "auc_curve": curve,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "benchmark": "non_iid",
        "rounds": args.rounds,
        "banks": args.banks,
        "local_epochs": args.local_epochs,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
