"""The audit trail and its verification, split along its seams.

- :mod:`~flower_ext.audit.trail`: ``audit.jsonl``, one hash-chained JSON object per
  event (:class:`AuditTrail`), text sanitising, the chain check;
- :mod:`~flower_ext.audit.signing`: Ed25519 keys (``cryptography``), the server's
  signed chain heads;
- :mod:`~flower_ext.audit.receipts`: the banks' signed receipt logs and the server's
  record of what it exchanged with each bank;
- :mod:`~flower_ext.audit.verify`: :func:`verify_run`, what ``flower-ext verify`` runs.

Every public name is importable from ``flower_ext.audit``.
"""

from .receipts import (
    BANK_KEY_FILE,
    BANK_PUBLIC_KEY_FILE,
    RECEIPTS_FILE,
    ReceiptLog,
    check_receipts,
    content_digest,
    find_receipt_dirs,
    record_exchange,
    reply_digest,
)
from .signing import (
    PUBLIC_KEY_FILE,
    SERVER_KEY_ENV,
    Signer,
    SigningKeyError,
    fingerprint,
    head_message,
    load_public_key,
    server_signer,
    verify_signature,
    write_public_key,
)
from .trail import (
    GENESIS,
    MAX_REASON_CHARS,
    REASON_FIELDS,
    AuditProblem,
    AuditTrail,
    TrailError,
    _jsonable,
    _sanitise,
    canonical_json,
    chain_value,
    check_chain,
    iter_audit,
    parse_lines,
    read_trail,
    short_reason,
    strip_terminal_codes,
    verify_audit_trail,
)
from .verify import VerifyResult, audit_banner_html, verify_run

__all__ = [
    "BANK_KEY_FILE",
    "BANK_PUBLIC_KEY_FILE",
    "GENESIS",
    "MAX_REASON_CHARS",
    "PUBLIC_KEY_FILE",
    "REASON_FIELDS",
    "RECEIPTS_FILE",
    "SERVER_KEY_ENV",
    "AuditProblem",
    "AuditTrail",
    "ReceiptLog",
    "Signer",
    "SigningKeyError",
    "TrailError",
    "VerifyResult",
    "_jsonable",
    "_sanitise",
    "audit_banner_html",
    "canonical_json",
    "chain_value",
    "check_chain",
    "check_receipts",
    "content_digest",
    "find_receipt_dirs",
    "fingerprint",
    "head_message",
    "iter_audit",
    "load_public_key",
    "parse_lines",
    "read_trail",
    "record_exchange",
    "reply_digest",
    "server_signer",
    "short_reason",
    "strip_terminal_codes",
    "verify_audit_trail",
    "verify_run",
    "verify_signature",
    "write_public_key",
]
