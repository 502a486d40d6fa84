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

Round 2 as in Bonawitz et al.: a bank sends its masked input only if it received
shares from at least ``t - 1`` other banks (``|U2| >= t``), so a server cannot get a
vector masked with few or no pairwise masks. Banks also refuse ``2t <= n`` for their
own roster (two disjoint groups of ``t`` could each help unmask), and a bank answers
the unmask request only if ``survivors + dropped`` is exactly its own ``U2``.

Differences from the papers, on purpose: the mask graph is complete (SecAgg; the
SecAgg+ sparse ``k``-regular graph only pays off at hundreds of clients). Signed keys
are optional: a bank with a long-term Ed25519 identity signs its two public keys with
the run, round and its node id (:func:`advert_message`), and a bank given the set of
trusted identities refuses a roster in which any entry is unsigned, signed by an
unknown key, or signed twice by one key (:func:`roster_signature_problems`): a server
that forges keys for other banks then gets nothing. Without them the server is trusted
not to forge keys (semi-honest).

With signed keys the round also has Bonawitz et al.'s consistency check: before
the unmask, each survivor signs ``(t, hash(U1), U3, U2)`` (:func:`survivors_message`;
once per round: :meth:`BankSession.sign_survivors`), and a bank answers the unmask
request only for the list it signed itself and only with ``t`` valid signatures of
the same bytes, computed with its own ``t``, roster and ``U2``, from banks of the
roster (:func:`consistency_problems`). A server that shows different lists to
different banks needs ``t`` signatures on each, from disjoint banks: impossible with
``2t > n`` unless banks collude with it.

Malformed or hostile bank replies (wrong types or sizes, shares that do not decrypt,
wrong unmask shares) drop that bank with a reason (:attr:`ServerRound.rejected`,
:attr:`ServerRound.bad_shares`); with more than ``t`` unmask answers a bad share is
found by trying other ``t``-subsets.

