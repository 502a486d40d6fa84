"""The declared-schema path: raw bank exports, each raw problem in a small file written here.

Empty cells, text categoricals, labels that are not 0/1, money and percent strings,
semicolon files with decimal commas, unnamed row-id columns, heavy tails, partition
columns (text and binned) and the federated combine of the preprocessing statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from flower_ext.data import DataError, DataSource, load_all_banks, load_bank
from flower_ext.data.banks import bank_preprocessing_stats
from flower_ext.data.preprocessing import (
    apply_preprocessing,
    combine_stats,
    local_stats,
    read_raw,
)
from flower_ext.data.schema import load_schema, parse_schema

LABEL = """
[label]
column = "status"
positive = ["bad"]
negative = ["good"]
"""


def _write(tmp_path, text: str, name: str = "bank.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _schema(body: str = "", label: str = LABEL):
    return parse_schema(body + "\n" + label)  # top-level keys (delimiter) come first


def _plan(table, schema):
    prep, rejected = combine_stats([local_stats(table, schema)], schema)
    assert not rejected
    return prep


def _load(tmp_path, csv_text: str, body: str = "", label: str = LABEL):
    schema = _schema(body, label)
    table = read_raw(_write(tmp_path, csv_text), schema)
    names, x, y = apply_preprocessing(table, schema, _plan(table, schema))
    return dict(zip(names, x.T, strict=True)), y


def test_good_bad_labels_ids_and_categoricals(tmp_path):
    csv = "cust_id,state,income,status\n" + "\n".join(
        f"{i},{'NY' if i % 3 else 'CA'},{1000 + i},{'bad' if i % 4 == 0 else 'good'}"
        for i in range(1, 21)
    )
    body = '[columns]\nid = ["cust_id"]\ncategorical = ["state"]\n[categorical]\nmin-count = 1\n'
    cols, y = _load(tmp_path, csv, body)
    assert set(cols) == {"state=CA", "state=NY", "state=<other>", "income"}
    assert y.tolist() == [1 if i % 4 == 0 else 0 for i in range(1, 21)]
    assert cols["state=CA"].tolist() == [1.0 if i % 3 == 0 else 0.0 for i in range(1, 21)]
    assert not cols["state=<other>"].any()


@pytest.mark.parametrize(
    ("values", "positive", "expected"),
    [(["1", "2", "2", "1"], "[2]", [0, 1, 1, 0]), (["-1", "1", "1.0", "-1"], "[1]", [0, 1, 1, 0])],
)
def test_numeric_label_codings(tmp_path, values, positive, expected):
    rows = "\n".join(f"{v},{i * 7 % 5}" for i, v in enumerate(values * 2))
    label = f'[label]\ncolumn = "y"\npositive = {positive}\n'
    _, y = _load(tmp_path, "y,x\n" + rows, label=label)
    assert y.tolist() == expected * 2


def test_unknown_label_value_is_named_with_its_row(tmp_path):
    csv = "status,x\ngood,1\nbad,2\ngood,3\nmaybe,4\ngood,5\n"
    with pytest.raises(DataError, match=r"column 'status', row 5: label value 'maybe'"):
        read_raw(_write(tmp_path, csv), _schema())


def test_empty_cells_imputed_with_indicator(tmp_path):
    csv = "income,dependants,status\n100,2,good\n,1,bad\n300,,good\n500,NA,bad\n"
    cols, _ = _load(tmp_path, csv)
    assert cols["income"].tolist() == pytest.approx([100, 300, 300, 500])  # mean of observed
    assert cols["income:missing"].tolist() == [0, 1, 0, 0]
    assert cols["dependants"].tolist() == pytest.approx([2, 1, 1.5, 1.5])
    assert cols["dependants:missing"].tolist() == [0, 0, 1, 1]


def test_missing_refused_when_the_schema_says_so(tmp_path):
    csv = "income,status\n100,good\n,bad\n300,good\n500,bad\n"
    schema = _schema('[missing]\nnumeric = "refuse"\n')
    table = read_raw(_write(tmp_path, csv), schema)
    with pytest.raises(DataError, match=r"bank.csv', column 'income', row 3: empty value"):
        local_stats(table, schema)


def test_money_and_percent_strings(tmp_path):
    csv = (
        'amount,rate,status\n"$1,000.00",10.5%,good\n"$250",7%,bad\n'
        '"($1,200.50)",0.5%,good\nUSD 3000,12 %,bad\n'
    )
    body = '[columns]\nmoney = ["amount"]\npercent = ["rate"]\n'
    cols, _ = _load(tmp_path, csv, body)
    assert cols["amount"].tolist() == pytest.approx([1000.0, 250.0, -1200.5, 3000.0])
    assert cols["rate"].tolist() == pytest.approx([0.105, 0.07, 0.005, 0.12])


def test_undeclared_money_gets_a_hint(tmp_path):
    csv = 'amount,status\n"$1,000.00",good\n2,bad\n3,good\n4,bad\n'
    with pytest.raises(DataError, match=r"row 2: '\$1,000.00' is an amount of money; list"):
        _load(tmp_path, csv)
    csv = "rate,status\n10%,good\n2,bad\n3,good\n4,bad\n"
    with pytest.raises(DataError, match=r"columns\.percent"):
        _load(tmp_path, csv)


def test_semicolon_file_with_decimal_comma(tmp_path):
    csv = "income;amount;status\n1,5;1.234,50;good\n2,25;10;bad\n3;7,5;good\n4;1;bad\n"
    body = 'delimiter = ";"\ndecimal = ","\n[columns]\nmoney = ["amount"]\n'
    cols, _ = _load(tmp_path, csv, body)
    assert cols["income"].tolist() == pytest.approx([1.5, 2.25, 3, 4])
    assert cols["amount"].tolist() == pytest.approx([1234.5, 10, 7.5, 1])


def test_semicolon_file_without_schema_delimiter_says_where_to_declare_it(tmp_path):
    csv = "income;status\n1;good\n2;bad\n3;good\n4;bad\n"
    with pytest.raises(DataError, match="declare delimiter = ';'"):
        _load(tmp_path, csv)


def test_unnamed_row_id_column_refused_unless_declared(tmp_path):
    frame = pd.DataFrame({"x": [3.0, 1.0, 2.0, 5.0, 4.0], "status": ["good", "bad"] * 2 + ["bad"]})
    path = tmp_path / "bank.csv"
    frame.to_csv(path)  # pandas writes the row index as an unnamed first column
    with pytest.raises(DataError, match=r"column 1 has an empty name.*columns.id = \[\"\"\]"):
        read_raw(path, _schema())
    declared = _schema('[columns]\nid = [""]\n')
    table = read_raw(path, declared)
    assert table.features == ("x",)


def test_named_row_counter_refused_as_a_feature(tmp_path):
    csv = "Unnamed: 0,x,status\n0,5,good\n1,3,bad\n2,4,good\n3,1,bad\n"
    with pytest.raises(DataError, match=r"column 'Unnamed: 0': counts the rows .* row id"):
        read_raw(_write(tmp_path, csv), _schema())
    kept = read_raw(_write(tmp_path, csv), _schema('[columns]\nnumeric = ["Unnamed: 0"]\n'))
    assert "Unnamed: 0" in kept.features


def test_log1p_and_robust_clip(tmp_path):
    values = [0, 1, 10, 100, 1000, 1e6, -5, 3]
    csv = "debt,income,status\n" + "\n".join(
        f"{v},{v},{'bad' if i % 2 else 'good'}" for i, v in enumerate(values)
    )
    body = '[columns]\nlog1p = ["debt"]\nrobust = ["income"]\n[robust]\nq-low = 0.1\nq-high = 0.9\n'
    cols, _ = _load(tmp_path, csv, body)
    expected = np.sign(values) * np.log1p(np.abs(values))
    assert cols["debt"] == pytest.approx(expected.astype(np.float32))
    low, high = np.quantile(values, [0.1, 0.9])
    assert cols["income"].max() == pytest.approx(high) and cols["income"].min() == pytest.approx(
        low
    )


def test_hash_encoding_needs_no_vocabulary(tmp_path):
    csv = "lender,x,status\n" + "\n".join(
        f"L{i % 7},{i},{'bad' if i % 2 else 'good'}" for i in range(2, 16)
    )
    body = (
        '[columns]\ncategorical = ["lender"]\n[categorical]\nencoding = "hash"\nhash-buckets = 4\n'
    )
    schema = _schema(body)
    table = read_raw(_write(tmp_path, csv), schema)
    stats = local_stats(table, schema)
    assert stats["categorical"] == {}  # nothing about the values leaves the bank
    cols, _ = _load(tmp_path, csv, body)
    hashed = np.stack([cols[f"lender#{k}"] for k in range(4)], axis=1)
    assert (hashed.sum(axis=1) == 1).all()


def test_schema_errors_name_the_key(tmp_path):
    with pytest.raises(DataError, match="positive"):
        parse_schema('[label]\ncolumn = "y"\n')
    with pytest.raises(DataError, match=r"unknown key\(s\) \['colour'\]"):
        parse_schema(LABEL + "[columns]\ncolour = []\n")
    with pytest.raises(DataError, match="both categorical and numeric"):
        parse_schema(LABEL + '[columns]\ncategorical = ["a"]\nmoney = ["a"]\n')
    with pytest.raises(DataError, match="not valid TOML"):
        parse_schema("[label\n")
    path = _write(tmp_path, LABEL, "schema.toml")
    assert load_schema(path).label_column == "status"
    with pytest.raises(DataError, match="not in the file"):
        read_raw(
            _write(tmp_path, "x,status\n1,good\n2,bad\n3,good\n4,bad\n"),
            _schema('[columns]\ncategorical = ["state"]\n'),
        )


def test_combine_is_robust_and_capped():
    schema = _schema(
        '[columns]\ncategorical = ["c"]\n[categorical]\nmin-count = 3\nmax-categories = 2\n'
    )

    def part(mean: float, counts: dict, missing: int = 0) -> dict:
        return {
            "schema": schema.digest,
            "columns": ["c", "x"],
            "numeric": {"x": {"count": 10, "missing": missing, "sum": 10 * mean}},
            "categorical": {"c": counts},
        }

    honest = [part(1.0, {"a": 5, "b": 2}), part(2.0, {"a": 1, "b": 2, "z": 1}), part(3.0, {"q": 9})]
    liar = {
        **part(1e9, {"junk": 10**9}),
        "numeric": {"x": {"count": 10**12, "missing": 0, "sum": 1e20}},
    }
    wrong_schema = {**part(1.0, {}), "schema": "other"}
    malformed = {**part(1.0, {}), "numeric": {"x": {"count": -1, "missing": 0, "sum": 1.0}}}
    prep, rejected = combine_stats([*honest, liar, wrong_schema, malformed, "nonsense"], schema)
    assert sorted(rejected) == [4, 5, 6]
    assert "different schema" in rejected[4] and "non-negative" in rejected[5]
    x = next(c for c in prep["columns"] if c["name"] == "x")
    assert x["fill"] == pytest.approx(2.5)  # median of bank means: the liar does not move it far
    assert not x["indicator"]
    c = next(c for c in prep["columns"] if c["name"] == "c")
    assert len(c["values"]) == 2 and "junk" in c["values"]  # capped at max-categories
    different = {**part(1.0, {}), "columns": ["x"]}
    _, rejected = combine_stats([*honest, different], schema)
    assert "different feature columns" in rejected[3]


UCI_LIKE = (
    LABEL
    + """
