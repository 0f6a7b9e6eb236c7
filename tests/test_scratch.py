"""Scratch folders hold lead emails: a killed run's are removed by the next run, a live run's never."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import event, make_config, write_ndjson

from didomi_marketo.scratch import LOCK_NAME, ScratchDir, sweep


def left_by_a_killed_run(parent: Path, name: str) -> Path:
    folder = parent / name
    folder.mkdir(mode=0o700)
    (folder / LOCK_NAME).touch()  # its lock file, which nobody holds any more
    (folder / "file-0.pickle").write_bytes(b"emails")
    return folder


def test_the_next_scratch_folder_removes_what_killed_runs_left_and_nothing_else(tmp_path):
    dead = left_by_a_killed_run(tmp_path, "didomi-read-1234-abcd")
    dead_spill = left_by_a_killed_run(tmp_path, "didomi-fold-99-efgh")
    alive = left_by_a_killed_run(tmp_path, "didomi-read-5678-ijkl")
    held = os.open(alive / LOCK_NAME, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a run still going
    being_made = tmp_path / "didomi-read-42-mnop"
    being_made.mkdir()  # no lock file yet
    someone_else = tmp_path / "other-tool-1"
    someone_else.mkdir()
    (someone_else / LOCK_NAME).touch()
    try:
        scratch = ScratchDir("read", str(tmp_path))
        try:
            assert not dead.exists() and not dead_spill.exists()
            assert alive.exists() and being_made.exists() and someone_else.exists()
            # The new folder is in use for as long as its run lives: a sweep leaves it alone.
            assert sweep(str(tmp_path)) == [] and Path(scratch.name).exists()
        finally:
            scratch.cleanup()
        assert not Path(scratch.name).exists()
    finally:
        os.close(held)
    assert sweep(str(tmp_path)) == [str(alive)]  # its run ended without cleaning up


def test_a_sync_killed_while_reading_leaves_nothing_after_the_next_run(tmp_path):
    """SIGKILL mid-read (the parallel read's pickles on disk), then an ordinary dry run."""
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    records = [
        event(f"user{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": i % 2 == 0})
        for i in range(60_000)  # long enough a run that the kill lands mid-way
    ]
    for part in range(4):
        write_ndjson(tmp_path / "in" / f"part-{part}.ndjson", records[part::4])
    config = make_config(tmp_path)
    env = dict(os.environ, TMPDIR=str(scratch_parent))
    cmd = [sys.executable, "-m", "didomi_marketo", "sync", str(tmp_path / "in"), "-c", str(config), "--dry-run",
           "-q", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(scratch_parent.glob("didomi-read-*/*.pickle")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert any(scratch_parent.glob("didomi-read-*/*.pickle"))  # what a killed run leaves
    time.sleep(0.5)  # orphaned workers see their parent gone and stop
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert list(scratch_parent.iterdir()) == []


def test_a_sweep_while_a_folder_is_being_marked_in_use_leaves_it_alone(tmp_path, monkeypatch):
    """Another run's sweep landing between the lock file's creation and its lock."""
    from didomi_marketo import scratch

    real = scratch.fcntl.flock
    swept: list[list[str]] = []

    def flock_after_a_sweep(fd: int, op: int) -> None:
        if not swept:
            swept.append(sweep(str(tmp_path)))
        real(fd, op)

    monkeypatch.setattr(scratch.fcntl, "flock", flock_after_a_sweep)
    folder = ScratchDir("read", str(tmp_path))
    try:
        assert swept == [[]] and Path(folder.name).is_dir()
        assert (Path(folder.name) / LOCK_NAME).exists()
    finally:
        monkeypatch.undo()
        folder.cleanup()
