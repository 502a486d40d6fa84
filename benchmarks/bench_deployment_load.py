"""Load: the bank app on a real local deployment with many SuperNodes.

One TLS SuperLink with SuperNode authentication and ``--nodes`` authenticated
SuperNodes (each its own synthetic bank) on loopback, then ``flwr run`` for
``--rounds`` rounds. While the run goes, the resident memory (RSS) of the
SuperLink process and of every process the deployment started (SuperLink,
its SuperExec and ServerApp, SuperNodes, their SuperExecs and ClientApps) is
sampled every 0.5 s. Prints JSON (also written to ``--out``): rounds per minute
(round 1 start to last round end, from the audit trail), seconds per round,
setup time, SuperLink and total memory (peak and mean). Everything started is
stopped at the end, also on failure.

    python benchmarks/bench_deployment_load.py [--nodes 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "bank_risk"

from flower_ext.deploy import LocalDeployment, process_tree, rss_bytes  # noqa: E402


def parse_ts(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


class MemorySampler(threading.Thread):
    def __init__(self, dep: LocalDeployment, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.dep, self.every = dep, every
        self.superlink: list[int] = []
        self.total: list[int] = []
        self.processes: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            roots = list(self.dep.running().values())
            pids = {p for r in roots for p in process_tree(r)}
            self.superlink.append(self.dep.superlink_rss_bytes())
            self.total.append(rss_bytes(sorted(pids)))
            self.processes.append(len(pids))
            self.stop_event.wait(self.every)


def mib(values: list[int], fn) -> float:  # type: ignore[no-untyped-def]
    return round(fn(values) / 2**20, 1) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows-per-bank", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/deployment_load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="flower-ext-load-") as tmp:
        dep = LocalDeployment(Path(tmp) / "deployment", tls=True, auth=True)
        sampler = MemorySampler(dep)
        try:
            t0 = time.perf_counter()
            dep.start_superlink()
            idle_superlink = dep.superlink_rss_bytes()
            for i in range(args.nodes):
                dep.register(f"bank-{i}")
            for i in range(args.nodes):
                dep.start_supernode(f"bank-{i}", {"bank-index": i})
            setup_seconds = time.perf_counter() - t0
            run_dir = Path(tmp) / "runs" / "load"
            sampler.start()
            t1 = time.perf_counter()
            run = dep.start_run(
                APP_DIR,
                {
                    "num-server-rounds": args.rounds,
                    "num-banks": args.nodes,
                    "rows-per-bank": args.rows_per_bank,
                    "hidden-units": "8",
                    "local-only-baseline": False,
                    "centralized-baseline": False,
                    "wait-for-nodes": 300.0,
                    "round-timeout": 600.0,
                    "output-dir": str(run_dir.parent),
                    "run-name": run_dir.name,
                },
            )
            code = run.wait(timeout=3600)
            wall = time.perf_counter() - t1
            sampler.stop_event.set()
            sampler.join()
            if code != 0:
                tail = dep.log_file("flwr-run").read_text()[-3000:]
                sys.exit(f"flwr run failed ({code}):\n{tail}")
            events = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
            starts = [parse_ts(e["ts"]) for e in events if e["event"] == "round_start"]
            ends = [parse_ts(e["ts"]) for e in events if e["event"] == "round_end"]
            metrics = json.loads((run_dir / "metrics.json").read_text())
            round_seconds = [r["seconds"] for r in metrics["rounds"]]
            accepted = [r["clients"]["accepted"] for r in metrics["rounds"]]
            span = ends[-1] - starts[0]
            result = {
                "benchmark": "deployment_load",
                "machine": f"{os.cpu_count()} cores, {platform.machine()}, shared",
                "flwr": _flwr_version(),
                "supernodes": args.nodes,
                "rounds": args.rounds,
                "rows_per_bank": args.rows_per_bank,
                "tls": True,
                "node_auth": True,
                "clients_accepted_per_round": accepted,
                "rounds_per_minute": round(60.0 * args.rounds / span, 2),
                "seconds_per_round": [round(s, 1) for s in round_seconds],
                "setup_seconds_superlink_register_start_nodes": round(setup_seconds, 1),
                "run_wall_seconds_incl_standardisation": round(wall, 1),
                "final_auc": metrics["final"].get("auc"),
                "superlink_rss_mib": {
                    "idle_before_nodes": round(idle_superlink / 2**20, 1),
                    "peak": mib(sampler.superlink, max),
                    "mean": mib(sampler.superlink, statistics.mean),
                },
                "all_processes_rss_mib": {
                    "peak": mib(sampler.total, max),
                    "mean": mib(sampler.total, statistics.mean),
                    "peak_process_count": max(sampler.processes, default=0),
                    "note": "RSS summed over processes (shared pages counted per process)",
                },
            }
        finally:
            sampler.stop_event.set()
            dep.stop_all()
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


if __name__ == "__main__":
    main()
