"""A local Flower deployment on loopback: TLS, SuperNode authentication, processes by pid.

Flower's deployment runtime is the distributed engine: one ``flower-superlink``
(Control, Fleet and Runtime APIs over one HTTPS port in flwr 1.42), one
``flower-supernode`` per bank, ``flwr run APP CONNECTION`` to start a run. This
module only prepares what those commands need and keeps track of what it started:

* :func:`generate_tls`: a private CA and a SuperLink certificate for
  ``127.0.0.1``/``localhost`` (``cryptography``; nothing is downloaded);
* :func:`generate_node_key`: a SuperNode's ECDSA P-384 key pair in OpenSSH format,
  the form ``flwr supernode register`` and ``--auth-supernode-private-key`` read;
* :func:`write_flwr_config`: a private ``$FLWR_HOME/config.toml`` naming the
  SuperLink connection that ``flwr run``/``flwr supernode register`` use;
* :class:`LocalDeployment`: starts and stops the processes, each in its own
  session, with a pid file per process; :meth:`LocalDeployment.stop_all` ends every
  process tree it started (the SuperLink's SuperExec and ServerApp, each SuperNode's
  SuperExec and ClientApps) and is safe to call twice, from another process too.

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_ext.audit.signing import SERVER_KEY_ENV, Signer

LOOPBACK = "127.0.0.1"
CONNECTION = "local"
#: Substrings that identify a process we may have started (a guard against pid reuse).
OUR_COMMANDS = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")


# --------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def generate_tls(
    directory: str | Path,
    hosts: Sequence[str] = (LOOPBACK, "localhost"),
    days: int = 30,
) -> TLSFiles:
    """A CA and a server certificate signed by it for ``hosts`` (IPs and DNS names).

    The CA key stays in ``directory`` (owner-only); a real federation keeps it offline.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower-ext local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(
        ca_cert=folder / "ca.crt",
        ca_key=folder / "ca.key",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
    )
    pem = serialization.Encoding.PEM
    _write_private(files.ca_key, _key_pem(ca_key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(files.server_key, _key_pem(server_key))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    return files


def generate_node_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair: (private key, ``.pub`` public key), OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / name
    public = folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode applies only to a new file: an old one keeps its own
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def install_bank_secret(source: str | Path, bank_dir: str | Path) -> Path:
    """Copy the banks' CKKS secret context into one bank's folder, owner-only (0600).

    ``source`` is ``bank-secret.ckks`` or the ``flower-ext keygen`` folder holding it.
    The copy is written atomically with mode 0600 even when a copy (with any mode)
    is already there, and checked to hold a secret key, so a SuperNode is never
    pointed at the server's public file by mistake.
    """
    from .crypto import SECRET_FILE, load_secret_context, write_private_file

    src = Path(os.path.expanduser(str(source)))
    if src.is_dir():
        src = src / SECRET_FILE
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist: run `flower-ext keygen DIR` first")
    data = src.read_bytes()
    load_secret_context(data)  # raises CryptoError unless it is a secret context
    folder = Path(os.path.expanduser(str(bank_dir)))
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_private_file(folder / SECRET_FILE, data)


def write_flwr_config(
    flwr_home: str | Path,
    address: str,
    root_certificates: str | Path | None,
    name: str = CONNECTION,
) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    security = (
        f'root-certificates = "{Path(root_certificates).resolve()}"'
        if root_certificates is not None
        else "insecure = true"
    )
    path = home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{address}"\n{security}\n'
    )
    return path


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_config_arg(values: Mapping[str, object]) -> str:
    """``--node-config`` text: strings quoted, numbers and booleans as TOML literals."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = "'" + str(value) + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


# --------------------------------------------------------------------------- processes
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now (Linux ``/proc``), parents first."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def session_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[3]) if fields is not None else None


def session_members(sessions: set[int]) -> list[int]:
    """Live processes in any of ``sessions`` (orphans included: they keep their session)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            if session_of(pid) in sessions and alive(pid):
                out.append(pid)
    return out


def kill_tree(pid: int, timeout: float = 10.0, first: int = signal.SIGTERM) -> None:
    """Signal ``pid``'s whole tree, then SIGKILL whatever is left of it.

    The tree is read while its root is alive (SuperExec processes run in sessions
    of their own). A process the tree starts while it shuts down, orphaned when its
    parent dies, is still found by its session: the root's session and every
    session the tree's processes lead.
    """
    tree = [p for p in process_tree(pid) if alive(p)]
    own = os.getsid(0)
    sessions = {s for p in tree if (s := session_of(p)) is not None and s != own}
    for p in tree:
        with suppress(ProcessLookupError, ChildProcessError):
            os.kill(p, first)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    time.sleep(0.3)  # a child started during the shutdown has its parent's session
    for p in {*tree, *session_members(sessions)}:
        if alive(p):
            with suppress(ProcessLookupError, ChildProcessError):
                os.kill(p, signal.SIGKILL)
    for p in tree:  # reap our own children so no zombie is left
        with suppress(ProcessLookupError, ChildProcessError):
            os.waitpid(p, os.WNOHANG)


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f}s")


