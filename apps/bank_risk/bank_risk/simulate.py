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


class InProcessGrid:
    """A Grid that delivers each message to the real ClientApp in this process.

    For benchmarks that need hundreds of runs (robustness and non-IID tables): the bank
    app's own ServerApp and ClientApp code, every message round-tripped through Flower's
    protobuf serialisation (so nothing is shared between server and bank by reference),
    one persistent ``Context`` per bank (SCAFFOLD's control variates, top-k residuals and
    DP ledgers live there as on a SuperNode), but no Ray, no SuperLink and no timeouts.
    The tests run the real runtimes (Ray simulation, ``flwr run``, SuperNodes); this is
    not a Flower runtime and not for deployment.
    """

    def __init__(self, client_app: Any, contexts: dict[int, Any], run: Any) -> None:
        self.client_app = client_app
        self.contexts = contexts
        self._run = run
        self._replies: dict[str, Any] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        from flwr.app import Message

        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def get_nodes(self) -> list[Any]:
        return []

    def _deliver(self, message: Any) -> Any:
        from flwr.app import Error, Message
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.supercore.task_identity import TaskIdentity

        node = int(message.metadata.dst_node_id)
        inbound = message_from_proto(message_to_proto(message))  # what the wire delivers
        TaskIdentity.node_id = node
        try:
            reply = self.client_app(inbound, self.contexts[node])
        except Exception as err:  # the runtime turns a raising handler into an error reply
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=inbound)
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        return message_from_proto(message_to_proto(reply))

    def push_messages(self, messages: Any) -> list[str]:
        from uuid import uuid4

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(message.metadata.message_id)
            self._replies[message.metadata.message_id] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        return self.pull_messages(self.push_messages(messages))


def run_bank_inprocess(overrides: Mapping[str, Any], *, num_supernodes: int | None = None) -> Path:
    """Run the app with ``overrides`` in this process on :class:`InProcessGrid`; returns the
    run directory. Same run config fusion as :func:`run_bank_simulation`."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    from flower_ext.runlog import resolve_run_dir

    from .client_app import app as bank_client_app
    from .server_app import app as bank_server_app

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_config = get_fused_config_from_dir(APP_DIR, dict(overrides))
    num_banks = num_supernodes or int(run_config.get("num-banks", 5))  # type: ignore[arg-type]
    run_id = abs(hash((tuple(sorted(map(str, overrides.items()))), os.getpid()))) % (2**62)
    run = Run.create_empty(run_id=run_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    contexts = {
        1000 + i: Context(
            run_id=run_id,
            node_id=1000 + i,
            node_config={"partition-id": i, "num-partitions": num_banks},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i in range(num_banks)
    }
    grid = InProcessGrid(bank_client_app, contexts, run)
    Grid.register(InProcessGrid)  # a virtual subclass: isinstance(grid, Grid) holds
    server_context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    bank_server_app(grid=grid, context=server_context)
    return resolve_run_dir(
        str(run_config.get("output-dir", "")), str(run_config.get("run-name", "")), run_id
    )


def run_logged(overrides: Mapping[str, Any], runtime: str = "ray", log_path: str = "") -> Path:
    """One run on ``runtime`` ("ray": :func:`run_bank_simulation`, "inprocess":
    :func:`run_bank_inprocess`); with ``log_path`` its console output (Flower's per-round
    lines, Ray's) goes to that file, so parallel benchmark workers do not interleave."""
    run = run_bank_inprocess if runtime == "inprocess" else run_bank_simulation
    if not log_path:
        return run(overrides)
    import sys

    saved = [os.dup(1), os.dup(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        return run(overrides)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _run_or_error(args: tuple[dict[str, Any], str, str]) -> tuple[Path | None, str, float]:
    import time

    started = time.perf_counter()
    try:
        return run_logged(*args), "", time.perf_counter() - started
    except Exception as err:  # a failed run is a result too; the caller keeps going
        return None, f"{type(err).__name__}: {err}", time.perf_counter() - started


def run_many(
    overrides: list[dict[str, Any]], runtime: str = "ray", jobs: int = 1, log_dir: str = ""
) -> Any:
    """Yield ``(run_dir or None, error, seconds)`` for each run, in order; ``jobs > 1``
    (in-process runtime only: Ray already uses every core) runs that many at once in
    separate processes, each run's console output in ``log_dir/<index>.log``."""
    if jobs > 1 and runtime != "inprocess":
        raise ValueError("jobs > 1 needs runtime 'inprocess' (Ray already uses every core)")
    logs = [str(Path(log_dir) / f"{i}.log") if log_dir else "" for i in range(len(overrides))]
    work = [(dict(o), runtime, log) for o, log in zip(overrides, logs, strict=True)]
    if jobs <= 1:
        yield from map(_run_or_error, work)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_run_or_error, work)
