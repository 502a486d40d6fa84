"""Raw bank exports to model features, under a declared :class:`~.schema.Schema`.

Three steps, so that statistics across banks never need pooled rows:

1. :func:`read_raw` reads one file (a bank's own, or the table before it is split)
   as text cells, checks it against the schema and turns the label into 0/1;
2. :func:`local_stats` summarises one bank's rows (per numeric column: observed
   count, missing count, sum, and for ``robust`` columns two local quantiles; per
   one-hot categorical: value counts). These travel in the app's
   ``preprocessing-stats`` query; :func:`combine_stats` turns the banks' answers
   into one :data:`Preprocessing` (imputation values, vocabularies, clip ranges),
   checking each answer and leaving out the ones it cannot use;
3. :func:`apply_preprocessing` turns a bank's rows into the float32 feature matrix
   every bank builds the same way (same columns, same order).

The combine is robust to a minority of lying banks where it can be cheaply: the
imputation value and the clip range are medians over banks (a bank's count cannot
buy it weight), and a vocabulary is capped in size.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .csv_loader import (
    _FLOAT32_MAX,
    _INF_WORDS,
    _MISSING_WORDS,
    MIN_BANK_ROWS,
    DataError,
    _read_text,
    _scan_records,
    _short,
)
from .schema import Schema

#: A preprocessing plan (JSON-able): ``{"schema", "features", "columns": [...]}``.
Preprocessing = dict[str, Any]

#: Most distinct values one bank reports per categorical column (its most frequent).
MAX_REPORTED_VALUES = 1000
#: Longest category value kept (longer values are cut; they are names, not text).
MAX_VALUE_CHARS = 100
OTHER = "<other>"
MISSING_CATEGORY = "<missing>"
_MONEY_JUNK = re.compile(r"^[A-Za-z]{3}|[A-Za-z]{3}$|[$€£¥]")  # "USD 12", "12 EUR", "$12"


@dataclass(frozen=True)
class RawTable:
    """One file's rows as text cells (label already 0/1), with the spreadsheet row numbers."""

    path: Path
    cells: pd.DataFrame
    label: np.ndarray
    rows: list[int] | None
    features: tuple[str, ...]  # feature columns in file order (no id/drop/label/partition)

    def row(self, position: int) -> str:
        return str(self.rows[position]) if self.rows is not None else f"{position + 2} (approx.)"

    def subset(self, index: np.ndarray) -> RawTable:
        rows = [self.rows[i] for i in index] if self.rows is not None else None
        return RawTable(
            self.path,
            self.cells.iloc[index].reset_index(drop=True),
            self.label[index],
            rows,
            self.features,
        )


