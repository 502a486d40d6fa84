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


# ---------------------------------------------------------------------- reply binding
def _bank_replies(strategy, server_round, arrays, nodes, deltas, mod):
    from conftest import sent

    msgs = sent(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(nodes)))
    return msgs, [run_bank(mod, m, deltas, {}) for m in msgs]


def test_duplicates_replays_and_strangers_are_rejected_never_added_twice(keys, as_server):
    """Issue 11 item 4: under HE a duplicate would be added twice (weight 400 for 300)."""
    secret = load_secret_context(keys.secret)
    strategy = strategy_for(keys)
    g0 = model()
    deltas = {n: {k: np.full(v.shape, 0.01 * (n - 30)) for k, v in g0.items()} for n in NODES}
    mod = HEMod(keys.secret)
    _, round1 = _bank_replies(strategy, 1, arrays_of(g0), NODES, deltas, mod)
    enc1, _ = strategy.aggregate_train(1, round1)
    assert sorted(strategy.round_reports[1].accepted) == NODES

    _, round2 = _bank_replies(strategy, 2, enc1, NODES, deltas, mod)
    by1 = {int(r.metadata.src_node_id): r for r in round1}
    by2 = {int(r.metadata.src_node_id): r for r in round2}
    # node 33's first reply is malformed (a string weight), its second is well formed
    bad_first = _tampered(by2[33], he={"weight": "2500"})
    stranger_to = _as_stranger_message(arrays_of(g0))
    TaskIdentity.node_id = 77
    stranger = Message(by2[32].content, reply_to=stranger_to)
    _as_server()
    replies = [
        by2[31],
        by2[31],  # the same reply twice: one reply per node, so neither is added
        by1[32],  # last round's reply from node 32, replayed
        by2[32],
        bad_first,
        by2[33],  # the second reply of node 33, after its first was rejected
        stranger,  # node 77 was never sampled
    ]
    enc2, metrics = strategy.aggregate_train(2, replies)
    report = strategy.round_reports[2]
    assert report.accepted == [32]
    reasons = [
        (e["node_id"], e["reason"])
        for e in strategy.audit.events
        if e["event"] == "reply_rejected" and e["round"] == 2
    ]
    assert len(reasons) == 6
    text = " | ".join(r for _, r in reasons)
    assert text.count("one reply per node") == 4
    assert text.count("does not answer a message sent in this round") == 2
    assert {n for n, _ in reasons} == {31, 32, 33, 77}
    # the total weight is node 32's, once: nothing counted twice
    total = float(enc2["he.weight-total"].numpy()[0])
    assert total == WEIGHTS[32]
    assert metrics["clients-accepted"] == 1
    got = decrypt_global(secret, enc2)
    # banks train from the round-1 model; updates are measured from the base g0
    round1 = sum(WEIGHTS[n] * 0.01 * (n - 30) for n in NODES) / sum(WEIGHTS[n] for n in NODES)
    want = g0["dense.bias"] + round1 + 0.02
    np.testing.assert_allclose(got["dense.bias"].numpy(), want, atol=1e-6)


def _as_stranger_message(arrays: ArrayRecord) -> Message:
    from conftest import outgoing

    msg = outgoing(arrays, 77)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


# ---------------------------------------------------------------------- Flower's start()
class BankGrid:
    """Flower's Grid, in process: each message goes to a bank function, as a SuperLink would."""

    def __init__(self, banks):
        self.banks = banks

    def get_node_ids(self):
        return list(self.banks)

    def send_and_receive(self, messages, *, timeout=None):
        from conftest import sent

        return [self.banks[int(m.metadata.dst_node_id)](m) for m in sent(messages)]


def _deltas_for(server_round: int, node: int, shapes: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * server_round + node)
    return {k: rng.normal(scale=0.05, size=s) for k, s in shapes.items()}


def _plain_bank(node: int, shapes: dict, mod=None):
    def handler(msg: Message, context: Context) -> Message:
        arrays = next(iter(msg.content.array_records.values()))
        rnd = int(msg.content["config"]["server-round"])
        delta = _deltas_for(rnd, node, shapes)
        local = {k: a.numpy() + delta[k] for k, a in arrays.items()}
        return reply(msg, arrays_of(local), {"num-examples": WEIGHTS[node]})

    def bank(msg: Message) -> Message:
        TaskIdentity.node_id = node
        try:
            ctx = bank_context(node)
            return handler(msg, ctx) if mod is None else mod(msg, ctx, handler)
        finally:
            _as_server()

    return bank


