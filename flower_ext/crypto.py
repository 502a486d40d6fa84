"""CKKS encrypted aggregation with TenSEAL: key ceremony, packing, encrypt/add/decrypt kernels.

The scheme (what the server can and cannot do)
----------------------------------------------
Every bank holds the same *secret* TenSEAL context; the server holds only the
*public* one (parameters, public key, relinearisation keys; no secret key). In a
round:

1. a bank receives the encrypted global model (see below), decrypts it, trains;
2. it encrypts ``n_i * (local_i - base)``: its model minus the federation's
   public base model, pre-multiplied by its own weight ``n_i`` (``num-examples``),
   all layers flattened into one vector and packed into as few CKKS ciphertexts
   as the slot count allows, and sends their raw coefficients (:func:`encrypt_packed`);
3. the server **adds** the ciphertexts and the plaintext weights ``W = sum n_i``;
   it never multiplies, never decrypts. It adds coefficient arrays mod ``q``
   with NumPy (:class:`CKKSCodec`, :func:`sum_raw`), bit-identical to TenSEAL's
   ``a + b`` and 7.6x faster, for 10 x 1M parameters, than the TenSEAL weighted
   sum other frameworks run (``benchmarks/results/he_aggregation.json``);
4. the encrypted global model is the pair (``sum_i enc(n_i (local_i - base))``,
   ``W``) plus the plaintext ``base``: a bank decrypts, divides by ``W`` and adds
   ``base`` (:func:`decrypt_packed`). That is FedAvg, ``sum n_i local_i / W``.

Why relative to a fixed ``base`` (the initial model the server started from)
rather than to last round's model: then each round's ciphertext sum *is* the
whole global model, the server keeps nothing but the latest sum, and a bank that
missed rounds (or a fresh SuperNode) decrypts the current model from one message
- no per-client history to resync. The base is public (the server built it: a
random initialisation plus the federated standardisation); everything learned
from the banks' data exists on the server only as ciphertext.

Why pre-multiply on the client: a weighted sum on the server needs a
ciphertext-plaintext multiplication per ciphertext, which costs 10-25x an
addition and, in CKKS, a modulus level (a second data prime). Add-only means
depth 0: one data prime suffices, which halves every ciphertext against the
usual two-level parameters and makes the server's work pure additions.

Parameters (:data:`DEFAULT_PARAMETERS`) and why
-----------------------------------------------
* ``poly_modulus_degree`` N = 4096: 2048 slots per ciphertext. Expansion does
  not depend on N (4 coefficients per value for one data prime), so the
  smallest N whose security bound fits the moduli keeps messages small and the
  tail chunk cheap.
* ``coeff_mod_bit_sizes`` = (56, 53): 109 bits in all, the HE-standard maximum
  for 128-bit security at N = 4096 (SEAL enforces the table). The 56-bit prime
  is the only data prime; the 53-bit one is the key-switching prime TenSEAL
  insists on (it always creates relinearisation keys), never touched by
  ciphertexts. On the wire (:class:`CKKSCodec`) a coefficient takes 7 bytes, so
  an update costs exactly 7.0x its float32 size (TenSEAL's own zstd
  serialization: 7.6x; a 60-bit data prime: 8.0x; FLARE's [60, 40, 40, 60] at
  N = 8192: 20x per full ciphertext). ``flower-ext keygen
  --coeff-mod-bit-sizes 48,60 --scale-bits 28`` gives 6.0x with 16x less room.
* ``scale_bits`` = 32: values are encoded as ``round(x * 2^32)``. Fresh
  public-key encryption noise is ~2^10, so one ciphertext carries ~2e-7
  absolute error per value (x sqrt(number of banks) after the sum), while the
  56-bit prime leaves ``2^(56-32-3) = 2^21 ~ 2.1e6`` for ``|sum_i n_i x_i|`` per
  coordinate (:func:`max_abs_sum`). With weights in the thousands the aggregate
  is exact to ~1e-9 relative. The bound holds for the *sum*: each bank checks
  ``k * max|s n_i (local_i - base)|`` against it, where ``k`` is the number of
  banks the server sampled and ``s`` a public weight scale the server announces
  (:class:`flower_ext.strategies.EncryptedFedAvg`, ``weight_scale``); a bank that
  does not fit refuses and names the ``s`` that would. ``flower-ext keygen
  --scale-bits 28`` gives 16x more room for 16x more noise.

What the ciphertexts do not protect: ``n_i`` and the banks' metrics travel in
plaintext (as in any FedAvg), the base model is public, and CKKS ciphertexts
carry no MAC - a bank can send garbage that decrypts to garbage, and the server
(which holds the public key) can encrypt any model and send it as the global
one. The server can check structure, key fingerprint, slots and that every
coefficient is below ``q``, not content. All banks share one secret key: the
server plus any one bank can decrypt every bank's individual ciphertext, and an
*active* server needs no colluding bank - it sends one bank's ciphertext to another
as "the global model" and reads what the receiving bank reports in clear about it
(metrics, losses). The scheme protects the updates against an honest-but-curious
server only; :class:`flower_ext.mods.HEMod` narrows the oracle (pinned base, one
model per round, ``he-clear-metrics = false``) and DP on the updates covers it.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
import zstandard
from numpy.typing import NDArray

#: Version tag of the packed-ciphertext wire format (client reply and global model).
FORMAT = "ckks-raw/1"
SECRET_FILE = "bank-secret.ckks"
PUBLIC_FILE = "server-public.ckks"
INFO_FILE = "keys.txt"

#: Largest total coefficient modulus (bits) per N for 128-bit classical security
#: (HomomorphicEncryption.org standard, ternary secrets; SEAL's ``tc128``).
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CryptoError(ValueError):
    """A key, context or ciphertext the caller cannot use; the message says why."""


class PrivateContextError(CryptoError):
    """A context that holds the secret key where only the public one may be."""


class CiphertextError(CryptoError):
    """A ciphertext that is malformed or was made under other keys or parameters."""


@dataclass(frozen=True)
class CKKSParameters:
    """CKKS parameters for encrypted aggregation (see the module docstring for the choice)."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (56, 53)
    scale_bits: int = 32

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (all but the special prime)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_abs_value(self) -> float:
        """Largest ``|value|`` a ciphertext (or a sum of them) may hold without wrapping."""
        return float(2.0 ** (self.data_bits - self.scale_bits - 3))

    def check(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_BITS_128:
            raise CryptoError(f"poly_modulus_degree must be one of {sorted(MAX_BITS_128)}, got {n}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise CryptoError(
                "coeff_mod_bit_sizes needs a data prime and the special prime, e.g. (56, 53)"
            )
        if any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise CryptoError(f"each prime must have 20..60 bits, got {self.coeff_mod_bit_sizes}")
        total = sum(self.coeff_mod_bit_sizes)
        if total > MAX_BITS_128[n]:
            raise CryptoError(
                f"coefficient modulus of {total} bits exceeds {MAX_BITS_128[n]}, the most "
                f"N={n} allows at 128-bit security"
            )
        if not 20 <= self.scale_bits <= self.data_bits - 10:
            raise CryptoError(
                f"scale_bits must be in 20..{self.data_bits - 10} (data modulus "
                f"{self.data_bits} bits, 10 bits of headroom), got {self.scale_bits}"
            )


DEFAULT_PARAMETERS = CKKSParameters()


# ---------------------------------------------------------------------- contexts
def generate_context(params: CKKSParameters = DEFAULT_PARAMETERS) -> ts.Context:
    """A fresh secret CKKS context (public key, relin keys and secret key)."""
    params.check()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2.0**params.scale_bits
    return ctx


def public_copy(ctx: ts.Context) -> ts.Context:
    """The same context without its secret key (what the server may hold)."""
    pub = ctx.copy()
    if pub.is_private():
        pub.make_context_public()
    return pub


def context_slots(ctx: ts.Context) -> int:
    return int(ctx.seal_context().data.first_context_data().parms().poly_modulus_degree()) // 2


def context_data_bits(ctx: ts.Context) -> int:
    return int(ctx.seal_context().data.first_context_data().total_coeff_modulus_bit_count())


def max_abs_sum(ctx: ts.Context) -> float:
    """Largest ``|value|`` per slot that a ciphertext, or a sum of them, holds without wrapping.

    Values are encoded as ``round(x * scale)`` under the data modulus ``q``;
    beyond ``q / 2`` they wrap around and decrypt to garbage with no error. Three
    bits are kept as headroom for the encoding and the encryption noise, so the
    bound is ``2^(log2 q - log2 scale - 3)`` (2^21, about 2.1e6, for the defaults).
    It applies to the *sum* the server builds, not to each bank's ciphertext alone.
    """
    return float(2.0 ** (context_data_bits(ctx) - math.log2(ctx.global_scale) - 3))


#: Standard deviation of one fresh ciphertext's error per value, in units of ``scale``
#: (public-key encryption noise of N = 4096 keys, measured ~2^10 before decoding).
ENCRYPTION_NOISE = 2.0**10


def noise_floor(ctx: ts.Context) -> float:
    """Typical absolute error one fresh ciphertext adds to each value it carries.

    ``2^10 / scale``: about 2.4e-7 with the default ``scale_bits = 32`` (3.8e-6 with
    28). A value much smaller than this decrypts to noise; the sum of ``k`` ciphertexts
    carries about ``sqrt(k)`` times it. :class:`flower_ext.mods.HEMod` refuses a
    contribution whose weighted update would sink into it
    (:func:`flower_ext.mods.he.check_precision`).
    """
    return float(ENCRYPTION_NOISE / ctx.global_scale)


def context_parameters(ctx: ts.Context) -> CKKSParameters:
    """The parameters of ``ctx`` (the special prime's size is not recoverable: given as total)."""
    sc = ctx.seal_context().data
    data = context_data_bits(ctx)
    total = int(sc.key_context_data().total_coeff_modulus_bit_count())
    return CKKSParameters(
        poly_modulus_degree=context_slots(ctx) * 2,
        coeff_mod_bit_sizes=(data, total - data),
        scale_bits=round(math.log2(ctx.global_scale)),
    )


_FINGERPRINTS: dict[int, tuple[ts.Context, str]] = {}
_FP_LOCK = threading.Lock()


def context_fingerprint(ctx: ts.Context) -> str:
    """SHA-256 of the key set: public key (which pins the parameters) and scale.

    The secret context of the banks and the public context of the server give the
    same fingerprint; contexts from two ``keygen`` runs never do. Ciphertexts
    carry it so mismatched keys are refused by name, not by decrypting garbage.
    """
    with _FP_LOCK:
        cached = _FINGERPRINTS.get(id(ctx))
        if cached is not None and cached[0] is ctx:
            return cached[1]
    if not ctx.has_public_key():
        raise CryptoError("the context has no public key (symmetric contexts are not supported)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pk")
        ctx.public_key().data.save(path)
        key_bytes = Path(path).read_bytes()
    digest = hashlib.sha256()
    digest.update(FORMAT.encode())
    digest.update(key_bytes)
    digest.update(repr(float(ctx.global_scale)).encode())
    fingerprint = digest.hexdigest()
    with _FP_LOCK:
        _FINGERPRINTS[id(ctx)] = (ctx, fingerprint)
    return fingerprint


def _read_context(source: str | Path | bytes | ts.Context) -> ts.Context:
    if isinstance(source, ts.Context):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "the given bytes"
    else:
        path = Path(os.path.expanduser(str(source)))
        if not str(source):
            raise CryptoError("no CKKS context path given")
        if not path.is_file():
            raise CryptoError(f"CKKS context file {path} does not exist")
        data = path.read_bytes()
        where = str(path)
    try:
        ctx = ts.context_from(data)
    except Exception as err:  # TenSEAL raises several types on bad input
        raise CryptoError(f"{where} is not a TenSEAL context: {err}") from err
    try:
        scale = ctx.global_scale
    except ValueError:
        scale = 0.0
    if scale <= 0:
        raise CryptoError(f"{where} has no global scale (not made by flower-ext keygen?)")
    return ctx


def load_public_context(source: str | Path | bytes | ts.Context) -> ts.Context:
    """The server's context; refuses one that holds a secret key."""
    ctx = _read_context(source)
    if ctx.is_private():
        raise PrivateContextError(
            "the CKKS context given to the server holds the secret key: the server must only "
            f"get the public context ({PUBLIC_FILE} from `flower-ext keygen`), never the "
            f"banks' {SECRET_FILE}"
        )
    return ctx


_SECRET_CACHE: dict[str, tuple[float, ts.Context]] = {}
_SECRET_LOCK = threading.Lock()


def load_secret_context(source: str | Path | bytes | ts.Context) -> ts.Context:
    """A bank's context; it must hold the secret key. Files are cached by path and mtime."""
    if isinstance(source, (str, Path)):
        path = str(Path(os.path.expanduser(str(source))).resolve())
        mtime = os.stat(path).st_mtime if os.path.exists(path) else -1.0
        with _SECRET_LOCK:
            hit = _SECRET_CACHE.get(path)
            if hit is not None and hit[0] == mtime:
                return hit[1]
        ctx = _read_context(path)
    else:
        path, mtime = "", 0.0
        ctx = _read_context(source)
    if not ctx.is_private():
        raise CryptoError(
            "the CKKS context has no secret key, so it cannot decrypt: banks need "
            f"{SECRET_FILE} from `flower-ext keygen`, the server gets {PUBLIC_FILE}"
        )
    if path:
        with _SECRET_LOCK:
            _SECRET_CACHE[path] = (mtime, ctx)
    return ctx


# ---------------------------------------------------------------------- key ceremony
@dataclass(frozen=True)
class KeyFiles:
    secret: Path
    public: Path
    info: Path
    fingerprint: str
    params: CKKSParameters


def write_private_file(path: str | Path, data: bytes) -> Path:
    """Write ``path`` owner-only (0600), atomically, whatever was there before.

    The bytes go to a fresh 0600 temporary file in the same directory, which then
    replaces ``path``: a file that existed with wider permissions is replaced, not
    truncated in place (``open(..., "w")`` would keep its old mode), and a reader
    never sees half a key.
    """
    target = Path(os.path.expanduser(str(path)))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)  # mkstemp already uses 0600; say so rather than rely on it
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_keys(
    directory: str | Path,
    params: CKKSParameters = DEFAULT_PARAMETERS,
    *,
    overwrite: bool = False,
) -> KeyFiles:
    """Generate one key set into ``directory``: the banks' secret context, the server's public one.

    Files are created owner-only (0600; the directory 0700 if created here).
    Existing key files are never replaced unless ``overwrite``: losing the old
    secret key makes every model encrypted under it unreadable.
    """
    params.check()
    folder = Path(os.path.expanduser(str(directory)))
    targets = [folder / SECRET_FILE, folder / PUBLIC_FILE, folder / INFO_FILE]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(str(p) for p in existing)} already exist(s); refusing to overwrite "
            "keys (pass --force to replace them: models encrypted under the old keys become "
            "unreadable)"
        )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ctx = generate_context(params)
    fingerprint = context_fingerprint(ctx)
    secret_bytes = ctx.serialize(save_secret_key=True)
    public_bytes = public_copy(ctx).serialize()
    info = (
        f"format: {FORMAT}\nfingerprint: {fingerprint}\n"
        f"poly_modulus_degree: {params.poly_modulus_degree}\nslots: {params.slots}\n"
        f"coeff_mod_bit_sizes: {','.join(map(str, params.coeff_mod_bit_sizes))}\n"
        f"scale_bits: {params.scale_bits}\nsecurity: 128-bit (HE standard)\n"
        f"{SECRET_FILE}: banks only (secret key)\n{PUBLIC_FILE}: the server (no secret key)\n"
    )
    for path, data in zip(targets, [secret_bytes, public_bytes, info.encode()], strict=True):
        write_private_file(path, data)
    return KeyFiles(targets[0], targets[1], targets[2], fingerprint, params)


