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
    run_config = {"dp": "update", "dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0}
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
            "dp-noise-multiplier": 1.0,
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
        assert "dp-epsilon-max" in entry["train"]
        assert entry["evaluate"].get("auc") is not None  # banks decrypt and evaluate
    assert metrics["final"]["auc"] is not None
    assert verify_audit_trail(run_dir / "audit.jsonl") is None
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    aggregated = [e for e in events if e["event"] == "round_aggregated"]
    assert [e["rule"] for e in aggregated] == ["EncryptedFedAvg"] * 2
    assert all(e["ciphertext_bytes_in"] > 0 for e in aggregated)


# ---------------------------------------------------------------------- keys: who may make them
def _settings(extra: dict):
    from bank_risk.settings import BankAppSettings

    return BankAppSettings.from_config({"he": True, "num-banks": 3, **extra})


def test_deployment_server_without_public_context_refuses_to_generate_keys():
    from bank_risk.encryption import prepare_keys
    from bank_risk.settings import SettingsError
    from flower_ext.crypto import simulation_key_dir

    class DeploymentGrid:  # any Grid but Flower's in-memory simulation one
        def get_node_ids(self):
            return [1, 2, 3]

    run_id = 987654321
    with pytest.raises(SettingsError, match="flower-ext keygen") as err:
        prepare_keys(_settings({}), run_id, DeploymentGrid())
    assert "never generates keys" in str(err.value)
    with pytest.raises(SettingsError, match="he-public-context"):
        prepare_keys(_settings({}), run_id, None)
    assert not simulation_key_dir(run_id).exists()  # no secret key was written anywhere


def test_only_a_simulation_generates_keys_and_says_so(caplog):
    import logging
    import shutil

    from flwr.superlink.grid import InMemoryGrid

    from bank_risk.encryption import is_simulation, prepare_keys
    from flower_ext.crypto import PUBLIC_FILE, SECRET_FILE, simulation_key_dir

    grid = object.__new__(InMemoryGrid)  # the grid every Flower simulation path uses
    assert is_simulation(grid) and not is_simulation(None)
    run_id = 987654322
    folder = simulation_key_dir(run_id)
    try:
        with caplog.at_level(logging.WARNING):
            settings = prepare_keys(_settings({}), run_id, grid)
        assert settings.raw["he-public-context"] == str(folder / PUBLIC_FILE)
        assert (folder / SECRET_FILE).is_file()
        assert "SIMULATION" in caplog.text
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_weight_scale_from_the_run_config(tmp_path):
    from bank_risk.settings import SettingsError
    from bank_risk.strategy_factory import build_strategy

    keys = write_keys(tmp_path / "keys")
    base = {"he-public-context": str(keys.public)}
    strategy = build_strategy(_settings({**base, "he-weight-scale": 0.001}), AuditTrail(), 3)
    assert isinstance(strategy, EncryptedFedAvg) and strategy.weight_scale == 0.001
    with pytest.raises(SettingsError, match="he-weight-scale"):
        build_strategy(_settings({**base, "he-weight-scale": -1.0}), AuditTrail(), 3)


def test_each_bank_gets_an_owner_only_key_copy_even_over_an_old_one(tmp_path):
    import stat

    from flower_ext.crypto import CryptoError
    from flower_ext.deploy import install_bank_secret

    keys = write_keys(tmp_path / "keys")
    bank_dir = tmp_path / "bank-0"
    bank_dir.mkdir()
    old = bank_dir / "bank-secret.ckks"
    old.write_bytes(b"old")
    old.chmod(0o644)
    copy = install_bank_secret(keys.secret.parent, bank_dir)
    assert copy == old and copy.read_bytes() == keys.secret.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    with pytest.raises(CryptoError, match="no secret key"):
        install_bank_secret(keys.public, tmp_path / "bank-1")  # the server's file: refused
