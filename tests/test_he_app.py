"""Encryption with DP and in the bank app: encrypt the DP update; a real simulated run, HE on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FakeGrid, _as_server, arrays_of, reply
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.audit import AuditTrail, verify_audit_trail
from flower_ext.crypto import load_secret_context, write_keys
from flower_ext.mods import HEMod, UpdateDPMod
from flower_ext.mods.he import decrypt_global
from flower_ext.strategies import EncryptedFedAvg

RNG = np.random.default_rng(11)


def test_he_encrypts_the_dp_update(tmp_path, as_server):
    """he_mod(update_dp_mod(handler)): the server's sum is the mean of the *noised* models."""
    keys = write_keys(tmp_path / "keys")
    strategy = EncryptedFedAvg(
        min_train_nodes=2, min_available_nodes=2, context=keys.public, audit=AuditTrail()
    )
    g0 = {"w": RNG.normal(size=(30, 20)), "b": RNG.normal(size=30)}
    nodes, weights = [51, 52], {51: 700, 52: 1300}
    sent = list(strategy.configure_train(1, arrays_of(g0), ConfigRecord(), FakeGrid(nodes)))
    he, dp = HEMod(keys.secret), UpdateDPMod(seed=0)
    run_config = {"dp": "update", "dp-noise-multiplier": 0.5, "dp-max-grad-norm": 1.0}
    noised: dict[int, dict[str, np.ndarray]] = {}
    replies = []
    for msg in sent:
        node = int(msg.metadata.dst_node_id)

        def handler(m: Message, c: Context, node=node) -> Message:
            arrays = m.content["arrays"]
            local = {k: a.numpy() + 0.3 for k, a in arrays.items()}
            return reply(m, arrays_of(local), {"num-examples": weights[node]})

        def capture(m: Message, c: Context, node=node, handler=handler) -> Message:
            out = dp(m, c, handler)
            noised[node] = {k: a.numpy() for k, a in out.content["arrays"].items()}
            return out

        ctx = Context(
            run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config=run_config
        )
        TaskIdentity.node_id = node
        try:
            replies.append(he(msg, ctx, capture))
        finally:
            _as_server()
    assert all(not r.has_error() for r in replies), [
        r.error.reason for r in replies if r.has_error()
    ]
    assert all("dp-epsilon" in r.content["metrics"] for r in replies)
    enc, _ = strategy.aggregate_train(1, replies)
    got = decrypt_global(load_secret_context(keys.secret), enc)
    total = sum(weights.values())
    for key in g0:
        want = sum(weights[n] * noised[n][key] for n in nodes) / total
        assert not np.allclose(want, g0[key] + 0.3)  # the DP mod did clip/noise
        np.testing.assert_allclose(got[key].numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bank_app_runs_end_to_end_with_he_and_update_dp(tmp_path):
    from bank_risk.simulate import run_bank_simulation

    run_dir = run_bank_simulation(
        {
            "he": True,
            "dp": "update",
            "dp-noise-multiplier": 0.3,
            "num-server-rounds": 2,
            "num-banks": 3,
            "rows-per-bank": 600,
            "local-only-baseline": False,
            "centralized-baseline": False,
            "output-dir": str(tmp_path),
            "run-name": "he",
        }
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished", metrics.get("error")
    for entry in metrics["rounds"]:
        assert entry["clients"]["accepted"] == 3 and not entry["clients"]["rejected"]
        assert "dp-epsilon" in entry["train"]
        assert entry["evaluate"].get("auc") is not None  # banks decrypt and evaluate
    assert metrics["final"]["auc"] is not None
    assert verify_audit_trail(run_dir / "audit.jsonl") is None
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    aggregated = [e for e in events if e["event"] == "round_aggregated"]
    assert [e["rule"] for e in aggregated] == ["EncryptedFedAvg"] * 2
    assert all(e["ciphertext_bytes_in"] > 0 for e in aggregated)
