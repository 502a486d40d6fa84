"""An append-only, hash-chained audit trail: one JSON object per line.

Every event carries ``seq`` (0, 1, 2, ...), a UTC timestamp, the event name and
its fields, plus ``prev`` (the chain value of the previous line) and ``chain``
(SHA-256 of ``prev`` and this line's canonical JSON). Editing, dropping or
reordering any line breaks the chain from that line on, which
:func:`verify_audit_trail` reports with the first bad line number. The chain
detects accidental or careless tampering; it is not a signature (whoever can
rewrite the whole file can recompute it), so ship ``audit.jsonl`` to a
write-once store where the threat model demands it.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _jsonable(value: Any) -> Any:
    """Make ``value`` JSON-safe: NaN/inf become null, numpy scalars become Python."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _jsonable(value.item())
    return value


def canonical_json(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def chain_value(prev: str, body: Mapping[str, Any]) -> str:
    return hashlib.sha256((prev + canonical_json(body)).encode()).hexdigest()


class AuditTrail:
    """Writes ``audit.jsonl`` events; safe to share between threads.

    Parameters
    ----------
    path : str | Path | None
        File to append to. ``None`` keeps events in memory only (tests, or a
        strategy used without an audit file); :attr:`events` holds them either way.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.events: list[dict[str, Any]] = []
        self._prev = GENESIS
        self._seq = 0
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                # Continue an existing chain (e.g. a resumed run).
                for line in self.path.read_text().splitlines():
                    if line.strip():
                        event = json.loads(line)
                        self._prev = event["chain"]
                        self._seq = event["seq"] + 1

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it (with its chain values)."""
        with self._lock:
            body: dict[str, Any] = {
                "seq": self._seq,
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                + f".{int((time.time() % 1) * 1000):03d}Z",
                "event": event,
                **_jsonable(fields),
                "prev": self._prev,
            }
            body["chain"] = chain_value(self._prev, body)
            self._prev = body["chain"]
            self._seq += 1
            self.events.append(body)
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(canonical_json(body) + "\n")
            return body

    def of_round(self, server_round: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("round") == server_round]


@dataclass
class AuditProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def iter_audit(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, json.loads(line)


def verify_audit_trail(path: str | Path) -> AuditProblem | None:
    """Check the chain of ``path``; return the first problem, or ``None`` if intact."""
    prev = GENESIS
    expected_seq = 0
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as err:
                return AuditProblem(number, f"not valid JSON ({err.msg})")
            if event.get("seq") != expected_seq:
                return AuditProblem(
                    number, f"sequence number {event.get('seq')}, expected {expected_seq}"
                )
            if event.get("prev") != prev:
                return AuditProblem(number, "does not follow the previous line (prev mismatch)")
            body = {k: v for k, v in event.items() if k != "chain"}
            if chain_value(prev, body) != event.get("chain"):
                return AuditProblem(number, "content was altered (chain hash mismatch)")
            prev = event["chain"]
            expected_seq += 1
    return None
