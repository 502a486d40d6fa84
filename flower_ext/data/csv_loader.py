"""Load a credit table from CSV and split it into banks.

Three ways to split, all through flwr-datasets partitioners:

- ``natural``: one bank per value of a partition column (e.g. ``EDUCATION`` or a
  region code), the most realistic non-IID split when the table has one; with
  ``csv-partition-edges`` one bank per band of a numeric column (e.g. credit-limit
  bands ``LIMIT_BAL`` < 50k, 50k-150k, ...: a subprime lender next to a premium issuer);
- ``dirichlet``: label-skewed banks, Dirichlet(alpha) over the label per bank;
- ``iid``: uniform random banks.

Every problem a user can make with a CSV is found when the file is loaded and
reported as :class:`DataError` naming the file, the column and the row, never as
a traceback from pandas and never later, in training. Rows are counted as a
spreadsheet shows them: the header is row 1, the first data row is row 2 (a
quoted value spanning lines counts as the line it starts on).

What the loader accepts: UTF-8 text (a byte-order mark is fine), comma-separated,
a header of unique, non-empty names on the first line, the same number of fields
on every row, and in every used column a finite number that fits float32 (the
model's precision). Blank lines are skipped. Anything else is refused; nothing
is guessed (a duplicated header name, which pandas would silently rename to
``y.1``, could otherwise put the label among the features).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("natural", "iid", "dirichlet")

#: Fewest rows a bank needs: a stratified train/test split needs a few of each.
MIN_BANK_ROWS = 4

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MISSING_WORDS = {"nan", "-nan", "na", "n/a", "null", "none", "nil", "?", "-"}
_INF_WORDS = {"inf", "infinity"}
_OTHER_DELIMITERS = (";", "\t", "|")


class DataError(ValueError):
    """A data source that cannot be used as given; the message says why."""


@dataclass(frozen=True)
class CsvSpec:
    """How to read a CSV into banks (mirrors the app's ``csv-*`` run-config keys)."""

    path: str
    label_column: str
    drop_columns: tuple[str, ...] = ()
    split: str = "natural"
    partition_column: str = ""
    partition_values: tuple[str, ...] = ()
    #: ``natural``: bin the partition column at these edges (strictly increasing), one bank
    #: per band ``[lo, hi)``, the outer bands open; empty: one bank per value.
    partition_edges: tuple[float, ...] = ()
    num_banks: int = 3
    dirichlet_alpha: float = 0.5
    seed: int = 42
    #: ``dirichlet``: fewest rows of each class every bank must get (else the split is refused).
    min_class_rows: int = 5
    #: ``"table"``: ``path`` is one table split into banks; ``"per-bank"``: each bank
    #: reads its own file (``path``, or the ``directory``'s file for its index), all rows.
    source: str = "table"
    directory: str = ""
    #: A schema TOML file (:mod:`flower_ext.data.schema`); empty: the strict numeric loader.
    schema_path: str = ""


def _short(value: str, limit: int = 40) -> str:
    """A cell value for a message: quoted, and cut if long (a stray blob, not a number)."""
    shown = value if len(value) <= limit else value[: limit - 3] + "..."
    return repr(shown)


def _read_text(path: Path) -> str:
    """The file's text; refuses what is not a UTF-8 text file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"CSV file '{path}' cannot be read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark (Excel's UTF-8) is dropped
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"CSV file '{path}', row {line}: not UTF-8 text (byte {data[err.start]:#04x}); "
            "save the file as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"CSV file '{path}', row {line}: contains NUL bytes; not a text CSV")
    if not text.strip():
        raise DataError(f"CSV file '{path}' is empty")
    return text


def _scan_records(
    text: str, path: Path, delimiter: str = ",", allow_empty: bool = False
) -> tuple[list[str], list[int]]:
    """Header names and the file row each data record starts on; checks field counts.

    Only for the structure and row numbers; pandas parses the values. ``allow_empty``:
    one column may have an empty name (a schema declares it as an id column).
    """
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[int] = []
    start = 1
    try:
        for record in reader:
            if header is None:
                if not record:
                    raise DataError(
                        f"CSV file '{path}', row {start}: the first line is empty; "
                        "the header must be on row 1"
                    )
                header = record
                _check_header(header, path, delimiter, allow_empty)
            elif record:  # blank lines are skipped, as pandas does
                if len(record) != len(header) and any("\n" in f for f in record):
                    raise DataError(
                        f"CSV file '{path}', row {start}: a quoted value opened here runs to "
                        f"row {reader.line_num}; is a closing quote missing?"
                    )
                if len(record) != len(header):
                    raise DataError(
                        f"CSV file '{path}', row {start}: {len(record)} field(s) but the header "
                        f"has {len(header)}"
                    )
                rows.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"CSV file '{path}', row {reader.line_num}: {err}") from None
    assert header is not None  # the text is not blank
    return header, rows


def _check_header(
    header: list[str], path: Path, delimiter: str = ",", allow_empty: bool = False
) -> None:
    if len(header) == 1:
        found = [d for d in (",", *_OTHER_DELIMITERS) if d != delimiter and d in header[0]]
        if found:
            raise DataError(
                f"CSV file '{path}', row 1: the header is one column {_short(header[0])}; the file "
                f"looks {found[0]!r}-separated, but columns must be separated by "
                f"{'commas' if delimiter == ',' else repr(delimiter)} (a csv-schema file can "
                f"declare delimiter = {found[0]!r})"
            )
    seen: dict[str, int] = {}
    empty_seen = False
    for position, name in enumerate(header, start=1):
        key = name.strip()
        if not key and allow_empty and not empty_seen:
            empty_seen = True
            continue
        if not key:
            raise DataError(
                f"CSV file '{path}', row 1: column {position} has an empty name; "
                "every column needs a name"
                + (
                    " (pandas' to_csv writes its row index this way; a csv-schema drops it "
                    'with columns.id = [""])'
                    if position == 1
                    else ""
                )
            )
        if key in seen:
            raise DataError(
                f"CSV file '{path}', row 1: column name {key!r} appears twice (columns "
                f"{seen[key]} and {position}); rename or remove one (a duplicated label "
                "would leak into the features)"
            )
        seen[key] = position
    for name in header:  # after the duplicates: 'y ' next to 'y' is a duplicate first
        if name.strip() != name:
            raise DataError(
                f"CSV file '{path}', row 1: column name {name!r} has spaces around it; "
                f"write it as {name.strip()!r}"
            )


def _check_columns(columns: list[str], spec: CsvSpec, path: Path) -> list[str]:
    """The columns the model uses (label included), after checking the spec against them."""
    label = spec.label_column
    if label not in columns:
        hint = [c for c in columns if c.lower() == label.lower()]
        raise DataError(
            f"CSV file '{path}': label column '{label}' not found"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; columns are {columns}"
        )
    if label in spec.drop_columns:
        raise DataError(
            f"CSV file '{path}': the label column '{label}' is listed in csv-drop-columns; "
            "remove it from there"
        )
    unknown_drops = [c for c in spec.drop_columns if c not in columns]
    if unknown_drops:
        raise DataError(
            f"CSV file '{path}': columns to drop {unknown_drops} are not in the file; "
            f"columns are {columns}"
        )
    partition = spec.partition_column
    if spec.split == "natural" and partition:
        if partition in spec.drop_columns:
            raise DataError(
                f"CSV file '{path}': the partition column '{partition}' is listed in "
                "csv-drop-columns, but the natural split needs it; remove it from there"
            )
        if partition not in columns:
            raise DataError(
                f"CSV file '{path}': partition column '{partition}' not found; "
                f"columns are {columns}"
            )
        if partition == label:
            raise DataError(
                f"CSV file '{path}': the partition column is the label '{label}'; every bank "
                "would hold one class only"
            )
    used = [c for c in columns if c not in spec.drop_columns]
    if len(used) < 2:
        raise DataError(
            f"CSV file '{path}': no feature columns left besides the label '{label}' "
            f"(columns {columns}, dropped {list(spec.drop_columns)})"
        )
    return used


def _numeric_column(cells: pd.Series, column: str, rows: list[int] | None, path: Path) -> pd.Series:
    """``cells`` (strings) as numbers; the first bad cell is named with its row."""
    text = cells.str.strip()
    values = pd.to_numeric(text, errors="coerce").astype(np.float64)
    bad = ~np.isfinite(values.to_numpy()) | (values.abs() > _FLOAT32_MAX).to_numpy()
    if bad.any():
        where = np.flatnonzero(bad)
        first = int(where[0])
        row = rows[first] if rows is not None else f"{first + 2} (approximately)"
        raw = str(text.iloc[first])
        word = raw.lower().lstrip("+-")
        if raw == "":
            problem = "empty value; impute or drop such rows first"
        elif raw.lower() in _MISSING_WORDS:
            problem = f"missing value {_short(raw)}; impute or drop such rows first"
        elif word in _INF_WORDS:
            problem = f"{_short(raw)} is infinite; only finite numbers can be used"
        elif np.isnan(values.iloc[first]):
            problem = (
                f"{_short(raw)} is not a number (the column is not numeric); "
                "encode it as numbers or list the column in csv-drop-columns"
            )
        else:
            problem = (
                f"{_short(raw)} is out of range: beyond float32's ±{_FLOAT32_MAX:.2e}, the "
                "model's precision; rescale the column"
            )
        more = f" ({len(where) - 1} more such row(s) in this column)" if len(where) > 1 else ""
        raise DataError(f"CSV file '{path}', column '{column}', row {row}: {problem}{more}")
    integral = np.all(np.mod(values.to_numpy(), 1) == 0) and values.abs().max() < 2**53
    return values.astype(np.int64) if integral else values


def read_table(spec: CsvSpec) -> pd.DataFrame:
    """Read and check the CSV: a numeric table with a 0/1 label column.

    Returns the table without the dropped columns; integral columns as int64,
    others as float64, the label as int64.

    Raises
    ------
    DataError
        For anything that would not train as given (see the module docstring),
        naming the file, the column and the row.
    """
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV file '{path}' does not exist")
    text = _read_text(path)
    header, rows = _scan_records(text, path)
    if not rows:
        raise DataError(f"CSV file '{path}' has a header but no rows")
    used = _check_columns(header, spec, path)
    try:
        raw = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,  # every cell stays text: the checks below name bad ones
            na_filter=False,
            index_col=False,
            skip_blank_lines=True,
        )
    except (pd.errors.ParserError, ValueError) as err:
        raise DataError(f"CSV file '{path}' could not be parsed: {err}") from None
    if list(raw.columns) != header:  # pandas and the row scan must agree on the columns
        raise DataError(f"CSV file '{path}', row 1: the header could not be read consistently")
    # Row numbers from the scan when both counted the same records; else approximate.
    row_of: list[int] | None = rows if len(rows) == len(raw) else None
    if len(raw) < MIN_BANK_ROWS:
        raise DataError(
            f"CSV file '{path}' has {len(raw)} data row(s); at least {MIN_BANK_ROWS} are needed "
            "(each bank holds out a test split)"
        )
    frame = pd.DataFrame(
        {c: _numeric_column(raw[c], c, row_of, path) for c in used}, index=raw.index
    )
    label = frame[spec.label_column]
    not_binary = ~label.isin([0, 1]).to_numpy()
    if not_binary.any():
        first = int(np.flatnonzero(not_binary)[0])
        row = row_of[first] if row_of is not None else f"{first + 2} (approximately)"
        shown = sorted({str(v) for v in label[not_binary]})[:5]
        raise DataError(
            f"CSV file '{path}', column '{spec.label_column}', row {row}: the label must be "
            f"0 or 1, found {raw[spec.label_column].iloc[first].strip()!r} "
            f"(values outside 0/1: {shown})"
        )
    frame[spec.label_column] = label.astype(np.int64)
    return frame.reset_index(drop=True)


def split_into_banks(frame: pd.DataFrame, spec: CsvSpec) -> dict[str, pd.DataFrame]:
    """Split a checked table into banks with flwr-datasets partitioners."""
    # Imported here: `datasets` takes a second to import and only CSV runs need it.
    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    disable_progress_bars()  # a tqdm bar per bank in every run's log helps nobody

    if spec.split not in SPLITS:
        raise DataError(f"csv-split must be one of {SPLITS}, got '{spec.split}'")
    frame = frame.reset_index(drop=True)
    if spec.split == "natural":
        column = spec.partition_column
        if not column:
            raise DataError("csv-split 'natural' needs csv-partition-column")
        if column not in frame.columns:
            raise DataError(
                f"partition column '{column}' not found; columns are {list(frame.columns)}"
            )
        if spec.partition_edges:
            if spec.partition_values:
                raise DataError(
                    "csv-partition-edges bins the partition column into bands; "
                    "csv-partition-values picks values of an unbinned column: set "
                    "csv-partition-values='' with edges"
                )
            frame = frame.copy()
            column = _PARTITION_BAND
            frame[column] = partition_bands(frame[spec.partition_column], spec)
        elif spec.partition_values:
            text_ids = frame[column].dtype == object  # a schema's text partition column
            wanted = [
                v.strip() if text_ids else _partition_value(v, column)
                for v in spec.partition_values
            ]
            ids = frame[column] if text_ids else frame[column].astype(float)
            kept = ids.isin(wanted)
            present = set(ids)
            absent = [
                v for v, w in zip(spec.partition_values, wanted, strict=True) if w not in present
            ]
            if absent:
                raise DataError(
                    f"bank(s) {[f'{column}={v}' for v in absent]} would have no rows: "
                    f"'{column}' never takes those values"
                )
            if (~kept).any():
                logging.getLogger(__name__).info(
                    "dropped %d rows whose %s is not in %s",
                    int((~kept).sum()),
                    column,
                    list(spec.partition_values),
                )
            frame = frame[kept].reset_index(drop=True)
        partitioner = NaturalIdPartitioner(partition_by=column)
    elif spec.split == "iid":
        if spec.num_banks < 1 or spec.num_banks > len(frame):
            raise DataError(f"cannot split {len(frame)} rows into {spec.num_banks} banks")
        partitioner = IidPartitioner(num_partitions=spec.num_banks)
    else:
        if spec.dirichlet_alpha <= 0:
            raise DataError(f"csv-dirichlet-alpha must be > 0, got {spec.dirichlet_alpha}")
        if spec.num_banks < 1:
            raise DataError(f"cannot split into {spec.num_banks} banks")
        return _named_banks(
            {
                f"bank-{b}": frame.iloc[rows].reset_index(drop=True)
                for b, rows in enumerate(dirichlet_bank_indices(frame, spec))
            },
            spec,
        )
    partitioner.dataset = Dataset.from_pandas(frame, preserve_index=False)
    try:
        num = partitioner.num_partitions
    except ValueError as err:  # raised when the Dirichlet draw cannot satisfy the min size
        raise DataError(f"could not split into banks: {err}") from None
    banks: dict[str, pd.DataFrame] = {}
    if spec.split == "natural":
        id_to_value = partitioner.partition_id_to_natural_id
        order = sorted(range(num), key=lambda i: _natural_order(id_to_value[i]))
    else:
        order = list(range(num))
    for bank_index, partition_id in enumerate(order):
        part = partitioner.load_partition(partition_id).to_pandas()
        if spec.split == "natural":
            value = partitioner.partition_id_to_natural_id[partition_id]
            name = f"bank-{bank_index}-{spec.partition_column}={_fmt(value)}"
            part = part.drop(columns=[_PARTITION_BAND], errors="ignore")
        else:
            name = f"bank-{bank_index}"
        banks[name] = part
    return _named_banks(banks, spec)


#: The temporary column that holds each row's band (``csv-partition-edges``).
_PARTITION_BAND = "__partition_band__"


def partition_bands(values: pd.Series, spec: CsvSpec) -> pd.Series:
    """Each row's band of ``spec.partition_edges`` as text, ``"[lo, hi)"``.

    Bands are closed on the left; the first starts at ``-inf`` and the last ends at ``inf``.
    A band without rows would be a bank without data: refused, naming the band.
    """
    edges = np.asarray(spec.partition_edges, dtype=np.float64)
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise DataError(
            f"csv-partition-edges must be finite and strictly increasing, got "
            f"{list(spec.partition_edges)}"
        )
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(numbers).any():
        raise DataError(
            f"csv-partition-edges: partition column '{spec.partition_column}' is not numeric"
        )
    bounds = ["-inf", *(_fmt(float(e)) for e in edges), "inf"]
    labels = [f"[{lo}, {hi})" for lo, hi in itertools.pairwise(bounds)]
    band = np.searchsorted(edges, numbers, side="right")
    counts = np.bincount(band, minlength=len(labels))
    empty = [labels[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(
            f"csv-partition-edges: band(s) {empty} of '{spec.partition_column}' hold no rows; "
            "every band is a bank, so move or remove those edges"
        )
    return pd.Series(np.asarray(labels, dtype=object)[band], index=values.index)


def _named_banks(banks: dict[str, pd.DataFrame], spec: CsvSpec) -> dict[str, pd.DataFrame]:
    for name, part in banks.items():
        if len(part) == 0:
            raise DataError(f"{name} was left with no rows by the '{spec.split}' split")
        if len(part) < MIN_BANK_ROWS:
            raise DataError(
                f"{name} has {len(part)} row(s) after the '{spec.split}' split; a bank needs "
                f"at least {MIN_BANK_ROWS} (it holds out a test split)"
            )
    return banks


#: Dirichlet draws tried (seed, seed + 1, ...) when one cannot meet the minimum bank size.
DIRICHLET_TRIES = 4


def dirichlet_bank_indices(frame: pd.DataFrame, spec: CsvSpec) -> list[np.ndarray]:
    """Row indices per bank: a Dirichlet(alpha) label skew that keeps both classes everywhere.

    flwr-datasets' :class:`DirichletPartitioner` draws the skew (``self_balancing``,
    at least 20 rows a bank). At small alpha it often leaves a bank with no defaults
    at all: such a bank has no AUC, no verdict and a meaningless local-only baseline.
    So each bank short of ``min_class_rows`` rows of a class gets them moved over,
    at random, from the bank holding most of that class (the skew stays, the
    smallest possible change to it); the moves are logged. When the table itself
    has too few rows of a class for that, the split is refused with the numbers.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = frame[spec.label_column].to_numpy().astype(np.int64)
    counts = np.bincount(labels, minlength=2)
    need = spec.min_class_rows
    if counts.min() < need * spec.num_banks:
        raise DataError(
            f"csv-split 'dirichlet': the table has {counts[1]} default(s) and {counts[0]} "
            f"non-default(s), too few to give each of {spec.num_banks} banks at least {need} "
            "of each class; lower num-banks (or use csv-split 'iid')"
        )
    dataset = Dataset.from_pandas(frame, preserve_index=False)
    problem = ""
    for attempt in range(DIRICHLET_TRIES):
        # At least 20 rows a bank; past a few seeds any size (the top-up below still gives
        # every bank 2 x min_class_rows), since a tiny alpha rarely meets a minimum size.
        smallest = min(20, len(frame) // spec.num_banks) if attempt < 3 else 0
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_banks,
            partition_by=spec.label_column,
            alpha=spec.dirichlet_alpha,
            min_partition_size=smallest,
            self_balancing=True,
            seed=spec.seed + attempt,
        )
        partitioner.dataset = dataset
        try:
            partitioner.load_partition(0)  # draws every bank's indices
        except ValueError as err:
            problem = str(err)
            continue
        banks = [
            np.asarray(partitioner._partition_id_to_indices[b], dtype=np.int64)
            for b in range(spec.num_banks)
        ]
        return _top_up_classes(banks, labels, need, spec.seed)
    raise DataError(f"could not split into banks: {problem}")


