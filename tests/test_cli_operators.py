"""The command line as cron, systemd and log collectors use it: JSON on every stderr line, quiet
pipes, help that teaches, DIDOMI_MARKETO_* variables, retry's table, first steps."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import event, make_config, run_subprocess, write_ndjson
from test_docs import commands as all_commands

from didomi_marketo.cli import main

ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}


def json_lines(stderr: str) -> list[dict]:
    """Every stderr line parsed as JSON: fails the test on the first line that is not."""
    return [json.loads(line) for line in stderr.splitlines()]


def many_leads(tmp_path: Path, n: int) -> Path:
    recs = [
        event(f"user{i:05d}@example.com", "2026-11-01T10:00:00Z", {"newsletter": i % 2 == 0})
        for i in range(n)
    ]
    return write_ndjson(tmp_path / "in" / "many.ndjson", recs)


# --------------------------------------------------------------------------------------------
# 1. --log-format json: one JSON object per stderr line, on every path


def test_json_logs_with_30_rejected_records_and_a_usage_error(sandbox, tmp_path):
    good = [event(f"u{i}@example.com", "2026-11-01T10:00:00Z", {"newsletter": True}) for i in range(5)]
    bad = [event(f"not-an-email-{i}", "2026-11-01T10:00:00Z", {"newsletter": True}) for i in range(30)]
    data = write_ndjson(tmp_path / "in" / "e.ndjson", good + bad)
    config = make_config(tmp_path, sandbox, upsert_mode=True)
    proc = run_subprocess("sync", data, "-c", config, "--log-format", "json", "-q", env=ENV)
    assert proc.returncode == 1, proc.stderr
    events = json_lines(proc.stderr)
    assert all({"ts", "level", "event"} <= e.keys() for e in events)
    rejected = [e for e in events if e["event"] == "rejected"]
    assert len(rejected) == 20  # the first 20 as found; the rest are counted
    first = rejected[0]
    assert first["source"] == f"{data}:6" and first["key"] == "not-an-email-0" and "email" in first["reason"]
    (more,) = [e for e in events if e["event"] == "rejected_more"]
    assert more["count"] == 10 and more["level"] == "warning"
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert {e["phase"] for e in events if e["event"] == "progress"} >= {"read", "deliver"}

    usage = run_subprocess("sync", data, "--log-format", "json", "--no-such-flag")
    assert usage.returncode == 2
    (line,) = json_lines(usage.stderr)
    assert line["event"] == "usage_error" and line["level"] == "error" and "--no-such-flag" in line["message"]
    missing = run_subprocess("sync", "--log-format=json")  # no PATH, no --config
    assert missing.returncode == 2 and json_lines(missing.stderr)[0]["event"] == "usage_error"
    # The variable works as the flag does, for commands without --log-format too.
    env_json = run_subprocess(
        "state", "show", "--state", tmp_path / "none.db", env={"DIDOMI_MARKETO_LOG_FORMAT": "json"}
    )
    assert env_json.returncode == 3 and json_lines(env_json.stderr)[0]["event"] == "error"


def test_a_crash_is_one_json_event_and_exit_3(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("didomi_marketo.sync.run_sync", boom)  # the command imports it when it runs
    config = make_config(tmp_path)
    data = write_ndjson(tmp_path / "e.ndjson", [])
    with pytest.raises(SystemExit) as e:
        main(["sync", str(data), "-c", str(config), "--dry-run", "--log-format", "json"])
    assert e.value.code == 3
    line = json_lines(capsys.readouterr().err)[-1]  # after `start`; every line is JSON
    assert (
        line["event"] == "crash"
        and line["exception"] == "RuntimeError: a bug"
        and "boom" in line["traceback"]
    )


# --------------------------------------------------------------------------------------------
# 2. pipes


def test_closed_pipes_exit_quietly_with_0(sandbox, tmp_path):
    data = many_leads(tmp_path, 3000)  # well over a pipe's 64 KiB, so `head` really closes it
    config = make_config(tmp_path, sandbox, upsert_mode=True)
    state = tmp_path / "state.db"
    assert run_subprocess("sync", data, "-c", config, "--state", state, "-q", env=ENV).returncode == 0
    me = f"{sys.executable} -m didomi_marketo"
    for command in (
        f"{me} state export --state {state} | head -1",
        f"{me} preview {data} -c {config} --format csv | head -1",
        f"{me} sync {data} -c {config} --dry-run --output /dev/stdout | head -1",
        f"{me} sync {data} -c {config} --dry-run --output - | head -1",
    ):
        proc = subprocess.run(
            ["bash", "-c", "set -o pipefail; " + command], capture_output=True, text=True, timeout=120
        )
        assert (proc.returncode, proc.stderr) == (0, ""), command
        assert len(proc.stdout.splitlines()) == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_unwritable_stdout_is_an_error_never_exit_0(sandbox, tmp_path):
    """A full disk under `state export > file` must not pass as success: what was printed but
    still buffered at the exit is lost, so the exit code says so (one line, no traceback). A
    small export: all of it is still in the buffer when the command returns."""
    data = many_leads(tmp_path, 5)
    config = make_config(tmp_path, sandbox, upsert_mode=True)
    state = tmp_path / "state.db"
    assert run_subprocess("sync", data, "-c", config, "--state", state, "-q", env=ENV).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a shell
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "didomi_marketo", "state", "export", "--state", str(state)],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 3
    assert "could not write to standard output: No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_output_dash_is_stdout_and_the_table_moves_to_stderr(tmp_path, cli):
    data = many_leads(tmp_path, 5)
    config = make_config(tmp_path)
    res = cli("sync", data, "-c", config, "--dry-run", "--output", "-")
    assert res.exit_code == 0
    payloads = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(payloads) == 5 and payloads[0]["email"] == "user00000@example.com"
    assert "leads to send" in res.stderr and not Path("-").exists()


# --------------------------------------------------------------------------------------------
# 3. help


@pytest.mark.parametrize("name", [n for n, _ in all_commands()])
def test_help_has_examples_help_for_every_option_and_fits_80_columns(name):
    proc = run_subprocess(*name.split(), "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0
    text = proc.stdout
    assert "Examples:" in text and text.count("\n    didomi-marketo ") >= 1, name
    assert max(len(line) for line in text.splitlines()) <= 80, name
    options = text.split("Options:")[1].split("Examples:")[0]  # typer 0.29 placeholders: metavars instead
    assert not any(f"<{t}" in options for t in ("bool", "int", "float", "path", "str", "list")), options
    cmd = dict(all_commands())[name]
    for param in cmd.params:  # type: ignore[attr-defined]
        if param.param_type_name == "option":
            assert param.help, f"{name} {param.opts} has no help text"
    if name in ("sync", "retry"):
        assert "Exit codes:" in text and "  4  the state is locked" in text


def test_shell_completion_is_on():
    exe = Path(sys.executable).parent / "didomi-marketo"
    # typer detects the shell from the parent process: run it from bash, as a user would.
    proc = subprocess.run(
        ["bash", "-c", f"{exe} --show-completion; exit $?"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "_DIDOMI_MARKETO_COMPLETE" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [str(exe)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "_DIDOMI_MARKETO_COMPLETE": "complete_bash", "COMP_WORDS": "didomi-marketo sy", "COMP_CWORD": "1"},
    )  # fmt: skip
    assert "sync" in proc.stdout


# --------------------------------------------------------------------------------------------
# 4. DIDOMI_MARKETO_* variables: flag > environment > file


def test_cron_options_come_from_the_environment_and_flags_win(sandbox, tmp_path, cli):
    data = many_leads(tmp_path, 3)
    config = make_config(tmp_path, sandbox, upsert_mode=True)
    env = {**ENV, "DIDOMI_MARKETO_CONFIG": str(config), "DIDOMI_MARKETO_STATE": str(tmp_path / "env.db"),
           "DIDOMI_MARKETO_REPORT": str(tmp_path / "env-report"), "DIDOMI_MARKETO_MAX_CALLS": "1"}  # fmt: skip
    res = cli("sync", data, "-q", env=env)
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "env.db").is_file() and (tmp_path / "env-report" / "summary.json").is_file()
    res = cli("sync", data, "-q", "--state", tmp_path / "flag.db", env=env)
    assert res.exit_code == 0 and (tmp_path / "flag.db").is_file()
    res = cli(
        "sync", data, "-q", env={**env, "DIDOMI_MARKETO_LOG_FORMAT": "json", "DIDOMI_MARKETO_STATE": ""}
    )
    assert json_lines(res.stderr)[0]["event"] == "start"


# --------------------------------------------------------------------------------------------
# 6. first steps: retry's table


def test_retry_prints_the_summary_table_and_logs_json(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory()
    data = many_leads(tmp_path, 4)
    config = make_config(tmp_path, sb, upsert_mode=True)
    sb.config.faults = []  # nothing retryable yet: the report has no lead to re-send
    report = tmp_path / "r"
    res = cli("sync", data, "-c", config, "--report", report, "-q", env=ENV)
    assert res.exit_code == 0
    (report / "undelivered.ndjson").write_text(
        json.dumps(
            {
                "key": "user00001@example.com",
                "payload": {"email": "user00001@example.com", "didomiNewsletterOptIn": False},
                "retryable": True,
                "stamps": {},
            }
        )
        + "\n"  # fmt: skip
    )
    res = cli("retry", report, "-c", config, "--report", tmp_path / "r2", "--force")
    assert res.exit_code == 0, res.stderr
    assert "leads retryable in the report" in res.stdout and '"mode"' not in res.stdout
    res = cli("retry", report, "-c", config, "--log-format", "json", "-q", "-v", "--force")
    events = json_lines(res.stderr)
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"


# --------------------------------------------------------------------------------------------
# 1. the progress bar on a terminal, labelled by phase


def test_the_bar_names_the_read_phase_on_a_terminal(tmp_path):
    data = many_leads(tmp_path, 60_000)  # a second or more of reading
    config = make_config(tmp_path)
    pid, fd = pty.fork()
    if pid == 0:  # the child: stderr is the terminal
        os.execv(sys.executable, [sys.executable, "-m", "didomi_marketo", "sync", str(data), "-c", str(config),
                                  "--dry-run"])  # fmt: skip
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    os.waitpid(pid, 0)
    text = seen.decode(errors="replace")
    assert "reading and folding records" in text
    assert "leads to send" in text  # then the summary


# --------------------------------------------------------------------------------------------
# 6. the README quick start runs as written


def test_the_readme_quick_start_runs_as_written(tmp_path):
    import re
    import socket

    from conftest import ROOT

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8787)) == 0:
            pytest.skip("127.0.0.1:8787 is busy (a demo is running); the quick start's sandbox needs it")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```sh\n(.*?)```", readme, re.S).group(1)  # type: ignore[union-attr]
    # A scratch copy of the clone after `make demo`: the venv and the samples.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "sample_exports").symlink_to(ROOT / "sample_exports")
    # No `set -e`: the syncs exit 1 on the sample's bad records on purpose; what they leave is checked.
    script = block
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MARKETO_", "DIDOMI_MARKETO_"))}
    # If the block fails before its last line, the trap stops the sandbox it started all the same.
    script = "trap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + script
    proc = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # the last line, `kill %1`
    assert "didomi-marketo 0." in proc.stdout and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "demo-report" / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["delivery"]["updated"] > 0  # delivered into the sandbox
    assert (tmp_path / "demo-state" / "state.db").is_file() and (tmp_path / "my-marketo.yaml").is_file()


def test_make_demo_with_port_8787_taken_picks_a_free_port():
    import socket

    from conftest import ROOT

    holder = socket.socket()
    # The quick start's sandbox (the test before) may still be letting go of 8787: hold the port
    # ourselves once it is free, so that it stays taken while the demo looks.
    deadline = time.monotonic() + 5
    while True:
        try:
            holder.bind(("127.0.0.1", 8787))
            holder.listen()
            break
        except OSError:
            if time.monotonic() > deadline:
                break  # taken by something else for good: the demo must cope all the same
            time.sleep(0.05)
    try:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=300
        )
    finally:
        holder.close()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "port 8787 is taken: the demo's sandbox listens on" in proc.stdout, said
    assert "exit code: 1" in proc.stdout and "leads in all" in proc.stdout, said
    assert "Traceback" not in proc.stderr, said


def test_commands_without_log_format_speak_json_under_the_variable(tmp_path):
    bad = write_ndjson(tmp_path / "in" / "bad.ndjson", [{"hello": i} for i in range(25)])
    config = make_config(tmp_path)
    proc = run_subprocess("preview", bad, "-c", config, env={"DIDOMI_MARKETO_LOG_FORMAT": "json"})
    events = json_lines(proc.stderr)
    shown = [e["event"] for e in events].count("rejected")
    assert shown >= 1 and events[-1]["event"] == "rejected_more" and events[-1]["count"] == 25 - shown
    assert events[0]["source"] == f"{bad}:1"


# --------------------------------------------------------------------------------------------
# start-up: a command imports what it runs, not what the others do


LOADED = """
import json, sys
from didomi_marketo.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
tops = ("httpx", "rich", "yaml", "click", "pygments", "didomi_marketo")
print(json.dumps(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in tops)))
"""


def _loaded(*args: object) -> set[str]:
    run = subprocess.run([sys.executable, "-c", LOADED, *map(str, args)], capture_output=True, text=True)
    return set(json.loads(run.stdout.splitlines()[-1]))


def test_version_and_help_import_no_library_and_a_quiet_sync_no_rich(tmp_path):
    for args in (["--version"], ["--help"], ["sync", "--help"], ["check", "--help"]):
        loaded = _loaded(*args)
        library = {"httpx", "rich", "yaml", "didomi_marketo.sync", "didomi_marketo.check"}
        assert not loaded & library, (args, loaded)
    data = write_ndjson(
        tmp_path / "e.ndjson", [event("a@x.example", "2026-11-20T10:00:00Z", {"newsletter": True})]
    )
    quiet = _loaded("sync", data, "-c", make_config(tmp_path), "--dry-run", "-q")
    assert "didomi_marketo.sync" in quiet and "didomi_marketo.explain" not in quiet
    assert "didomi_marketo.reconcile" not in quiet and not any(m.split(".")[0] == "rich" for m in quiet)
    assert "httpx" in quiet and not quiet & {
        "httpx._main",
        "click",
        "pygments",
    }  # httpx's own CLI is not loaded
