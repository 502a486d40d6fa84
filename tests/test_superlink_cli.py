"""The local SuperLink, for real: ``flower-superlink`` processes on free ports, each with its
own Flower home (FLWR_HOME) and, for "another environment", its own virtualenv.

Every process a test starts is stopped by pid in a fixture's finally, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flower_ext import superlink as sl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sl.on_linux(), reason="reads /proc"),
]

BIN = Path(sys.executable).parent
PROC_TIMEOUT = 240  # a ceiling against hangs, not a timing assertion
SLEEP = ["--stream", "-c", "mode='sleep'"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path, port: int, control_port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        sl.PORT_ENV: str(port),
        sl.CONTROL_PORT_ENV: str(control_port),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        **extra,
    }


class Link:
    """A SuperLink started as ``flwr run`` starts its local one (same arguments)."""

    def __init__(self, root: Path, name: str, python: Path = BIN / "python") -> None:
        self.home = root / name
        self.port, self.control_port = _free_port(), _free_port()
        self.env = _env(self.home, self.port, self.control_port)
        runtime = self.home / "local-superlink"
        runtime.mkdir(parents=True)
        command = [
            str(python),
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-file",
            str(runtime / "superlink.log"),
            "--database",
            str(runtime / "state.db"),
        ]
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + PROC_TIMEOUT
        while not sl.health(self.port):
            assert self.process.poll() is None, f"flower-superlink exited: {runtime}"
            assert time.monotonic() < deadline, "flower-superlink did not answer"
            time.sleep(0.3)
        self.first = sl.read_proc(self.process.pid)

    def tree(self) -> dict[int, sl.Proc]:
        return sl.process_tree(self.process.pid, sl.scan())

    def cleanup(self) -> None:
        """Stop what this test started and is still running (by pid, start time checked)."""
        leftovers = [p for p in self.tree().values() if p.pid != os.getpid()]
        sl.terminate(leftovers, grace=3.0)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def links(tmp_path):
    started: list[Link] = []

    def start(name: str, python: Path = BIN / "python") -> Link:
        link = Link(tmp_path, name, python)
        started.append(link)
        return link

    try:
        yield start
    finally:
        for link in started:
            link.cleanup()


def _other_venv(tmp_path: Path) -> Path:
    """A real second virtualenv (its own sys.prefix) that sees this one's packages."""
    venv = tmp_path / "other-venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    Path(site, "flower-ext-test.pth").write_text("\n".join(ours) + "\n")
    prefix = subprocess.run(
        [str(python), "-c", "import sys, flwr; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    assert Path(prefix).resolve() == venv.resolve() != Path(sys.prefix).resolve()
    return python


def _flower_ext(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flower_ext.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROC_TIMEOUT,
    )


TINY_APP = {
    "pyproject.toml": """
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "tinyapp"
        version = "0.1.0"
        description = "test app"
        license = "Apache-2.0"
        dependencies = []

        [tool.hatch.build.targets.wheel]
        packages = ["tinyapp"]

        [tool.flwr.app]
        publisher = "test"

        [tool.flwr.app.components]
        serverapp = "tinyapp.apps:server"
        clientapp = "tinyapp.apps:client"

        [tool.flwr.app.config]
        mode = "ok"
        """,
    "tinyapp/__init__.py": "",
    "tinyapp/apps.py": """
        import time

        from logging import INFO

        from flwr.app import Context
        from flwr.clientapp import ClientApp
        from flwr.common.logger import log
        from flwr.serverapp import Grid, ServerApp

        server = ServerApp()
        client = ClientApp()


        @server.main()
        def main(grid: Grid, context: Context) -> None:
            mode = context.run_config["mode"]
            log(INFO, "outputs in /tmp/tinyapp-outputs")
            if mode == "raise":
                raise RuntimeError("tiny app failed on purpose")
            if mode == "sleep":
                time.sleep(600)
        """,
}


@pytest.fixture
def tiny_app(tmp_path) -> Path:
    root = tmp_path / "tinyapp-src"
    for name, text in TINY_APP.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def test_warns_when_run_would_reuse_a_superlink_of_another_environment(links, tmp_path, tiny_app):
    first = links("home-first-user", python=_other_venv(tmp_path))
    # "Another user": this venv, another Flower home, same local port as the first one.
    env = _env(tmp_path / "home-second-user", first.port, first.control_port)

    status = _flower_ext(["superlink", "status"], env)
    assert status.returncode == 0, status.stderr
    block = status.stdout.split(f"SuperLink pid {first.process.pid} ")[1]
    assert "flwr run here would use this one" in block.splitlines()[0]
    assert f"environment: {(tmp_path / 'other-venv').resolve()} (DIFFERENT)" in block
    assert f"Flower home: {first.home.resolve()} (DIFFERENT)" in block

    as_json = _flower_ext(["superlink", "status", "--json"], env)
    entries = json.loads(as_json.stdout)["superlinks"]
    (entry,) = [e for e in entries if e["pid"] == first.process.pid]
    assert entry["used_by_flwr_run_here"] and entry["runs"] == []
    assert not entry["matches_this_environment"] and not entry["matches_this_flower_home"]

    refused = _flower_ext(["run", "--strict", str(tiny_app), "--stream"], env)
    assert refused.returncode == 2
    assert "refusing: `flwr run` would reuse the SuperLink" in refused.stderr
    assert "another environment" in refused.stderr
    assert str(first.home.resolve()) in refused.stderr
    assert sl.list_runs(first.port) == []  # nothing was submitted to it

    # Without --strict: the warning, then flwr run's own error (the app path is wrong, so
    # nothing runs on the first user's SuperLink), FAILED and a non-zero exit.
    warned = _flower_ext(["run", str(tmp_path / "no-such-app")], env)
    assert "WARNING: `flwr run` would reuse the SuperLink" in warned.stderr
    assert "FAILED" in warned.stderr and warned.returncode != 0
    assert sl.list_runs(first.port) == []

    # The same environment and Flower home as the SuperLink: no warning.
    same = sl.check_reuse(first.port, prefix=first_prefix(first), flwr_home=first.home.resolve())
    assert same.answers and not same.foreign


def first_prefix(link: Link) -> Path:
    (found,) = [s for s in sl.find_superlinks() if s.pid == link.process.pid]
    assert found.prefix is not None
    return found.prefix


def _submit_sleeping_run(link: Link, app: Path) -> str:
    result = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "--run-config", "mode='sleep'", "--format", "json"],
        env=link.env,
        capture_output=True,
        text=True,
        timeout=PROC_TIMEOUT,
    )
    run_id = sl._json_of(result.stdout)
    assert run_id and run_id.get("success"), result.stdout + result.stderr
    return str(run_id["run-id"])


