"""Run the bank app on Flower's deployment runtime, on this machine, as banks would.

One SuperLink (HTTPS with a CA made here, SuperNode authentication on), one
SuperNode per bank (its own data by node config, its own key pair, its own copy of
the HE secret context when HE is on), then ``flwr run apps/bank_risk local``.
Every process started is recorded under ``<workdir>/pids`` and stopped by ``down``.

    python apps/bank_risk/deploy/deploy.py up --banks 3            # SuperLink + 3 SuperNodes
    python apps/bank_risk/deploy/deploy.py run -- num-server-rounds=3 min-banks=2
    python apps/bank_risk/deploy/deploy.py status
    python apps/bank_risk/deploy/deploy.py kill-bank 2             # a bank crashes ...
    python apps/bank_risk/deploy/deploy.py start-bank 2            # ... and comes back
    python apps/bank_risk/deploy/deploy.py down                    # stop everything (by pid)

``run`` prints the ``flwr run`` command it uses; with ``FLWR_HOME=<workdir>/flwr-home``
the same command works by hand. The workdir defaults to ``~/.flower-ext-deploy``;
keep it outside ``apps/bank_risk`` (``flwr run`` would bundle it).

Banks' data: the app's synthetic banks (``bank-index`` = 0..N-1), or
``--csv-dir DIR`` with ``DIR/bank-<i>.csv`` per bank (node config ``csv-path``: each
bank uses all rows of its own file; run with ``dataset="csv"`` and
``csv-source="per-bank"``, so the server needs no file), optionally with
``--csv-schema FILE`` (run config ``csv-schema``) for raw exports.
HE: ``--he-keys DIR`` (from ``flower-ext keygen DIR``) copies ``bank-secret.ckks`` into
each bank's folder and points its SuperNode at that copy; the server gets
``he-public-context`` = ``DIR/server-public.ckks``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from flower_ext.deploy import LocalDeployment, install_bank_secret, node_config_arg, rss_bytes

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("~/.flower-ext-deploy").expanduser()


def bank_name(i: int) -> str:
    return f"bank-{i}"


def bank_node_config(dep: LocalDeployment, i: int, settings: dict) -> dict[str, object]:
    # Each bank keeps its DP privacy ledger on its own disk, so a restarted
    # SuperNode (or a resumed run) does not start its epsilon at zero.
    ledger_dir = dep.workdir / "banks" / bank_name(i) / "privacy"
    config: dict[str, object] = {"bank-index": i, "ledger-dir": str(ledger_dir)}
    if settings.get("csv_dir"):
        config["csv-path"] = str(Path(settings["csv_dir"]) / f"bank-{i}.csv")
    if settings.get("he_keys"):
        # Each bank holds its own 0600 copy, as on its own machine, and says he = true
        # in its own node config: it then refuses to send plaintext whatever the run says.
        own = dep.workdir / "banks" / bank_name(i)
        config["he-secret-context"] = str(install_bank_secret(settings["he_keys"], own))
        config["he"] = True
    return config


def settings_file(dep: LocalDeployment) -> Path:
    return dep.workdir / "banks.json"


def load_settings(dep: LocalDeployment) -> dict:
    path = settings_file(dep)
    return json.loads(path.read_text()) if path.is_file() else {}


def start_bank(dep: LocalDeployment, i: int, settings: dict, rejoin: bool = False) -> None:
    name = bank_name(i)
    if dep.pid(name) is not None:
        print(f"{name} is already running (pid {dep.pid(name)})")
        return
    config = bank_node_config(dep, i, settings)
    if rejoin and dep.auth:
        # Same key, same node id: accepted once the SuperLink has marked the old
        # session offline (2 missed heartbeats, up to 60 s after a crash).
        print(f"restarting {name}; waiting until the SuperLink accepts it again ...")
        dep.start_supernode_until_accepted(name, config, timeout=120)
    else:
        dep.start_supernode(name, config)
    print(f"started {name} (pid {dep.pid(name)}), log {dep.log_file(name)}")


def cmd_up(args: argparse.Namespace) -> int:
    dep = LocalDeployment(
        args.workdir, tls=not args.insecure, auth=not args.no_auth, port=args.port
    )
    settings = {
        "banks": args.banks,
        "csv_dir": str(Path(args.csv_dir).resolve()) if args.csv_dir else "",
        "csv_schema": str(Path(args.csv_schema).resolve()) if args.csv_schema else "",
        "he_keys": str(Path(args.he_keys).resolve()) if args.he_keys else "",
    }
    settings_file(dep).write_text(json.dumps(settings, indent=2))
    try:
        if dep.pid("superlink") is None:
            dep.start_superlink()
        print(
            f"SuperLink {dep.address} ({'TLS' if dep.tls else 'INSECURE'}, "
            f"node auth {'on' if dep.auth else 'off'}), pid {dep.pid('superlink')}"
        )
        for i in range(args.banks):
            if dep.auth:
                node_id = dep.register(bank_name(i))
                print(f"registered {bank_name(i)}: node id {node_id}")
            start_bank(dep, i, settings)
    except BaseException:
        dep.stop_all()  # nothing half-started is left running
        raise
    print(f"\nFLWR_HOME={dep.flwr_home}\n{' '.join(run_command(dep, []))}")
    return 0


def run_command(dep: LocalDeployment, overrides: list[str]) -> list[str]:
    settings = load_settings(dep)
    config: dict[str, object] = {"num-banks": int(settings.get("banks", 3))}
    if settings.get("csv_dir"):
        config["dataset"] = "csv"
        config["csv-source"] = "per-bank"  # each bank's node config csv-path, all its rows
    if settings.get("csv_schema"):
        config["csv-schema"] = settings["csv_schema"]
    if settings.get("he_keys"):
        config["he"] = True
        config["he-public-context"] = str(Path(settings["he_keys"]) / "server-public.ckks")
    text = node_config_arg(config)
    if overrides:
        text += " " + " ".join(overrides)
    return ["flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", text]


def cmd_run(args: argparse.Namespace) -> int:
    dep = LocalDeployment(args.workdir)
    command = run_command(dep, args.overrides)
    print("FLWR_HOME=" + str(dep.flwr_home), " ".join(repr(c) if " " in c else c for c in command))
    return subprocess.call(command, env=dep.env)


def cmd_status(args: argparse.Namespace) -> int:
    dep = LocalDeployment(args.workdir)
    running = dep.running()
    for name, pid in running.items():
        print(f"{name:12s} pid {pid:7d}  rss {rss_bytes([pid]) / 2**20:7.1f} MiB")
    if not running:
        print("nothing running")
    elif dep.pid("superlink") is not None:
        listing = dep.flwr(["supernode", "ls", "local"])
        print(listing.stdout)
    return 0


def cmd_kill_bank(args: argparse.Namespace) -> int:
    dep = LocalDeployment(args.workdir)
    sig = signal.SIGTERM if args.graceful else signal.SIGKILL
    dep.stop(bank_name(args.index), sig=sig)
    print(f"stopped {bank_name(args.index)} ({signal.Signals(sig).name})")
    return 0


def cmd_start_bank(args: argparse.Namespace) -> int:
    dep = LocalDeployment(args.workdir)
    start_bank(dep, args.index, load_settings(dep), rejoin=True)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    dep = LocalDeployment(args.workdir)
    names = list(dep.running())
    dep.stop_all()
    time.sleep(0.2)
    print("stopped: " + (", ".join(names) if names else "nothing was running"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the SuperLink and one SuperNode per bank")
    up.add_argument("--banks", type=int, default=3)
    up.add_argument("--port", type=int, default=None, help="SuperLink port (default: free)")
    up.add_argument("--insecure", action="store_true", help="plain HTTP (implies --no-auth)")
    up.add_argument("--no-auth", action="store_true", help="accept any SuperNode")
    up.add_argument("--csv-dir", help="DIR with bank-<i>.csv for each bank")
    up.add_argument("--csv-schema", help="schema TOML for the banks' files (csv-schema)")
    up.add_argument("--he-keys", help="DIR from `flower-ext keygen` (he = true)")
    run = sub.add_parser("run", help="flwr run the bank app on this deployment")
    run.add_argument("overrides", nargs="*", help="run-config key=value pairs")
    sub.add_parser("status", help="what is running")
    kill = sub.add_parser("kill-bank", help="stop one bank's SuperNode (a crash by default)")
    kill.add_argument("index", type=int)
    kill.add_argument("--graceful", action="store_true", help="SIGTERM instead of SIGKILL")
    start = sub.add_parser("start-bank", help="(re)start one bank's SuperNode")
    start.add_argument("index", type=int)
    sub.add_parser("down", help="stop everything this deployment started")
    args = parser.parse_args(argv)
    if args.command == "up" and args.insecure:
        args.no_auth = True
    handlers = {
        "up": cmd_up,
        "run": cmd_run,
        "status": cmd_status,
        "kill-bank": cmd_kill_bank,
        "start-bank": cmd_start_bank,
        "down": cmd_down,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
