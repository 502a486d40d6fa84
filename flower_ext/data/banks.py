"""One bank's train/test data, from the synthetic generator or CSV files.

CSV data comes two ways (run config ``csv-source``):

- ``"table"`` (default): ``csv-path`` is one table, split into banks (``csv-split``);
  every party that loads it reads the same file (simulation, benchmarks);
- ``"per-bank"``: each bank reads its own file and uses all of its rows, with its own
  train/test split. A deployed bank's file is its node config ``csv-path`` (the deploy
  script's ``--csv-dir`` sets it); the simulation emulates it with run config
  ``csv-dir``, a directory holding one ``*.csv`` per bank (bank ``i`` is the ``i``-th file
  in natural name order: ``bank-2.csv`` before ``bank-10.csv``). The server needs no file;
  where it can read ``csv-dir`` it also trains the centralized ceiling. A node config
  ``csv-path`` always means "this bank's own file", whatever ``csv-source`` says.

With ``csv-schema`` (a TOML file, :mod:`flower_ext.data.schema`) raw exports are read as
declared (labels, ids, categoricals, missing values, money, percent, transforms); the
statistics that needs across banks come from the app's federated query
(:mod:`flower_ext.data.preprocessing`). Without it the strict numeric loader applies.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .csv_loader import (
    MIN_BANK_ROWS,
    CsvSpec,
    DataError,
    load_csv_banks,
    read_table,
    split_into_banks,
)
from .preprocessing import (
    Preprocessing,
    RawTable,
    apply_preprocessing,
    combine_stats,
    local_stats,
    partition_keys,
    read_raw,
)
from .scenarios import SCENARIO_KEY, generate_scenario_bank, get_scenario
from .schema import Schema, load_schema
from .synthetic import FEATURES, LABEL_COLUMN, bank_name

DATASETS = ("synthetic", "csv")
CSV_SOURCES = ("table", "per-bank")


def _no_rows() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class BankData:
    """A bank's splits: features as float32, labels as 0/1 int64.

    ``x_train`` holds the rows the bank trains on; ``x_val`` the validation rows carved out
    of its training rows (``validation-fraction``, stratified, by seed), used only to pick
    the best round; ``x_test`` the held-out test rows every figure is reported on.
    """

    name: str
    feature_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray = field(default_factory=_no_rows)
    y_val: np.ndarray = field(default_factory=_no_rows)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)


@dataclass(frozen=True)
class DataSource:
    """Where the federation's data comes from (the app's data run-config keys)."""

    dataset: str = "synthetic"
    num_banks: int = 5
    heterogeneity: float = 0.8
    rows_per_bank: int = 2000
    seed: int = 42
    test_fraction: float = 0.25
    csv: CsvSpec | None = None
    #: Share of each bank's training rows kept aside for validation (best-round selection).
    validation_fraction: float = 0.15
    #: The synthetic banks' non-IID scenario (:mod:`flower_ext.data.scenarios`).
    scenario: str = "segments"

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> DataSource:
        """Build from a Flower run config (``dataset``, ``num-banks``, ``csv-path``, ...)."""
        dataset = str(cfg.get("dataset", "synthetic"))
        if dataset not in DATASETS:
            raise DataError(f"dataset must be one of {DATASETS}, got '{dataset}'")
        seed = int(cfg.get("seed", 42))  # type: ignore[arg-type]
        num_banks = int(cfg.get("num-banks", 5))  # type: ignore[arg-type]
        scenario = str(cfg.get(SCENARIO_KEY, "segments") or "segments").strip()
        try:
            get_scenario(scenario)
        except ValueError as err:
            raise DataError(str(err)) from None
        if dataset != "synthetic" and scenario != "segments":
            raise DataError(
                f"{SCENARIO_KEY} '{scenario}' shapes the synthetic banks (dataset "
                "'synthetic'); a CSV's banks come from csv-split, so leave scenario "
                "'segments'"
            )
        csv = None
        if dataset == "csv":
            source = str(cfg.get("csv-source", "table") or "table")
            if source not in CSV_SOURCES:
                raise DataError(f"csv-source must be one of {CSV_SOURCES}, got '{source}'")
            path = str(cfg.get("csv-path", "") or "")
            directory = str(cfg.get("csv-dir", "") or "")
            schema = str(cfg.get("csv-schema", "") or "")
            if source == "table" and not path:
                raise DataError(
                    "dataset 'csv' needs csv-path (one table split into banks), or "
                    "csv-source='per-bank' when each bank has its own file (node config "
                    "csv-path in a deployment, csv-dir in a simulation)"
                )
            for key, value in (("csv-path", path), ("csv-dir", directory), ("csv-schema", schema)):
                _check_absolute(key, value)
            csv = CsvSpec(
                path=path if source == "table" else "",
                label_column=str(cfg.get("csv-label-column", "default.payment.next.month")),
                drop_columns=_csv_list(cfg.get("csv-drop-columns", "")),
                split=str(cfg.get("csv-split", "natural")),
                partition_column=str(cfg.get("csv-partition-column", "")),
                partition_values=_csv_list(cfg.get("csv-partition-values", "")),
                partition_edges=_csv_edges(cfg.get("csv-partition-edges", "")),
                num_banks=num_banks,
                dirichlet_alpha=float(cfg.get("csv-dirichlet-alpha", 0.5)),  # type: ignore[arg-type]
                seed=seed,
                min_class_rows=int(cfg.get("csv-min-class-rows", 5)),  # type: ignore[arg-type]
                source=source,
                directory=directory,
                schema_path=schema,
            )
        test_fraction = float(cfg.get("test-fraction", 0.25))  # type: ignore[arg-type]
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test-fraction must be in (0, 1), got {test_fraction}")
        validation_fraction = float(cfg.get("validation-fraction", 0.15))  # type: ignore[arg-type]
        if not 0.0 <= validation_fraction <= 0.5:
            raise DataError(
                f"validation-fraction must be in [0, 0.5] (0 = no validation split), "
                f"got {validation_fraction}"
            )
        return cls(
            dataset=dataset,
            num_banks=num_banks,
            heterogeneity=float(cfg.get("heterogeneity", 0.8)),  # type: ignore[arg-type]
            rows_per_bank=int(cfg.get("rows-per-bank", 2000)),  # type: ignore[arg-type]
            seed=seed,
            test_fraction=test_fraction,
            csv=csv,
            validation_fraction=validation_fraction,
            scenario=scenario,
        )


def _check_absolute(key: str, path: str) -> None:
    if path and not Path(path).expanduser().is_absolute():
        # The ServerApp and ClientApps run in the SuperLink's directory, not the
        # user's: a relative path silently reads another file, or none.
        raise DataError(
            f"{key} '{path}' is relative; the apps do not run in your working "
            "directory, so give the absolute path, e.g. "
            f"{key}='$PWD/{path}' (here: '{Path(path).resolve()}')"
        )


def _csv_list(value: object) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _csv_edges(value: object) -> tuple[float, ...]:
    """``csv-partition-edges``: comma-separated, finite, strictly increasing numbers."""
    edges = []
    for text in _csv_list(value):
        try:
            edge = float(text)
        except ValueError:
            raise DataError(
                f"csv-partition-edges: {text!r} is not a number (e.g. "
                "csv-partition-edges='50000,150000,300000')"
            ) from None
        if not np.isfinite(edge):
            raise DataError(f"csv-partition-edges: {text!r} is not a finite number")
        edges.append(edge)
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise DataError(f"csv-partition-edges must be strictly increasing, got {edges}")
    return tuple(edges)


@lru_cache(maxsize=4)
def _csv_banks(spec: CsvSpec) -> dict[str, pd.DataFrame]:
    return load_csv_banks(spec)


@lru_cache(maxsize=8)
def _schema(path: str) -> Schema:
    return load_schema(path)


def schema_of(spec: CsvSpec | None) -> Schema | None:
    """The run's schema (``csv-schema``), with a table split's partition column kept out
    of the features; None without one."""
    if spec is None or not spec.schema_path:
        return None
    schema = _schema(spec.schema_path)
    if (
        spec.source == "table"
        and spec.split == "natural"
        and not schema.partition_column
        and spec.partition_column
    ):
        schema = replace(
            schema,
            partition_column=spec.partition_column,
            partition_edges=spec.partition_edges or schema.partition_edges,
        )
    return schema


def _natural_key(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def bank_files(spec: CsvSpec) -> list[Path]:
    """``csv-dir``'s ``*.csv`` files, bank 0 first (natural name order)."""
    folder = Path(spec.directory).expanduser()
    if not folder.is_dir():
        raise DataError(f"csv-dir '{folder}' is not a directory")
    files = sorted((f for f in folder.glob("*.csv") if f.is_file()), key=_natural_key)
    if len(files) != spec.num_banks:
        raise DataError(
            f"csv-dir '{folder}' holds {len(files)} .csv file(s) but num-banks is "
            f"{spec.num_banks}; one file per bank: {[f.name for f in files][:10]}"
        )
    return files


