"""The ``flower-ext`` command: reports, run comparison, audit verification, keys, and the
local SuperLink (see, stop, and a checked ``flwr run``).

flower-ext report RUN_DIR            report.html + PNGs in RUN_DIR
flower-ext compare RUN_DIR... [-o comparison.png]
flower-ext verify RUN_DIR [--receipts DIR ...] [--public-key KEY ...]
                                     exit 0 verified, 1 tampered or inconsistent, 2 unreadable
flower-ext keygen KEY_DIR [--force]  CKKS keys: bank-secret.ckks (banks), server-public.ckks
flower-ext superlink status|stop     the local SuperLink(s) and their runs
flower-ext run [--strict] [--timeout S] APP [flwr run options]   flwr run, checked, FINISHED/FAILED

User errors (a bad path, a missing run directory) end with exit code 2 and one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

SubcommandSetup = Callable[[argparse._SubParsersAction], None]  # type: ignore[type-arg]
SUBCOMMANDS: list[SubcommandSetup] = []

RUNS_WHERE = (
    "The bank app (apps/bank_risk) writes each run to <output-dir>/<run-name>/; by default "
    "~/flower-ext-runs/<timestamp>-<run id>/ (run config output-dir and run-name)."
)
DESCRIPTION = (
    "flower-ext: reports, run comparison and audit verification for flower-ext runs, CKKS keys "
    "for encrypted aggregation, and a safe way to see, stop and use the local SuperLink that "
    "flwr run starts."
)


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions as usual; keeps an "example:" epilog on its own lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UserError(Exception):
    """A mistake on the command line: one line on stderr, exit code 2."""


def subcommand(setup: SubcommandSetup) -> SubcommandSetup:
    """Register a subcommand (other modules add theirs, e.g. ``keygen``)."""
    SUBCOMMANDS.append(setup)
    return setup


def _run_dir(value: str) -> Path:
    path = Path(value)
    if not (path / "metrics.json").is_file() and not (path / "audit.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a run directory (no metrics.json)")
    return path


RUN_DIR_HELP = "a run directory, e.g. ~/flower-ext-runs/<timestamp>-<run id>"


def _readable_metrics(run_dir: Path) -> None:
    """A user error (exit 2, one line) if RUN_DIR's metrics.json is not a JSON object."""
    import json

    path = run_dir / "metrics.json"
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a run's metrics (a JSON {type(data).__name__})")


@subcommand
def _report(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="write report.html and PNG charts for a run",
        description="Write report.html and PNG charts into RUN_DIR, from its metrics.json "
        "and audit.jsonl. " + RUNS_WHERE,
    )
    p.add_argument("run_dir", type=_run_dir, metavar="RUN_DIR", help=RUN_DIR_HELP)

    def run(args: argparse.Namespace) -> int:
        _readable_metrics(args.run_dir)
        from .report import build_report

        report = build_report(args.run_dir)
        print(f"report: {report.html_path}")
        for name, path in report.charts.items():
            print(f"  {name}: {path}")
        return 0

    p.set_defaults(func=run)


