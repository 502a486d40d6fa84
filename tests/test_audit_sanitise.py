"""AuditTrail.record writes terminal-safe text and short, one-line reasons."""

from __future__ import annotations

import json

from flower_ext.audit import (
    MAX_REASON_CHARS,
    AuditTrail,
    short_reason,
    strip_terminal_codes,
    verify_audit_trail,
)

# The shape of what Flower's Ray backend sends back when a bank's handler raises.
RAY_ERROR = (
    "client error 0: <class 'flwr.clientapp.client_app.ClientAppException'>:<'"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242, ip=10.0.0.7, actor_id=ab12)\n"
    "Traceback (most recent call last):\n"
    + '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 59, in run\n'
    "    out_message = app(message=message, context=context)\n"
    "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    * 40
    + "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: bank 2 disk full'>"
)


# What flwr 1.42's Ray backend sends (no "Traceback" header; frames straight after the actor).
RAY_TASK_ERROR = (
    "client error 2: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=15215, ip=192.0.2.2, actor_id=780d2f, "
    "repr=<flwr.simulation.ray_transport.ray_actor.ClientAppActor object at 0x7f9e>)\n"
    "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    + '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 59, in run\n'
    "    out_message = app(message=message, context=context)\n"
    "                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    * 20
    + '  File "/venv/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: injected fault in bank 1, round 2'>"
)


def test_flower_ray_error_becomes_the_exception_it_carries():
    assert short_reason(RAY_TASK_ERROR) == (
        "client error 2: ClientAppException: injected fault in bank 1, round 2"
    )


def test_ansi_and_control_codes_are_removed_everywhere(tmp_path):
    trail = AuditTrail(tmp_path / "audit.jsonl")
    event = trail.record(
        "reply_rejected",
        label="\x1b[31mbank-1\x1b[0m",
        reason="\x1b[1mbad\x1b[0m\x07 reply\r",
        nested={"why\x1b[2J": ["a\x1b]0;evil title\x07b", "c\x00d"]},
    )
    assert event["label"] == "bank-1"
    assert event["reason"] == "bad reply"
    assert event["nested"] == {"why": ["ab", "cd"]}
    line = (tmp_path / "audit.jsonl").read_text()
    assert "\\u001b" not in line and "\x1b" not in line and "\\u0007" not in line
    assert verify_audit_trail(tmp_path / "audit.jsonl") is None


def test_a_ray_traceback_becomes_one_short_line_and_is_kept_in_full(tmp_path):
    assert len(RAY_ERROR) > 2500
    trail = AuditTrail(tmp_path / "audit.jsonl")
    event = trail.record("reply_rejected", round=1, node_id=7, label="bank-2", reason=RAY_ERROR)
    reason = event["reason"]
    assert len(reason) <= MAX_REASON_CHARS and "\n" not in reason
    assert reason.startswith("client error 0:")
    assert "bank 2 disk full" in reason  # the exception the traceback ends with
    assert "File " not in reason and "^^^" not in reason
    written = json.loads((tmp_path / "audit.jsonl").read_text())
    assert written["reason"] == reason and written["label"] == "bank-2"
    details = (tmp_path / "audit-details.log").read_text()
    assert "seq 0 reply_rejected reason" in details and "ray_actor.py" in details
    assert "\x1b" not in details


def test_long_reasons_are_capped_with_an_ellipsis_short_ones_kept():
    trail = AuditTrail()
    long = trail.record("x", reason="r" * 1000, error="e " * 400)
    assert len(long["reason"]) == MAX_REASON_CHARS and long["reason"].endswith("…")
    assert len(long["error"]) <= MAX_REASON_CHARS and long["error"].endswith("…")
    short = trail.record("x", reason="update has 3 NaN values", other="y" * 1000)
    assert short["reason"] == "update has 3 NaN values"
    assert short["other"] == "y" * 1000  # only reasons are capped


def test_helpers():
    assert strip_terminal_codes("a\tb\nc\x1b[0K\x9b1m") == "a\tb\nc"
    assert short_reason("  two\n lines \n") == "two lines"
    assert short_reason('Traceback (most recent call last):\n  File "x"\nValueError: v') == (
        "ValueError: v"
    )
