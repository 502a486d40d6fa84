"""Regressions of the hostile review of secure aggregation (each attack, ported to a test).

Every test here failed on the code before the fixes: a server that forwards a bank no
shares, a threshold at or below half, a replayed round, malformed or hostile bank
replies, an audit that named a summed bank as dropped, a DP round abandoned after the
server could compute it, a bank without its own DP floor.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from flower_ext.audit import AuditTrail
from flower_ext.audit.signing import Signer
from flower_ext.secagg import BankSession, SecAggParams, ServerRound, dequantize_sum
from flower_ext.secagg.dp import DistributedDP
from flower_ext.secagg.mod import RECORD_KEY
from flower_ext.secagg.protocol import SecAggError, TooFewSurvivors
from flower_ext.strategies import SecureFedAvg
from tests.test_secagg_flower import (
    NODES,
    Federation,
    _check_close,
    _global,
    _plain_mean,
)
from tests.test_secagg_signed import _identities, _signed_federation

RUN, R = 7, 1


def _signed_banks(ids, t):
    params = SecAggParams(threshold=t)
    signers = {i: Signer.generate() for i in ids}
    trusted = frozenset(s.public_hex for s in signers.values())
    banks = {i: BankSession(i, R, params, run_id=RUN, trusted=trusted) for i in ids}
    roster = {i: b.advertise() for i, b in banks.items()}
    sigs = {i: (signers[i].public_hex, b.signed_advert(signers[i].sign)) for i, b in banks.items()}
    return banks, signers, roster, sigs


def _federation_with_node_config(node_config):
    """The test federation, every bank with ``node_config`` (run 1, fresh state)."""
    fed = Federation(NODES)
    for n in NODES:
        fed.contexts[n] = Context(
            run_id=1, node_id=n, node_config=dict(node_config), state=RecordDict(), run_config={}
        )
    return fed


def _events(audit, event):
    return [e for e in audit.events if e["event"] == event]


# ------------------------------------------------------------------ 1. U2 forwarded empty
def test_a_bank_given_no_shares_refuses_to_send_its_masked_input():
    """attack_empty_u2.py: the server forwards bank J no shares, so J would mask with its
    self mask only and the honest banks' shares of b_J would open it."""
    ids, t, target = list(range(1, 11)), 7, 4
    banks, _, roster, sigs = _signed_banks(ids, t)
    sent = {i: b.share_keys(roster, sigs) for i, b in banks.items()}
    assert banks[target].receive_shares({}) == []
    with pytest.raises(TooFewSurvivors, match="at least t-1=6"):
        banks[target].masked_input(np.zeros(10))
    # t - 2 other banks' shares are still too few; t - 1 are enough
    others = [i for i in ids if i != target]
    fresh = _signed_banks(ids, t)
    b = fresh[0][target]
    b.share_keys(fresh[2], fresh[3])
    shares = {s: fresh[0][s].share_keys(fresh[2], fresh[3])[target] for s in others[: t - 2]}
    b.receive_shares(shares)
    with pytest.raises(TooFewSurvivors):
        b.masked_input(np.zeros(10))
    assert sent  # (the honest banks did share)


def test_unmask_is_refused_unless_survivors_and_dropped_are_the_banks_own_u2():
    ids = [1, 2, 3, 4, 5]
    banks, signers, roster, sigs = _signed_banks(ids, 3)
    sent = {i: b.share_keys(roster, sigs) for i, b in banks.items()}
    for i in ids:  # bank 1 is not given bank 5's share: its U2 is {1, 2, 3, 4}
        banks[i].receive_shares({s: sent[s][i] for s in ids if s != i and (i, s) != (1, 5)})
    for i in ids:
        banks[i].masked_input(np.zeros(4))
    assert banks[1].u2 == (1, 2, 3, 4)
    survivors = [1, 2, 3, 4, 5]
    sig = {i: banks[i].sign_survivors(survivors[:4], signers[i].sign) for i in (2, 3, 4)}
    with pytest.raises(SecAggError, match="sent this bank no share"):
        banks[1].sign_survivors(survivors, signers[1].sign)
    # signatures bind U2: banks 2-4 (U2 = all five) signed other bytes than bank 1 checks
    sig[1] = banks[1].sign_survivors(survivors[:4], signers[1].sign)
    with pytest.raises(SecAggError, match="only 1 valid signatures"):
        banks[1].unmask_shares(survivors[:4], [], sig)
    plain = {i: BankSession(i, R, SecAggParams(threshold=3)) for i in ids}
    roster = {i: b.advertise() for i, b in plain.items()}
    sent = {i: b.share_keys(roster) for i, b in plain.items()}
    for i in ids:
        plain[i].receive_shares({s: sent[s][i] for s in ids if s != i})
        plain[i].masked_input(np.zeros(4))
    with pytest.raises(SecAggError, match="is not the set of banks whose shares"):
        plain[1].unmask_shares([1, 2, 3], [])  # 4 and 5 left out of both lists


