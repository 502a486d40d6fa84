"""flower-ext's command line: --version, readable help, one-line user errors, and the pure
parts of ``flower-ext run`` and ``flower-ext superlink`` (status parsing, process trees)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flower_ext import cli, runwrap
from flower_ext import superlink as sl

SUBCOMMANDS = ["report", "compare", "verify", "keygen", "superlink", "run"]


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "-h"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("flower-ext ") and "flwr 1." in out


@pytest.mark.parametrize(
    "argv", [[], *[[name] for name in SUBCOMMANDS], ["superlink", "status"], ["superlink", "stop"]]
)
def test_help_is_readable(capsys, argv):
    text = _help(capsys, argv)
    assert "``" not in text
    assert "usage: flower-ext" in text


@pytest.mark.parametrize("argv", [[], ["report"], ["compare"], ["verify"], ["run"]])
def test_help_says_where_runs_are_written(capsys, argv):
    text = " ".join(_help(capsys, argv).split())  # argparse wraps lines
    assert "~/flower-ext-runs/<timestamp>-<run id>/" in text


def _one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_verify_missing_run_dir(capsys, tmp_path):
    line = _one_line_error(capsys, ["verify", str(tmp_path / "nope")])
    assert line.startswith("flower-ext verify:") and "no such run directory" in line


def test_verify_folder_that_is_not_a_run(capsys, tmp_path):
    line = _one_line_error(capsys, ["verify", str(tmp_path)])
    assert "not a run directory" in line


def test_verify_tampered_run_is_still_exit_1(capsys, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")  # a run directory whose audit trail is gone
    assert cli.main(["verify", str(tmp_path)]) == 1


def test_keygen_bad_path(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(capsys, ["keygen", str(blocker / "keys")])
    assert line.startswith("flower-ext keygen:")


def test_compare_output_in_missing_folder(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"rounds": [], "final": {}, "config": {}}))
    line = _one_line_error(capsys, ["compare", str(run), "-o", str(tmp_path / "no" / "c.png")])
    assert "does not exist" in line


def test_console_script_has_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "flower_ext.cli", "verify", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no such run directory" in result.stderr


@pytest.mark.skipif(not sl.on_linux(), reason="reads /proc")
def test_superlink_stop_refuses_without_one_of_this_home(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "empty-home"))
    line = _one_line_error(capsys, ["superlink", "stop"])
    assert "no SuperLink of the Flower home" in line


# --------------------------------------------------------------------------- flower-ext run


def test_positionals_skip_option_values():
    args = ["apps/x", "--run-config", "a=1 b=2", "--stream", "-c", "c=3", "remote"]
    assert runwrap.positionals(args) == ["apps/x", "remote"]
    assert runwrap.positionals(["--federation-config", "num-supernodes=5", "app"]) == ["app"]


def test_parse_run_id_and_output_dir():
    assert runwrap.parse_run_id("Successfully started run 5796553534283899607\n") == (
        "5796553534283899607"
    )
    assert runwrap.parse_run_id('  "run-id": "2779898177132507214",') == "2779898177132507214"
    assert runwrap.parse_run_id("round 3 auc 0.71") is None
    line = "INFO :  [bank-risk] writing metrics and audit trail to /home/u/flower-ext-runs/r-1"
    assert runwrap.parse_output_dir(line) == "/home/u/flower-ext-runs/r-1"


def _run(status, details="N/A", run_id="7"):
    return {"run-id": run_id, "status": status, "status-details": details}


def test_outcome_from_flwr_ls():
    # the shapes flwr 1.42's `flwr ls --format json` gives (seen on a real SuperLink)
    failed = runwrap.outcome_from_ls(
        [_run("finished:failed", "Simulation failed with exception: boom")], "7"
    )
    assert failed is not None and not failed.ok and "boom" in failed.details
    done = runwrap.outcome_from_ls([_run("finished:completed")], "7")
    assert done is not None and done.ok and done.details == ""
    stopped = runwrap.outcome_from_ls([_run("finished:stopped")], "7")
    assert stopped is not None and not stopped.ok
    assert runwrap.outcome_from_ls([_run("running")], "7") is None  # still going
    assert runwrap.outcome_from_ls([_run("finished:completed", run_id="8")], "7") is None


def test_report_exit_codes(capsys):
    wrapper = runwrap.Wrapper.__new__(runwrap.Wrapper)
    wrapper.output_dir, wrapper.local, wrapper.run_id = "/tmp/out", False, "7"
    assert wrapper._report(runwrap.Outcome("finished:failed", "boom", "7")) == 1
    err = capsys.readouterr().err
    assert "FAILED: run 7 finished:failed: boom" in err and "outputs: /tmp/out" in err
    assert wrapper._report(runwrap.Outcome("finished:completed", "", "7")) == 0
    assert "FINISHED: run 7 completed" in capsys.readouterr().err


def test_connection_address_reads_flower_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert runwrap.connection_address(None) == ":local:"  # no config yet: flwr's default
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n\n'
        '[superlink.bank]\naddress = "10.0.0.1:9093"\n'
    )
    assert runwrap.connection_address(None) == ":local:"
    assert runwrap.connection_address("bank") == "10.0.0.1:9093"
    assert runwrap.connection_address("unknown") is None


def test_run_rejects_bad_timeout(capsys):
    line = _one_line_error(capsys, ["run", "--timeout", "0", "app"])
    assert "--timeout" in line


# --------------------------------------------------------------------------- process trees


def _proc(pid, ppid, sid, argv=("python",), start=1, state="S"):
    return sl.Proc(pid, ppid, sid, sid, state, start, tuple(argv), 0)


def test_process_tree_follows_children_and_led_sessions():
    link = "/venv/bin/flower-superlink"
    procs = {
        p.pid: p
        for p in [
            _proc(1, 0, 1),
            _proc(100, 1, 100, ("/venv/bin/python", link, "--port", "1")),
            _proc(110, 100, 110, ("/venv/bin/python", "/venv/bin/flower-superexec")),
            _proc(120, 110, 110, ("/venv/bin/python", "/venv/bin/flwr-simulation")),
            _proc(130, 1, 110, ("ray::ClientAppActor",)),  # orphaned, same session
            _proc(200, 1, 200, ("/venv/bin/python", link, "--port", "2")),  # another one
            _proc(210, 200, 210, ("/venv/bin/python", "/venv/bin/flower-superexec")),
            _proc(300, 1, 50, ("bash",)),  # unrelated
        ]
    }
    assert set(sl.process_tree(100, procs)) == {100, 110, 120, 130}
    assert set(sl.process_tree(200, procs)) == {200, 210}


def test_superlink_identity_from_cmdline(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    home = tmp_path / "flwr-home"
    argv = (
        str(venv / "bin" / "python"),
        str(venv / "bin" / "flower-superlink"),
        "--insecure",
        "--port",
        "41234",
        "--log-file",
        str(home / "local-superlink" / "superlink.log"),
        "--database",
        str(home / "local-superlink" / "state.db"),
    )
    procs = {
        10: _proc(10, 1, 10, argv),
        11: _proc(11, 10, 11, (str(venv / "bin" / "python"), "/x/bin/flwr-simulation")),
    }
    (link,) = sl.find_superlinks(procs)
    assert (link.port, link.prefix, link.flwr_home) == (41234, venv.resolve(), home.resolve())
    assert [p.pid for p in link.run_processes] == [11]
    assert link.mismatches(venv.resolve(), home.resolve()) == []
    problems = link.mismatches(Path("/other/env"), Path("/other/home"))
    assert len(problems) == 2 and str(venv.resolve()) in problems[0]


def test_superlink_argparse_choices():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._superlink(sub)
    assert parser.parse_args(["superlink", "stop", "--force", "--grace", "1"]).force
    with pytest.raises(SystemExit):
        parser.parse_args(["superlink", "restart"])


FAKE_FLWR = """
import sys, time
print("Successfully started run 42", flush=True)
time.sleep(120)
"""


def test_timeout_stops_the_run_it_started(capsys, tmp_path, monkeypatch):
    """--timeout: the wrapper ends flwr run, calls flwr stop for the run id it saw, exits 124."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "remote"\n\n[superlink.remote]\naddress = "10.9.9.9:9093"\n'
    )
    wrapper = runwrap.Wrapper(["app"], strict=False, timeout=3.0)
    assert not wrapper.local  # a user-managed connection: no local SuperLink check
    wrapper.flwr = [sys.executable, "-c", FAKE_FLWR]

    class Clock:  # the deadline passes once the run id is seen: no race with a slow start
        @staticmethod
        def monotonic() -> float:
            return 1e9 if wrapper.run_id else 0.0

        sleep = staticmethod(time.sleep)

    monkeypatch.setattr(runwrap, "time", Clock)
    stops: list[str | None] = []
    monkeypatch.setattr(wrapper, "stop", lambda: stops.append(wrapper.run_id) or True)
    assert wrapper.execute() == runwrap.EXIT_TIMEOUT
    assert stops == ["42"]
    captured = capsys.readouterr()
    assert "Successfully started run 42" in captured.out
    assert "FAILED: run 42 timed out; stopped with `flwr stop`" in captured.err


@pytest.mark.parametrize("content", ["[1]", "{not json", '"text"'])
def test_report_and_compare_on_broken_metrics_are_one_line_user_errors(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(content)
    assert cli.main(["report", str(run)]) == 2
    assert cli.main(["compare", str(run), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "Traceback" not in err


def test_compare_output_must_be_a_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert cli.main(["compare", str(run), "-o", str(tmp_path / "c.txt")]) == 2
    assert cli.main(["compare", str(run), "-o", str(tmp_path)]) == 2
    assert "give a .png file" in capsys.readouterr().err
