"""A declared data schema: how to read a bank's raw export into model features.

A schema is a small TOML file (run config ``csv-schema``, a node config key of the
same name wins on a bank) that says what every column is. Nothing is guessed: a
column the schema does not name is a plain numeric feature, and a cell that is not
a number there is refused with the file, column and row. Example::

    delimiter = ";"                      # "," (default), ";", "\\t" or "|"
    decimal = ","                        # "." (default) or "," (then "." groups thousands)

    [label]
    column = "status"
    positive = ["bad"]                   # the value(s) that mean default
    negative = ["good"]                  # optional: then any other value is refused

    [columns]
    id = ["customer_id", ""]             # dropped; "" is an unnamed (empty-header) column
    drop = ["comment"]                   # dropped too (free text, leakage, ...)
    categorical = ["state", "purpose"]
    money = ["loan_amount"]              # "$1,000.00", "(250)", "EUR 12"
    percent = ["interest_rate"]          # "10.5%" -> 0.105
    log1p = ["income", "loan_amount"]    # sign(x) * log(1 + |x|), for heavy tails
    robust = ["income"]                  # clipped to federated [q-low, q-high] quantiles

    [missing]
    numeric = "mean"                     # "mean" (federated), "zero" or "refuse"
    indicator = true                     # add "<column>:missing" where any bank has gaps

    [categorical]
    encoding = "onehot"                  # "onehot" (federated vocabulary) or "hash"
    max-categories = 50                  # per column; the rest share "<column>=<other>"
    min-count = 5                        # rows a value needs across banks to get a column
    hash-buckets = 16                    # encoding = "hash": columns per categorical

    [robust]
    q-low = 0.01
    q-high = 0.99

    [partition]                          # one table split into banks (simulation)
    column = "region"                    # never a feature; text values work
    bins = 4                             # a continuous column: 4 quantile bins
    # edges = [0, 1000, 10000]           # ... or explicit bin edges

Where a step needs statistics across banks (imputation means, vocabularies,
quantiles), they are computed federatedly (:mod:`flower_ext.data.preprocessing`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import tomllib

from .csv_loader import DataError

DELIMITERS = (",", ";", "\t", "|")
MISSING_POLICIES = ("mean", "zero", "refuse")
ENCODINGS = ("onehot", "hash")

_TOP_KEYS = {
    "delimiter",
    "decimal",
    "label",
    "columns",
    "missing",
    "categorical",
    "robust",
    "partition",
}
_SECTION_KEYS = {
    "label": {"column", "positive", "negative"},
    "columns": {"id", "drop", "categorical", "numeric", "money", "percent", "log1p", "robust"},
    "missing": {"numeric", "indicator"},
    "categorical": {"encoding", "max-categories", "min-count", "hash-buckets"},
    "robust": {"q-low", "q-high"},
    "partition": {"column", "bins", "edges"},
}


@dataclass(frozen=True)
class Schema:
    """A parsed, checked schema (see the module docstring for the TOML keys)."""

    label_column: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()
    delimiter: str = ","
    decimal: str = "."
    id_columns: tuple[str, ...] = ()
    drop_columns: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    money: tuple[str, ...] = ()
    percent: tuple[str, ...] = ()
    log1p: tuple[str, ...] = ()
    robust: tuple[str, ...] = ()
    missing_numeric: str = "mean"
    missing_indicator: bool = True
    encoding: str = "onehot"
    max_categories: int = 50
    min_count: int = 5
    hash_buckets: int = 16
    q_low: float = 0.01
    q_high: float = 0.99
    partition_column: str = ""
    partition_bins: int = 0
    partition_edges: tuple[float, ...] = ()
    #: sha256 of the schema's TOML text: banks and server check they read the same one.
    digest: str = ""

    @property
    def excluded(self) -> tuple[str, ...]:
        """Columns that never become features (ids, drops, label, partition)."""
        extra = (self.partition_column,) if self.partition_column else ()
        return (*self.id_columns, *self.drop_columns, self.label_column, *extra)

    @property
    def declared_numeric(self) -> tuple[str, ...]:
        """Columns the schema names as numbers (in any role)."""
        seen: list[str] = []
        for col in (*self.numeric, *self.money, *self.percent, *self.log1p, *self.robust):
            if col not in seen:
                seen.append(col)
        return tuple(seen)


def _strings(section: dict, key: str, where: str) -> tuple[str, ...]:
    value = section.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise DataError(f"schema {where}.{key} must be a list of names/values, got {value!r}")
    return tuple(str(v) for v in value)


def _label_values(section: dict, key: str) -> tuple[str, ...]:
    value = section.get(key, [])
    if not isinstance(value, list):
        value = [value]
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise DataError(f"schema label.{key}: {v!r} is not a label value")
        out.append(_label_text(v))
    return tuple(out)


def _label_text(value: object) -> str:
    """A label value as the file shows it: 1.0 and 1 are the same value."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def parse_schema(text: str, source: str = "schema") -> Schema:
    """Parse and check a schema's TOML text; :class:`DataError` names the bad key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DataError(f"{source}: not valid TOML: {err}") from None
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise DataError(f"{source}: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    for name, keys in _SECTION_KEYS.items():
        section = doc.get(name, {})
        if not isinstance(section, dict):
            raise DataError(f"{source}: [{name}] must be a table")
        bad = set(section) - keys
        if bad:
            raise DataError(
                f"{source}: unknown key(s) {sorted(bad)} in [{name}]; known: {sorted(keys)}"
            )
    label = doc.get("label", {})
    columns = doc.get("columns", {})
    missing = doc.get("missing", {})
    cat = doc.get("categorical", {})
    robust = doc.get("robust", {})
    part = doc.get("partition", {})
    if "column" not in label:
        raise DataError(f'{source}: [label] needs column = "<label column>"')
    positive = _label_values(label, "positive")
    if not positive:
        raise DataError(
            f"{source}: [label] needs positive = [...], the value(s) that mean default "
            '(e.g. positive = [1], ["bad"], [2])'
        )
    negative = _label_values(label, "negative")
    if set(positive) & set(negative):
        raise DataError(
            f"{source}: label value(s) {sorted(set(positive) & set(negative))} "
            "are both positive and negative"
        )
    delimiter = str(doc.get("delimiter", ","))
    if delimiter not in DELIMITERS:
        raise DataError(f"{source}: delimiter must be one of {DELIMITERS}, got {delimiter!r}")
    decimal = str(doc.get("decimal", "."))
    if decimal not in (".", ","):
        raise DataError(f'{source}: decimal must be "." or ",", got {decimal!r}')
    if decimal == delimiter:
        raise DataError(f"{source}: decimal and delimiter are both {delimiter!r}")
    try:
        schema = Schema(
            label_column=str(label["column"]),
            positive=positive,
            negative=negative,
            delimiter=delimiter,
            decimal=decimal,
            id_columns=_strings(columns, "id", "columns"),
            drop_columns=_strings(columns, "drop", "columns"),
            categorical=_strings(columns, "categorical", "columns"),
            numeric=_strings(columns, "numeric", "columns"),
            money=_strings(columns, "money", "columns"),
            percent=_strings(columns, "percent", "columns"),
            log1p=_strings(columns, "log1p", "columns"),
            robust=_strings(columns, "robust", "columns"),
            missing_numeric=str(missing.get("numeric", "mean")),
            missing_indicator=bool(missing.get("indicator", True)),
            encoding=str(cat.get("encoding", "onehot")),
            max_categories=int(cat.get("max-categories", 50)),
            min_count=int(cat.get("min-count", 5)),
            hash_buckets=int(cat.get("hash-buckets", 16)),
            q_low=float(robust.get("q-low", 0.01)),
            q_high=float(robust.get("q-high", 0.99)),
            partition_column=str(part.get("column", "")),
            partition_bins=int(part.get("bins", 0)),
            partition_edges=tuple(float(e) for e in part.get("edges", [])),
            digest=hashlib.sha256(text.encode()).hexdigest(),
        )
    except (TypeError, ValueError) as err:
        raise DataError(f"{source}: {err}") from None
    _check(schema, source)
    return schema


def _check(s: Schema, source: str) -> None:
    problems = []
    if s.missing_numeric not in MISSING_POLICIES:
        problems.append(
            f"missing.numeric must be one of {MISSING_POLICIES}, got '{s.missing_numeric}'"
        )
    if s.encoding not in ENCODINGS:
        problems.append(f"categorical.encoding must be one of {ENCODINGS}, got '{s.encoding}'")
    if s.max_categories < 1 or s.min_count < 1 or s.hash_buckets < 1:
        problems.append("categorical max-categories, min-count and hash-buckets must be >= 1")
    if not 0.0 <= s.q_low < s.q_high <= 1.0:
        problems.append(f"robust needs 0 <= q-low < q-high <= 1, got {s.q_low}, {s.q_high}")
    if s.partition_bins < 0 or (s.partition_bins and s.partition_edges):
        problems.append("partition: give bins (a count >= 2) or edges, not both")
    if s.partition_bins == 1:
        problems.append("partition.bins = 1 makes one bank; use bins >= 2")
    if list(s.partition_edges) != sorted(set(s.partition_edges)):
        problems.append("partition.edges must be strictly increasing")
    label = s.label_column
    for role, cols in (
        ("id", s.id_columns),
        ("drop", s.drop_columns),
        ("categorical", s.categorical),
        ("numeric/money/percent/log1p/robust", s.declared_numeric),
    ):
        if label in cols:
            problems.append(f"the label column '{label}' is listed under columns.{role}")
    if s.partition_column == label:
        problems.append(f"the partition column is the label '{label}'")
    both = set(s.categorical) & set(s.declared_numeric)
    if both:
        problems.append(f"column(s) {sorted(both)} are both categorical and numeric")
    gone = set(s.id_columns) | set(s.drop_columns) | ({s.partition_column} - {""})
    used = (set(s.categorical) | set(s.declared_numeric)) & gone
    if used:
        problems.append(f"column(s) {sorted(used)} are dropped (id/drop/partition) and also used")
    if set(s.money) & set(s.percent):
        problems.append(f"column(s) {sorted(set(s.money) & set(s.percent))} are money and percent")
    if problems:
        raise DataError(f"{source}: " + "; ".join(problems))


def load_schema(path: str | Path) -> Schema:
    """Read a schema TOML file (see the module docstring)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"schema file '{p}' cannot be read: {err}") from None
    return parse_schema(text, source=f"schema file '{p}'")
