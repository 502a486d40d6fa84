"""Secure aggregation with drop-out recovery, as pure typed steps (no Flower plumbing).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, in the semi-honest setting, with the per-round fresh keys and
Shamir-shared mask keys that Bell et al. (SecAgg+, CCS 2020) keep. One round:

0. **advertise** (bank): two fresh X25519 key pairs, ``c`` (encrypts shares) and
   ``s`` (agrees pairwise masks). The server collects the roster ``U1``.
1. **share keys** (bank): a fresh self-mask seed ``b_i``; Shamir ``t``-of-``|U1|``
   shares of ``b_i`` and of ``s_sk_i``; share ``j`` is encrypted under
   ``HKDF(X25519(c_sk_i, c_pk_j))`` and sent through the server. Senders: ``U2``.
2. **masked input** (bank): ``y_i = q(x_i) + PRG(b_i) + sum_{j in U2, j > i} PRG(s_ij)
   - sum_{j in U2, j < i} PRG(s_ij)  (mod 2^m)`` where ``s_ij = HKDF(X25519(s_sk_i,
   s_pk_j))``. Senders: ``U3``. One ``y_i`` alone is uniform (test_secagg).
3. **unmask** (bank): for every survivor ``j in U3`` its share of ``b_j``; for every
   dropped ``j in U2 \\ U3`` its share of ``s_sk_j``; never both for one ``j``
   (:class:`BankSession` refuses). With ``t`` answers the server removes every
   self mask and every pairwise mask a dropped bank left, and gets exactly
   ``sum_{i in U3} q(x_i) mod 2^m``.

Differences from the papers, on purpose: the mask graph is complete (SecAgg; the
SecAgg+ sparse ``k``-regular graph only pays off at hundreds of clients), and there
is no consistency-check round with signatures (that defends against a server that
sends different ``U3`` to different banks). Signed keys are optional: a bank with a
long-term Ed25519 identity signs its two public keys with the run, round and its
node id (:func:`advert_message`), and a bank given the set of trusted identities
refuses a roster in which any entry is unsigned, signed by an unknown key, or
signed twice by one key (:func:`roster_signature_problems`): a server that forges
keys for other banks then gets nothing. Without them the server is trusted not to
forge keys (semi-honest).

With signed keys the round also has Bonawitz et al.'s consistency check: before
the unmask, each survivor signs the survivor list ``U3`` it is shown (once per
round: :meth:`BankSession.sign_survivors`), and a bank answers the unmask request
only for the list it signed itself and only with ``t`` valid signatures of that
same list from banks of the roster (:func:`consistency_problems`). A server that
shows different lists to different banks (to collect one bank's self-mask seed
from some and its mask key from others) needs ``t`` signatures on each list,
which honest banks do not give when ``2t > n + colluding banks``.

Quantisation (Flower's, stochastic rounding): each coordinate is clipped to
``[-c, c]`` and mapped to an integer in ``[0, R]``, ``R = 2**quantization_bits``.
A sum of ``k`` banks lies in ``[0, k R]`` and must stay below ``M = 2**modulus_bits``:
at most ``(M - 1) // R`` banks (1023 with the defaults 22 and 32 bits). Per bank
and coordinate the rounding error is below one quantum ``2c / R``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from .primitives import (
    KeyPair,
    agree,
    combine_shares,
    create_shares,
    decrypt_share,
    dequantize,
    encrypt_share,
    new_seed,
    prg_mask,
    quantize,
)

SHARE_PURPOSE = "share-encryption"
MASK_PURPOSE = "pair-mask"
_ADVERT_CONTEXT = b"flower-ext/secagg/v1/advert"
_SURVIVORS_CONTEXT = b"flower-ext/secagg/v1/survivors"


def survivors_message(run_id: int, server_round: int, survivors: list[int]) -> bytes:
    """The bytes a bank signs in the consistency check: the round's survivor list ``U3``."""
    nodes = ",".join(str(n) for n in sorted(int(n) for n in survivors))
    return b"|".join(
        [_SURVIVORS_CONTEXT, str(int(run_id)).encode(), str(int(server_round)).encode(),
         nodes.encode()]
    )  # fmt: skip