def test_start_refuses_evaluate_fn_and_decrypt_result_equals_flower_fedavg(
    keys, tmp_path, as_server
):
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    from flower_ext.mods.he import decrypt_result
    from flower_ext.strategies.encrypted_fedavg import encrypted_model_hook

    g0 = model()
    shapes = {k: v.shape for k, v in g0.items()}
    strategy = EncryptedFedAvg(
        fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3, context=keys.public
    )
    he_grid = BankGrid({n: _plain_bank(n, shapes, HEMod(keys.secret)) for n in NODES})
    calls = []
    with pytest.raises(ValueError, match="cannot run a central evaluate_fn") as err:
        strategy.start(he_grid, arrays_of(g0), num_rounds=2, evaluate_fn=lambda r, a: None)
    assert "decrypt_result" in str(err.value)
    assert strategy.round_reports == {}  # refused before any round

    result = strategy.start(
        he_grid,
        arrays_of(g0),
        num_rounds=3,
        evaluate_fn=encrypted_model_hook(lambda r, a: calls.append((r, sorted(a.keys())))),
    )
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert CIPHERTEXTS in calls[-1][1]  # the hook saw what the server holds: ciphertexts

    flower = FlowerFedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    plain_grid = BankGrid({n: _plain_bank(n, shapes) for n in NODES})
    want = flower.start(plain_grid, arrays_of(g0), num_rounds=3).arrays

    # the saved encrypted result, read back at a bank
    saved = tmp_path / "final-encrypted.npz"
    np.savez(saved, **{k: a.numpy() for k, a in result.arrays.items()})
    for source in (result, result.arrays, saved):
        got = decrypt_result(source, keys.secret)
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want:
            assert got[key].numpy().dtype == want[key].numpy().dtype
            np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=0, atol=1e-6)
    from flower_ext.crypto import CryptoError

    with pytest.raises(CryptoError, match="not an encrypted global model"):
        decrypt_result(arrays_of(g0), keys.secret)
    with pytest.raises(CryptoError, match="no secret key"):
        decrypt_result(result, keys.public)


# ---------------------------------------------------------------------- sum range
def _range_round(keys, num_banks: int, rows: int, shift: float, weight_scale: float = 1.0):
    """``num_banks`` banks of ``rows`` rows all moving every weight by ``shift``."""
    strategy = EncryptedFedAvg(
        min_train_nodes=num_banks,
        min_available_nodes=num_banks,
        context=keys.public,
        audit=AuditTrail(),
        weight_scale=weight_scale,
    )
    g0 = {"w": np.zeros(4)}
    nodes = list(range(1000, 1000 + num_banks))
    from conftest import sent

    msgs = sent(strategy.configure_train(1, arrays_of(g0), ConfigRecord(), FakeGrid(nodes)))
    mod = HEMod(keys.secret)
    replies = []
    for msg in msgs:
        node = int(msg.metadata.dst_node_id)

        def handler(m: Message, c: Context) -> Message:
            local = {"w": m.content["arrays"]["w"].numpy() + shift}
            return reply(m, arrays_of(local), {"num-examples": rows})

        TaskIdentity.node_id = node
        try:
            replies.append(mod(msg, bank_context(node), handler))
        finally:
            _as_server()
    new_arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, replies, new_arrays


@pytest.mark.parametrize(
    ("num_banks", "rows", "shift", "fitting_scale"),
    [(20, 1_000_000, 0.5, 2.0**-6), (100, 30_000, 3.0, 2.0**-7)],
)
def test_sums_past_the_ckks_range_are_refused_not_wrong(
    keys, as_server, num_banks, rows, shift, fitting_scale
):
    """Issue 13 item 7: these sums used to decrypt to -0.34 and -2.59 with no error."""
    strategy, replies, new_arrays = _range_round(keys, num_banks, rows, shift)
    assert new_arrays is None  # refused by every bank: the round is skipped, model kept
    assert all(r.has_error() for r in replies)
    reason = replies[0].error.reason
    assert f"{num_banks} banks" in reason and "weight scale" in reason
    report = strategy.round_reports[1]
    assert report.skipped_reason and len(report.rejected) == num_banks
    # the scale the refusal names makes the same round correct
    suggested = float(reason.split("weight scale to ")[1].split(" ")[0])
    assert suggested >= fitting_scale
    strategy, replies, new_arrays = _range_round(keys, num_banks, rows, shift, suggested)
    assert not any(r.has_error() for r in replies)
    got = decrypt_global(load_secret_context(keys.secret), new_arrays)["w"].numpy()
    np.testing.assert_allclose(got, shift, rtol=0, atol=1e-6)


def test_sums_just_under_the_limit_decrypt_correctly_and_just_over_are_refused(keys, as_server):
    from flower_ext.crypto import max_abs_sum

    limit = max_abs_sum(load_public_context(keys.public))
    banks, rows = 4, 1000
    shift = 0.999 * limit / (banks * rows)
    _, replies, new_arrays = _range_round(keys, banks, rows, shift)
    assert not any(r.has_error() for r in replies)
    got = decrypt_global(load_secret_context(keys.secret), new_arrays)["w"].numpy()
    np.testing.assert_allclose(got, shift, rtol=1e-9)
    _, replies, new_arrays = _range_round(keys, banks, rows, 1.002 * limit / (banks * rows))
    assert new_arrays is None and all("CKKS modulus" in r.error.reason for r in replies)


def test_weight_scale_is_validated(keys):
    for bad in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="weight_scale"):
            strategy_for(keys, weight_scale=bad)