Quantisation (Flower's, stochastic rounding): each coordinate is clipped to
``[-c, c]`` and mapped to an integer in ``[0, R]``, ``R = 2**quantization_bits``.
A sum of ``k`` banks lies in ``[0, k R]`` and must stay below ``M = 2**modulus_bits``:
at most ``(M - 1) // R`` banks (1023 with the defaults 22 and 32 bits). Per bank
and coordinate the rounding error is below one quantum ``2c / R`` (so ``k`` quanta in
the sum, ``k q / W`` in a mean divided by the survivors' weight share ``W``). The
rounding draws come from a PCG64 generator seeded with 128 bits of :mod:`secrets`.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Callable, Iterator
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
)

SHARE_PURPOSE = "share-encryption"
MASK_PURPOSE = "pair-mask"
_ADVERT_CONTEXT = b"flower-ext/secagg/v1/advert"
_SURVIVORS_CONTEXT = b"flower-ext/secagg/v2/survivors"
KEY_BYTES = 32
#: Largest share ciphertext the server routes (an honest one is about 250 bytes).
MAX_CIPHERTEXT_BYTES = 4096
#: Most ``t``-subsets of unmask answers tried to get past bad shares.
MAX_SUBSETS = 256


def roster_digest(roster: dict[int, tuple[bytes, bytes]]) -> str:
    """SHA-256 (hex) of the roster ``U1``: every node id with its two public keys, sorted."""
    h = hashlib.sha256()
    for node in sorted(int(n) for n in roster):
        c_pk, s_pk = roster[node]
        h.update(
            b"%d:" % node + bytes(c_pk).hex().encode() + b":" + bytes(s_pk).hex().encode() + b";"
        )
    return h.hexdigest()


def survivors_message(
    run_id: int,
    server_round: int,
    survivors: list[int],
    threshold: int = 0,
    roster_hash: str = "",
    u2: list[int] | tuple[int, ...] = (),
) -> bytes:
    """The bytes a bank signs in the consistency check.

    ``(t, hash(U1), U3, U2)``: the threshold, the roster, the survivor list and the set of
    banks whose shares the signer received. Two banks' signatures are of the same bytes
    only if they saw the same threshold, roster, survivors and ``U2``.
    """

    def ids(values) -> bytes:
        return ",".join(str(n) for n in sorted(int(n) for n in values)).encode()

    return b"|".join(
        [_SURVIVORS_CONTEXT, str(int(run_id)).encode(), str(int(server_round)).encode(),
         b"t=%d" % int(threshold), str(roster_hash).encode(), ids(survivors), b"u2=" + ids(u2)]
    )  # fmt: skip


def consistency_problems(
    survivors: list[int],
    signatures: dict[int, str],
    signers: dict[int, str],
    threshold: int,
    run_id: int,
    server_round: int,
    roster_hash: str = "",
    u2: list[int] | tuple[int, ...] = (),
) -> list[str]:
    """Why the survivor list is not vouched for (empty: ``t`` survivors signed it).

    ``signatures``: node -> hex signature of :func:`survivors_message`; ``signers``:
    node -> the identity key that signed its keys in this round's roster. Only
    survivors' signatures count, each with its own roster key, and only over the
    same ``(t, roster, survivors, U2)`` as the checking bank's own.
    """
    from flower_ext.audit.signing import verify_signature

    message = survivors_message(run_id, server_round, survivors, threshold, roster_hash, u2)
    valid = [
        j
        for j in sorted(set(int(n) for n in survivors))
        if signers.get(j)
        and signatures.get(j)
        and _verifies(verify_signature, signers[j], message, signatures[j])
    ]
    if len(valid) >= threshold:
        return []
    return [
        f"only {len(valid)} valid signatures of the survivor list {sorted(survivors)} "
        f"(t={threshold} needed): the server may be showing different lists to different banks"
    ]


def _verifies(verify, key: str, message: bytes, signature: object) -> bool:
    try:
        return bool(verify(key, message, str(signature)))
    except Exception:  # a malformed signature is simply not a valid one
        return False


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

    def check_majority(self, num_banks: int) -> None:
        """``SecAggError`` unless ``2t > num_banks``: no two disjoint groups of ``t`` banks.

        With ``2t <= n`` a server can show two survivor lists, each signed by ``t``
        banks, and collect one bank's self-mask seed from one group and its mask key
        from the other (both secrets: its input in clear).
        """
        if 2 * int(self.threshold) <= int(num_banks):
            raise SecAggError(
                f"threshold t={self.threshold} is not above half of the {num_banks} banks: two "
                "disjoint groups of t banks could each help unmask (refused; need 2t > n)"
            )

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
    # Flower's quantize formula, with the stochastic rounding drawn from a fresh generator
    # seeded from the OS CSPRNG (Flower's uses numpy's global generator).
    c = float(params.clipping_range)
    scaled = (np.clip(values, -c, c) + c) * (params.levels / (2 * c))
    rounded = np.ceil(scaled)
    uniform = np.random.Generator(np.random.PCG64(secrets.randbits(128))).random(scaled.size)
    rounded[uniform < rounded - scaled] -= 1
    return rounded.astype(np.uint32), clipped


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
        if self.roster:
            # Fresh shares of the same two secrets to a second roster would let a server
            # collect t shares of b_i from one group and t of s_sk_i from another.
            raise SecAggError(
                "refusing a second share-keys request in this round: this bank already "
                "shared its secrets with one roster"
            )
        roster = {int(k): (bytes(v[0]), bytes(v[1])) for k, v in roster.items()}
        if self.trusted is not None:
            if 2 * int(self.params.threshold) <= len(self.trusted):
                # A partial roster shown to this bank could meet 2t > |roster| while two
                # disjoint partial rosters of the federation each reach t.
                raise SecAggError(
                    f"threshold t={int(self.params.threshold)} is not above half of the "
                    f"{len(self.trusted)} banks trusted by this bank: two partial rosters of t "
                    "banks each could each help unmask one bank"
                )
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
        self.params.check_majority(len(roster))
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

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> list[int]:
        """Decrypt and keep the shares other banks sent this bank (their senders form U2).

        Returns the senders whose share does not decrypt or names another pair: they are
        left out of this bank's ``U2`` (it does not mask with them), and the bank reports
        them so that the server can drop them from every bank's view.
        """
        bad = []
        for src, ciphertext in ciphertexts.items():
            src = int(src)
            if src not in self.roster or src == self.node_id:
                raise SecAggError(f"a share from node {src}, not another bank in the roster")
            if src in self.seed_shares:
                raise SecAggError(f"two shares from node {src}")
            try:
                key = agree(
                    self.c_keys.private,
                    self.roster[src][0],
                    SHARE_PURPOSE,
                    self.server_round,
                    (self.node_id, src),
                )
                plaintext = decrypt_share(key, bytes(ciphertext))
                got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(plaintext)
            except (InvalidToken, ValueError, TypeError, IndexError):
                bad.append(src)
                continue
            if (got_src, got_dst) != (src, self.node_id):
                bad.append(src)
                continue
            self.seed_shares[src], self.key_shares[src] = b_share, sk_share
        return sorted(bad)

    @property
    def neighbours(self) -> list[int]:
        """The banks this bank masks with: those whose shares it received (U2 minus itself)."""
        return sorted(n for n in self.seed_shares if n != self.node_id)

    @property
    def u2(self) -> tuple[int, ...]:
        """``U2`` as this bank saw it: itself and the banks whose shares it holds."""
        return tuple(sorted(self.seed_shares))

    def masked_input(self, vector: np.ndarray) -> tuple[np.ndarray, int]:
        """``(y_i as uint32, coordinates clipped)``: the only thing about ``x_i`` that leaves.

        Refused unless this bank holds shares from at least ``t - 1`` other banks
        (``|U2| >= t``, Bonawitz et al. Round 2): a server that forwards a bank fewer
        shares would get a vector masked with few or no pairwise masks, which the
        other banks' shares of its self-mask seed alone would then open.
        """
        if not self.roster:
            raise SecAggError("masked_input before share_keys")
        if len(self.u2) < int(self.params.threshold):
            raise TooFewSurvivors(
                f"shares received from {len(self.u2) - 1} other banks; at least t-1="
                f"{int(self.params.threshold) - 1} are needed before this bank masks its input "
                "(fewer pairwise masks would let the self-mask shares alone open it)"
            )
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
        if set(listed) - set(self.u2):
            raise SecAggError(
                f"survivors {sorted(set(listed) - set(self.u2))} sent this bank no share"
            )
        self.signed_survivors = listed
        return sign(self._survivors_message(list(listed)))

    def _survivors_message(self, survivors: list[int]) -> bytes:
        return survivors_message(
            self.run_id,
            self.server_round,
            survivors,
            int(self.params.threshold),
            roster_digest(self.roster),
            self.u2,
        )

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
                roster_digest(self.roster),
                self.u2,
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
        if set(survivors) | set(dropped) != set(self.u2):
            raise SecAggError(
                f"survivors + dropped {sorted(set(survivors) | set(dropped))} is not the set of "
                f"banks whose shares this bank received {list(self.u2)}: refusing to unmask"
            )
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
def _candidate_subsets(holders: list[int], t: int) -> Iterator[tuple[int, ...]]:
    """``t``-subsets of ``holders`` to rebuild a secret from, most useful first: the first
    ``t``; then, for each holder, the first ``t`` of the others (one bad share anywhere is
    passed over within ``len(holders) + 1`` tries, whatever the ids); then every other
    combination, in order. No subset twice."""
    seen: set[tuple[int, ...]] = set()
    leave_one_out = (tuple(h for h in holders if h != k)[:t] for k in holders)
    for subset in itertools.chain([tuple(holders[:t])], leave_one_out,
                                  itertools.combinations(holders, t)):  # fmt: skip
        if len(subset) == t and subset not in seen:
            seen.add(subset)
            yield subset


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
    #: Unmask answerers found to have sent a wrong share (node -> reason).
    bad_shares: dict[int, str] = field(default_factory=dict)
    #: Survivors whose seed digest did not match the seed all their shares agree on.
    bad_digests: dict[int, str] = field(default_factory=dict)

    #: Banks dropped by the server for a bad reply (node -> reason), in protocol order.
    rejected: dict[int, str] = field(default_factory=dict)

    def advertised(self, node_id: int, c_public: bytes, s_public: bytes) -> None:
        self.roster[int(node_id)] = (bytes(c_public), bytes(s_public))

    def _reject(self, node: int, reason: str) -> None:
        self.rejected.setdefault(int(node), reason)

    def route_shares(
        self, sent: dict[int, tuple[dict[int, bytes], bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """``{src: ({dst: ct}, sha256(b_src))}`` -> ``{dst: {src: ct}}`` over U2 = senders.

        A sender must address every other member of the roster (the shares of a
        bank that skipped someone could not be rebuilt safely), with ``bytes``
        ciphertexts of at most :data:`MAX_CIPHERTEXT_BYTES` and a 32-byte digest; a
        sender that does not is left out of U2 (:attr:`rejected` says why).
        """
        good: dict[int, tuple[dict[int, bytes], bytes]] = {}
        for src, entry in sent.items():
            try:
                src = int(src)
                ciphertexts, digest = entry
                problem = _shares_problem(src, ciphertexts, digest, set(self.roster))
            except Exception as err:
                problem = f"malformed share-keys reply: {type(err).__name__}"
            if problem:
                self._reject(src, problem)
                continue
            good[src] = ({int(d): ct for d, ct in ciphertexts.items()}, digest)
        self.params.check_banks(len(good))
        routed: dict[int, dict[int, bytes]] = {int(n): {} for n in good}
        for src, (ciphertexts, digest) in good.items():
            self.seed_digests[src] = bytes(digest)
            for dst, ct in ciphertexts.items():
                if dst in routed:
                    routed[dst][src] = bytes(ct)
        self.u2 = sorted(routed)
        return routed

    def exclude(self, nodes: dict[int, str]) -> None:
        """Drop ``nodes`` (node -> reason) from U2 before the masked input is summed."""
        for node, reason in nodes.items():
            node = int(node)
            if node in self.u2:
                self.u2.remove(node)
                self._reject(node, reason)
            self.masked.pop(node, None)

    def settle_views(self, reported: dict[int, list[int]]) -> dict[int, str]:
        """Make every summed bank's view of U2 the same; returns who was set aside and why.

        ``reported``: bank -> the senders whose shares did not decrypt at it (it did not
        mask with them). Each bank that sent a masked input saw ``U2`` minus what it
        reported; the largest group of banks with one view ``V`` is kept: ``U2 := V``,
        banks outside ``V`` leave U2, and banks in ``V`` with another view lose their
        masked input (they count as dropped, their pairwise masks are removed from their
        mask keys). Every kept bank then has survivors + dropped = its own ``U2``.
        """
        views: dict[frozenset[int], list[int]] = {}
        for node in sorted(self.masked):
            view = frozenset(self.u2) - set(int(x) for x in reported.get(node, ()))
            views.setdefault(view, []).append(node)
        if len(views) <= 1 and not any(reported.values()):
            return {}
        view, group = max(views.items(), key=lambda item: (len(item[1]), -len(item[0])))
        out: dict[int, str] = {}
        accused: dict[int, list[int]] = {}
        for node, srcs in reported.items():
            for src in srcs:
                accused.setdefault(int(src), []).append(int(node))
        for node in sorted(set(self.u2) - view):
            out[node] = (
                f"its shares did not decrypt at nodes {sorted(accused.get(node, []))}"
                if node in accused
                else "left out of the banks' common view of U2"
            )
        for node in sorted(set(self.masked) - set(group)):
            if node not in out:
                out[node] = (
                    "its view of U2 differs from that of the largest group of banks "
                    f"{group} (shares it could or could not decrypt): its masked input is "
                    "set aside and it counts as dropped"
                )
        for node, reason in out.items():
            self.masked.pop(node, None)
            self._reject(node, reason)
        self.u2 = sorted(view)
        return out

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
        survivors = sorted(n for n in self.masked if n in self.u2)
        if len(survivors) < self.params.threshold:
            raise TooFewSurvivors(
                f"only {len(survivors)} of {len(self.u2)} banks sent masked updates, fewer than "
                f"the threshold t={self.params.threshold}: the masks cannot be removed and the "
                "round is abandoned"
            )
        return survivors, sorted(set(self.u2) - set(survivors))

    def valid_answers(self, answers: dict) -> dict[int, tuple[dict[int, bytes], dict[int, bytes]]]:
        """The well-formed unmask answers of survivors; the others go to :attr:`rejected`.

        Well-formed: a share of every survivor's seed and of every dropped bank's key,
        each ``bytes`` of ``4 + 16 k`` bytes (the share format of :func:`create_shares`).
        """
        survivors, dropped = self.unmask_request()
        out = {}
        for node, answer in answers.items():
            try:
                node = int(node)
                if node not in survivors:
                    continue
                seeds, keys = answer
                seeds = {int(k): v for k, v in seeds.items()}
                keys = {int(k): v for k, v in keys.items()}
                problem = ""
                if set(seeds) != set(survivors) or set(keys) != set(dropped):
                    problem = "the unmask answer does not cover exactly the survivors and dropped"
                elif not all(_is_share(v) for v in [*seeds.values(), *keys.values()]):
                    problem = "an unmask share is not bytes of 4 + 16k bytes"
            except Exception as err:
                problem = f"malformed unmask answer: {type(err).__name__}"
            if problem:
                self._reject(node, problem)
                continue
            out[node] = (seeds, keys)
        return out

    def unmask(self, answers: dict[int, tuple[dict[int, bytes], dict[int, bytes]]]) -> np.ndarray:
        """``sum_{i in U3} q(x_i) mod 2^m`` (uint32) from ``t`` or more banks' shares.

        With more than ``t`` answers a bad share that spoils the first ``t``-subset is found
        (another ``t``-subset rebuilds a secret that checks out) and its sender named in
        :attr:`bad_shares`.
        """
        survivors, dropped = self.unmask_request()
        answers = self.valid_answers(answers)
        if len(answers) < self.params.threshold:
            raise TooFewSurvivors(
                f"only {len(answers)} banks answered the unmask request, fewer than the "
                f"threshold t={self.params.threshold}: the masks cannot be removed"
            )
        dim = next(iter(self.masked.values())).size
        mod = _modmask(self.params)
        total = np.zeros(dim, dtype=np.uint32)
        for j in survivors:
            total += self.masked[j]
        for j in survivors:
            digest = self.seed_digests.get(j)
            seed = self._rebuild_checked(
                j,
                {k: a[0][j] for k, a in answers.items()},
                lambda secret, digest=digest: hashlib.sha256(secret).digest() == digest,
                "self seed",
            )
            total -= prg_mask(seed, dim, self.params.modulus_bits)
        for j in dropped:
            public = self.roster[j][1]
            s_private = self._rebuild_checked(
                j,
                {k: a[1][j] for k, a in answers.items()},
                lambda secret, public=public: (
                    len(secret) == KEY_BYTES and KeyPair(secret).public == public
                ),
                "mask key",
            )
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

    def _rebuild_checked(
        self, node: int, shares: dict[int, bytes], check: Callable[[bytes], bool], what: str
    ) -> bytes:
        """A secret of ``node`` that passes ``check`` from some ``t`` of ``shares``.

        Tries the first ``t`` holders, then other ``t``-subsets (at most
        :data:`MAX_SUBSETS`); when the first subset failed, holders whose share disagrees
        with the secret found are recorded in :attr:`bad_shares` (a bad share outside a
        first subset that checks out is harmless and not looked for).
        """
        t = int(self.params.threshold)
        holders = sorted(shares)
        if len(holders) < t:
            raise TooFewSurvivors(
                f"{len(holders)} shares of node {node}'s {what}, fewer than the threshold t={t}"
            )
        for tries, subset in enumerate(_candidate_subsets(holders, t)):
            if tries >= MAX_SUBSETS:
                break
            try:
                secret = combine_shares([shares[k] for k in subset])
                good = check(secret)
            except Exception:
                continue
            if not good:
                continue
            if tries == 0:
                # The first t shares rebuild a secret that checks out: a bad share among
                # the other holders cannot change the sum, and looking for it costs n - t
                # more interpolations per secret (pure-Python GF(2^128)), which tripled
                # the server's unmasking time. Only when a subset failed is a sender named.
                return secret
            base = [shares[k] for k in subset[: t - 1]]
            for k in holders:
                if k in subset:
                    continue
                try:
                    agrees = combine_shares([*base, shares[k]]) == secret
                except Exception:
                    agrees = False
                if not agrees:
                    self.bad_shares.setdefault(k, f"its share of node {node}'s {what} is wrong")
            return secret
        if len(holders) > t and what == "self seed":
            # Every answer agrees on one secret but it misses the digest node j sent: the
            # shares are sound and node j lied about its digest (it can only spoil its own
            # input, which any bank can). The seed it shared is the one to remove.
            try:
                secret = combine_shares([shares[k] for k in holders[:t]])
                base = [shares[k] for k in holders[: t - 1]]
                agree_all = all(
                    combine_shares([*base, shares[k]]) == secret for k in holders[t - 1 :]
                )
            except Exception:
                agree_all = False
            if agree_all:
                self.bad_digests[node] = "its seed-digest does not match the seed its shares give"
                return secret
        if len(holders) > t:
            raise SecAggError(
                f"no {t} of the {len(holders)} shares of node {node}'s {what} rebuild a value "
                f"that matches its public commitment: node {node} sent a wrong "
                f"{'seed digest' if what == 'self seed' else 'key'}, or more than "
                f"{len(holders) - t} shares are bad"
            )
        raise SecAggError(
            f"the {what} rebuilt for node {node} does not match its public commitment (a bad "
            f"share, or node {node} sent a wrong digest; with only t={t} answers the two "
            "cannot be told apart)"
        )


def _is_share(value: object) -> bool:
    return (
        isinstance(value, bytes)
        and len(value) >= 20
        and (len(value) - 4) % 16 == 0
        and len(value) <= 4 + 16 * 8
    )


def _shares_problem(src: int, ciphertexts: object, digest: object, roster: set[int]) -> str:
    """Why one bank's share-keys reply is unusable ("" if fine)."""
    if src not in roster:
        return "not in the roster"
    if not isinstance(digest, bytes) or len(digest) != 32:
        return "seed-digest is not 32 bytes"
    if not isinstance(ciphertexts, dict):
        return "shares are not a mapping"
    if set(int(d) for d in ciphertexts) != roster - {src}:
        return "not one share for every other bank"
    for ct in ciphertexts.values():
        if not isinstance(ct, bytes) or not 0 < len(ct) <= MAX_CIPHERTEXT_BYTES:
            return f"a share ciphertext is not bytes of 1..{MAX_CIPHERTEXT_BYTES} bytes"
    return ""
