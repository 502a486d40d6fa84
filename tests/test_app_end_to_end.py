"""The bank app end to end: Flower's Ray simulation in-process, and real `flwr run`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import APP_DIR, ROOT, assert_trail_finished

from flower_ext.audit import verify_audit_trail

REQUIRED_ROUND_KEYS = {"round", "evaluate", "bytes_up", "bytes_down", "seconds"}


def check_metrics(run_dir: Path, rounds: int, banks: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert len(metrics["rounds"]) == rounds
    for i, entry in enumerate(metrics["rounds"], start=1):
        assert set(entry) >= REQUIRED_ROUND_KEYS
        assert entry["round"] == i
        assert {"auc", "ks"} <= set(entry["evaluate"])
        assert entry["bytes_up"] > 0 and entry["bytes_down"] > 0 and entry["seconds"] > 0
    assert {"auc", "ks"} <= set(metrics["final"])
    assert len(metrics["per_bank"]) == banks
    for row in metrics["per_bank"].values():
        assert {"federated_auc", "local_only_auc"} <= set(row)
    assert "centralized_auc" in metrics and metrics["config"]["num-server-rounds"] == rounds
    assert verify_audit_trail(run_dir / "audit.jsonl") is None
    return metrics


@pytest.mark.slow
def test_simulation_learns_and_writes_metrics(simulated_run):
    run_dir = simulated_run
    metrics = check_metrics(run_dir, rounds=4, banks=4)
    assert metrics["final"]["auc"] > 0.68  # well above chance on this data
    assert metrics["centralized_auc"] > 0.7
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").open()]
    assert events[0]["event"] == "run_start"
    assert_trail_finished(events)
    gains = [b for b, row in metrics["per_bank"].items() if row.get("verdict") == "gains"]
    assert metrics["banks_where_federation_beats_local"] == len(gains)  # significant only
    kinds = [e["event"] for e in events]
    assert kinds.count("round_aggregated") == 4
    assert kinds.count("client_update") == 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"SuperLink did not open port {port}")


@pytest.mark.slow
def test_flwr_run_with_a_superlink_we_start_and_stop(tmp_path):
    """`flwr run apps/bank_risk` against our own SuperLink on free loopback ports.

    Our own SuperLink (not the detached one `flwr run` would start on fixed ports)
    so the test never touches a user's, and stops it by pid.
    """
    bin_dir = Path(sys.executable).parent
    # flwr 1.42 serves the Control, Fleet and Runtime APIs over one HTTP port.
    port = _free_port()
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "e2e"\n\n'
        f'[superlink.e2e]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    superlink = subprocess.Popen(
        [
            str(bin_dir / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, superlink)
        result = subprocess.run(
            [
                str(bin_dir / "flwr"),
                "run",
                str(APP_DIR),
                "e2e",
                "--stream",
                "--federation-config",
                "num-supernodes=3",
                "--run-config",
                f"num-server-rounds=2 num-banks=3 rows-per-bank=800 "
                f"output-dir='{tmp_path}' run-name='flwr-run' centralized-baseline=false",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=400,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert "[bank-risk] round 2/2" in output  # live progress is streamed
        metrics = check_metrics(tmp_path / "flwr-run", rounds=2, banks=3)
        assert metrics["centralized_auc"] is None
        assert "disabled" in metrics["centralized_null_reason"]
    finally:
        os.killpg(superlink.pid, 15)  # the SuperLink and the SuperExec it spawned
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, 9)
            superlink.wait(timeout=10)