def consistency_problems(
    survivors: list[int],
    signatures: dict[int, str],
    signers: dict[int, str],
    threshold: int,
    run_id: int,
    server_round: int,
) -> list[str]:
    """Why the survivor list is not vouched for (empty: ``t`` survivors signed it).

    ``signatures``: node -> hex signature of :func:`survivors_message`; ``signers``:
    node -> the identity key that signed its keys in this round's roster. Only
    survivors' signatures count, each with its own roster key.
    """
    from flower_ext.audit.signing import verify_signature

    message = survivors_message(run_id, server_round, survivors)
    valid = [
        j
        for j in sorted(set(int(n) for n in survivors))
        if signers.get(j)
        and signatures.get(j)
        and verify_signature(signers[j], message, signatures[j])
    ]
    if len(valid) >= threshold:
        return []
    return [
        f"only {len(valid)} valid signatures of the survivor list {sorted(survivors)} "
        f"(t={threshold} needed): the server may be showing different lists to different banks"
    ]


def advert_message(
    run_id: int, server_round: int, node_id: int, c_public: bytes, s_public: bytes
) -> bytes:
    """The bytes a bank's identity key signs: its two public keys, bound to run, round, node."""
    return b"|".join(
        [
            _ADVERT_CONTEXT,
            str(int(run_id)).encode(),
            str(int(server_round)).encode(),
            str(int(node_id)).encode(),
            bytes(c_public).hex().encode(),
            bytes(s_public).hex().encode(),
        ]
    )


def roster_signature_problems(
    roster: dict[int, tuple[bytes, bytes]],
    signatures: dict[int, tuple[str, str]],
    trusted: frozenset[str],
    run_id: int,
    server_round: int,
) -> list[str]:
    """Why a roster's keys cannot be trusted (empty: every entry checks out).

    ``signatures``: node -> (signer's Ed25519 public key, hex; signature, hex) over
    :func:`advert_message`. Every entry must be signed by a key in ``trusted``
    (hex), and no key may sign two entries (one bank, one place in the roster).
    """
    from flower_ext.audit.signing import verify_signature

    problems, signers = [], {}
    for node in sorted(roster):
        signer, signature = signatures.get(node, ("", ""))
        signer = str(signer).lower()
        if not signer or not signature:
            problems.append(f"node {node}'s public keys are not signed")
        elif signer not in trusted:
            problems.append(f"node {node}'s keys are signed by an unknown key {signer[:16]}...")
        elif signer in signers:
            problems.append(f"nodes {signers[signer]} and {node} are signed by the same key")
        elif not verify_signature(
            signer, advert_message(run_id, server_round, node, *roster[node]), signature
        ):
            problems.append(f"node {node}'s signature does not verify (forged or replayed keys)")
        signers.setdefault(signer, node)
    return problems


class SecAggError(ValueError):
    """A secure-aggregation step cannot go on; the message says why."""


