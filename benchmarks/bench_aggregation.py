"""End-to-end ``aggregate_train`` time of flower-ext's rules vs Flower's built-ins.

For every cell (n clients, d parameters) the script builds real reply Messages
(an ArrayRecord of float32 arrays: the global model plus a small per-client
update, and a MetricRecord with ``num-examples`` and ``train-loss``) and times
``aggregate_train`` on them, end to end (validation, decoding, aggregation,
server step, audit), for

- ours: FedAvg, Krum, MultiKrum, Median, TrimmedMean, Bulyan, GeometricMedian,
  CenteredClipping, NormBound (``flower_ext.strategies``);
- Flower 1.42's counterparts on the same replies: FedAvg, Krum, MultiKrum,
  FedMedian, FedTrimmedAvg, Bulyan (``flwr.serverapp.strategy``). FedMedian,
  FedTrimmedAvg and Bulyan pop the arrays out of the replies while aggregating,
  so each of their timed calls gets fresh reply Messages (new records around the
  same immutable Array payloads; building them is not timed);
- the floor: one weighted mean ``w @ U`` over the already stacked (n, d) float32
  matrix (what any rule must at least read).

f = max(1, n // 10) attackers tolerated (Bulyan's n >= 4f + 3 holds for every
n); MultiKrum selects n - f (Flower: ``num_nodes_to_select = n - f``);
TrimmedMean / FedTrimmedAvg use beta = 0.2; CenteredClipping tau = 1, NormBound
max_norm = 1. Cells whose reply payload n * d * 4 bytes exceeds 2 GiB are
skipped: replies, our stacked matrix and Flower's decoded copies together would
pass ~8 GiB. Times are medians over repeats (fewer repeats for big cells).
Extra memory (tracemalloc peak of one ``aggregate_train`` call, which sees
NumPy's allocations) is reported per rule at n = 50, d = 1M, as a multiple of
the stacked update matrix (n * d * 4 bytes).

    python benchmarks/bench_aggregation.py            # full grid, ~10 min on 2 cores
    python benchmarks/bench_aggregation.py --quick    # n in {10, 50}, d in {100k}
    python benchmarks/bench_aggregation.py --out benchmarks/results/aggregation.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MAX_PAYLOAD_BYTES = 2 * 1024**3
SERVER_NODE = 1


def _identity(node_id: int) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 4242
    TaskIdentity.node_id = node_id


class Grid:
    """Just enough Grid for configure_train's node sampling."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def layer_sizes(d: int) -> dict[str, int]:
    bias = min(1000, d // 10)
    second = d // 4
    return {"layer1.weight": d - second - bias, "layer2.weight": second, "layer2.bias": bias}


class Cell:
    """The global model, the client payloads and a factory of fresh reply Messages."""

    def __init__(self, n: int, d: int, seed: int = 0) -> None:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        rng = np.random.default_rng(seed)
        self.n, self.d = n, d
        self.nodes = list(range(10, 10 + n))
        sizes = layer_sizes(d)
        base = {k: rng.normal(size=s).astype(np.float32) for k, s in sizes.items()}
        self.global_arrays = ArrayRecord({k: Array(v) for k, v in base.items()})
        _identity(SERVER_NODE)
        self.outgoing = {
            node: Message(
                content=RecordDict(
                    {"arrays": self.global_arrays, "config": ConfigRecord({"server-round": 1})}
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in self.nodes
        }
        self.payloads: list[dict[str, Any]] = []
        self.weights = rng.integers(100, 1000, size=n)
        for _ in range(n):
            arrays = {}
            for key, value in base.items():
                local = rng.standard_normal(size=value.size, dtype=np.float32)
                local *= np.float32(1e-3)
                local += value
                arrays[key] = Array(local)
                del local
            self.payloads.append(arrays)
        del base
        # The floor's input: the same updates already stacked.
        self.stacked: np.ndarray | None = np.empty((n, d), dtype=np.float32)
        flat_global = np.concatenate([a.numpy().ravel() for a in self.global_arrays.values()])
        for i, arrays in enumerate(self.payloads):
            np.concatenate([a.numpy().ravel() for a in arrays.values()], out=self.stacked[i])
            self.stacked[i] -= flat_global

    def replies(self) -> list[Any]:
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        out = []
        for node, arrays, weight in zip(self.nodes, self.payloads, self.weights, strict=True):
            _identity(node)
            content = RecordDict(
                {
                    "arrays": ArrayRecord(dict(arrays)),
                    "metrics": MetricRecord(
                        {"num-examples": int(weight), "train-loss": float(weight) / 1000.0}
                    ),
                }
            )
            out.append(Message(content=content, reply_to=self.outgoing[node]))
        _identity(SERVER_NODE)
        return out


def ours(n: int) -> dict[str, Callable[[], Any]]:
    from flower_ext.strategies import (
        Bulyan,
        CenteredClipping,
        FedAvg,
        GeometricMedian,
        Krum,
        Median,
        MultiKrum,
        NormBound,
        TrimmedMean,
    )

    f = max(1, n // 10)
    common = {"min_train_nodes": n, "min_available_nodes": n}
    return {
        "fedavg": lambda: FedAvg(**common),
        "krum": lambda: Krum(num_malicious_nodes=f, **common),
        "multikrum": lambda: MultiKrum(num_malicious_nodes=f, **common),
        "median": lambda: Median(**common),
        "trimmed-mean": lambda: TrimmedMean(beta=0.2, **common),
        "bulyan": lambda: Bulyan(num_malicious_nodes=f, **common),
        "geometric-median": lambda: GeometricMedian(**common),
        "centered-clipping": lambda: CenteredClipping(tau=1.0, **common),
        "norm-bound": lambda: NormBound(max_norm=1.0, **common),
    }


def flowers(n: int) -> dict[str, Callable[[], Any]]:
    from flwr.serverapp import strategy as fl

    f = max(1, n // 10)
    return {
        "fedavg": lambda: fl.FedAvg(),
        "krum": lambda: fl.Krum(num_malicious_nodes=f),
        "multikrum": lambda: fl.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f),
        "median": lambda: fl.FedMedian(),
        "trimmed-mean": lambda: fl.FedTrimmedAvg(beta=0.2),
        "bulyan": lambda: fl.Bulyan(num_malicious_nodes=f),
    }


def time_calls(call: Callable[[], Any], prepare: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        args = prepare()
        gc.collect()
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
        del args
        if times[0] > 2.0:  # slow calls (Flower's Bulyan): one is enough to compare
            break
    return statistics.median(times)


def peak_bytes(call: Callable[[], Any], args: tuple) -> int:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    result = call(*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del result
    return peak - base


def repeats_for(n: int, d: int, quick: bool) -> int:
    size = n * d
    if size <= 10_000_000:
        return 5
    if size <= 100_000_000:
        return 3
    return 1


def run_cell(n: int, d: int, quick: bool, measure_memory: bool) -> dict[str, Any]:
    import logging

    from flwr.app import ConfigRecord

    logging.getLogger("flwr").setLevel(logging.ERROR)
    cell = Cell(n, d)
    repeats = repeats_for(n, d, quick)
    weights = (cell.weights / cell.weights.sum()).astype(np.float32)
    stacked = cell.stacked
    floor = time_calls(lambda: weights @ stacked, lambda: (), max(repeats, 5))
    row: dict[str, Any] = {"n": n, "d": d, "repeats": repeats, "floor_s": floor, "rules": {}}
    stacked_bytes = stacked.nbytes
    cell.stacked = stacked = None  # not needed any more: give the memory back to the rules
    gc.collect()
    shared_replies = cell.replies()
    theirs = flowers(n)
    for name, make in ours(n).items():
        strategy = make()
        strategy.configure_train(1, cell.global_arrays, ConfigRecord(), Grid(cell.nodes))
        ours_s = time_calls(
            lambda replies, s=strategy: s.aggregate_train(1, replies),
            lambda: (shared_replies,),
            repeats,
        )
        entry: dict[str, Any] = {"ours_s": ours_s, "ours_over_floor": ours_s / floor}
        if measure_memory:
            extra = peak_bytes(
                lambda replies, s=strategy: s.aggregate_train(1, replies), (shared_replies,)
            )
            entry["ours_extra_memory_x_stacked"] = extra / stacked_bytes
        if name in theirs:
            flower = theirs[name]()
            flower_s = time_calls(
                lambda replies, s=flower: s.aggregate_train(1, replies),
                lambda: (cell.replies(),),
                repeats,
            )
            entry.update(flower_s=flower_s, speedup_vs_flower=flower_s / ours_s)
            if measure_memory:
                extra = peak_bytes(
                    lambda replies, s=flower: s.aggregate_train(1, replies), (cell.replies(),)
                )
                entry["flower_extra_memory_x_stacked"] = extra / stacked_bytes
        row["rules"][name] = entry
        print(
            f"n={n:>3} d={d:>8} {name:<18} ours {ours_s * 1e3:9.1f} ms"
            + (
                f"  flower {entry['flower_s'] * 1e3:9.1f} ms  x{entry['speedup_vs_flower']:.1f}"
                if "flower_s" in entry
                else ""
            )
            + f"  floor {floor * 1e3:.1f} ms",
            file=sys.stderr,
            flush=True,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {10, 50}, d = 100k only")
    parser.add_argument("--n", type=int, nargs="*", help="override the client counts")
    parser.add_argument("--d", type=int, nargs="*", help="override the model sizes")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    ns = args.n or ([10, 50] if args.quick else [10, 50, 100])
    ds = args.d or ([100_000] if args.quick else [100_000, 1_000_000, 10_000_000])

    cells, skipped = [], []
    for d in ds:
        for n in ns:
            if n * d * 4 > MAX_PAYLOAD_BYTES:
                skipped.append(
                    {
                        "n": n,
                        "d": d,
                        "reason": f"replies alone are {n * d * 4 / 1024**3:.1f} GiB; with the "
                        "stacked matrix and Flower's decoded copies the cell would pass ~8 GiB",
                    }
                )
                print(f"n={n} d={d}: skipped (memory)", file=sys.stderr)
                continue
            cells.append(run_cell(n, d, args.quick, measure_memory=(n == 50 and d == 1_000_000)))

    import flwr

    result = {
        "benchmark": "aggregation",
        "what": "median wall seconds of one aggregate_train call, end to end",
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "",
            "cpus": __import__("os").cpu_count(),
        },
        "cells": cells,
        "skipped": skipped,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
