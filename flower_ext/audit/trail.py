"""An append-only, hash-chained audit trail: one JSON object per line.

Every event carries ``seq`` (0, 1, 2, ...), a UTC timestamp, the event name and
its fields, plus ``prev`` (the chain value of the previous line) and ``chain``
(SHA-256 of ``prev`` and this line's canonical JSON). Editing, dropping or
reordering any line breaks the chain from that line on, which
:func:`verify_audit_trail` reports with the first bad line number. The chain
alone detects accidental or careless tampering only: whoever can rewrite the
whole file can recompute it. An :class:`AuditTrail` given a ``signer``
(:mod:`flower_ext.audit.signing`) therefore also writes ``audit_key`` (the
server's Ed25519 public key, which the banks receive in their configs) and,
at every round and at the end, ``head_signed``: a signature of the chain value
of the line before it, which commits to every line up to there. The banks'
receipts (:mod:`flower_ext.audit.receipts`) hold those signed heads too;
:mod:`flower_ext.audit.verify` checks all of it.

Text written into the trail is sanitised in one place, :meth:`AuditTrail.record`,
so every writer benefits: terminal escape sequences (ANSI colours) and control
characters are removed from every string, and a ``reason`` or ``error`` field is
one line of at most :data:`MAX_REASON_CHARS` characters (a Python or Ray traceback
is cut to the exception it ends with). Where a reason had to be shortened, its
full text goes to ``audit-details.log`` next to ``audit.jsonl`` (not chained: a
debugging aid, not evidence).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .signing import Signer

GENESIS = "0" * 64

#: Longest ``reason`` / ``error`` text an audit event keeps (longer ones end in "…").
MAX_REASON_CHARS = 300
#: Field names whose text is a reason: one line, capped at MAX_REASON_CHARS.
REASON_FIELDS = frozenset({"reason", "error"})

_LOG = logging.getLogger(__name__)
# ANSI/VT100 escape sequences: CSI (colours, cursor moves), OSC (titles, links) and
# the two-character ones; then whatever control characters remain.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[@-Z\\-_]"  # two-character escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRACEBACK = "Traceback (most recent call last)"
_FRAME = re.compile(r'^[ \t]*File "[^"\n]*", line \d+', re.MULTILINE)  # [ \t]: linear time
# Flower's runtimes wrap an error as "<class 'X'>:<'str(X)'>"; Ray's text starts with the
# actor call "ray::Actor.method() (pid=..., ip=..., actor_id=..., repr=<...>)".
_FLOWER_WRAPPER = re.compile(r"<class '[^'\n]*'>:<'")
_RAY_ACTOR_LINE = re.compile(r"ray::\S+\(\)[^\n]*")
_CARET_LINE = re.compile(r"^[ \t]*[\^~]+[ \t]*$", re.MULTILINE)  # Python 3.11 markers
_DOTTED_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)+([A-Z]\w*:)")
# Flower's ClientAppException repeats its own name around the original message.
_CLIENTAPP_NOISE = re.compile(
    r"ClientAppException:\s*Exception ClientAppException occurred\. Message:"
)


def strip_terminal_codes(text: str) -> str:
    """``text`` without terminal escape sequences and control characters.

    Newlines and tabs are kept (they are harmless in JSON); everything else below
    0x20, DEL and the C1 range is dropped, so an audit line printed in a terminal
    cannot recolour, move the cursor, retitle the window or hide text.
    """
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def _exception_tail(text: str) -> str:
    """The last exception of a traceback: the lines after its last ``File`` frame."""
    lines = text.splitlines()
    last_frame = max(
        (i for i, line in enumerate(lines) if line.lstrip().startswith('File "')), default=-1
    )
    tail = []
    for line in lines[last_frame + 1 :]:
        # Skip the frame's source line(s) (indented) and caret markers.
        if line.startswith((" ", "\t")) and not tail:
            continue
        tail.append(line.strip())
    return " ".join(t for t in tail if t)


_MAX_SCANNED = 32 * 1024


def short_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """One line of at most ``limit`` characters saying why, from any error text.

    Terminal codes go; a traceback (Python's, or Ray's around it) is replaced by
    the exception it ends with, after what preceded it (e.g. "client error 0:");
    whitespace runs become one space; a longer result is cut and ends in "…".
    """
    # A bank's error text can be megabytes: keep the start and the end (where the
    # exception is) so every regex below runs on a bounded string.
    text = str(text)
    if len(text) > 2 * _MAX_SCANNED:
        text = text[:_MAX_SCANNED] + "\n" + text[-_MAX_SCANNED:]
    clean = strip_terminal_codes(text)
    frame = _FRAME.search(clean)
    if _TRACEBACK in clean or frame is not None:
        cut = min(
            clean.index(_TRACEBACK) if _TRACEBACK in clean else len(clean),
            frame.start() if frame is not None else len(clean),
        )
        head = _CARET_LINE.sub("", _RAY_ACTOR_LINE.sub("", clean[:cut]))
        wrapped = _FLOWER_WRAPPER.search(head) is not None
        head = _FLOWER_WRAPPER.sub("", head)
        tail = _DOTTED_EXCEPTION.sub(r"\1", _exception_tail(clean))
        tail = _CLIENTAPP_NOISE.sub("ClientAppException:", tail)
        if wrapped and tail.endswith("'>"):
            tail = tail[:-2]
        clean = f"{head.strip()} {tail}"
    clean = " ".join(clean.split())
    if len(clean) > limit:
        clean = clean[: limit - 1].rstrip() + "…"
    return clean


def _sanitise(value: Any, key: str = "") -> Any:
    """JSON-safe and terminal-safe: NaN/inf become null, numpy scalars Python, text clean."""
    if isinstance(value, str):
        return short_reason(value) if key in REASON_FIELDS else strip_terminal_codes(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {
            strip_terminal_codes(str(k)): _sanitise(v, strip_terminal_codes(str(k)))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_sanitise(v, key) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _sanitise(value.item(), key)
    return value


def _jsonable(value: Any) -> Any:
    """Make ``value`` JSON-safe and terminal-safe (see :func:`_sanitise`)."""
    return _sanitise(value)


def _shortened(fields: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, str]:
    """Top-level reason fields whose written text lost more than terminal codes."""
    out = {}
    for key in REASON_FIELDS & fields.keys():
        original = fields[key]
        if isinstance(original, str) and body.get(key) != " ".join(
            strip_terminal_codes(original).split()
        ):
            out[key] = strip_terminal_codes(original)
    return out


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

    def __init__(self, path: str | Path | None = None, signer: Signer | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.signer = signer
        self.events: list[dict[str, Any]] = []
        self._prev = GENESIS
        self._seq = 0
        self._last_signed: dict[str, Any] | None = None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                # Continue an existing chain (e.g. a resumed run).
                for _, event in read_trail(self.path):
                    self._prev = event["chain"]
                    self._seq = event["seq"] + 1

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it (with its chain values).

        Every string is stripped of terminal escapes and control characters;
        ``reason`` and ``error`` become one line of at most
        :data:`MAX_REASON_CHARS` characters (see :func:`short_reason`), their
        full text kept in ``audit-details.log`` when it was shortened.
        """
        with self._lock:
            body: dict[str, Any] = {
                "seq": self._seq,
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                + f".{int((time.time() % 1) * 1000):03d}Z",
                "event": strip_terminal_codes(str(event)),
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
            self._keep_details(body, _shortened(fields, body))
            return body

    # ------------------------------------------------------------------ signing
    def announce_key(self, public_key_file: str | Path | None = None) -> dict[str, Any] | None:
        """Record ``audit_key`` (the signer's public key) and write it as a PEM file.

        Call it right after ``run_start`` / ``run_resumed``. The file defaults to
        ``audit-public-key.pem`` beside the trail; it is a convenience, not the
        anchor: the banks receive the key in their configs and keep it in their
        receipts. A no-op without a signer.
        """
        if self.signer is None:
            return None
        from .signing import PUBLIC_KEY_FILE, write_public_key

        if public_key_file is None and self.path is not None:
            public_key_file = self.path.with_name(PUBLIC_KEY_FILE)
        if public_key_file is not None:
            write_public_key(public_key_file, self.signer.public_hex)
        return self.record(
            "audit_key",
            algorithm="ed25519",
            public_key=self.signer.public_hex,
            fingerprint=self.signer.fingerprint,
        )

    def sign_head(self, **fields: Any) -> dict[str, Any] | None:
        """Sign the current chain head (``head_signed``); ``None`` without a signer.

        The signature covers :func:`~flower_ext.audit.signing.head_message` of the
        last line's ``seq`` and ``chain``, so it vouches for every line up to it.
        """
        if self.signer is None:
            return None
        from .signing import head_message

        with self._lock:
            seq, head = self._seq - 1, self._prev
        if seq < 0:
            return None
        signature = self.signer.sign(head_message(seq, head))
        event = self.record(
            "head_signed",
            **fields,
            signed_seq=seq,
            head=head,
            key=self.signer.fingerprint,
            signature=signature,
        )
        self._last_signed = {"seq": seq, "head": head, "signature": signature}
        return event

    def seal_file(self, path: str | Path, event: str = "report_written") -> dict[str, Any] | None:
        """Record the SHA-256 of a file the run wrote (``report.html``), then sign the head.

        ``verify`` then accepts exactly that file. A no-op without a signer or file.
        """
        path = Path(path)
        if self.signer is None or not path.is_file():
            return None
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.record(event, file=path.name, sha256=digest)
        return self.sign_head(final=True)

    def published(self) -> dict[str, str | int]:
        """What the banks receive in their configs: the key and the last signed head.

        Keys ``audit-public-key``, ``audit-head-seq``, ``audit-head`` and
        ``audit-head-signature`` (see :mod:`flower_ext.audit.receipts`); empty
        without a signer.
        """
        if self.signer is None:
            return {}
        out: dict[str, str | int] = {"audit-public-key": self.signer.public_hex}
        if self._last_signed is not None:
            out["audit-head-seq"] = int(self._last_signed["seq"])
            out["audit-head"] = str(self._last_signed["head"])
            out["audit-head-signature"] = str(self._last_signed["signature"])
        return out

    @property
    def details_path(self) -> Path | None:
        """``audit-details.log`` beside the trail: full texts of shortened reasons."""
        return self.path.with_name("audit-details.log") if self.path is not None else None

    def _keep_details(self, body: Mapping[str, Any], full: Mapping[str, str]) -> None:
        for key, text in full.items():
            _LOG.debug("audit seq %s %s %s in full: %s", body["seq"], body["event"], key, text)
            if self.details_path is not None:
                with self.details_path.open("a", encoding="utf-8") as fh:
                    fh.write(f"--- seq {body['seq']} {body['event']} {key}\n{text.rstrip()}\n")

    def of_round(self, server_round: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("round") == server_round]


@dataclass
class AuditProblem:
    """What is wrong and where: a trail ``line`` (1-based), or another place ``where``."""

    line: int
    message: str
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where or f'line {self.line}'}: {self.message}"