# --------------------------------------------------------------------------- deployment
class LocalDeployment:
    """One SuperLink and any number of SuperNodes on loopback, tracked in ``workdir``.

    ``workdir`` holds ``tls/`` (CA + SuperLink certificate), ``keys/`` (SuperNode key
    pairs), ``flwr-home/config.toml`` (the ``local`` connection), ``logs/``,
    ``pids/<name>.pid`` and ``deployment.json`` (ports, settings). A second
    ``LocalDeployment(workdir)`` (e.g. ``deploy.py down`` in another shell) reads them.

    Parameters
    ----------
    workdir : path
        Where everything above is written. Keep it outside the Flower App directory,
        or ``flwr run`` would ship it inside the app bundle.
    tls : bool
        HTTPS with the generated CA (default). ``False`` runs ``--insecure``.
    auth : bool
        SuperNode authentication (``--enable-supernode-auth``): only nodes whose public
        key was registered (``flwr supernode register``) may connect. Needs TLS.
    database : path, optional
        SuperLink state file (``--database``); default: in memory.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        tls: bool = True,
        auth: bool = True,
        port: int | None = None,
        database: str | Path | None = None,
        bin_dir: str | Path | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        state_file = self.workdir / "deployment.json"
        saved = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.tls = bool(saved.get("tls", tls))
        self.auth = bool(saved.get("auth", auth))
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it otherwise)")
        self.port = int(saved.get("port") or port or free_port())
        self.database = saved.get("database", str(database) if database else None)
        self.node_ports: dict[str, int] = dict(saved.get("node_ports", {}))
        for sub in ("logs", "pids", "keys"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        if self.tls and not (self.workdir / "tls" / "ca.crt").is_file():
            generate_tls(self.workdir / "tls")
        write_flwr_config(self.flwr_home, self.address, self.ca_cert)
        self._save()

    # -- paths and settings
    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def ca_cert(self) -> Path | None:
        return self.workdir / "tls" / "ca.crt" if self.tls else None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # One audit signing key for every start of the server: a resumed run keeps
            # signing with the key the banks pinned in their receipts.
            SERVER_KEY_ENV: str(self.audit_key_path),
        }

    @property
    def audit_key_path(self) -> Path:
        return self.workdir / "keys" / "audit-signing.pem"

    def _save(self) -> None:
        (self.workdir / "deployment.json").write_text(
            json.dumps(
                {
                    "tls": self.tls,
                    "auth": self.auth,
                    "port": self.port,
                    "database": self.database,
                    "address": self.address,
                    "connection": CONNECTION,
                    "flwr_home": str(self.flwr_home),
                    "node_ports": self.node_ports,
                },
                indent=2,
            )
        )

    def pid_file(self, name: str) -> Path:
        return self.workdir / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _bin(self, tool: str) -> str:
        path = self.bin_dir / tool
        return str(path) if path.exists() else tool

    # -- processes
    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` in its own session, output to ``logs/<name>.log``, pid recorded."""
        log = self.log_file(name).open("ab")
        try:
            proc = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid_file(name).write_text(str(proc.pid))
        return proc

    def pid(self, name: str) -> int | None:
        path = self.pid_file(name)
        if not path.is_file():
            return None
        pid = int(path.read_text().strip() or 0)
        if pid and alive(pid) and any(c in cmdline(pid) for c in OUR_COMMANDS):
            return pid
        return None

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop process ``name`` and everything it started; its pid file goes."""
        pid = self.pid(name)
        if pid is not None:
            kill_tree(pid, timeout=timeout, first=sig)
        self.pid_file(name).unlink(missing_ok=True)

    def running(self) -> dict[str, int]:
        out = {}
        for path in sorted((self.workdir / "pids").glob("*.pid")):
            pid = self.pid(path.stem)
            if pid is not None:
                out[path.stem] = pid
        return out

    def stop_all(self, timeout: float = 10.0) -> None:
        """SuperNodes first, the SuperLink (with its SuperExec and ServerApp) last."""
        names = [p.stem for p in (self.workdir / "pids").glob("*.pid")]
        for name in sorted(names, key=lambda n: n == "superlink"):
            self.stop(name, timeout=timeout)

    # -- the SuperLink
    def start_superlink(self, wait: float = 60.0) -> subprocess.Popen:
        Signer.load_or_create(self.audit_key_path)  # 0600, kept across restarts
        command = [self._bin("flower-superlink")]
        if self.tls:
            tls = self.workdir / "tls"
            command += [
                "--ssl-ca-certfile",
                str(tls / "ca.crt"),
                "--ssl-certfile",
                str(tls / "server.pem"),
                "--ssl-keyfile",
                str(tls / "server.key"),
            ]
        else:
            command.append("--insecure")
        if self.auth:
            command.append("--enable-supernode-auth")
        if self.database:
            command += ["--database", str(self.database)]
        command += [
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
        ]
        proc = self.spawn("superlink", command)
        wait_for_port(self.port, proc, timeout=wait)
        return proc

    # -- SuperNodes
    def node_key(self, name: str) -> tuple[Path, Path]:
        """The key pair of SuperNode ``name`` (created on first use)."""
        private = self.workdir / "keys" / name
        if private.is_file():
            return private, private.with_name(f"{name}.pub")
        return generate_node_key(self.workdir / "keys", name)

    def register(self, name: str) -> int:
        """``flwr supernode register``: the SuperLink will accept ``name``'s key; its node id."""
        _, public = self.node_key(name)
        result = self.flwr(["supernode", "register", str(public), CONNECTION, "--format", "json"])
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed:\n{result.stdout}{result.stderr}")
        return int(json.loads(_json_tail(result.stdout))["node-id"])

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, object],
        *,
        key: str | None = None,
        max_wait_time: float | None = None,
    ) -> subprocess.Popen:
        """``flower-supernode`` for ``name``, authenticated with key ``key`` (default: its own).

        Each SuperNode gets its own Runtime API port (its ClientApps connect there).
        """
        port = self.node_ports.get(name) or free_port()
        self.node_ports[name] = port
        self._save()
        command = [self._bin("flower-supernode"), "--superlink", self.address]
        if self.tls:
            command += ["--root-certificates", str(self.ca_cert)]
        else:
            command.append("--insecure")
        if self.auth:
            private, _ = self.node_key(key or name)
            command += ["--auth-supernode-private-key", str(private)]
        if max_wait_time is not None:
            command += ["--max-wait-time", str(max_wait_time)]
        command += [
            "--isolation",
            "subprocess",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--node-config",
            node_config_arg(node_config),
        ]
        return self.spawn(name, command)

    def start_supernode_until_accepted(
        self,
        name: str,
        node_config: Mapping[str, object],
        *,
        timeout: float = 120.0,
        retry_every: float = 2.0,
    ) -> subprocess.Popen:
        """Start SuperNode ``name`` and retry until the SuperLink accepts it.

        With node authentication a node keeps its node id (its registered key), and
        the SuperLink activates that id only once the previous session is over: a
        crashed SuperNode is marked offline after 2 missed heartbeats (up to 60 s in
        flwr 1.42), and until then a restart is refused ("Failed to activate").
        """
        deadline = time.monotonic() + timeout
        log = self.log_file(name)
        while True:
            offset = log.stat().st_size if log.is_file() else 0
            proc = self.start_supernode(name, node_config)
            while proc.poll() is None:
                with log.open("rb") as fh:
                    fh.seek(offset)
                    if b"SuperNode ID:" in fh.read():
                        return proc
                time.sleep(0.25)
            kill_tree(proc.pid, timeout=2.0)  # reap it, so its SuperExec sees it gone
            if time.monotonic() + retry_every > deadline:
                raise TimeoutError(f"the SuperLink did not accept {name} within {timeout:.0f}s")
            time.sleep(retry_every)

    # -- the CLI
    def flwr(
        self, args: list[str], timeout: float = 120.0, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self._bin("flwr"), *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_command(
        self, app: str | Path, run_config: Mapping[str, object] | None = None, stream: bool = True
    ) -> list[str]:
        """The ``flwr run`` command line for ``app`` on this deployment."""
        command = [self._bin("flwr"), "run", str(app), CONNECTION]
        if stream:
            command.append("--stream")
        if run_config:
            command += ["--run-config", node_config_arg(run_config)]
        return command

    def start_run(
        self,
        app: str | Path,
        run_config: Mapping[str, object] | None = None,
        name: str = "flwr-run",
    ) -> subprocess.Popen:
        """``flwr run APP local --stream`` in the background (stopped by :meth:`stop_all`)."""
        return self.spawn(name, self.run_command(app, run_config))

    def superlink_rss_bytes(self) -> int:
        """Resident memory of the SuperLink process alone."""
        pid = self.pid("superlink")
        return rss_bytes([pid]) if pid else 0

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def find_processes(root: int, needle: str) -> list[int]:
    """Live processes under ``root`` whose command line contains ``needle``."""
    return [p for p in process_tree(root) if alive(p) and needle in cmdline(p)]


def _json_tail(text: str) -> str:
    start = text.find("{")
    return text[start:] if start >= 0 else text
