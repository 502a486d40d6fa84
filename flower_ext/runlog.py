"""``metrics.json`` for a run, rewritten after every round so a crash loses nothing.

Keys other features and the report rely on (never renamed): ``rounds[i].round``,
``rounds[i].evaluate.auc``, ``rounds[i].evaluate.ks``, ``rounds[i].bytes_up``,
``rounds[i].bytes_down``, ``rounds[i].seconds``, ``final.auc``, ``final.ks``,
``per_bank[<bank>].federated_auc``, ``per_bank[<bank>].local_only_auc``,
``centralized_auc`` and ``config``. ``status`` is ``running`` until the run
ends, then ``finished`` or ``failed`` (with ``error``). A resumed run (run config
``resume-from``) keeps the rounds up to its checkpoint and lists each restart under
``resumed``.

``checkpoint.npz`` (:func:`save_checkpoint`) holds what a new ServerApp needs to
continue a run: the global model after the last finished round, that round's
number and the strategy's own state. It is replaced atomically after every round.
``best_model.npz`` has the same format (no strategy state): the global model of the round
with the best pooled validation AUC so far (``load_checkpoint(run_dir, BEST_MODEL_FILE)``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from .audit import _jsonable
from .records import arrays_sha256, as_c_array

DEFAULT_OUTPUT_DIR = "~/flower-ext-runs"


def resolve_run_dir(output_dir: str, run_name: str, run_id: int | None = None) -> Path:
    """``<output-dir>/<run-name>``; an empty name becomes a timestamp (+ run id)."""
    base = Path(os.path.expanduser(output_dir or DEFAULT_OUTPUT_DIR)).resolve()
    if not run_name:
        run_name = time.strftime("%Y%m%d-%H%M%S") + (f"-{run_id}" if run_id is not None else "")
    if not re.fullmatch(r"[A-Za-z0-9._=+-]+", run_name):
        raise ValueError(f"run-name '{run_name}' may only hold letters, digits and . _ = + -")
    run_dir = base / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class MetricsFile:
    """The run's ``metrics.json``: add to it, it is written atomically each time."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self.data: dict[str, Any] = {
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": dict(config),
            "rounds": [],
            "final": {},
            "per_bank": {},
            "centralized_auc": None,
        }
        self.write()

    @classmethod
    def resume(cls, run_dir: Path, config: Mapping[str, Any], last_round: int) -> MetricsFile:
        """Reopen a run's ``metrics.json``: rounds up to ``last_round`` kept, later ones dropped."""
        path = Path(run_dir) / "metrics.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        metrics = cls.__new__(cls)
        metrics.path = path
        metrics.data = {
            "status": "running",
            "started": data.get("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            "config": dict(config),
            "rounds": [r for r in data.get("rounds", []) if int(r.get("round", 0)) <= last_round],
            "final": {},
            "per_bank": {},
            "centralized_auc": None,
            **{k: data[k] for k in ("setup", "model") if k in data},
            "resumed": [
                *data.get("resumed", []),
                {
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "from_round": last_round,
                    "previous_status": data.get("status"),
                },
            ],
        }
        metrics.write()
        return metrics

    def add_round(self, entry: Mapping[str, Any]) -> None:
        self.data["rounds"].append(dict(entry))
        self.write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=2, sort_keys=False))
        tmp.replace(self.path)


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


CHECKPOINT_FILE = "checkpoint.npz"
#: The best round's model (by pooled validation AUC), in the checkpoint format.
BEST_MODEL_FILE = "best_model.npz"


@dataclass
class Checkpoint:
    """The state a run continues from: the model after ``server_round``, and the rest."""

    server_round: int
    arrays: ArrayRecord
    model_sha256: str
    #: Strategy state (e.g. the server momentum ``velocity``), arrays by name.
    state_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: Anything JSON: run id, number of rounds, the strategy's labels, DP figures, ...
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    run_dir: str | Path, checkpoint: Checkpoint, filename: str = CHECKPOINT_FILE
) -> Path:
    """Write ``<run_dir>/checkpoint.npz`` (or ``filename``) atomically (temp file, fsync,
    rename)."""
    path = Path(run_dir) / filename
    payload: dict[str, np.ndarray] = {}
    keys = list(checkpoint.arrays.keys())
    for i, key in enumerate(keys):
        payload[f"model_{i}"] = checkpoint.arrays[key].numpy()
    for name, value in checkpoint.state_arrays.items():
        payload[f"state_{name}"] = np.asarray(value)
    header = {
        "round": checkpoint.server_round,
        "model_sha256": checkpoint.model_sha256,
        "model_keys": keys,
        "state_keys": list(checkpoint.state_arrays),
        "meta": _jsonable(checkpoint.meta),
    }
    payload["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, **payload)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: str | Path, filename: str = CHECKPOINT_FILE) -> Checkpoint:
    """Read ``<run_dir>/checkpoint.npz`` (or ``filename``); the model's hash is checked against
    the saved one."""
    path = Path(run_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"no {filename} in {run_dir}: the run never finished a round, or it is "
            "not a bank-app run directory"
        )
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        arrays = ArrayRecord(
            {
                key: Array(as_c_array(data[f"model_{i}"]))
                for i, key in enumerate(header["model_keys"])
            }
        )
        state = {name: np.array(data[f"state_{name}"]) for name in header["state_keys"]}
    sha = arrays_sha256(arrays)
    if sha != header["model_sha256"]:
        raise ValueError(f"{path}: the model does not match its recorded hash (corrupt file?)")
    return Checkpoint(int(header["round"]), arrays, sha, state, dict(header.get("meta", {})))
