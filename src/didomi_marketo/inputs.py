"""Inputs: discover files, read them, and fold their records into per-lead consent.

Used by every command that reads Didomi data (sync, preview, check --sample, explain, reconcile),
so each reads exactly as `sync` does. The consent rules themselves live in `didomi/fold.py`.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from didomi_marketo.config import Config
from didomi_marketo.didomi.fold import SPILL_THRESHOLD, Fold, FoldSchema, FoldStats, IssueSink
from didomi_marketo.didomi.readers import (
    ALL_DATES,
    MAX_LINE_BYTES,
    DateWindow,
    IncompletePartition,
    InputFile,
    Problem,
    Skipped,
    discover,
    read_records,
    sniff_json,
)
from didomi_marketo.didomi.records import Observation, export_line, observations
from didomi_marketo.mapping import FieldMapping
from didomi_marketo.outcomes import payload_hash
from didomi_marketo.state import StateStore, input_unit
from didomi_marketo.storage import check_urls, discover_url, is_url


@dataclass
class InputStats:
    files: int = 0
    files_skipped: int = 0  # not JSON (READMEs...), not a regular file (a FIFO...), not data in a partition
    skipped_files: list[str] = field(default_factory=list)  # their names (the first 1,000)
    files_unchanged: int = 0  # skipped: unchanged since the state recorded them
    records: int = 0
    partitions_refused: list[str] = field(default_factory=list)
    access_denied: list[str] = field(default_factory=list)  # storage or the OS refused us: exit 3


def discover_all(
    paths: list[str], allow_incomplete: bool = False, window: DateWindow = ALL_DATES
) -> Iterator[InputFile | Problem | IncompletePartition | Skipped]:
    """Local paths and `s3://` / `gs://` URLs, in command-line order, into the same items.
    Raises ConfigError, before anything is read, for a URL whose extra is not installed."""
    check_urls(paths)
    for raw in paths:
        if is_url(raw):
            yield from discover_url(raw, allow_incomplete, window)
        else:
            yield from discover([raw], allow_incomplete, window)


def default_jobs() -> int:
    """The cores this process may run on (a cgroup or taskset may allow fewer than the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_into(fold: Fold, paths: list[str], allow_incomplete: bool, stats: InputStats,
              unchanged: InputFilter | None = None, window: DateWindow = ALL_DATES, *, jobs: int = 1,
              on_start: Callable[[list[InputFile]], None] | None = None,
              check: Callable[[], None] | None = None,
              max_line_bytes: int = MAX_LINE_BYTES) -> None:  # fmt: skip
    """Feed every record of `paths` into the fold. `unchanged` skips inputs the state has seen;
    `window` selects `date=` partitions by name. Raises ConfigError for an unusable URL.

    With `jobs` > 1 and several local files, worker processes each read and fold whole files
    and the results are merged in input order: the same leads, ties and `path:line` as one
    process. `on_start(files)` runs once the workers exist (a thread it starts is never forked
    with them); `check` runs between files and may raise to stop the reading. A line longer than
    `max_line_bytes` is rejected at its `path:line`, never held in memory."""
    items = list(discover_all(paths, allow_incomplete, window))
    files = [i for i in items if isinstance(i, InputFile)]
    # Local files only: stdin cannot be shared, and a storage client's threads do not fork.
    local = all(f.source is None and not f.is_stream for f in files)
    if jobs > 1 and len(files) > 1 and local:
        _read_parallel(fold, items, stats, unchanged, min(jobs, len(files)), on_start, check, max_line_bytes)
        return
    if on_start is not None:
        on_start(files)
    for item in items:
        if check is not None:
            check()
        if not isinstance(item, InputFile):
            _reject_item(fold, item, stats)
        elif _wanted(item, stats, unchanged):
            read = _read_file(fold, item, stats, max_line_bytes)
            if not read and unchanged is not None:
                unchanged.forget(item)  # not read: the next run must try it again


def _skipped(stats: InputStats, name: str) -> None:
    stats.files_skipped += 1
    if len(stats.skipped_files) < 1000:
        stats.skipped_files.append(name)


def _reject_item(fold: Fold, item: Problem | IncompletePartition | Skipped, stats: InputStats) -> None:
    if isinstance(item, Skipped):  # not data (in a partition): counted and named, not an error
        _skipped(stats, item.path)
    elif isinstance(item, Problem):
        if item.denied:
            stats.access_denied.append(item.path)
        fold.reject("rejected", item.path, item.line, item.reason)
    else:
        stats.partitions_refused.append(item.partition)
        fold.reject("rejected", item.partition, 0, str(item).split(": ", 1)[1])


def _wanted(item: InputFile, stats: InputStats, unchanged: InputFilter | None) -> bool:
    # Inside a Didomi partition every *.json.gz is data: no need to open it to decide (an
    # unchanged remote partition is then skipped without a single read).
    if item.walked and item.partition is None and not sniff_json(item):
        _skipped(stats, item.display)
        return False
    if unchanged is not None and not unchanged(item):
        return False
    stats.files += 1
    return True


def _read_file(fold: Fold, item: InputFile, stats: InputStats, max_line_bytes: int = MAX_LINE_BYTES) -> bool:
    """Fold one file's records; False when the file itself could not be read."""
    add, reject = fold.add, fold.reject
    path = item.display
    add_export_line = fold.add_export_line
    read = True
    for rec in read_records(item, max_line_bytes):
        stats.records += 1
        if isinstance(rec, Problem):
            if rec.denied:
                stats.access_denied.append(rec.path)
            reject("rejected", rec.path, rec.line, rec.reason)
            read = read and rec.line != 0
            continue
        value, line = rec
        parts = export_line(value)
        if parts is not None:  # the bulk of a backfill
            add_export_line(parts[0], parts[1], line, path)
            continue
        for ob in observations(value, line):
            if isinstance(ob, Observation):
                add(ob, path)
            else:
                reject(ob.category, path, ob.line, ob.reason, ob.key)
    return read


# ---------------------------------------------------------------------------------------------
# Reading on every core: a worker folds one whole file into a Fold of its own and writes the
# folded leads to a scratch file; the parent absorbs the files' results strictly in input order
# (Fold.absorb: later input wins ties), and replays each file's issues in order. So the parent
# holds one fold (spilling past its threshold as always) and each worker one file's fold.

_PICKLE_CHUNK = 20_000  # leads per pickle in a result file: bounded memory on both sides


@dataclass
class _FileResult:
    leads: str  # scratch file of pickled [(key, state), ...] chunks
    issues: list[tuple[str, str, int, str, Any]]
    fold: FoldStats
    inputs: InputStats
    read: bool


# (a template fold, scratch dir, line limit), set in each worker
_worker: tuple[Fold, str, int] | None = None


def _start_worker(schema: FoldSchema, identifier: str, regulations: frozenset[str], spill: int,
                  scratch: str, max_line_bytes: int, deletions: str) -> None:  # fmt: skip
    global _worker
    # Ctrl-C reaches the whole process group: the parent stops the workers, they need not trace.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    template = Fold(
        schema, identifier, regulations, lambda *a: None, spill_threshold=spill, deletions=deletions
    )
    _worker = (template, scratch, max_line_bytes)


