"""Synthetic 8x8 "images" of four classes, the same on every machine (fixed seeds).

Each class has a fixed random prototype; a sample is ``signal * prototype + noise``. The
noise keeps one round from solving the task for the CNN, whose accuracy climbs over all three
rounds (0.27, 0.45, 0.65, 0.75 with FedAvg); the logistic regression is near its ceiling (about
0.92) after round 1.
Clients get different sample counts so that FedAvg's weighting by ``num-examples`` matters,
but the same number of 32-sample batches (BatchNorm's ``num_batches_tracked`` then grows by
the same integer on every client).
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 4
IMAGE_SIDE = 8
NUM_FEATURES = IMAGE_SIDE * IMAGE_SIDE
#: Samples per client (partition id -> count): 10 batches of 32 each, different weights.
CLIENT_SIZES = (300, 310, 320)
TEST_SIZE = 600
CLIENT_EVAL_SIZE = 100
PROTOTYPE_SEED = 20240612
SIGNAL = 0.35
NOISE = 1.0


def _prototypes() -> np.ndarray:
    rng = np.random.default_rng(PROTOTYPE_SEED)
    return rng.normal(size=(NUM_CLASSES, IMAGE_SIDE, IMAGE_SIDE))


def _sample(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=num)
    images = SIGNAL * _prototypes()[labels] + NOISE * rng.normal(size=(num, IMAGE_SIDE, IMAGE_SIDE))
    return images.astype(np.float32), labels.astype(np.int64)


def client_data(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 8, 8)`` float32 and labels ``(n,)`` int64 of one client."""
    if not 0 <= partition_id < len(CLIENT_SIZES):
        raise ValueError(f"partition-id must be in [0, {len(CLIENT_SIZES)}), got {partition_id}")
    return _sample(CLIENT_SIZES[partition_id], seed=1000 + partition_id)


def client_eval_data(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's own held-out split (what its ``@app.evaluate`` handler scores)."""
    client_data(partition_id)  # same partition-id check
    return _sample(CLIENT_EVAL_SIZE, seed=2000 + partition_id)


def held_out_data() -> tuple[np.ndarray, np.ndarray]:
    """The server's held-out set (centralized evaluation)."""
    return _sample(TEST_SIZE, seed=999)
