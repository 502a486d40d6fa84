"""Fast checks of the signed trail, the bank receipt log and receipt_mod (no Ray)."""

from __future__ import annotations

import json

import numpy as np
from conftest import arrays_of, outgoing, reply
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from flower_ext.audit import (
    AuditTrail,
    ReceiptLog,
    Signer,
    check_receipts,
    load_public_key,
    verify_run,
)
from flower_ext.mods.receipt import receipt_mod


def _signed_trail(tmp_path, signer):
    audit = AuditTrail(tmp_path / "audit.jsonl", signer=signer)
    audit.record("run_start")
    audit.announce_key()
    audit.sign_head(before_round=1)
    audit.record("round_start", round=1, phase="train", global_model_sha256="m0")
    audit.record("round_aggregated", round=1, model_sha256="m1")
    audit.record("run_end", rounds=1)
    audit.sign_head(final=True)
    return audit


def test_signed_trail_verifies_and_an_append_after_the_last_signature_fails(tmp_path):
    signer = Signer.generate()
    audit = _signed_trail(tmp_path, signer)
    assert load_public_key(tmp_path / "audit-public-key.pem") == signer.public_hex
    result = verify_run(tmp_path, public_keys=[signer.public_hex])
    assert result.ok and result.finished and result.fully_verified, result.summary()
    published = audit.published()
    assert published["audit-public-key"] == signer.public_hex and "audit-head" in published
    audit.record("reply_rejected", round=1, node_id=3, reason="forged")
    result = verify_run(tmp_path, public_keys=[signer.public_hex])
    assert not result.ok and "after the run ended" in result.summary()


def test_an_unfinished_signed_run_is_reported_as_such(tmp_path):
    signer = Signer.generate()
    audit = AuditTrail(tmp_path / "audit.jsonl", signer=signer)
    audit.record("run_start")
    audit.announce_key()
    audit.sign_head(before_round=1)
    audit.record("round_start", round=1, phase="train", global_model_sha256="m0")
    audit.record("round_aggregated", round=1, model_sha256="m1")
    result = verify_run(tmp_path, public_keys=[signer.public_hex])
    assert result.ok and not result.finished and not result.fully_verified
    assert any("unfinished" in w for w in result.warnings)
    assert any("not covered by any signature" in w for w in result.warnings)


def test_another_key_fails_and_a_bad_key_argument_cannot_be_read(tmp_path):
    _signed_trail(tmp_path, Signer.generate())
    result = verify_run(tmp_path, public_keys=[Signer.generate().public_hex])
    assert not result.ok and result.exit_code == 1 and "not the run's key" in result.summary()
    assert verify_run(tmp_path, public_keys=[str(tmp_path / "nope.pem")]).exit_code == 2


def test_receipt_log_is_chained_and_signed_by_the_bank(tmp_path):
    log = ReceiptLog(tmp_path / "bank")
    for rnd in (1, 2):
        log.append({"run_id": 5, "phase": "train", "round": rnd, "epsilon": None})
    public, lines = check_receipts(tmp_path / "bank")
    assert public == log.signer.public_hex and [r["round"] for _, r in lines] == [1, 2]
    assert (tmp_path / "bank" / "bank-key.pem").stat().st_mode & 0o077 == 0
    path = tmp_path / "bank" / "receipts.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["round"] = 7
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        check_receipts(tmp_path / "bank")
    except ValueError as err:
        assert "line 1" in str(err)
    else:
        raise AssertionError("an edited receipt was accepted")


def test_receipt_mod_records_what_arrived_and_left_and_checks_the_head(tmp_path, as_server):
    signer = Signer.generate()
    audit = AuditTrail(tmp_path / "run" / "audit.jsonl", signer=signer)
    audit.record("run_start")
    audit.announce_key()
    audit.sign_head(before_round=1)
    msg = outgoing(arrays_of({"w": np.ones(3, dtype=np.float32)}), node_id=9)
    msg.content["config"] = ConfigRecord({"server-round": 1, **audit.published()})
    context = Context(
        run_id=5,
        node_id=9,
        node_config={"receipt-dir": str(tmp_path / "bank")},
        state=RecordDict(),
        run_config={},
    )
    sent: list[Message] = []

    def handler(m: Message, c: Context) -> Message:
        out = reply(m, arrays_of({"w": np.zeros(3, dtype=np.float32)}), {"dp-epsilon": 1.5})
        sent.append(out)
        return out

    assert msg.metadata.message_type == MessageType.TRAIN
    back = receipt_mod(msg, context, handler)
    assert back is sent[0]
    _, lines = check_receipts(tmp_path / "bank")
    receipt = lines[0][1]
    assert receipt["round"] == 1 and receipt["epsilon"] == 1.5 and receipt["phase"] == "train"
    assert receipt["server_key"] == signer.public_hex and receipt["server_head"]["valid"] is True
    assert receipt["received"]["content"] == msg.content.object_id
    assert receipt["sent"]["content"] == back.content.object_id
    assert isinstance(msg.content["arrays"], ArrayRecord)


