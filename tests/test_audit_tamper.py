"""A hostile operator against a real run: seeded tamperings of every kind must be caught.

The run is the session's short bank-app simulation (``simulated_run``): its trail is
signed with a per-run server key, and each simulated bank kept signed receipts under
``<output-dir>/bank-side/``. Every tampering below changes what the run says (a figure,
a round, a model, who took part, what was signed) and must be detected when the
verifier holds the server's public key, the banks' receipts, or both; formatting-only
rewrites (other whitespace, key order, line ends) must not be flagged.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flower_ext.audit import (
    GENESIS,
    PUBLIC_KEY_FILE,
    Signer,
    chain_value,
    head_message,
    load_public_key,
    verify_run,
    write_public_key,
)
from flower_ext.cli import main as cli

SEEDS = range(5)


# ---------------------------------------------------------------- evidence
@pytest.fixture(scope="module")
def evidence(simulated_run: Path, tmp_path_factory) -> dict:
    """A pristine copy of the run, its server key (as the banks pinned it) and receipts."""
    base = tmp_path_factory.mktemp("tamper")
    pristine = base / "run"
    shutil.copytree(simulated_run, pristine)
    receipts = base / "receipts"
    shutil.copytree(simulated_run.parent / "bank-side", receipts)
    key = load_public_key(pristine / PUBLIC_KEY_FILE)
    return {"run": pristine, "receipts": receipts, "key": key, "base": base}


def _copy(evidence: dict, name: str) -> tuple[Path, Path]:
    run = evidence["base"] / f"t-{name}"
    receipts = evidence["base"] / f"r-{name}"
    for src, dst in ((evidence["run"], run), (evidence["receipts"], receipts)):
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    return run, receipts


# ---------------------------------------------------------------- trail helpers
def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "audit.jsonl").read_text().splitlines() if x.strip()]


def _write(run: Path, events: list[dict]) -> None:
    text = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in events)
    (run / "audit.jsonl").write_text(text)


def _rechain(events: list[dict]) -> list[dict]:
    """What an operator without the key does: fix seq, prev and chain everywhere."""
    prev = GENESIS
    for seq, event in enumerate(events):
        event["seq"], event["prev"] = seq, prev
        event.pop("chain", None)
        event["chain"] = prev = chain_value(prev, event)
    return events


def _resign(run: Path, events: list[dict], signer: Signer) -> list[dict]:
    """What an operator with a key of its own does: rechain, re-sign, replace the key file."""
    prev = GENESIS
    for seq, event in enumerate(events):
        event["seq"], event["prev"] = seq, prev
        if event.get("event") == "audit_key":
            event.update(public_key=signer.public_hex, fingerprint=signer.fingerprint)
        if event.get("event") == "head_signed":
            event.update(
                signed_seq=seq - 1,
                head=prev,
                key=signer.fingerprint,
                signature=signer.sign(head_message(seq - 1, prev)),
            )
        event.pop("chain", None)
        event["chain"] = prev = chain_value(prev, event)
    write_public_key(run / PUBLIC_KEY_FILE, signer.public_hex)
    return events


def _pick(rng: random.Random, events: list[dict], kinds: tuple[str, ...]) -> int:
    return rng.choice([i for i, e in enumerate(events) if e.get("event") in kinds])


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _write_metrics(run: Path, metrics: dict) -> None:
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))


# ---------------------------------------------------------------- tamperings
def empty_trail(run: Path, rng: random.Random) -> None:
    (run / "audit.jsonl").write_text(rng.choice(["", "\n", "\n\n  \n"]))


def delete_trail(run: Path, rng: random.Random) -> None:
    (run / "audit.jsonl").unlink()


def truncate_at_a_signed_round(run: Path, rng: random.Random) -> None:
    events = _events(run)
    cut = _pick(rng, events[:-3], ("head_signed",))
    _write(run, events[: cut + 1])  # still ends on a valid signature


def drop_run_end(run: Path, rng: random.Random) -> None:
    events = _events(run)
    end = next(i for i, e in enumerate(events) if e["event"] == "run_end")
    _write(run, events[: end + rng.choice([0, 1])])


def drop_last_round_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    last = max(e.get("round", 0) for e in events if isinstance(e.get("round"), int))
    keep = [e for e in events if e.get("round") != last or rng.random() < 0.2]
    keep = [e for e in keep if e["event"] not in ("head_signed", "report_written")]
    _write(run, _rechain(keep))


def delete_line_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    del events[rng.randrange(1, len(events))]
    _write(run, _rechain(events))


def _numeric_paths(value, path=()):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)) and path and path[-1] not in ("seq",):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("seq", "signed_seq"):
                yield from _numeric_paths(v, (*path, k))


def _bump(event: dict, rng: random.Random) -> None:
    paths = list(_numeric_paths(event))
    path = rng.choice(paths)
    target = event
    for key in path[:-1]:
        target = target[key]
    old = target[path[-1]]
    target[path[-1]] = old + (1 if isinstance(old, int) else 0.0137)


def edit_number_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    candidates = [i for i, e in enumerate(events) if list(_numeric_paths(e))]
    _bump(events[rng.choice(candidates)], rng)
    _write(run, _rechain(events))


def edit_line_not_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    i = _pick(rng, events, ("round_end", "round_aggregated", "client_update", "run_end"))
    _bump(events[i], rng)
    _write(run, events)


def forged_append_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    events.append(
        {"event": "reply_rejected", "round": rng.randint(1, 4), "node_id": 7, "reason": "forged"}
    )
    _write(run, _rechain(events))


def forged_append_resigned(run: Path, rng: random.Random) -> None:
    events = _events(run)
    events.insert(-1, {"event": "reply_rejected", "round": 2, "node_id": 7, "reason": "forged"})
    _write(run, _resign(run, events, Signer.generate()))


def rewrite_resigned_with_own_key(run: Path, rng: random.Random) -> None:
    events = _events(run)
    _bump(events[_pick(rng, events, ("round_end", "client_update", "round_aggregated"))], rng)
    _write(run, _resign(run, events, Signer.generate()))


def swap_lines_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    i = rng.randrange(1, len(events) - 1)
    j = rng.choice([k for k in range(1, len(events)) if events[k]["event"] != events[i]["event"]])
    events[i], events[j] = events[j], events[i]
    _write(run, _rechain(events))


def forged_participant_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    i = _pick(rng, events, ("client_update",))
    fake = dict(events[i], node_id=123456789, label="bank-9-ghost")
    events.insert(i + 1, fake)
    _write(run, _rechain(events))


def strip_signatures_rechained(run: Path, rng: random.Random) -> None:
    events = [e for e in _events(run) if e["event"] not in ("head_signed", "audit_key")]
    _write(run, _rechain(events))
    if rng.random() < 0.5:
        (run / PUBLIC_KEY_FILE).unlink()


def corrupt_signature_rechained(run: Path, rng: random.Random) -> None:
    events = _events(run)
    event = events[_pick(rng, events, ("head_signed",))]
    sig = event["signature"]
    k = rng.randrange(len(sig))
    event["signature"] = sig[:k] + ("0" if sig[k] != "0" else "1") + sig[k + 1 :]
    _write(run, _rechain(events))


def non_object_line(run: Path, rng: random.Random) -> None:
    lines = (run / "audit.jsonl").read_text().splitlines()
    lines[rng.randrange(len(lines))] = rng.choice(["[1, 2]", "42", '"text"', "null", "true"])
    (run / "audit.jsonl").write_text("\n".join(lines) + "\n")


def invalid_utf8(run: Path, rng: random.Random) -> None:
    lines = (run / "audit.jsonl").read_bytes().split(b"\n")
    i = rng.randrange(len(lines) - 1)
    k = rng.randrange(max(1, len(lines[i])))
    lines[i] = lines[i][:k] + rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82"]) + lines[i][k:]
    (run / "audit.jsonl").write_bytes(b"\n".join(lines))


def metrics_final_auc(run: Path, rng: random.Random) -> None:
    metrics = _metrics(run)
    metrics["final"]["auc"] = rng.choice([0.9111, metrics["final"]["auc"] + 0.001])
    _write_metrics(run, metrics)


def metrics_round_field(run: Path, rng: random.Random) -> None:
    metrics = _metrics(run)
    entry = rng.choice(metrics["rounds"])
    key = rng.choice(["auc", "model_sha256", "bytes_up", "ks", "accepted"])
    if key in ("auc", "ks"):
        entry["evaluate"][key] = round(entry["evaluate"][key] + 0.05, 4)
    elif key == "model_sha256":
        entry[key] = hashlib.sha256(b"other").hexdigest()
    elif key == "accepted":
        entry["clients"]["accepted"] += 1
    else:
        entry[key] //= 2
    _write_metrics(run, metrics)


def metrics_drop_round(run: Path, rng: random.Random) -> None:
    metrics = _metrics(run)
    del metrics["rounds"][rng.randrange(len(metrics["rounds"]))]
    _write_metrics(run, metrics)


def metrics_status_or_config(run: Path, rng: random.Random) -> None:
    metrics = _metrics(run)
    if rng.random() < 0.5:
        metrics["status"] = rng.choice(["running", "failed"])
    else:
        metrics["config"]["num-server-rounds"] = 20
    _write_metrics(run, metrics)


def metrics_per_bank(run: Path, rng: random.Random) -> None:
    metrics = _metrics(run)
    row = metrics["per_bank"][rng.choice(sorted(metrics["per_bank"]))]
    key = rng.choice([k for k, v in row.items() if isinstance(v, float)])
    row[key] = row[key] + 0.02
    _write_metrics(run, metrics)


def _edit_checkpoint(run: Path, rng: random.Random, *, rehash: bool, round_to=None) -> None:
    from flwr.app import Array, ArrayRecord

    from flower_ext.records import arrays_sha256, as_c_array

    path = run / "checkpoint.npz"
    with np.load(path, allow_pickle=False) as data:
        payload = {k: np.array(data[k]) for k in data.files}
    header = json.loads(bytes(payload["header"]).decode())
    if round_to is not None:
        header["round"] = round_to
    else:
        names = [k for k in payload if k.startswith("model_") and payload[k].size]
        name = rng.choice(names)
        flat = payload[name].reshape(-1)
        flat[rng.randrange(flat.size)] += 0.25
        if rehash:
            arrays = ArrayRecord(
                {
                    key: Array(as_c_array(payload[f"model_{i}"]))
                    for i, key in enumerate(header["model_keys"])
                }
            )
            header["model_sha256"] = arrays_sha256(arrays)
    payload["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    path.write_bytes(buffer.getvalue())


def checkpoint_model_rehashed(run: Path, rng: random.Random) -> None:
    _edit_checkpoint(run, rng, rehash=True)


def checkpoint_model_raw(run: Path, rng: random.Random) -> None:
    _edit_checkpoint(run, rng, rehash=False)


def checkpoint_round(run: Path, rng: random.Random) -> None:
    _edit_checkpoint(run, rng, rehash=False, round_to=rng.choice([1, 2, 3]))


def report_figure(run: Path, rng: random.Random) -> None:
    page = (run / "report.html").read_text()
    numbers = [m for m in re.finditer(r"<td>0\.\d{4}</td>", page)]
    m = rng.choice(numbers)
    (run / "report.html").write_text(page[: m.start()] + "<td>0.9111</td>" + page[m.end() :])


def report_deleted_or_banner(run: Path, rng: random.Random) -> None:
    if rng.random() < 0.4:
        (run / "report.html").unlink()
    else:
        page = (run / "report.html").read_text().replace("NOT VERIFIED", "verified")
        (run / "report.html").write_text(page.replace("<td>4 of 4</td>", "<td>20 of 20</td>") + " ")


def receipts_edited(run: Path, rng: random.Random, receipts: Path) -> None:
    files = sorted(receipts.rglob("receipts.jsonl"))
    path = rng.choice(files)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    line = rng.choice(lines)
    line["round"] = line["round"] + 1
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


MEANING: dict[str, Callable] = {
    f.__name__: f
    for f in (
        empty_trail,
        delete_trail,
        truncate_at_a_signed_round,
        drop_run_end,
        drop_last_round_rechained,
        delete_line_rechained,
        edit_number_rechained,
        edit_line_not_rechained,
        forged_append_rechained,
        forged_append_resigned,
        rewrite_resigned_with_own_key,
        swap_lines_rechained,
        forged_participant_rechained,
        strip_signatures_rechained,
        corrupt_signature_rechained,
        non_object_line,
        invalid_utf8,
        metrics_final_auc,
        metrics_round_field,
        metrics_drop_round,
        metrics_status_or_config,
        metrics_per_bank,
        checkpoint_model_rehashed,
        checkpoint_model_raw,
        checkpoint_round,
        report_figure,
        report_deleted_or_banner,
    )
}


# ---------------------------------------------------------------- formatting only
def _shuffled(obj, rng):
    if isinstance(obj, dict):
        keys = list(obj)
        rng.shuffle(keys)
        return {k: _shuffled(obj[k], rng) for k in keys}
    if isinstance(obj, list):
        return [_shuffled(v, rng) for v in obj]
    return obj


def reformat_trail(run: Path, rng: random.Random) -> None:
    events = _events(run)
    sep = rng.choice([(", ", ": "), (",", ":"), (" ,  ", " :  ")])
    lines = [json.dumps(_shuffled(e, rng), separators=sep) for e in events]
    end = rng.choice(["\n", "\r\n"])
    (run / "audit.jsonl").write_text(end.join(lines) + end + rng.choice(["", "\n", end * 2]))


def reformat_metrics(run: Path, rng: random.Random) -> None:
    metrics = _shuffled(_metrics(run), rng)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=rng.choice([None, 1, 4])))


def reformat_receipts(run: Path, rng: random.Random, receipts: Path) -> None:
    for path in receipts.rglob("receipts.jsonl"):
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(_shuffled(x, rng)) + "\n\n" for x in lines))


FORMATTING: dict[str, Callable] = {
    f.__name__: f for f in (reformat_trail, reformat_metrics, reformat_receipts)
}


def _apply(kind: Callable, run: Path, receipts: Path, rng: random.Random) -> None:
    if kind.__code__.co_argcount == 3:
        kind(run, rng, receipts)
    else:
        kind(run, rng)


# ---------------------------------------------------------------- the tests
@pytest.mark.slow
def test_the_real_run_verifies_with_key_and_receipts(evidence):
    run, receipts, key = evidence["run"], evidence["receipts"], evidence["key"]
    result = verify_run(run, public_keys=[key], receipts=[receipts])
    assert result.ok and result.fully_verified, result.summary()
    text = result.summary()
    for part in ("signatures", "bank receipts", "metrics.json", "checkpoint.npz", "report.html"):
        assert part in text
    assert not result.unchecked
    alone = verify_run(run)  # no independent anchor: said so, not hidden
    assert alone.ok and any("where the server key came from" in u for u in alone.unchecked)
    assert cli(["verify", str(run), "--public-key", key, "--receipts", str(receipts)]) == 0


@pytest.mark.slow
def test_seeded_tamperings_are_all_detected(evidence):
    """>= 100 tamperings of >= 20 kinds; each caught with the key, with receipts, with both."""
    assert len(MEANING) >= 20
    missed: list[str] = []
    tried = 0
    for name, kind in [*MEANING.items(), ("receipts_edited", receipts_edited)]:
        for seed in SEEDS:
            rng = random.Random(f"{name}-{seed}")
            run, receipts = _copy(evidence, f"{name}-{seed}")
            _apply(kind, run, receipts, rng)
            tried += 1
            settings = {
                "key": {"public_keys": [evidence["key"]]},
                "receipts": {"receipts": [receipts]},
                "both": {"public_keys": [evidence["key"]], "receipts": [receipts]},
            }
            if name == "receipts_edited":  # the bank's own log: needs the receipts
                settings = {k: v for k, v in settings.items() if "receipts" in v}
            for label, kwargs in settings.items():
                result = verify_run(run, **kwargs)
                if result.ok:
                    missed.append(f"{name} seed {seed} with {label}: {result.summary()[:200]}")
                else:
                    assert result.problem is not None and "Traceback" not in result.summary()
            shutil.rmtree(run)
            shutil.rmtree(receipts)
    assert tried >= 100
    assert not missed, "\n".join(missed)


@pytest.mark.slow
def test_formatting_only_changes_are_not_flagged(evidence):
    for name, kind in FORMATTING.items():
        for seed in SEEDS:
            run, receipts = _copy(evidence, f"{name}-{seed}")
            _apply(kind, run, receipts, random.Random(f"{name}-{seed}"))
            result = verify_run(run, public_keys=[evidence["key"]], receipts=[receipts])
            assert result.ok and result.fully_verified, f"{name} {seed}: {result.summary()}"
            shutil.rmtree(run)
            shutil.rmtree(receipts)


@pytest.mark.slow
def test_a_server_that_signs_its_own_lies_is_caught_by_the_receipts_only(evidence):
    """The operator holds a signing key and rewrites everything consistently: the trail,
    metrics.json and the key file. Its own key then 'verifies' it; the banks do not."""
    run, receipts = _copy(evidence, "liar")
    liar = Signer.generate()
    events = _events(run)
    end = next(e for e in events if e["event"] == "run_end")
    end["final"]["auc"] = 0.9111
    _write(run, _resign(run, events, liar))
    metrics = _metrics(run)
    metrics["final"]["auc"] = 0.9111
    _write_metrics(run, metrics)
    (run / "report.html").unlink()
    events = [e for e in _events(run) if e["event"] != "report_written"]
    _write(run, _resign(run, events, liar))
    assert verify_run(run, public_keys=[liar.public_hex]).ok  # the limit, stated in the README
    caught = verify_run(run, receipts=[receipts])
    assert not caught.ok and "not the run's key" in caught.summary()


@pytest.mark.slow
def test_cli_exit_codes_and_first_bad_line(evidence, capsys):
    run, _ = _copy(evidence, "cli")
    lines = (run / "audit.jsonl").read_text().splitlines()
    lines[4] = "[1, 2]"
    (run / "audit.jsonl").write_text("\n".join(lines) + "\n")
    assert cli(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED at line 5: not a JSON object") and "Traceback" not in out
    (run / "audit.jsonl").write_bytes(b"\xff\xfe\n")
    assert cli(["verify", str(run)]) == 1
    assert capsys.readouterr().out.startswith("FAILED at line 1: not UTF-8")
    (run / "audit.jsonl").write_text("")
    assert cli(["verify", str(run)]) == 1
    assert "empty" in capsys.readouterr().out
    assert cli(["verify", str(run / "missing")]) == 2
    assert cli(["verify", str(evidence["run"]), "--receipts", str(run / "none")]) == 2
    assert cli(["verify", str(evidence["run"]), "--public-key", str(run / "no.pem")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("flower-ext verify:") == 3


@pytest.mark.slow
def test_the_report_says_what_was_verified_and_warns_otherwise(evidence):
    from flower_ext.report import build_report

    page = (evidence["run"] / "report.html").read_text()
    assert "Audit trail: verified, hash chain intact" in page
    assert "bank receipts" in page and "signatures" in page
    run, _ = _copy(evidence, "report")
    metrics_final_auc(run, random.Random(0))
    page = build_report(run).html_path.read_text()
    assert "Audit trail: NOT VERIFIED" in page and "final" in page
    run, _ = _copy(evidence, "report2")
    truncate_at_a_signed_round(run, random.Random(1))
    metrics = _metrics(run)
    metrics["status"] = "running"
    metrics["rounds"] = [r for r in metrics["rounds"] if r["round"] <= 1]
    _write_metrics(run, metrics)
    page = build_report(run).html_path.read_text()
    assert "Audit trail: verified" not in page