def simulation_key_dir(run_id: int) -> Path:
    """Where a simulation with empty key paths generates (server) and finds (banks) its keys.

    Both sides know the run id, so no key or path travels in a message. Simulation
    only: in a deployment the banks run ``flower-ext keygen`` and the server gets
    the public file.
    """
    return Path(tempfile.gettempdir()) / "flower-ext-he-keys" / f"run-{int(run_id)}"


# ---------------------------------------------------------------------- TenSEAL kernels
@dataclass(frozen=True)
class EncryptedVector:
    """A flat float vector encrypted as ``ceil(len / slots)`` TenSEAL-serialized ciphertexts."""

    chunks: tuple[bytes, ...]
    num_values: int
    slots: int

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def num_chunks(num_values: int, slots: int) -> int:
    return max(1, -(-int(num_values) // int(slots)))


def encrypt_vector(ctx: ts.Context, vector: NDArray[np.floating]) -> EncryptedVector:
    """Encrypt a flat vector chunk by chunk (``slots`` values per ciphertext), serialized."""
    flat = np.ascontiguousarray(vector, dtype=np.float64).reshape(-1)
    slots = context_slots(ctx)
    chunks = tuple(
        ts.ckks_vector(ctx, flat[i : i + slots]).serialize()
        for i in range(0, max(len(flat), 1), slots)
    )
    return EncryptedVector(chunks, len(flat), slots)


def load_ciphertexts(
    ctx: ts.Context, chunks: Sequence[bytes], num_values: int
) -> list[ts.CKKSVector]:
    """Deserialize and check every ciphertext against ``ctx``; raises :class:`CiphertextError`.

    Checked: it parses under ``ctx``'s parameters (a ciphertext from another N or
    moduli does not), holds the expected number of values, is a fresh 2-part
    ciphertext at ``ctx``'s first level and at ``ctx``'s scale (sums need equal scales).
    """
    slots = context_slots(ctx)
    if len(chunks) != num_chunks(num_values, slots):
        raise CiphertextError(
            f"{len(chunks)} ciphertexts for {num_values} values, expected "
            f"{num_chunks(num_values, slots)} at {slots} slots"
        )
    first = list(ctx.seal_context().data.first_parms_id())
    out = []
    for i, raw in enumerate(chunks):
        try:
            vec = ts.ckks_vector_from(ctx, raw)
        except Exception as err:  # TenSEAL/SEAL raise ValueError, RuntimeError, IndexError
            raise CiphertextError(
                f"ciphertext {i} does not parse under the federation's context ({err}); "
                "malformed, or made with other CKKS parameters"
            ) from err
        want = min(slots, num_values - i * slots)
        if vec.size() != want:
            raise CiphertextError(f"ciphertext {i} holds {vec.size()} values, expected {want}")
        cts = vec.data.ciphertext()  # the C++ list: 3x cheaper than the Python wrapper's
        if len(cts) != 1:
            raise CiphertextError(f"ciphertext {i} is not a single CKKS ciphertext")
        ct = cts[0]
        if ct.poly_modulus_degree() // 2 != slots:
            raise CiphertextError(
                f"ciphertext {i} has {ct.poly_modulus_degree() // 2} slots, the context {slots}"
            )
        if ct.size() != 2 or list(ct.parms_id()) != first:
            raise CiphertextError(f"ciphertext {i} is not a fresh ciphertext at the first level")
        if ct.scale != ctx.global_scale:
            raise CiphertextError(
                f"ciphertext {i} has scale 2^{math.log2(ct.scale):.1f}, the context "
                f"2^{math.log2(ctx.global_scale):.1f}"
            )
        out.append(vec)
    return out


def add_encrypted(updates: Sequence[Sequence[ts.CKKSVector]]) -> list[ts.CKKSVector]:
    """``sum_i updates[i]`` with TenSEAL, chunk by chunk (the reference for :func:`sum_raw`).

    ``a + b`` (a new ciphertext) rather than in-place ``add_``: TenSEAL 0.3.18's
    in-place addition copies internally and measured ~17x slower.
    """
    if not updates:
        raise ValueError("nothing to add")
    acc = list(updates[0])
    for update in updates[1:]:
        if len(update) != len(acc):
            raise ValueError("encrypted updates have different numbers of ciphertexts")
        for j, ct in enumerate(update):
            acc[j] = acc[j] + ct
    return acc


def decrypt_vector(
    ctx: ts.Context, chunks: Sequence[bytes], num_values: int
) -> NDArray[np.float64]:
    """Decrypt TenSEAL-serialized chunks with a secret context (checked as in
    :func:`load_ciphertexts`)."""
    if not ctx.is_private():
        raise CryptoError("decryption needs the secret context")
    out = np.empty(num_values, dtype=np.float64)
    slots = context_slots(ctx)
    for i, vec in enumerate(load_ciphertexts(ctx, chunks, num_values)):
        out[i * slots : i * slots + vec.size()] = vec.decrypt()
    return out


# ---------------------------------------------------------------------- raw wire format
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2
_META = struct.Struct("<4QB3QdQ")  # parms_id, is_ntt_form, size, N, L, scale, correction


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise CiphertextError("truncated protobuf varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class CKKSCodec:
    """Depth-0 CKKS ciphertexts <-> raw coefficient arrays, for an add-only server.

    A fresh ciphertext under one data prime ``q`` is two polynomials of N
    coefficients in ``[0, q)`` (SEAL keeps them in NTT form). Adding two
    ciphertexts is adding their coefficients mod ``q`` - exactly what SEAL's
    ``Evaluator::add`` does for them - so the server can add whole updates as
    NumPy arrays instead of deserializing thousands of TenSEAL objects
    (``tests/test_he_crypto.py`` checks the result is bit-identical to TenSEAL's).

    On the wire each coefficient takes ``ceil(log2(q) / 8)`` bytes (7 for the
    default 56-bit prime): ``2 * N * 7`` bytes per ``N / 2`` values, **7.0x**
    float32, with no compression to pay for. Banks convert TenSEAL's
    serialization to this form after encrypting and back before decrypting;
    parameters, scale and level are fixed by the context (its fingerprint
    travels with the payload), so only coefficients travel.
    """

    def __init__(self, ctx: ts.Context) -> None:
        sample = ts.ckks_vector(ctx, [0.0]).serialize()  # a public context can encrypt
        header, meta, coeffs = self._parse(sample)
        parms_id, ntt, size, n, levels, scale, correction = meta
        if levels != 1 or size != 2:
            raise CryptoError(
                f"the context's fresh ciphertexts have {levels} data primes: the add-only "
                "format needs exactly one (keys from `flower-ext keygen` have one)"
            )
        self.header = header
        self.parms_id = parms_id
        self.is_ntt_form = ntt
        self.correction = correction
        self.n = int(n)
        self.slots = self.n // 2
        self.scale = float(scale)
        self.q = int(ctx.seal_context().data.first_context_data().total_coeff_modulus())
        self.coeff_bytes = -(-self.q.bit_length() // 8)
        # sums of this many arrays fit in uint64 before a reduction mod q is due
        self.max_terms = (2**64 - 1) // self.q
        if int(coeffs.max()) >= self.q:
            raise CryptoError("unexpected modulus: coefficients exceed q")
        del coeffs

    # -------------------------------------------------------------- TenSEAL bytes
    def _parse(self, raw: bytes) -> tuple[bytes, tuple, NDArray[np.uint64]]:
        fields: dict[int, bytes] = {}
        i = 0
        while i < len(raw):
            key, i = _varint(raw, i)
            number, wire = key >> 3, key & 7
            if wire == 2:
                length, i = _varint(raw, i)
                fields.setdefault(number, raw[i : i + length])
                i += length
            elif wire == 1:
                fields[number] = raw[i : i + 8]
                i += 8
            elif wire == 0:
                _, i = _varint(raw, i)
            else:
                raise CiphertextError(f"unexpected protobuf wire type {wire}")
        seal = fields.get(2, b"")
        if len(seal) < 16 or struct.unpack_from("<H", seal)[0] != _SEAL_MAGIC:
            raise CiphertextError("not a serialized SEAL ciphertext")
        compr = seal[5]
        body = seal[16:]
        if compr == _COMPR_ZSTD:
            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        elif compr == _COMPR_ZLIB:
            body = zlib.decompress(body)
        elif compr != _COMPR_NONE:
            raise CiphertextError(f"unknown SEAL compression mode {compr}")
        meta = _META.unpack_from(body)
        parms_id, ntt, size, n, levels = tuple(meta[:4]), meta[4], meta[5], meta[6], meta[7]
        count = int(size) * int(n) * int(levels)
        start = _META.size + 16 + 8  # the coefficient array's own header and length
        coeffs = np.frombuffer(body, dtype="<u8", count=count, offset=start)
        return seal[:16], (parms_id, ntt, size, n, levels, meta[8], meta[9]), coeffs

    def to_raw(self, serialized: bytes) -> NDArray[np.uint64]:
        """A TenSEAL-serialized fresh ciphertext as a (2, N) array of coefficients."""
        _, meta, coeffs = self._parse(serialized)
        if meta[0] != self.parms_id or meta[3] != self.n or meta[4] != 1 or meta[2] != 2:
            raise CiphertextError("the ciphertext is not a fresh one under this context")
        return coeffs.reshape(2, self.n)

    def to_tenseal(self, coeffs: NDArray[np.uint64], num_values: int) -> bytes:
        """TenSEAL serialization (uncompressed SEAL inside) of a (2, N) coefficient array."""
        data = np.ascontiguousarray(coeffs, dtype="<u8").tobytes()
        inner = struct.pack(
            "<HBBBBHQ", _SEAL_MAGIC, 16, self.header[3], self.header[4], 0, 0, 16 + 8 + len(data)
        )
        meta = _META.pack(
            *self.parms_id, self.is_ntt_form, 2, self.n, 1, self.scale, self.correction
        )
        body = meta + inner + struct.pack("<Q", 2 * self.n) + data
        outer = struct.pack(
            "<HBBBBHQ",
            _SEAL_MAGIC,
            16,
            self.header[3],
            self.header[4],
            _COMPR_NONE,
            0,
            16 + len(body),
        )
        seal = outer + body
        sizes = _put_varint(num_values)
        return (
            b"\x0a"
            + _put_varint(len(sizes))
            + sizes
            + b"\x12"
            + _put_varint(len(seal))
            + seal
            + b"\x19"
            + struct.pack("<d", self.scale)
        )

    # -------------------------------------------------------------- wire arrays
    def pack(self, coeffs: NDArray[np.uint64]) -> NDArray[np.uint8]:
        """(k, 2, N) coefficients -> (k, 2, N, coeff_bytes) little-endian bytes."""
        as_bytes = np.ascontiguousarray(coeffs, dtype="<u8").view(np.uint8)
        return np.ascontiguousarray(as_bytes.reshape(*coeffs.shape, 8)[..., : self.coeff_bytes])

    def wire_shape(self, chunks: int) -> tuple[int, int, int, int]:
        return (chunks, 2, self.n, self.coeff_bytes)

    def unpack(
        self, packed: NDArray[np.uint8], out: NDArray[np.uint64] | None = None
    ) -> NDArray[np.uint64]:
        """Inverse of :meth:`pack`, checking every coefficient is below ``q``."""
        if (
            packed.dtype != np.uint8
            or packed.ndim != 4
            or packed.shape[1:] != (2, self.n, self.coeff_bytes)
        ):
            raise CiphertextError(
                f"ciphertext array is {packed.dtype}{tuple(packed.shape)}, expected uint8 "
                f"(chunks, 2, {self.n}, {self.coeff_bytes})"
            )
        shape = packed.shape[:3]
        if out is None or out.shape != shape:
            out = np.empty(shape, dtype=np.uint64)
        wide = out.view(np.uint8).reshape(*shape, 8)
        wide[..., : self.coeff_bytes] = packed
        wide[..., self.coeff_bytes :] = 0
        if int(out.max(initial=0)) >= self.q:
            raise CiphertextError(
                "ciphertext coefficients exceed the modulus: malformed, or made under "
                "other parameters"
            )
        return out


_CODECS: dict[int, tuple[ts.Context, CKKSCodec]] = {}


def codec_for(ctx: ts.Context) -> CKKSCodec:
    """The (cached) :class:`CKKSCodec` of a context."""
    hit = _CODECS.get(id(ctx))
    if hit is not None and hit[0] is ctx:
        return hit[1]
    codec = CKKSCodec(ctx)
    _CODECS[id(ctx)] = (ctx, codec)
    return codec


def encrypt_packed(ctx: ts.Context, vector: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Encrypt a flat vector into wire form: uint8 (chunks, 2, N, coeff_bytes)."""
    codec = codec_for(ctx)
    enc = encrypt_vector(ctx, vector)
    coeffs = np.stack([codec.to_raw(c) for c in enc.chunks])
    return codec.pack(coeffs)


def decrypt_packed(
    ctx: ts.Context, packed: NDArray[np.uint8], num_values: int
) -> NDArray[np.float64]:
    """Decrypt wire-form ciphertexts with the banks' secret context."""
    if not ctx.is_private():
        raise CryptoError("decryption needs the secret context")
    codec = codec_for(ctx)
    if packed.ndim != 4 or packed.shape[0] != num_chunks(num_values, codec.slots):
        raise CiphertextError(
            f"{packed.shape[0] if packed.ndim else 0} ciphertexts for {num_values} values"
        )
    coeffs = codec.unpack(packed)
    slots = codec.slots
    chunks = [
        codec.to_tenseal(coeffs[i], min(slots, num_values - i * slots))
        for i in range(coeffs.shape[0])
    ]
    return decrypt_vector(ctx, chunks, num_values)


def sum_raw(codec: CKKSCodec, arrays: Sequence[NDArray[np.uint64]]) -> NDArray[np.uint64]:
    """Add ciphertexts given as coefficient arrays: ``sum mod q``, reducing only when due."""
    if not arrays:
        raise ValueError("nothing to add")
    acc = np.array(arrays[0], dtype=np.uint64, copy=True)
    pending = 1
    for arr in arrays[1:]:
        if pending == codec.max_terms:
            np.remainder(acc, np.uint64(codec.q), out=acc)
            pending = 1
        np.add(acc, arr, out=acc)
        pending += 1
    np.remainder(acc, np.uint64(codec.q), out=acc)
    return acc


def encryption_expansion(params: CKKSParameters = DEFAULT_PARAMETERS, seed: int = 0) -> float:
    """Wire bytes per float32 byte of one full ciphertext in the add-only format."""
    ctx = generate_context(params)
    values = np.random.default_rng(seed).normal(scale=0.05, size=params.slots)
    return encrypt_packed(ctx, values).nbytes / (4 * params.slots)