def per_bank_file(spec: CsvSpec, index: int) -> Path:
    """Bank ``index``'s own file: its ``csv-path`` (node config), else ``csv-dir``'s file."""
    if spec.path:
        return Path(spec.path).expanduser()
    if spec.directory:
        files = bank_files(spec)
        if not 0 <= index < len(files):
            raise DataError(f"bank index {index} is outside 0..{len(files) - 1} (csv-dir files)")
        return files[index]
    raise DataError(
        "csv-source 'per-bank': this bank has no file; give it node config csv-path "
        "(a deployment: flower-supernode --node-config \"csv-path='/data/bank.csv'\") or "
        "run config csv-dir (a simulation: a directory with one .csv per bank)"
    )


def _file_spec(spec: CsvSpec, path: Path) -> CsvSpec:
    """How to read one bank's own file with the strict loader: all rows, no split."""
    return replace(spec, path=str(path), split="iid", partition_column="", partition_values=())


def bank_frames(source: DataSource) -> dict[str, pd.DataFrame]:
    """Every bank's rows (label included), keyed by bank name, in bank order."""
    if source.dataset == "csv":
        assert source.csv is not None
        spec = source.csv
        if spec.source == "per-bank":
            paths = [per_bank_file(spec, i) for i in range(spec.num_banks)]
            if spec.path:  # one node's own file: the others are on their machines
                paths = [Path(spec.path)]
            return {p.stem: read_table(_file_spec(spec, p)) for p in paths}
        return _csv_banks(spec)
    return {
        bank_name(b): generate_scenario_bank(
            source.scenario,
            b,
            source.num_banks,
            rows_per_bank=source.rows_per_bank,
            heterogeneity=source.heterogeneity,
            seed=source.seed,
        )
        for b in range(source.num_banks)
    }


