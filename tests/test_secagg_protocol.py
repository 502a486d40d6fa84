"""The secure-aggregation protocol as pure steps: exact sums, drop-outs, secrecy."""

from __future__ import annotations

import numpy as np
import pytest

from flower_ext.secagg import (
    BankSession,
    SecAggError,
    SecAggParams,
    ServerRound,
    TooFewSurvivors,
    dequantize_sum,
    quantize_vector,
)
from flower_ext.secagg.primitives import combine_shares, prg_mask

ROUND = 3


def run_round(vectors, params, drop_before_masking=(), drop_before_unmask=(), rnd=ROUND):
    """Run one round in memory; returns (server, float sum of survivors, survivors)."""
    nodes = list(vectors)
    banks = {n: BankSession(n, rnd, params) for n in nodes}
    server = ServerRound(rnd, params)
    for n, bank in banks.items():
        server.advertised(n, *bank.advertise())
    sent = {
        n: (bank.share_keys(dict(server.roster)), bank.self_seed_digest())
        for n, bank in banks.items()
    }
    routed = server.route_shares(sent)
    for n, cts in routed.items():
        banks[n].receive_shares(cts)
    for n, bank in banks.items():
        if n not in drop_before_masking:
            masked, _ = bank.masked_input(vectors[n])
            server.add_masked(n, masked)
    survivors, dropped = server.unmask_request()
    answers = {
        n: banks[n].unmask_shares(survivors, dropped)
        for n in survivors
        if n not in drop_before_unmask
    }
    total = server.unmask(answers)
    return server, dequantize_sum(total, len(survivors), params), survivors


