"""Bank data: a synthetic non-IID multi-bank generator, a CSV loader, per-bank files, a
declared schema for raw exports and its federated preprocessing."""

from .banks import BankData, DataSource, load_all_banks, load_bank
from .csv_loader import CsvSpec, DataError, load_csv_banks
from .schema import Schema, load_schema, parse_schema
from .synthetic import FEATURES, LABEL_COLUMN, generate_bank, generate_federation

__all__ = [
    "FEATURES",
    "LABEL_COLUMN",
    "BankData",
    "CsvSpec",
    "DataError",
    "DataSource",
    "Schema",
    "generate_bank",
    "generate_federation",
    "load_all_banks",
    "load_bank",
    "load_csv_banks",
    "load_schema",
    "parse_schema",
]
