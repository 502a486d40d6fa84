"""Synthetic generator and CSV loader: non-IID banks, clear errors for bad CSVs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from flower_ext.data import (
    FEATURES,
    LABEL_COLUMN,
    CsvSpec,
    DataError,
    DataSource,
    generate_bank,
    generate_federation,
    load_all_banks,
    load_bank,
    load_csv_banks,
)


def test_generator_is_deterministic_and_realistic():
    a = generate_bank(2, 5, rows_per_bank=800, seed=3)
    b = generate_bank(2, 5, rows_per_bank=800, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == [*FEATURES, LABEL_COLUMN]
    fed = pd.concat(generate_federation(5, rows_per_bank=1500, seed=1).values())
    assert 0.05 <= fed[LABEL_COLUMN].mean() <= 0.25
    assert (fed["utilisation"].between(0, 1)).all() and (fed["age"] >= 19).all()


def test_label_is_learnable_only_partly():
    fed = pd.concat(generate_federation(5, rows_per_bank=2000, seed=5).values())
    x = StandardScaler().fit_transform(fed[list(FEATURES)].to_numpy())
    y = fed[LABEL_COLUMN].to_numpy()
    half = len(y) // 2
    model = LogisticRegression(max_iter=500).fit(x[:half], y[:half])
    auc = roc_auc_score(y[half:], model.predict_proba(x[half:])[:, 1])
    assert 0.65 < auc < 0.9


def _spread(heterogeneity: float) -> tuple[float, float]:
    banks = generate_federation(5, rows_per_bank=3000, heterogeneity=heterogeneity, seed=11)
    rates = [f[LABEL_COLUMN].mean() for f in banks.values()]
    incomes = [np.log(f["monthly_income"]).mean() for f in banks.values()]
    return float(np.ptp(rates)), float(np.ptp(incomes))


def test_heterogeneity_knob_controls_non_iid():
    rate_iid, income_iid = _spread(0.0)
    rate_strong, income_strong = _spread(1.0)
    # Strongly non-IID banks differ far more in default rate and income than IID ones.
    assert rate_strong > 2 * rate_iid
    assert income_strong > 4 * income_iid
    assert rate_strong > 0.1


def test_synthetic_bank_split(tmp_path):
    source = DataSource(num_banks=3, rows_per_bank=500, seed=2)
    bank = load_bank(source, 1)
    assert bank.name == "bank-1-lower-tier-markets"
    rows = len(bank.x_train) + len(bank.x_val) + len(bank.x_test)
    assert len(bank.x_test) == pytest.approx(0.25 * rows, abs=2)
    assert len(bank.x_val) == pytest.approx(0.15 * (rows - len(bank.x_test)), abs=2)
    assert bank.x_train.dtype == np.float32
    with pytest.raises(DataError, match="outside"):
        load_bank(source, 3)


def _write(tmp_path, frame: pd.DataFrame, name: str = "t.csv") -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def _table(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "ID": np.arange(n),
            "region": rng.integers(1, 4, n),
            "income": rng.normal(5, 1, n),
            "y": rng.integers(0, 2, n),
        }
    )


def test_csv_natural_iid_and_dirichlet_splits(tmp_path):
    path = _write(tmp_path, _table(300))
    natural = load_csv_banks(CsvSpec(path, "y", ("ID",), "natural", "region"))
    assert list(natural) == ["bank-0-region=1", "bank-1-region=2", "bank-2-region=3"]
    assert sum(len(f) for f in natural.values()) == 300
    assert all((f["region"] == i + 1).all() for i, f in enumerate(natural.values()))
    iid = load_csv_banks(CsvSpec(path, "y", ("ID",), "iid", num_banks=4))
    assert len(iid) == 4 and sum(len(f) for f in iid.values()) == 300
    skewed = load_csv_banks(
        CsvSpec(path, "y", ("ID",), "dirichlet", num_banks=3, dirichlet_alpha=0.3)
    )
    assert sum(len(f) for f in skewed.values()) == 300


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["y"]), "label column 'y' not found"),
        (lambda f: f.assign(income=["abc"] * len(f)), "column 'income', row 2: 'abc' is not a"),
        (lambda f: f.assign(y=f["y"] + 5), "column 'y', row 2: the label must be 0 or 1"),
        (
            lambda f: f.assign(income=[1.0, np.nan] + [1.0] * (len(f) - 2)),
            "column 'income', row 3: empty value",
        ),
        (lambda f: f.iloc[:0], "no rows"),
    ],
)
def test_bad_csvs_get_clear_errors(tmp_path, mutate, message):
    path = _write(tmp_path, mutate(_table()))
    with pytest.raises(DataError, match=message):
        load_csv_banks(CsvSpec(path, "y", ("ID",), "natural", "region"))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_csv_banks(CsvSpec(str(empty), "y"))
    with pytest.raises(DataError, match="does not exist"):
        load_csv_banks(CsvSpec(str(tmp_path / "nope.csv"), "y"))


def test_bank_left_without_rows_is_named(tmp_path):
    path = _write(tmp_path, _table())
    with pytest.raises(DataError, match=r"region=7.*no rows"):
        load_csv_banks(CsvSpec(path, "y", ("ID",), "natural", "region", ("1", "7")))


def test_single_class_bank_still_loads(tmp_path):
    frame = _table(200)
    frame.loc[frame["region"] == 3, "y"] = 0  # a lender with no defaults yet
    path = _write(tmp_path, frame)
    source = DataSource.from_config(
        {
            "dataset": "csv",
            "csv-path": path,
            "csv-label-column": "y",
            "csv-drop-columns": "ID",
            "csv-partition-column": "region",
            "csv-partition-values": "",
            "num-banks": 3,
        }
    )
    banks = load_all_banks(source)
    assert banks[2].y_test.sum() == 0 and banks[2].y_train.sum() == 0
    assert len(banks[2].x_train) > 0
