"""Pooled AUC/KS from the banks' score sketches against the exact pooled figures.

For each bank-size profile and sketch resolution (``sketch-rows-per-bin``), draws
federations of binormal scores at several logit spreads and seeds, and prints JSON
with the largest absolute error of the pooled AUC and KS (``flower_ext.metrics``)
against scikit-learn on the pooled rows.

    python benchmarks/bench_sketch_accuracy.py [--seeds 40] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from flower_ext.metrics import pooled_sketch_metrics, score_sketch

PROFILES = {
    "default run (248-1,089 test rows)": (248, 1089, 600, 400, 700),
    "small banks (50-120 test rows)": (50, 80, 120),
    "large banks (5 x 4,000 test rows)": (4000,) * 5,
}


def worst_errors(sizes: tuple[int, ...], rows_per_bin: int, seeds: int) -> dict[str, float]:
    auc_err = ks_err = 0.0
    for spread in (0.001, 1.0, 1000.0):
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            ys, scores = [], []
            for n in sizes:
                y = (rng.uniform(size=n) < 0.2).astype(int)
                ys.append(y)
                scores.append(spread * (0.3 * rng.normal() - 1.5 + rng.normal(size=n) + y))
            sketches = [
                score_sketch(y, s, rows_per_bin=rows_per_bin)
                for y, s in zip(ys, scores, strict=True)
            ]
            auc, ks = pooled_sketch_metrics(sketches)
            y, s = np.concatenate(ys), np.concatenate(scores)
            fpr, tpr, _ = roc_curve(y, s)
            auc_err = max(auc_err, abs(auc - roc_auc_score(y, s)))
            ks_err = max(ks_err, abs(ks - float(np.max(np.abs(tpr - fpr)))))
    return {"max_auc_error": auc_err, "max_ks_error": ks_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [
        {"profile": name, "sketch_rows_per_bin": k, **worst_errors(sizes, k, args.seeds)}
        for name, sizes in PROFILES.items()
        for k in (4, 1)
    ]
    text = json.dumps({"benchmark": "sketch_accuracy", "seeds": args.seeds, "rows": rows}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
