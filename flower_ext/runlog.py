"""``metrics.json`` for a run, rewritten after every round so a crash loses nothing.

Keys other features and the report rely on (never renamed): ``rounds[i].round``,
``rounds[i].evaluate.auc``, ``rounds[i].evaluate.ks``, ``rounds[i].bytes_up``,
``rounds[i].bytes_down``, ``rounds[i].seconds``, ``final.auc``, ``final.ks``,
``per_bank[<bank>].federated_auc``, ``per_bank[<bank>].local_only_auc``,
``centralized_auc`` and ``config``. ``status`` is ``running`` until the run
ends, then ``finished`` or ``failed`` (with ``error``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .audit import _jsonable

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
