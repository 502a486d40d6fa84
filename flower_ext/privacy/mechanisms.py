"""Noise sources and the update-level Gaussian mechanism (clip the whole update, add noise).

See :mod:`flower_ext.privacy` for why the generators are seeded from the OS CSPRNG.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch

#: Layout of torch's CPU generator state (``get_state()``, 5056 bytes = 632 uint64 words):
#: [0] the initial seed, [1] ``left`` | ``seeded`` << 32, [2] ``next``, [3:627] the 624
#: mt19937 state words (32-bit values stored in uint64), [627:] cached normal samples.
_MT_STATE_BYTES = 5056
_MT_WORDS = slice(3, 627)
_MT_N = 624


def _mt_words(generator: torch.Generator) -> np.ndarray:
    return np.frombuffer(generator.get_state().numpy().tobytes(), dtype=np.uint64).copy()


def _check_mt_layout() -> None:
    """Raise unless torch's CPU generator state has the layout ``_fill_mt_state`` writes.

    Seeds a generator with a known 32-bit seed and compares its state words with
    NumPy's legacy MT19937 seeded the same way (the same ``init_genrand``).
    """
    probe = torch.Generator()
    probe.manual_seed(0x5EED1234)
    words = probe.get_state().numpy()
    expected = np.random.RandomState(0x5EED1234).get_state()[1].astype(np.uint64)
    if words.size != _MT_STATE_BYTES or not np.array_equal(_mt_words(probe)[_MT_WORDS], expected):
        raise RuntimeError(
            f"torch {torch.__version__}: the CPU generator state is not the expected mt19937 "
            f"layout ({_MT_STATE_BYTES} bytes, 624 state words at uint64 offsets 3..626); "
            "refusing to seed the DP noise from a 32-bit seed instead"
        )


def _fill_mt_state(generator: torch.Generator) -> None:
    """Write all 624 mt19937 state words (19,968 bits) from the OS CSPRNG, then verify."""
    _check_mt_layout()
    words = _mt_words(generator)
    fresh = np.frombuffer(secrets.token_bytes(4 * _MT_N), dtype=np.uint32).astype(np.uint64)
    if not fresh.any():  # the all-zero state is degenerate (probability 2^-19968)
        raise RuntimeError("the OS CSPRNG returned an all-zero mt19937 state")
    words[_MT_WORDS] = fresh
    generator.set_state(torch.from_numpy(words.view(np.uint8).copy()))
    if not np.array_equal(_mt_words(generator)[_MT_WORDS], fresh):
        raise RuntimeError(
            "torch's CPU generator did not keep the mt19937 state written to it; refusing "
            "to draw DP noise from a generator whose state is not the CSPRNG's"
        )


def secure_torch_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A fresh ``torch.Generator`` whose whole state comes from the OS CSPRNG.

    On the CPU (Mersenne Twister) ``manual_seed`` keeps only 32 bits of the seed, so
    a 64-bit seed could be brute-forced in 2^32 tries; instead all 624 state words
    are written from ``secrets`` and read back (a ``RuntimeError`` if torch's state
    layout ever differs: never a silent fall-back to a 32-bit seed).
    ``initial_seed()`` of the result is meaningless. Other devices (CUDA Philox)
    take a 64-bit seed from ``secrets``. Independent of the run seed and of
    torch's global generator, and different for every call.
    """
    generator = torch.Generator(device=device if device is not None else "cpu")
    if generator.device.type == "cpu":
        _fill_mt_state(generator)
    else:
        generator.manual_seed(secrets.randbits(64))
    return generator


def secure_numpy_generator() -> np.random.Generator:
    """A fresh NumPy PCG64 generator seeded with 128 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


# --------------------------------------------------------------------------- update level
class NonFiniteUpdateError(ValueError):
    """An update with NaN or infinite entries: it cannot be clipped, so it is not sent."""


def privatize_update(
    update: Sequence[np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Clip the whole update to L2 ``clip_norm``, add N(0, (sigma * clip_norm)^2) per entry.

    Raises :class:`NonFiniteUpdateError` before any noise if an entry is NaN or
    infinite (a NaN norm would make the clip factor 1: nothing clipped).
    Returns only the noised update (float32 where the input was not float): the
    norm before clipping is data and never leaves this function. ``rng``
    defaults to a fresh :func:`secure_numpy_generator`; pass one only in tests,
    since whoever can reproduce it can subtract the noise.
    """
    for i, u in enumerate(update):
        if not np.all(np.isfinite(u)):
            raise NonFiniteUpdateError(
                f"the update holds non-finite values (array {i}: "
                f"{int(np.size(u) - np.count_nonzero(np.isfinite(u)))} of {np.size(u)} entries "
                "NaN or inf); a NaN norm would disable clipping, so nothing is sent"
            )
    rng = rng if rng is not None else secure_numpy_generator()
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out = []
    for u in update:
        noised = u.astype(np.float64) * scale + rng.normal(0.0, std, size=u.shape)
        out.append(noised.astype(u.dtype if np.issubdtype(u.dtype, np.floating) else np.float32))
    return out


__all__ = [
    "NonFiniteUpdateError",
    "privatize_update",
    "secure_numpy_generator",
    "secure_torch_generator",
]
