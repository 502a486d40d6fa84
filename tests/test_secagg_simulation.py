"""SecureFedAvg + secagg_mod in Flower's Ray simulation: 4 banks, 2 rounds, one drop-out.

Each bank's update is a fixed function of its partition and the round, so the
expected model is known in closed form: plaintext FedAvg of the surviving banks'
updates, weighted by ``num-examples``. In round 2 bank 3 crashes while masking
(after the keys were shared): the round must complete without it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flower_ext.audit import AuditTrail
from flower_ext.mods import secagg_mod
from flower_ext.strategies import SecureFedAvg

NUM_BANKS = 4
ROUNDS = 2
DROPPING_BANK, DROP_ROUND = 3, 2
SHAPES = {"w": (5, 3), "b": (3,)}


def _count(pid: int) -> int:
    return 100 * (pid + 1)


def _delta(pid: int, server_round: int, key: str) -> np.ndarray:
    rng = np.random.default_rng(1000 * pid + 10 * server_round + len(key))
    return rng.normal(0, 0.05, SHAPES[key]).astype(np.float32)


def _initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, 0.1, dtype=np.float32)) for k, s in SHAPES.items()})


def crash_mod(msg: Message, context: Context, call_next):
    """Bank 3 dies at the masking step of round 2 (a test-only fault)."""
    record = msg.content.config_records.get("secagg") if msg.has_content() else None
    pid = int(context.node_config["partition-id"])
    if (
        record is not None
        and record.get("stage") == "masked-input"
        and record.get("round") == DROP_ROUND
        and pid == DROPPING_BANK
    ):
        raise RuntimeError("bank 3 lost power")
    return call_next(msg, context)


client_app = ClientApp()


@client_app.train(mods=[crash_mod, secagg_mod])
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    arrays = msg.content["arrays"]
    local = {k: a.numpy() + _delta(pid, server_round, k) for k, a in arrays.items()}
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                "metrics": MetricRecord({"num-examples": _count(pid), "loss": float(pid)}),
            }
        ),
        reply_to=msg,
    )


RESULTS: dict = {}


def _server_app() -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        audit = AuditTrail()
        strategy = SecureFedAvg(
            fraction_evaluate=0.0,
            min_train_nodes=NUM_BANKS,
            min_available_nodes=NUM_BANKS,
            threshold=3,
            step_timeout=120,
            audit=audit,
        )
        try:
            RESULTS["result"] = strategy.start(grid, _initial(), num_rounds=ROUNDS)
        finally:
            RESULTS["strategy"] = strategy
            RESULTS["audit"] = audit

    return app


def _expected() -> dict[str, np.ndarray]:
    model = {k: a.numpy().astype(np.float64) for k, a in _initial().items()}
    for rnd in range(1, ROUNDS + 1):
        banks = [p for p in range(NUM_BANKS) if not (rnd == DROP_ROUND and p == DROPPING_BANK)]
        total = sum(_count(p) for p in banks)
        for k in model:
            model[k] += sum(_count(p) * _delta(p, rnd, k) for p in banks) / total
    return model


@pytest.mark.slow
def test_securefedavg_in_ray_simulation_matches_fedavg_and_survives_a_dropout():
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    RESULTS.clear()
    run_simulation(
        server_app=_server_app(),
        client_app=client_app,
        num_supernodes=NUM_BANKS,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    strategy, audit = RESULTS["strategy"], RESULTS["audit"]
    final = RESULTS["result"].arrays
    reports = strategy.round_reports
    assert sorted(reports) == [1, 2] and all(not r.skipped_reason for r in reports.values())
    tol = 2 * 4 * strategy.params_for(NUM_BANKS).quantum + 1e-6
    for key, value in _expected().items():
        got = final[key].numpy()
        assert got.dtype == np.float32 and got.shape == value.shape
        assert np.max(np.abs(got - value)) <= tol, key
    recovered = [e for e in audit.events if e["event"] == "secagg_recovered"]
    assert [e["round"] for e in recovered] == [DROP_ROUND]
    assert len(recovered[0]["dropped"]) == 1
    metrics = RESULTS["result"].train_metrics_clientapp
    assert metrics[1]["secagg-survivors"] == 4 and metrics[2]["secagg-survivors"] == 3
