"""The cryptographic pieces of secure aggregation, each a thin call into a vetted library.

Nothing here is hand-rolled:

- key agreement: X25519 (``cryptography``), the shared secret run through
  HKDF-SHA256 with a context string that names the purpose, the round and the pair;
- authenticated encryption of Shamir shares: Flower's
  ``flwr.common.secure_aggregation.crypto.symmetric_encryption`` (Fernet);
- Shamir secret sharing: PyCryptodome's ``Shamir`` over 16-byte chunks, in the byte
  format of Flower's ``...crypto.shamir`` (interchangeable, tested) but without its
  thread pool, whose start-up cost 5-10 ms per 32-byte secret here (about 0.15 s of
  a 10-bank round);
- quantisation: Flower's ``...quantization`` (stochastic rounding into ``[0, R]``);
- the PRG that expands a 32-byte seed into a mask: AES-256 in CTR mode
  (``cryptography``) over zero bytes, read as little-endian ``uint32``.

Why not Flower's ``pseudo_rand_gen``: it folds the seed into 32 bits (2^32 possible
masks, searchable) and draws with ``randint(0, num_range - 1)``, which never
outputs ``num_range - 1`` (not uniform). AES-CTR under a 256-bit key is a PRF;
every seed here is fresh per round and per purpose, so a key/nonce pair is never
reused and the all-zero nonce is safe.
"""

from __future__ import annotations

import base64
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from Crypto.Util.Padding import pad, unpad
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.quantization import dequantize, quantize

SEED_BYTES = 32
KEY_BYTES = 32
_CONTEXT = b"flower-ext/secagg/v1"

__all__ = [
    "SEED_BYTES",
    "KeyPair",
    "agree",
    "combine_shares",
    "create_shares",
    "decrypt_share",
    "dequantize",
    "encrypt_share",
    "new_seed",
    "prg_mask",
    "quantize",
]


class KeyPair:
    """One X25519 key pair (raw 32-byte encodings)."""

    def __init__(self, private: bytes | None = None) -> None:
        key = (
            X25519PrivateKey.generate()
            if private is None
            else X25519PrivateKey.from_private_bytes(private)
        )
        self._key = key
        self.private = key.private_bytes_raw()
        self.public = key.public_key().public_bytes_raw()


def agree(
    private: bytes, peer_public: bytes, purpose: str, server_round: int, pair: tuple
) -> bytes:
    """32 bytes both ends derive alike: HKDF-SHA256(X25519(private, peer_public), info).

    ``info`` binds the purpose (``"share-encryption"`` or ``"pair-mask"``), the round
    and the (sorted) pair of node ids, so one exchange never yields the same key twice.
    """
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    low, high = sorted(int(x) for x in pair)
    info = b"|".join(
        [_CONTEXT, purpose.encode(), str(int(server_round)).encode(), b"%d-%d" % (low, high)]
    )
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def new_seed() -> bytes:
    """A fresh self-mask seed from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def prg_mask(seed: bytes, dim: int, modulus_bits: int = 32) -> np.ndarray:
    """``dim`` values uniform in ``[0, 2**modulus_bits)`` (``uint32``) from AES-256-CTR(seed).

    Exactly uniform: the keystream is uniform over 32-bit words and the modulus is a
    power of two that divides 2^32.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(bytes(4 * dim)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=True)
    if modulus_bits < 32:
        words &= np.uint32((1 << modulus_bits) - 1)
    return words


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it.

    Flower's format: the secret is PKCS#7-padded to 16-byte chunks, each chunk split
    over GF(2^128) (PyCryptodome, ``ssss=False``); share ``i`` (1-based) is
    ``i`` as 4 little-endian bytes followed by its 16-byte share of every chunk.
    """
    padded = pad(bytes(secret), 16)
    shares = [bytearray(i.to_bytes(4, "little")) for i in range(1, num + 1)]
    for start in range(0, len(padded), 16):
        for index, piece in Shamir.split(threshold, num, padded[start : start + 16], ssss=False):
            shares[index - 1] += piece
    return [bytes(share) for share in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares of :func:`create_shares`; ``ValueError`` if bad."""
    if not shares or any((len(s) - 4) % 16 or len(s) != len(shares[0]) for s in shares):
        raise ValueError("shares must have the same length, 4 + 16 k bytes")
    indices = [int.from_bytes(s[:4], "little") for s in shares]
    out = bytearray()
    for start in range(4, len(shares[0]), 16):
        chunk = [(i, bytes(s[start : start + 16])) for i, s in zip(indices, shares, strict=True)]
        out += Shamir.combine(chunk, ssss=False)
    try:
        return unpad(bytes(out), 16)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


def encrypt_share(key: bytes, plaintext: bytes) -> bytes:
    """Authenticated encryption (Flower's Fernet helper) under a 32-byte agreed key."""
    return encrypt(base64.urlsafe_b64encode(key), plaintext)


def decrypt_share(key: bytes, ciphertext: bytes) -> bytes:
    """Inverse of :func:`encrypt_share`; ``cryptography.fernet.InvalidToken`` if tampered."""
    return decrypt(base64.urlsafe_b64encode(key), ciphertext)