class TooFewSurvivors(SecAggError):
    """Fewer than ``t`` banks remain: masks cannot (and must not) be removed."""


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of a round, the same at the server and every bank.

    Parameters
    ----------
    threshold : int
        ``t``: shares needed to rebuild a secret; also the fewest banks whose sum
        the server may learn. A coalition of the server and fewer than ``t`` banks
        learns nothing about an honest bank's input beyond the sum.
    clipping_range : float
        ``c``: every coordinate of the (pre-scaled) vector is clipped to ``[-c, c]``.
    quantization_bits : int
        ``R = 2**quantization_bits`` quantisation levels over ``[-c, c]``.
    modulus_bits : int
        Arithmetic is mod ``2**modulus_bits`` (at most 32: ``uint32`` vectors).
    """

    threshold: int
    clipping_range: float = 1.0
    quantization_bits: int = 22
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or int(self.threshold) < 2:
            raise ValueError(f"threshold must be at least 2, got {self.threshold!r}")
        if not (float(self.clipping_range) > 0 and np.isfinite(self.clipping_range)):
            raise ValueError(f"clipping_range must be positive, got {self.clipping_range!r}")
        if not 8 <= int(self.modulus_bits) <= 32:
            raise ValueError(f"modulus_bits must be in [8, 32], got {self.modulus_bits!r}")
        # Flower's quantize rounds into int32, and one bank must fit below the modulus.
        if not 1 <= int(self.quantization_bits) < min(31, int(self.modulus_bits)):
            raise ValueError(
                f"quantization_bits must be in [1, {min(31, int(self.modulus_bits)) - 1}], "
                f"got {self.quantization_bits!r}"
            )

    @property
    def levels(self) -> int:
        return 1 << int(self.quantization_bits)

    @property
    def modulus(self) -> int:
        return 1 << int(self.modulus_bits)

    @property
    def quantum(self) -> float:
        """One quantisation step ``2c / R``: the rounding error of one bank is below it."""
        return 2.0 * float(self.clipping_range) / self.levels

    @property
    def max_banks(self) -> int:
        """The most banks whose quantised sum cannot wrap around the modulus."""
        return (self.modulus - 1) // self.levels

    def check_banks(self, num_banks: int) -> None:
        """``SecAggError`` unless ``t <= num_banks <= max_banks``."""
        if num_banks > self.max_banks:
            raise SecAggError(
                f"{num_banks} banks could wrap the sum mod 2^{self.modulus_bits} with "
                f"{self.quantization_bits}-bit quantisation (at most {self.max_banks}); "
                "lower quantization_bits"
            )
        if num_banks < self.threshold:
            raise TooFewSurvivors(
                f"{num_banks} banks take part, fewer than the threshold t={self.threshold}"
            )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "threshold": int(self.threshold),
            "clipping-range": float(self.clipping_range),
            "quantization-bits": int(self.quantization_bits),
            "modulus-bits": int(self.modulus_bits),
        }

    @classmethod
    def from_dict(cls, values: dict) -> SecAggParams:
        return cls(
            threshold=int(values["threshold"]),
            clipping_range=float(values["clipping-range"]),
            quantization_bits=int(values["quantization-bits"]),
            modulus_bits=int(values["modulus-bits"]),
        )


def quantize_vector(vector: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, int]:
    """``(q(vector) as uint32 in [0, R], number of coordinates clipped)``."""
    values = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise SecAggError("the vector to aggregate has NaN or Inf values")
    clipped = int(np.count_nonzero(np.abs(values) > params.clipping_range))
    (quantised,) = quantize([values], float(params.clipping_range), params.levels)
    return quantised.astype(np.uint32), clipped


def dequantize_sum(total: np.ndarray, num_banks: int, params: SecAggParams) -> np.ndarray:
    """The float sum of ``num_banks`` vectors from the sum of their quantised forms.

    Each bank's ``q(x)`` is ``(x + c) R / 2c``; Flower's ``dequantize`` undoes one
    shift ``c``, the other ``k - 1`` are removed here.
    """
    (values,) = dequantize(
        [np.asarray(total, dtype=np.int64)], float(params.clipping_range), params.levels
    )
    return values - (num_banks - 1) * float(params.clipping_range)


def _pair_mask(
    own_s_private: bytes,
    peer_s_public: bytes,
    own: int,
    peer: int,
    server_round: int,
    dim: int,
    params: SecAggParams,
) -> np.ndarray:
    seed = agree(own_s_private, peer_s_public, MASK_PURPOSE, server_round, (own, peer))
    return prg_mask(seed, dim, params.modulus_bits)


def _modmask(params: SecAggParams) -> np.uint32:
    return np.uint32(params.modulus - 1)


def _share_indices(nodes: list[int]) -> dict[int, int]:
    """Shamir evaluation point of each node: its 1-based position among the sorted roster."""
    return {node: k + 1 for k, node in enumerate(sorted(nodes))}


# --------------------------------------------------------------------------- bank side
@dataclass
class BankSession:
    """One bank's state for one round. Every secret is fresh per round.

    Methods are called in protocol order: :meth:`advertise`, :meth:`share_keys`,
    :meth:`receive_shares`, :meth:`masked_input`, :meth:`unmask_shares`.
    """

    node_id: int
    server_round: int
    params: SecAggParams
    c_keys: KeyPair = field(default_factory=KeyPair)
    s_keys: KeyPair = field(default_factory=KeyPair)
    self_seed: bytes = field(default_factory=new_seed)
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    run_id: int = 0
    #: Hex Ed25519 keys of the banks (None: signatures not checked; see the module).
    trusted: frozenset[str] | None = None
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # b_j shares this bank holds
    key_shares: dict[int, bytes] = field(default_factory=dict)  # s_sk_j shares it holds
    unmasked: bool = False
    #: Roster node -> its identity key (filled when signatures were checked).
    signers: dict[int, str] = field(default_factory=dict)
    #: The survivor list this bank signed in the consistency check (once per round).
    signed_survivors: tuple[int, ...] | None = None

    def advertise(self) -> tuple[bytes, bytes]:
        """The public keys ``(c_pk, s_pk)``."""
        return self.c_keys.public, self.s_keys.public

    def signed_advert(self, sign: Callable[[bytes], str]) -> str:
        """``sign(advert_message(...))``: this bank's identity key over its public keys."""
        return sign(advert_message(self.run_id, self.server_round, self.node_id, *self.advertise()))

    def share_keys(
        self,
        roster: dict[int, tuple[bytes, bytes]],
        signatures: dict[int, tuple[str, str]] | None = None,
    ) -> dict[int, bytes]:
        """Shares of ``b_i`` and ``s_sk_i`` for every other bank, each encrypted to it.

        With :attr:`trusted` set, every roster entry must carry a valid signature by a
        distinct trusted key (``signatures``: node -> (signer hex, signature hex)), or
        nothing is shared (:class:`SecAggError` naming the entries).
        """
        roster = {int(k): (bytes(v[0]), bytes(v[1])) for k, v in roster.items()}
        if self.trusted is not None:
            problems = roster_signature_problems(
                roster, signatures or {}, self.trusted, self.run_id, self.server_round
            )
            if problems:
                raise SecAggError(
                    "refusing to share keys: " + "; ".join(problems[:5]) + " (a server that "
                    "substitutes keys would receive this bank's shares)"
                )
            self.signers = {int(n): str((signatures or {})[n][0]).lower() for n in roster}
        if roster.get(self.node_id) != self.advertise():
            raise SecAggError("the roster does not hold this bank's own public keys")
        publics = [key for pair in roster.values() for key in pair]
        if len(set(publics)) != len(publics):
            raise SecAggError("the roster repeats a public key")
        self.params.check_banks(len(roster))
        self.roster = roster
        n, t = len(roster), int(self.params.threshold)
        seed_shares = create_shares(self.self_seed, t, n)
        key_shares = create_shares(self.s_keys.private, t, n)
        out: dict[int, bytes] = {}
        for peer, index in _share_indices(list(roster)).items():
            b_share, sk_share = seed_shares[index - 1], key_shares[index - 1]
            if peer == self.node_id:
                self.seed_shares[peer], self.key_shares[peer] = b_share, sk_share
                continue
            key = agree(
                self.c_keys.private,
                roster[peer][0],
                SHARE_PURPOSE,
                self.server_round,
                (self.node_id, peer),
            )
            plaintext = share_keys_plaintext_concat(self.node_id, peer, b_share, sk_share)
            out[peer] = encrypt_share(key, plaintext)
        return out

    def self_seed_digest(self) -> bytes:
        """SHA-256 of ``b_i``: lets the server check the seed it rebuilds (reveals nothing)."""
        return hashlib.sha256(self.self_seed).digest()

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Decrypt and keep the shares other banks sent this bank (their senders form U2)."""
        for src, ciphertext in ciphertexts.items():
            src = int(src)
            if src not in self.roster or src == self.node_id:
                raise SecAggError(f"a share from node {src}, not another bank in the roster")
            key = agree(
                self.c_keys.private,
                self.roster[src][0],
                SHARE_PURPOSE,
                self.server_round,
                (self.node_id, src),
            )
            try:
                plaintext = decrypt_share(key, bytes(ciphertext))
            except InvalidToken:
                raise SecAggError(f"the share from node {src} does not decrypt") from None
            got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(plaintext)
            if (got_src, got_dst) != (src, self.node_id):
                raise SecAggError(f"the share from node {src} names {got_src}->{got_dst}")
            self.seed_shares[src], self.key_shares[src] = b_share, sk_share

    @property
    def neighbours(self) -> list[int]:
        """The banks this bank masks with: those whose shares it received (U2 minus itself)."""
        return sorted(n for n in self.seed_shares if n != self.node_id)

    def masked_input(self, vector: np.ndarray) -> tuple[np.ndarray, int]:
        """``(y_i as uint32, coordinates clipped)``: the only thing about ``x_i`` that leaves."""
        if not self.roster:
            raise SecAggError("masked_input before share_keys")
        quantised, clipped = quantize_vector(vector, self.params)
        dim, mod = quantised.size, _modmask(self.params)
        masked = quantised + prg_mask(self.self_seed, dim, self.params.modulus_bits)
        for peer in self.neighbours:
            mask = _pair_mask(
                self.s_keys.private,
                self.roster[peer][1],
                self.node_id,
                peer,
                self.server_round,
                dim,
                self.params,
            )
            if peer > self.node_id:
                masked += mask
            else:
                masked -= mask
        return masked & mod, clipped

    def sign_survivors(self, survivors: list[int], sign: Callable[[bytes], str]) -> str:
        """The consistency check: this bank's signature of ``U3``, given once per round.

        Refuses a list without this bank, with banks outside the roster, shorter than
        ``t``, or different from one it already signed.
        """
        listed = tuple(sorted(int(n) for n in survivors))
        if self.signed_survivors is not None and self.signed_survivors != listed:
            raise SecAggError(
                f"already signed the survivor list {list(self.signed_survivors)} this round; "
                f"refusing to sign {list(listed)} (the server shows banks different lists)"
            )
        if self.node_id not in listed:
            raise SecAggError("the survivor list does not include this bank")
        if set(listed) - set(self.roster):
            raise SecAggError(f"survivors {sorted(set(listed) - set(self.roster))} not in roster")
        if len(listed) < self.params.threshold:
            raise TooFewSurvivors(
                f"{len(listed)} survivors, fewer than the threshold t={self.params.threshold}"
            )
        self.signed_survivors = listed
        return sign(survivors_message(self.run_id, self.server_round, list(listed)))

    def unmask_shares(
        self,
        survivors: list[int],
        dropped: list[int],
        consistency: dict[int, str] | None = None,
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """This bank's shares of ``b_j`` (survivors) and ``s_sk_j`` (dropped); answered once.

        Refuses a request that would reveal both secrets of one bank (which would
        unmask its input), names a bank it holds no share of, omits this bank, or
        keeps fewer than ``t`` survivors. With signed keys (:attr:`trusted` set) also
        one for a survivor list other than the one this bank signed, or without ``t``
        valid signatures of it (``consistency``: node -> signature).
        """
        survivors, dropped = [int(n) for n in survivors], [int(n) for n in dropped]
        if self.unmasked:
            raise SecAggError("this round's unmask request was already answered")
        if self.trusted is not None:
            if self.signed_survivors != tuple(sorted(survivors)):
                raise SecAggError(
                    "the unmask request's survivor list is not the one this bank signed"
                )
            problems = consistency_problems(
                survivors,
                consistency or {},
                self.signers,
                self.params.threshold,
                self.run_id,
                self.server_round,
            )
            if problems:
                raise SecAggError("refusing to unmask: " + problems[0])
        if set(survivors) & set(dropped):
            raise SecAggError(
                f"nodes {sorted(set(survivors) & set(dropped))} are listed as both surviving and "
                "dropped: answering would reveal both their masks"
            )
        if self.node_id not in survivors:
            raise SecAggError("the unmask request does not list this bank as a survivor")
        unknown = sorted((set(survivors) | set(dropped)) - set(self.seed_shares))
        if unknown:
            raise SecAggError(f"no shares held for nodes {unknown}")
        if len(survivors) < self.params.threshold:
            raise TooFewSurvivors(
                f"{len(survivors)} surviving banks, fewer than the threshold "
                f"t={self.params.threshold}: refusing to help unmask"
            )
        self.unmasked = True
        return (
            {j: self.seed_shares[j] for j in survivors},
            {j: self.key_shares[j] for j in dropped},
        )


# --------------------------------------------------------------------------- server side
@dataclass
class ServerRound:
    """The server's state for one round: it routes ciphertexts and removes masks.

    Steps: :meth:`advertised` per bank; :meth:`route_shares` once; :meth:`add_masked`
    per bank; :meth:`unmask_request`; :meth:`unmask` with the banks' answers.
    """

    server_round: int
    params: SecAggParams
    roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U1
    seed_digests: dict[int, bytes] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # U3

    def advertised(self, node_id: int, c_public: bytes, s_public: bytes) -> None:
        self.roster[int(node_id)] = (bytes(c_public), bytes(s_public))

    def route_shares(
        self, sent: dict[int, tuple[dict[int, bytes], bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """``{src: ({dst: ct}, sha256(b_src))}`` -> ``{dst: {src: ct}}`` over U2 = senders.

        A sender must address every other member of the roster (the shares of a
        bank that skipped someone could not be rebuilt safely).
        """
        self.params.check_banks(len(sent))
        routed: dict[int, dict[int, bytes]] = {int(n): {} for n in sent}
        for src, (ciphertexts, digest) in sent.items():
            expected = set(self.roster) - {int(src)}
            if set(int(d) for d in ciphertexts) != expected:
                raise SecAggError(f"node {src} did not send one share to every other bank")
            self.seed_digests[int(src)] = bytes(digest)
            for dst, ct in ciphertexts.items():
                if int(dst) in routed:
                    routed[int(dst)][int(src)] = bytes(ct)
        self.u2 = sorted(routed)
        return routed

    def add_masked(self, node_id: int, masked: np.ndarray) -> None:
        node_id = int(node_id)
        if node_id not in self.u2:
            raise SecAggError(f"a masked input from node {node_id}, which is not in U2")
        vec = np.asarray(masked)
        if vec.dtype != np.uint32 or vec.ndim != 1:
            raise SecAggError(f"a masked input must be 1-D uint32, got {vec.dtype} {vec.shape}")
        if self.masked and vec.shape != next(iter(self.masked.values())).shape:
            raise SecAggError(f"node {node_id}'s masked input has a different length")
        self.masked[node_id] = vec

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """``(survivors U3, dropped U2 \\ U3)``; ``TooFewSurvivors`` below ``t``."""
        survivors = sorted(self.masked)
        if len(survivors) < self.params.threshold:
            raise TooFewSurvivors(
                f"only {len(survivors)} of {len(self.u2)} banks sent masked updates, fewer than "
                f"the threshold t={self.params.threshold}: the masks cannot be removed and the "
                "round is abandoned"
            )
        return survivors, sorted(set(self.u2) - set(survivors))

    def unmask(self, answers: dict[int, tuple[dict[int, bytes], dict[int, bytes]]]) -> np.ndarray:
        """``sum_{i in U3} q(x_i) mod 2^m`` (uint32) from ``t`` or more banks' shares."""
        survivors, dropped = self.unmask_request()
        answers = {int(k): v for k, v in answers.items() if int(k) in survivors}
        if len(answers) < self.params.threshold:
            raise TooFewSurvivors(
                f"only {len(answers)} banks answered the unmask request, fewer than the "
                f"threshold t={self.params.threshold}: the masks cannot be removed"
            )
        dim = next(iter(self.masked.values())).size
        mod = _modmask(self.params)
        total = np.zeros(dim, dtype=np.uint32)
        for vec in self.masked.values():
            total += vec
        for j in survivors:
            seed = _rebuild(j, [a[0].get(j) for a in answers.values()], self.params, "self seed")
            if hashlib.sha256(seed).digest() != self.seed_digests.get(j):
                raise SecAggError(f"the self-mask seed rebuilt for node {j} is wrong (bad shares)")
            total -= prg_mask(seed, dim, self.params.modulus_bits)
        for j in dropped:
            s_private = _rebuild(
                j, [a[1].get(j) for a in answers.values()], self.params, "mask key"
            )
            if KeyPair(s_private).public != self.roster[j][1]:
                raise SecAggError(f"the mask key rebuilt for node {j} is wrong (bad shares)")
            for i in survivors:
                # Survivor i added +PRG(s_ij) if j > i and -PRG(s_ij) if j < i: take it back.
                mask = _pair_mask(
                    s_private, self.roster[i][1], j, i, self.server_round, dim, self.params
                )
                if j > i:
                    total -= mask
                else:
                    total += mask
        return total & mod


def _rebuild(node: int, shares: list[bytes | None], params: SecAggParams, what: str) -> bytes:
    got = [s for s in shares if s]
    if len(got) < params.threshold:
        raise TooFewSurvivors(
            f"{len(got)} shares of node {node}'s {what}, fewer than the threshold "
            f"t={params.threshold}"
        )
    try:
        return combine_shares(got[: params.threshold])
    except ValueError as err:
        raise SecAggError(f"node {node}'s {what} could not be rebuilt: {err}") from None
