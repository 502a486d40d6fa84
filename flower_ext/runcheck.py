"""``flower-ext verify``: is a run's audit trail whole and consistent?

Beyond the hash chain (:func:`flower_ext.audit.verify_audit_trail`), a run's
trail must tell one story: every round that started was closed, rounds come in
order, and each round starts from the model the previous round produced (the
model hashes chain). The first problem is reported with its line number.

A resumed run (``run_resumed``, see the bank app's ``resume-from``) is one story
too: rounds the stopped server had begun after its last checkpoint are marked
``round_abandoned`` and do not count; the restart must continue from a round that
was closed, with exactly the model that round produced, and the next round must
be the one after it. So no round is counted twice and none goes missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .audit import AuditProblem, verify_audit_trail

CLOSING_EVENTS = ("round_aggregated", "round_skipped")


@dataclass
class VerifyResult:
    ok: bool
    problem: AuditProblem | None = None
    rounds_closed: int = 0
    events: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.ok:
            text = (
                f"OK: {self.events} events, {self.rounds_closed} rounds closed, hash chain intact"
            )
            return "\n".join([text, *self.notes])
        return f"FAILED at {self.problem}"


def verify_run(run_dir: str | Path) -> VerifyResult:
    """Check ``<run_dir>/audit.jsonl``; the first problem names its line."""
    path = Path(run_dir) / "audit.jsonl"
    if not path.is_file():
        return VerifyResult(False, AuditProblem(0, f"no audit trail at {path}"))
    problem = verify_audit_trail(path)
    if problem is not None:
        return VerifyResult(False, problem)

    open_round: tuple[int, int] | None = None  # (round, line of its round_start)
    last_round = 0
    last_model: str | None = None
    produced: dict[int, str | None] = {}  # closed round -> the model it produced
    ended = False
    events = 0
    notes: list[str] = []
    abandoned: set[int] = set()
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            events += 1
            event = json.loads(line)
            kind = event.get("event")
            rnd = event.get("round")
            if kind == "round_start" and event.get("phase", "train") == "train":
                if open_round is not None:
                    return _fail(number, f"round {rnd} starts before round {open_round[0]} closed")
                if rnd != last_round + 1:
                    return _fail(number, f"round {rnd} follows round {last_round}")
                sent = event.get("global_model_sha256")
                if last_model is not None and sent is not None and sent != last_model:
                    return _fail(
                        number,
                        f"round {rnd} starts from model {str(sent)[:12]}..., but round "
                        f"{last_round} produced {last_model[:12]}...",
                    )
                open_round = (int(rnd), number)
            elif kind in CLOSING_EVENTS:
                if open_round is None or rnd != open_round[0]:
                    return _fail(number, f"{kind} for round {rnd}, which was not open")
                last_model = event.get("model_sha256", last_model)
                last_round = open_round[0]
                produced[last_round] = last_model
                open_round = None
            elif kind == "round_abandoned":
                if open_round is not None and rnd == open_round[0]:
                    open_round = None
                elif rnd not in produced:
                    return _fail(number, f"round {rnd} abandoned but it never started")
                abandoned.add(int(rnd))
            elif kind == "run_resumed":
                start = int(event.get("from_round", -1))
                if open_round is not None:
                    return _fail(
                        number,
                        f"run resumed with round {open_round[0]} open and not marked abandoned",
                    )
                if start < 0 or start > last_round or (start > 0 and start not in produced):
                    return _fail(number, f"run resumed from round {start}, which never closed")
                if start > 0 and event.get("model_sha256") != produced[start]:
                    return _fail(number, f"run resumed from a model round {start} did not produce")
                dropped = [r for r in produced if r > start]
                if any(r not in abandoned for r in dropped):
                    return _fail(number, f"rounds {dropped} redone without round_abandoned")
                for r in dropped:
                    del produced[r]
                last_round = start
                last_model = produced.get(start, last_model)
                notes.append(
                    f"note: resumed after round {start}"
                    + (f" (round(s) {sorted(abandoned)} abandoned and redone)" if abandoned else "")
                )
                abandoned = set()
            elif kind == "run_end":
                ended = True
                if open_round is not None:
                    return _fail(number, f"run ended with round {open_round[0]} still open")
    if open_round is not None:
        return _fail(open_round[1], f"round {open_round[0]} was never closed (truncated trail?)")
    if not ended:
        notes.append("note: no run_end event: the run stopped early or is still going")
    return VerifyResult(True, None, len(produced), events, notes)


def _fail(line: int, message: str) -> VerifyResult:
    return VerifyResult(False, AuditProblem(line, message))
