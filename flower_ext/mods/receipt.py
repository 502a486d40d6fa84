"""``receipt_mod``: the bank keeps a signed receipt of every message it answers.

Put it outermost (``ClientApp(mods=[receipt_mod, ...])``) so it hashes exactly
what arrived from the server and exactly what leaves the bank. Each receipt
(see :mod:`flower_ext.audit.receipts`) holds the round, the hash of the global
model and of the config received, the hash of the reply sent, the bank's
epsilon (``dp-epsilon`` of the reply, when DP is on), and the server's signed
chain head with whether its signature checked out against the server key the
bank pinned at its first message of the run.

Where the receipts go (node config):

- ``receipt-dir``: a directory on the bank's own disk (a deployment sets it);
- ``receipt-key``: the bank's Ed25519 private key (PEM); default
  ``<receipt-dir>/bank-key.pem``, created on first use;
- in simulation (node config ``partition-id``) without ``receipt-dir``:
  ``<output-dir>/bank-side/run-<run id>/bank-<partition id>/`` (run config
  ``output-dir``), one key per simulated bank.

Without a ``receipt-dir`` outside simulation the mod does nothing (and says so
once). A receipt that cannot be written is logged and never breaks the reply:
the bank's training does not depend on its bookkeeping.
"""

from __future__ import annotations

import os
from logging import WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from ..audit.receipts import ReceiptLog, content_digest, published_head, reply_digest
from ..audit.signing import head_message, verify_signature

RECEIPT_DIR_KEY = "receipt-dir"
RECEIPT_KEY_KEY = "receipt-key"
PHASES = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate", MessageType.QUERY: "query"}
DEFAULT_OUTPUT_DIR = "~/flower-ext-runs"


def receipt_dir(context: Context) -> Path | None:
    """Where this node's receipts go, or ``None`` (no ``receipt-dir``, not simulated)."""
    node = context.node_config
    if RECEIPT_DIR_KEY in node and str(node[RECEIPT_DIR_KEY]).strip():
        return Path(str(node[RECEIPT_DIR_KEY])).expanduser()
    if "partition-id" in node:
        base = str(context.run_config.get("output-dir", "") or DEFAULT_OUTPUT_DIR)
        return (
            Path(os.path.expanduser(base)).resolve()
            / "bank-side"
            / f"run-{int(context.run_id)}"
            / f"bank-{int(node['partition-id'])}"  # type: ignore[call-overload]
        )
    return None


def _label(reply: Message) -> str:
    if reply.has_error() or not reply.has_content():
        return ""
    info = reply.content.get("client-info")
    return str(info.get("bank", "")) if isinstance(info, ConfigRecord) else ""


def _epsilon(reply: Message) -> float | None:
    if reply.has_error() or not reply.has_content():
        return None
    for record in reply.content.metric_records.values():
        value = record.get("dp-epsilon")
        if isinstance(value, (int, float)):
            return float(value)
    return None


class ReceiptMod:
    """The mod; :data:`receipt_mod` is the ready instance."""

    def __init__(self) -> None:
        self._warned = False

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        phase = PHASES.get(msg.metadata.message_type)
        directory = receipt_dir(context) if phase is not None else None
        if directory is None:
            if phase is not None and not self._warned:
                self._warned = True
                log(WARNING, "receipt_mod: no node config 'receipt-dir': no receipts kept")
            return call_next(msg, context)
        received = content_digest(msg.content)
        config = msg.content.get("config")
        config = config if isinstance(config, ConfigRecord) else ConfigRecord()
        reply = call_next(msg, context)
        try:
            self._write(directory, context, msg, phase, received, config, reply)
        except Exception as err:  # bookkeeping never breaks the bank's reply
            log(WARNING, "receipt_mod: could not write a receipt in %s: %s", directory, err)
        return reply

    def _write(self, directory, context, msg, phase, received, config, reply) -> None:  # type: ignore[no-untyped-def]
        key_path = context.node_config.get(RECEIPT_KEY_KEY)
        receipts = ReceiptLog(directory, Path(str(key_path)).expanduser() if key_path else None)
        run_id = int(context.run_id)
        server_key, head = published_head(config)
        pinned = receipts.pinned_server_key(run_id) or server_key
        if head is not None:
            head["valid"] = bool(pinned) and verify_signature(
                str(pinned), head_message(int(head["seq"]), str(head["head"])), head["signature"]
            )
            if not head["valid"]:
                log(WARNING, "receipt_mod: the server's signed chain head does not verify")
        if server_key and pinned and server_key != pinned:
            log(WARNING, "receipt_mod: the server key changed during run %s", run_id)
        receipts.append(
            {
                "run_id": run_id,
                "node_id": int(context.node_id),
                "bank": _label(reply),
                "phase": phase,
                "round": int(config.get("server-round", 0)),  # type: ignore[arg-type]
                "received": received,
                **{("error" if reply.has_error() else "sent"): reply_digest(reply)},
                "epsilon": _epsilon(reply),
                "server_key": server_key,
                "server_head": head,
            }
        )


#: Add outermost: ``ClientApp(mods=[receipt_mod, ...])``.
receipt_mod = ReceiptMod()
