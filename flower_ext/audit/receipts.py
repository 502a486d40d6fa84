"""Bank receipts: what each bank received and sent, signed by the bank, kept by the bank.

A receipt log is ``receipts.jsonl`` in a directory on the bank's own disk, with
the bank's Ed25519 key beside it (``bank-key.pem``, owner-only, and
``bank-public-key.pem``, which the bank hands to an auditor). One line per
message the bank answered (query, train, evaluate)::

    {"seq", "run_id", "node_id", "bank", "phase", "round",
     "received": {"content", "config", "model"},   # hashes of the server's message
     "sent": {"content"} | "error": {"code"},       # hash of the bank's reply
     "epsilon",                                     # the bank's DP spending, or null
     "server_key", "server_head": {"seq", "head", "signature", "valid"},
     "prev", "chain", "signature"}

``received.model`` is :func:`flower_ext.records.arrays_sha256` of the model the
server sent (the trail's ``global_model_sha256``); ``content`` and ``config``
are Flower's own content hashes (``RecordDict.object_id``), which the server
computes identically on its side and writes into its trail (``messages``
events, :func:`record_exchange`). ``server_head`` is the last chain head the
server signed before sending, checked by the bank against the server key it
pinned at the run's first message. Lines are hash-chained like the trail and
each chain value is signed with the bank's key, so the bank's log cannot be
edited by anyone else either.

Because the server cannot rewrite what the banks keep, receipts catch what a
signature alone cannot: a server that re-signs a rewritten trail with its own
key, or that signed lies from the start (a model, a config or a participation
that differs from what the bank saw).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from .signing import Signer, load_public_key, verify_signature, write_public_key
from .trail import GENESIS, AuditProblem, AuditTrail, TrailError, canonical_json, parse_lines

RECEIPTS_FILE = "receipts.jsonl"
BANK_KEY_FILE = "bank-key.pem"
BANK_PUBLIC_KEY_FILE = "bank-public-key.pem"

#: Config keys the server publishes to the banks (:meth:`AuditTrail.published`).
KEY_CONFIG = "audit-public-key"
HEAD_SEQ_CONFIG = "audit-head-seq"
HEAD_CONFIG = "audit-head"
HEAD_SIGNATURE_CONFIG = "audit-head-signature"

_RECEIPT_DOMAIN = b"flower-ext receipt v1\n"
_LOCK = threading.Lock()


def content_digest(content: RecordDict) -> dict[str, str | None]:
    """Hashes of a message's content: all of it, its ``config`` and its model.

    ``content`` and ``config`` are Flower's ``object_id`` (SHA-256 of the
    serialised records), ``model`` is :func:`~flower_ext.records.arrays_sha256`
    of the first ArrayRecord (``None`` where there is none).
    """
    from ..records import arrays_sha256

    config = content.get("config")
    arrays = next(iter(content.array_records.values()), None)
    return {
        "content": content.object_id,
        "config": config.object_id if isinstance(config, ConfigRecord) else None,
        "model": arrays_sha256(arrays) if isinstance(arrays, ArrayRecord) else None,
    }


def reply_digest(reply: Message) -> dict[str, Any]:
    """``{"content": hash}`` of a reply, or ``{"error": code}`` for an error reply."""
    if reply.has_error():
        return {"error": int(reply.error.code)}
    return {"content": reply.content.object_id}


def record_exchange(
    audit: AuditTrail,
    server_round: int,
    phase: str,
    messages: Iterable[Message],
    replies: Iterable[Message],
) -> dict[str, Any] | None:
    """Write a ``messages`` event: per node, the hashes of what was sent and replied.

    The server side of the receipts: ``verify --receipts`` matches each bank's
    receipt against it. A no-op for a trail without a signer (nobody has
    receipts to match).
    """
    if audit.signer is None:
        return None
    nodes: dict[str, dict[str, Any]] = {}
    for message in messages:
        nodes[str(int(message.metadata.dst_node_id))] = {"sent": content_digest(message.content)}
    for reply in replies:
        entry = nodes.get(str(int(reply.metadata.src_node_id)))
        if entry is not None and "reply" not in entry:
            entry["reply"] = reply_digest(reply)
    return audit.record("messages", round=server_round, phase=phase, nodes=nodes)


def receipt_chain(prev: str, body: Mapping[str, Any]) -> str:
    return hashlib.sha256((prev + canonical_json(body)).encode()).hexdigest()


def receipt_message(chain: str) -> bytes:
    """The bytes a receipt's signature covers (its chain value, so all lines before it)."""
    return _RECEIPT_DOMAIN + chain.encode()


