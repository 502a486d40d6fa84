"""Wall time of the bank app (extension features off) vs a plain Flower FedAvg app.

Both run on Flower's Ray simulation in this process, on the same synthetic banks,
model and run config; runs alternate (plain, ext, plain, ext, ...) so machine
noise hits both. Prints JSON with the median wall times and their ratio.

    python benchmarks/bench_app_overhead.py [--rounds 10] [--banks 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "apps" / "bank_risk"), str(ROOT / "benchmarks")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import plain_flower_app

    from bank_risk.simulate import run_bank_simulation

    out = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    overrides = {
        "num-server-rounds": args.rounds,
        "num-banks": args.banks,
        "local-only-baseline": False,
        "centralized-baseline": False,
        "output-dir": str(out),
    }
    times: dict[str, list[float]] = {"plain_flower_fedavg": [], "flower_ext_bank_app": []}
    for i in range(args.repeats):
        start = time.perf_counter()
        run_bank_simulation(
            {**overrides, "run-name": f"plain-{i}"},
            server_app=plain_flower_app.server_app,
            client_app=plain_flower_app.client_app,
        )
        times["plain_flower_fedavg"].append(time.perf_counter() - start)
        start = time.perf_counter()
        run_bank_simulation({**overrides, "run-name": f"ext-{i}"})
        times["flower_ext_bank_app"].append(time.perf_counter() - start)
    plain = statistics.median(times["plain_flower_fedavg"])
    ext = statistics.median(times["flower_ext_bank_app"])
    print(
        json.dumps(
            {
                "benchmark": "app_overhead",
                "rounds": args.rounds,
                "banks": args.banks,
                "repeats": args.repeats,
                "seconds": times,
                "median_seconds": {"plain_flower_fedavg": plain, "flower_ext_bank_app": ext},
                "ratio_ext_over_plain": ext / plain,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
