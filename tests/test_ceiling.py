"""The centralized ceiling: trained to convergence, compared with the federated model (no Ray)."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord

from bank_risk.settings import BankAppSettings
from bank_risk.verdicts import ceiling_explanation, train_ceiling
from flower_ext.data import load_all_banks
from flower_ext.model import build_model


def _settings() -> BankAppSettings:
    return BankAppSettings.from_config({"num-banks": 3, "rows-per-bank": 700, "seed": 1})


def test_ceiling_beats_an_untrained_federated_model_and_says_so():
    settings = _settings()
    banks = load_all_banks(settings.data)
    untrained = build_model(banks[0].num_features, settings.model, settings.hidden_units, seed=3)
    ceiling = train_ceiling(settings, ArrayRecord(untrained.state_dict()))
    assert ceiling["auc"] > 0.7 and 1 <= ceiling["best_epoch"] <= ceiling["epochs_run"]
    assert "early stopping" in ceiling["label"] and set(ceiling["per_bank"]) == {
        b.name for b in banks
    }
    cmp = ceiling["federated_vs_ceiling"]
    assert cmp["diff"] < 0 and cmp["verdict"] == "loses"
    assert "below the centralized ceiling" in ceiling["explanation"]


@pytest.mark.parametrize(
    ("diff", "verdict", "words"),
    [
        (0.01, "no significant difference", "within noise"),
        (0.03, "gains", "not a bound"),
        (-0.02, "loses", "below the centralized ceiling"),
    ],
)
def test_the_report_explains_a_federated_model_above_the_ceiling(diff, verdict, words):
    assert words in ceiling_explanation(diff, diff - 0.01, diff + 0.01, verdict)
