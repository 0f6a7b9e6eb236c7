"""Inputs: discover files, read them, and fold their records into per-lead consent.

Used by every command that reads Didomi data (sync, preview, check --sample, explain, reconcile),
so each reads exactly as `sync` does. The consent rules themselves live in `didomi/fold.py`.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import signal
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
from didomi_marketo.errors import FatalError
from didomi_marketo.mapping import FieldMapping
from didomi_marketo.outcomes import payload_hash
from didomi_marketo.scratch import ScratchDir
from didomi_marketo.state import StateStore, input_unit
from didomi_marketo.storage import check_urls, discover_url, is_url

T = TypeVar("T")


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
    _read(
        fold, paths, allow_incomplete, stats, unchanged, window, jobs, on_start, check, max_line_bytes, None
    )


def read_sharded(fold: Fold, paths: list[str], allow_incomplete: bool, stats: InputStats,
                 unchanged: InputFilter | None = None, window: DateWindow = ALL_DATES, *, jobs: int = 1,
                 on_start: Callable[[list[InputFile]], None] | None = None,
                 check: Callable[[], None] | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES, context: Any = None) -> Shards | None:  # fmt: skip
    """`read_into`, except that on several cores the folded leads stay with the workers, split by
    key into shards that `Shards.map` has them process (`context` is what that work needs: the
    workers inherit it as they start): `fold` gets only the issues and counts. None when it read
    into `fold` in this process (one core or one file, stdin, URLs). Close the Shards when done."""
    return _read(fold, paths, allow_incomplete, stats, unchanged, window, jobs, on_start, check,
                 max_line_bytes, context, sharded=True)  # fmt: skip


def _read(fold: Fold, paths: list[str], allow_incomplete: bool, stats: InputStats, unchanged: InputFilter | None,
          window: DateWindow, jobs: int, on_start: Callable[[list[InputFile]], None] | None,
          check: Callable[[], None] | None, max_line_bytes: int, context: Any,
          sharded: bool = False) -> Shards | None:  # fmt: skip
    items = list(discover_all(paths, allow_incomplete, window))
    files = [i for i in items if isinstance(i, InputFile)]
    # Local files only: stdin cannot be shared, and a storage client's threads do not fork.
    local = all(f.source is None and not f.is_stream for f in files)
    if jobs > 1 and len(files) > 1 and local:
        jobs = min(jobs, len(files))
        shards: Shards | None = None
        try:
            with signals_held():
                shards = Shards(
                    fold, jobs, shard_count(files, jobs) if sharded else 1, max_line_bytes, context
                )
            _read_parallel(fold, items, stats, unchanged, shards, not sharded, on_start, check)
        except BaseException:
            if shards is not None:
                shards.close()
            raise
        if sharded:
            return shards
        shards.close()
        return None
    if on_start is not None:
        with signals_held():
            on_start(files)
    for item in items:
        if check is not None:
            check()
        if not isinstance(item, InputFile):
            _reject_item(fold, item, stats)
        elif _wanted(item, stats, unchanged):
            with contextlib.closing(fold.staging()) as staged:
                try:
                    read = _read_file(staged, item, stats, max_line_bytes)
                finally:  # what was read is counted, even if the file is left out or a stop cut it
                    fold.stats.add(staged.stats)
                if _whole(fold, item.display, read, lambda: len(staged)):
                    fold.take(staged)
            if not read and unchanged is not None:
                unchanged.forget(item)  # not read: the next run must try it again
    return None


def _whole(fold: Fold, display: str, read: bool, leads: Callable[[], int]) -> bool:
    """Whether a file's leads may be folded in: only if the whole file was read. One that broke
    off (a truncated or corrupt gzip, a storage stream that failed) gives none: an opt-in read
    before the break can be older than an opt-out in the part that was lost. Its `leads()` are
    named in the report as one rejection (counted only then: costly once a fold spilled), and
    the next run reads the file again."""
    if read or not (n := leads()):
        return True
    fold.reject("rejected", display, 0, f"read only in part: the {n:,} leads folded from it before "
                "the break were left out (an opt-in there may be older than what the rest says)")  # fmt: skip
    return False


_STOPS = (signal.SIGINT, signal.SIGTERM)


class _Stops:
    """The state of `stopped_by_signals` (signal handlers run in the main thread, one at a time)."""

    previous: dict[signal.Signals, Any] = {}
    held = 0  # inside signals_held: a stop waits for its end
    pending: int | None = None
    doing = "reading the input"


@contextlib.contextmanager
def stopped_by_signals(doing: str = "reading the input") -> Iterator[None]:
    """Ctrl-C or SIGTERM while the run is `doing` something before any call that sends (reading,
    waiting for the schema check, planning) stops the run as a failure does: a FatalError, so the
    workers are stopped, summary.json says why, exit 3. A second signal acts as it did before
    (at once)."""
    _Stops.doing = doing
    try:
        for sig in _STOPS:
            _Stops.previous[sig] = signal.signal(sig, _stop)
    except ValueError:  # not the main thread (an embedding program): its signals stay its own
        yield
        return
    try:
        yield
    finally:
        _restore_signals()
        _Stops.pending = None


def _stop(signum: int, frame: Any = None) -> None:
    _restore_signals()
    if _Stops.held:
        _Stops.pending = signum
        return
    raise FatalError(f"interrupted ({signal.Signals(signum).name}) while {_Stops.doing}: nothing was sent")


def _restore_signals() -> None:
    while _Stops.previous:
        sig, handler = _Stops.previous.popitem()
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A stop waits while processes and threads start, and comes right after: an exception raised
    by a signal handler in the middle of Thread.start breaks threading's bookkeeping."""
    _Stops.held += 1
    try:
        yield
    finally:
        _Stops.held -= 1
    if not _Stops.held and _Stops.pending is not None:
        signum, _Stops.pending = _Stops.pending, None
        _stop(signum)


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
                fold.reject_unusable(ob, path)
    return read