class ReceiptLog:
    """A bank's ``receipts.jsonl`` in ``directory``, signed with the bank's key.

    ``key_path`` names the bank's Ed25519 private key (PEM); by default
    ``<directory>/bank-key.pem``, created on first use (0600), with
    ``bank-public-key.pem`` beside it.
    """

    def __init__(self, directory: str | Path, key_path: str | Path | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / RECEIPTS_FILE
        self.signer = Signer.load_or_create(key_path or self.directory / BANK_KEY_FILE)
        public = self.directory / BANK_PUBLIC_KEY_FILE
        if not public.is_file():
            write_public_key(public, self.signer.public_hex)

    def _lines(self) -> list[tuple[int, dict[str, Any]]]:
        if not self.path.is_file():
            return []
        return list(parse_lines(self.path.read_bytes()))

    def pinned_server_key(self, run_id: int) -> str | None:
        """The server key this bank saw first in run ``run_id`` (``None``: not yet)."""
        for _, line in self._lines():
            if line.get("run_id") == run_id and line.get("server_key"):
                return str(line["server_key"])
        return None

    def append(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Chain, sign and append one receipt; returns it as written."""
        from .trail import _jsonable

        with _LOCK:
            lines = self._lines()
            prev = str(lines[-1][1].get("chain", GENESIS)) if lines else GENESIS
            seq = int(lines[-1][1].get("seq", -1)) + 1 if lines else 0
            receipt = {"seq": seq, **_jsonable(dict(body)), "prev": prev}
            receipt["chain"] = receipt_chain(prev, receipt)
            receipt["signature"] = self.signer.sign(receipt_message(receipt["chain"]))
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(canonical_json(receipt) + "\n")
            return receipt


def published_head(config: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """``(server key, signed head)`` from a config the server sent (either may be None)."""
    key = config.get(KEY_CONFIG)
    head = None
    if config.get(HEAD_CONFIG) is not None:
        head = {
            "seq": config.get(HEAD_SEQ_CONFIG),
            "head": config.get(HEAD_CONFIG),
            "signature": config.get(HEAD_SIGNATURE_CONFIG),
        }
    return (str(key) if key is not None else None), head


def check_receipts(directory: Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """``(bank public key, receipts)`` of a receipt directory whose lines all check out.

    Raises :class:`TrailError` for the first line that is damaged, out of chain
    or not signed by the bank's key (``bank-public-key.pem`` beside it), and
    ``OSError`` / ``SigningKeyError`` when the files cannot be read.
    """
    public = load_public_key(directory / BANK_PUBLIC_KEY_FILE)
    lines = list(parse_lines((directory / RECEIPTS_FILE).read_bytes()))
    prev = GENESIS
    for expected, (number, receipt) in enumerate(lines):
        where = f"{directory / RECEIPTS_FILE} line {number}"
        body = {k: v for k, v in receipt.items() if k not in ("chain", "signature")}
        if receipt.get("seq") != expected or receipt.get("prev") != prev:
            raise TrailError(AuditProblem(number, "out of sequence (line dropped?)", where))
        try:
            chain = receipt_chain(prev, body)
        except ValueError:
            raise TrailError(AuditProblem(number, "holds NaN/Infinity", where)) from None
        if chain != receipt.get("chain"):
            raise TrailError(AuditProblem(number, "content was altered (chain mismatch)", where))
        if not verify_signature(public, receipt_message(chain), receipt.get("signature")):
            raise TrailError(AuditProblem(number, "not signed by the bank's key", where))
        prev = chain
    return public, lines


def find_receipt_dirs(root: Path) -> list[Path]:
    """Every directory at or below ``root`` that holds a ``receipts.jsonl``."""
    if (root / RECEIPTS_FILE).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(RECEIPTS_FILE))
