"""The ``flower-ext`` command: reports, run comparison and audit verification.

flower-ext report RUN_DIR            report.html + PNGs in RUN_DIR
flower-ext compare RUN_DIR... [-o comparison.png]
flower-ext verify RUN_DIR            exit 0 if the audit trail is intact, 1 otherwise
flower-ext keygen KEY_DIR [--force]  CKKS keys: bank-secret.ckks (banks), server-public.ckks
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flower-ext", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for setup in SUBCOMMANDS:
        setup(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