[columns]
id = ["ID"]
categorical = ["purpose"]
money = ["limit"]
log1p = ["limit"]
[categorical]
min-count = 1
[partition]
column = "lender"
"""
)


def _table(tmp_path, n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    lenders = rng.choice(["Acme Bank", "Beta Credit", "Cobalt"], size=n)
    x = rng.normal(size=n)
    frame = pd.DataFrame(
        {
            "ID": np.arange(1, n + 1),
            "lender": lenders,
            "purpose": rng.choice(["car", "home", "cash"], size=n),
            "limit": [f"${v:,.2f}" for v in rng.lognormal(8, 1, size=n)],
            "age": np.where(rng.random(n) < 0.1, "", rng.integers(20, 70, n).astype(str)),
            "status": np.where(x + rng.normal(size=n) > 0.7, "bad", "good"),
        }
    )
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    return path, frame


def _source(path, schema_path, **extra) -> DataSource:
    return DataSource.from_config(
        {
            "dataset": "csv",
            "csv-path": str(path),
            "csv-schema": str(schema_path),
            "num-banks": 3,
            "csv-split": "natural",
            "csv-partition-column": "",
            **extra,
        }
    )


def test_text_partition_column_is_a_split_not_a_feature(tmp_path):
    path, frame = _table(tmp_path)
    schema_path = _write(tmp_path, UCI_LIKE, "schema.toml")
    source = _source(path, schema_path)
    banks = load_all_banks(source)
    assert [b.name for b in banks] == [
        "bank-0-lender=Acme Bank",
        "bank-1-lender=Beta Credit",
        "bank-2-lender=Cobalt",
    ]
    assert sum(len(b.y_train) + len(b.y_val) + len(b.y_test) for b in banks) == len(frame)
    names = banks[0].feature_names
    assert not any(n.startswith("lender") or n == "ID" for n in names)
    assert {"age", "age:missing", "limit", "purpose=car", "purpose=<other>"} <= set(names)
    assert all(np.isfinite(b.x_train).all() for b in banks)
    # A bank loads the same features from the plan the federation agreed on.
    plan = json.loads(
        json.dumps(
            combine_stats(
                [bank_preprocessing_stats(source, i) for i in range(3)], load_schema(schema_path)
            )[0]
        )
    )
    one = load_bank(source, 1, plan)
    assert one.feature_names == names and np.allclose(one.x_test, banks[1].x_test)
    with pytest.raises(DataError, match="preprocessing"):
        load_bank(source, 1)


def test_continuous_partition_column_is_binned(tmp_path):
    rng = np.random.default_rng(3)
    n = 200
    frame = pd.DataFrame({"age": rng.integers(20, 80, n), "x": rng.normal(size=n)})
    frame["status"] = np.where(frame["x"] + rng.normal(size=n) > 0.5, "bad", "good")
    path = tmp_path / "ages.csv"
    frame.to_csv(path, index=False)
    schema_path = _write(tmp_path, LABEL + '[partition]\ncolumn = "age"\nbins = 3\n', "s.toml")
    banks = load_all_banks(_source(path, schema_path))
    assert len(banks) == 3 and all("age=" in b.name for b in banks)
    assert banks[0].feature_names == ("x",)
    edges = [float(b.name.split("=")[1].strip("([").split(",")[0]) for b in banks]
    assert edges == sorted(edges)
    assert sum(len(b.y_train) + len(b.y_val) + len(b.y_test) for b in banks) == n


def test_the_readme_schema_example_loads_the_readme_export(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("#### Preparing a schema") :]
    toml = re.search(r"```toml\n(.*?)```", block, re.S).group(1)
    lines = re.search(r"```text\n(.*?)```", block, re.S).group(1).strip().splitlines()
    schema = parse_schema(toml)
    table = read_raw(_write(tmp_path, "\n".join([lines[0]] + lines[1:] * 3) + "\n"), schema)
    names, x, y = apply_preprocessing(table, schema, _plan(table, schema))
    assert "branch" not in " ".join(names) and "customer_no" not in names
    assert {"limit", "rate", "income:missing"} <= set(names)
    assert y.tolist() == [0, 1] * 3 and np.isfinite(x).all()
