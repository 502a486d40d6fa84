"""``flower-ext run``: ``flwr run`` that checks the local SuperLink first and ends plainly.

Flower 1.42's ``flwr run --stream`` exits 0 whatever the ServerApp did, and silently reuses a
local SuperLink started from another environment. This wrapper:

1. when the connection is the local SuperLink (``:local:``), checks what answers on its port
   and warns (or, with ``--strict``, refuses) when that SuperLink belongs to another Python
   environment or Flower home; when none answers, sets
   ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` for the SuperLink ``flwr run`` will start
   (unless the variable is already set), since flower-ext is installed here, not on PyPI;
2. runs ``flwr run`` with the user's arguments, passing its output through;
3. waits for the run's final status (``flwr ls --run-id ID --format json``) and prints
   ``FINISHED`` or ``FAILED`` with Flower's reason and where the outputs are; exits 0 only for
   a completed run;
4. on Ctrl-C, SIGTERM or ``--timeout``, stops the run it started with ``flwr stop``.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import superlink as sl

DEP_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
LOCAL_ADDRESSES = (":local:", ":local-in-memory:")
# flwr run's options that take a value (flwr 1.42); the rest are flags
VALUE_OPTIONS = {"--federation", "--run-config", "-c", "--federation-config", "--format"}
RUN_ID_PATTERNS = (
    re.compile(r"Successfully started run (\d+)"),
    re.compile(r'"run-id":\s*"?(\d+)'),
)
# where an app says it writes (the bank app's log line; a generic "outputs in/at/to PATH")
OUTPUT_PATTERNS = (
    re.compile(r"writing metrics and audit trail to (\S+)"),
    re.compile(r"(?:outputs?|results?) (?:in|at|to|written to):? (/\S+)", re.IGNORECASE),
)
EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 124, 130


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the wrapper."""


@dataclass
class Outcome:
    status: str  # Flower's: finished:completed, finished:failed, finished:stopped, ... or ""
    details: str
    run_id: str | None

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def positionals(flwr_args: Sequence[str]) -> list[str]:
    """``[APP, SUPERLINK]`` as far as given, skipping flwr run's options and their values."""
    out, skip = [], False
    for arg in flwr_args:
        if skip:
            skip = False
        elif arg in VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def connection_address(superlink_name: str | None) -> str | None:
    """The address of the connection ``flwr run`` will use (Flower home's ``config.toml``)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    config = sl.current_flwr_home() / "config.toml"
    if not config.is_file():
        return ":local:"  # flwr writes a default config whose default connection is local
    try:
        data = tomllib.loads(config.read_text()).get("superlink", {})
    except (OSError, ValueError):
        return None
    name = superlink_name or data.get("default")
    entry = data.get(name) if isinstance(name, str) else None
    if not isinstance(entry, dict):
        return None
    address = entry.get("address")
    return str(address) if address is not None else ":local:"  # options-only: Flower's local


def parse_run_id(line: str) -> str | None:
    for pattern in RUN_ID_PATTERNS:
        if match := pattern.search(line):
            return match.group(1)
    return None


def parse_output_dir(line: str) -> str | None:
    for pattern in OUTPUT_PATTERNS:
        if match := pattern.search(line):
            return match.group(1).rstrip(".,;'\"")
    return None


def outcome_from_ls(runs: list[dict[str, Any]] | None, run_id: str) -> Outcome | None:
    """The final status of ``run_id`` in ``flwr ls --format json``'s runs; None while running."""
    for run in runs or []:
        if str(run.get("run-id")) == str(run_id):
            if sl.in_flight(run):
                return None
            details = str(run.get("status-details") or "")
            return Outcome(str(run.get("status")), "" if details == "N/A" else details, run_id)
    return None


def _user_flwr_ls(run_id: str, superlink_name: str | None) -> list[dict[str, Any]] | None:
    """``flwr ls`` on a user-managed connection, in the user's own Flower home."""
    flwr = Path(sys.executable).parent / "flwr"
    command = [str(flwr) if flwr.exists() else "flwr", "ls", "--run-id", run_id, "--format"]
    command += ["json"] + ([superlink_name] if superlink_name else [])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None
    data = sl._json_of(result.stdout)
    return list(data.get("runs", [])) if data and data.get("success") else None


