"""See and stop the local SuperLink that ``flwr run`` starts, and the runs in flight on it.

``flwr run`` (Flower 1.42) probes ``http://127.0.0.1:<port>/health`` (port from
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, default 39091) and, when nothing answers, starts a
detached ``flower-superlink`` that writes under ``<FLWR_HOME>/local-superlink/``. A later
``flwr run`` from another virtualenv or another ``FLWR_HOME`` silently reuses it: the run then
executes in the *first* environment and writes under the first Flower home. This module reads
``/proc`` (Linux only) to say which environment and Flower home a SuperLink belongs to, and
stops one SuperLink with everything it started, by pid, touching no other process.

Why sessions as well as parent links: ``flwr stop`` ends a run's ``flwr-simulation``, but Ray's
agents and ClientApp actors it started are re-parented to init and keep running. They keep
the session id of the process that started them (the SuperLink starts its SuperExec in a new
session), so "every process in a session whose leader descends from the SuperLink" finds them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_HTTP_PORT = 39091
PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"
RUN_PROCESS_NAMES = ("flwr-serverapp", "flwr-simulation", "flwr-clientapp", "flower-superexec")
PROC = Path("/proc")


class SuperLinkError(Exception):
    """A user-facing problem (one line, no traceback)."""


def on_linux() -> bool:
    return sys.platform.startswith("linux") and (PROC / "self" / "stat").exists()


def require_linux() -> None:
    if not on_linux():
        raise SuperLinkError(
            f"this command reads /proc and works on Linux only (this is {sys.platform}); "
            "use `flwr ls` and `flwr stop RUN_ID` to see and stop runs"
        )


def local_port() -> int:
    """The port ``flwr run`` probes and starts its local SuperLink on."""
    value = os.environ.get(PORT_ENV, str(DEFAULT_HTTP_PORT))
    try:
        return int(value)
    except ValueError as err:
        raise SuperLinkError(f"{PORT_ENV}={value!r} is not a port number") from err


def current_flwr_home() -> Path:
    """The Flower home this environment's ``flwr`` uses (``FLWR_HOME`` or ``~/.flwr``)."""
    from flwr.supercore.utils import get_flwr_home

    return _norm(get_flwr_home())


def current_prefix() -> Path:
    return _norm(Path(sys.prefix))


