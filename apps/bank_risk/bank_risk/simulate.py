"""Run the bank app in this process on Flower's simulation runtime (Ray backend).

``flwr run apps/bank_risk`` is the way users run the app. Benchmarks and tests
that need many runs use :func:`run_bank_simulation` instead: the same ServerApp
and ClientApp, the same Ray simulation engine, the run config fused from
``pyproject.toml`` and overrides exactly as ``flwr run --run-config`` does, but
without a SuperLink process per run.

It calls Flower's ``flwr.simulation.run_simulation._run_simulation``, because
the public ``run_simulation`` takes no run config; flower-ext pins flwr < 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[1]


def run_bank_simulation(
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int | None = None,
    num_cpus_per_client: float = 1.0,
    server_app: Any = None,
    client_app: Any = None,
) -> Path:
    """Run the app with ``overrides`` on top of its defaults; returns the run directory.

    ``server_app`` / ``client_app`` replace the bank app's own (benchmarks compare
    against a plain Flower app on the same data and run config).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from flower_ext.runlog import resolve_run_dir

    from .client_app import app as bank_client_app
    from .server_app import app as bank_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_config = get_fused_config_from_dir(APP_DIR, dict(overrides))
    num_banks = int(run_config.get("num-banks", 5))  # type: ignore[arg-type]
    run_id = abs(hash((tuple(sorted(map(str, overrides.items()))), os.getpid()))) % (2**62)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(overrides)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    _run_simulation(
        num_supernodes=num_supernodes or num_banks,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app or bank_client_app,
        server_app=server_app or bank_server_app,
        backend_config={"client_resources": {"num_cpus": num_cpus_per_client}},
        server_app_context=context,
        app_dir=str(APP_DIR),
        run=run,
        is_app=True,  # the nodes fuse their run config from APP_DIR's pyproject.toml
    )
    return resolve_run_dir(
        str(run_config.get("output-dir", "")), str(run_config.get("run-name", "")), run_id
    )
