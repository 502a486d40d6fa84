"""The robustness table's summary: gaps, best rule, worst rule and the issue-14 verdicts.

The README's acceptance table is printed by ``summarise`` + ``markdown``; these tests feed
them hand-made cells whose gaps are known, so a wrong reference, sign or min/max shows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_robustness_table.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_robustness_table", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(rule, attack, malicious, seed, aucs):
    return {
        "rule": rule,
        "attack": attack,
        "malicious": malicious,
        "num_malicious_banks": len(malicious.split(",")) if malicious else 0,
        "seed": seed,
        "final_auc": aucs[-1],
        "min_auc": min(aucs),
        "min_auc_after_round_1": min(aucs[1:]),
        "auc_by_round": aucs,
    }


def _args():
    return argparse.Namespace(
        banks=10,
        malicious_sets="2,7;2,5,7",
        rounds=3,
        seeds="42",
        trim_beta=0.3,
        knowledge="colluders",
        runtime="inprocess",
        extra='{"local-epochs": 3}',
    )


def _cells(bench):
    return [
        _cell("fedavg", "none", "", 42, [0.70, 0.76, 0.78]),
        _cell("fedavg", bench.HONEST_ONLY, "2,7", 42, [0.68, 0.76, 0.78]),
        _cell("good", "none", "", 42, [0.69, 0.76, 0.78]),
        # f = 2: "good" loses 0.005 (its minimum), "bad" 0.10 (its final)
        _cell("good", "ipm", "2,7", 42, [0.695, 0.75, 0.779]),
        _cell("bad", "ipm", "2,7", 42, [0.70, 0.72, 0.68]),
        # f = 3: the best rule loses 0.03 in round 1 only: misses the 0.02 goal
        _cell("good", "ipm", "2,5,7", 42, [0.67, 0.76, 0.78]),
        _cell("bad", "ipm", "2,5,7", 42, [0.66, 0.75, 0.77]),
    ]


def test_best_and_worst_rule_gaps_against_clean_and_honest_only(bench):
    result = bench.summarise(_cells(bench), _args(), 0.0)
    two = result["best_per_attack"]["ipm, f=2"]
    assert two["rule"] == "good"
    assert two["worst_gap_final_or_min"] == pytest.approx(-0.005)
    assert two["worst_gap_to_honest_only"] == pytest.approx(-0.001)  # 0.779 - 0.78
    assert two["worst_rule"] == "bad"
    assert two["worst_rule_gap_final_or_min"] == pytest.approx(-0.10)
    three = result["best_per_attack"]["ipm, f=3"]
    assert three["rule"] == "good"
    assert three["worst_gap_final_or_min"] == pytest.approx(-0.03)
    # from round 2 on the best rule is level with clean FedAvg (0.76 against 0.76)
    assert three["best_worst_gap_final_or_min_after_round_1"] == pytest.approx(0.0)
    assert result["setup"]["extra"] == {"local-epochs": 3}
    # without attack the rule is ranked, not clean FedAvg against itself
    assert result["best_per_attack"]["none, f=0"]["rule"] == "good"
    assert result["best_per_attack"]["none, f=0"]["worst_gap_final_or_min"] == pytest.approx(-0.01)


def test_markdown_flags_the_misses_and_the_rule_over_the_limit(bench):
    text = bench.markdown(bench.summarise(_cells(bench), _args(), 0.0))
    f2, f3 = (line for line in text.splitlines() if line.startswith(("| ipm | 2 |", "| ipm | 3 |")))
    assert "misses the goal" not in f2 and "-0.005 (good)" in f2
    assert "-0.100 (bad) **over 0.05**" in f2
    assert "-0.030 (good) **misses the goal**" in f3
    assert "over 0.05" not in f3  # the worst rule there loses 0.04


def test_table_from_merges_files_and_keeps_their_overrides(bench, tmp_path):
    cells = _cells(bench)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(bench.summarise(cells, _args(), 0.0)))
    # the second file's "good" cell at f = 2 replaces the first file's
    better = _cell("good", "ipm", "2,7", 42, [0.70, 0.76, 0.78])
    second.write_text(json.dumps(bench.summarise([cells[0], better], _args(), 0.0)))
    out = tmp_path / "merged.json"
    args = argparse.Namespace(**{**vars(_args()), "table_from": f"{first},{second}", "out": out})
    bench.table_from(args)
    merged = json.loads(out.read_text())
    assert merged["setup"]["extra"] == {"local-epochs": 3}
    assert merged["best_per_attack"]["ipm, f=2"]["worst_gap_final_or_min"] == pytest.approx(0.0)
    assert len(merged["cells"]) == len(cells)


def test_a_failed_seed_leaves_the_row_unranked_and_says_so(bench):
    cells = _cells(bench)
    # "bad" at f = 2 gets a second seed that failed; seed 43 has no clean FedAvg either
    failed = {**_cell("bad", "ipm", "2,7", 43, [0.5, 0.5]), "final_auc": None, "min_auc": None}
    cells.append({**failed, "status": "failed", "auc_by_round": []})
    cells.append(_cell("good", "ipm", "2,7", 43, [0.70, 0.76, 0.78]))
    result = bench.summarise(cells, _args(), 0.0)
    assert result["table"]["bad"]["ipm, f=2"]["failed_seeds"] == [43]
    assert result["table"]["good"]["ipm, f=2"]["failed_seeds"] == [43]  # no clean reference
    assert "ipm, f=2" not in result["best_per_attack"]  # neither row is complete
    assert result["best_per_attack"]["ipm, f=3"]["rule"] == "good"
    assert "no result for seed 43" in bench.markdown(result)


def test_table_from_takes_the_setup_from_the_files_and_flags_differences(bench, tmp_path):
    one, other = tmp_path / "a.json", tmp_path / "b.json"
    first = bench.summarise(_cells(bench), _args(), 0.0)
    second = bench.summarise(_cells(bench)[:1], _args(), 0.0)
    second["setup"]["rounds"] = 10
    one.write_text(json.dumps(first))
    other.write_text(json.dumps(second))
    out = tmp_path / "merged.json"
    # this command's own defaults (ray, 20 rounds) must not be written as the files' setup
    defaults = {**vars(_args()), "runtime": "ray", "rounds": 20, "extra": "{}"}
    bench.table_from(argparse.Namespace(**defaults, table_from=f"{one},{other}", out=out))
    setup = json.loads(out.read_text())["setup"]
    assert setup["runtime"] == "inprocess"
    assert setup["extra"] == {"local-epochs": 3}
    assert setup["differs_by_file"] == {"rounds": [3, 10]}