def read_raw(path: str | Path, schema: Schema) -> RawTable:
    """Read ``path`` under ``schema``: structure, columns and label checked, cells kept as text."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"CSV file '{p}' does not exist")
    text = _read_text(p)
    header, rows = _scan_records(
        text, p, delimiter=schema.delimiter, allow_empty=("" in schema.id_columns)
    )
    if not rows:
        raise DataError(f"CSV file '{p}' has a header but no rows")
    try:
        cells = pd.read_csv(
            io.StringIO(text),
            sep=schema.delimiter,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            index_col=False,
            skip_blank_lines=True,
        )
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(f"CSV file '{p}' could not be parsed: {err}") from None
    if len(cells.columns) != len(header):
        raise DataError(f"CSV file '{p}', row 1: the header could not be read consistently")
    cells.columns = header  # pandas renames an empty name to 'Unnamed: 0'; keep the file's
    row_of = rows if len(rows) == len(cells) else None
    if len(cells) < MIN_BANK_ROWS:
        raise DataError(
            f"CSV file '{p}' has {len(cells)} data row(s); at least {MIN_BANK_ROWS} are needed "
            "(each bank holds out a test split)"
        )
    features = _check_schema_columns(header, schema, p)
    table = RawTable(p, cells, np.zeros(len(cells), np.int64), row_of, features)
    label = _parse_label(table, schema)
    table = RawTable(p, cells, label, row_of, features)
    for col in features:  # an undeclared numeric column that counts rows is an id
        if col not in schema.categorical and col not in schema.declared_numeric:
            _refuse_row_counter(table, col, schema)
    return table


def _check_schema_columns(header: list[str], schema: Schema, path: Path) -> tuple[str, ...]:
    named = [c for c in header if c]
    label = schema.label_column
    if label not in header:
        hint = [c for c in named if c.lower() == label.lower()]
        raise DataError(
            f"CSV file '{path}': label column '{label}' not found"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; columns are {named}"
        )
    declared = {
        "id": schema.id_columns,
        "drop": schema.drop_columns,
        "categorical": schema.categorical,
        "numeric": schema.declared_numeric,
    }
    for role, cols in declared.items():
        absent = [c for c in cols if c not in header]
        if absent:
            shown = ["(unnamed)" if c == "" else c for c in absent]
            raise DataError(
                f"CSV file '{path}': schema columns.{role} lists {shown}, not in the file; "
                f"columns are {named}"
            )
    if schema.partition_column and schema.partition_column not in header:
        raise DataError(
            f"CSV file '{path}': partition column '{schema.partition_column}' not found; "
            f"columns are {named}"
        )
    features = tuple(c for c in header if c not in schema.excluded)
    if not features:
        raise DataError(f"CSV file '{path}': no feature columns left after the schema's drops")
    return features


def _canonical(value: str) -> str:
    """A label cell as a comparable value: ' 1.0 ' and '1' are the same."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number.is_integer():
        return str(int(number))
    return text


def _parse_label(table: RawTable, schema: Schema) -> np.ndarray:
    column = schema.label_column
    values = table.cells[column].map(_canonical)
    positive = values.isin(schema.positive).to_numpy()
    if schema.negative:
        negative = values.isin(schema.negative).to_numpy()
    else:
        negative = ~positive & (values != "").to_numpy()
    bad = ~(positive | negative)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raw = table.cells[column].iloc[first]
        allowed = list(schema.positive) + list(schema.negative)
        problem = (
            "the label is empty"
            if values.iloc[first] == ""
            else f"label value {_short(raw)} is neither positive nor negative (allowed: {allowed})"
        )
        more = int(bad.sum()) - 1
        raise DataError(
            f"CSV file '{table.path}', column '{column}', row {table.row(first)}: {problem}"
            + (f" ({more} more such row(s))" if more else "")
        )
    return positive.astype(np.int64)


def _refuse_row_counter(table: RawTable, col: str, schema: Schema) -> None:
    if col == "":
        raise DataError(
            f"CSV file '{table.path}', row 1: a column has no name (pandas writes the row index "
            'this way); list it as columns.id = [""] to drop it, or name it'
        )
    values = pd.to_numeric(table.cells[col].str.strip(), errors="coerce").to_numpy()
    if len(values) >= 3 and np.isfinite(values).all():
        steps = np.diff(values)
        if np.all(steps == 1) and values[0] in (0, 1):
            raise DataError(
                f"CSV file '{table.path}', column '{col}': counts the rows ({values[0]:.0f}, "
                f"{values[1]:.0f}, {values[2]:.0f}, ...), a row id, not a feature; list it "
                "under columns.id (or columns.numeric to keep it as a feature)"
            )