def test_empty_u2_through_the_mod_gets_no_masked_vector_from_the_target(as_server, tmp_path):
    """attack_empty_u2_mod.py: signed keys, trusted lists, consistency check on."""
    target = 303
    fed = _signed_federation(tmp_path)
    captured: dict[str, dict[int, object]] = {}
    original = Federation.send_and_receive

    def evil(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            rec = m.content.config_records[RECORD_KEY]
            if rec["stage"] == "masked-input" and int(m.metadata.dst_node_id) == target:
                rec["src"], rec["ct"] = [], []
        replies = original(self, messages, timeout=timeout)
        for r in replies:
            if r.has_content() and RECORD_KEY in r.content.config_records:
                stage = r.content.config_records[RECORD_KEY]["stage"]
                captured.setdefault(stage, {})[int(r.metadata.src_node_id)] = r
        return replies

    fed.send_and_receive = evil.__get__(fed)
    audit = AuditTrail()
    new, metrics = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    assert target not in captured.get("masked-input", {})
    (drop,) = [e for e in _events(audit, "secagg_dropout") if e["node_id"] == target]
    assert "at least t-1=2 are needed" in drop["reason"]
    # the other three still aggregate, without bank 303
    assert new is not None and metrics["secagg-survivors"] == 3
    _check_close(new, _plain_mean(_global(), [101, 202, 404]), metrics["secagg-max-error"] + 1e-6)


# ------------------------------------------------------------------ 2. threshold <= n/2
def test_banks_refuse_a_threshold_at_or_below_half_of_their_roster():
    """attack_server_threshold.py: t=2 of n=6 lets two lists each get t signatures."""
    banks, _, roster, sigs = _signed_banks([1, 2, 3, 4, 5, 6], 2)
    with pytest.raises(SecAggError, match="not above half of the 6 banks"):
        banks[1].share_keys(roster, sigs)
    assert not banks[1].seed_shares
    banks, _, roster, sigs = _signed_banks([1, 2, 3, 4], 2)  # 2t = n: refused too
    with pytest.raises(SecAggError, match="not above half of the 4 banks trusted"):
        banks[1].share_keys(roster, sigs)
    unsigned = BankSession(1, R, SecAggParams(threshold=2), run_id=RUN)  # no trusted list
    others = {i: BankSession(i, R, SecAggParams(threshold=2), run_id=RUN) for i in (2, 3, 4)}
    plain = {1: unsigned.advertise(), **{i: b.advertise() for i, b in others.items()}}
    with pytest.raises(SecAggError, match="need 2t > n"):
        unsigned.share_keys(plain)
    banks, _, roster, sigs = _signed_banks([1, 2, 3, 4], 3)
    assert len(banks[1].share_keys(roster, sigs)) == 3


def test_a_bank_shares_its_secrets_with_one_roster_only():
    """Second review, attack_reshare_split_roster.py: a second share-keys request in one
    round gave fresh shares of the same two secrets to another (partial) roster."""
    banks, _, roster, sigs = _signed_banks([1, 2, 3, 4], 3)
    assert len(banks[1].share_keys(roster, sigs)) == 3
    first = dict(banks[1].seed_shares)
    with pytest.raises(SecAggError, match="second share-keys request"):
        banks[1].share_keys(roster, sigs)
    assert banks[1].seed_shares == first  # nothing new was dealt


def test_a_partial_roster_cannot_bring_t_below_half_of_the_trusted_banks():
    """Second review: with 7 trusted banks and t = 3, two signed partial rosters of 4 each
    meet 2t > |roster|, yet together they give t shares of both secrets of one bank."""
    banks, _, roster, sigs = _signed_banks(list(range(1, 8)), 3)
    part = [1, 2, 3, 4]
    with pytest.raises(SecAggError, match="not above half of the 7 banks trusted"):
        banks[1].share_keys({i: roster[i] for i in part}, {i: sigs[i] for i in part})
    assert not banks[1].seed_shares
    banks, _, roster, sigs = _signed_banks(list(range(1, 8)), 4)  # 2t > 7: fine
    part = [1, 2, 3, 4, 5, 6, 7]
    assert len(banks[1].share_keys(roster, sigs)) == 6


def test_a_train_message_renumbering_the_round_is_refused(as_server):
    """Second review, replay_guard_bypass_server_round.py: the app seeds training by the
    train config's server-round; the same training under two protocol rounds would let a
    server subtract two sums."""

    class Renumbering(Federation):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for msg in messages:
                if msg.content.config_records[RECORD_KEY]["stage"] == "train":
                    msg.content["config"]["server-round"] = 1
            return super().send_and_receive(messages, timeout=timeout)

    audit = AuditTrail()
    new, _ = Renumbering(NODES).run_round(SecureFedAvg(threshold=3, audit=audit), server_round=2)
    assert new is None
    reasons = [e["reason"] for e in _events(audit, "reply_rejected")]
    assert len(reasons) == 4
    assert all("server-round 1 is not the secure-aggregation round 2" in r for r in reasons)
    new, _ = Federation(NODES).run_round(SecureFedAvg(threshold=3), server_round=2)
    assert new is not None  # the same round numbered consistently is fine


def test_securefedavg_never_picks_a_threshold_at_or_below_half():
    with pytest.raises(ValueError, match="not above half of the 6 banks"):
        SecureFedAvg(threshold=3).params_for(6)
    assert SecureFedAvg(threshold=4).params_for(6).threshold == 4
    for n in range(2, 40):  # the rounding slack never gives 2t = n
        t = SecureFedAvg(threshold=0.5000000001).params_for(n).threshold
        assert 2 * t > n, n


def test_the_bank_floor_on_t_comes_from_its_node_config_not_the_message(as_server):
    fed = _federation_with_node_config({"secagg-min-threshold": 4})
    audit = AuditTrail()
    new, _ = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    assert new is None
    rejected = [e["reason"] for e in _events(audit, "reply_rejected")]
    assert len(rejected) == 4 and all("secagg-min-threshold=4" in r for r in rejected)


# ------------------------------------------------------------------ 3. replayed rounds
def test_a_bank_trains_each_round_once(as_server, tmp_path):
    """differencing_replayed_round.py: the same round with and without bank J."""
    fed = _signed_federation(tmp_path)
    fed.nodes = [n for n in NODES if n != 303]
    new_a, _ = fed.run_round(SecureFedAvg(threshold=3), server_round=1, arrays=_global())
    assert new_a is not None
    fed.nodes = list(NODES)
    audit = AuditTrail()
    new_b, _ = fed.run_round(
        SecureFedAvg(threshold=3, audit=audit), server_round=1, arrays=_global()
    )
    assert new_b is None  # 101, 202, 404 refuse round 1 again: 1 bank left, below t
    reasons = [e["reason"] for e in _events(audit, "reply_rejected")]
    assert len(reasons) == 3 and all("already trained" in r for r in reasons)
    # an earlier round is refused too; a later one is fine
    new_c, _ = fed.run_round(SecureFedAvg(threshold=3), server_round=2, arrays=_global())
    assert new_c is not None
    audit = AuditTrail()
    fed.run_round(SecureFedAvg(threshold=3, audit=audit), server_round=1, arrays=_global())
    assert len(_events(audit, "reply_rejected")) == 4


def test_the_rounds_trained_survive_a_restart_with_a_state_dir(as_server, tmp_path):
    def contexts():
        return {
            n: Context(
                run_id=9,
                node_id=n,
                node_config={"secagg-state-dir": str(tmp_path / "st")},
                state=RecordDict(),
                run_config={},
            )
            for n in NODES
        }

    fed = Federation(NODES)
    fed.contexts = contexts()
    assert fed.run_round(SecureFedAvg(threshold=3), server_round=3)[0] is not None
    fed.contexts = contexts()  # a SuperNode restart: context.state is empty again
    audit = AuditTrail()
    assert fed.run_round(SecureFedAvg(threshold=3, audit=audit), server_round=3)[0] is None
    assert all("already trained" in e["reason"] for e in _events(audit, "reply_rejected"))


# ------------------------------------------------------------------ 4/5/7. hostile replies
def _one_bad_bank(tamper_303, signed_tmp=None, **strategy_kwargs):
    audit = AuditTrail()

    def tamper(stage, node, out):
        return tamper_303(stage, out) if node == 303 else out

    fed = Federation(NODES, tamper=tamper)
    if signed_tmp is not None:  # signed keys; the server also knows the banks' keys
        keys, configs = _identities(signed_tmp, NODES)
        for n in NODES:
            fed.contexts[n] = Context(
                run_id=4242, node_id=n, node_config=configs[n], state=RecordDict(),
                run_config={},
            )  # fmt: skip
        strategy_kwargs["trusted_keys"] = [k.public_hex for k in keys.values()]
    fed.run = types.SimpleNamespace(run_id=4242)
    new, metrics = fed.run_round(SecureFedAvg(threshold=3, audit=audit, **strategy_kwargs))
    return new, metrics, audit


def _set(stage, key, value):
    def tamper(st, out):
        if st == stage:
            rec = out.content["secagg"]
            rec[key] = value(rec[key]) if callable(value) else value
        return out

    return tamper


HOSTILE = {
    "str seed-digest": (_set("share-keys", "seed-digest", "x"), "share-keys", "32 bytes"),
    "ct=-1": (_set("share-keys", "ct", lambda c: [-1] * len(c)), "share-keys", "ciphertext"),
    "ct=50 MB int": (
        _set("share-keys", "ct", lambda c: [50_000_000] * len(c)), "share-keys", "ciphertext",
    ),
    "ct too long": (
        _set("share-keys", "ct", lambda c: [bytes(5000)] * len(c)), "share-keys", "ciphertext",
    ),
    "garbage ct": (
        _set("share-keys", "ct", lambda c: [b"garbage"] * len(c)), "masked-input",
        "did not decrypt",
    ),
    "clipped='lots'": (_set("masked-input", "clipped", "lots"), "masked-input", "clipped"),
    "int unmask shares": (
        _set("unmask", "seed-shares", lambda c: [7] * len(c)), "unmask", "4 + 16k",
    ),
    "zeroed unmask shares": (
        _set("unmask", "seed-shares", lambda c: [bytes(len(s)) for s in c]), "unmask",
        "share of node",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_one_hostile_bank_is_dropped_with_a_reason_and_the_round_goes_on(as_server, name):
    """malicious_bank_dos.py, ct_int_crash.py: one bad reply no longer crashes or aborts."""
    tamper, stage, reason = HOSTILE[name]
    new, metrics, audit = _one_bad_bank(tamper)
    assert new is not None and not metrics.get("secagg-failed")
    (drop,) = _events(audit, "secagg_dropout")
    assert drop["node_id"] == 303 and drop["stage"] == stage and reason in drop["reason"]
    summed = [101, 202, 404] if stage != "unmask" else NODES  # a survivor's input stays
    _check_close(new, _plain_mean(_global(), summed), metrics["secagg-max-error"] + 1e-6)


def test_shares_bad_at_some_recipients_only_keep_the_largest_consistent_group(as_server):
    """303's share for 101 only is garbage: 101 did not mask with 303, the others did. The
    largest group with one view of U2 (202, 303, 404) is summed, 101 counts as dropped, and
    the sum is exact (no leftover pairwise mask)."""

    def tamper(stage, out):
        if stage == "share-keys":
            rec = out.content["secagg"]
            cts = list(rec["ct"])
            cts[[int(d) for d in rec["dst"]].index(101)] = b"garbage"
            rec["ct"] = cts
        return out

    new, metrics, audit = _one_bad_bank(tamper)
    assert new is not None and metrics["secagg-survivors"] == 3
    (drop,) = _events(audit, "secagg_dropout")
    assert drop["node_id"] == 101 and "view of U2 differs" in drop["reason"]
    _check_close(new, _plain_mean(_global(), [202, 303, 404]), metrics["secagg-max-error"] + 1e-6)


def test_a_bank_audited_as_dropped_is_not_in_the_sum(as_server):
    """audit_says_dropped_but_summed.py."""
    new, metrics, _ = _one_bad_bank(_set("masked-input", "clipped", "lots"))
    assert metrics["secagg-survivors"] == 3 and metrics["secagg-dropped"] == 1
    _check_close(new, _plain_mean(_global(), [101, 202, 404]), metrics["secagg-max-error"] + 1e-6)


def test_a_low_order_public_key_is_refused_at_the_server(as_server):
    for key in ("c-pk", "s-pk"):
        new, metrics, audit = _one_bad_bank(_set("train", key, bytes(32)))
        assert new is not None and metrics["secagg-survivors"] == 3
        (bad,) = _events(audit, "reply_rejected")
        assert bad["node_id"] == 303 and "X25519" in bad["reason"]


def test_a_wrong_seed_digest_is_blamed_on_its_sender_not_the_round(as_server):
    new, metrics, audit = _one_bad_bank(_set("share-keys", "seed-digest", bytes(32)))
    assert new is not None
    (bad,) = _events(audit, "secagg_bad_reply")
    assert bad["node_id"] == 303 and "seed-digest" in bad["reason"]
    _check_close(new, _plain_mean(_global(), NODES), metrics["secagg-max-error"] + 1e-6)


def test_a_bad_advert_signature_is_dropped_by_a_server_that_knows_the_keys(as_server, tmp_path):
    """bad_signature_dos.py: without the server check every honest bank refuses the roster."""
    new, metrics, audit = _one_bad_bank(_set("train", "sig", "00" * 64), signed_tmp=tmp_path)
    assert new is not None and metrics["secagg-survivors"] == 3
    (bad,) = _events(audit, "reply_rejected")
    assert bad["node_id"] == 303 and "does not verify" in bad["reason"]


# ------------------------------------------------------------------ 6. DP accounting
def test_a_dp_round_abandoned_after_t_unmask_answers_is_accounted(as_server):
    """abandoned_round_still_released.py: after t answers the server can compute the sum."""

    def zero_shares(stage, node, out):
        if stage == "unmask" and node in (303, 404):
            rec = out.content["secagg"]
            rec["seed-shares"] = [bytes(len(s)) for s in rec["seed-shares"]]
        return out

    audit = AuditTrail()
    dp = DistributedDP(noise_multiplier=2.0, clip_norm=0.05)
    strategy = SecureFedAvg(threshold=3, dp=dp, audit=audit)
    new, metrics = Federation(NODES, tamper=zero_shares).run_round(strategy)
    assert new is None and metrics["secagg-failed"] == 1
    assert strategy.dp_rounds == {1: (4, 3, 4)}
    assert metrics["secagg-dp-rounds"] == 1 and metrics["secagg-dp-epsilon"] > 0
    (dp_event,) = _events(audit, "secagg_dp")
    assert dp_event["released"] is False


# ------------------------------------------------------------------ 8. bank DP floor
def test_a_bank_that_requires_dp_refuses_a_train_message_without_it(as_server):
    """dp_no_bank_floor.py."""
    fed = _federation_with_node_config({"secagg-dp-required": True})
    audit = AuditTrail()
    new, _ = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    assert new is None
    rejected = [e["reason"] for e in _events(audit, "reply_rejected")]
    assert len(rejected) == 4 and all("secagg-dp-required" in r for r in rejected)
    dp = DistributedDP(noise_multiplier=2.0, clip_norm=0.05)
    for n in NODES:
        fed.contexts[n].state = RecordDict()
    assert fed.run_round(SecureFedAvg(threshold=3, dp=dp), server_round=2)[0] is not None


def test_a_train_message_without_dp_is_refused_when_the_run_config_asks_for_it(as_server):
    """dp_no_bank_floor.py as written: the bank's run config says secagg-dp = true."""
    fed = Federation(NODES)
    for n in NODES:
        fed.contexts[n] = Context(
            run_id=4242,
            node_id=n,
            node_config={},
            state=RecordDict(),
            run_config={"secagg": True, "secagg-dp": True, "secagg-dp-clip-norm": 0.01},
        )
    audit = AuditTrail()
    new, _ = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    assert new is None
    rejected = [e["reason"] for e in _events(audit, "reply_rejected")]
    assert len(rejected) == 4 and all("secagg-dp = true" in r for r in rejected)


# ------------------------------------------------------------------ 9. the error bound
def test_the_error_bound_is_k_quanta_over_the_survivors_weight_share():
    """error_bound_with_dropout.py: a dropped large bank divides by W < 1."""
    params = SecAggParams(threshold=3, quantization_bits=12)
    ids, cnt = [1, 2, 3, 4], {1: 1000, 2: 10, 3: 10, 4: 10}
    total_n, dim = sum(cnt.values()), 20000
    banks = {i: BankSession(i, 1, params) for i in ids}
    srv = ServerRound(1, params)
    for i, b in banks.items():
        srv.advertised(i, *b.advertise())
    routed = srv.route_shares(
        {i: (b.share_keys(dict(srv.roster)), b.self_seed_digest()) for i, b in banks.items()}
    )
    for i, c in routed.items():
        banks[i].receive_shares(c)
    u = {i: np.random.default_rng(i).uniform(-0.3, 0.3, dim) for i in ids}
    for i in [2, 3, 4]:
        srv.add_masked(i, banks[i].masked_input(u[i] * cnt[i] / total_n)[0])
    surv, dropped = srv.unmask_request()
    total = srv.unmask({i: banks[i].unmask_shares(surv, dropped) for i in surv})
    w = sum(cnt[i] for i in surv) / total_n
    from flower_ext.secagg import dequantize_sum

    mean = dequantize_sum(total, len(surv), params) / w
    plain = sum(cnt[i] * u[i] for i in surv) / sum(cnt[i] for i in surv)
    err = float(np.max(np.abs(mean - plain)))
    assert err > len(surv) * params.quantum  # the old README bound k*2c/2^bits fails
    assert err <= len(surv) * params.quantum / w  # k*q/W holds


@pytest.mark.parametrize(("n", "t", "bad"), [(12, 8, 1), (20, 14, 3), (10, 7, 10)])
def test_one_wrong_unmask_share_is_passed_over_and_named_at_any_id(n, t, bad):
    """Second review, one_bad_share_kills_round.py: with C(m-1, t-1) > 256 subsets, every
    subset tried held the lowest ids, so one wrong share there failed the round."""
    nodes, params, server_round = list(range(1, n + 1)), SecAggParams(threshold=t), 3
    banks = {i: BankSession(i, server_round, params) for i in nodes}
    srv = ServerRound(server_round, params)
    for i, b in banks.items():
        srv.advertised(i, *b.advertise())
    sent = {i: (b.share_keys(dict(srv.roster)), b.self_seed_digest()) for i, b in banks.items()}
    for i, cts in srv.route_shares(sent).items():
        banks[i].receive_shares(cts)
    rng = np.random.default_rng(0)
    inputs = {i: rng.normal(0, 0.1, 50) for i in nodes}
    for i, b in banks.items():
        srv.add_masked(i, b.masked_input(inputs[i])[0])
    survivors, dropped = srv.unmask_request()
    answers = {i: banks[i].unmask_shares(survivors, dropped) for i in survivors}
    victim = 7
    share = bytearray(answers[bad][0][victim])
    share[-1] ^= 1  # one flipped bit in one share
    answers[bad][0][victim] = bytes(share)
    total = srv.unmask(answers)  # the round goes on
    if bad in sorted(answers)[:t]:  # it spoilt the first t-subset: found and named
        assert srv.bad_shares == {bad: f"its share of node {victim}'s self seed is wrong"}
    else:  # outside a first subset that checks out: harmless, not looked for
        assert srv.bad_shares == {}
    got = dequantize_sum(total, len(survivors), params)  # the sum is right either way
    step = 2 * params.clipping_range / params.levels
    assert np.max(np.abs(got - sum(inputs[i] for i in survivors))) <= n * step


def test_the_if_missing_table_starts_from_the_banks_that_survived():
    """Second review, dp_if_missing_ignores_dropouts.py: with 3 of 10 banks dropped every
    round the table's row k = 1 said 2.606 where one colluding survivor gives 3.271."""
    dp = DistributedDP(noise_multiplier=6.68, clip_norm=0.5)
    strategy = SecureFedAvg(threshold=7, dp=dp)
    strategy.dp_rounds = {r: (10, 7, 7) for r in range(1, 6)}  # (sampled, t, survivors)
    figures = strategy.dp_figures()
    table = figures["secagg-dp-epsilon-if-missing"]
    assert len(table) == 1  # 7 survivors, t = 7: no survivor can be missing
    assert table[0] == pytest.approx(figures["secagg-dp-epsilon"])
    strategy.dp_rounds = {r: (10, 7, 9) for r in range(1, 6)}
    figures = strategy.dp_figures()
    table = figures["secagg-dp-epsilon-if-missing"]
    assert len(table) == 3 and table[0] == pytest.approx(figures["secagg-dp-epsilon"])
    assert table[1] == pytest.approx(dp.epsilon([(8, 7)] * 5))  # one of 9 survivors colludes
    assert table[2] == pytest.approx(figures["secagg-dp-epsilon-nominal"])
