"""CKKS kernels and key ceremony: parameters, keygen files, packing, sums, refusals."""

from __future__ import annotations

import stat
from dataclasses import replace

import numpy as np
import pytest
import tenseal as ts

from flower_ext.cli import main as cli_main
from flower_ext.crypto import (
    DEFAULT_PARAMETERS,
    PUBLIC_FILE,
    SECRET_FILE,
    CiphertextError,
    CKKSCodec,
    CKKSParameters,
    CryptoError,
    PrivateContextError,
    add_encrypted,
    codec_for,
    context_fingerprint,
    decrypt_packed,
    decrypt_vector,
    encrypt_packed,
    encrypt_vector,
    encryption_expansion,
    generate_context,
    load_ciphertexts,
    load_public_context,
    load_secret_context,
    public_copy,
    sum_raw,
)

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    assert cli_main(["keygen", str(folder)]) == 0
    return folder


def test_default_parameters_are_128_bit_and_under_8x_expansion():
    DEFAULT_PARAMETERS.check()
    assert sum(DEFAULT_PARAMETERS.coeff_mod_bit_sizes) <= 109  # N=4096 at 128-bit
    assert DEFAULT_PARAMETERS.slots == 2048
    assert encryption_expansion() <= 8.0
    with pytest.raises(CryptoError, match="128-bit"):
        CKKSParameters(coeff_mod_bit_sizes=(60, 60)).check()
    with pytest.raises(CryptoError, match="scale_bits"):
        replace(DEFAULT_PARAMETERS, scale_bits=50).check()


