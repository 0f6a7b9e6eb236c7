"""Private scratch folders (the parallel read's pickles, the fold's spill), and what a killed run
left of them.

They hold lead emails and consent, so they are 0700 and removed when the run ends. A run killed
with SIGKILL (or the OOM killer) cannot remove its own: each folder holds an flock for as long as
its run lives (the kernel lets go of it when the process dies, whatever the PID namespace), and
the next run removes every folder whose lock nobody holds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

try:
    import fcntl
except ImportError:  # not on Windows: there, folders are only removed by their own run
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".in-use"
_OURS = re.compile(r"didomi-(read|fold)-")
_swept: set[str] = set()  # parents already swept by this process


class ScratchDir:
    """A `tempfile.TemporaryDirectory` that marks itself in use until `cleanup()`."""

    def __init__(self, kind: str, parent: str | None = None):
        where = parent or tempfile.gettempdir()
        if where not in _swept:
            _swept.add(where)
            sweep(where)
        self._dir = tempfile.TemporaryDirectory(prefix=f"didomi-{kind}-", dir=parent)
        self.name = self._dir.name
        self._lock = _in_use(self.name)

    def cleanup(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        self._dir.cleanup()


def _in_use(folder: str) -> int | None:
    """Mark `folder` in use: its lock file appears already locked (made under another name, locked,
    then renamed), so that a sweep never finds it unlocked while its run lives. Forked workers
    share the lock; it ends with the last of them. Where flock is not supported (some network
    filesystems), no lock file: sweeps leave the folder alone."""
    if fcntl is None:
        return None
    making = os.path.join(folder, LOCK_NAME + ".new")
    fd = os.open(making, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        os.rename(making, os.path.join(folder, LOCK_NAME))
    except OSError:
        os.close(fd)
        os.unlink(making)
        return None
    return fd


def sweep(parent: str) -> list[str]:
    """Remove the scratch folders in `parent` that this user's killed runs left; return them.
    A folder without its lock file yet is being made (or is not ours to judge): left alone."""
    if fcntl is None:
        return []
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        if not _OURS.match(entry.name):
            continue
        try:
            if (
                not entry.is_dir(follow_symlinks=False)
                or entry.stat(follow_symlinks=False).st_uid != os.getuid()
            ):
                continue
            fd = os.open(os.path.join(entry.path, LOCK_NAME), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its run is alive
        finally:
            os.close(fd)
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed
