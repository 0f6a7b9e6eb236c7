"""What an operator running didomi-marketo unattended (cron, systemd) relies on."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, event, make_config, write_ndjson

from didomi_marketo.errors import EXIT_CODES, ConfigError, FatalError, LockHeld
from didomi_marketo.state import StateLock


def test_the_lock_creates_the_missing_state_folders_private(tmp_path):
    state = tmp_path / "var" / "lib" / "didomi-marketo" / "state.db"
    with StateLock(state) as lock:
        lock.acquire()
    for folder in (tmp_path / "var", tmp_path / "var" / "lib", state.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_an_existing_state_folder_keeps_its_mode(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o750)
    folder.chmod(0o750)
    with StateLock(folder / "state.db") as lock:
        lock.acquire()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_a_state_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FatalError, match=r"cannot create the state folder .*file.* \(Not a directory\)"):
        StateLock(tmp_path / "file" / "sub" / "state.db").acquire()


def test_a_held_lock_is_its_own_exit_code(tmp_path):
    state = tmp_path / "state.db"
    with StateLock(state) as first:
        first.acquire()
        with pytest.raises(LockHeld, match="another run holds the state lock") as e:
            StateLock(state).acquire()
    assert e.value.exit_code == 4 and isinstance(e.value, FatalError)  # still "the run did not happen"
    assert (ConfigError.exit_code, FatalError.exit_code) == (2, 3)
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# The recipes in contrib/: systemd units and the cron line, run as far as this machine allows


CONTRIB = ROOT / "contrib"
ENTRY_POINT = Path(sys.executable).parent / "didomi-marketo"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    units = []
    for unit in sorted((CONTRIB / "systemd").glob("didomi-marketo*")):
        # verify checks that ExecStart exists: point it at this checkout's entry point.
        text = unit.read_text().replace("/usr/local/bin/didomi-marketo", str(ENTRY_POINT))
        (tmp_path / unit.name).write_text(text)
        units.append(str(tmp_path / unit.name))
    proc = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys but prints them: both must be clean.
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), proc.stderr
    service = (CONTRIB / "systemd" / "didomi-marketo.service").read_text()
    for must in ("DynamicUser=yes", "StateDirectory=didomi-marketo", "EnvironmentFile=/etc/didomi-marketo/",
                 "OnFailure=didomi-marketo-alert@", "SuccessExitStatus=4", "--log-format json"):  # fmt: skip
        assert must in service
    assert "MARKETO_CLIENT_SECRET" not in service  # the secret lives in the 0600 EnvironmentFile


def _cron_command(data: Path, config: Path, state: Path, report: Path) -> str:
    """The command part of contrib/cron/crontab's line, with this machine's paths."""
    (line,) = [x for x in (CONTRIB / "cron" / "crontab").read_text().splitlines() if x.startswith("*/15")]
    command = line.split(None, 6)[6]  # 5 schedule fields and the user (/etc/cron.d format)
    assert "SECRET" not in command.upper() and "CLIENT_ID" not in command.upper()
    for old, new in (("/usr/local/bin/didomi-marketo-cron", CONTRIB / "cron" / "didomi-marketo-cron"),
                     ("/srv/didomi", data), ("/etc/didomi-marketo/marketo.yaml", config),
                     ("/var/lib/didomi-marketo/state.db", state),
                     ("/var/log/didomi-marketo/last", report)):  # fmt: skip
        assert old in command
        command = command.replace(old, str(new))
    return command


def _run_like_cron(command: str, tmp_path: Path, env_file: Path) -> subprocess.CompletedProcess:
    # What cron gives a job: /bin/sh -c, PATH=/usr/bin:/bin, no HOME (here), nothing else of ours.
    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/sh", "LOGNAME": "didomi-marketo",
           "DIDOMI_MARKETO_ENV_FILE": str(env_file), "DIDOMI_MARKETO_LOG": str(tmp_path / "log" / "sync.log"),
           "DIDOMI_MARKETO_BIN": str(ENTRY_POINT)}  # fmt: skip
    return subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=120)


def test_the_cron_line_is_silent_on_success_and_mails_a_failure(sandbox, tmp_path):
    data = write_ndjson(
        tmp_path / "in" / "e.ndjson", [event("a@example.com", "2026-11-01T00:00:00Z", {"newsletter": True})]
    )
    config = make_config(tmp_path, sandbox, authentication={"instance": sandbox.base_url + "/rest"})
    env_file = tmp_path / "credentials.env"
    env_file.write_text("MARKETO_CLIENT_ID=sandbox-client\nMARKETO_CLIENT_SECRET=sandbox-secret\n")
    env_file.chmod(0o600)
    state = tmp_path / "var" / "lib" / "didomi-marketo" / "state.db"  # nobody created the folder
    command = _cron_command(data.parent, config, state, tmp_path / "report")

    ok = _run_like_cron(command, tmp_path, env_file)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr == ""  # cron mails nothing
    assert state.is_file() and stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    logged = [json.loads(line) for line in (tmp_path / "log" / "sync.log").read_text().splitlines()]
    assert logged[0]["event"] == "start" and logged[-1]["event"] == "end"

    env_file.write_text("MARKETO_CLIENT_ID=sandbox-client\nMARKETO_CLIENT_SECRET=wrong-secret\n")
    failed = _run_like_cron(command, tmp_path, env_file)
    assert failed.returncode == 3
    assert "exited 3" in failed.stderr and "a human must act" in failed.stderr  # what cron mails
    assert "wrong-secret" not in failed.stderr + (tmp_path / "log" / "sync.log").read_text()

    with StateLock(state) as held:  # the previous run is still going: exit 4, nothing to mail
        held.acquire()
        overlap = _run_like_cron(command, tmp_path, env_file)
    assert overlap.returncode == 4 and overlap.stdout == "" and overlap.stderr == ""
    assert "another run holds the state lock" in (tmp_path / "log" / "sync.log").read_text()

    gone = _run_like_cron(command, tmp_path, tmp_path / "no-such.env")
    assert gone.returncode == 2 and "cannot read the credentials file" in gone.stderr