def _top_up_classes(
    banks: list[np.ndarray], labels: np.ndarray, need: int, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    moved = 0
    for cls in (1, 0):
        while True:
            have = np.array([(labels[b] == cls).sum() for b in banks])
            short = int(np.argmin(have))
            if have[short] >= need:
                break
            donor = int(np.argmax(have))
            take = min(need - have[short], have[donor] - need)
            rows = banks[donor][labels[banks[donor]] == cls]
            chosen = rng.choice(rows, size=take, replace=False)
            banks[donor] = np.setdiff1d(banks[donor], chosen)
            banks[short] = np.concatenate([banks[short], chosen])
            moved += take
    if moved:
        logging.getLogger(__name__).info(
            "dirichlet split: moved %d row(s) so that every bank has >= %d of each class",
            moved,
            need,
        )
    return [np.sort(b) for b in banks]


def _natural_order(value: object) -> tuple[int, float, str]:
    """Banks of a natural split in order: by number, by a bin's left edge, else by text."""
    text = str(value)
    try:
        return (0, float(text), text)
    except ValueError:
        pass
    match = re.match(r"^[\[(]\s*(-?(?:inf|[\d.]+(?:e[+-]?\d+)?))", text)
    if match:
        return (0, float(match.group(1)), text)
    return (1, 0.0, text)


def _partition_value(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(
            f"csv-partition-values: {text!r} is not a number; '{column}' holds numbers "
            '(e.g. csv-partition-values = "1,2,3")'
        ) from None
    if not np.isfinite(value):
        raise DataError(f"csv-partition-values: {text!r} is not a finite number")
    return value


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_csv_banks(spec: CsvSpec) -> dict[str, pd.DataFrame]:
    """Read ``spec.path`` and split it into banks (name -> rows incl. the label)."""
    return split_into_banks(read_table(spec), spec)
