"""The ClientApp mods the bank app runs, outermost first.

Flower applies ``ClientApp(mods=[a, b])`` as ``a(b(handler))``: ``a`` sees the
reply last. The order follows the client side of a round (DESIGN.md): the
handler trains and replies with full weights; an attack (test federations
only) rewrites the update; compression sparsifies what will be sent;
encryption, outermost, sees exactly what leaves the bank. Each mod is a no-op
unless the run config turns it on. Innermost, next to the handler, a test-only
fault switch (``fault-banks``, ``fault-kind``) makes chosen banks raise, stall or
reply NaN, so the tests can check that the server audits such banks and goes on.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from flower_ext.mods.attack import AttackMod, node_index
from flower_ext.mods.dp import UpdateDPMod
from flower_ext.mods.he import he_mod
from flower_ext.mods.receipt import receipt_mod
from flower_ext.mods.topk import topk_mod
from flower_ext.records import ArrayLayout, as_c_array
from flower_ext.secagg.mod import SecAggMod

from .settings import FaultInjection


def colluder_updates(msg: Message, context: Context, banks: list[int]) -> list[np.ndarray]:
    """ALIE/IPM in simulation: the honest updates of the other malicious ``banks``.

    Colluding attackers pool their honest updates (see ``flower_ext.attacks``).
    In simulation every bank's data is reachable, so each attacker runs the app's
    own train handler for its colluders, from the same global model with the same
    seeds: what those banks compute honestly this round, bit for bit.
    """
    from .client_app import train  # the handler; imported late (client_app imports us)

    sent = next(iter(msg.content.array_records.values()))
    layout = ArrayLayout.of(sent)
    global_flat = layout.flatten(sent, dtype=np.float64)
    updates = []
    for bank in banks:
        peer = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={"bank-index": bank},
            state=RecordDict(),
            run_config=context.run_config,
        )
        reply = train(msg, peer)
        local = next(iter(reply.content.array_records.values()))
        updates.append(layout.flatten(local, dtype=np.float64) - global_flat)
    return updates


class InjectedFault(RuntimeError):
    """Raised by :func:`bank_fault_mod` for ``fault-kind = "raise"`` (tests only)."""


def _all_nan(arrays: ArrayRecord) -> ArrayRecord:
    """The same keys, shapes and float dtypes, every value NaN (integer buffers kept)."""
    out = ArrayRecord()
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            values = np.full_like(values, np.nan)
        out[key] = Array(as_c_array(values))
    return out


def bank_fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Test-only faults in the banks listed by run config ``fault-banks`` (train only).

    ``fault-kind = "raise"`` raises :class:`InjectedFault` in place of training (a
    crashing bank), ``"sleep"`` stalls ``fault-sleep`` seconds first (a slow bank),
    ``"nan"`` trains and then replaces every weight with NaN (a broken bank). It sits
    innermost, next to the train handler, so the other mods see what a faulty
    handler would give them. A no-op unless both ``fault-banks`` and ``fault-kind``
    are set; a bad value is refused (the server's settings check names it first).
    """
    fault = FaultInjection.from_config(context.run_config)
    if fault is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    index = node_index(context)
    if index is None or index not in fault.banks:
        return call_next(msg, context)
    server_round = msg.content["config"].get("server-round", "?")  # type: ignore[union-attr]
    if fault.kind == "raise":
        raise InjectedFault(
            f"injected fault (fault-kind=raise) in bank {index}, round {server_round}"
        )
    if fault.kind == "sleep":
        time.sleep(fault.sleep_seconds)
        return call_next(msg, context)
    reply = call_next(msg, context)  # "nan"
    if reply.has_error() or not reply.has_content():
        return reply
    for key, arrays in list(reply.content.array_records.items()):
        reply.content[key] = _all_nan(arrays)
    return reply


#: Attack simulation (run config ``attack``, ``malicious-banks``); a no-op by default.
bank_attack_mod = AttackMod(colluder_updates=colluder_updates)

#: Update-level DP (run config ``dp = "update"``); innermost, so attack, compression and
#: encryption only ever see the noised update. The standardisation buffers are not trained.
bank_update_dp_mod = UpdateDPMod(frozen_keys=("feature_mean", "feature_std"))

#: Secure aggregation (run config ``secagg``); under ``secagg-dp`` the standardisation
#: buffers are sent as exactly 0, without noise (they are not trained).
bank_secagg_mod = SecAggMod(dp_frozen_keys=("feature_mean", "feature_std"))

#: Receipts (node config ``receipt-dir``; in simulation always), outermost of all: the bank's
#: signed record of exactly what arrived and what left (flower_ext.audit.receipts).
#: Secure aggregation (run config ``secagg``; acts only on SecureFedAvg's messages), next:
#: what leaves the bank is public keys, encrypted shares and one masked vector.
#: Encryption (run config ``he``), next: decrypts what arrives first, encrypts what leaves.
#: Top-k compression (run config ``topk-ratio`` > 0; the server's train config wins), between
#: the attack (an attacker's update is compressed like any other) and encryption.
#: Fault injection (run config ``fault-*``, tests only), innermost: it stands in for the handler.
BANK_MODS: list[Mod] = [
    receipt_mod,
    bank_secagg_mod,
    he_mod,
    topk_mod,
    bank_attack_mod,
    bank_update_dp_mod,
    bank_fault_mod,
]
