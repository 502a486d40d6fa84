"""HE against an *active* server: what a bank refuses, and what it cannot prevent.

Reviewer findings D2, D5, D6, D9 (issue 13): a server that sends another bank's
ciphertext as "the global model" with a crafted public base reads that bank's update
from the clear metrics (D2); a range refusal that states the update's magnitude (D5);
a bank configured for HE loading the key file the run config names (D6); a weight
scale so small the sum sinks into the CKKS noise (D9).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import FakeGrid, _as_server, arrays_of, reply, sent
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from flower_ext.audit import AuditTrail
from flower_ext.crypto import load_secret_context, max_abs_sum, noise_floor, write_keys
from flower_ext.mods import HEMod
from flower_ext.mods.he import (
    CIPHERTEXTS,
    NUM_BANKS_KEY,
    WEIGHT_SCALE_KEY,
    WEIGHT_TOTAL,
    check_precision,
)
from flower_ext.strategies import EncryptedFedAvg

NODES = [51, 52, 53]
WEIGHTS = {51: 700, 52: 1300, 53: 400}
RUN = {"num-server-rounds": 3}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("he-keys"))


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((20, 10)), "b": np.zeros(20)}


def strategy_for(keys, **kwargs) -> EncryptedFedAvg:
    return EncryptedFedAvg(
        min_train_nodes=3,
        min_available_nodes=3,
        min_evaluate_nodes=3,
        context=keys.public,
        audit=AuditTrail(),
        **kwargs,
    )


def bank_ctx(node: int, node_config: dict | None = None, run_config: dict | None = None):
    """A bank's Context; Flower keeps the same one (its ``state``) for the whole run."""
    return Context(
        run_id=77,
        node_id=node,
        node_config=node_config or {},
        state=RecordDict(),
        run_config=RUN if run_config is None else run_config,
    )


class Bank:
    """A bank: HEMod around a handler that trains ``global + delta`` and evaluates."""

    def __init__(self, keys, node: int, delta: dict[str, np.ndarray] | None = None) -> None:
        self.node = node
        self.mod = HEMod(keys.secret)
        self.ctx = bank_ctx(node)
        self.delta = delta or {k: np.zeros_like(v) for k, v in model().items()}
        self.seen: list[tuple[str, dict[str, np.ndarray]]] = []

    def handler(self, msg: Message, context: Context) -> Message:
        arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        kind = msg.metadata.message_type
        self.seen.append((kind, arrays))
        if kind == MessageType.EVALUATE:  # a clear metric of the model: the oracle's output
            loss = float(np.abs(arrays["w"]).sum() + np.abs(arrays["b"]).sum())
            return reply(msg, None, {"num-examples": 10, "logloss": loss})
        local = {k: arrays[k] + self.delta[k] for k in arrays}
        return reply(msg, arrays_of(local), {"num-examples": WEIGHTS[self.node]})

    def __call__(self, msg: Message) -> Message:
        TaskIdentity.node_id = self.node
        try:
            return self.mod(msg, self.ctx, self.handler)
        finally:
            _as_server()


def forge(msg: Message, arrays: ArrayRecord | None = None, kind: str | None = None, **cfg):
    """The server rewrites a message: other arrays, config entries or message type."""
    content = RecordDict()
    for key, value in msg.content.items():
        if isinstance(value, ArrayRecord) and arrays is not None:
            value = arrays
        elif isinstance(value, ConfigRecord):
            value = ConfigRecord({**dict(value), **cfg})
        content[key] = value
    _as_server()
    return sent(
        [
            Message(
                content=content,
                message_type=kind or msg.metadata.message_type,
                dst_node_id=msg.metadata.dst_node_id,
            )
        ]
    )[0]


def by_node(messages) -> dict[int, Message]:
    return {int(m.metadata.dst_node_id): m for m in sent(messages)}


def first_train(strategy) -> dict[int, Message]:
    return by_node(strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES)))


def deltas() -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return {n: {k: rng.normal(0, 0.1, v.shape) for k, v in model().items()} for n in NODES}


def crafted_global(base: dict[str, np.ndarray], ciphertexts: Array, total: float) -> ArrayRecord:
    return ArrayRecord(
        {
            **{k: Array(np.ascontiguousarray(v)) for k, v in base.items()},
            CIPHERTEXTS: ciphertexts,
            WEIGHT_TOTAL: Array(np.array([float(total)])),
        }
    )