def test_keygen_writes_owner_only_files_and_refuses_to_overwrite(keys, capsys):
    for name in (SECRET_FILE, PUBLIC_FILE, "keys.txt"):
        mode = stat.S_IMODE((keys / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    before = (keys / SECRET_FILE).read_bytes()
    assert cli_main(["keygen", str(keys)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (keys / SECRET_FILE).read_bytes() == before


def test_keygen_force_replaces_keys(tmp_path):
    assert cli_main(["keygen", str(tmp_path)]) == 0
    old = context_fingerprint(load_public_context(tmp_path / PUBLIC_FILE))
    assert cli_main(["keygen", str(tmp_path), "--force", "--scale-bits", "30"]) == 0
    new_ctx = load_public_context(tmp_path / PUBLIC_FILE)
    assert context_fingerprint(new_ctx) != old
    assert new_ctx.global_scale == 2.0**30
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600


def test_public_file_has_no_secret_key_and_same_fingerprint(keys):
    public = load_public_context(keys / PUBLIC_FILE)
    secret = load_secret_context(keys / SECRET_FILE)
    assert not public.is_private() and not public.has_secret_key()
    assert secret.is_private()
    assert context_fingerprint(public) == context_fingerprint(secret)
    with pytest.raises(PrivateContextError, match="secret key"):
        load_public_context(keys / SECRET_FILE)
    with pytest.raises(CryptoError, match="cannot decrypt"):
        load_secret_context(keys / PUBLIC_FILE)
    with pytest.raises(CryptoError, match="does not exist"):
        load_public_context(keys / "missing.ckks")


def test_encrypted_weighted_sum_equals_plaintext_weighted_mean(keys):
    secret = load_secret_context(keys / SECRET_FILE)
    public = load_public_context(keys / PUBLIC_FILE)
    dim = 5000  # three ciphertexts, the last one partly filled
    updates = [RNG.normal(scale=0.05, size=dim) for _ in range(4)]
    weights = np.array([1200.0, 300.0, 4000.0, 950.0])
    packed = [encrypt_packed(secret, w * u) for u, w in zip(updates, weights, strict=True)]
    server = codec_for(public)  # the server's codec: public context only
    summed = server.pack(sum_raw(server, [server.unpack(p) for p in packed]))
    assert summed.shape == (3, 2, 4096, 7)
    mean = decrypt_packed(secret, summed, dim) / weights.sum()
    expected = np.average(np.stack(updates), axis=0, weights=weights)
    rel = np.linalg.norm(mean - expected) / np.linalg.norm(expected)
    assert rel < 1e-6, rel


def test_realistic_size_one_million_values_roundtrip(keys):
    """One 1M-value update (489 ciphertexts): size and precision at real scale."""
    secret = load_secret_context(keys / SECRET_FILE)
    values = RNG.normal(scale=0.02, size=1_000_000) * 1500.0
    packed = encrypt_packed(secret, values)
    assert packed.shape == (489, 2, 4096, 7)
    assert packed.nbytes / (4 * values.size) <= 7.02  # 7.0x, plus the last chunk's free slots
    back = decrypt_packed(secret, packed, values.size)
    assert np.linalg.norm(back - values) / np.linalg.norm(values) < 1e-6


def test_ciphertexts_under_other_parameters_or_malformed_are_refused(keys):
    public = load_public_context(keys / PUBLIC_FILE)
    other_n = generate_context(CKKSParameters(poly_modulus_degree=8192))
    bytes_8192 = encrypt_vector(other_n, np.ones(10)).chunks
    with pytest.raises(CiphertextError, match="does not parse"):
        load_ciphertexts(public, bytes_8192, 10)
    other_scale = generate_context(replace(DEFAULT_PARAMETERS, scale_bits=30))
    with pytest.raises(CiphertextError, match="scale"):
        load_ciphertexts(public, encrypt_vector(other_scale, np.ones(10)).chunks, 10)
    good = encrypt_vector(load_secret_context(keys / SECRET_FILE), np.ones(10)).chunks[0]
    for bad in (good[: len(good) // 2], b"", b"not a ciphertext" * 10):
        with pytest.raises(CiphertextError, match=r"does not parse|holds 0 values"):
            load_ciphertexts(public, [bad], 10)
    with pytest.raises(CiphertextError, match="holds 10 values"):
        load_ciphertexts(public, [good], 12)
    with pytest.raises(CiphertextError, match="ciphertexts for"):
        load_ciphertexts(public, [good, good], 10)


def test_raw_sum_is_bit_identical_to_tenseal_addition(keys):
    """The server's NumPy kernel adds exactly as SEAL's Evaluator::add does."""
    secret = load_secret_context(keys / SECRET_FILE)
    public = load_public_context(keys / PUBLIC_FILE)
    codec = codec_for(public)
    encs = [encrypt_vector(secret, RNG.normal(size=3000) * 100) for _ in range(3)]
    ref = add_encrypted([load_ciphertexts(public, e.chunks, 3000) for e in encs])
    ref_raw = np.stack([codec.to_raw(v.serialize()) for v in ref])
    ours = sum_raw(codec, [np.stack([codec.to_raw(c) for c in e.chunks]) for e in encs])
    np.testing.assert_array_equal(ours, ref_raw)
    # and back into TenSEAL: what the banks decrypt
    back = [codec.to_tenseal(ours[i], n) for i, n in enumerate((2048, 952))]
    np.testing.assert_array_equal(
        decrypt_vector(secret, back, 3000),
        decrypt_vector(secret, [v.serialize() for v in ref], 3000),
    )


def test_codec_refuses_bad_arrays_and_deeper_contexts(keys):
    codec = codec_for(load_public_context(keys / PUBLIC_FILE))
    good = encrypt_packed(load_secret_context(keys / SECRET_FILE), np.ones(10))
    assert codec.unpack(good).shape == (1, 2, 4096)
    with pytest.raises(CiphertextError, match="expected uint8"):
        codec.unpack(good[:, :, :2048])
    with pytest.raises(CiphertextError, match="expected uint8"):
        codec.unpack(good.astype(np.int16))
    bad = good.copy()
    bad[0, 1, 7] = 0xFF  # 2^56 - 1 > q
    with pytest.raises(CiphertextError, match="exceed the modulus"):
        codec.unpack(bad)
    with pytest.raises(CryptoError, match="exactly one"):
        CKKSCodec(generate_context(CKKSParameters(8192, (60, 40, 60), 40)))


def test_public_copy_cannot_decrypt():
    ctx = generate_context()
    pub = public_copy(ctx)
    vec = ts.ckks_vector(ctx, [1.0, 2.0])
    with pytest.raises(CryptoError, match="secret"):
        decrypt_vector(pub, [vec.serialize()], 2)


def test_overwritten_key_files_become_owner_only_whatever_their_old_mode(tmp_path):
    from flower_ext.crypto import write_keys, write_private_file

    for name in (SECRET_FILE, PUBLIC_FILE, "keys.txt"):
        (tmp_path / name).write_bytes(b"old")
        (tmp_path / name).chmod(0o644)
    write_keys(tmp_path, overwrite=True)
    for name in (SECRET_FILE, PUBLIC_FILE, "keys.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert load_secret_context(tmp_path / SECRET_FILE).is_private()
    target = tmp_path / "other.bin"
    target.write_bytes(b"x")
    target.chmod(0o666)
    write_private_file(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_max_abs_sum_is_the_documented_range():
    from flower_ext.crypto import max_abs_sum

    ctx = generate_context()
    assert max_abs_sum(ctx) == DEFAULT_PARAMETERS.max_abs_value == 2.0**21
