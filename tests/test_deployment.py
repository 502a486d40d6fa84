"""The bank app on Flower's deployment runtime: TLS SuperLink, authenticated SuperNodes.

Each test starts its own ``flower-superlink`` (HTTPS with a CA made for the test,
SuperNode authentication on) and ``flower-supernode`` processes on free loopback
ports, runs ``flwr run apps/bank_risk local`` against them, and stops every
process it started (by pid, with their children) even when the test fails; the
fixture then checks that none is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import APP_DIR

from flower_ext.audit import AuditTrail, verify_audit_trail
from flower_ext.deploy import (
    LocalDeployment,
    alive,
    find_processes,
    generate_node_key,
    generate_tls,
    node_config_arg,
    process_tree,
    session_members,
    session_of,
)
from flower_ext.runcheck import verify_run
from flower_ext.runlog import Checkpoint, MetricsFile, load_checkpoint, save_checkpoint

#: Small and quick: the point is the runtime, not the model.
BASE_CONFIG: dict[str, object] = {
    "num-banks": 3,
    "rows-per-bank": 500,
    "hidden-units": "8",
    "local-only-baseline": False,
    "centralized-baseline": False,
    "wait-for-nodes": 60.0,
}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    """A TLS + node-auth SuperLink on a free loopback port; everything stopped afterwards."""
    dep = LocalDeployment(tmp_path / "deployment", tls=True, auth=True)
    seen: set[int] = set()
    original_spawn = dep.spawn

    def spawn(name: str, command: list[str]) -> subprocess.Popen:
        proc = original_spawn(name, command)
        seen.add(proc.pid)
        return proc

    dep.spawn = spawn  # type: ignore[method-assign]
    try:
        dep.start_superlink()
        yield dep
    finally:
        tree = {p for pid in seen for p in process_tree(pid)}
        sessions = {s for p in tree if (s := session_of(p)) is not None} - {os.getsid(0)}
        dep.stop_all()
        time.sleep(0.5)
        still = [p for p in tree if alive(p)] + session_members(sessions)
        assert not still, f"processes left behind: {sorted(set(still))}"


def start_banks(dep: LocalDeployment, n: int) -> dict[str, int]:
    """Register and start SuperNodes ``bank-0``..``bank-{n-1}``; their node ids."""
    ids = {f"bank-{i}": dep.register(f"bank-{i}") for i in range(n)}
    for i in range(n):
        dep.start_supernode(f"bank-{i}", {"bank-index": i})
    return ids


def audit_events(run_dir: Path) -> list[dict]:
    path = run_dir / "audit.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float,
    run: subprocess.Popen | None = None,
    log: Path | None = None,
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if run is not None and run.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            raise AssertionError(f"flwr run exited ({run.returncode}) before {what}\n{tail}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def has_event(run_dir: Path, event: str, **fields: object) -> Callable[[], bool]:
    def check() -> bool:
        return any(
            e["event"] == event and all(e.get(k) == v for k, v in fields.items())
            for e in audit_events(run_dir)
        )

    return check


def finish(dep: LocalDeployment, run: subprocess.Popen, timeout: float) -> str:
    """Wait for ``flwr run --stream`` to end; its output (the ServerApp's log)."""
    with contextlib.suppress(subprocess.TimeoutExpired):  # reported below, with the log
        run.wait(timeout=timeout)
    log = dep.log_file("flwr-run").read_text()
    assert run.returncode == 0, f"flwr run: {run.returncode}\n{log[-4000:]}"
    return log


def speaks_tls(port: int, ca: Path) -> str:
    """The TLS version the SuperLink negotiates, verified against our CA and 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


@pytest.mark.slow
def test_tls_superlink_three_banks_survives_a_killed_supernode(deployment, tmp_path):
    """2 rounds over HTTPS; bank-2 crashes mid-round 1, the run goes on, bank-2 rejoins.

    The SuperLink notices the crash when bank-2's heartbeats stop (2 missed, <= 60 s)
    and answers for it with a "node unavailable" error; round 1 closes with the two
    others. bank-2 restarts with its registered key, keeps its node id and is
    sampled again from round 2 on. The round timeout is longer than the heartbeat
    window so that detection, not the timeout, ends round 1 (a deterministic order).
    """
    dep = deployment
    assert speaks_tls(dep.port, dep.ca_cert).startswith("TLS")
    ids = start_banks(dep, 3)
    run_dir = tmp_path / "runs" / "dropout"
    run = dep.start_run(
        APP_DIR,
        {
            **BASE_CONFIG,
            "num-server-rounds": 2,
            "min-banks": 2,
            "round-timeout": 90.0,
            "output-dir": str(run_dir.parent),
            "run-name": run_dir.name,
        },
    )
    log = dep.log_file("flwr-run")
    wait_for("round 1", has_event(run_dir, "round_start", round=1), 120, run, log)
    # Mid-round: bank-2 has taken the train message and its ClientApp is working.
    bank2 = dep.pid("bank-2")
    assert bank2 is not None
    wait_for("bank-2's ClientApp", lambda: find_processes(bank2, "flwr-clientapp"), 30, run, log)
    dep.stop("bank-2", sig=signal.SIGKILL)  # a crash: no goodbye to the SuperLink
    wait_for("round 1 closed", has_event(run_dir, "round_aggregated", round=1), 120, run, log)
    dep.start_supernode_until_accepted("bank-2", {"bank-index": 2}, timeout=60)
    output = finish(dep, run, timeout=180)
    assert "[bank-risk] round 2/2" in output

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    # The dropped bank is recorded against its own node id: as missing when no reply came
    # before the round timed out, or as rejected with the error the SuperLink sent in its
    # place once its heartbeats stopped (which one depends on timing).
    round1 = metrics["rounds"][0]["clients"]
    dropped = round1["missing"] + [int(n) for n in round1["rejected"]]
    assert dropped == [ids["bank-2"]]
    events = audit_events(run_dir)
    recorded = [e for e in events if e["event"] in ("client_missing", "reply_rejected")]
    assert [(e["round"], e["node_id"]) for e in recorded] == [(1, ids["bank-2"])]
    agg = {e["round"]: e for e in events if e["event"] == "round_aggregated"}
    assert agg[1]["accepted"] == 2
    assert agg[2]["accepted"] == 3  # bank-2 rejoined under its registered node id
    updates2 = {e["node_id"] for e in events if e["event"] == "client_update" and e["round"] == 2}
    assert updates2 == set(ids.values())
    assert verify_run(run_dir).ok


@pytest.mark.slow
def test_unregistered_supernode_is_refused(deployment):
    """Node auth: a registered key connects, an unregistered one is turned away."""
    dep = deployment
    registered = dep.register("bank-0")
    dep.start_supernode("bank-0", {"bank-index": 0})
    dep.node_key("intruder")  # a valid key pair, never registered
    intruder = dep.start_supernode("intruder", {"bank-index": 1}, max_wait_time=20)
    code = intruder.wait(timeout=60)
    assert code != 0
    text = dep.log_file("intruder").read_text()
    assert "Failed to initialize the connection" in text, text[-2000:]

    def online() -> list[dict]:
        listing = dep.flwr(["supernode", "ls", "local", "--format", "json"])
        nodes = json.loads(listing.stdout[listing.stdout.find("{") :])["nodes"]
        return [n for n in nodes if n["status"] == "online"]

    nodes = wait_for("bank-0 online", online, 30)
    assert [int(n["node-id"]) for n in nodes] == [registered]  # type: ignore[union-attr]


@pytest.mark.slow
def test_killed_server_resumes_from_its_checkpoint(deployment, tmp_path):
    """The ServerApp is killed after round 1; `resume-from` finishes round 2 in the same run."""
    dep = deployment
    start_banks(dep, 3)
    run_dir = tmp_path / "runs" / "resume"
    config = {
        **BASE_CONFIG,
        "num-server-rounds": 2,
        "server-momentum": 0.5,  # strategy state that must survive the restart
        "round-timeout": 120.0,
        "output-dir": str(run_dir.parent),
        "run-name": run_dir.name,
    }
    first = dep.start_run(APP_DIR, config, name="flwr-run-first")
    log = dep.log_file("flwr-run-first")
    wait_for("round 1 checkpoint", lambda: (run_dir / "checkpoint.npz").is_file(), 150, first, log)
    superlink = dep.pid("superlink")
    assert superlink is not None
    servers = find_processes(superlink, "flwr-serverapp")
    assert len(servers) == 1
    for pid in servers:
        subprocess.run(["kill", "-9", str(pid)], check=True)
    dep.stop("flwr-run-first")
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.server_round == 1
    assert "velocity" in checkpoint.state_arrays
    assert verify_audit_trail(run_dir / "audit.jsonl") is None

    second = dep.start_run(APP_DIR, {**config, "resume-from": str(run_dir)})
    finish(dep, second, timeout=200)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["resumed"][0]["from_round"] == 1
    events = audit_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds.count("run_start") == 1 and kinds.count("run_resumed") == 1
    resumed_at = kinds.index("run_resumed")
    after = events[resumed_at + 1 :]
    starts = [e for e in after if e["event"] == "round_start" and e["phase"] == "train"]
    assert [e["round"] for e in starts] == [2]
    assert starts[0]["global_model_sha256"] == checkpoint.model_sha256
    closed = [e["round"] for e in events if e["event"] == "round_aggregated"]
    assert closed.count(1) == 1 and closed[-1] == 2
    result = verify_run(run_dir)
    assert result.ok, result.summary()
    assert result.rounds_closed == 2
    # run_end, then only the signed heads and the report's signed hash (flower_ext.audit)
    assert set(kinds[kinds.index("run_end") + 1 :]) <= {"head_signed", "report_written"}


# --------------------------------------------------------------------------- fast checks
def test_generated_certificate_is_signed_by_the_ca_for_loopback(tmp_path):
    from cryptography import x509

    files = generate_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert files.ca_key.stat().st_mode & 0o077 == 0  # private keys: owner only
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_node_key_is_what_flwr_reads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    private, public = generate_node_key(tmp_path, "bank-0")
    assert try_load_public_key(public)  # `flwr supernode register` accepts it
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_node_config_quotes_strings_only():
    text = node_config_arg({"bank-index": 2, "csv-path": "/data/bank 2.csv", "he": True})
    assert text == "bank-index=2 csv-path='/data/bank 2.csv' he=true"


def _model(seed: float):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({"w": Array(np.full((2, 3), seed, dtype=np.float32))})


def test_checkpoint_round_trip_is_atomic_and_checked(tmp_path):
    from flower_ext.records import arrays_sha256

    arrays = _model(1.5)
    velocity = np.arange(6, dtype=np.float32)
    save_checkpoint(
        tmp_path,
        Checkpoint(3, arrays, arrays_sha256(arrays), {"velocity": velocity}, {"n": 1}),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temp file left
    loaded = load_checkpoint(tmp_path)
    assert loaded.server_round == 3 and loaded.meta == {"n": 1}
    assert loaded.model_sha256 == arrays_sha256(arrays)
    np.testing.assert_array_equal(loaded.state_arrays["velocity"], velocity)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "elsewhere")


def test_strategy_state_survives_export_and_import():
    from flower_ext.strategies import FedAvg

    before = FedAvg(server_momentum=0.9)
    before._velocity = np.ones(4, dtype=np.float32)
    before.labels[7] = "bank-0"
    after = FedAvg(server_momentum=0.9)
    after.import_state(*before.export_state())
    np.testing.assert_array_equal(after._velocity, before._velocity)
    assert after.labels == {7: "bank-0"}


def test_metrics_resume_keeps_checkpointed_rounds(tmp_path):
    metrics = MetricsFile(tmp_path, {"num-server-rounds": 3})
    for r in (1, 2):
        metrics.add_round({"round": r})
    resumed = MetricsFile.resume(tmp_path, {"num-server-rounds": 3}, last_round=1)
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        [r["round"] for r in data["rounds"]] == [1] == [r["round"] for r in resumed.data["rounds"]]
    )
    assert data["status"] == "running" and data["resumed"][0]["from_round"] == 1


def _round(audit: AuditTrail, rnd: int, start: str, end: str | None) -> None:
    audit.record("round_start", round=rnd, phase="train", global_model_sha256=start)
    if end is not None:
        audit.record("round_aggregated", round=rnd, model_sha256=end)


def test_verify_accepts_a_resume_that_redoes_the_abandoned_round(tmp_path):
    audit = AuditTrail(tmp_path / "audit.jsonl")
    audit.record("run_start")
    _round(audit, 1, "m0", "m1")
    _round(audit, 2, "m1", None)  # the server died in round 2
    audit = AuditTrail(tmp_path / "audit.jsonl")  # a new server continues the chain
    audit.record("round_abandoned", round=2)
    audit.record("run_resumed", from_round=1, model_sha256="m1")
    _round(audit, 2, "m1", "m2")
    audit.record("run_end")
    result = verify_run(tmp_path)
    assert result.ok, result.summary()
    assert result.rounds_closed == 2
    assert any("resumed after round 1" in n for n in result.notes)


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        ({"from_round": 1, "model_sha256": "other"}, "did not produce"),
        ({"from_round": 2, "model_sha256": "m2"}, "never closed"),
    ],
)
def test_verify_rejects_a_resume_from_a_wrong_place(tmp_path, resume, message):
    audit = AuditTrail(tmp_path / "audit.jsonl")
    _round(audit, 1, "m0", "m1")
    audit.record("run_resumed", **resume)
    result = verify_run(tmp_path)
    assert not result.ok and message in result.summary()


def test_verify_rejects_a_redone_round_that_was_not_abandoned(tmp_path):
    audit = AuditTrail(tmp_path / "audit.jsonl")
    _round(audit, 1, "m0", "m1")
    _round(audit, 2, "m1", "m2")
    audit.record("run_resumed", from_round=1, model_sha256="m1")
    result = verify_run(tmp_path)
    assert not result.ok and "without round_abandoned" in result.summary()
