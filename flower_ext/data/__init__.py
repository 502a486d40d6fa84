"""Bank data: a synthetic non-IID multi-bank generator and a CSV loader."""

from .banks import BankData, DataSource, load_all_banks, load_bank
from .csv_loader import CsvSpec, DataError, load_csv_banks
from .synthetic import FEATURES, LABEL_COLUMN, generate_bank, generate_federation

__all__ = [
    "FEATURES",
    "LABEL_COLUMN",
    "BankData",
    "CsvSpec",
    "DataError",
    "DataSource",
    "generate_bank",
    "generate_federation",
    "load_all_banks",
    "load_bank",
    "load_csv_banks",
]