# ---------------------------------------------------------------------- honest runs still work
def test_honest_rounds_pass_the_pins_and_evaluate_the_model_trained_on(keys, as_server):
    strategy = strategy_for(keys)
    d = deltas()
    banks = {n: Bank(keys, n, d[n]) for n in NODES}
    arrays = arrays_of(model())
    for rnd in (1, 2, 3):
        train = by_node(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(NODES)))
        replies = [banks[n](m) for n, m in train.items()]
        assert not any(r.has_error() for r in replies), [
            r.error.reason for r in replies if r.has_error()
        ]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        evaluate = by_node(
            strategy.configure_evaluate(rnd, arrays, ConfigRecord(), FakeGrid(NODES))
        )
        for n, m in evaluate.items():
            out = banks[n](m)
            assert not out.has_error(), out.error.reason
            # a retried message (same round, same model) is answered too
            assert not banks[n](forge(m)).has_error()
    T, E = MessageType.TRAIN, MessageType.EVALUATE
    for bank in banks.values():
        assert [k for k, _ in bank.seen] == [T, E, E, T, E, E, T, E, E]
        for i in (1, 4):  # evaluate(r) decrypts the very model train(r + 1) trains on
            for key in ("w", "b"):
                np.testing.assert_array_equal(bank.seen[i][1][key], bank.seen[i + 2][1][key])


# ---------------------------------------------------------------------- D2: the decryption oracle
def _bank_b_ciphertext(keys, strategy, d):
    train = by_node(
        strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )
    out = Bank(keys, 52, d[52])(train[52])
    assert not out.has_error()
    return train, out.content["arrays"][CIPHERTEXTS]


