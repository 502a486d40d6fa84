"""Ed25519 keys and signatures for the audit trail and the banks' receipts.

Built on ``cryptography`` (no hand-rolled crypto). Public keys travel as 64 hex
characters (the raw 32 bytes), which fit in a Flower ``ConfigRecord`` and in a
JSON line; on disk they are PEM files (``SubjectPublicKeyInfo``), private keys
PKCS#8 PEM written owner-only (0600).

The server's signing key comes from the file named by the environment variable
:data:`SERVER_KEY_ENV` (a deployment keeps it away from the run directory, e.g.
on an HSM-backed mount); without it each run generates a fresh key that lives
in the ServerApp's memory only and is never written, so nobody can sign for
that run after it ended. Either way the public half is in the trail
(``audit_key``), in ``audit-public-key.pem`` and in every bank's receipts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: Environment variable naming the server's Ed25519 private key (PEM) for deployments.
SERVER_KEY_ENV = "FLOWER_EXT_AUDIT_KEY"
#: The server's public key, written beside ``audit.jsonl``.
PUBLIC_KEY_FILE = "audit-public-key.pem"

_HEAD_DOMAIN = b"flower-ext audit head v1\n"


class SigningKeyError(ValueError):
    """A key that cannot be read or used (bad file, bad hex, wrong type)."""


def head_message(seq: int, head: str) -> bytes:
    """The bytes a ``head_signed`` signature covers: line ``seq`` has chain value ``head``.

    The chain value commits to every line up to ``seq`` (run id and config included),
    so the signature cannot be moved to another run or another position.
    """
    return _HEAD_DOMAIN + f"{int(seq)}\n{head}".encode()


def fingerprint(public_hex: str) -> str:
    """Short name of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def _raw_public(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


class Signer:
    """An Ed25519 private key that signs; :attr:`public_hex` is what others verify with."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_hex = _raw_public(key.public_key())
        self.fingerprint = fingerprint(self.public_hex)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        """Load a PEM (PKCS#8, unencrypted) Ed25519 private key."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise SigningKeyError(f"{path}: not a PEM private key ({err})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path}: not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | Path) -> Signer:
        """The key in ``path``; a new one written there (0600) if there is none."""
        path = Path(path)
        if path.is_file():
            return cls.from_file(path)
        signer = cls.generate()
        signer.write(path)
        return signer

    def write(self, path: str | Path) -> None:
        """Write the private key (PKCS#8 PEM, owner-only 0600); the public half is
        written by :func:`write_public_key`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already exists
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    def sign(self, message: bytes) -> str:
        """Hex signature of ``message``."""
        return self._key.sign(message).hex()


def server_signer() -> Signer:
    """The server's key: from ``$FLOWER_EXT_AUDIT_KEY`` if set, else a fresh in-memory key."""
    path = os.environ.get(SERVER_KEY_ENV, "").strip()
    return Signer.from_file(Path(path).expanduser()) if path else Signer.generate()


def write_public_key(path: str | Path, public_hex: str) -> Path:
    """Write ``public_hex`` as a PEM public key file."""
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
    path = Path(path)
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def load_public_key(value: str | Path) -> str:
    """A public key as 64 hex digits, from hex text, a PEM file, or a file holding hex.

    Raises :class:`SigningKeyError` with the reason when it is none of these.
    """
    text = str(value).strip()
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()
    path = Path(text).expanduser()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SigningKeyError(f"{value}: {err.strerror or err}") from None
    stripped = data.strip()
    if len(stripped) == 64:
        return load_public_key(stripped.decode("ascii", errors="replace"))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SigningKeyError(f"{value}: not a PEM public key or 64 hex digits ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{value}: not an Ed25519 public key")
    return _raw_public(key)


def verify_signature(public_hex: str, message: bytes, signature_hex: object) -> bool:
    """Whether ``signature_hex`` is ``public_hex``'s signature of ``message`` (never raises)."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(str(signature_hex)), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
