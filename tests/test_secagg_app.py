"""The bank app with ``secagg = true``: same model as plaintext FedAvg, DP figures, refusals.

Runs the real ServerApp and ClientApp (with every bank mod) on the in-process Grid,
which serialises each Message as the wire does (tests/test_inprocess_grid.py checks
it against Ray); small banks and two rounds keep it at a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BASE = {
    "num-server-rounds": 2,
    "num-banks": 4,
    "rows-per-bank": 300,
    "local-only-baseline": False,
    "centralized-baseline": False,
}


def _run(tmp_path: Path, name: str, **extra) -> tuple[Path, dict]:
    from bank_risk.simulate import run_bank_inprocess

    run_dir = run_bank_inprocess({**BASE, **extra, "output-dir": str(tmp_path), "run-name": name})
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines() if x]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg-app")
    return {
        "plain": _run(tmp, "plain"),
        "secagg": _run(tmp, "secagg", secagg=True),
        "dp": _run(
            tmp,
            "dp",
            **{
                "secagg": True,
                "secagg-dp": True,
                "secagg-dp-target-epsilon": 3.0,
                "secagg-dp-clip-norm": 0.5,
            },
        ),
        "root": tmp,
    }


def test_secagg_run_gives_the_plaintext_fedavg_model(runs):
    _, plain = runs["plain"]
    run_dir, secure = runs["secagg"]
    assert plain["status"] == secure["status"] == "finished"
    for got, want in zip(secure["rounds"], plain["rounds"], strict=True):
        assert got["evaluate"]["auc"] == pytest.approx(want["evaluate"]["auc"], abs=1e-3)
        train = got["train"]
        assert train["secagg-survivors"] == 4 and train["secagg-dropped"] == 0
        assert train["secagg-threshold"] == 3  # 2/3 of 4, rounded up
    assert secure["final"]["auc"] == pytest.approx(plain["final"]["auc"], abs=1e-3)
    events = _events(run_dir)
    stages = {e.get("stage") for e in events if e["event"] == "secagg_step"}
    assert stages == {"train", "advertise", "share-keys", "masked-input", "unmask"}
    saw = [e["server_saw"] for e in events if e["event"] == "round_aggregated"]
    assert saw and all("sum" in s for s in saw)
    summary = secure["secure_aggregation"]  # metrics.json, and run_end in the trail
    assert "the sum of the survivors' updates only" in summary["server_saw"]
    assert summary["rounds_aggregated"] == 2 and summary["dropouts"] == 0
    assert summary["distributed_dp"] is None
    assert "secure_aggregation" not in plain
    # the report says what the server learned; a plaintext run's report has no such section
    page = (run_dir / "report.html").read_text()
    assert "Secure aggregation: the server saw only the sum" in page
    assert "the sum of the survivors&#x27;" in page and "off: the sum itself is not noised" in page
    assert "Secure aggregation" not in (runs["plain"][0] / "report.html").read_text()


def test_secagg_run_verifies_against_the_banks_receipts(runs):
    from flower_ext.audit.verify import verify_run

    run_dir, _ = runs["secagg"]
    trail = (run_dir / "audit.jsonl").read_text()
    (receipts,) = [  # this run's banks (bank-side/run-<run id>/bank-<i>/receipts.jsonl)
        d for d in (runs["root"] / "bank-side").iterdir() if d.name.removeprefix("run-") in trail
    ]
    assert len(list(receipts.rglob("receipts.jsonl"))) == 4
    result = verify_run(run_dir, receipts=[receipts])
    # every protocol step (share-keys, masked-input, unmask) is in the trail, hash for hash
    assert result.ok, result.summary()
    assert any("receipts" in line for line in result.checked), result.summary()


def test_distributed_dp_run_reports_the_epsilon(runs):
    run_dir, dp = runs["dp"]
    assert dp["status"] == "finished"
    last = dp["rounds"][-1]["train"]
    # the noise is chosen so that 2 rounds with t = 3 honest banks spend 3.0
    assert last["secagg-dp-epsilon-nominal"] <= 3.0
    assert last["secagg-dp-epsilon-nominal"] == pytest.approx(3.0, abs=0.05)
    # all 4 banks survived: better than nominal; the table runs k = 0..n - t = 0..1
    table = list(last["secagg-dp-epsilon-if-missing"])
    assert len(table) == 2 and table[0] == pytest.approx(last["secagg-dp-epsilon"])
    assert table[0] < table[1] == pytest.approx(last["secagg-dp-epsilon-nominal"])
    assert "train-loss" not in last  # a statistic of the rows outside the guarantee
    final = dp["secure_aggregation"]["distributed_dp"]
    assert final["secagg-dp-epsilon-nominal"] == last["secagg-dp-epsilon-nominal"]
    page = (run_dir / "report.html").read_text()
    assert "epsilon if k = 0, 1, ... surviving banks collude" in page
    assert f"{final['secagg-dp-epsilon-nominal']:.4f}" in page
    events = [e for e in _events(run_dir) if e["event"] == "secagg_dp"]
    assert [e["round"] for e in events] == [1, 2]
    assert events[-1]["secagg_dp_epsilon_nominal"] == pytest.approx(
        last["secagg-dp-epsilon-nominal"]
    )


# --------------------------------------------------------------------------- refusals
def _settings(**overrides):
    from flwr.common.config import get_fused_config_from_dir

    from bank_risk.settings import BankAppSettings
    from bank_risk.simulate import APP_DIR

    cfg = get_fused_config_from_dir(APP_DIR, {**BASE, "secagg": True, **overrides})
    return BankAppSettings.from_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"aggregation": "krum"}, ["aggregation = 'krum'", "robust rule"]),
        ({"he": True}, ["he = true", "unnecessary"]),
        ({"topk-ratio": 0.1}, ["topk-ratio = 0.1"]),
        ({"scaffold": True}, ["scaffold = true"]),
        ({"fednova": True}, ["fednova = true"]),
        ({"max-weight": 500.0}, ["max-weight = 500.0"]),
        ({"secagg-dp": True, "dp": "update"}, ["dp = 'update'", "secagg-dp"]),
        (
            {"secagg-dp": True, "personalisation": "finetune"},
            ["personalisation", "secagg-dp"],
        ),
        ({"secagg": False, "secagg-dp": True}, ["secagg-dp = true needs secagg = true"]),
        ({"secagg-threshold": 0.4}, ["secagg-threshold", "0.4"]),
        ({"secagg-threshold": 9}, ["secagg-threshold = 9 exceeds the 4 banks"]),
        ({"secagg-threshold": 2}, ["secagg-threshold = 2 is not above half of the 4 banks"]),
        (
            {"secagg-dp": True, "secagg-clipping-range": 0.01},
            ["secagg-clipping-range=0.01 is too small"],
        ),
        ({"secagg-dp": True, "secagg-dp-target-epsilon": 500.0}, ["secagg-dp-target-epsilon"]),
        ({"secagg-dp": True, "secagg-dp-clip-norm": 0.0}, ["secagg-dp-clip-norm must be > 0"]),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_keys(overrides, words):
    from bank_risk.settings import SettingsError
    from bank_risk.strategy_factory import check_run_config

    with pytest.raises(SettingsError) as err:
        check_run_config(_settings(**overrides))
    for word in words:
        assert word in str(err.value)


def test_combinations_that_can_work_are_built():
    from bank_risk.strategy_factory import build_strategy, check_run_config
    from flower_ext.audit import AuditTrail
    from flower_ext.strategies import SecureFedAvg

    for overrides in (
        {},
        {"dp": "dp-sgd"},  # sample-level DP inside each bank, then masking
        {"dp": "update"},  # local DP, then masking
        {"secagg-dp": True, "secagg-threshold": 3},
        {"server-momentum": 0.9, "proximal-mu": 0.01},
    ):
        settings = _settings(**overrides)
        check_run_config(settings)
        strategy = build_strategy(settings, AuditTrail(), num_nodes=4)
        assert isinstance(strategy, SecureFedAvg)
    assert strategy.server_momentum == 0.9


def test_update_level_dp_inside_secagg_reports_each_banks_epsilon(tmp_path):
    from flower_ext.audit.verify import verify_run

    run_dir, metrics = _run(
        tmp_path, "update-dp", secagg=True, dp="update", **{"dp-target-epsilon": 5.0}
    )
    assert metrics["status"] == "finished"
    spent = [row.get("epsilon") for row in metrics["per_bank"].values()]
    assert len(spent) == 4 and all(e == pytest.approx(5.0, abs=0.01) for e in spent)
    (receipts,) = (tmp_path / "bank-side").iterdir()
    result = verify_run(run_dir, receipts=[receipts])  # the banks' epsilons match the trail
    assert result.ok, result.summary()


def test_the_app_with_secagg_runs_on_flowers_ray_simulation(runs, tmp_path):
    """The same run on Flower's Ray backend: the protocol's extra exchanges go through the
    real simulation runtime and the app's grid wrappers, to the in-process figures."""
    from bank_risk.simulate import run_bank_simulation

    run_dir = run_bank_simulation(
        {**BASE, "secagg": True, "output-dir": str(tmp_path), "run-name": "ray"}
    )
    ray = json.loads((run_dir / "metrics.json").read_text())
    _, local = runs["secagg"]
    assert ray["status"] == "finished"
    for got, want in zip(ray["rounds"], local["rounds"], strict=True):
        assert got["train"]["secagg-survivors"] == 4
        assert got["evaluate"]["auc"] == pytest.approx(want["evaluate"]["auc"], abs=3e-3)
