"""Encrypted aggregation in the bank app: run config ``he = true``.

Keys, in a deployment: one party (a bank, or the banks' consortium) runs
``flower-ext keygen keys/``; every bank gets ``bank-secret.ckks`` and points its
SuperNode at it (``--node-config "he-secret-context='/keys/bank-secret.ckks'"``);
the server gets only ``server-public.ckks`` (run config ``he-public-context``).

Keys, in simulation: with both paths empty the server generates a throwaway key
set for the run in :func:`flower_ext.crypto.simulation_key_dir` (owner-only),
and the simulated banks find it there by run id; it is deleted when the server
process exits. Or set ``he-secret-context``
and ``he-public-context`` in the run config to files from ``flower-ext keygen``.

Only a simulation may generate keys: in a deployment (any Grid but Flower's
in-memory simulation grid) a server without ``he-public-context`` refuses to
start, because a server that generated the key set would hold the banks' secret key.

Range: run config ``he-weight-scale`` (default 1.0) is the public factor the
banks multiply ``num-examples`` by before encrypting; lower it for banks with
millions of rows (see :class:`flower_ext.strategies.EncryptedFedAvg`). Too small a
scale is refused too (the server at start, a bank whose update would sink into the
CKKS noise every round).

Threat model: HE keeps the updates from an honest-but-curious server. Against a
server that may send a bank another bank's ciphertext as "the global model" and read
its clear metrics, each bank pins the base and one model per round (``HEMod.pin``);
to send no metric of a decrypted model at all, a bank sets node config
``he-clear-metrics=false`` (no federated evaluation from it), or the federation runs
DP on the updates (README, "What HE protects, and what it does not").
"""

from __future__ import annotations

import atexit
import math
import shutil
from collections.abc import Mapping
from dataclasses import replace
from logging import WARNING
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log

from flower_ext.crypto import PUBLIC_FILE, CryptoError, simulation_key_dir, write_keys
from flower_ext.mods.he import ENABLED_KEY, PUBLIC_CONTEXT_KEY, TOPK_RATIO_KEY
from flower_ext.strategies import EncryptedFedAvg, UpdateAggregationStrategy

from .settings import BankAppSettings, SettingsError


def he_enabled(cfg: Mapping[str, object]) -> bool:
    value = cfg.get(ENABLED_KEY, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


WEIGHT_SCALE_RUN_KEY = "he-weight-scale"


def is_simulation(grid: Grid | None) -> bool:
    """Whether ``grid`` is Flower's in-memory simulation grid (every simulation path uses it)."""
    from flwr.superlink.grid import InMemoryGrid

    seen = 0
    while grid is not None and seen < 5:  # wrappers (the app's metering grid) keep theirs
        if isinstance(grid, InMemoryGrid):
            return True
        grid = getattr(grid, "grid", None) or getattr(grid, "_grid", None)
        seen += 1
    return False


def prepare_keys(
    settings: BankAppSettings, run_id: int, grid: Grid | None = None
) -> BankAppSettings:
    """With HE on and no ``he-public-context``: a throwaway key set, in simulation only.

    In a deployment the server never generates keys (it would hold the banks'
    secret key): without ``he-public-context`` it refuses with how to make them.
    """
    if not he_enabled(settings.raw) or str(settings.raw.get(PUBLIC_CONTEXT_KEY, "") or ""):
        return settings
    if not is_simulation(grid):
        raise SettingsError(
            "he = true needs run config he-public-context in a deployment: the server never "
            "generates keys itself (it would then hold the banks' secret key). One bank or "
            "the banks' consortium runs `flower-ext keygen keys/`, gives every bank "
            "keys/bank-secret.ckks (node config he-secret-context, and he = true) and the "
            "server only keys/server-public.ckks (--run-config "
            "\"he-public-context='/path/server-public.ckks'\")"
        )
    folder = simulation_key_dir(run_id)
    public = folder / PUBLIC_FILE
    if not public.is_file():
        write_keys(folder)
        # Throwaway keys: gone when this process ends (the simulated banks end first).
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    log(
        WARNING,
        "[bank-risk] he = true with no he-public-context: generated a key set for this "
        "SIMULATION in %s. In a deployment run `flower-ext keygen`, give the banks "
        "bank-secret.ckks and the server server-public.ckks.",
        folder,
    )
    return replace(settings, raw={**settings.raw, PUBLIC_CONTEXT_KEY: str(public)})


def build_encrypted_strategy(
    settings: BankAppSettings, name: str, common: dict[str, Any]
) -> UpdateAggregationStrategy:
    """``EncryptedFedAvg``, or a clear refusal for combinations that cannot work."""
    if name != "fedavg":
        raise SettingsError(
            f"he = true cannot be combined with aggregation = '{name}': robust rules compare "
            "the banks' plaintext updates, which an encrypting server never sees; use "
            "aggregation = 'fedavg' (or he = false)"
        )
    ratio = float(settings.raw.get(TOPK_RATIO_KEY, 0.0) or 0.0)  # type: ignore[arg-type]
    if ratio > 0:
        raise SettingsError(
            f"he = true cannot be combined with topk-ratio = {ratio}: each bank would send "
            "a different set of coordinates, and ciphertexts can only be added position by "
            "position (set topk-ratio = 0 or he = false)"
        )
    path = str(settings.raw.get(PUBLIC_CONTEXT_KEY, "") or "")
    if not path:
        raise SettingsError(
            "he = true needs run config he-public-context (server-public.ckks from "
            "`flower-ext keygen`)"
        )
    scale = settings.raw.get(WEIGHT_SCALE_RUN_KEY, 1.0)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise SettingsError(
            f"{WEIGHT_SCALE_RUN_KEY} must be a positive number (e.g. 1e-3 for banks with "
            f"millions of rows), got {scale!r}"
        )
    try:
        return EncryptedFedAvg(**common, context=path, weight_scale=float(scale))
    except (CryptoError, ValueError) as err:
        raise SettingsError(f"encrypted aggregation: {err}") from err
