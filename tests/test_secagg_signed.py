"""Signed keys: banks with Ed25519 identities refuse keys the server forged or replayed."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from flower_ext.audit import AuditTrail
from flower_ext.audit.signing import Signer, write_public_key
from flower_ext.secagg import BankSession, SecAggError, SecAggParams, ServerRound
from flower_ext.secagg.primitives import KeyPair
from flower_ext.secagg.protocol import advert_message, roster_signature_problems
from flower_ext.strategies import SecureFedAvg
from tests.test_secagg_flower import NODES, Federation, _check_close, _global, _plain_mean

PARAMS = SecAggParams(threshold=2)
RUN = 77


def _banks(ids, trusted, params=PARAMS):
    return {i: BankSession(i, 1, params, run_id=RUN, trusted=trusted) for i in ids}


def _signed_roster(banks, signers):
    roster = {i: b.advertise() for i, b in banks.items()}
    sigs = {i: (signers[i].public_hex, b.signed_advert(signers[i].sign)) for i, b in banks.items()}
    return roster, sigs


def test_a_fully_signed_roster_is_accepted_and_the_round_completes():
    ids = [1, 2, 3]
    signers = {i: Signer.generate() for i in ids}
    trusted = frozenset(s.public_hex for s in signers.values())
    banks = _banks(ids, trusted)
    roster, sigs = _signed_roster(banks, signers)
    assert roster_signature_problems(roster, sigs, trusted, RUN, 1) == []
    server = ServerRound(1, PARAMS)
    for i in ids:
        server.advertised(i, *roster[i])
    sent = {i: (b.share_keys(roster, sigs), b.self_seed_digest()) for i, b in banks.items()}
    for i, cts in server.route_shares(sent).items():
        banks[i].receive_shares(cts)
    vectors = {i: np.full(5, 0.01 * i) for i in ids}
    for i, b in banks.items():
        server.add_masked(i, b.masked_input(vectors[i])[0])
    survivors, dropped = server.unmask_request()
    # the consistency check: each survivor signs the list; t signatures go to every bank
    signed = {i: banks[i].sign_survivors(survivors, signers[i].sign) for i in survivors}
    answers = {i: banks[i].unmask_shares(survivors, dropped, signed) for i in survivors}
    total = server.unmask(answers)
    assert total.dtype == np.uint32


def _masked_round(ids, drop=(), params=None):
    """Banks that shared keys (signed) and masked; ``drop`` never sent a masked input."""
    params = params or SecAggParams(threshold=len(ids) // 2 + 1)
    signers = {i: Signer.generate() for i in ids}
    trusted = frozenset(s.public_hex for s in signers.values())
    banks = _banks(ids, trusted, params)
    roster, sigs = _signed_roster(banks, signers)
    server = ServerRound(1, params)
    for i in ids:
        server.advertised(i, *roster[i])
    sent = {i: (b.share_keys(roster, sigs), b.self_seed_digest()) for i, b in banks.items()}
    for i, cts in server.route_shares(sent).items():
        banks[i].receive_shares(cts)
    for i, b in banks.items():
        if i not in drop:
            server.add_masked(i, b.masked_input(np.full(4, 0.01))[0])
    return banks, signers, server


def test_a_bank_signs_one_survivor_list_per_round():
    banks, signers, _ = _masked_round([1, 2, 3, 4])
    banks[1].sign_survivors([1, 2, 3], signers[1].sign)
    assert banks[1].sign_survivors([3, 2, 1], signers[1].sign)  # the same list again: fine
    with pytest.raises(SecAggError, match="already signed the survivor list"):
        banks[1].sign_survivors([1, 2, 4], signers[1].sign)


def test_unmask_needs_t_signatures_of_the_list_the_bank_signed():
    """A server showing bank 1 the list [1, 2, 3] (4 dropped: 1 reveals 4's mask key) and
    bank 2 the list [1, 2, 3, 4] (2 reveals 4's self-mask seed) would unmask bank 4."""
    banks, signers, _ = _masked_round([1, 2, 3, 4, 5])
    assert banks[1].params.threshold == 3  # bank 1's own signature and two more are needed
    view_a, view_b = [1, 2, 3], [1, 2, 3, 4]
    sig_1 = banks[1].sign_survivors(view_a, signers[1].sign)
    sig_2 = banks[2].sign_survivors(view_b, signers[2].sign)
    # bank 1 gets its own signature and bank 2's, but bank 2 signed the other list
    with pytest.raises(SecAggError, match="only 1 valid signatures"):
        banks[1].unmask_shares(view_a, [4, 5], {1: sig_1, 2: sig_2})
    # a signature by a key outside the roster does not count either
    mallory = Signer.generate()
    forged = mallory.sign(advert_message(RUN, 1, 3, b"x", b"y"))
    with pytest.raises(SecAggError, match="only 1 valid signatures"):
        banks[1].unmask_shares(view_a, [4, 5], {1: sig_1, 3: forged})
    # the list in the request must be the one this bank signed
    with pytest.raises(SecAggError, match="not the one this bank signed"):
        banks[1].unmask_shares(view_b, [5], {1: sig_1, 2: sig_2})
    # two valid signatures of its list are still fewer than t = 3: with 2t > n the
    # server cannot gather t signatures for each of two different lists
    sig_3 = banks[3].sign_survivors(view_a, signers[3].sign)
    with pytest.raises(SecAggError, match="only 2 valid signatures"):
        banks[1].unmask_shares(view_a, [4, 5], {1: sig_1, 2: sig_2, 3: sig_3})


def test_unmask_answers_with_t_signatures_of_its_own_list():
    banks, signers, _ = _masked_round([1, 2, 3, 4, 5])
    view = [1, 2, 3]
    sigs = {i: banks[i].sign_survivors(view, signers[i].sign) for i in view}
    seeds, keys = banks[1].unmask_shares(view, [4, 5], sigs)
    assert sorted(seeds) == view and sorted(keys) == [4, 5]


@pytest.mark.parametrize(
    "attack",
    ["forged-keys", "unsigned", "unknown-signer", "same-signer-twice", "replayed-round"],
)
def test_a_bank_refuses_a_roster_the_server_tampered_with(attack):
    ids = [1, 2, 3]
    signers = {i: Signer.generate() for i in ids}
    trusted = frozenset(s.public_hex for s in signers.values())
    banks = _banks(ids, trusted)
    roster, sigs = _signed_roster(banks, signers)
    if attack == "forged-keys":  # the server's own keys in place of bank 3's
        roster[3] = (KeyPair().public, KeyPair().public)
        want = "node 3's signature does not verify"
    elif attack == "unsigned":
        del sigs[3]
        want = "node 3's public keys are not signed"
    elif attack == "unknown-signer":  # the server signs forged keys with a key of its own
        mallory = Signer.generate()
        roster[3] = (KeyPair().public, KeyPair().public)
        sigs[3] = (mallory.public_hex, mallory.sign(advert_message(RUN, 1, 3, *roster[3])))
        want = "signed by an unknown key"
    elif attack == "same-signer-twice":  # bank 2's genuine advert shown again as node 3
        sigs[3] = sigs[2]
        roster[3] = roster[2]
        want = "signed by the same key"
    else:  # bank 3's keys and signature from another round
        old = BankSession(3, 0, PARAMS, run_id=RUN)
        roster[3] = old.advertise()
        sigs[3] = (signers[3].public_hex, old.signed_advert(signers[3].sign))
        want = "node 3's signature does not verify"
    with pytest.raises(SecAggError, match="refusing to share keys") as err:
        banks[1].share_keys(roster, sigs)
    assert want in str(err.value)
    assert not banks[1].seed_shares  # nothing of bank 1's secrets was shared


# --------------------------------------------------------------------------- Flower round
def _identities(tmp_path, nodes):
    keys = {}
    for n in nodes:
        signer = Signer.generate()
        signer.write(tmp_path / f"bank-{n}.pem")
        write_public_key(tmp_path / f"bank-{n}.pub", signer.public_hex)
        keys[n] = signer
    trusted = ",".join(str(tmp_path / f"bank-{n}.pub") for n in nodes)
    return keys, {
        n: {"secagg-identity-key": str(tmp_path / f"bank-{n}.pem"), "secagg-trusted-keys": trusted}
        for n in nodes
    }


def _signed_federation(tmp_path, tamper=None):
    _, configs = _identities(tmp_path, NODES)
    fed = Federation(NODES, tamper=tamper)
    fed.contexts = {
        n: Context(
            run_id=4242, node_id=n, node_config=configs[n], state=RecordDict(), run_config={}
        )
        for n in NODES
    }
    return fed


def test_signed_banks_run_a_normal_round(as_server, tmp_path):
    audit = AuditTrail()
    fed = _signed_federation(tmp_path)
    new, metrics = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    _check_close(new, _plain_mean(_global(), NODES), metrics["secagg-max-error"] + 1e-6)
    assert fed.stages_seen.count("consistency") == 4  # signed keys: the consistency check
    check = [e for e in audit.events if e.get("stage") == "consistency"]
    assert check[0]["signed"] == NODES
    advertise = [e for e in audit.events if e.get("stage") == "advertise"]
    assert advertise[0]["signed"] == 4


def test_keys_forged_by_the_server_are_refused_and_the_round_fails(as_server, tmp_path):
    def forge(stage, node, out):  # the server swaps bank 202's keys for its own
        if stage == "train" and node == 202:
            out.content["secagg"]["s-pk"] = KeyPair().public
        return out

    audit = AuditTrail()
    fed = _signed_federation(tmp_path, tamper=forge)
    new, metrics = fed.run_round(SecureFedAvg(threshold=3, audit=audit))
    assert new is None and metrics["secagg-failed"] == 1
    reasons = [e["reason"] for e in audit.events if e["event"] == "secagg_dropout"]
    assert len(reasons) == 4  # every bank refused; none sent a share
    assert all("node 202's signature does not verify" in r for r in reasons)


def test_a_bad_identity_key_path_is_a_clear_error(as_server, tmp_path):
    fed = Federation(NODES)
    for n in NODES:
        fed.contexts[n] = Context(
            run_id=1,
            node_id=n,
            node_config={"secagg-identity-key": str(tmp_path / "missing.pem")},
            state=RecordDict(),
            run_config={},
        )
    audit = AuditTrail()
    strategy = SecureFedAvg(threshold=3, audit=audit)
    messages = list(strategy.configure_train(1, _global(), ConfigRecord(), fed))
    replies = fed.send_and_receive(messages)
    assert all(r.has_error() and "secagg-identity-key" in r.error.reason for r in replies)