def _vectors(nodes, dim=257, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    # Inside the clipping range [-1, 1]: clipping is tested on its own.
    return {n: np.clip(rng.normal(0, scale, dim), -0.99, 0.99) for n in nodes}


def test_unmasked_sum_equals_plaintext_weighted_sum():
    params = SecAggParams(threshold=3)
    nodes = [11, 7, 2**62 + 5, 40]
    raw = _vectors(nodes)
    counts = {11: 120, 7: 300, 2**62 + 5: 80, 40: 500}
    total_count = sum(counts.values())
    prescaled = {n: raw[n] * counts[n] / total_count for n in nodes}  # banks pre-scale
    _, got, survivors = run_round(prescaled, params)
    assert survivors == sorted(nodes)
    mean = got * total_count / total_count  # all survived: the weights sum to 1
    expected = sum(counts[n] * raw[n] for n in nodes) / total_count
    assert np.max(np.abs(mean - expected)) <= len(nodes) * params.quantum


def test_quantisation_clips_and_counts():
    params = SecAggParams(threshold=2, clipping_range=0.5, quantization_bits=10)
    q, clipped = quantize_vector(np.array([-2.0, -0.5, 0.0, 0.49, 3.0]), params)
    assert clipped == 2
    assert q.dtype == np.uint32 and q.min() >= 0 and q.max() <= params.levels
    back = dequantize_sum(q, 1, params)
    assert np.allclose(back, [-0.5, -0.5, 0.0, 0.49, 0.5], atol=params.quantum)
    with pytest.raises(SecAggError, match="NaN"):
        quantize_vector(np.array([np.nan]), params)


@pytest.mark.parametrize("dropped", [(5,), (2, 5)])
def test_dropouts_after_sharing_up_to_n_minus_t(dropped):
    params = SecAggParams(threshold=3)
    nodes = [1, 2, 3, 4, 5]
    vectors = _vectors(nodes, seed=1)
    _, got, survivors = run_round(vectors, params, drop_before_masking=dropped)
    assert survivors == [n for n in nodes if n not in dropped]
    expected = sum(vectors[n] for n in survivors)
    assert np.max(np.abs(got - expected)) <= len(survivors) * params.quantum


def test_dropout_during_unmask_is_tolerated_down_to_t():
    params = SecAggParams(threshold=3)
    nodes = [1, 2, 3, 4, 5]
    vectors = _vectors(nodes, seed=2)
    # 5 drops before masking, 4 sends its masked input but never answers the unmask.
    _, got, survivors = run_round(
        vectors, params, drop_before_masking=(5,), drop_before_unmask=(4,)
    )
    assert survivors == [1, 2, 3, 4]
    expected = sum(vectors[n] for n in survivors)
    assert np.max(np.abs(got - expected)) <= len(survivors) * params.quantum


def test_more_dropouts_than_n_minus_t_fail_clearly():
    params = SecAggParams(threshold=3)
    vectors = _vectors([1, 2, 3, 4, 5], seed=3)
    with pytest.raises(TooFewSurvivors, match="fewer than the threshold t=3"):
        run_round(vectors, params, drop_before_masking=(3, 4, 5))
    with pytest.raises(TooFewSurvivors, match="answered the unmask request"):
        run_round(vectors, params, drop_before_masking=(5,), drop_before_unmask=(3, 4))


def _chi2_top_and_low(values: np.ndarray) -> tuple[float, float]:
    expected = values.size / 256
    out = []
    for part in (values >> 24, values & 0xFF):
        counts = np.bincount(part.astype(np.int64), minlength=256)
        out.append(float(((counts - expected) ** 2 / expected).sum()))
    return out[0], out[1]


def test_masked_vector_stays_uniform_after_the_server_removes_its_self_mask():
    """What the server can test: one masked input *minus its self mask*, which the server
    rebuilds for every survivor from t shares, is still uniform (chi-square over 256 bins,
    99.9% critical value about 330 at 255 degrees of freedom): the pairwise masks hide
    the input. The same test flags a vector masked without pairwise masks (the attack of
    a server that forwards a bank no shares), so it can fail; and masked_input refuses
    to produce such a vector at all.
    """
    params = SecAggParams(threshold=2)
    banks = {n: BankSession(n, ROUND, params) for n in (1, 2, 3)}
    server = ServerRound(ROUND, params)
    for n, bank in banks.items():
        server.advertised(n, *bank.advertise())
    routed = server.route_shares(
        {n: (b.share_keys(dict(server.roster)), b.self_seed_digest()) for n, b in banks.items()}
    )
    for n, cts in routed.items():
        banks[n].receive_shares(cts)
    dim = 65536  # all-zero input: the most structured vector
    masked, _ = banks[1].masked_input(np.zeros(dim))
    self_mask = prg_mask(banks[1].self_seed, dim, params.modulus_bits)
    opened = (masked - self_mask) & np.uint32(params.modulus - 1)
    assert max(_chi2_top_and_low(masked)) < 330.0
    assert max(_chi2_top_and_low(opened)) < 330.0  # pairwise masks still hide it
    assert len(np.unique(opened)) > dim * 0.99
    # control: the same statistics on q(x) + PRG(b) minus PRG(b) (no pairwise mask)
    quantised, _ = quantize_vector(np.zeros(dim), params)
    no_pairwise = (quantised + self_mask - self_mask) & np.uint32(params.modulus - 1)
    assert min(_chi2_top_and_low(no_pairwise)) > 330.0
    assert len(np.unique(no_pairwise)) < dim * 0.01
    lone = BankSession(9, ROUND, SecAggParams(threshold=2))
    lone.share_keys({9: lone.advertise(), 8: BankSession(8, ROUND, params).advertise(),
                     7: BankSession(7, ROUND, params).advertise()})  # fmt: skip
    lone.receive_shares({})
    with pytest.raises(TooFewSurvivors):
        lone.masked_input(np.zeros(dim))


def test_prg_is_deterministic_and_seed_dependent():
    a, b = prg_mask(b"\1" * 32, 1000), prg_mask(b"\2" * 32, 1000)
    assert np.array_equal(a, prg_mask(b"\1" * 32, 1000))
    assert not np.array_equal(a, b)
    assert prg_mask(b"\1" * 32, 1000, modulus_bits=16).max() < 2**16


def _share_at(points: list[tuple[int, bytes]], secret_chunk: bytes, x: int) -> bytes:
    """The value at ``x`` of the degree-(t-1) polynomial over GF(2^128) through ``points``
    and ``(0, secret_chunk)`` (Lagrange; addition is XOR, so no signs)."""
    from Crypto.Protocol.SecretSharing import _Element

    nodes = [(_Element(0), _Element(secret_chunk))] + [
        (_Element(i), _Element(v)) for i, v in points
    ]
    total = _Element(0)
    for j, (xj, yj) in enumerate(nodes):
        term = yj
        for m, (xm, _) in enumerate(nodes):
            if m != j:
                term = term * (_Element(x) + xm) * (xj + xm).inverse()
        total = total + term
    return total.encode()


def test_coalition_below_threshold_cannot_rebuild_a_mask():
    """The server plus t-1 banks hold t-1 shares of a bank's seed and mask key: those
    shares are consistent with *every* candidate secret (for each candidate there is a
    complete sharing that agrees with them), so they carry no information about it."""
    from Crypto.Util.Padding import pad

    params = SecAggParams(threshold=3)
    nodes = [1, 2, 3, 4, 5]
    banks = {n: BankSession(n, ROUND, params) for n in nodes}
    server = ServerRound(ROUND, params)
    for n, bank in banks.items():
        server.advertised(n, *bank.advertise())
    routed = server.route_shares(
        {n: (b.share_keys(dict(server.roster)), b.self_seed_digest()) for n, b in banks.items()}
    )
    for n, cts in routed.items():
        banks[n].receive_shares(cts)
    victim, coalition = banks[1], [banks[2], banks[3]]  # t - 1 = 2 colluders
    seed_shares = [b.seed_shares[1] for b in coalition]
    key_shares = [b.key_shares[1] for b in coalition]
    import os

    for shares, secret in ((seed_shares, victim.self_seed), (key_shares, victim.s_keys.private)):
        for candidate in (secret, os.urandom(32), bytes(32)):
            padded = pad(candidate, 16)
            index = 4  # a share at a point the coalition does not hold
            fake = bytearray(index.to_bytes(4, "little"))
            for k, start in enumerate(range(4, len(shares[0]), 16)):
                points = [(int.from_bytes(s[:4], "little"), s[start : start + 16]) for s in shares]
                fake += _share_at(points, padded[16 * k : 16 * k + 16], index)
            # the coalition's shares plus one more point open to the candidate: t-1 shares
            # fit every secret equally well
            assert combine_shares([*shares, bytes(fake)]) == candidate
    # With t shares it works (the threshold is exactly t).
    assert combine_shares([*seed_shares, banks[4].seed_shares[1]]) == victim.self_seed
    # The server's own rebuild refuses outright below t.
    for n, bank in banks.items():
        server.add_masked(n, bank.masked_input(np.zeros(8))[0])
    survivors, dropped = server.unmask_request()
    answers = {n: banks[n].unmask_shares(survivors, dropped) for n in (2, 3)}
    with pytest.raises(TooFewSurvivors):
        server.unmask(answers)


def test_bank_never_reveals_both_secrets_of_one_bank():
    params = SecAggParams(threshold=2)
    banks = {n: BankSession(n, ROUND, params) for n in (1, 2, 3)}
    server = ServerRound(ROUND, params)
    for n, bank in banks.items():
        server.advertised(n, *bank.advertise())
    routed = server.route_shares(
        {n: (b.share_keys(dict(server.roster)), b.self_seed_digest()) for n, b in banks.items()}
    )
    for n, cts in routed.items():
        banks[n].receive_shares(cts)
    with pytest.raises(SecAggError, match="both surviving and dropped"):
        banks[1].unmask_shares([1, 2, 3], [3])
    banks[1].unmask_shares([1, 2, 3], [])
    with pytest.raises(SecAggError, match="already answered"):
        banks[1].unmask_shares([1, 2], [3])


def test_tampered_share_and_wrong_roster_are_refused():
    params = SecAggParams(threshold=2)
    banks = {n: BankSession(n, ROUND, params) for n in (1, 2, 3)}
    roster = {n: b.advertise() for n, b in banks.items()}
    cts = banks[1].share_keys(roster)
    banks[2].share_keys(roster)
    bad = bytearray(cts[2])
    bad[-5] ^= 1
    # a share that does not decrypt is reported (the server drops its sender), not used
    assert banks[2].receive_shares({1: bytes(bad)}) == [1]
    assert banks[2].neighbours == []
    with pytest.raises(SecAggError, match="own public keys"):
        banks[3].share_keys({1: roster[1], 2: roster[2]})


def test_params_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        SecAggParams(threshold=1)
    with pytest.raises(ValueError, match="quantization_bits"):
        SecAggParams(threshold=2, quantization_bits=32)
    params = SecAggParams(threshold=2, quantization_bits=30)
    assert params.max_banks == 3
    with pytest.raises(SecAggError, match="wrap"):
        params.check_banks(4)


def test_shamir_shares_are_interchangeable_with_flowers_and_need_t():
    import os

    from flwr.common.secure_aggregation.crypto import shamir as flower_shamir

    from flower_ext.secagg.primitives import create_shares

    secret = os.urandom(32)
    ours = create_shares(secret, 3, 5)
    assert flower_shamir.combine_shares(ours[1:4]) == secret
    theirs = flower_shamir.create_shares(secret, 3, 5)
    assert combine_shares([theirs[0], theirs[2], theirs[4]]) == secret
    assert [len(s) for s in ours] == [len(s) for s in theirs] == [4 + 48] * 5
    # two shares of a 3-of-5 sharing give some other value (or fail to unpad)
    for pair in (ours[:2], ours[2:4], [ours[0], ours[4]]):
        try:
            rebuilt = combine_shares(pair)
        except ValueError:
            rebuilt = b""
        assert rebuilt != secret
    with pytest.raises(ValueError, match="same length"):
        combine_shares([ours[0], ours[1][:-1]])