def test_a_bank_that_trained_refuses_a_crafted_base_carrying_another_banks_update(keys, as_server):
    """D2: bank 51 trained in round 1 on the federation's base, so the server cannot then
    show it bank 52's ciphertext with a base that isolates one input (e8_he_eval_oracle)."""
    strategy = strategy_for(keys)
    d = deltas()
    train, ct52 = _bank_b_ciphertext(keys, strategy, d)
    bank_a = Bank(keys, 51, d[51])
    assert not bank_a(train[51]).has_error()  # round 1, honest base: pinned
    evaluate = by_node(
        strategy.configure_evaluate(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )[51]
    for j in range(3):
        base = model()
        base["b"][:] = 4.0  # a known bias
        base["w"][:, j] = 1e6  # one input isolated
        out = bank_a(forge(evaluate, crafted_global(base, ct52, WEIGHTS[52])))
        assert out.has_error() and "public base model different" in out.error.reason
        assert not out.has_content()  # no metric: nothing to solve for
    assert [k for k, _ in bank_a.seen] == [MessageType.TRAIN]  # the handler never saw it


def test_a_fresh_bank_answers_at_most_one_model_per_round(keys, as_server):
    """D2: the first message pins the base even for a bank that has not trained; a second
    query (another base, another total weight, an older or a future round) is refused, so
    the four queries of e8_he_eval_oracle come down to one."""
    strategy = strategy_for(keys)
    d = deltas()
    _, ct52 = _bank_b_ciphertext(keys, strategy, d)
    evaluate = by_node(
        strategy.configure_evaluate(2, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )[51]
    bank_a = Bank(keys, 51, d[51])
    base = model()
    first = bank_a(forge(evaluate, crafted_global(base, ct52, WEIGHTS[52])))
    assert not first.has_error()  # the first query cannot be told from an honest model
    other_base = model()
    other_base["b"][:] = 4.0
    refused = {
        "another base": bank_a(forge(evaluate, crafted_global(other_base, ct52, WEIGHTS[52]))),
        "another weight": bank_a(forge(evaluate, crafted_global(base, ct52, 2 * WEIGHTS[52]))),
        "an older round": bank_a(
            forge(evaluate, crafted_global(base, ct52, 3.0), **{"server-round": 1})
        ),
        "a round past the run": bank_a(
            forge(evaluate, crafted_global(base, ct52, 3.0), **{"server-round": 4})
        ),
        "no round": bank_a(
            forge(evaluate, crafted_global(base, ct52, 3.0), **{"server-round": "x"})
        ),
    }
    for why, out in refused.items():
        assert out.has_error() and not out.has_content(), why
    assert "public base model different" in refused["another base"].error.reason
    assert "second, different global model" in refused["another weight"].error.reason
    assert "older model" in refused["an older round"].error.reason
    assert "past the run's num-server-rounds" in refused["a round past the run"].error.reason
    assert len(bank_a.seen) == 1


def test_the_bank_app_no_longer_solves_for_another_banks_update(keys, tmp_path, as_server):
    """e8_he_eval_oracle against the bank app, with bank A's Context kept between messages
    as Flower keeps it: query 1 is answered, queries 2-4 (other bases) are refused, so the
    server has one equation for four unknowns instead of the whole update."""
    from test_bank_client import _config, _context, _csv

    from bank_risk.client_app import app as client_app
    from flower_ext.model import build_model

    run = {
        **_config(_csv(tmp_path)),
        "he": True,
        "he-secret-context": str(keys.secret),
        "local-only-baseline": False,
    }
    strategy = EncryptedFedAvg(min_train_nodes=1, min_available_nodes=1, context=keys.public)
    g0 = ArrayRecord(build_model(3, "logreg").state_dict())
    msg_b = next(
        iter(
            strategy.configure_train(1, g0, ConfigRecord({"num-server-rounds": 2}), FakeGrid([101]))
        )
    )
    TaskIdentity.node_id = 101
    try:
        reply_b = client_app(msg_b, _context(run, 1))
    finally:
        _as_server()
    assert not reply_b.has_error(), reply_b.error.reason
    ct_b = reply_b.content["arrays"][CIPHERTEXTS]
    weight = reply_b.content["he"]["weight-scale"] * reply_b.content["metrics"]["num-examples"]
    he_cfg = {k: v for k, v in dict(msg_b.content["config"]).items() if k.startswith("he-")}
    ctx_a = _context(run, 0)  # one Context for bank A, as Flower keeps it for the run
    base0 = {k: g0[k].numpy().copy() for k in g0}
    outcomes = []
    for j in (None, 0, 1, 2):
        base = {k: v.copy() for k, v in base0.items()}
        base["feature_std"][:] = 1e30
        if j is not None:
            base["feature_mean"][j], base["feature_std"][j] = -1e6, 1e6
        base["net.0.weight"][:] = 0.0
        base["net.0.bias"][:] = 4.0
        _as_server()
        query = Message(
            content=RecordDict(
                {
                    "arrays": crafted_global(base, ct_b, weight),
                    "config": ConfigRecord({**he_cfg, "server-round": 1}),
                }
            ),
            message_type=MessageType.EVALUATE,
            dst_node_id=100,
        )
        TaskIdentity.node_id = 100
        try:
            outcomes.append(client_app(query, ctx_a))
        finally:
            _as_server()
    assert not outcomes[0].has_error()
    for out in outcomes[1:]:
        assert out.has_error() and "public base model different" in out.error.reason


def test_a_repeated_train_round_cannot_binary_search_the_range(keys, as_server):
    """D5: each (he-num-banks, he-weight-scale) refusal tells the server one bit; the bank
    pins the round's values, so a server cannot resend round 1 with other ones."""
    strategy = strategy_for(keys)
    d = deltas()
    train = by_node(
        strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )
    bank = Bank(keys, 51, d[51])
    assert not bank(train[51]).has_error()
    again = bank(forge(train[51], **{NUM_BANKS_KEY: 10**6}))
    assert again.has_error() and "repeated train round 1" in again.error.reason
    again = bank(forge(train[51], **{WEIGHT_SCALE_KEY: 0.5}))
    assert again.has_error() and "repeated train round 1" in again.error.reason
    assert not bank(forge(train[51])).has_error()  # a plain retry is fine


# ---------------------------------------------------------------------- D5: what a refusal says
def test_range_refusal_states_no_update_magnitude(keys, as_server):
    """D5: with he-num-banks = 10^12 every bank refuses; the reason names only public
    numbers (k, the limit, the scale) and a power-of-two scale, never max|n x update|."""
    strategy = strategy_for(keys)
    d = deltas()
    train = by_node(
        strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )
    k = 10**12
    out = Bank(keys, 51, d[51])(forge(train[51], **{NUM_BANKS_KEY: k}))
    assert out.has_error()
    reason = out.error.reason
    peak = max(np.abs(WEIGHTS[51] * d[51][key]).max() for key in d[51])
    for secret in (peak, peak / WEIGHTS[51], k * peak):
        for fmt in (".3g", ".2g", "g", ".4g"):
            assert format(secret, fmt) not in reason
    limit = max_abs_sum(load_secret_context(keys.secret))
    numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", reason)]
    fit = min(numbers)
    assert abs(math.log2(fit) - round(math.log2(fit))) < 1e-4  # a power of two (as %g)
    assert set(numbers) <= {float(k), float(f"{limit:.3g}"), 1.0, fit}


# ---------------------------------------------------------------------- D6: whose key
def test_node_config_he_true_takes_its_key_from_node_config_only(keys, tmp_path, as_server):
    """D6: a bank configured for HE never loads the key file the run config (the server)
    names; it refuses and says to set its own node config."""
    server_made = write_keys(tmp_path / "server-made")
    strategy = strategy_for(keys)
    train = by_node(
        strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )

    def run(node_config: dict, run_config: dict) -> Message:
        TaskIdentity.node_id = 51
        try:
            ctx = bank_ctx(51, node_config, {**RUN, **run_config})
            return HEMod()(train[51], ctx, Bank(keys, 51).handler)
        finally:
            _as_server()

    out = run({"he": True}, {"he-secret-context": str(server_made.secret)})
    assert out.has_error()
    assert "node config says he = true but names no key" in out.error.reason
    assert "never loads the key file the run config" in out.error.reason
    out = run({"he": True}, {"he-secret-context": str(keys.secret)})  # even the right one
    assert out.has_error() and "names no key" in out.error.reason
    own = {"he": True, "he-secret-context": str(keys.secret)}
    assert not run(own, {"he-secret-context": str(server_made.secret)}).has_error()
    # a simulated bank (no node config he) still takes the run config's key
    assert not run({}, {"he-secret-context": str(keys.secret)}).has_error()


# ---------------------------------------------------------------------- D9: precision floor
def test_a_weight_scale_that_sinks_the_update_into_noise_is_refused(keys, as_server):
    """D9: at he-weight-scale 1e-9 a 700-row bank's update would decrypt with an error
    of ~0.3 (updates of 0.1); the bank refuses. 1e-3 is accepted and exact to 1e-6."""
    d = deltas()
    refused = strategy_for(keys, weight_scale=1e-9)
    train = first_train(refused)
    out = Bank(keys, 51, d[51])(train[51])
    assert out.has_error() and "weight scale 1e-09" in out.error.reason
    assert "too small" in out.error.reason

    strategy = strategy_for(keys, weight_scale=1e-3)
    train = by_node(
        strategy.configure_train(1, arrays_of(model()), ConfigRecord(), FakeGrid(NODES))
    )
    replies = [Bank(keys, n, d[n])(m) for n, m in train.items()]
    assert not any(r.has_error() for r in replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    from flower_ext.mods.he import decrypt_global

    got = decrypt_global(load_secret_context(keys.secret), arrays)
    total = sum(WEIGHTS.values())
    for key in ("w", "b"):
        want = sum(WEIGHTS[n] * d[n][key] for n in NODES) / total
        np.testing.assert_allclose(got[key].numpy(), want, rtol=0, atol=1e-6)


def test_precision_bound_as_documented(keys):
    ctx = load_secret_context(keys.secret)
    floor = noise_floor(ctx)
    assert 2e-7 < floor < 3e-7  # 2^10 / 2^32
    check_precision(ctx, 0.0, weight=floor / 1e-6, scale=1.0)  # s n >= e / 1e-6: any update
    check_precision(ctx, 256 * floor, weight=1e-3, scale=1e-3)  # peak >= 256 e
    with pytest.raises(RuntimeError, match="too small"):
        check_precision(ctx, 255 * floor, weight=1e-3, scale=1e-3)


def test_server_validates_the_weight_scale_range(keys):
    for bad in (1e-12, 1e7):
        with pytest.raises(ValueError, match="outside"):
            strategy_for(keys, weight_scale=bad)
    # a smaller plausible bank size raises the floor
    with pytest.raises(ValueError, match="outside"):
        strategy_for(keys, weight_scale=1e-6, max_plausible_examples=1e5)
    strategy_for(keys, weight_scale=1e-6)


# ---------------------------------------------------------------------- closing the oracle
def test_a_bank_can_send_no_metric_of_a_decrypted_model(keys, as_server):
    """D2, the rest: with node config he-clear-metrics = false a bank sends nothing computed
    from a decrypted model (no train-loss, no evaluation): the server, even one that shows
    it another bank's ciphertext, has no clear output to solve. The run config (the
    server's) cannot switch it back on."""
    strategy = strategy_for(keys)
    d = deltas()
    train = first_train(strategy)
    replies = []
    for node, msg in train.items():
        bank = Bank(keys, node, d[node])
        bank.ctx = bank_ctx(node, {"he-clear-metrics": False}, {**RUN, "he-clear-metrics": True})
        handler = bank.handler

        def with_loss(m: Message, c: Context, handler=handler) -> Message:
            out = handler(m, c)
            out.content["metrics"]["train-loss"] = 0.25
            out.content["metrics"]["dp-epsilon"] = 1.5
            return out

        bank.handler = with_loss
        replies.append(bank(msg))
    for out in replies:
        assert not out.has_error(), out.error.reason
        assert dict(out.content["metrics"]) == {
            "num-examples": WEIGHTS[int(out.metadata.src_node_id)],
            "dp-epsilon": 1.5,
        }
    arrays, _ = strategy.aggregate_train(1, replies)
    assert sorted(strategy.round_reports[1].accepted) == NODES
    evaluate = by_node(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid(NODES)))
    bank = Bank(keys, 51)
    bank.ctx = bank_ctx(51, {"he-clear-metrics": "false"})
    out = bank(evaluate[51])
    assert out.has_error() and "evaluation refused" in out.error.reason
    assert not bank.seen  # nothing was decrypted or evaluated