def numeric_values(table: RawTable, col: str, schema: Schema) -> np.ndarray:
    """The column as float64 (NaN where missing), parsed and transformed as declared."""
    text = table.cells[col].str.strip()
    missing = text.str.lower().isin(_MISSING_WORDS) | (text == "")
    cleaned = text.copy()
    if col in schema.money:
        negative = cleaned.str.startswith("(") & cleaned.str.endswith(")")
        cleaned = cleaned.str.strip("()").str.replace(r"\s", "", regex=True)
        cleaned = cleaned.str.replace(_MONEY_JUNK, "", regex=True)
        cleaned = _decimal(cleaned, schema.decimal, thousands=True)
        cleaned = cleaned.where(~negative, "-" + cleaned)
    elif col in schema.percent:
        cleaned = _decimal(cleaned.str.rstrip("%").str.strip(), schema.decimal, thousands=False)
    else:
        cleaned = _decimal(cleaned, schema.decimal, thousands=False)
    values = pd.to_numeric(cleaned.where(~missing, "nan"), errors="coerce").to_numpy(np.float64)
    if col in schema.percent:
        values = values / 100.0
    unparsed = np.isnan(values) & ~missing.to_numpy()
    words = text.str.lower().str.lstrip("+-").isin(_INF_WORDS).to_numpy()
    huge = np.abs(values) > _FLOAT32_MAX  # also catches inf
    bad = unparsed | huge | words
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raw = str(text.iloc[first])
        if huge[first] or words[first]:
            problem = f"{_short(raw)} is infinite or beyond float32's ±{_FLOAT32_MAX:.2e}"
        elif raw.endswith("%"):
            problem = f"{_short(raw)} is a percentage; list the column under columns.percent"
        elif any(ch in raw for ch in "$€£¥") or re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", raw):
            problem = f"{_short(raw)} is an amount of money; list the column under columns.money"
        else:
            problem = (
                f"{_short(raw)} is not a number; list the column under columns.categorical "
                "(or columns.drop)"
            )
        more = int(bad.sum()) - 1
        raise DataError(
            f"CSV file '{table.path}', column '{col}', row {table.row(first)}: {problem}"
            + (f" ({more} more such row(s))" if more else "")
        )
    if schema.missing_numeric == "refuse" and missing.any():
        first = int(np.flatnonzero(missing.to_numpy())[0])
        raise DataError(
            f"CSV file '{table.path}', column '{col}', row {table.row(first)}: empty value "
            f'{_short(str(text.iloc[first]))}; the schema says missing.numeric = "refuse" '
            '(use "mean" to impute with a missing indicator)'
        )
    if col in schema.log1p:
        values = np.sign(values) * np.log1p(np.abs(values))
    return values


def _decimal(cells: pd.Series, decimal: str, thousands: bool) -> pd.Series:
    if decimal == ",":
        if thousands:
            cells = cells.str.replace(".", "", regex=False)
        return cells.str.replace(",", ".", regex=False)
    return cells.str.replace(",", "", regex=False) if thousands else cells


def category_values(table: RawTable, col: str) -> pd.Series:
    values = table.cells[col].str.strip().str.slice(0, MAX_VALUE_CHARS)
    return values.where(
        ~(values.str.lower().isin(_MISSING_WORDS) | (values == "")), MISSING_CATEGORY
    )


def local_stats(table: RawTable, schema: Schema) -> dict[str, Any]:
    """What one bank tells the server for the preprocessing (see the README privacy section)."""
    numeric: dict[str, dict[str, Any]] = {}
    categorical: dict[str, dict[str, int]] = {}
    for col in table.features:
        if col in schema.categorical:
            if schema.encoding == "onehot":
                counts = category_values(table, col).value_counts()
                top = counts.sort_values(ascending=False, kind="stable")[:MAX_REPORTED_VALUES]
                categorical[col] = {str(k): int(v) for k, v in top.items()}
            continue
        values = numeric_values(table, col, schema)
        observed = values[~np.isnan(values)]
        entry: dict[str, Any] = {
            "count": int(observed.size),
            "missing": int(values.size - observed.size),
            "sum": float(observed.sum()) if observed.size else 0.0,
        }
        if col in schema.robust and observed.size:
            entry["quantiles"] = [
                float(q) for q in np.quantile(observed, [schema.q_low, schema.q_high])
            ]
        numeric[col] = entry
    return {
        "schema": schema.digest,
        "columns": list(table.features),
        "numeric": numeric,
        "categorical": categorical,
    }