def test_stop_leaves_nothing_of_that_superlink_and_spares_another(links, tiny_app):
    mine = links("home-a")
    other = links("home-b")
    run_id = _submit_sleeping_run(mine, tiny_app)
    deadline = time.monotonic() + PROC_TIMEOUT
    while not any(p.name == "flwr-simulation" for p in mine.tree().values()):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.5)
    time.sleep(3)  # let the run start Ray's processes too
    before = {p.pid: p for p in mine.tree().values() if not p.zombie}
    other_before = {p.pid: p for p in other.tree().values() if not p.zombie}
    assert len(before) >= 3  # SuperLink, SuperExec, flwr-simulation (+ Ray)

    # Not mine: refused without --force, and untouched.
    refused = _flower_ext(["superlink", "stop", "--port", str(other.port)], mine.env)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert sl.health(other.port)

    stopped = _flower_ext(["superlink", "stop", "--grace", "3"], mine.env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"flwr stop {run_id}: accepted" in stopped.stdout
    assert f"stopped pid {mine.process.pid}" in stopped.stdout
    mine.process.wait(timeout=60)  # ours to reap: it is this test's child

    survivors = [p for p in before.values() if sl._alive(p)]
    assert survivors == [], [p.short() for p in survivors]
    assert not [p for p in sl.scan().values() if p.sid in before and not p.zombie]
    assert not sl.health(mine.port)

    # The other SuperLink and all its processes are untouched and still answer.
    assert all(sl._alive(p) for p in other_before.values())
    assert sl.health(other.port) and sl.list_runs(other.port) == []


def test_run_reports_failed_then_finished(tmp_path, tiny_app):
    home, port, control = tmp_path / "home-run", _free_port(), _free_port()
    env = _env(home, port, control)
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")  # the wrapper sets it
    try:
        failed = _flower_ext(["run", str(tiny_app), "--stream", "-c", "mode='raise'"], env)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "FAILED: run " in failed.stderr
        assert "finished:failed: Simulation failed with exception: tiny app failed on purpose" in (
            failed.stderr
        )
        assert "DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in failed.stderr
        assert "outputs: /tmp/tinyapp-outputs" in failed.stderr
        assert f"SuperLink log: {home.resolve()}/local-superlink/superlink.log" in failed.stderr
        (link,) = [s for s in sl.find_superlinks() if s.port == port]
        environ = Path(f"/proc/{link.pid}/environ").read_bytes().split(b"\0")
        assert b"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in environ
        assert link.flwr_home == home.resolve()

        ok = _flower_ext(["run", str(tiny_app)], env)  # no --stream: it waits for the end
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "FINISHED: run " in ok.stderr and "WARNING" not in ok.stderr

        # Ctrl-C while the run is in flight: the wrapper stops that run with flwr stop.
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "flower_ext.cli", "run", str(tiny_app), *SLEEP],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watchdog = threading.Timer(PROC_TIMEOUT, wrapper.kill)
        watchdog.start()
        try:
            assert wrapper.stdout is not None
            run_id = None
            for line in wrapper.stdout:
                if match := re.search(r"Successfully started run (\d+)", line):
                    run_id = match.group(1)
                    break
            assert run_id, "no run id printed"
            wrapper.send_signal(signal.SIGINT)
            _, err = wrapper.communicate(timeout=PROC_TIMEOUT)
        finally:
            watchdog.cancel()
        assert wrapper.returncode == 130, err
        assert f"FAILED: run {run_id} interrupted; stopped with `flwr stop`" in err
        deadline = time.monotonic() + PROC_TIMEOUT
        while (runs := sl.list_runs(port, run_id=int(run_id))) and sl.in_flight(runs[0]):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert runs and runs[0]["status"] == "finished:stopped"
    finally:
        for link in [s for s in sl.find_superlinks() if s.port == port]:
            sl.stop_superlink(link, grace=3.0)