# ---------------------------------------------------------------------- threat model
def test_one_shared_key_any_bank_reads_another_banks_update(keys, as_server):
    """README, HE limits: all banks share one secret key, so the server plus any one bank
    reads every bank's individual update. Bank 31 decrypts bank 33's ciphertext exactly."""
    from flower_ext.crypto import decrypt_packed

    strategy = strategy_for(keys)
    g0 = model()
    deltas = {n: {k: RNG.normal(scale=0.05, size=v.shape) for k, v in g0.items()} for n in NODES}
    _, replies, _, _, _ = train_round(
        strategy, 1, arrays_of(g0), {"default": HEMod(keys.secret)}, deltas
    )
    intercepted = next(r for r in replies if int(r.metadata.src_node_id) == 33)
    packed = intercepted.content["arrays"][CIPHERTEXTS].numpy()  # what the server receives
    bank_31_key = load_secret_context(keys.secret)  # bank 31's own copy of the shared key
    dim = 40 * 60 + 40
    flat = decrypt_packed(bank_31_key, packed, dim) / WEIGHTS[33]
    want = np.concatenate([deltas[33]["dense.weight"].ravel(), deltas[33]["dense.bias"]])
    np.testing.assert_allclose(flat, want, rtol=0, atol=1e-8)


def test_no_integrity_the_server_can_send_any_model_as_the_global_one(keys, as_server):
    """README, HE limits: CKKS has no integrity. A server holding only the public key
    encrypts a model of its choice; the banks decrypt it as "the global model", no error."""
    from flower_ext.crypto import encrypt_packed

    public = load_public_context(keys.public)
    g0 = model()
    chosen = {k: np.full(v.shape, 7.0) for k, v in g0.items()}  # the server's pick
    forged_sum = np.concatenate([(chosen[k] - g0[k]).ravel() for k in g0]) * 10.0
    forged = ArrayRecord(
        {
            **dict(arrays_of(g0).items()),
            CIPHERTEXTS: Array(encrypt_packed(public, forged_sum)),
            "he.weight-total": Array(np.array([10.0])),
        }
    )
    seen: dict = {}
    strategy = strategy_for(keys)
    sent_msgs = list(strategy.configure_train(1, forged, ConfigRecord(), FakeGrid(NODES)))
    deltas = {n: {k: np.zeros(v.shape) for k, v in g0.items()} for n in NODES}
    out = run_bank(HEMod(keys.secret), sent_msgs[0], deltas, seen)
    assert not out.has_error()
    node = int(sent_msgs[0].metadata.dst_node_id)
    np.testing.assert_allclose(seen[node]["dense.bias"], 7.0, atol=1e-6)


# ---------------------------------------------------------------------- the bank's setting wins
def test_bank_configured_for_he_refuses_plaintext_and_the_server_audits_it(keys, as_server):
    """Issue 13 item 6: node config he = true wins over run config he = false."""
    from conftest import sent

    from flower_ext.strategies import FedAvg

    server = FedAvg(min_train_nodes=3, min_available_nodes=3, audit=AuditTrail())
    g0 = model()
    msgs = sent(server.configure_train(1, arrays_of(g0), ConfigRecord(), FakeGrid(NODES)))
    called = []

    def handler(m: Message, c: Context) -> Message:
        called.append(1)
        return reply(m, m.content["arrays"], {"num-examples": 10})

    replies = []
    for msg in msgs:
        node = int(msg.metadata.dst_node_id)
        node_config = {"he": node == 33, "he-secret-context": str(keys.secret)}
        ctx = Context(
            run_id=4242,
            node_id=node,
            node_config=node_config,
            state=RecordDict(),
            run_config={"he": False},
        )
        TaskIdentity.node_id = node
        try:
            replies.append(HEMod()(msg, ctx, handler))
        finally:
            _as_server()
    assert len(called) == 2  # bank 33 never trained on a plaintext federation
    refusal = next(r for r in replies if int(r.metadata.src_node_id) == 33)
    assert refusal.has_error() and "refusing to send a plaintext update" in refusal.error.reason
    assert not refusal.has_content()
    server.aggregate_train(1, replies)
    report = server.round_reports[1]
    assert sorted(report.accepted) == [31, 32]
    assert "refusing to send a plaintext update" in report.rejected[33]
    audited = [e for e in server.audit.events if e["event"] == "reply_rejected"]
    assert audited and audited[0]["node_id"] == 33


def test_node_config_he_true_never_uses_simulation_keys(keys, as_server, tmp_path):
    """A deployed bank (node config he = true) with no key path refuses, it does not pick up
    a key set it finds on the host."""
    strategy = strategy_for(keys)
    msg = next(
        iter(strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES)))
    )
    ctx = Context(
        run_id=4242, node_id=31, node_config={"he": True}, state=RecordDict(), run_config={}
    )
    TaskIdentity.node_id = 31
    try:
        out = HEMod()(msg, ctx, lambda m, c: m)
    finally:
        _as_server()
    assert out.has_error() and "names no key" in out.error.reason