def _fold_one_file(index: int, item: InputFile) -> _FileResult:
    assert _worker is not None
    template, scratch, max_line_bytes = _worker
    issues: list[tuple[str, str, int, str, Any]] = []
    fold = Fold(template.schema, template.identifier, template.regulations,
                lambda *issue: issues.append(issue), spill_threshold=template.spill_threshold,
                scratch_dir=scratch, deletions=template.deletions)  # fmt: skip
    stats = InputStats()
    out = os.path.join(scratch, f"file-{index}.pickle")
    try:
        read = _read_file(fold, item, stats, max_line_bytes)
        with open(out, "wb") as f:
            chunk: list[tuple[str, list[Any]]] = []
            for lead in fold.leads():
                chunk.append(lead)
                if len(chunk) >= _PICKLE_CHUNK:
                    pickle.dump(chunk, f, pickle.HIGHEST_PROTOCOL)
                    chunk = []
            pickle.dump(chunk, f, pickle.HIGHEST_PROTOCOL)
    finally:
        fold.close()
    return _FileResult(out, issues, fold.stats, stats, read)


def _read_parallel(fold: Fold, items: list[InputFile | Problem | IncompletePartition | Skipped], stats: InputStats,
                   unchanged: InputFilter | None, jobs: int,
                   on_start: Callable[[list[InputFile]], None] | None,
                   check: Callable[[], None] | None, max_line_bytes: int) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="didomi-read-", dir=fold.scratch_dir) as scratch:
        # fork: the workers start in milliseconds with everything imported (spawn re-imports).
        context = multiprocessing.get_context("fork")
        # A worker's fold spills past the same threshold as the parent's: a file under it is
        # folded in memory (spilling it cost a sixth more CPU than reading it on one core).
        spill = fold.spill_threshold
        args = (
            fold.schema,
            fold.identifier,
            fold.regulations,
            spill,
            scratch,
            max_line_bytes,
            fold.deletions,
        )
        with context.Pool(jobs, initializer=_start_worker, initargs=args) as pool:
            if on_start is not None:
                on_start([i for i in items if isinstance(i, InputFile)])
            pending: deque[tuple[int, Any]] = deque()  # (index in items, AsyncResult | None)
            submitted = 0
            for index, item in enumerate(items):
                if isinstance(item, InputFile) and _wanted(item, stats, unchanged):
                    pending.append((index, pool.apply_async(_fold_one_file, (index, item))))
                    submitted += 1
                else:
                    pending.append((index, None))
                # At most jobs + 1 files ahead of the merge: finished results wait on disk.
                while submitted > jobs or (pending and pending[0][1] is None):
                    if check is not None:
                        check()
                    submitted -= _merge_next(fold, items, pending, stats, unchanged)
            while pending:
                if check is not None:
                    check()
                _merge_next(fold, items, pending, stats, unchanged)