def test_receipt_mod_is_a_no_op_without_a_receipt_dir(tmp_path, as_server):
    msg = outgoing(arrays_of({"w": np.ones(2, dtype=np.float32)}), node_id=3)
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    out = receipt_mod(msg, context, lambda m, c: reply(m, metrics={"num-examples": 1}))
    assert not out.has_error() and not list(tmp_path.iterdir())


def test_a_signing_key_written_over_a_readable_file_becomes_owner_only(tmp_path) -> None:
    import stat

    from flower_ext.audit.signing import Signer

    path = tmp_path / "audit-signing.pem"
    path.write_text("old")
    path.chmod(0o644)
    Signer.generate().write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Signer.from_file(path).public_hex


def test_a_deployment_signs_every_start_with_one_kept_key(tmp_path, monkeypatch) -> None:
    """Resumes keep the key the banks pinned: the SuperLink gets one key file."""
    from flower_ext.audit.signing import SERVER_KEY_ENV, Signer, server_signer
    from flower_ext.deploy import LocalDeployment

    dep = LocalDeployment(tmp_path / "deployment", tls=False, auth=False)
    key_path = dep.env[SERVER_KEY_ENV]
    assert key_path == str(dep.audit_key_path)
    first = Signer.load_or_create(dep.audit_key_path)
    monkeypatch.setenv(SERVER_KEY_ENV, key_path)
    assert server_signer().public_hex == first.public_hex  # a restarted server
    assert server_signer().public_hex == first.public_hex


def test_a_finished_run_cannot_be_reopened_by_an_appended_resume(tmp_path):
    """A re-chained run_resumed after a signed run_end used to clear the end and let unsigned
    lines (a redone round, a new report hash) pass; now the trail fails there."""
    signer = Signer.generate()
    audit = _signed_trail(tmp_path, signer)
    audit.record("run_resumed", from_round=1, model_sha256="m1")  # chained like any line
    result = verify_run(tmp_path, public_keys=[signer.public_hex])
    assert not result.ok and "resumed after it finished" in result.summary()


def test_final_figures_without_a_run_end_are_refused(tmp_path):
    """A trail cut before run_end cannot vouch for the final figures metrics.json shows."""
    signer = Signer.generate()
    audit = AuditTrail(tmp_path / "audit.jsonl", signer=signer)
    audit.record("run_start")
    audit.announce_key()
    audit.sign_head(before_round=1)
    audit.record("round_start", round=1, phase="train", global_model_sha256="m0")
    audit.record("round_aggregated", round=1, model_sha256="m1")
    audit.sign_head(before_round=2)
    metrics = {"status": "running", "rounds": [], "final": {"auc": 0.9111}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = verify_run(tmp_path, public_keys=[signer.public_hex])
    assert not result.ok and "no run_end to vouch" in result.summary()


def test_odd_lines_are_failures_not_tracebacks(tmp_path):
    """An event name that is not text, and an integer past Python's digit limit."""
    signer = Signer.generate()
    audit = _signed_trail(tmp_path, signer)
    path = tmp_path / "audit.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    first["event"] = [1]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "audit.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    result = verify_run(odd, public_keys=[signer.public_hex])
    assert not result.ok
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "audit.jsonl").write_text('{"event": "run_start", "x": ' + "9" * 5000 + "}\n")
    result = verify_run(huge, public_keys=[signer.public_hex])
    assert not result.ok and "not valid JSON" in result.summary()
    assert audit is not None


def test_a_byte_order_mark_is_formatting(tmp_path):
    signer = Signer.generate()
    _signed_trail(tmp_path, signer)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = verify_run(tmp_path, public_keys=[signer.public_hex])
    assert result.ok, result.summary()
