"""The UCI card-default table through the schema path, as banks would export it.

Not run by the test suite. Needs ``../shared/data/uci_default_credit_card.csv`` (or
``--csv``); prints ``{"skipped": ...}`` without it. From the table it writes one raw
export per bank (split by EDUCATION 1/2/3, the README's natural split) the way bank
exports come: ``;``-separated, an unnamed pandas index column, the label as
``yes``/``no``, amounts as ``$20,000.00``, SEX and MARRIAGE as text. Then it runs the
bank app on Flower's simulation twice on the same banks:

- ``numeric-table``: the original numeric table, the strict loader, EDUCATION split
  (EDUCATION stays a feature there, as before the schema existed);
- ``schema-per-bank``: each bank its own raw file (``csv-source = "per-bank"``,
  ``csv-dir``), the schema below (money parsed, log1p on amounts, text one-hot with a
  federated vocabulary); EDUCATION is the bank, not a feature.

and prints JSON: final and best-round federated AUC, the centralized ceiling, rows.

    python benchmarks/bench_real_data.py [--rounds 10] [--model logreg] [--out FILE]

``--small-lenders`` instead emulates a loan book split across small lenders (issue 18's
lender split had 19-24 test rows per lender): per split seed, 8 lenders of 80-130 rows
drawn without replacement from the table, one file each (``csv-source = "per-bank"``), the
app's default training (20 rounds, 1 local epoch, batch 64) with ``min-local-steps`` at its
default (10) and at 0 (off, one epoch a round), on the in-process Grid:

    python benchmarks/bench_real_data.py --small-lenders [--split-seeds 0,1,2] \
        [--models mlp,logreg] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "bank_risk"))
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "uci_default_credit_card.csv"
LABEL = "default.payment.next.month"
AMOUNTS = (
    ["LIMIT_BAL"] + [f"BILL_AMT{i}" for i in range(1, 7)] + [f"PAY_AMT{i}" for i in range(1, 7)]
)

#: The schema a user writes for the exports below (README: "Preparing a schema").
SCHEMA = f"""
delimiter = ";"

[label]
column = "defaulted"
positive = ["yes"]
negative = ["no"]

[columns]
id = ["", "ID"]
drop = ["EDUCATION"]
categorical = ["SEX", "MARRIAGE"]
money = {json.dumps(AMOUNTS)}
log1p = {json.dumps(AMOUNTS)}

[missing]
numeric = "mean"

[categorical]
min-count = 20
"""


def write_exports(table: pd.DataFrame, folder: Path) -> dict[str, int]:
    """One raw export per EDUCATION level 1/2/3, as a bank's system would write it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for bank, level in enumerate((1, 2, 3)):
        part = table[table["EDUCATION"] == level].copy()
        part["SEX"] = part["SEX"].map({1: "male", 2: "female"})
        part["MARRIAGE"] = (
            part["MARRIAGE"].map({1: "married", 2: "single", 3: "other"}).fillna("unknown")
        )
        for col in AMOUNTS:
            part[col] = [f"${v:,.2f}" if v >= 0 else f"(${-v:,.2f})" for v in part[col]]
        part["defaulted"] = np.where(part.pop(LABEL) == 1, "yes", "no")
        part.reset_index(drop=True).to_csv(folder / f"bank-{bank}.csv", sep=";")  # index too
        rows[f"bank-{bank}"] = len(part)
    return rows