def check_stats(part: Any, schema: Schema) -> dict[str, Any]:
    """One bank's stats, checked (a bank may send anything); ``ValueError`` says why not."""
    if not isinstance(part, dict):
        raise ValueError("preprocessing statistics must be an object")
    if part.get("schema") != schema.digest:
        raise ValueError("the bank read a different schema file than the server")
    columns = part.get("columns")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ValueError("columns must be a list of names")
    numeric, categorical = part.get("numeric"), part.get("categorical")
    if not isinstance(numeric, dict) or not isinstance(categorical, dict):
        raise ValueError("numeric/categorical must be objects")
    for col in columns:
        if col in schema.categorical:
            if schema.encoding != "onehot":
                continue
            counts = categorical.get(col)
            if not isinstance(counts, dict) or len(counts) > MAX_REPORTED_VALUES:
                raise ValueError(
                    f"categorical '{col}': missing or over {MAX_REPORTED_VALUES} values"
                )
            for key, n in counts.items():
                if len(str(key)) > MAX_VALUE_CHARS or not _count(n):
                    raise ValueError(f"categorical '{col}': bad value or count")
            continue
        e = numeric.get(col)
        if not isinstance(e, dict) or not _count(e.get("count")) or not _count(e.get("missing")):
            raise ValueError(f"numeric '{col}': count/missing must be non-negative integers")
        if not _finite(e.get("sum")):
            raise ValueError(f"numeric '{col}': sum must be a finite number")
        q = e.get("quantiles")
        if q is not None and not (
            isinstance(q, list) and len(q) == 2 and all(_finite(v) for v in q) and q[0] <= q[1]
        ):
            raise ValueError(f"numeric '{col}': quantiles must be two ordered finite numbers")
    return part


def _count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**53


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def combine_stats(parts: list[Any], schema: Schema) -> tuple[Preprocessing, dict[int, str]]:
    """The federation's preprocessing from the banks' stats, and ``{index: reason}`` of
    the parts left out (malformed, another schema, or columns the majority does not have).

    - imputation value (``missing.numeric = "mean"``): the median over banks of each
      bank's mean of the observed values;
    - missing indicator: added where any bank reported a missing value;
    - clip range (``robust``): the median over banks of each bank's local quantiles;
    - vocabulary (``onehot``): values with at least ``min-count`` rows across banks,
      the ``max-categories`` most frequent; all others share ``<column>=<other>``.
    """
    rejected: dict[int, str] = {}
    good: list[tuple[int, dict[str, Any]]] = []
    for i, part in enumerate(parts):
        try:
            good.append((i, check_stats(part, schema)))
        except ValueError as err:
            rejected[i] = str(err)
    if not good:
        raise DataError("no bank sent usable preprocessing statistics")
    sets: dict[frozenset[str], int] = {}
    for _, p in good:
        key = frozenset(p["columns"])
        sets[key] = sets.get(key, 0) + 1
    majority = max(sets.items(), key=lambda kv: (kv[1], sorted(kv[0])))[0]
    kept = []
    for i, p in good:
        if frozenset(p["columns"]) != majority:
            lacking, extra = (
                sorted(majority - set(p["columns"])),
                sorted(set(p["columns"]) - majority),
            )
            rejected[i] = (
                f"different feature columns than most banks (missing {lacking}, extra {extra})"
            )
        else:
            kept.append(p)
    orders = {tuple(p["columns"]) for p in kept}
    order = list(next(iter(orders))) if len(orders) == 1 else sorted(majority)
    columns: list[dict[str, Any]] = []
    for col in order:
        if col in schema.categorical:
            if schema.encoding == "hash":
                columns.append({"name": col, "kind": "hash", "buckets": schema.hash_buckets})
                continue
            totals: dict[str, int] = {}
            for p in kept:
                for value, n in p["categorical"][col].items():
                    totals[value] = totals.get(value, 0) + n
            frequent = [v for v, n in totals.items() if n >= schema.min_count]
            frequent.sort(key=lambda v: (-totals[v], v))
            columns.append(
                {"name": col, "kind": "onehot", "values": sorted(frequent[: schema.max_categories])}
            )
            continue
        entries = [p["numeric"][col] for p in kept]
        means = [e["sum"] / e["count"] for e in entries if e["count"] > 0]
        if not means:
            raise DataError(f"column '{col}' is empty at every bank; drop it in the schema")
        any_missing = any(e["missing"] > 0 for e in entries)
        fill = float(np.median(means)) if schema.missing_numeric == "mean" else 0.0
        quantiles = [e["quantiles"] for e in entries if e.get("quantiles") is not None]
        clip = None
        if col in schema.robust and quantiles:
            low, high = np.median(np.asarray(quantiles, dtype=np.float64), axis=0)
            clip = [float(low), float(max(low, high))]
        columns.append(
            {
                "name": col,
                "kind": "numeric",
                "fill": fill,
                "indicator": bool(any_missing and schema.missing_indicator),
                "clip": clip,
            }
        )
    prep: Preprocessing = {"schema": schema.digest, "columns": columns}
    prep["features"] = feature_names(prep)
    return prep, rejected