def _split_indices(
    name: str, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test row indices (plain random if a class is too rare)."""
    if len(y) < MIN_BANK_ROWS:
        raise DataError(f"{name} has {len(y)} rows: too few to hold out a test split")
    counts = np.bincount(y, minlength=2)
    stratify = y if counts.min() >= 2 else None
    train, test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return np.asarray(train), np.asarray(test)


def _validation_indices(
    y: np.ndarray, train: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, validation)``: ``fraction`` of the training rows ``train`` held for validation,
    stratified where both classes have 2+ rows, deterministic by ``seed``. No validation rows
    when ``fraction`` is 0 or the bank is too small to spare any."""
    n_val = round(fraction * len(train))
    if n_val < 2 or len(train) - n_val < 2:
        return train, train[:0]
    counts = np.bincount(y[train], minlength=2)
    stratify = y[train] if counts.min() >= 2 and n_val >= 2 else None
    fit, val = train_test_split(train, test_size=n_val, random_state=seed + 1, stratify=stratify)
    return np.asarray(fit), np.asarray(val)


def _bank_data(
    name: str,
    features: tuple[str, ...],
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
) -> BankData:
    train, test = _split_indices(name, y, test_fraction, seed)
    fit, val = _validation_indices(y, train, validation_fraction, seed)
    return BankData(name, features, x[fit], y[fit], x[test], y[test], x[val], y[val])


def split_bank(
    name: str,
    frame: pd.DataFrame,
    label_column: str,
    test_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
) -> BankData:
    """Stratified train/test split of one bank (plain random if a class is too rare), and
    ``validation_fraction`` of the training rows held out for validation."""
    features = tuple(c for c in frame.columns if c != label_column)
    x = frame[list(features)].to_numpy(dtype=np.float32)
    y = frame[label_column].to_numpy(dtype=np.int64)
    return _bank_data(name, features, x, y, test_fraction, seed, validation_fraction)


def label_column_of(source: DataSource) -> str:
    schema = schema_of(source.csv)
    if schema is not None:
        return schema.label_column
    return source.csv.label_column if source.csv is not None else LABEL_COLUMN


# --- the schema path: raw tables, federated preprocessing statistics -------------------


@lru_cache(maxsize=4)
def _raw_split(spec: CsvSpec, schema: Schema) -> dict[str, RawTable]:
    """One table read under the schema and split into banks (row subsets, text cells)."""
    raw = read_raw(spec.path, schema)
    frame = pd.DataFrame({"_row": np.arange(len(raw.label)), schema.label_column: raw.label})
    split_spec = replace(spec, label_column=schema.label_column)
    if spec.split == "natural":
        if not schema.partition_column:
            raise DataError(
                "csv-split 'natural' needs a partition column: csv-partition-column, or "
                "[partition] column in the schema"
            )
        frame[schema.partition_column] = partition_keys(raw, schema).to_numpy(dtype=object)
        # The keys are already the schema's bands: not binned a second time.
        split_spec = replace(
            split_spec, partition_column=schema.partition_column, partition_edges=()
        )
    parts = split_into_banks(frame, split_spec)
    return {name: raw.subset(part["_row"].to_numpy()) for name, part in parts.items()}


@lru_cache(maxsize=8)
def _raw_file(path: str, schema: Schema) -> RawTable:
    return read_raw(path, schema)


def raw_bank(source: DataSource, bank_index: int) -> tuple[str, RawTable, Schema]:
    """Bank ``bank_index``'s raw rows under the run's schema (``csv-schema`` set)."""
    spec = source.csv
    schema = schema_of(spec)
    if spec is None or schema is None:
        raise DataError("raw tables need dataset 'csv' and a csv-schema")
    if spec.source == "per-bank":
        path = per_bank_file(spec, bank_index)
        return path.stem, _raw_file(str(path), schema), schema
    banks = _raw_split(spec, schema)
    names = list(banks)
    if not 0 <= bank_index < len(names):
        raise DataError(
            f"bank index {bank_index} is outside 0..{len(names) - 1}: the CSV split "
            f"gives {len(names)} banks ({names})"
        )
    return names[bank_index], banks[names[bank_index]], schema


def _train_rows(name: str, raw: RawTable, source: DataSource) -> tuple[np.ndarray, np.ndarray]:
    return _split_indices(name, raw.label, source.test_fraction, source.seed)


def bank_preprocessing_stats(source: DataSource, bank_index: int) -> dict:
    """What this bank contributes to the federated preprocessing (its training rows only)."""
    name, raw, schema = raw_bank(source, bank_index)
    train, _ = _train_rows(name, raw, source)
    return local_stats(raw.subset(train), schema)


def _preprocessed_bank(
    name: str, raw: RawTable, schema: Schema, prep: Preprocessing, source: DataSource
) -> BankData:
    features, x, y = apply_preprocessing(raw, schema, prep)
    return _bank_data(
        name, features, x, y, source.test_fraction, source.seed, source.validation_fraction
    )


def load_bank(
    source: DataSource, bank_index: int, preprocessing: Preprocessing | None = None
) -> BankData:
    """The train/test data of bank number ``bank_index`` (0-based).

    With a schema, ``preprocessing`` is the federation's plan (the server sends it);
    without one it is not needed.
    """
    if source.dataset == "synthetic":
        if not 0 <= bank_index < source.num_banks:
            raise DataError(f"bank index {bank_index} is outside 0..{source.num_banks - 1}")
        frame = generate_scenario_bank(
            source.scenario,
            bank_index,
            source.num_banks,
            rows_per_bank=source.rows_per_bank,
            heterogeneity=source.heterogeneity,
            seed=source.seed,
        )
        name = bank_name(bank_index)
        return split_bank(
            name, frame, LABEL_COLUMN, source.test_fraction, source.seed, source.validation_fraction
        )
    assert source.csv is not None
    if schema_of(source.csv) is not None:
        name, raw, schema = raw_bank(source, bank_index)
        if preprocessing is None:
            raise DataError(
                f"{name}: a csv-schema run needs the federation's preprocessing, which the "
                "server sends with its queries and rounds; none came"
            )
        return _preprocessed_bank(name, raw, schema, preprocessing, source)
    if source.csv.source == "per-bank":
        path = per_bank_file(source.csv, bank_index)
        frame = read_table(_file_spec(source.csv, path))
        name = path.stem
    else:
        frames = bank_frames(source)
        names = list(frames)
        if not 0 <= bank_index < len(names):
            raise DataError(
                f"bank index {bank_index} is outside 0..{len(names) - 1}: the CSV split "
                f"gives {len(names)} banks ({names})"
            )
        name = names[bank_index]
        frame = frames[name]
    return split_bank(
        name,
        frame,
        label_column_of(source),
        source.test_fraction,
        source.seed,
        source.validation_fraction,
    )


def local_preprocessing(source: DataSource) -> Preprocessing:
    """The preprocessing the federated query gives when every bank answers honestly,
    computed where all banks' files are readable (simulation: the ceiling, benchmarks)."""
    stats = [bank_preprocessing_stats(source, i) for i in range(source.num_banks)]
    schema = schema_of(source.csv)
    assert schema is not None
    prep, rejected = combine_stats(stats, schema)
    if rejected:
        raise DataError(f"banks' preprocessing statistics do not agree: {rejected}")
    return prep


def load_all_banks(source: DataSource) -> list[BankData]:
    if source.dataset == "csv" and source.csv is not None:
        spec = source.csv
        if spec.source == "per-bank" and not spec.directory:
            raise DataError(
                "csv-source 'per-bank' without csv-dir: each bank's file is on its own "
                "machine, so nothing can be pooled"
            )
        if schema_of(spec) is not None:
            prep = local_preprocessing(source)
            return [
                _preprocessed_bank(*raw_bank(source, i), prep, source)
                for i in range(source.num_banks)
            ]
    label = label_column_of(source)
    return [
        split_bank(
            name, frame, label, source.test_fraction, source.seed, source.validation_fraction
        )
        for name, frame in bank_frames(source).items()
    ]


__all__ = [
    "FEATURES",
    "BankData",
    "DataError",
    "DataSource",
    "bank_frames",
    "bank_preprocessing_stats",
    "load_all_banks",
    "load_bank",
    "local_preprocessing",
    "raw_bank",
    "schema_of",
    "split_bank",
]