def summary(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    curve = [r["evaluate"].get("auc") for r in metrics["rounds"]]
    best = metrics.get("best_round") or {}  # chosen on the banks' validation rows, not on test
    return {
        "final_auc": curve[-1],
        "best_round": best.get("round"),
        "best_round_auc": best.get("auc"),
        "best_round_validation_auc": best.get("validation_auc"),
        "centralized_auc": metrics.get("centralized_auc"),
        # paired DeLong difference to the ceiling on the same pooled test rows (server's)
        "federated_vs_centralized": {
            k: (metrics.get("ceiling") or {}).get("federated_vs_ceiling", {}).get(k)
            for k in ("diff", "low", "high", "p_value", "verdict")
        },
        "auc_by_round": curve,
        "features": len(metrics.get("model", {}).get("features", [])),
        "run_dir": str(run_dir),
    }


def write_small_lenders(table: pd.DataFrame, folder: Path, seed: int) -> dict[str, int]:
    """8 lender files of 80-130 rows each, drawn without replacement (seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table))
    rows, start = {}, 0
    for lender in range(8):
        size = int(rng.integers(80, 131))
        part = table.iloc[order[start : start + size]]
        part.to_csv(folder / f"lender-{lender}.csv", index=False)
        rows[f"lender-{lender}"] = size
        start += size
    return rows


def small_lenders(args: argparse.Namespace, table: pd.DataFrame, work: Path) -> dict:
    """Federated vs centralized on emulated small lenders, min-local-steps 10 vs 0."""
    from bank_risk.simulate import run_bank_inprocess

    out: dict = {"what": "8 lenders of 80-130 rows from the UCI table, app defaults", "runs": []}
    for seed in [int(x) for x in args.split_seeds.split(",") if x.strip()]:
        folder = work / f"lenders-{seed}"
        rows = write_small_lenders(table, folder, seed)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            for min_steps in (10, 0):
                overrides = {
                    "dataset": "csv",
                    "csv-source": "per-bank",
                    "csv-dir": str(folder),
                    "num-banks": 8,
                    "model": model,
                    "min-local-steps": min_steps,
                    "local-only-baseline": False,
                    "output-dir": str(work / "runs"),
                    "run-name": f"lenders-{seed}-{model}-{min_steps}",
                }
                result = summary(run_bank_inprocess(overrides))
                result.update(split_seed=seed, model=model, min_local_steps=min_steps)
                result["rows_per_lender"] = rows
                out["runs"].append(result)
                paired = result["federated_vs_centralized"]
                print(
                    f"split {seed} {model} min-local-steps {min_steps}: federated minus "
                    f"centralized {paired['diff']} [{paired['low']}, {paired['high']}]",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="logreg")
    parser.add_argument("--out", default="")
    parser.add_argument("--small-lenders", action="store_true")
    parser.add_argument("--split-seeds", default="0,1,2")
    parser.add_argument("--models", default="mlp,logreg")
    args = parser.parse_args()
    source = Path(args.csv)
    if not source.is_file():
        print(json.dumps({"skipped": f"{source} not found (../shared/data is not in a clone)"}))
        return

    from bank_risk.simulate import run_bank_simulation

    work = Path(tempfile.mkdtemp(prefix="bench-real-data-"))
    table = pd.read_csv(source)
    if args.small_lenders:
        text = json.dumps(small_lenders(args, table, work), indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return
    exports = write_exports(table, work / "exports")
    schema = work / "schema.toml"
    schema.write_text(SCHEMA)
    common = {
        "num-server-rounds": args.rounds,
        "num-banks": 3,
        "model": args.model,
        "local-only-baseline": False,
        "output-dir": str(work / "runs"),
        "dataset": "csv",
    }
    runs = {
        "numeric-table": {
            "csv-path": str(source.resolve()),
            "csv-label-column": LABEL,
            "csv-drop-columns": "ID",
            "csv-split": "natural",
            "csv-partition-column": "EDUCATION",
            "csv-partition-values": "1,2,3",
        },
        "schema-per-bank": {
            "csv-source": "per-bank",
            "csv-dir": str(work / "exports"),
            "csv-schema": str(schema),
        },
    }
    results = {"rows_per_bank": exports, "rounds": args.rounds, "model": args.model}
    for name, extra in runs.items():
        run_dir = run_bank_simulation({**common, **extra, "run-name": name})
        results[name] = summary(run_dir)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
