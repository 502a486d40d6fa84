"""Bytes on the wire of a top-k compressed train reply vs a dense one, and what it costs.

A bank-app MLP widened to ~1M parameters (hidden-units "1024,960"). The dense
reply is what the bank's train handler returns; the sparse replies are what
``flower_ext.mods.TopKMod`` makes of it, measured with
``flower_ext.records.wire_size`` (the real serialized size of the Message: every
inflatable object Flower 1.42 ships, envelope included). For each ratio and value
encoding: wire size, % of dense, bytes per sent entry, and the share of the
indices; plus what the same indices would cost as int32 or uint16 gaps.

Cost: compression in the client mod (update = local - global, error feedback,
top-k, encoding) against one local epoch of the bank's training on the same
model (1500 rows, batch 64), and the server's decode (validate + densify).

    python benchmarks/bench_topk_wire.py [--repeats 5]

Prints JSON and writes benchmarks/results/topk_wire.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from conftest import FakeGrid, _as_server, reply  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from flower_ext.compression import index_encoding_sizes  # noqa: E402
from flower_ext.model import build_model, count_parameters  # noqa: E402
from flower_ext.mods import TopKMod  # noqa: E402
from flower_ext.records import ArrayLayout, wire_size  # noqa: E402
from flower_ext.strategies import FedAvg, TopKCompression  # noqa: E402
from flower_ext.training import TrainConfig, train_local  # noqa: E402

HIDDEN = "1024,960"
FEATURES = 23  # the synthetic banks' feature count order of magnitude


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/topk_wire.json"))
    args = parser.parse_args()
    _as_server()
    rng = np.random.default_rng(0)

    model = build_model(FEATURES, "mlp", HIDDEN)
    num_params = count_parameters(model)
    global_arrays = ArrayRecord(model.state_dict())
    layout = ArrayLayout.of(global_arrays)

    # One real local epoch: the reference for client-side cost, and a realistic update.
    x = rng.normal(size=(1500, FEATURES)).astype(np.float32)
    y = (rng.random(1500) < 0.2).astype(np.float32)
    cfg = TrainConfig(epochs=1, learning_rate=0.05, batch_size=64, seed=0)
    train_times = []
    for _ in range(args.repeats):
        trained = build_model(FEATURES, "mlp", HIDDEN)
        trained.load_state_dict(model.state_dict())
        start = time.perf_counter()
        train_local(trained, x, y, cfg)
        train_times.append(time.perf_counter() - start)
    local_arrays = ArrayRecord(trained.state_dict())

    inner = FedAvg(min_train_nodes=1, min_available_nodes=1)
    rows = []
    dense_size = None
    for ratio in (0.1, 0.01, 0.001):
        for values in ("float32", "float16", "int8"):
            server = TopKCompression(inner, ratio=ratio, values=values)
            msg = next(
                iter(server.configure_train(1, global_arrays, ConfigRecord(), FakeGrid([7])))
            )
            dense = reply(msg, local_arrays, {"num-examples": 1125, "train-loss": 0.5}, label="b")
            dense_size = wire_size(dense)
            mod = TopKMod(error_feedback=True)
            decode_times = []
            for _ in range(args.repeats):
                ctx = Context(
                    run_id=1,
                    node_id=7,
                    node_config={"partition-id": 0},
                    state=RecordDict(),
                    run_config={},
                )
                out = mod(msg, ctx, lambda m, c, d=dense: d)
                start = time.perf_counter()
                decoded, _ = server.densify(out)
                decode_times.append(time.perf_counter() - start)
            size = wire_size(out)
            marker = out.content["topk"]
            count = int(marker["count"])
            idx_bytes = len(out.content["arrays"]["topk.indices"].data)
            val_bytes = len(out.content["arrays"]["topk.values"].data)
            # The same indices in other encodings.
            sent_idx = np.flatnonzero(
                layout.flatten(decoded.content["arrays"], np.float32)
                != layout.flatten(global_arrays, np.float32)
            )
            alt = index_encoding_sizes(sent_idx, layout.dim)
            rows.append(
                {
                    "ratio": ratio,
                    "values": values,
                    "entries": count,
                    "index_encoding": marker["index-encoding"],
                    "wire_bytes": size,
                    "percent_of_dense": round(100 * size / dense_size, 3),
                    "reduction_x": round(dense_size / size, 1),
                    "index_bytes": idx_bytes,
                    "value_bytes": val_bytes,
                    "envelope_bytes": size - idx_bytes - val_bytes,
                    "index_bits_per_entry": round(8 * idx_bytes / count, 2),
                    "bytes_per_entry_incl_envelope": round(size / count, 2),
                    "index_bytes_if_int32": 4 * count,
                    "index_bytes_if_gap_u16": alt["gap-u16"],
                    "index_bytes_if_bitmap": alt["bitmap"],
                    "compress_ms_median": round(1e3 * statistics.median(mod.timings), 2),
                    "decode_ms_median": round(1e3 * statistics.median(decode_times), 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    train_s = statistics.median(train_times)
    one_pct = next(r for r in rows if r["ratio"] == 0.01 and r["values"] == "float32")
    result = {
        "benchmark": "topk_wire",
        "model": {"kind": "mlp", "hidden_units": HIDDEN, "num_parameters": num_params},
        "dense_reply_wire_bytes": dense_size,
        "dense_payload_bytes": 4 * num_params,
        "rows": rows,
        "target": "top-k 1% <= 1.5% of dense",
        "one_percent_float32_percent_of_dense": one_pct["percent_of_dense"],
        "one_percent_float16_percent_of_dense": next(
            r["percent_of_dense"] for r in rows if r["ratio"] == 0.01 and r["values"] == "float16"
        ),
        "client_cost": {
            "local_epoch_seconds_median": round(train_s, 4),
            "compress_1pct_ms_median": one_pct["compress_ms_median"],
            "compress_share_of_local_epoch": round(
                one_pct["compress_ms_median"] / 1e3 / train_s, 4
            ),
            "note": "one epoch of 1500 rows, batch 64, SGD+momentum, same 1M-parameter model",
        },
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "repeats": args.repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