class Wrapper:
    def __init__(self, flwr_args: Sequence[str], strict: bool, timeout: float | None) -> None:
        self.flwr_args = list(flwr_args)
        self.strict = strict
        self.timeout = timeout
        names = positionals(self.flwr_args)
        self.superlink_name = names[1] if len(names) > 1 else None
        self.address = connection_address(self.superlink_name)
        self.local = self.address in LOCAL_ADDRESSES
        self.port = sl.local_port()
        self.run_id: str | None = None
        self.output_dir: str | None = None
        self.flwr_home = sl.current_flwr_home()
        flwr = Path(sys.executable).parent / "flwr"
        self.flwr = [str(flwr) if flwr.exists() else "flwr"]  # this environment's flwr

    def say(self, text: str) -> None:
        print(f"flower-ext run: {text}", file=sys.stderr, flush=True)

    # -- before
    def preflight(self, env: dict[str, str]) -> int | None:
        if not self.local:
            return None
        check = sl.check_reuse(self.port)
        if check.foreign:
            self.say(("refusing: " if self.strict else "WARNING: ") + check.message())
            if self.strict:
                return EXIT_USAGE
        elif not check.answers and DEP_ENV not in env:
            env[DEP_ENV] = "1"
            self.say(
                f"no local SuperLink on 127.0.0.1:{self.port}; `flwr run` starts one "
                f"({DEP_ENV}=1: it uses this environment's packages)"
            )
        return None

    # -- final status
    def runs(self) -> list[dict[str, Any]] | None:
        if self.run_id is None:
            return None
        if self.local:
            return sl.list_runs(self.port, run_id=int(self.run_id))
        return _user_flwr_ls(self.run_id, self.superlink_name)

    def stop(self) -> bool:
        if self.run_id is None:
            return False
        if self.local:
            return sl.stop_run(self.run_id, self.port)
        command = [*self.flwr, "stop", self.run_id]
        command += [self.superlink_name] if self.superlink_name else []
        try:
            return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            return False

    def _remaining(self, deadline: float | None) -> float:
        return 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))

    def execute(self) -> int:
        env = dict(os.environ)
        refused = self.preflight(env)
        if refused is not None:
            return refused
        env["PYTHONUNBUFFERED"] = "1"
        command = [*self.flwr, "run", *self.flwr_args]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        previous = {
            sig: signal.signal(sig, self._interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        child: subprocess.Popen[str] | None = None
        try:
            child = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(child, lines), daemon=True).start()
            done = False
            while not done:
                if deadline is not None and time.monotonic() >= deadline:
                    return self._abort(child, "timed out", EXIT_TIMEOUT)
                try:
                    line = lines.get(timeout=self._remaining(deadline) or 0.01)
                except queue.Empty:
                    continue
                if line is None:
                    done = True
                    continue
                # Record first, then echo: a Ctrl-C right after the user sees the run id
                # must still stop that run.
                self.run_id = self.run_id or parse_run_id(line)
                self.output_dir = self.output_dir or parse_output_dir(line)
                sys.stdout.write(line)
                sys.stdout.flush()
            code = child.wait()
            if self.run_id is None:
                return self._report(
                    Outcome("", f"`flwr run` exited with code {code} before a run started", None)
                )
            while True:  # without --stream, flwr run returns once the run is submitted
                outcome = outcome_from_ls(self.runs(), self.run_id)
                if outcome is not None:
                    return self._report(outcome)
                if deadline is not None and time.monotonic() >= deadline:
                    return self._abort(child, "timed out", EXIT_TIMEOUT)
                time.sleep(1.0)
        except Interrupted:
            return self._abort(child, "interrupted", EXIT_INTERRUPTED)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _interrupt(self, signum: int, frame: object) -> None:
        raise Interrupted

    def _abort(self, child: subprocess.Popen[str] | None, why: str, code: int) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the stop
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        if self.run_id is None:
            self.say(
                f"FAILED: {why} before a run id was printed; see `flower-ext superlink status`"
            )
            return code
        stopped = self.stop()
        verb = "stopped with `flwr stop`" if stopped else "`flwr stop` was refused"
        self.say(f"FAILED: run {self.run_id} {why}; {verb}")
        self._where()
        return code

    def _where(self) -> None:
        if self.output_dir:
            self.say(f"outputs: {self.output_dir}")
        if self.local:
            log = self.flwr_home / "local-superlink" / "superlink.log"
            check = sl.superlink_on_port(self.port) if sl.on_linux() else None
            if check is not None and check.log_file:
                log = Path(check.log_file)
            self.say(f"SuperLink log: {log}; the run's log: flwr log {self.run_id}")

    def _report(self, outcome: Outcome) -> int:
        if outcome.ok:
            self.say(f"FINISHED: run {outcome.run_id} completed")
        else:
            status = outcome.status or "not started"
            reason = outcome.details or "no reason given by Flower"
            prefix = f"run {outcome.run_id} " if outcome.run_id else ""
            self.say(f"FAILED: {prefix}{status}: {reason}")
        if outcome.run_id:
            self._where()
        return 0 if outcome.ok else EXIT_FAILED


def _pump(child: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        lines.put(line)
    lines.put(None)


def run(flwr_args: Sequence[str], strict: bool = False, timeout: float | None = None) -> int:
    args = list(flwr_args)
    if args and args[0] == "--":
        args = args[1:]
    return Wrapper(args, strict, timeout).execute()
