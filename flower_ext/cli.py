"""The ``flower-ext`` command: reports, run comparison and audit verification.

flower-ext report RUN_DIR            report.html + PNGs in RUN_DIR
flower-ext compare RUN_DIR... [-o comparison.png]
flower-ext verify RUN_DIR            exit 0 if the audit trail is intact, 1 otherwise
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

SubcommandSetup = Callable[[argparse._SubParsersAction], None]  # type: ignore[type-arg]
SUBCOMMANDS: list[SubcommandSetup] = []


def subcommand(setup: SubcommandSetup) -> SubcommandSetup:
    """Register a subcommand (other modules add theirs, e.g. ``keygen``)."""
    SUBCOMMANDS.append(setup)
    return setup


def _run_dir(value: str) -> Path:
    path = Path(value)
    if not (path / "metrics.json").is_file() and not (path / "audit.jsonl").is_file():
        raise argparse.ArgumentTypeError(f"{value} is not a run directory (no metrics.json)")
    return path


@subcommand
def _report(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="write report.html and PNG charts for a run")
    p.add_argument("run_dir", type=_run_dir)

    def run(args: argparse.Namespace) -> int:
        from .report import build_report

        report = build_report(args.run_dir)
        print(f"report: {report.html_path}")
        for name, path in report.charts.items():
            print(f"  {name}: {path}")
        return 0

    p.set_defaults(func=run)


@subcommand
def _compare(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("compare", help="one table (markdown) and chart across runs")
    p.add_argument("run_dirs", type=_run_dir, nargs="+")
    p.add_argument("-o", "--output", default="comparison.png", help="PNG to write")

    def run(args: argparse.Namespace) -> int:
        from .report import compare_runs

        print(compare_runs(args.run_dirs, args.output))
        print(f"\nchart: {Path(args.output).resolve()}", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


@subcommand
def _verify(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="check a run's audit trail (chain, rounds, model hashes)")
    p.add_argument("run_dir", type=Path)

    def run(args: argparse.Namespace) -> int:
        from .runcheck import verify_run

        result = verify_run(args.run_dir)
        print(result.summary())
        return 0 if result.ok else 1

    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flower-ext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for setup in SUBCOMMANDS:
        setup(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