# ---------------------------------------------------------------------------------------------
# Reading on every core. Phase 1: a worker folds one whole file into a Fold of its own and writes
# the folded leads to a scratch file, split by key into shards (`shard_of`); the parent replays
# each file's issues and counts strictly in input order. Then either the parent absorbs every
# file's leads in input order (`read_into`: Fold.absorb, later input wins ties), or, phase 2
# (`read_sharded`), the same workers each absorb one shard of every file, in input order, and
# process it (`Shards.map`): the parent never holds the leads, and every core plans.

_PR_SET_PDEATHSIG = 1  # prctl(2)
_PICKLE_CHUNK = 20_000  # leads held before a scratch file is written: bounded memory on both sides
SHARD_LEADS = 25_000  # leads a shard should hold (a worker holds one shard; the first waits for it)
MAX_SHARDS = 256
BYTES_PER_LEAD_GUESS = 100  # gzipped export lines per distinct user (measured: 108); a guess only


def shard_of(key: str, shards: int) -> int:
    """The shard of a lead key. crc32 rather than hash(): the same in every process and every run
    (a str's hash changes with PYTHONHASHSEED), so a run's order of leads is reproducible."""
    return zlib.crc32(key.encode()) % shards


def shard_count(files: list[InputFile], jobs: int) -> int:
    """Shards for a parallel read of `files`: at least 16 per worker (the load evens out, and the
    first shard is planned soon after the fold's end: the first Sync Leads call of 60,000 leads
    left 0.09 s after it, against 0.18 s with 4 per worker), more for a big input so that a shard stays near SHARD_LEADS
    (the leads are not counted yet: the file sizes are a guess; a bigger shard spills, as any fold)."""
    size = 0
    for f in files:
        with contextlib.suppress(OSError):  # unreadable: read_records reports it
            size += f.path.stat().st_size
    return max(16 * jobs, min(MAX_SHARDS, size // (BYTES_PER_LEAD_GUESS * SHARD_LEADS) + 1))


@dataclass
class _FileResult:
    leads: str  # scratch file of pickled [(key, state), ...] chunks
    offsets: list[list[int]]  # per shard, where its chunks start in `leads`
    count: int  # leads in the file's fold
    issues: list[tuple[str, str, int, str, Any]]
    fold: FoldStats
    inputs: InputStats
    read: bool


@dataclass
class _Worker:
    """Set in each worker at start (forked: inherited, never pickled)."""

    template: Fold
    scratch: str
    max_line_bytes: int
    shards: int
    context: Any  # what Shards.map's work needs, set up before the read (read_sharded)
    parent: int  # the process that started the workers


_worker: _Worker | None = None


def _start_worker(setup: _Worker) -> None:
    global _worker
    # Ctrl-C reaches the whole process group: the parent stops the workers, they need not trace.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the pool stopping them, their parent dying) ends them quietly, whatever handler
    # the parent had when it forked them.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(setup.parent)
    # What the parent had before the fork is never garbage here: the GC leaves it alone instead
    # of touching (and so copying) the shared pages at each full collection.
    gc.freeze()
    _worker = setup


def _die_with_parent(parent: int) -> None:
    """A parent killed outright (SIGTERM while reading, SIGKILL) takes its workers with it, at once
    and quietly (SIGTERM's default), instead of leaving them to finish a file for nobody and trace
    a BrokenPipeError on the run's stderr. Linux's PR_SET_PDEATHSIG; elsewhere they finish."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before the request: nobody to work for
        os._exit(0)


def _fold_one_file(index: int, item: InputFile) -> _FileResult:
    assert _worker is not None
    issues: list[tuple[str, str, int, str, Any]] = []
    fold = _worker.template.empty_like(lambda *issue: issues.append(issue), scratch_dir=_worker.scratch)
    stats = InputStats()
    out = os.path.join(_worker.scratch, f"file-{index}.pickle")
    try:
        read = _read_file(fold, item, stats, _worker.max_line_bytes)
        offsets, count = _write_shards(fold.leads(), out, _worker.shards)
    finally:
        fold.close()
    return _FileResult(out, offsets, count, issues, fold.stats, stats, read)


def _write_shards(
    leads: Iterable[tuple[str, list[Any]]], path: str, shards: int
) -> tuple[list[list[int]], int]:
    """Pickle `leads` to `path` in chunks of one shard each: (each shard's chunk offsets, leads)."""
    offsets: list[list[int]] = [[] for _ in range(shards)]
    held: list[list[tuple[str, list[Any]]]] = [[] for _ in range(shards)]
    count = 0
    with open(path, "wb") as f:

        def flush() -> None:
            for j, chunk in enumerate(held):
                if chunk:
                    offsets[j].append(f.tell())
                    pickle.dump(chunk, f, pickle.HIGHEST_PROTOCOL)
                    held[j] = []

        for lead in leads:
            held[shard_of(lead[0], shards) if shards > 1 else 0].append(lead)
            count += 1
            if count % _PICKLE_CHUNK == 0:
                flush()
        flush()
    return offsets, count


def _absorb_chunks(fold: Fold, path: str, offsets: list[int]) -> None:
    absorb = fold.absorb
    with open(path, "rb") as f, _no_gc():
        for offset in offsets:
            f.seek(offset)
            for key, state in pickle.load(f):
                absorb(key, state)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Unpickling folded leads creates a list per lead and no reference cycle: the cyclic GC would
    only scan the growing heap again and again (with it, loading took 3 to 4 times as long)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan_shard(job: tuple[int, list[tuple[str, list[int]]], Callable[..., Any], Any]) -> Any:
    """Phase 2, in a worker: shard j of every file, absorbed in input order, handed to `work`."""
    assert _worker is not None
    _, parts, work, arg = job
    # absorb reports nothing
    fold = _worker.template.empty_like(lambda *issue: None, scratch_dir=_worker.scratch)
    try:
        for path, offsets in parts:
            _absorb_chunks(fold, path, offsets)
        return work(fold.leads(), _worker.context, arg)
    finally:
        fold.close()


class Shards:
    """The folded leads of a parallel read, on disk, split by key into `count` shards, and the
    worker processes that wrote them. Close when done: it stops the workers."""

    def __init__(self, fold: Fold, jobs: int, shards: int, max_line_bytes: int, context: Any = None):
        self.count, self.jobs = shards, jobs
        self.files: list[_FileResult] = []  # in input order
        self._scratch = ScratchDir("read", fold.scratch_dir)
        self.scratch = self._scratch.name  # removed on close, with everything in it
        # A worker's fold spills past the same threshold as the parent's: a file under it is
        # folded in memory (spilling it cost a sixth more CPU than reading it on one core).
        setup = _Worker(fold, self._scratch.name, max_line_bytes, shards, context, os.getpid())
        try:
            # fork: the workers start in milliseconds with everything imported (spawn re-imports).
            # An executor, not a multiprocessing.Pool: a worker that dies (killed, out of memory)
            # fails its work with BrokenProcessPool, where a Pool would quietly replace it and
            # leave the run waiting for its result forever.
            self.pool = ProcessPoolExecutor(
                jobs, multiprocessing.get_context("fork"), _start_worker, (setup,)
            )
            self.pool.submit(os.getpid).result()  # every worker forked now, before any thread starts
        except BrokenProcessPool as e:
            self._scratch.cleanup()
            raise _worker_died() from e
        except BaseException:
            self._scratch.cleanup()
            raise

    def size_hint(self) -> int:
        """An upper bound of the distinct leads (a lead in two files counts twice), as Fold's."""
        return sum(r.count for r in self.files)

    def map(
        self, work: Callable[[Iterator[tuple[str, list[Any]]], Any, Any], T], args: list[Any]
    ) -> Iterator[T]:
        """`work(leads, context, args[j])` for each shard j, in the workers; the results in shard
        order, each as soon as it and those before it are done. `work` is a module-level function
        (it is pickled by name); `leads` are the shard's folded leads, every key once."""
        jobs = [
            (j, [(r.leads, r.offsets[j]) for r in self.files if r.offsets[j]], work, args[j])
            for j in range(self.count)
        ]
        return _unbroken(self.pool.map(_plan_shard, jobs))

    def close(self) -> None:
        # Stop the workers at once (a stopped run does not wait for a file to be folded for nobody).
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):  # no public way
            with contextlib.suppress(OSError):
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._scratch.cleanup()


def _worker_died() -> FatalError:
    return FatalError(
        "a worker process died while reading or planning (killed, or out of memory); nothing of this "
        "run is recorded as synced: run it again (--jobs 1 works in one process)"
    )


def _unbroken(results: Iterator[T]) -> Iterator[T]:
    """`results`, with a dead worker as FatalError (exit 3, the run's summary) instead of a hang."""
    try:
        yield from results
    except BrokenProcessPool as e:
        raise _worker_died() from e


def _read_parallel(fold: Fold, items: list[InputFile | Problem | IncompletePartition | Skipped], stats: InputStats,
                   unchanged: InputFilter | None, shards: Shards, absorb: bool,
                   on_start: Callable[[list[InputFile]], None] | None,
                   check: Callable[[], None] | None) -> None:  # fmt: skip
    """Phase 1: every file folded by a worker, replayed here in input order (and absorbed into
    `fold` when `absorb`); at most jobs + 1 files ahead of the replay (results wait on disk)."""
    pool, jobs = shards.pool, shards.jobs
    if on_start is not None:
        with signals_held():
            on_start([i for i in items if isinstance(i, InputFile)])
    pending: deque[tuple[int, Any]] = deque()  # (index in items, Future | None)
    submitted = 0
    for index, item in enumerate(items):
        if isinstance(item, InputFile) and _wanted(item, stats, unchanged):
            pending.append((index, pool.submit(_fold_one_file, index, item)))
            submitted += 1
        else:
            pending.append((index, None))
        while submitted > jobs or (pending and pending[0][1] is None):
            if check is not None:
                check()
            submitted -= _merge_next(fold, items, pending, stats, unchanged, shards, absorb)
    while pending:
        if check is not None:
            check()
        _merge_next(fold, items, pending, stats, unchanged, shards, absorb)


def _merge_next(fold: Fold, items: list[InputFile | Problem | IncompletePartition | Skipped],
                pending: deque[tuple[int, Any]], stats: InputStats, unchanged: InputFilter | None,
                shards: Shards, absorb: bool) -> int:  # fmt: skip
    """Replay the oldest pending item into the fold; 1 if it was a file read by a worker."""
    index, result = pending.popleft()
    item = items[index]
    if result is None:
        if not isinstance(item, InputFile):
            _reject_item(fold, item, stats)
        return 0
    try:
        done: _FileResult = result.result()
    except BrokenProcessPool as e:
        raise _worker_died() from e
    for issue in done.issues:
        fold.on_issue(*issue)
    stats.records += done.inputs.records
    for name in done.inputs.skipped_files:
        _skipped(stats, name)
    stats.access_denied.extend(done.inputs.access_denied)
    if not done.read and unchanged is not None:
        unchanged.forget(items[index])  # type: ignore[arg-type]
    fold.stats.add(done.fold)
    if not _whole(fold, items[index].display, done.read, lambda: done.count):  # type: ignore[union-attr]
        os.unlink(done.leads)
        return 1
    if absorb:
        _absorb_chunks(fold, done.leads, done.offsets[0])
        os.unlink(done.leads)
    else:
        shards.files.append(done)
    return 1


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