def _norm(path: Path | str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc/<pid>`` shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start: int  # clock ticks after boot: (pid, start) names a process, pid reuse aside
    argv: tuple[str, ...]
    uid: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def name(self) -> str:
        """The Flower program this is (``flower-superlink``, ``flwr-simulation``...), or argv[0]."""
        for arg in self.argv[:2]:
            base = os.path.basename(arg)
            if base.startswith(("flower-", "flwr-", "flwr")):
                return base
        return os.path.basename(self.argv[0]) if self.argv else ""

    def short(self, width: int = 100) -> str:
        text = " ".join(self.argv) or f"[{self.name or '?'}]"
        return text if len(text) <= width else text[: width - 3] + "..."


def read_proc(pid: int) -> Proc | None:
    """Read one process, or None if it is gone."""
    base = PROC / str(pid)
    try:
        stat = (base / "stat").read_text()
        raw = (base / "cmdline").read_bytes()
        uid = (base).stat().st_uid
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    # comm may hold spaces and parentheses: fields start after the last ')'
    rest = stat[stat.rindex(")") + 2 :].split()
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return Proc(
        pid=pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        state=rest[0],
        start=int(rest[19]),
        argv=argv,
        uid=uid,
    )


def scan() -> dict[int, Proc]:
    """Every process this user can see, by pid."""
    procs: dict[int, Proc] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            proc = read_proc(int(entry.name))
            if proc is not None:
                procs[proc.pid] = proc
    return procs


def process_tree(root: int, procs: Mapping[int, Proc]) -> dict[int, Proc]:
    """``root``, its descendants, and every process in a session one of them leads.

    The second part finds what a stopped run left behind: Ray agents and actors re-parented
    to init still carry the session id of the SuperExec that started their run.
    """
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    tree: dict[int, Proc] = {}
    todo = [root] if root in procs else []
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree[pid] = procs[pid]
        todo.extend(children.get(pid, []))
    leaders = {pid for pid, proc in tree.items() if proc.sid == pid}
    for proc in procs.values():
        if proc.sid in leaders and proc.pid not in tree:
            tree[proc.pid] = proc
    return tree


def _option(argv: Iterable[str], name: str) -> str | None:
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _environment_of(proc: Proc) -> tuple[Path | None, str]:
    """The ``sys.prefix`` a process runs with, and the interpreter it was judged from.

    A console script's shebang names the environment's own interpreter (argv[0]), which the
    kernel's ``exe`` link would resolve past the virtualenv to the base Python.
    """
    interpreter = proc.argv[0] if proc.argv else ""
    if not (os.path.isabs(interpreter) and "python" in os.path.basename(interpreter)):
        try:
            interpreter = os.readlink(PROC / str(proc.pid) / "exe")
        except OSError:
            return None, interpreter
    return _norm(Path(interpreter).parent.parent), interpreter


# --------------------------------------------------------------------------- SuperLinks


@dataclass
class SuperLink:
    """A running ``flower-superlink`` and what it belongs to."""

    proc: Proc
    host: str
    port: int | None
    prefix: Path | None
    interpreter: str
    flwr_home: Path | None
    log_file: str | None
    database: str | None
    run_processes: list[Proc] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def mismatches(self, prefix: Path, flwr_home: Path) -> list[str]:
        """How this SuperLink differs from the given environment and Flower home."""
        out = []
        if self.prefix is None:
            out.append("its Python environment is unknown")
        elif self.prefix != prefix:
            out.append(f"it runs in the Python environment {self.prefix}, not {prefix}")
        if self.flwr_home is None:
            out.append("its Flower home is unknown (not started by `flwr run`)")
        elif self.flwr_home != flwr_home:
            out.append(f"it writes under the Flower home {self.flwr_home}, not {flwr_home}")
        return out


def _is_superlink(proc: Proc) -> bool:
    return any(os.path.basename(a) == "flower-superlink" for a in proc.argv[:2])


def find_superlinks(procs: Mapping[int, Proc] | None = None) -> list[SuperLink]:
    """Every ``flower-superlink`` process visible on this machine, oldest first."""
    require_linux()
    procs = scan() if procs is None else procs
    links = []
    for proc in sorted(procs.values(), key=lambda p: (p.start, p.pid)):
        if not _is_superlink(proc) or proc.zombie:
            continue
        port_text = _option(proc.argv, "--port")
        log_file = _option(proc.argv, "--log-file")
        database = _option(proc.argv, "--database")
        home = None
        for path in (log_file, database):
            # flwr run's managed SuperLink: <FLWR_HOME>/local-superlink/{superlink.log,state.db}
            if path and Path(path).parent.name == "local-superlink":
                home = _norm(Path(path).parent.parent)
                break
        prefix, interpreter = _environment_of(proc)
        tree = process_tree(proc.pid, procs)
        runs = [
            p
            for p in tree.values()
            if p.pid != proc.pid and not p.zombie and p.name in RUN_PROCESS_NAMES
        ]
        links.append(
            SuperLink(
                proc=proc,
                host=_option(proc.argv, "--host") or "127.0.0.1",
                port=int(port_text) if port_text and port_text.isdigit() else None,
                prefix=prefix,
                interpreter=interpreter,
                flwr_home=home,
                log_file=log_file,
                database=database,
                run_processes=runs,
            )
        )
    return links


def health(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when a SuperLink's HTTP API answers ``/health`` (what ``flwr run`` checks)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def superlink_on_port(port: int, links: Iterable[SuperLink] | None = None) -> SuperLink | None:
    links = find_superlinks() if links is None else links
    for link in links:
        if link.port == port:
            return link
    return None


# --------------------------------------------------------------------------- flwr CLI


def flwr_cli(
    args: list[str], port: int, host: str = "127.0.0.1", timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr <args> target`` against exactly ``host:port``.

    A throw-away Flower home names the SuperLink by address, so ``flwr`` treats it as
    user-managed and never starts a SuperLink of its own (``:local:`` would, if this one
    had just stopped).
    """
    flwr = Path(sys.executable).parent / "flwr"
    command = [str(flwr) if flwr.exists() else "flwr", *args, "target"]
    with tempfile.TemporaryDirectory(prefix="flower-ext-flwr-") as home:
        Path(home, "config.toml").write_text(
            f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
            f'address = "{host}:{port}"\ninsecure = true\n'
        )
        env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_UPDATE_CHECK": "1"}
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )


def _json_of(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def list_runs(
    port: int, host: str = "127.0.0.1", run_id: int | None = None
) -> list[dict[str, Any]] | None:
    """``flwr ls --format json`` on that SuperLink; None when it does not answer."""
    if not health(port, host):
        return None
    args = ["ls", "--format", "json"] + (["--run-id", str(run_id)] if run_id is not None else [])
    try:
        result = flwr_cli(args, port, host)
    except (subprocess.TimeoutExpired, OSError):
        return None
    data = _json_of(result.stdout)
    if not data or not data.get("success"):
        return None
    return list(data.get("runs", []))


def in_flight(run: Mapping[str, Any]) -> bool:
    return not str(run.get("status", "")).startswith("finished")


def stop_run(run_id: int | str, port: int, host: str = "127.0.0.1") -> bool:
    """``flwr stop RUN_ID`` on that SuperLink; True when Flower accepted it."""
    try:
        result = flwr_cli(["stop", str(run_id), "--format", "json"], port, host)
    except (subprocess.TimeoutExpired, OSError):
        return False
    data = _json_of(result.stdout)
    return bool(data and data.get("success"))


# --------------------------------------------------------------------------- stopping


def _alive(proc: Proc) -> bool:
    """Still the same process (pid and start time) and not a zombie."""
    now = read_proc(proc.pid)
    return now is not None and now.start == proc.start and not now.zombie


def _signal(proc: Proc, sig: int) -> bool:
    if not _alive(proc):
        return False
    try:
        os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def terminate(procs: Iterable[Proc], grace: float = 5.0) -> tuple[list[Proc], list[Proc]]:
    """SIGTERM each process, SIGKILL what is left after ``grace`` seconds.

    Returns (killed with SIGKILL, still alive afterwards). Each pid is checked against its
    start time before every signal, so a reused pid is never signalled.
    """
    targets = list(procs)
    for proc in targets:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        time.sleep(0.1)
    forced = [p for p in targets if _signal(p, signal.SIGKILL)]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        time.sleep(0.1)
    return forced, [p for p in targets if _alive(p)]


@dataclass
class StopReport:
    superlink: SuperLink
    runs_stopped: list[str] = field(default_factory=list)
    stopped: list[Proc] = field(default_factory=list)
    forced: list[Proc] = field(default_factory=list)
    left: list[Proc] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"SuperLink pid {self.superlink.pid} on {self.superlink.address}:"]
        for run_id in self.runs_stopped:
            out.append(f"  flwr stop {run_id}: accepted")
        for proc in self.stopped:
            how = "SIGKILL" if proc in self.forced else "SIGTERM"
            out.append(f"  stopped pid {proc.pid} ({how}): {proc.short(80)}")
        for proc in self.left:
            out.append(f"  STILL RUNNING pid {proc.pid}: {proc.short(80)}")
        return out


def _ancestors() -> set[int]:
    """This process and its ancestors: never signalled, whatever sessions say."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        proc = read_proc(pid)
        pid = proc.ppid if proc else 0
    return out


def stop_superlink(link: SuperLink, grace: float = 5.0) -> StopReport:
    """Stop the runs in flight (``flwr stop``), then the SuperLink and all it started.

    Only processes of :func:`process_tree` of the SuperLink (as first seen, and as seen
    again after each step, plus anything in the sessions its members led) are signalled,
    by pid and start time.
    """
    require_linux()
    report = StopReport(link)
    first = process_tree(link.pid, scan())
    leaders = {pid for pid, p in first.items() if p.sid == pid}
    if link.port is not None:
        for run in list_runs(link.port, link.host) or []:
            if in_flight(run) and stop_run(run["run-id"], link.port, link.host):
                report.runs_stopped.append(str(run["run-id"]))
        if report.runs_stopped:
            # Give Flower the chance to end its runs cleanly before the signals.
            runs = [p for p in first.values() if p.name in RUN_PROCESS_NAMES[:3]]
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in runs):
                time.sleep(0.2)
    spare = _ancestors()
    seen: dict[int, Proc] = dict(first)
    for _ in range(3):  # a run may start processes while we stop it: look again
        procs = scan()
        members = dict(process_tree(link.pid, procs))
        members.update({p.pid: p for p in procs.values() if p.sid in leaders})
        members.update({p.pid: p for p in seen.values() if _alive(p)})
        targets = [p for p in members.values() if _alive(p) and p.pid not in spare]
        if not targets:
            break
        forced, left = terminate(targets, grace)
        report.forced += forced
        report.stopped += [p for p in targets if p not in left]
        seen.update({p.pid: p for p in targets})
    report.left = [p for p in seen.values() if _alive(p) and p.pid not in spare]
    return report


# --------------------------------------------------------------------------- reuse check


@dataclass
class ReuseCheck:
    """What ``flwr run`` would attach to on this machine's local port."""

    port: int
    answers: bool
    superlink: SuperLink | None
    problems: list[str]

    @property
    def foreign(self) -> bool:
        return bool(self.problems)

    def message(self) -> str:
        if not self.answers:
            return f"no SuperLink answers on 127.0.0.1:{self.port}; `flwr run` will start one"
        who = f"the SuperLink (pid {self.superlink.pid})" if self.superlink else "a SuperLink"
        if not self.problems:
            return f"`flwr run` will reuse {who} on 127.0.0.1:{self.port} (same environment)"
        return (
            f"`flwr run` would reuse {who} on 127.0.0.1:{self.port} started from another "
            f"environment: {'; '.join(self.problems)}. The run would execute there and write "
            f"there. Stop it (`flower-ext superlink stop`, from that environment) or set "
            f"{PORT_ENV} and {CONTROL_PORT_ENV} to free ports."
        )


def check_reuse(
    port: int | None = None, prefix: Path | None = None, flwr_home: Path | None = None
) -> ReuseCheck:
    """Would ``flwr run`` from this environment reuse a SuperLink from another one?"""
    port = local_port() if port is None else port
    prefix = current_prefix() if prefix is None else prefix
    flwr_home = current_flwr_home() if flwr_home is None else flwr_home
    if not health(port):
        return ReuseCheck(port, False, None, [])
    link = superlink_on_port(port) if on_linux() else None
    if link is None:
        problems = ["its process is not visible here (another user or container?)"]
        if not on_linux():
            problems = [f"its environment cannot be read on {sys.platform}"]
        return ReuseCheck(port, True, None, problems)
    return ReuseCheck(port, True, link, link.mismatches(prefix, flwr_home))