@subcommand
def _compare(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "compare",
        help="one table (markdown) and chart across runs",
        description="Print one markdown table comparing runs and write a chart of AUC per "
        "round. " + RUNS_WHERE,
    )
    p.add_argument("run_dirs", type=_run_dir, nargs="+", metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument(
        "-o", "--output", default="comparison.png", help="PNG to write (default comparison.png)"
    )

    def run(args: argparse.Namespace) -> int:
        output = Path(args.output)
        folder = output.resolve().parent
        if not folder.exists():
            raise UserError(f"-o {args.output}: folder {folder} does not exist")
        if not folder.is_dir():
            raise UserError(f"-o {args.output}: {folder} is not a folder")
        if output.suffix.lower() != ".png" or output.is_dir():
            raise UserError(f"-o {args.output}: give a .png file to write")
        for run_dir in args.run_dirs:
            _readable_metrics(run_dir)
        from .report import compare_runs

        print(compare_runs(args.run_dirs, args.output))
        print(f"\nchart: {Path(args.output).resolve()}", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


@subcommand
def _verify(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "verify",
        help="check a run: audit chain, signatures, completeness, receipts, files",
        description="Check RUN_DIR: the audit trail's hash chain and story (rounds in order, "
        "each closed, models chained), the server's signatures (with --public-key, or the "
        "key the banks pinned in --receipts, else the key in the run directory), "
        "completeness (run_end, every planned round), the banks' receipts against the trail, "
        "and that metrics.json, checkpoint.npz and report.html agree with it. Prints what "
        "was verified and what was not. Exit 0 if verified, 1 if tampered or inconsistent "
        "(the first bad line and what is wrong), 2 if something cannot be read. " + RUNS_WHERE,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument(
        "--receipts",
        action="append",
        default=[],
        metavar="DIR",
        help="a bank's receipt directory (or a folder of them); repeatable",
    )
    p.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="KEY",
        help="the server's audit key the banks received: PEM file or 64 hex digits; repeatable",
    )

    def run(args: argparse.Namespace) -> int:
        from .audit.verify import verify_run

        path: Path = args.run_dir
        if not path.is_dir():
            raise UserError(f"{path}: no such run directory")
        if not (path / "audit.jsonl").is_file() and not (path / "metrics.json").is_file():
            raise UserError(f"{path} is not a run directory (no audit.jsonl, no metrics.json)")
        result = verify_run(path, public_keys=args.public_key, receipts=args.receipts)
        if not result.readable:
            raise UserError(result.summary())
        print(result.summary())
        return result.exit_code

    p.set_defaults(func=run)


@subcommand
def _keygen(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "keygen",
        help="generate CKKS keys for encrypted aggregation (secret: banks; public: server)",
        description="Write bank-secret.ckks (every bank, secret key), server-public.ckks "
        "(the server, no secret key) and keys.txt (fingerprint, parameters) into KEY_DIR, "
        "owner-only (0600). Defaults: N=4096 (2048 slots), moduli 56+53 bits "
        "(128-bit security), scale 2^32.",
    )
    p.add_argument("key_dir", type=Path)
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.add_argument("--poly-modulus-degree", type=int, default=None, help="N (default 4096)")
    p.add_argument(
        "--coeff-mod-bit-sizes", default=None, help="primes in bits, data first (default 56,53)"
    )
    p.add_argument("--scale-bits", type=int, default=None, help="log2 of the scale (default 32)")

    def run(args: argparse.Namespace) -> int:
        from dataclasses import replace

        from .crypto import DEFAULT_PARAMETERS, SECRET_FILE, CryptoError, write_keys

        params = DEFAULT_PARAMETERS
        try:
            if args.poly_modulus_degree is not None:
                params = replace(params, poly_modulus_degree=args.poly_modulus_degree)
            if args.coeff_mod_bit_sizes is not None:
                bits = tuple(int(b) for b in str(args.coeff_mod_bit_sizes).split(",") if b.strip())
                params = replace(params, coeff_mod_bit_sizes=bits)
            if args.scale_bits is not None:
                params = replace(params, scale_bits=args.scale_bits)
            keys = write_keys(args.key_dir, params, overwrite=args.force)
        except (CryptoError, FileExistsError, ValueError) as err:
            print(f"flower-ext keygen: {err}", file=sys.stderr)
            return 2
        print(f"fingerprint: {keys.fingerprint}")
        print(f"  {keys.secret}  -> every bank (node config he-secret-context); keep secret")
        print(f"  {keys.public}  -> the server (run config he-public-context)")
        print(
            f"  N={params.poly_modulus_degree} ({params.slots} slots), moduli "
            f"{'+'.join(map(str, params.coeff_mod_bit_sizes))} bits, scale 2^{params.scale_bits}"
        )
        print(f"never give {SECRET_FILE} to the server", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


def _fmt_path(path: object) -> str:
    return str(path) if path is not None else "unknown"


@subcommand
def _superlink(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "superlink",
        help="see or stop the local SuperLink that flwr run starts, and its runs",
        description="flwr run starts a detached local SuperLink (127.0.0.1:39091, or "
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT) and reuses it from any environment. 'status' "
        "shows each SuperLink on this machine: pid, port, the Python environment it runs in, "
        "its Flower home, whether both match yours, and its runs in flight. 'stop' stops the "
        "SuperLink of your Flower home: runs in flight with flwr stop, then the SuperLink and "
        "every process it started (SIGTERM, SIGKILL after --grace seconds), by pid. Linux only "
        "(reads /proc).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="{status,stop}")
    status = actions.add_parser(
        "status",
        help="list SuperLinks, their environment, Flower home and runs in flight",
        description="List every flower-superlink process on this machine with its pid, port, "
        "Python environment (from /proc/<pid>/cmdline), Flower home (from its --log-file / "
        "--database), whether they match this environment, its run processes, and its runs "
        "(flwr ls) where it answers. Exit 0.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    stop = actions.add_parser(
        "stop",
        help="stop the SuperLink of your Flower home and every process of its runs",
        description="Stop the local SuperLink of the current Flower home (FLWR_HOME or "
        "~/.flwr): each run in flight with flwr stop, then the SuperLink and all its "
        "descendant processes, including Ray processes a stopped run left behind (SIGTERM, "
        "then SIGKILL after --grace seconds), by pid; no other process is touched. A "
        "SuperLink of another Flower home is refused unless --force. Exit 0 when all stopped, "
        "1 if something survived, 2 when there is nothing to stop or it was refused.",
    )
    stop.add_argument("--port", type=int, help="only the SuperLink on this port")
    stop.add_argument("--pid", type=int, help="only the SuperLink with this pid")
    stop.add_argument(
        "--force", action="store_true", help="also stop a SuperLink of another Flower home"
    )
    stop.add_argument(
        "--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (5)"
    )

    def run(args: argparse.Namespace) -> int:
        from . import superlink as sl

        try:
            sl.require_linux()
            return _superlink_status(sl, args) if args.action == "status" else _stop(sl, args)
        except sl.SuperLinkError as err:
            raise UserError(str(err)) from err

    p.set_defaults(func=run)


def _superlink_status(sl, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    import json

    prefix, home, port = sl.current_prefix(), sl.current_flwr_home(), sl.local_port()
    links = sl.find_superlinks()
    entries = []
    for link in links:
        runs = sl.list_runs(link.port, link.host) if link.port else None
        entries.append(
            {
                "pid": link.pid,
                "address": link.address,
                "used_by_flwr_run_here": link.port == port,
                "python_environment": _fmt_path(link.prefix),
                "interpreter": link.interpreter,
                "flower_home": _fmt_path(link.flwr_home),
                "matches_this_environment": link.prefix == prefix,
                "matches_this_flower_home": link.flwr_home == home,
                "log_file": link.log_file,
                "run_processes": [{"pid": p.pid, "name": p.name} for p in link.run_processes],
                "runs": runs,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "environment": str(prefix),
                    "flower_home": str(home),
                    "local_port": port,
                    "superlinks": entries,
                },
                indent=2,
            )
        )
        return 0
    print(f"this environment: {prefix}")
    print(f"this Flower home: {home}")
    print(f"flwr run here uses: 127.0.0.1:{port}")
    if not entries:
        answering = sl.health(port)
        print(
            "no flower-superlink process visible"
            + (f" (but something answers on 127.0.0.1:{port})" if answering else "")
        )
        return 0
    for link, entry in zip(links, entries, strict=True):
        print()
        used = "  <- flwr run here would use this one" if entry["used_by_flwr_run_here"] else ""
        print(f"SuperLink pid {link.pid} on {link.address}{used}")
        mark = {True: "(matches)", False: "(DIFFERENT)"}
        print(
            f"  environment: {entry['python_environment']} "
            f"{mark[entry['matches_this_environment']]}"
        )
        print(f"  Flower home: {entry['flower_home']} {mark[entry['matches_this_flower_home']]}")
        if link.log_file:
            print(f"  log: {link.log_file}")
        for proc in link.run_processes:
            print(f"  process {proc.pid}: {proc.name}")
        runs = entry["runs"]
        if runs is None:
            print("  runs: not answering (flwr ls)")
        else:
            live = [r for r in runs if sl.in_flight(r)]
            print(f"  runs: {len(runs)} known, {len(live)} in flight")
            for r in live:
                print(f"    run {r.get('run-id')}: {r.get('status')} ({r.get('fab-id')})")
    return 0


def _stop(sl, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    home = sl.current_flwr_home()
    links = sl.find_superlinks()
    if args.pid is not None:
        chosen = [link for link in links if link.pid == args.pid]
        if not chosen:
            raise UserError(f"no flower-superlink with pid {args.pid}")
    elif args.port is not None:
        chosen = [link for link in links if link.port == args.port]
        if not chosen:
            raise UserError(f"no flower-superlink on port {args.port}")
    else:
        chosen = [link for link in links if link.flwr_home == home]
        if not chosen:
            others = ", ".join(f"pid {link.pid} ({_fmt_path(link.flwr_home)})" for link in links)
            raise UserError(
                f"no SuperLink of the Flower home {home} is running"
                + (f"; others: {others} (use --pid PID --force)" if others else "")
            )
    for link in chosen:
        if link.flwr_home != home and not args.force:
            raise UserError(
                f"SuperLink pid {link.pid} belongs to the Flower home "
                f"{_fmt_path(link.flwr_home)}, not {home}: not stopping it (--force to do so)"
            )
    survived = False
    for link in chosen:
        report = sl.stop_superlink(link, grace=args.grace)
        print("\n".join(report.lines()))
        survived = survived or bool(report.left)
    return 1 if survived else 0


@subcommand
def _run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="flwr run, after checking the local SuperLink; ends with FINISHED or FAILED",
        description="Run 'flwr run' with your arguments. First, for the local SuperLink, warn "
        "(or refuse, --strict) when the one that answers was started from another Python "
        "environment or Flower home, since the run would execute there; when none answers, "
        "set FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 for the one flwr run starts. "
        "Then wait for the run's final status (flwr ls) and print FINISHED or FAILED with the "
        "reason and where the outputs are. Exit 0 if the run completed, 1 if it failed or was "
        "stopped, 2 if refused, 124 on --timeout, 130 on Ctrl-C; on Ctrl-C or timeout the run "
        "is stopped with flwr stop. Options for flower-ext come before the app path. " + RUNS_WHERE,
        epilog="example:\n  flower-ext run apps/bank_risk --stream "
        '--federation-config "num-supernodes=5"',
        formatter_class=_Formatter,
    )
    p.add_argument("--strict", action="store_true", help="refuse instead of warning")
    p.add_argument("--timeout", type=float, help="stop the run after this many seconds")
    p.add_argument(
        "flwr_args",
        nargs=argparse.REMAINDER,
        metavar="APP [SUPERLINK] [flwr run options]",
        help="passed to flwr run as they are",
    )

    def run(args: argparse.Namespace) -> int:
        from .runwrap import run as run_wrapped

        if args.timeout is not None and args.timeout <= 0:
            raise UserError("--timeout must be > 0 seconds")
        return run_wrapped(args.flwr_args, strict=args.strict, timeout=args.timeout)

    p.set_defaults(func=run)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("flower-ext")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    try:
        flwr = version("flwr")
    except PackageNotFoundError:
        flwr = "not installed"
    return f"flower-ext {ours} (flwr {flwr}, Python {sys.version.split()[0]})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flower-ext",
        description=DESCRIPTION,
        epilog=RUNS_WHERE + " 'flower-ext COMMAND -h' for each command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for setup in SUBCOMMANDS:
        setup(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as err:
        print(f"flower-ext {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave: missing folder, no permission, ...
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"flower-ext {args.command}: {err.strerror or err}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