def feature_names(prep: Preprocessing) -> list[str]:
    names: list[str] = []
    for c in prep["columns"]:
        if c["kind"] == "numeric":
            names.append(c["name"])
            if c["indicator"]:
                names.append(f"{c['name']}:missing")
        elif c["kind"] == "onehot":
            names += [f"{c['name']}={v}" for v in c["values"]] + [f"{c['name']}={OTHER}"]
        else:
            names += [f"{c['name']}#{k}" for k in range(int(c["buckets"]))]
    return names


def apply_preprocessing(
    table: RawTable, schema: Schema, prep: Preprocessing
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(feature names, x float32, y int64)``: the bank's rows as the federation agreed."""
    if prep.get("schema") != schema.digest:
        raise DataError("the server's preprocessing was made for a different schema file")
    missing_cols = [c["name"] for c in prep["columns"] if c["name"] not in table.cells.columns]
    if missing_cols:
        raise DataError(f"CSV file '{table.path}': columns {missing_cols} are not in the file")
    blocks: list[np.ndarray] = []
    for c in prep["columns"]:
        col = c["name"]
        if c["kind"] == "numeric":
            values = numeric_values(table, col, schema)
            gaps = np.isnan(values)
            values = np.where(gaps, c["fill"], values)
            if c["clip"] is not None:
                values = np.clip(values, c["clip"][0], c["clip"][1])
            blocks.append(values[:, None])
            if c["indicator"]:
                blocks.append(gaps.astype(np.float64)[:, None])
        elif c["kind"] == "onehot":
            cats = category_values(table, col)
            vocab = list(c["values"])
            codes = pd.Categorical(cats, categories=vocab).codes  # -1: not in the vocabulary
            onehot = np.zeros((len(cats), len(vocab) + 1))
            onehot[np.arange(len(cats)), np.where(codes < 0, len(vocab), codes)] = 1.0
            blocks.append(onehot)
        else:
            from sklearn.feature_extraction import FeatureHasher

            hasher = FeatureHasher(
                n_features=int(c["buckets"]), input_type="string", alternate_sign=False
            )
            cats = category_values(table, col)
            blocks.append(hasher.transform([[v] for v in cats]).toarray())
    x = np.hstack(blocks) if blocks else np.zeros((len(table.label), 0))
    names = tuple(feature_names(prep))
    assert x.shape[1] == len(names)
    return names, x.astype(np.float32), table.label.copy()


def features_frame(
    table: RawTable, schema: Schema, prep: Preprocessing, label_column: str
) -> pd.DataFrame:
    """The bank's preprocessed rows as a frame (features + the 0/1 label)."""
    names, x, y = apply_preprocessing(table, schema, prep)
    frame = pd.DataFrame(x, columns=list(names))
    frame[label_column] = y
    return frame


def partition_keys(table: RawTable, schema: Schema) -> pd.Series:
    """The partition column's value per row (text); binned when the schema says so."""
    col = schema.partition_column
    text = table.cells[col].str.strip()
    if not (schema.partition_bins or schema.partition_edges):
        return text
    values = pd.to_numeric(text, errors="coerce")
    if values.isna().any():
        first = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise DataError(
            f"CSV file '{table.path}', column '{col}', row {table.row(first)}: "
            f"{_short(str(text.iloc[first]))} is not a number; binning needs numbers"
        )
    if schema.partition_edges:
        edges = [-np.inf, *schema.partition_edges, np.inf]
        bins = pd.cut(values, edges, right=False)
    else:
        bins = pd.qcut(values, schema.partition_bins, duplicates="drop")
    return bins.astype(str)