class TrailError(ValueError):
    """A line of a JSON-lines file that is not a JSON object (or not UTF-8)."""

    def __init__(self, problem: AuditProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def parse_lines(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of JSON-lines ``data``.

    Raises :class:`TrailError` naming the first line that is not UTF-8, not JSON
    or not a JSON object, so a damaged file gives "line N: ...", never a traceback.
    Blank lines, ``\\r\\n`` line ends, a UTF-8 byte-order mark and whitespace inside a
    line are formatting.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")  # an editor's BOM changes no meaning
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TrailError(AuditProblem(number, f"not UTF-8 text ({err.reason})")) from None
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError as err:  # JSONDecodeError, or an integer past Python's digit limit
            why = err.msg if isinstance(err, json.JSONDecodeError) else str(err)[:80]
            raise TrailError(AuditProblem(number, f"not valid JSON ({why})")) from None
        except RecursionError:
            raise TrailError(AuditProblem(number, "not valid JSON (nested too deep)")) from None
        if not isinstance(event, dict):
            raise TrailError(
                AuditProblem(number, f"not a JSON object (a JSON {type(event).__name__})")
            )
        yield number, event


def read_trail(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Every event of ``path`` with its line number (:class:`TrailError` if damaged)."""
    return list(parse_lines(Path(path).read_bytes()))


def iter_audit(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    yield from read_trail(path)


def check_chain(events: list[tuple[int, dict[str, Any]]]) -> AuditProblem | None:
    """The first line whose ``seq``, ``prev`` or ``chain`` is wrong, or ``None``."""
    prev = GENESIS
    for expected_seq, (number, event) in enumerate(events):
        if event.get("seq") != expected_seq:
            return AuditProblem(
                number, f"sequence number {event.get('seq')!r}, expected {expected_seq}"
            )
        if event.get("prev") != prev:
            return AuditProblem(number, "does not follow the previous line (prev mismatch)")
        body = {k: v for k, v in event.items() if k != "chain"}
        try:
            value = chain_value(prev, body)
        except ValueError:  # NaN/Infinity, which the writer never emits
            return AuditProblem(number, "holds a number the trail never writes (NaN/Infinity)")
        if value != event.get("chain"):
            return AuditProblem(number, "content was altered (chain hash mismatch)")
        prev = str(event["chain"])
    return None


def verify_audit_trail(path: str | Path) -> AuditProblem | None:
    """Check the chain of ``path``; return the first problem, or ``None`` if intact.

    This is the chain alone; :func:`flower_ext.audit.verify.verify_run` checks a
    whole run (signatures, completeness, the files people read, bank receipts).
    """
    try:
        events = read_trail(path)
    except TrailError as err:
        return err.problem
    return check_chain(events)
