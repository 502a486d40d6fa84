"""A newcomer's mistakes are refused at once, naming the run-config key (issue 17).

Each check runs before the ServerApp waits for nodes, generates HE keys or starts
training, so a wrong value costs seconds, not a Ray start and a minute of waiting.
"""

from __future__ import annotations

import pytest
from conftest import FakeGrid
from flwr.app import Context, RecordDict

from bank_risk import server_app
from bank_risk.settings import BankAppSettings, SettingsError
from bank_risk.strategy_factory import check_run_config


def _settings(**overrides) -> BankAppSettings:
    return BankAppSettings.from_config({"num-banks": 5, **overrides})


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"aggregation": "trimmed_mean"}, ["aggregation must be one of", "trimmed-mean"]),
        ({"aggregation": "krum", "num-malicious": 2}, ["num-malicious=2", "num-banks=5"]),
        ({"aggregation": "bulyan", "num-malicious": 2}, ["num-malicious=2", "at least 11"]),
        ({"aggregation": "median", "he": True}, ["he = true", "aggregation = 'median'"]),
        ({"aggregation": "trimmed-mean", "trim-beta": 0.7}, ["beta"]),
        ({"aggregation": "krum", "num-malicious": -1}, ["num_malicious_nodes"]),
    ],
)
def test_aggregation_mistakes_are_refused_naming_run_config_keys(overrides, words) -> None:
    with pytest.raises(SettingsError) as err:
        check_run_config(_settings(**overrides))
    for word in words:
        assert word in str(err.value)


def test_a_valid_robust_configuration_passes() -> None:
    check_run_config(_settings(aggregation="multikrum", **{"num-malicious": 1}))


def test_relative_csv_path_is_refused_with_the_absolute_path() -> None:
    with pytest.raises(SettingsError, match="absolute path") as err:
        _settings(dataset="csv", **{"csv-path": "data/uci.csv"})
    assert "$PWD/data/uci.csv" in str(err.value)


class _NoGrid(FakeGrid):
    def get_node_ids(self):
        raise AssertionError("the ServerApp asked for nodes before checking its settings")


def test_server_main_refuses_before_nodes_or_keys(monkeypatch) -> None:
    """Bad settings stop main() before it looks for nodes or generates HE keys."""

    def no_keys(*args, **kwargs):
        raise AssertionError("HE keys were prepared before the settings were checked")

    monkeypatch.setattr(server_app, "prepare_keys", no_keys)
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"num-banks": 3, "aggregation": "krum", "num-malicious": 1, "he": True},
    )
    with pytest.raises(SettingsError, match="he = true"):
        server_app.main(_NoGrid([]), context)


class _SimulatedGrid(FakeGrid):
    """Stands for Flower's InMemoryGrid: all simulated SuperNodes are there at once."""


_SimulatedGrid.__name__ = "InMemoryGrid"


def test_simulation_with_too_few_supernodes_fails_at_once() -> None:
    """Not after wait-for-nodes (60 s by default): the simulated node count is final."""
    grid = _SimulatedGrid([11, 12, 13])
    assert server_app.is_simulation(grid)
    with pytest.raises(SettingsError, match="num-supernodes=5"):
        server_app.wait_for_banks(grid, 5, timeout=120.0, simulation=True)


def test_simulation_with_more_supernodes_than_banks_fails_at_once() -> None:
    grid = _SimulatedGrid([11, 12, 13, 14, 15])
    with pytest.raises(SettingsError, match="num-banks=3"):
        server_app.wait_for_banks(grid, 3, timeout=120.0, simulation=True)


def test_deployment_waits_for_late_nodes() -> None:
    """Outside simulation nodes connect over time: enough nodes end the wait."""
    assert server_app.wait_for_banks(FakeGrid([1, 2, 3]), 3, timeout=5.0) == [1, 2, 3]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"attack": "sign-flip", "malicious-banks": "9"}, ["malicious-banks [9]"]),
        ({"attack": "sign-flip"}, ["needs malicious-banks"]),
        ({"num-server-rounds": 2.9}, ["num-server-rounds must be a whole number"]),
        ({"num-banks": 3.7}, ["num-banks must be a whole number"]),
        ({"rows-per-bank": 0}, ["rows-per-bank must be >= 1"]),
        ({"round-timeout": 0}, ["round-timeout must be > 0"]),
        ({"wait-for-nodes": -1}, ["wait-for-nodes must be >= 0"]),
        ({"max-weight": -1}, ["max-weight must be >= 0"]),
        ({"output-dir": "runs"}, ["output-dir 'runs' is relative", "$PWD/runs"]),
        ({"local-only-baseline": "maybe"}, ["local-only-baseline must be true or false"]),
        ({"topk-ratio": 2}, ["topk-ratio must be in [0, 1]"]),
        ({"topk-ratio": 0.1, "topk-values": "int4"}, ["topk-values must be one of"]),
        ({"he": True, "topk-ratio": 0.1}, ["he = true cannot be combined with topk-ratio"]),
    ],
)
def test_more_first_hour_mistakes_are_refused_at_once(overrides, words) -> None:
    """Mistakes that used to be found by the banks, after Ray, or never."""
    with pytest.raises(SettingsError) as err:
        check_run_config(_settings(**overrides))
    for word in words:
        assert word in str(err.value)


def test_quoted_booleans_mean_what_they_say() -> None:
    """bool('false') is True: a quoted 'false' used to switch the baselines on."""
    settings = _settings(**{"local-only-baseline": "false", "centralized-baseline": "no"})
    assert settings.local_only_baseline is False and settings.centralized_baseline is False