def _merge_next(fold: Fold, items: list[InputFile | Problem | IncompletePartition | Skipped],
                pending: deque[tuple[int, Any]], stats: InputStats,
                unchanged: InputFilter | None) -> int:  # fmt: skip
    """Merge the oldest pending item into the fold; 1 if it was a file read by a worker."""
    index, result = pending.popleft()
    item = items[index]
    if result is None:
        if not isinstance(item, InputFile):
            _reject_item(fold, item, stats)
        return 0
    done: _FileResult = result.get()
    for issue in done.issues:
        fold.on_issue(*issue)
    _add_counts(fold.stats, done.fold)
    stats.records += done.inputs.records
    for name in done.inputs.skipped_files:
        _skipped(stats, name)
    stats.access_denied.extend(done.inputs.access_denied)
    if not done.read and unchanged is not None:
        unchanged.forget(items[index])  # type: ignore[arg-type]
    absorb = fold.absorb
    with open(done.leads, "rb") as f:
        while True:
            try:
                chunk = pickle.load(f)
            except EOFError:
                break
            for key, state in chunk:
                absorb(key, state)
    os.unlink(done.leads)
    return 1


def _add_counts(total: FoldStats, part: FoldStats) -> None:
    for f in fields(FoldStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))


def build_fold(
    config: Config,
    on_issue: IssueSink,
    spill_threshold: int = SPILL_THRESHOLD,
    mappings: list[FieldMapping] | None = None,
) -> Fold:
    """The fold for `config` (or for other mappings under its identifier and regulations)."""
    return Fold(
        FoldSchema.from_mappings(config.mappings if mappings is None else mappings),
        config.identifier,
        config.regulations,
        on_issue,
        spill_threshold=spill_threshold,
        deletions=config.deletions,
    )


class InputFilter:
    """Skips inputs (files, or whole export partitions) unchanged since a sync recorded them."""

    def __init__(self, store: StateStore, full: bool, config: Config):
        self.store, self.full = store, full
        # An input is "unchanged" only under the same mapping: a mapping change re-reads it.
        self.config_hash = payload_hash(config.identity() | {"client_id": None, "instance": None})
        self.units: dict[str, str] = {}
        self.unchanged = 0
        self._decided: dict[str, bool] = {}
        self._unit: dict[str, str] = {}

    @staticmethod
    def _key(f: InputFile) -> str:
        # A partition is one unit only when it was walked whole; a file named on the command
        # line is its own unit (else syncing one part would mark the whole partition done).
        return f.partition if f.walked and f.partition else f.display

    def forget(self, f: InputFile) -> None:
        """`f` could not be read (denied, network, corrupt): its unit is not recorded as synced."""
        unit = self._unit.get(self._key(f))
        if unit is not None:
            self.units.pop(unit, None)

    def __call__(self, f: InputFile) -> bool:
        key = self._key(f)
        if key not in self._decided:
            try:
                identity = input_unit(f, whole_partition=f.walked)
            except OSError:
                return True  # unreadable: read_records reports it with its reason
            if identity is None:
                return True  # stdin: always read
            unit, fingerprint = identity
            fingerprint = f"{fingerprint}:{self.config_hash}"
            self._decided[key] = self.full or not self.store.input_unchanged(unit, fingerprint)
            self._unit[key] = unit
            self.units[unit] = fingerprint
        if not self._decided[key]:
            self.unchanged += 1
        return self._decided[key]
