"""EncryptedFedAvg + HEMod: the server adds what it cannot read, equals FedAvg, refuses clearly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import tenseal as ts
from conftest import FakeGrid, _as_server, arrays_of, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.audit import AuditTrail
from flower_ext.crypto import (
    PUBLIC_FILE,
    SECRET_FILE,
    PrivateContextError,
    load_public_context,
    load_secret_context,
    write_keys,
)
from flower_ext.mods import HEMod
from flower_ext.mods.he import CIPHERTEXTS, RECORD_KEY, decrypt_global
from flower_ext.strategies import EncryptedFedAvg

RNG = np.random.default_rng(3)
NODES = [31, 32, 33]
WEIGHTS = {31: 1200, 32: 300, 33: 2500}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("he-keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("other-keys"))


def model() -> dict[str, np.ndarray]:
    # float64 so the comparison measures CKKS, not float32 rounding; 2,440 values = 2 chunks
    return {"dense.weight": RNG.normal(size=(40, 60)), "dense.bias": RNG.normal(size=40)}


def strategy_for(keys, **kwargs) -> EncryptedFedAvg:
    return EncryptedFedAvg(
        min_train_nodes=3, min_available_nodes=3, context=keys.public, audit=AuditTrail(), **kwargs
    )


def bank_context(node_id: int, run_config: dict | None = None) -> Context:
    return Context(
        run_id=4242,
        node_id=node_id,
        node_config={},
        state=RecordDict(),
        run_config=run_config or {},
    )


def run_bank(mod, msg: Message, deltas: dict[int, dict[str, np.ndarray]], seen: dict) -> Message:
    """What a bank does: the mod around a handler training ``global + delta``."""
    node = int(msg.metadata.dst_node_id)

    def handler(plain: Message, context: Context) -> Message:
        arrays = plain.content["arrays"]
        seen[node] = {k: a.numpy() for k, a in arrays.items()}
        local = {k: seen[node][k] + deltas[node][k] for k in seen[node]}
        return reply(plain, arrays_of(local), {"num-examples": WEIGHTS[node], "train-loss": 0.5})

    TaskIdentity.node_id = node
    try:
        return mod(msg, bank_context(node), handler)
    finally:
        _as_server()


def plain_fedavg(global_model, deltas) -> dict[str, np.ndarray]:
    total = sum(WEIGHTS.values())
    return {
        k: global_model[k] + sum(WEIGHTS[n] * deltas[n][k] for n in NODES) / total
        for k in global_model
    }


def rel_error(got: dict, want: dict, ref: dict) -> float:
    diff = np.concatenate([(got[k] - want[k]).ravel() for k in want])
    step = np.concatenate([(want[k] - ref[k]).ravel() for k in want])
    return float(np.linalg.norm(diff) / np.linalg.norm(step))


def train_round(strategy, server_round, arrays, mods, deltas):
    sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(NODES)))
    seen: dict = {}
    replies = [
        run_bank(mods.get(int(m.metadata.dst_node_id), mods["default"]), m, deltas, seen)
        for m in sent
    ]
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return sent, replies, new_arrays, metrics, seen


def test_encrypted_fedavg_equals_plaintext_fedavg_over_two_rounds(keys, as_server):
    secret = load_secret_context(keys.secret)
    strategy = strategy_for(keys)
    g0 = model()
    mods = {"default": HEMod(keys.secret)}
    deltas1 = {n: {k: RNG.normal(scale=0.05, size=v.shape) for k, v in g0.items()} for n in NODES}
    _, replies, enc1, metrics, _ = train_round(strategy, 1, arrays_of(g0), mods, deltas1)
    assert all(not r.has_error() for r in replies)
    for r in replies:  # nothing readable leaves a bank
        assert set(r.content["arrays"].keys()) == {CIPHERTEXTS}
    assert metrics["clients-accepted"] == 3
    assert metrics["train-loss"] == pytest.approx(0.5)
    g1 = decrypt_global(secret, enc1)
    want1 = plain_fedavg(g0, deltas1)
    assert rel_error({k: a.numpy() for k, a in g1.items()}, want1, g0) < 1e-6

    # Round 2 starts from the encrypted global: every bank decrypts the same model.
    deltas2 = {n: {k: RNG.normal(scale=0.05, size=v.shape) for k, v in g0.items()} for n in NODES}
    _, _, enc2, _, seen2 = train_round(strategy, 2, enc1, mods, deltas2)
    for node in NODES:
        assert rel_error(seen2[node], want1, g0) < 1e-6
    want2 = plain_fedavg(want1, deltas2)
    got2 = {k: a.numpy() for k, a in decrypt_global(secret, enc2).items()}
    assert rel_error(got2, want2, want1) < 1e-6
    events = [e["event"] for e in strategy.audit.events]
    assert events.count("round_aggregated") == 2
    agg = [e for e in strategy.audit.events if e["event"] == "round_aggregated"][-1]
    assert agg["rule"] == "EncryptedFedAvg" and agg["ciphertext_bytes_in"] > 0
    assert strategy.round_reports[2].clients[31]["ciphertext_bytes"] > 0


def test_server_side_objects_hold_no_secret_key(keys):
    strategy = strategy_for(keys)
    contexts = [v for v in vars(strategy).values() if isinstance(v, ts.Context)]
    assert contexts and not any(c.is_private() or c.has_secret_key() for c in contexts)
    with pytest.raises(PrivateContextError, match="secret key"):
        strategy_for(replace(keys, public=keys.secret))
    with pytest.raises(PrivateContextError):
        EncryptedFedAvg(context=load_secret_context(keys.secret))
    assert not load_public_context(keys.public).is_private()


def test_refusals_at_construction_and_with_topk(keys, as_server):
    for kwargs in (
        {"server_learning_rate": 0.5},
        {"server_momentum": 0.9},
        {"max_weight": 100.0},
    ):
        with pytest.raises(ValueError, match="only adds ciphertexts"):
            strategy_for(keys, **kwargs)
    strategy = strategy_for(keys)
    with pytest.raises(ValueError, match="top-k"):
        list(
            strategy.configure_train(
                1, arrays_of(model()), ConfigRecord({"topk-ratio": 0.1}), FakeGrid(NODES)
            )
        )


def test_bank_with_wrong_key_is_rejected_cleanly_and_round_goes_on(keys, other_keys, as_server):
    strategy = strategy_for(keys)
    g0 = model()
    deltas = {n: {k: np.full(v.shape, 0.01) for k, v in g0.items()} for n in NODES}
    mods = {"default": HEMod(keys.secret), 33: HEMod(other_keys.secret)}
    _, replies, enc, metrics, _ = train_round(strategy, 1, arrays_of(g0), mods, deltas)
    wrong = next(r for r in replies if int(r.metadata.src_node_id) == 33)
    assert wrong.has_error() and "not the federation's" in wrong.error.reason
    report = strategy.round_reports[1]
    assert sorted(report.accepted) == [31, 32]
    assert "not the federation's" in report.rejected[33]
    assert enc is not None and metrics["clients-rejected"] == 1
    g1 = decrypt_global(load_secret_context(keys.secret), enc)
    np.testing.assert_allclose(g1["dense.bias"].numpy(), g0["dense.bias"] + 0.01, atol=1e-6)


def _tampered(msg: Message, *, he=None, arrays=None) -> Message:
    content = RecordDict()
    for key, value in msg.content.items():
        content[key] = value
    if he is not None:
        content[RECORD_KEY] = ConfigRecord({**dict(msg.content[RECORD_KEY]), **he})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(metadata=msg.metadata, content=content)


def test_server_rejects_other_context_other_slots_and_malformed_ciphertexts(
    keys, other_keys, as_server
):
    strategy = strategy_for(keys)
    g0 = model()
    nodes = [41, 42, 43, 44, 45]
    sent = {
        int(m.metadata.dst_node_id): m
        for m in strategy.configure_train(1, arrays_of(g0), ConfigRecord(), FakeGrid(nodes))
    }
    deltas = {n: {k: np.full(v.shape, 0.02) for k, v in g0.items()} for n in nodes}
    for n in nodes:
        WEIGHTS[n] = 1000
    good = {n: run_bank(HEMod(keys.secret), sent[n], deltas, {}) for n in nodes}
    # 44: one bank's payload cut short (a ciphertext missing); 45: coefficients corrupted
    # in transit (not below the modulus q): malformed ciphertexts, rejected with a reason.
    packed = good[44].content["arrays"][CIPHERTEXTS].numpy()
    corrupted = good[45].content["arrays"][CIPHERTEXTS].numpy().copy()
    corrupted[1, 0, 100] = 0xFF
    replies = [
        good[41],
        _tampered(good[42], he={"fingerprint": "f" * 64}),
        _tampered(good[43], he={"slots": 4096}),
        _tampered(good[44], arrays=ArrayRecord({CIPHERTEXTS: Array(packed[:1])})),
        _tampered(good[45], arrays=ArrayRecord({CIPHERTEXTS: Array(corrupted)})),
    ]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.round_reports[1]
    assert report.accepted == [41]
    assert "different context" in report.rejected[42]
    assert "4096 slots" in report.rejected[43]
    assert "expected uint8(2, 2, 4096, 7)" in report.rejected[44]
    assert "exceed the modulus" in report.rejected[45]
    assert new_arrays is not None and metrics["clients-rejected"] == 4
    reasons = [e["reason"] for e in strategy.audit.events if e["event"] == "reply_rejected"]
    assert len(reasons) == 4


def test_plaintext_reply_is_rejected_and_mod_refuses_plaintext_server(keys, as_server):
    strategy = strategy_for(keys)
    g0 = model()
    sent = list(strategy.configure_train(1, arrays_of(g0), ConfigRecord(), FakeGrid(NODES)))
    plain = [reply(m, arrays_of(g0), {"num-examples": 10}) for m in sent]
    new_arrays, _ = strategy.aggregate_train(1, plain)
    assert new_arrays is None
    assert all("not encrypted" in r for r in strategy.round_reports[1].rejected.values())

    # A bank configured for HE never sends plaintext to a server without EncryptedFedAvg.
    from conftest import outgoing

    msg = outgoing(arrays_of(g0), 31)
    TaskIdentity.node_id = 31
    called = []
    try:
        out = HEMod(keys.secret)(
            msg, bank_context(31, {"he": True}), lambda m, c: called.append(1) or m
        )
    finally:
        _as_server()
    assert out.has_error() and "refusing to send a plaintext update" in out.error.reason
    assert not called


def test_mod_refuses_topk_in_an_encrypted_federation(keys, as_server):
    strategy = strategy_for(keys)
    sent = list(strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES)))
    TaskIdentity.node_id = NODES[0]
    try:
        out = HEMod(keys.secret)(
            sent[0], bank_context(NODES[0], {"topk-ratio": 0.05}), lambda m, c: m
        )
    finally:
        _as_server()
    assert out.has_error() and "top-k" in out.error.reason


def test_app_factory_refuses_robust_rules_and_topk_with_he(keys):
    from bank_risk.settings import BankAppSettings, SettingsError
    from bank_risk.strategy_factory import build_strategy

    base = {"he": True, "he-public-context": str(keys.public), "num-banks": 3}
    strategy = build_strategy(BankAppSettings.from_config(base), AuditTrail(), num_nodes=3)
    assert isinstance(strategy, EncryptedFedAvg)
    with pytest.raises(SettingsError, match="robust rules"):
        build_strategy(
            BankAppSettings.from_config({**base, "aggregation": "krum"}), AuditTrail(), 5
        )
    with pytest.raises(SettingsError, match="topk-ratio"):
        build_strategy(BankAppSettings.from_config({**base, "topk-ratio": 0.01}), AuditTrail(), 3)
    with pytest.raises(SettingsError, match="secret key"):
        build_strategy(
            BankAppSettings.from_config({**base, "he-public-context": str(keys.secret)}),
            AuditTrail(),
            3,
        )
    with pytest.raises(SettingsError, match="only adds"):
        build_strategy(
            BankAppSettings.from_config({**base, "server-momentum": 0.9}), AuditTrail(), 3
        )


def test_public_and_secret_files_are_written_by_keygen(keys):
    assert keys.secret.name == SECRET_FILE and keys.public.name == PUBLIC_FILE
    assert load_secret_context(keys.secret).is_private()


def test_bank_that_missed_rounds_decrypts_the_current_model(keys, as_server):
    """No per-bank history: the encrypted global record alone gives the current model."""
    secret = load_secret_context(keys.secret)
    strategy = strategy_for(keys)
    g0 = model()
    deltas = {n: {k: np.full(v.shape, 0.1 * n) for k, v in g0.items()} for n in NODES}
    sent = list(strategy.configure_train(1, arrays_of(g0), ConfigRecord(), FakeGrid(NODES)))
    replies = [
        run_bank(HEMod(keys.secret), m, deltas, {})
        for m in sent
        if int(m.metadata.dst_node_id) != 33  # bank 33 is offline in round 1
    ]
    enc1, _ = strategy.aggregate_train(1, replies)
    assert strategy.round_reports[1].missing == [33]
    seen: dict = {}
    sent2 = list(strategy.configure_train(2, enc1, ConfigRecord(), FakeGrid(NODES)))
    for m in sent2:
        run_bank(HEMod(keys.secret), m, deltas, seen)  # fresh mods: no state kept
    want = decrypt_global(secret, enc1)
    for node in NODES:
        for key in g0:
            np.testing.assert_array_equal(seen[node][key], want[key].numpy())
    w31, w32 = WEIGHTS[31], WEIGHTS[32]
    expected = g0["dense.bias"] + (w31 * 3.1 + w32 * 3.2) / (w31 + w32)
    np.testing.assert_allclose(seen[33]["dense.bias"], expected, atol=1e-6)
