"""Splits that make sense: Dirichlet label skew keeps both classes at every bank, or refuses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flower_ext.data import CsvSpec, DataError, load_csv_banks


def _table(tmp_path, rows: int, positives: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    y = np.zeros(rows, dtype=int)
    y[rng.choice(rows, positives, replace=False)] = 1
    frame = pd.DataFrame({"x": rng.normal(size=rows), "y": y})
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_dirichlet_keeps_both_classes_at_every_bank(tmp_path):
    path = _table(tmp_path, 3000, 300)  # a rare class, strong skew: one-class banks are likely
    spec = CsvSpec(path, "y", split="dirichlet", num_banks=5, dirichlet_alpha=0.3, seed=1)
    banks = load_csv_banks(spec)
    assert len(banks) == 5
    for name, frame in banks.items():
        counts = np.bincount(frame["y"], minlength=2)
        assert counts.min() >= spec.min_class_rows, (name, counts)
    assert sum(len(f) for f in banks.values()) == 3000


def test_dirichlet_refuses_with_a_reason(tmp_path):
    few = _table(tmp_path, 400, 12)
    with pytest.raises(DataError, match=r"12 default.*each of 5 banks at least 5"):
        load_csv_banks(CsvSpec(few, "y", split="dirichlet", num_banks=5))


def test_extreme_skew_is_topped_up_not_one_class(tmp_path):
    path = _table(tmp_path, 600, 40, seed=2)
    spec = CsvSpec(path, "y", split="dirichlet", num_banks=6, dirichlet_alpha=0.02)
    banks = load_csv_banks(spec)
    positives = sorted(int(f["y"].sum()) for f in banks.values())
    assert positives[0] >= 5 and sum(positives) == 40  # every row still used exactly once
    assert max(positives) > 2 * min(positives)  # the skew stays
