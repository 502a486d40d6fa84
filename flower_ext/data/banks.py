"""One bank's train/test data, from the synthetic generator or a CSV."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .csv_loader import MIN_BANK_ROWS, CsvSpec, DataError, load_csv_banks
from .synthetic import FEATURES, LABEL_COLUMN, bank_name, generate_bank

DATASETS = ("synthetic", "csv")


@dataclass(frozen=True)
class BankData:
    """A bank's held-out split: features as float32, labels as 0/1 int64."""

    name: str
    feature_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

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

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> DataSource:
        """Build from a Flower run config (``dataset``, ``num-banks``, ``csv-path``, ...)."""
        dataset = str(cfg.get("dataset", "synthetic"))
        if dataset not in DATASETS:
            raise DataError(f"dataset must be one of {DATASETS}, got '{dataset}'")
        seed = int(cfg.get("seed", 42))  # type: ignore[arg-type]
        num_banks = int(cfg.get("num-banks", 5))  # type: ignore[arg-type]
        csv = None
        if dataset == "csv":
            path = str(cfg.get("csv-path", ""))
            if not path:
                raise DataError("dataset 'csv' needs csv-path")
            if not Path(path).expanduser().is_absolute():
                # The ServerApp and ClientApps run in the SuperLink's directory, not the
                # user's: a relative path silently reads another file, or none.
                raise DataError(
                    f"csv-path '{path}' is relative; the apps do not run in your working "
                    "directory, so give the absolute path, e.g. "
                    f"csv-path='$PWD/{path}' (here: '{Path(path).resolve()}')"
                )
            csv = CsvSpec(
                path=path,
                label_column=str(cfg.get("csv-label-column", "default.payment.next.month")),
                drop_columns=_csv_list(cfg.get("csv-drop-columns", "")),
                split=str(cfg.get("csv-split", "natural")),
                partition_column=str(cfg.get("csv-partition-column", "")),
                partition_values=_csv_list(cfg.get("csv-partition-values", "")),
                num_banks=num_banks,
                dirichlet_alpha=float(cfg.get("csv-dirichlet-alpha", 0.5)),  # type: ignore[arg-type]
                seed=seed,
            )
        test_fraction = float(cfg.get("test-fraction", 0.25))  # type: ignore[arg-type]
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test-fraction must be in (0, 1), got {test_fraction}")
        return cls(
            dataset=dataset,
            num_banks=num_banks,
            heterogeneity=float(cfg.get("heterogeneity", 0.8)),  # type: ignore[arg-type]
            rows_per_bank=int(cfg.get("rows-per-bank", 2000)),  # type: ignore[arg-type]
            seed=seed,
            test_fraction=test_fraction,
            csv=csv,
        )


def _csv_list(value: object) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


@lru_cache(maxsize=4)
def _csv_banks(spec: CsvSpec) -> dict[str, pd.DataFrame]:
    return load_csv_banks(spec)


def bank_frames(source: DataSource) -> dict[str, pd.DataFrame]:
    """Every bank's rows (label included), keyed by bank name, in bank order."""
    if source.dataset == "csv":
        assert source.csv is not None
        return _csv_banks(source.csv)
    return {
        bank_name(b): generate_bank(
            b,
            source.num_banks,
            rows_per_bank=source.rows_per_bank,
            heterogeneity=source.heterogeneity,
            seed=source.seed,
        )
        for b in range(source.num_banks)
    }


def split_bank(
    name: str, frame: pd.DataFrame, label_column: str, test_fraction: float, seed: int
) -> BankData:
    """Stratified train/test split of one bank (plain random if a class is too rare)."""
    features = tuple(c for c in frame.columns if c != label_column)
    x = frame[list(features)].to_numpy(dtype=np.float32)
    y = frame[label_column].to_numpy(dtype=np.int64)
    if len(y) < MIN_BANK_ROWS:
        raise DataError(f"{name} has {len(y)} rows: too few to hold out a test split")
    counts = np.bincount(y, minlength=2)
    stratify = y if counts.min() >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return BankData(name, features, x_tr, y_tr, x_te, y_te)


def label_column_of(source: DataSource) -> str:
    return source.csv.label_column if source.csv is not None else LABEL_COLUMN


def load_bank(source: DataSource, bank_index: int) -> BankData:
    """The train/test data of bank number ``bank_index`` (0-based)."""
    if source.dataset == "synthetic":
        if not 0 <= bank_index < source.num_banks:
            raise DataError(f"bank index {bank_index} is outside 0..{source.num_banks - 1}")
        frame = generate_bank(
            bank_index,
            source.num_banks,
            rows_per_bank=source.rows_per_bank,
            heterogeneity=source.heterogeneity,
            seed=source.seed,
        )
        name = bank_name(bank_index)
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
    return split_bank(name, frame, label_column_of(source), source.test_fraction, source.seed)


def load_all_banks(source: DataSource) -> list[BankData]:
    label = label_column_of(source)
    return [
        split_bank(name, frame, label, source.test_fraction, source.seed)
        for name, frame in bank_frames(source).items()
    ]


__all__ = [
    "FEATURES",
    "BankData",
    "DataError",
    "DataSource",
    "bank_frames",
    "load_all_banks",
    "load_bank",
    "split_bank",
]
