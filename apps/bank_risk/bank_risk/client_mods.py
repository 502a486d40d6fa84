"""The ClientApp mods the bank app runs, outermost first.

Flower applies ``ClientApp(mods=[a, b])`` as ``a(b(handler))``: ``a`` sees the
reply last. The order follows the client side of a round (DESIGN.md): the
handler trains and replies with full weights; an attack (test federations
only) rewrites the update; compression sparsifies what will be sent;
encryption, outermost, sees exactly what leaves the bank. Each mod is a no-op
unless the run config turns it on.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import Mod

from flower_ext.mods.attack import AttackMod
from flower_ext.mods.dp import UpdateDPMod
from flower_ext.mods.he import he_mod
from flower_ext.mods.topk import topk_mod
from flower_ext.records import ArrayLayout


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


#: Attack simulation (run config ``attack``, ``malicious-banks``); a no-op by default.
bank_attack_mod = AttackMod(colluder_updates=colluder_updates)

#: Update-level DP (run config ``dp = "update"``); innermost, so attack, compression and
#: encryption only ever see the noised update. The standardisation buffers are not trained.
bank_update_dp_mod = UpdateDPMod(frozen_keys=("feature_mean", "feature_std"))

#: Encryption (run config ``he``), outermost: decrypts what arrives first, encrypts what leaves.
#: Top-k compression (run config ``topk-ratio`` > 0; the server's train config wins), between
#: the attack (an attacker's update is compressed like any other) and encryption.
BANK_MODS: list[Mod] = [he_mod, topk_mod, bank_attack_mod, bank_update_dp_mod]
