"""Load a credit table from CSV and split it into banks.

Three ways to split, all through flwr-datasets partitioners:

- ``natural``: one bank per value of a partition column (e.g. ``EDUCATION`` or a
  region code), the most realistic non-IID split when the table has one;
- ``dirichlet``: label-skewed banks, Dirichlet(alpha) over the label per bank;
- ``iid``: uniform random banks.

Every problem a user can make with a CSV is reported as :class:`DataError`
naming the file, the column and what to do, never as a traceback from pandas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("natural", "iid", "dirichlet")


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
    num_banks: int = 3
    dirichlet_alpha: float = 0.5
    seed: int = 42


def read_table(spec: CsvSpec) -> pd.DataFrame:
    """Read and check the CSV: a numeric table with a binary label column."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV file '{path}' does not exist")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"CSV file '{path}' is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"CSV file '{path}' could not be parsed: {err}") from None
    if frame.empty:
        raise DataError(f"CSV file '{path}' has a header but no rows")
    if spec.label_column not in frame.columns:
        raise DataError(
            f"label column '{spec.label_column}' not found in '{path}'; "
            f"columns are {list(frame.columns)}"
        )
    unknown_drops = [c for c in spec.drop_columns if c not in frame.columns]
    if unknown_drops:
        raise DataError(f"columns to drop {unknown_drops} are not in '{path}'")
    frame = frame.drop(columns=list(spec.drop_columns))
    label = frame[spec.label_column]
    if label.isna().any():
        raise DataError(
            f"label column '{spec.label_column}' has {int(label.isna().sum())} empty values"
        )
    values = set(pd.unique(label))
    if not values <= {0, 1}:
        shown = sorted(map(str, values))[:5]
        raise DataError(f"label column '{spec.label_column}' must hold 0/1 values, found {shown}")
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        column = non_numeric[0]
        bad = frame[column][pd.to_numeric(frame[column], errors="coerce").isna()]
        example = f" (e.g. {bad.iloc[0]!r} in data row {int(bad.index[0]) + 1})" if len(bad) else ""
        raise DataError(
            f"column(s) {non_numeric} in '{path}' are not numeric{example}; "
            "encode them or list them in csv-drop-columns"
        )
    missing = frame.columns[frame.isna().any()].tolist()
    if missing:
        raise DataError(
            f"column(s) {missing} in '{path}' have empty values; impute or drop them first"
        )
    frame[spec.label_column] = frame[spec.label_column].astype(np.int64)
    return frame


def split_into_banks(frame: pd.DataFrame, spec: CsvSpec) -> dict[str, pd.DataFrame]:
    """Split a checked table into banks with flwr-datasets partitioners."""
    # Imported here: `datasets` takes a second to import and only CSV runs need it.
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

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
        if spec.partition_values:
            wanted = [float(v) for v in spec.partition_values]
            kept = frame[column].astype(float).isin(wanted)
            absent = [v for v in spec.partition_values if float(v) not in set(frame[column])]
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
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_banks,
            partition_by=spec.label_column,
            alpha=spec.dirichlet_alpha,
            min_partition_size=20,
            self_balancing=True,
            seed=spec.seed,
        )
    partitioner.dataset = Dataset.from_pandas(frame, preserve_index=False)
    try:
        num = partitioner.num_partitions
    except ValueError as err:  # raised when the Dirichlet draw cannot satisfy the min size
        raise DataError(f"could not split into banks: {err}") from None
    banks: dict[str, pd.DataFrame] = {}
    if spec.split == "natural":
        id_to_value = partitioner.partition_id_to_natural_id
        order = sorted(range(num), key=lambda i: float(id_to_value[i]))
    else:
        order = list(range(num))
    for bank_index, partition_id in enumerate(order):
        part = partitioner.load_partition(partition_id).to_pandas()
        if spec.split == "natural":
            value = partitioner.partition_id_to_natural_id[partition_id]
            name = f"bank-{bank_index}-{spec.partition_column}={_fmt(value)}"
        else:
            name = f"bank-{bank_index}"
        if len(part) == 0:
            raise DataError(f"{name} was left with no rows by the '{spec.split}' split")
        banks[name] = part
    return banks


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_csv_banks(spec: CsvSpec) -> dict[str, pd.DataFrame]:
    """Read ``spec.path`` and split it into banks (name -> rows incl. the label)."""
    return split_into_banks(read_table(spec), spec)
