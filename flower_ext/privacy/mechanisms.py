"""Noise sources and the update-level Gaussian mechanism (clip the whole update, add noise).

See :mod:`flower_ext.privacy` for why the generators are seeded from the OS CSPRNG.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch


def secure_torch_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with 64 bits from the OS CSPRNG.

    Independent of the run seed and of torch's global generator, and different
    for every call, so no other party can replay what it draws.
    """
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(secrets.randbits(64))
    return generator


def secure_numpy_generator() -> np.random.Generator:
    """A fresh NumPy PCG64 generator seeded with 128 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


# --------------------------------------------------------------------------- update level
def privatize_update(
    update: Sequence[np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Clip the whole update to L2 ``clip_norm``, add N(0, (sigma * clip_norm)^2) per entry.

    Returns only the noised update (float32 where the input was not float): the
    norm before clipping is data and never leaves this function. ``rng``
    defaults to a fresh :func:`secure_numpy_generator`; pass one only in tests,
    since whoever can reproduce it can subtract the noise.
    """
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
    "privatize_update",
    "secure_numpy_generator",
    "secure_torch_generator",
]
