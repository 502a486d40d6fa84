"""``flower-ext verify``: does a run directory tell one true story?

:func:`verify_run` checks, in this order, and stops at the first problem:

1. **readable**: the run directory and ``audit.jsonl`` exist and can be read
   (otherwise the result is *unreadable*, exit 2); a run directory whose
   trail is gone or empty is *tampered* (exit 1);
2. **chain**: every line is a JSON object, ``seq``/``prev``/``chain`` link up
   (re-serialising a line with other whitespace or key order changes nothing);
3. **story**: rounds start in order, every started round closes, each round
   starts from the model the previous one produced, resumes redo abandoned
   rounds only, nothing but signatures and the report's hash follows ``run_end``;
4. **signatures**: every ``head_signed`` verifies, with the key given
   (``--public-key``), else the key the banks pinned (``--receipts``), else the
   key the trail announces (which checks integrity only against someone who did
   not replace that key: said in the result); a finished run is signed to its
   last line, so appended lines are caught;
5. **completeness**: a finished run has ``run_end`` with every planned round;
   an unfinished one is reported as such;
6. **receipts**: each bank receipt matches the trail's ``messages`` (hashes of
   model, config and reply), the server's chain heads the banks hold are still
   in the trail, epsilons agree, and every reply the trail claims has a receipt;
7. **files people read**: ``metrics.json`` (status, config, every round's model
   hash, evaluation, bytes and clients, final figures, per-bank table),
   ``checkpoint.npz`` (round, the final model and its hash) and ``report.html``
   (the exact file the run wrote, its hash signed) agree with the trail.

What each step could and could not establish is listed in the result
(:attr:`VerifyResult.checked`, :attr:`VerifyResult.warnings`,
:attr:`VerifyResult.unchecked`), and :func:`audit_banner_html` puts it in the report.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .receipts import check_receipts, find_receipt_dirs
from .signing import (
    PUBLIC_KEY_FILE,
    SigningKeyError,
    fingerprint,
    head_message,
    load_public_key,
    verify_signature,
)
from .trail import AuditProblem, TrailError, check_chain, parse_lines

CLOSING_EVENTS = ("round_aggregated", "round_skipped")
#: run_end's own fields (chain bookkeeping, and those checked on their own); every other
#: field is a final figure that metrics.json must repeat exactly.
RUN_END_OWN_KEYS = frozenset(
    {"event", "seq", "ts", "prev", "chain", "rounds", "final", "model_sha256", "run_id"}
)

#: What may follow ``run_end`` (or ``run_failed``) in an honest trail.
AFTER_END = frozenset({"head_signed", "report_written", "run_resumed"})


@dataclass
class VerifyResult:
    """The outcome: ``ok`` (nothing tampered or inconsistent), and what that covers."""

    ok: bool
    problem: AuditProblem | None = None
    rounds_closed: int = 0
    events: int = 0
    notes: list[str] = field(default_factory=list)
    #: What was verified, one line each.
    checked: list[str] = field(default_factory=list)
    #: What weakens the verdict (unsigned trail or lines, unfinished run, uncovered files).
    warnings: list[str] = field(default_factory=list)
    #: What this check could not reach (bank receipts not given, where the key came from).
    unchecked: list[str] = field(default_factory=list)
    finished: bool = False
    readable: bool = True

    @property
    def exit_code(self) -> int:
        """0 verified, 1 tampered or inconsistent, 2 cannot read."""
        return 2 if not self.readable else (0 if self.ok else 1)

    @property
    def fully_verified(self) -> bool:
        """Verified with nothing weakening it (signed, finished, all files covered)."""
        return self.ok and self.finished and not self.warnings

    def summary(self) -> str:
        if not self.readable:
            return f"CANNOT READ {self.problem}"
        if not self.ok:
            return f"FAILED at {self.problem}"
        head = f"OK: {self.events} events, {self.rounds_closed} rounds closed, hash chain intact"
        lines = [head]
        lines += [f"  verified: {c}" for c in self.checked]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines += [f"  not verified: {u}" for u in self.unchecked]
        return "\n".join([*lines, *self.notes])


class _Stop(Exception):
    def __init__(self, problem: AuditProblem, readable: bool = True) -> None:
        super().__init__(str(problem))
        self.problem = problem
        self.readable = readable


def _fail(line: int, message: str, where: str = "") -> _Stop:
    return _Stop(AuditProblem(line, message, where))


def _first_difference(mine: object, theirs: object, path: str = "") -> tuple[str, object, object]:
    """Where two JSON values first differ: (dotted path, mine, theirs)."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        for key in sorted(set(mine) | set(theirs), key=str):
            if mine.get(key) != theirs.get(key):
                return _first_difference(mine.get(key), theirs.get(key), f"{path}.{key}")
    return path, mine, theirs


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class _Story:
    """What the trail says, collected while checking that it hangs together."""

    events: list[tuple[int, dict[str, Any]]]
    produced: dict[int, str | None] = field(default_factory=dict)
    last_round: int = 0
    round_end: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    per_round: dict[int, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    run_end: tuple[int, dict[str, Any]] | None = None
    run_failed: tuple[int, dict[str, Any]] | None = None
    config: dict[str, Any] | None = None
    run_ids: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def _story(events: list[tuple[int, dict[str, Any]]]) -> _Story:
    """Rounds in order, each closed, models chained, resumes honest (raises _Stop)."""
    story = _Story(events)
    open_round: tuple[int, int] | None = None  # (round, line of its round_start)
    last_model: str | None = None
    abandoned: set[int] = set()
    ended_at: int | None = None
    for number, event in events:
        kind = event.get("event")
        rnd = event.get("round")
        if not isinstance(kind, str):
            raise _fail(number, f"the event name is not text ({type(kind).__name__})")
        if ended_at is not None and kind not in AFTER_END:
            raise _fail(number, f"{kind} after the run ended (line {ended_at}): appended?")
        if kind == "run_resumed" and story.run_end is not None:
            # Only a failed or killed run resumes; reopening a finished one would let
            # unsigned lines replace its signed end.
            raise _fail(number, f"run resumed after it finished (run_end at line {ended_at})")
        if kind in ("run_start", "run_resumed"):
            if isinstance(event.get("config"), dict):
                story.config = event["config"]
            if isinstance(event.get("run_id"), int):
                story.run_ids.add(event["run_id"])
        if isinstance(rnd, int) and kind not in ("round_abandoned",):
            story.per_round.setdefault(rnd, []).append((number, event))
        if kind == "round_start" and event.get("phase", "train") == "train":
            if open_round is not None:
                raise _fail(number, f"round {rnd} starts before round {open_round[0]} closed")
            if rnd != story.last_round + 1:
                raise _fail(number, f"round {rnd} follows round {story.last_round}")
            sent = event.get("global_model_sha256")
            if last_model is not None and sent is not None and sent != last_model:
                raise _fail(
                    number,
                    f"round {rnd} starts from model {str(sent)[:12]}..., but round "
                    f"{story.last_round} produced {last_model[:12]}...",
                )
            open_round = (int(rnd), number)
            story.per_round[int(rnd)] = [(number, event)]  # a redone round starts afresh
            story.round_end.pop(int(rnd), None)
        elif kind in CLOSING_EVENTS:
            if open_round is None or rnd != open_round[0]:
                raise _fail(number, f"{kind} for round {rnd}, which was not open")
            last_model = event.get("model_sha256", last_model)
            story.last_round = open_round[0]
            story.produced[story.last_round] = last_model
            open_round = None
        elif kind == "round_end" and isinstance(rnd, int):
            story.round_end[rnd] = (number, event)
        elif kind == "round_abandoned":
            if open_round is not None and rnd == open_round[0]:
                open_round = None
            elif rnd not in story.produced:
                raise _fail(number, f"round {rnd} abandoned but it never started")
            abandoned.add(int(rnd))
        elif kind == "run_resumed":
            ended_at = None
            story.run_end = story.run_failed = None
            start = event.get("from_round", -1)
            start = start if isinstance(start, int) else -1
            if open_round is not None:
                raise _fail(
                    number, f"run resumed with round {open_round[0]} open and not marked abandoned"
                )
            if start < 0 or start > story.last_round or (start > 0 and start not in story.produced):
                raise _fail(number, f"run resumed from round {start}, which never closed")
            if start > 0 and event.get("model_sha256") != story.produced[start]:
                raise _fail(number, f"run resumed from a model round {start} did not produce")
            dropped = [r for r in story.produced if r > start]
            if any(r not in abandoned for r in dropped):
                raise _fail(number, f"rounds {dropped} redone without round_abandoned")
            for r in dropped:
                del story.produced[r]
                story.round_end.pop(r, None)
            story.last_round = start
            last_model = story.produced.get(start, last_model)
            story.notes.append(
                f"note: resumed after round {start}"
                + (f" (round(s) {sorted(abandoned)} abandoned and redone)" if abandoned else "")
            )
            abandoned = set()
        elif kind == "run_end":
            if open_round is not None:
                raise _fail(number, f"run ended with round {open_round[0]} still open")
            story.run_end, ended_at = (number, event), number
        elif kind == "run_failed":
            story.run_failed, ended_at = (number, event), number
    if open_round is not None:
        raise _fail(open_round[1], f"round {open_round[0]} was never closed (truncated trail?)")
    return story


class _Verifier:
    def __init__(
        self,
        run: Path,
        public_keys: Sequence[str | Path],
        receipts: Sequence[str | Path],
        check_report: bool,
    ) -> None:
        self.run = run
        self.public_keys = list(public_keys)
        self.receipt_roots = [Path(r) for r in receipts]
        self.check_report = check_report
        self.result = VerifyResult(True)

    # -------------------------------------------------------------- helpers
    def _unreadable(self, where: str, message: str) -> _Stop:
        return _Stop(AuditProblem(0, message, where), readable=False)

    def _read_bytes(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise self._unreadable(path.name, f"cannot read ({err.strerror or err})") from None

    # -------------------------------------------------------------- steps
    def run_all(self) -> VerifyResult:
        try:
            self._verify()
        except _Stop as stop:
            self.result.ok = False
            self.result.readable = stop.readable
            self.result.problem = stop.problem
        return self.result

    def _verify(self) -> None:
        run, res = self.run, self.result
        if not run.is_dir():
            raise self._unreadable(str(run), "no such run directory")
        path = run / "audit.jsonl"
        if not path.is_file():
            if (run / "metrics.json").is_file():
                raise _fail(0, "no audit trail: this run's audit.jsonl is gone", "audit.jsonl")
            raise self._unreadable(
                str(run), "not a run directory (no audit.jsonl, no metrics.json)"
            )
        try:
            events = list(parse_lines(self._read_bytes(path)))
        except TrailError as err:
            raise _Stop(err.problem) from None
        if not events:
            raise _fail(1, "the audit trail is empty (every run writes its run_start first)")
        problem = check_chain(events)
        if problem is not None:
            raise _Stop(problem)
        res.events = len(events)
        res.checked.append(f"hash chain: {len(events)} events, each linked to the one before")
        story = _story(events)
        res.rounds_closed = len(story.produced)
        res.notes.extend(story.notes)
        receipts = self._load_receipts(story)
        self._signatures(story, receipts)
        self._completeness(story)
        if receipts:
            self._cross_check(story, receipts)
        else:
            res.unchecked.append(
                "bank receipts (none given): a server that signed false records from the "
                "start is caught only by them (--receipts DIR)"
            )
        self._metrics(story)
        self._checkpoint(story)
        if self.check_report:
            self._report(story)

    # -------------------------------------------------------------- receipts
    def _load_receipts(self, story: _Story) -> list[tuple[str, int, dict[str, Any]]]:
        """``(directory, line, receipt)`` of this run's receipts (bank signatures checked)."""
        out: list[tuple[str, int, dict[str, Any]]] = []
        self.bank_keys: dict[str, str] = {}  # receipt dir -> pinned server key
        for root in self.receipt_roots:
            if not root.is_dir():
                raise self._unreadable(str(root), "no such receipts directory")
            dirs = find_receipt_dirs(root)
            if not dirs:
                raise self._unreadable(str(root), "holds no receipts.jsonl")
            for directory in dirs:
                try:
                    _, lines = check_receipts(directory)
                except TrailError as err:
                    raise _Stop(err.problem) from None
                except (OSError, SigningKeyError) as err:
                    raise self._unreadable(str(directory), str(err)) from None
                ours = [(n, r) for n, r in lines if r.get("run_id") in story.run_ids]
                if not ours:
                    seen = sorted({str(r.get("run_id")) for _, r in lines})
                    raise _fail(
                        0,
                        f"no receipt belongs to this run (the trail's run ids: "
                        f"{sorted(story.run_ids)}; the receipts': {', '.join(seen)})",
                        str(directory),
                    )
                for number, receipt in ours:
                    if receipt.get("server_key") and str(directory) not in self.bank_keys:
                        self.bank_keys[str(directory)] = str(receipt["server_key"])
                    out.append((str(directory), number, receipt))
        return out

    # -------------------------------------------------------------- signatures
    def _signatures(self, story: _Story, receipts: list) -> None:  # type: ignore[type-arg]
        res = self.result
        anchors: dict[str, str] = {}  # fingerprint -> hex
        for value in self.public_keys:
            try:
                key = load_public_key(value)
            except SigningKeyError as err:
                raise self._unreadable("--public-key", str(err)) from None
            anchors[fingerprint(key)] = key
        source = "given with --public-key" if anchors else ""
        for directory, key in self.bank_keys.items():
            if anchors and fingerprint(key) not in anchors:
                raise _fail(
                    0,
                    f"the bank pinned server key {fingerprint(key)}, not the key given "
                    f"({', '.join(anchors)})",
                    directory,
                )
            anchors.setdefault(fingerprint(key), key)
            source = source or "pinned by the banks in their receipts"
        announced = [(n, e) for n, e in story.events if e.get("event") == "audit_key"]
        signed = [(n, e) for n, e in story.events if e.get("event") == "head_signed"]
        if not announced and not signed:
            if anchors:
                raise _fail(
                    story.events[-1][0],
                    "the trail carries no signature, but the run's public key is known "
                    "(signatures removed?)",
                )
            res.warnings.append("signatures: the trail is not signed (no audit_key)")
            return
        keys = dict(anchors)
        for number, event in announced:
            key = str(event.get("public_key", ""))
            if anchors and fingerprint_or_none(key) not in anchors:
                raise _fail(number, f"announces a key ({_short(key)}) that is not the run's key")
            if not anchors and fingerprint_or_none(key) is not None:
                keys.setdefault(fingerprint(key), key)
        if not anchors:
            self._check_key_file(announced)
            source = "announced in the trail itself"
            res.unchecked.append(
                "where the server key came from: it was read from the run directory, which "
                "its writer could replace; pass --public-key (the key the banks received) "
                "or --receipts to anchor it"
            )
        by_line = {n: e for n, e in story.events}
        numbers = [n for n, _ in story.events]
        for number, event in signed:
            key = keys.get(str(event.get("key")))
            if key is None:
                raise _fail(number, f"signed with key {event.get('key')!r}, not the run's key")
            seq = event.get("signed_seq")
            if not isinstance(seq, int) or seq != event.get("seq", 0) - 1:
                raise _fail(number, "signs another line than the one before it")
            if by_line[numbers[seq]].get("chain") != event.get("head"):
                raise _fail(number, "signs a chain head the trail does not have")
            if not verify_signature(
                key, head_message(seq, str(event["head"])), event.get("signature")
            ):
                raise _fail(number, "the signature does not verify")
        last = signed[-1][0] if signed else None
        tail = [n for n in numbers if last is None or n > last]
        fps = ", ".join(sorted({str(e.get("key")) for _, e in signed})) or "-"
        if tail:
            message = (
                f"lines {tail[0]}-{tail[-1]} are not covered by any signature"
                if len(tail) > 1
                else f"line {tail[0]} is not covered by any signature"
            )
            if not signed:
                raise _fail(
                    tail[0],
                    "the trail announces a signing key but carries no signature "
                    "(signatures removed?)",
                )
            if story.run_end is not None or story.run_failed is not None:
                raise _fail(tail[0], message + " (appended after the run's last signature?)")
            res.warnings.append(message + " (the run stopped before signing them)")
        res.checked.append(
            f"signatures: {len(signed)} signed chain heads by server key {fps} ({source})"
        )

    def _check_key_file(self, announced: list) -> None:  # type: ignore[type-arg]
        path = self.run / PUBLIC_KEY_FILE
        if not path.is_file():
            self.result.warnings.append(f"{PUBLIC_KEY_FILE} is missing from the run directory")
            return
        try:
            on_disk = load_public_key(path)
        except SigningKeyError as err:
            raise _fail(0, str(err), PUBLIC_KEY_FILE) from None
        if on_disk not in {str(e.get("public_key")) for _, e in announced}:
            raise _fail(0, "is not the key the trail announces", PUBLIC_KEY_FILE)

    # -------------------------------------------------------------- completeness
    def _completeness(self, story: _Story) -> None:
        res = self.result
        planned = (story.config or {}).get("num-server-rounds")
        if story.run_end is not None:
            number, event = story.run_end
            said = event.get("rounds")
            if said is not None and said != story.last_round:
                raise _fail(
                    number,
                    f"run_end says {said} rounds, but round {story.last_round} "
                    "was the last to close",
                )
            if isinstance(planned, int) and story.last_round != planned:
                raise _fail(number, f"run ended after {story.last_round} of {planned} rounds")
            res.finished = True
            res.checked.append(
                f"completeness: run finished (run_end at line {number}), "
                f"{story.last_round} of {planned if planned is not None else '?'} rounds closed"
            )
        elif story.run_failed is not None:
            number, event = story.run_failed
            res.warnings.append(
                f"the run failed (line {number}: {event.get('error', '')}) after round "
                f"{story.last_round}"
            )
        else:
            res.warnings.append(
                f"the run is unfinished: no run_end (last closed round {story.last_round}"
                + (f" of {planned})" if planned is not None else ")")
            )

    # -------------------------------------------------------------- cross-check
    def _cross_check(self, story: _Story, receipts: list) -> None:  # type: ignore[type-arg]
        by_seq = {e.get("seq"): (n, e) for n, e in story.events}
        exchanges: dict[tuple[int, str], list[tuple[int, dict[str, Any]]]] = {}
        for number, event in story.events:
            if event.get("event") == "messages":
                exchanges.setdefault((event.get("round"), event.get("phase")), []).append(  # type: ignore[arg-type]
                    (number, event)
                )
        he = bool((story.config or {}).get("he"))
        starts = {
            e.get("round"): e.get("global_model_sha256")
            for _, e in story.events
            if e.get("event") == "round_start" and e.get("phase", "train") == "train"
        }
        seen: set[tuple[int, str, str]] = set()
        banks: set[str] = set()
        for directory, number, receipt in receipts:
            where = f"{directory}/receipts.jsonl line {number}"
            bank = str(receipt.get("bank") or receipt.get("node_id"))
            banks.add(bank)
            head = receipt.get("server_head")
            if isinstance(head, dict):
                if head.get("valid") is not True:
                    raise _fail(
                        number, "the bank saw a server signature that did not verify", where
                    )
                line = by_seq.get(head.get("seq"))
                if line is None or line[1].get("chain") != head.get("head"):
                    raise _fail(
                        line[0] if line else story.events[-1][0],
                        f"rewritten: bank {bank} holds the server's signature of the chain head "
                        f"at seq {head.get('seq')} ({str(head.get('head'))[:12]}...), which this "
                        "trail does not have",
                    )
            phase, rnd = receipt.get("phase"), receipt.get("round")
            if phase not in ("train", "evaluate"):
                continue
            node = str(receipt.get("node_id"))
            seen.add((int(rnd), str(phase), node))  # type: ignore[arg-type]
            candidates = [
                (n, e["nodes"][node])
                for n, e in exchanges.get((rnd, phase), [])  # type: ignore[arg-type]
                if isinstance(e.get("nodes"), dict) and isinstance(e["nodes"].get(node), dict)
            ]
            if not candidates:
                raise _fail(
                    story.events[-1][0],
                    f"bank {bank} (node {node}) answered the {phase} message of round {rnd} "
                    f"({where}), but the trail has no such message (truncated or edited?)",
                )
            theirs = {
                "received": receipt.get("received"),
                "reply": receipt.get("sent") or receipt.get("error"),
            }
            if not any(
                entry.get("sent") == theirs["received"] and entry.get("reply") == theirs["reply"]
                for _, entry in candidates
            ):
                n, entry = candidates[-1]
                raise _fail(
                    n,
                    f"node {node} ({bank}), {phase} round {rnd}: the trail says sent "
                    f"{_short(entry.get('sent'))} / reply {_short(entry.get('reply'))}, the "
                    f"bank's receipt ({where}) says {_short(theirs['received'])} / "
                    f"{_short(theirs['reply'])}",
                )
            if phase == "train" and not he and rnd in starts:
                model = (receipt.get("received") or {}).get("model")
                if model != starts[rnd]:
                    raise _fail(
                        candidates[-1][0],
                        f"round {rnd}: the trail says the global model was "
                        f"{str(starts[rnd])[:12]}..., bank {bank} received {str(model)[:12]}...",
                    )
            eps = receipt.get("epsilon")
            if eps is not None and phase == "train":
                spent = self._trail_epsilon(story, int(rnd), bank)  # type: ignore[arg-type]
                if spent != eps:
                    raise _fail(
                        candidates[-1][0],
                        f"round {rnd}: bank {bank} spent epsilon {eps}, the trail says {spent}",
                    )
        nodes = {str(r.get("node_id")) for _, _, r in receipts}
        for (rnd, phase), items in sorted(exchanges.items(), key=lambda kv: str(kv[0])):
            for number, event in items:
                for node, entry in (event.get("nodes") or {}).items():
                    if node not in nodes or not isinstance(entry, dict):
                        continue
                    reply = entry.get("reply")
                    replied = isinstance(reply, dict) and "content" in reply
                    if replied and (int(rnd), str(phase), node) not in seen:
                        raise _fail(
                            number,
                            f"the trail says node {node} replied to the {phase} message of "
                            f"round {rnd}, but that bank's receipts have no such exchange",
                        )
        self.result.checked.append(
            f"bank receipts: {len(receipts)} receipts of {len(banks)} bank(s) match the trail "
            "(models, configs, replies, signed chain heads, epsilon)"
        )

    @staticmethod
    def _trail_epsilon(story: _Story, rnd: int, bank: str) -> object:
        for _, event in story.per_round.get(rnd, []):
            if event.get("event") == "privacy":
                row = (event.get("banks") or {}).get(bank)
                if isinstance(row, dict):
                    return row.get("epsilon")
        return None

    # -------------------------------------------------------------- files
    def _json_file(self, name: str) -> Any:
        data = self._read_bytes(self.run / name)
        try:
            return json.loads(data.decode("utf-8-sig"))  # a BOM is formatting
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise _fail(0, f"not valid JSON ({err})", name) from None

    def _metrics(self, story: _Story) -> None:
        path = self.run / "metrics.json"
        is_app_run = story.config is not None
        if not path.is_file():
            if is_app_run:
                raise _fail(0, "missing (the trail records an app run)", "metrics.json")
            self.result.unchecked.append("metrics.json: not in the run directory")
            return
        metrics = self._json_file("metrics.json")
        if not isinstance(metrics, dict):
            raise _fail(0, "not a JSON object", "metrics.json")

        def differ(where: str, mine: object, line: int, theirs: object) -> _Stop:
            sub, mine, theirs = _first_difference(mine, theirs)
            return _fail(
                0,
                f"{_short(mine)}, but the trail (line {line}) says {_short(theirs)}",
                f"metrics.json {where}{sub}",
            )

        if story.config is not None and metrics.get("config") != story.config:
            raise differ("config", metrics.get("config"), story.events[0][0], story.config)
        status = metrics.get("status")
        expected = "finished" if story.run_end else "failed" if story.run_failed else "running"
        if is_app_run and status != expected:
            line = (story.run_end or story.run_failed or story.events[-1])[0]
            raise differ("status", status, line, expected)
        rounds = metrics.get("rounds")
        if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
            raise _fail(0, "is not a list of objects", "metrics.json rounds")
        numbers = [r.get("round") for r in rounds]
        trail_rounds = sorted(story.round_end)
        if numbers != trail_rounds:
            raise _fail(
                0,
                f"lists rounds {numbers}, the trail closed rounds {trail_rounds}",
                "metrics.json rounds",
            )
        for i, entry in enumerate(rounds):
            line, end = story.round_end[int(entry["round"])]
            for key in ("model_sha256", "evaluate", "bytes_up", "bytes_down", "seconds"):
                if key in end and entry.get(key) != end[key]:
                    raise differ(f"rounds[{i}].{key}", entry.get(key), line, end[key])
            self._round_clients(story, i, entry)
        if story.run_end is not None:
            line, end = story.run_end
            if not isinstance(metrics.get("final") or {}, dict):
                raise _fail(0, "is not an object", "metrics.json final")
            final = dict(metrics.get("final") or {})
            if final.pop("model_sha256", None) != end.get("model_sha256"):
                raise differ(
                    "final.model_sha256",
                    (metrics.get("final") or {}).get("model_sha256"),
                    line,
                    end.get("model_sha256"),
                )
            if "final" in end and final != end["final"]:
                raise differ("final", final, line, end["final"])
            # Every final figure run_end holds (the app puts all of them there).
            for key in sorted(set(end) - RUN_END_OWN_KEYS):
                if metrics.get(key) != end[key]:
                    raise differ(key, metrics.get(key), line, end[key])
        else:
            # No run_end in the trail: final figures in metrics.json have nothing to be
            # checked against, so they must not be there (a trail cut before run_end).
            for key in ("final", "per_bank", "best_round", "verdicts"):
                if metrics.get(key):
                    raise _fail(
                        0,
                        "holds final figures, but the trail has no run_end to vouch for them "
                        "(truncated trail?)",
                        f"metrics.json {key}",
                    )
        covered = "status, config, every round's model hash, evaluation, bytes, seconds, clients"
        if story.run_end is not None:
            covered += ", final figures" + (
                ", per-bank table" if "per_bank" in story.run_end[1] else ""
            )
            if "best_round" in story.run_end[1]:
                covered += ", best round"
            self._best_model(story)
        self.result.checked.append(f"metrics.json agrees with the trail: {covered}")

    def _best_model(self, story: _Story) -> None:
        """``best_model.npz`` is the model ``run_end`` names as the best round's."""
        assert story.run_end is not None
        line, end = story.run_end
        best = end.get("best_round")
        if not isinstance(best, dict) or not best.get("model_sha256"):
            return
        name = str(best.get("file") or "best_model.npz")
        path = self.run / Path(name).name
        if not path.is_file():
            raise _fail(0, f"is missing, but run_end (line {line}) names it", name)
        try:
            from flower_ext.runlog import load_checkpoint

            sha = load_checkpoint(self.run, path.name).model_sha256
        except Exception as err:  # unreadable or tampered bytes
            raise _fail(0, f"cannot be read as a model ({type(err).__name__})", name) from None
        if sha != best["model_sha256"]:
            raise _fail(0, f"is not the best round's model named by run_end (line {line})", name)
        self.result.checked.append(
            f"{name}: round {best.get('round')}'s model, as run_end says (line {line})"
        )

    def _round_clients(self, story: _Story, i: int, entry: dict[str, Any]) -> None:
        rnd = int(entry["round"])
        events = story.per_round.get(rnd, [])
        privacy = [(n, e) for n, e in events if e.get("event") == "privacy"]
        if privacy or "privacy" in entry:
            line, event = privacy[-1] if privacy else (story.round_end[rnd][0], {})
            if entry.get("privacy") != event.get("banks"):
                raise _fail(
                    0,
                    f"{_short(entry.get('privacy'))}, but the trail (line {line}) says "
                    f"{_short(event.get('banks'))}",
                    f"metrics.json rounds[{i}].privacy",
                )
        clients = entry.get("clients")
        if not isinstance(clients, dict):
            return
        rejected = {
            str(e.get("node_id")): e.get("reason")
            for _, e in events
            if e.get("event") == "reply_rejected"
        }
        missing = [e.get("node_id") for _, e in events if e.get("event") == "client_missing"]
        aggregated = [e for _, e in events if e.get("event") == "round_aggregated"]
        line = story.round_end[rnd][0]
        checks = [("rejected", clients.get("rejected"), rejected)]
        checks.append(("missing", clients.get("missing"), missing))
        if aggregated:
            checks.append(("accepted", clients.get("accepted"), aggregated[-1].get("accepted")))
        for key, mine, theirs in checks:
            if mine != theirs:
                raise _fail(
                    0,
                    f"{_short(mine)}, but the trail (round {rnd}, up to line {line}) says "
                    f"{_short(theirs)}",
                    f"metrics.json rounds[{i}].clients.{key}",
                )

    def _checkpoint(self, story: _Story) -> None:
        path = self.run / "checkpoint.npz"
        if not path.is_file():
            if story.config is not None and story.produced:
                raise _fail(0, "missing (the trail closed rounds)", "checkpoint.npz")
            return
        import numpy as np
        from flwr.app import Array, ArrayRecord

        from ..records import arrays_sha256, as_c_array

        data = self._read_bytes(path)
        try:
            import io

            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                header = json.loads(bytes(npz["header"]).decode())
                arrays = ArrayRecord(
                    {
                        str(key): Array(as_c_array(npz[f"model_{i}"]))
                        for i, key in enumerate(header["model_keys"])
                    }
                )
        except Exception as err:  # any damage: a zip, npy or JSON error
            raise _fail(0, f"unreadable ({type(err).__name__}: {err})", "checkpoint.npz") from None
        sha = arrays_sha256(arrays)
        rnd = header.get("round") if isinstance(header, dict) else None
        if rnd != story.last_round:
            raise _fail(
                0,
                f"holds round {rnd}, the trail's last closed round is {story.last_round}",
                "checkpoint.npz",
            )
        if header.get("model_sha256") != sha:
            raise _fail(
                0,
                f"its model hashes to {sha[:12]}..., not to the hash stored with it",
                "checkpoint.npz",
            )
        expected = story.produced.get(story.last_round)
        if expected is not None and sha != expected:
            raise _fail(
                0,
                f"its model ({sha[:12]}...) is not the model round {story.last_round} produced "
                f"({str(expected)[:12]}...)",
                "checkpoint.npz",
            )
        if story.run_end is not None and story.run_end[1].get("model_sha256") not in (None, sha):
            raise _fail(0, "its model is not the final model of run_end", "checkpoint.npz")
        self.result.checked.append(
            f"checkpoint.npz: round {rnd}, its model is the trail's final model ({sha[:12]}...)"
        )

    def _report(self, story: _Story) -> None:
        path = self.run / "report.html"
        written = [(n, e) for n, e in story.events if e.get("event") == "report_written"]
        if not path.is_file():
            if written:
                raise _fail(0, f"missing (the run wrote it, line {written[-1][0]})", "report.html")
            return
        if not written:
            self.result.warnings.append(
                "report.html is not covered by the trail (no report_written): its figures are "
                "only as good as metrics.json, checked above"
            )
            return
        line, event = written[-1]
        sha = hashlib.sha256(self._read_bytes(path)).hexdigest()
        if sha != event.get("sha256"):
            raise _fail(
                0,
                f"is not the report the run wrote (its SHA-256 is in the trail at line {line}); "
                "edited, or rebuilt with flower-ext report",
                "report.html",
            )
        self.result.checked.append(f"report.html: the exact file the run wrote (line {line})")


def fingerprint_or_none(key: str) -> str | None:
    try:
        return fingerprint(key)
    except ValueError:
        return None


def verify_run(
    run_dir: str | Path,
    *,
    public_keys: Sequence[str | Path] = (),
    receipts: Sequence[str | Path] = (),
    check_report: bool = True,
) -> VerifyResult:
    """Verify a run directory (see the module docstring); never raises for bad input.

    ``public_keys``: the server key(s), as hex or PEM files (the key the banks
    received; a resumed run may have one per start). ``receipts``: bank receipt
    directories (searched recursively for ``receipts.jsonl``). ``check_report``
    is off while the report itself is being written.
    """
    return _Verifier(Path(run_dir), public_keys, receipts, check_report).run_all()


def audit_banner_html(result: VerifyResult) -> str:
    """The report's audit banner: exactly what was verified, a warning when anything was not."""

    def items(lines: list[str]) -> str:
        return "".join(f"<li>{html.escape(x)}</li>" for x in lines)

    if not result.ok:
        return (
            '<div class="banner"><b>Audit trail: NOT VERIFIED.</b> '
            f"{html.escape(result.summary())}. The figures below may not be what the run "
            "recorded.</div>"
        )
    if result.fully_verified:
        return (
            '<div class="ok"><b>Audit trail: verified, hash chain intact.</b><ul>'
            + items(result.checked)
            + "</ul>"
            + (f"Not verified here:<ul>{items(result.unchecked)}</ul>" if result.unchecked else "")
            + "</div>"
        )
    return (
        '<div class="banner" style="background:#fff4ce;border-color:#c90">'
        "<b>Audit trail: hash chain intact, but NOT everything is verified.</b>"
        f"<ul>{items(['WARNING: ' + w for w in result.warnings])}</ul>"
        f"Verified:<ul>{items(result.checked)}</ul>"
        + (f"Not verified here:<ul>{items(result.unchecked)}</ul>" if result.unchecked else "")
        + "</div>"
    )
