"""The whole flow: read -> recognise -> fold -> map/plan -> deliver -> report.

`run_sync` is what `didomi-marketo sync` calls; `--dry-run` stops after the plan.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar, cast

import orjson

from didomi_marketo.check import BLOCKING_KINDS, schema_problems
from didomi_marketo.config import DEFAULT_DAILY_QUOTA, RATE_WINDOW_SECONDS, Config, DeliverySettings
from didomi_marketo.defaults import DEFAULT_BULK_THRESHOLD as DEFAULT_BULK_THRESHOLD
from didomi_marketo.deliver import DeliveryStats, Engine
from didomi_marketo.deliver_bulk import BulkEngine
from didomi_marketo.didomi.fold import SPILL_THRESHOLD, Fold, FoldSchema, Stamp, stamp_from_json
from didomi_marketo.didomi.readers import ALL_DATES, MAX_LINE_BYTES, DateWindow, InputFile
from didomi_marketo.errors import ConfigError, DidomiMarketoError, FatalError
from didomi_marketo.inputs import (
    InputFilter,
    InputStats,
    Shards,
    build_fold,
    default_jobs,
    read_sharded,
    stopped_by_signals,
)
from didomi_marketo.marketo.client import CallFailed, GaveUp, MarketoClient, RetryPolicy, Token
from didomi_marketo.marketo.credentials import Credentials
from didomi_marketo.marketo.limiter import Clock
from didomi_marketo.marketo.schema import fetch_schema
from didomi_marketo.outcomes import LeadOutcome, LeadUpdate
from didomi_marketo.plan import Planner, PriorState
from didomi_marketo.report import Report, delivered_consent, read_retryable
from didomi_marketo.sharded import ShardPlanning, plan_shards
from didomi_marketo.state import LeadState, StateLock, StateStore
from didomi_marketo.storage import check_urls
from didomi_marketo.summary import RunSummary, exit_code, failed_run

SAMPLES = 3
VIA = ("auto", "rest", "bulk")
BULK_CALLS_PER_FILE = 3  # an upload and about two polls (measured: 15 files, 15 uploads + 35 polls)
T = TypeVar("T")
Progress = Callable[[str, int, int | None], None]  # (phase: read|plan|deliver, done, total or None)


@dataclass
class SyncOptions:
    paths: list[str]
    dry_run: bool = False
    allow_incomplete: bool = False
    output: str | None = None  # dry run: every payload as NDJSON
    rate_window: float = RATE_WINDOW_SECONDS  # Marketo's rate window (compressed in the sandbox bench)
    daily_quota: int = DEFAULT_DAILY_QUOTA
    spill_threshold: int = SPILL_THRESHOLD
    state: str | None = None  # the state store (incremental syncs)
    full: bool = False  # ignore the state for this run (and refresh it)
    wait_lock: float = 0.0  # seconds to wait for another run holding the state lock
    check_schema: bool = True  # refuse to send when a mapped field is missing or read-only
    window: DateWindow = ALL_DATES  # --since / --until: which date= partitions to read
    via: str = "auto"  # rest | bulk | auto: Sync Leads, bulk import, or bulk above bulk_threshold
    bulk_threshold: int = DEFAULT_BULK_THRESHOLD  # leads to send from which `auto` picks bulk
    jobs: int | None = None  # processes reading and folding; None: the cores available
    max_line_bytes: int = MAX_LINE_BYTES  # a longer input line is rejected, never held in memory
    recheck_skipped: bool = False  # re-send the newest known consent of 1004/1007-skipped leads


@dataclass
class RunResult:
    summary: RunSummary
    exit_code: int
    samples: list[dict[str, Any]]
    fatal: str | None = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# the run


class _Tee:
    """Passes lead updates through while keeping a few samples and writing `--output`."""

    def __init__(self, updates: Iterable[LeadUpdate], output: IO[bytes] | None):
        self.updates, self.output = updates, output
        self.samples: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[LeadUpdate]:
        for u in self.updates:
            if len(self.samples) < SAMPLES:
                self.samples.append(u.payload)
            if self.output is not None:
                self.output.write(orjson.dumps(u.payload) + b"\n")
            yield u


P = ParamSpec("P")


def _summary_on_failure(mode: str) -> Callable[[Callable[P, RunResult]], Callable[P, RunResult]]:
    """A run that stops before its end (bad credentials, a refused schema, the state locked, a
    full disk) still writes summary.json, with the reason, before the error goes on up."""

    def decorate(run: Callable[P, RunResult]) -> Callable[P, RunResult]:
        @functools.wraps(run)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> RunResult:
            started = time.time()
            try:
                return run(*args, **kwargs)
            except (DidomiMarketoError, OSError, sqlite3.Error) as e:
                config, report = cast(Config, args[0]), cast(Report, args[2])
                report.fail(failed_run(mode, started, time.time(), config.identity(), e))
                raise

        return wrapper

    return decorate


@_summary_on_failure("sync")
def run_sync(
    config: Config,
    options: SyncOptions,
    report: Report,
    *,
    credentials: Credentials | None = None,
    clock: Clock | None = None,
    on_progress: Callable[[str, int, int | None], None] | None = None,
    sinks: list[Any] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> RunResult:
    """Run one sync (or dry run). Never raises for bad input: it is counted and reported.

    `on_warning` sees each warning the moment it is found (the CLI prints it before a long run);
    all of them also come back in `RunResult.warnings`."""
    started = time.time()
    refuse_bulk(config, options.via)
    input_stats = InputStats()
    warnings, warn = _warnings(on_warning)
    resumed: DeliveryStats | None = None
    preflight: Preflight | None = None
    timings: dict[str, Any] = {}
    marks: dict[str, float] = {}  # monotonic instants of the run's steps (timings.since_start)
    with open_state(options, warn) as store:
        fold = build_fold(config, report.issue, options.spill_threshold)
        shards: Shards | None = None
        if store is not None and credentials is not None and not options.dry_run:
            store.bind_instance(credentials.base_url)
        try:
            check_urls(options.paths)  # a URL without its extra installed: exit 2 before any call
            if not options.dry_run:
                assert credentials is not None
                # The token, the schema check and today's usage are fetched while the input is
                # read: neither needs the other. A failure stops the reading at the next file.
                preflight = Preflight(credentials, config, store, options, warn)
            inputs = InputFilter(store, options.full, config) if store is not None else None
            # The run's Planner. On several cores the workers that read also plan, each a shard of
            # the leads, with the same one; they inherit this as they start.
            planning = ShardPlanning(
                config.mappings, fold.schema, config.lookup_field, config.action, send_all=options.full,
                state=options.state if store is not None else None,
                fresher=store is not None and not options.dry_run,
                updates=not options.dry_run or options.output is not None, samples=SAMPLES,
            )  # fmt: skip
            read_started = marks["read_started"] = time.monotonic()
            with _reading_progress(on_progress, input_stats), stopped_by_signals():
                shards = read_sharded(fold, options.paths, options.allow_incomplete, input_stats, inputs,
                                      options.window, jobs=options.jobs or default_jobs(),
                                      on_start=preflight.start if preflight else None,
                                      check=preflight.check if preflight else None,
                                      max_line_bytes=options.max_line_bytes, context=planning)  # fmt: skip
            fold_ended = time.monotonic()
            # On several cores the workers start planning now, while the schema check may still
            # be under way: nothing they plan is used (or reaches the state) before it passed.
            # Not when a killed run left bulk jobs: what they confirm must not be planned again.
            resuming = store is not None and credentials is not None and bool(store.open_bulk_jobs())
            early = _planning(options, store, fold, shards, planning, on_progress) if not resuming else None
            if preflight is not None:
                with stopped_by_signals("waiting for Marketo's checks"):
                    if early is not None and store is None:
                        early = _plan_while_waiting(early, preflight, config.delivery)
                    preflight.finish(store)
                marks.update(preflight.marks)  # raises what it found (bad credentials, missing fields)
                if resuming:
                    assert store is not None and credentials is not None
                    # Before planning: what those jobs confirm is not planned (or sent) again.
                    resumed = asyncio.run(
                        _resume(config, credentials, options, report, store, sinks, clock, preflight.calls)
                    )
            timings["read_and_fold_seconds"] = round(fold_ended - read_started, 3)
            marks["fold_ended"] = fold_ended
            if inputs is not None:
                input_stats.files_unchanged = inputs.unchanged
            if fold.stats.user_deletions:
                warn(deletions_warning(fold.stats.user_deletions, config.deletions))
            folded, fresher, planner, updates = early or _planning(
                options, store, fold, shards, planning, on_progress
            )
            output = _open_output(options.output)
            try:
                tee = _Tee(updates, output)
                delivery = send_updates(config, credentials, options, tee, report, store, sinks, clock,
                                        on_progress, folded, warn, resumed=resumed,
                                        preflight=preflight)  # fmt: skip
                if delivery is not None and delivery.first_call_at is not None and clock is None:
                    timings["first_call_after_fold_seconds"] = round(delivery.first_call_at - fold_ended, 3)
                    marks["first_call"] = delivery.first_call_at
                    if delivery.last_answer_at is not None:
                        marks["last_answer"] = delivery.last_answer_at
                if fresher is not None:
                    fresher.flush()  # before the inputs count as synced
                if delivery is not None and inputs is not None and store is not None:
                    if store.unrecorded:
                        # Outcomes that never reached the state (a full disk): its inputs must
                        # be read again, or their unsent leads would be lost for good.
                        warn(
                            f"{store.unrecorded} lead outcomes could not be written to {store.path}; "
                            "its inputs are not recorded as synced, so the next run reads them again"
                        )
                    else:
                        # Every lead of these inputs is now confirmed, skipped or pending in the
                        # state: the next sync may skip them while they stay unchanged.
                        store.remember_inputs(inputs.units)
            finally:
                if output is sys.stdout.buffer:
                    output.flush()
                elif output is not None:
                    output.close()
        finally:
            if shards is not None:
                shards.close()
            fold.close()
    marks["summary"] = time.monotonic()
    if (since := since_start(marks)) is not None:
        timings["since_start"] = since
    summary = RunSummary(
        "dry-run" if options.dry_run else "sync", started, time.time(), config.identity(), planner.stats,
        exit_code=exit_code(delivery, bool(fold.stats.rejected or input_stats.partitions_refused),
                            bool(input_stats.access_denied)),
        inputs=input_stats, fold=fold.stats, leads_folded=planner.stats.leads, delivery=delivery,
        extra={"timings": timings} | ({"warnings": warnings} if warnings else {}),
    )  # fmt: skip
    report.finish(summary.to_json())
    fatal = delivery.fatal if delivery else None
    return RunResult(summary, summary.exit_code, tee.samples, fatal, warnings)


def process_started() -> float | None:
    """When this process started, on time.monotonic()'s scale (from /proc: Linux, 10 ms ticks),
    or None: the interpreter's start and the imports are part of every run's time to its first call."""
    try:
        with open("/proc/self/stat", "rb") as f:
            after_name = f.read().rsplit(b")", 1)[1].split()
        ticks = int(after_name[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def since_start(marks: dict[str, float]) -> dict[str, float] | None:
    """Each step's instant as seconds since the process started, in the order they happened."""
    started = process_started()
    if started is None:
        return None
    return {name: round(t - started, 3) for name, t in sorted(marks.items(), key=lambda kv: kv[1])}


# (leads folded, the state's writer of fresher stamps, the run's Planner, its updates)
Planned = tuple[int, "_KnownWriter | None", Planner, Iterator[LeadUpdate]]


def _planning(options: SyncOptions, store: StateStore | None, fold: Fold, shards: Shards | None,
              planning: ShardPlanning, on_progress: Progress | None,
              ) -> Planned:  # fmt: skip
    """(leads folded, the state's writer of fresher stamps, the run's Planner, its updates): on
    several cores the workers plan from this call on; on one, the updates are planned as read."""
    # For the quota estimate and the progress bar.
    folded = shards.size_hint() if shards is not None else fold.size_hint()
    fresher = _KnownWriter(store) if store is not None and not options.dry_run else None
    # --full sends every lead, but still never an older consent than the state knows.
    planner = planning.planner(
        store,
        recheck_skipped=options.recheck_skipped,
        on_fresher=fresher.add if fresher is not None else None,
    )
    show_plan = on_progress if options.dry_run else None  # a sync shows delivery instead
    if shards is not None:
        planned = _progress_of("plan", show_plan, folded) if show_plan is not None else None
        return (
            folded,
            fresher,
            planner,
            plan_shards(shards, planner, fresher.add if fresher else None, planned),
        )
    leads = fold.leads()
    if show_plan is not None:
        leads = _planning_progress(leads, show_plan, folded)
    return folded, fresher, planner, planner.plan(leads)


def _plan_while_waiting(planned: Planned, preflight: Preflight, delivery: DeliverySettings) -> Planned:
    """Plan the first two rounds of batches while the preflight's calls are still under way (time
    the run otherwise spends waiting), so that the first round of calls leaves at once: planned
    one batch at a time as workers asked, its ten calls went out over 50-60 ms.

    Only for a run without a state: with one, the state would learn from the planning (newer
    stamps of unchanged values) before the checks pass, and a run whose leads are mostly unchanged
    would plan nearly all of them to find two rounds to send, holding what it learned meanwhile."""
    folded, fresher, planner, updates = planned
    limit = 2 * delivery.max_concurrency * delivery.batch_size
    ahead: list[LeadUpdate] = []
    while preflight.running() and len(ahead) < limit:
        chunk = list(itertools.islice(updates, delivery.batch_size))
        ahead += chunk
        if len(chunk) < delivery.batch_size:
            break
    return folded, fresher, planner, itertools.chain(ahead, updates)


class _KnownWriter:
    """Batches StateStore.remember_known writes (one transaction per 1,000 leads)."""

    def __init__(self, store: StateStore):
        self.store = store
        self.batch: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def add(self, key: str, fields: dict[str, Any], stamps: dict[str, Any]) -> None:
        self.batch.append((key, dict(fields), dict(stamps)))
        if len(self.batch) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            try:
                self.store.remember_known(self.batch)
            except (sqlite3.Error, OSError):
                # A full disk: these leads' inputs must be read again next run (not recorded).
                self.store.unrecorded += len(self.batch)
            self.batch = []


def deletions_warning(n: int, deletions: str) -> str:
    """user.deleted is often an erasure request: a compliance team must hear of every one."""
    done = (
        "ignored (deletions: ignore): Marketo keeps their consent fields"
        if deletions == "ignore"
        else "revoked (deletions: revoke): every mapped consent field is set to no consent"
    )
    return f"{n} user.deleted record(s), often erasure requests, were {done}; see ignored.ndjson"


@contextmanager
def _reading_progress(on_progress: Progress | None, stats: InputStats, every: float = 0.25) -> Iterator[None]:
    """The read phase (records read so far), reported from a timer thread so that the read
    loop itself, the hot path of a backfill, carries no callback."""
    if on_progress is None:
        yield
        return
    report: Progress = on_progress  # narrowed for the thread
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            report("read", stats.records, None)

    report("read", 0, None)
    ticker = threading.Thread(target=tick, name="read-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        report("read", stats.records, stats.records)


def _planning_progress(
    leads: Iterable[T], on_progress: Progress, total: int, every: int = 1000
) -> Iterator[T]:
    """The plan phase of a dry run: folded leads mapped so far, of `total`."""
    done = 0
    for lead in leads:
        done += 1
        if done % every == 0:
            on_progress("plan", done, total)
        yield lead
    on_progress("plan", done, total)


def _progress_of(phase: str, on_progress: Progress, total: int) -> Callable[[int], None]:
    """A callback adding up what `phase` got done (the leads of a shard planned, of a batch
    delivered) and reporting the running total."""
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        on_progress(phase, done, total)

    return add


def _warnings(on_warning: Callable[[str], None] | None) -> tuple[list[str], Callable[[str], None]]:
    """A list that collects warnings, and the callback that adds to it and passes each on."""
    found: list[str] = []

    def warn(message: str) -> None:
        found.append(message)
        if on_warning is not None:
            on_warning(message)

    return found, warn


def _open_output(path: str | None) -> IO[bytes] | None:
    if path is None:
        return None
    if path == "-":  # stdout, as Unix tools read `-` (run_sync flushes it, never closes it)
        return sys.stdout.buffer
    try:
        return open(path, "wb")  # noqa: SIM115 - closed by run_sync
    except OSError as e:
        raise ConfigError(f"--output {path}: cannot write ({e.strerror})") from None


@contextmanager
def open_state(
    options: SyncOptions, warn: Callable[[str], None] | None = None
) -> Iterator[StateStore | None]:
    """The state store with its lock (a dry run only reads it, so it takes no lock)."""
    if not options.state:
        yield None
        return
    if options.dry_run:
        # A preview never creates, migrates or locks a state. One that does not exist yet is
        # previewed as the first run it would be (everything sent), said out loud in case the
        # path is a typo.
        if not Path(options.state).exists():
            if warn is not None:
                warn(
                    f"--state {options.state} does not exist yet: previewing a first run (nothing is created)"
                )
            yield None
            return
        store = StateStore(options.state, readonly=True)
        try:
            yield store
        finally:
            store.close()
        return
    lock = StateLock(options.state)
    lock.acquire(options.wait_lock)
    try:
        store = StateStore(options.state)
        try:
            yield store
        finally:
            store.close()
    finally:
        lock.release()


def send_updates(config: Config, credentials: Credentials | None, options: SyncOptions, updates: Iterable[LeadUpdate],
          report: Report, store: StateStore | None, sinks: list[Any] | None, clock: Clock | None,
          on_progress: Callable[[str, int, int | None], None] | None, expected: int,
          warn: Callable[[str], None], earlier_calls: Iterable[float] = (),
          resumed: DeliveryStats | None = None,
          preflight: Preflight | None = None) -> DeliveryStats | None:  # fmt: skip
    """Deliver the updates (outcomes to the report, the state and `sinks`), or just drain them."""
    if options.dry_run:
        with stopped_by_signals("planning a dry run"):
            for _ in updates:
                pass
        return None
    assert credentials is not None
    all_sinks = [*(sinks or []), *([store] if store is not None else [])]
    return asyncio.run(
        _deliver(
            config,
            credentials,
            options,
            updates,
            report,
            all_sinks,
            clock,
            on_progress,
            expected,
            warn,
            [*earlier_calls, *(preflight.calls if preflight is not None else ())],
            store,
            resumed,
            preflight,
        )  # fmt: skip
    )


SCHEMA_CACHE = "marketo_lead_fields"
SCHEMA_MAX_AGE = 24 * 3600.0  # Adobe: cache describe results for about a day


class Preflight:
    """What must hold before sending, checked in a thread while the input is read: the credentials
    work, every mapped field exists in Marketo and is writable (instead of thousands of 1006
    skips), and today's usage (for the quota warning). `finish` raises what it found."""

    def __init__(self, credentials: Credentials, config: Config, store: StateStore | None,
                 options: SyncOptions, warn: Callable[[str], None]):  # fmt: skip
        self.credentials, self.config, self.warn = credentials, config, warn
        self.check_schema, self.daily_quota = options.check_schema, options.daily_quota
        # SQLite connections stay in their thread: the cache is read here and written in finish.
        self.cached = store.cached(SCHEMA_CACHE, SCHEMA_MAX_AGE) if store and self.check_schema else None
        self.fields: list[dict[str, Any]] | None = None
        self.calls: list[float] = []  # when its REST calls started: they count in the rate window
        self.token: Token | None = None
        self.used: int | None = None
        self.read_usage = self.usage_read = False
        self.error: BaseException | None = None
        self.marks: dict[str, float] = {}  # when its steps happened (timings.since_start)
        self._thread = threading.Thread(target=self._run, name="preflight", daemon=True)
        self._switch_interval = sys.getswitchinterval()

    def start(self, files: list[InputFile]) -> None:
        # Today's usage matters to runs of 50 calls or more: read it now when the input is big
        # enough to be one; a smaller run reads it after the fold, only if it needs to.
        calls = usage_read_from(self.daily_quota)
        self.read_usage = (
            sum(_size(f) for f in files) >= calls * self.config.delivery.batch_size * BYTES_PER_LEAD
        )
        # The reading holds the GIL in long stretches; a shorter switch interval lets this
        # thread answer its sockets within a millisecond instead of five.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        self._thread.start()

    def running(self) -> bool:
        """Its calls are still under way (finish would wait)."""
        return self._thread.is_alive()

    def check(self) -> None:
        """Between files: stop reading as soon as the preflight has failed."""
        if self.error is not None:
            raise self.error

    def finish(self, store: StateStore | None) -> None:
        """Wait for the calls (a thread dies with the process if the reading is interrupted)."""
        if self._thread.ident is None:  # no input at all: nothing was read meanwhile
            self._run()
        self._thread.join()
        sys.setswitchinterval(self._switch_interval)
        if self.error is not None:
            raise self.error
        if store is not None and self.fields is not None and self.cached is None:
            store.cache(SCHEMA_CACHE, self.fields)
        fields = self.cached if self.cached is not None else self.fields
        if fields is None:
            return
        problems = schema_problems(self.config.mappings, self.config.lookup_field, fields)
        # Refuse only what Marketo would skip for every lead (missing or read-only field); a type
        # doubt is a warning here and a finding of `check`.
        errors = [p for p in problems if p.kind in BLOCKING_KINDS]
        for p in problems:
            if p not in errors:
                self.warn(f"{p.where + ': ' if p.where else ''}{p.message}")
        if errors:
            raise ConfigError(
                [f"{p.where + ': ' if p.where else ''}{p.message}" for p in errors]
                + ["nothing was sent: fix the mapping (see `didomi-marketo check`), or --skip-schema-check"]
            )

    def _run(self) -> None:
        self.marks["preflight_started"] = time.monotonic()
        try:
            asyncio.run(self._calls())
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by check/finish
            self.error = e

    async def _calls(self) -> None:
        credentials = self.credentials
        async with MarketoClient(
            credentials, timeout=self.config.delivery.timeout, max_connections=2
        ) as client:
            # A blip at /identity is retried briefly; a wrong URL or a dead instance fails fast
            # (the delivery itself retries for minutes, per batch).
            policy = RetryPolicy(client.clock, min_attempts=3, min_seconds=0.0, base_delay=0.5, max_delay=2.0)
            try:
                await policy.run(client.token)
            except GaveUp as e:
                raise FatalError(
                    f"cannot reach Marketo at {credentials.base_url}: {e.last.message}"
                ) from None
            except CallFailed as e:
                raise FatalError(f"cannot reach Marketo at {credentials.base_url}: {e.message}") from None
            self.token = client.current_token
            self.marks["token"] = time.monotonic()
            need_schema = self.check_schema and self.cached is None
            # Both at once: each is a full round trip, and the reading rarely takes longer.
            self.fields, self.used = await asyncio.gather(
                self._schema(client) if need_schema else _none(),
                _usage(client) if self.read_usage else _none(),
            )
            self.usage_read = self.read_usage
            self.calls = list(client.recent_calls)
            if need_schema or self.read_usage:
                self.marks["schema_and_usage"] = time.monotonic()

    async def _schema(self, client: MarketoClient) -> list[dict[str, Any]] | None:
        try:
            return await fetch_schema(client)
        except FatalError as e:
            self.warn(f"schema check skipped: {e}")
            return None


async def _none() -> None:
    return None


BYTES_PER_LEAD = 35  # about the least a lead's record takes, even gzipped


def usage_read_from(daily_quota: int) -> int:
    """The calls from which a run reads today's usage first (for the quota warning).

    Under 1% of the quota, a run could only not fit with 99% of it spent, and then the 607 stop
    leaves the rest retryable anyway; the read itself is a call in the rate window, and at a
    multiple of 100 calls one more call costs the run a whole extra 20 s window."""
    return max(50, daily_quota // 100)


def _size(f: InputFile) -> int:
    try:
        return f.path.stat().st_size if f.display != "<stdin>" else 0
    except OSError:
        return 0


class _Fanout:
    """Every batch's outcomes to every sink: the state first (the durable record the next run
    trusts), then the report and the rest. A sink that fails (a full disk) never keeps the others
    from the batch; the first failure is raised once all were tried, and the engine stops the
    run naming it."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sorted(sinks, key=lambda s: not isinstance(s, StateStore))

    def batch_done(self, outcomes: list[LeadOutcome]) -> None:
        failure: Exception | None = None
        for s in self.sinks:
            try:
                s.batch_done(outcomes)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other sinks
                failure = failure or e
                if isinstance(s, StateStore):
                    s.unrecorded += len(outcomes)
        if failure is not None:
            raise failure


async def _deliver(config: Config, credentials: Credentials, options: SyncOptions, updates: Iterable[LeadUpdate],
                   report: Report, sinks: list[Any], clock: Clock | None,
                   on_progress: Callable[[str, int, int | None], None] | None, folded: int,
                   warn: Callable[[str], None], earlier_calls: list[float], store: StateStore | None,
                   resumed: DeliveryStats | None, preflight: Preflight | None) -> DeliveryStats:  # fmt: skip
    settings = config.delivery
    async with MarketoClient(
        credentials, timeout=settings.timeout, max_connections=settings.max_concurrency, clock=clock
    ) as client:
        if preflight is not None and preflight.token is not None and clock is None:
            client.reuse_token(preflight.token)  # same clock: no second identity call
        with stopped_by_signals("counting the leads to send"):  # before any call that sends
            path, why, updates = choose_path(config, options, updates, folded)
        expected_calls = math.ceil(folded / settings.batch_size)
        if path == "rest" and expected_calls >= usage_read_from(options.daily_quota):
            if preflight is not None and preflight.usage_read:
                used = preflight.used
            else:
                used = await _usage(client)
            warning = _quota_warning(used, expected_calls, options.daily_quota)
            if warning:
                warn(warning)
        progress = _progress_of("deliver", on_progress, folded) if on_progress is not None else None
        common: dict[str, Any] = dict(
            action=config.action, lookup_field=config.lookup_field, settings=settings,
            sink=_Fanout([report, *sinks]), clock=clock, on_progress=progress,
            window_seconds=options.rate_window, earlier_calls=earlier_calls, stats=resumed,
        )  # fmt: skip
        engine = BulkEngine(client, journal=store, **common) if path == "bulk" else Engine(client, **common)
        engine.stats.path, engine.stats.path_reason = path, why
        # Ctrl-C or SIGTERM (systemd, a cron timeout): stop cleanly, once. Calls in flight finish,
        # every other lead is reported retryable, the summary is written; a second signal kills.
        loop = asyncio.get_running_loop()
        hooked = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, _once(loop, sig, engine.interrupt))
                hooked.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests), or no signals here
        try:
            return await engine.run(updates)
        finally:
            for sig in hooked:
                loop.remove_signal_handler(sig)


def refuse_bulk(config: Config, via: str) -> None:
    """`--via bulk` where bulk import would create leads that upsert_mode false must not."""
    if via not in VIA:
        raise ConfigError(f"--via {via}: expected one of {', '.join(VIA)}")
    if via == "bulk" and (why := _bulk_would_create(config)):
        raise ConfigError(f"--via bulk: {why}; use --via rest, or --upsert to create leads")


def _bulk_would_create(config: Config) -> str | None:
    if config.lookup_field == "email" and config.action == "updateOnly":
        return (
            "upsert_mode is false with user_identifier email, and Marketo's bulk import creates "
            "every lead it does not find (it has no update-only mode for email)"
        )
    return None


def choose_path(
    config: Config, options: SyncOptions, updates: Iterable[LeadUpdate], folded: int
) -> tuple[str, str, Iterable[LeadUpdate]]:
    """(path, why, the same updates): `auto` counts the leads to send up to the threshold, holding
    at most that many in memory, and picks bulk import from there."""
    if options.via == "rest":
        return "rest", "--via rest", updates
    if options.via == "bulk":
        return "bulk", "--via bulk", updates
    threshold = options.bulk_threshold
    if why := _bulk_would_create(config):
        return "rest", f"auto: Sync Leads (updateOnly), because {why}", updates
    if folded < threshold:  # fewer leads folded than the threshold: fewer to send, too
        return "rest", f"auto: fewer than --bulk-threshold {threshold} leads to send", updates
    it = iter(updates)
    head = list(itertools.islice(it, threshold))
    if len(head) < threshold:
        return "rest", f"auto: {len(head)} leads to send, under --bulk-threshold {threshold}", head
    # Bulk import needs one file per set of fields sent (no cell may be empty), and each file
    # costs an upload and its polls: on consent data where people answer different purposes, the
    # sets can outnumber Sync Leads' batches. Judge by the leads at hand.
    rest_calls = math.ceil(len(head) / config.delivery.batch_size)
    field_sets = len({frozenset(u.payload) for u in head})
    bulk_calls = field_sets * BULK_CALLS_PER_FILE
    if bulk_calls >= rest_calls:
        why = (
            f"auto: Sync Leads, because these leads carry {field_sets} different sets of fields: bulk "
            f"import would need about {bulk_calls} calls (an upload and its polls per set) where Sync "
            f"Leads needs {rest_calls} for the first {len(head)} leads"
        )
        return "rest", why, itertools.chain(head, it)
    why = (
        f"auto: at least --bulk-threshold {threshold} leads to send, in {field_sets} sets of fields "
        f"(about {bulk_calls} bulk calls instead of {rest_calls} Sync Leads calls for the first {len(head)})"
    )
    return "bulk", why, itertools.chain(head, it)


async def _resume(config: Config, credentials: Credentials, options: SyncOptions, report: Report,
                  store: StateStore, sinks: list[Any] | None, clock: Clock | None,
                  earlier_calls: list[float]) -> DeliveryStats:  # fmt: skip
    """Collect the bulk jobs a killed run left in Marketo: their outcomes go to this run's report
    and to the state, as if this run had sent them."""
    settings = config.delivery
    async with MarketoClient(credentials, timeout=settings.timeout, clock=clock) as client:
        engine = BulkEngine(
            client, action=config.action, lookup_field=config.lookup_field, settings=settings,
            sink=_Fanout([report, *(sinks or []), store]), clock=clock, window_seconds=options.rate_window,
            earlier_calls=earlier_calls, journal=store,
        )  # fmt: skip
        stats = await engine.resume()
        earlier_calls.extend(client.recent_calls)
        return stats


def _once(loop: asyncio.AbstractEventLoop, sig: int, action: Callable[[], None]) -> Callable[[], None]:
    def handler() -> None:
        loop.remove_signal_handler(sig)  # the next one gets the default: stop at once
        action()

    return handler


async def _usage(client: MarketoClient) -> int | None:
    """Today's API calls so far, or None when Marketo would not say."""
    try:
        return await client.usage_today()
    except CallFailed:
        return None


def _quota_warning(used: int | None, calls: int, quota: int) -> str | None:
    """A warning when this run would not fit in what is left of today's quota."""
    if used is None:  # the check is advice: an odd usage answer never stops the run
        return "cannot read today's API usage from Marketo; the daily quota check is skipped"
    left = quota - used
    if calls > left:
        return (
            f"this run needs about {calls} calls but only {max(left, 0)} of the daily quota "
            f"({quota}) are left today ({used} used); it will stop at the quota and leave the rest "
            "retryable"
        )
    return None


# ---------------------------------------------------------------------------------------------
# retry: start at `deliver` from a report


class _NewerReports:
    """Without a state, the reports of the runs since stand in for it: per lead and field, the
    latest consent they delivered. A retried field older than that is replaced by it (the
    planner's one "keep the newer consent" rule), so a revocation is never rolled back."""

    def __init__(self, directories: list[str]):
        self.delivered: dict[str, dict[str, tuple[Any, Stamp]]] = {}
        for d in directories:
            if not (Path(d) / "delivered.ndjson").is_file():
                raise ConfigError(f"--newer {d}: not a didomi-marketo report (no delivered.ndjson)")
            delivered_consent(d, self.delivered)

    def lead(self, key: str) -> LeadState | None:
        confirmed = self.delivered.get(key)
        if not confirmed:
            return None
        return LeadState(key, confirmed, None, None, None, None, None, None, {})


@_summary_on_failure("retry")
def run_retry(
    config: Config,
    report_dir: str,
    report: Report,
    *,
    dry_run: bool = False,
    credentials: Credentials | None = None,
    clock: Clock | None = None,
    options: SyncOptions | None = None,
    on_progress: Callable[[str, int, int | None], None] | None = None,
    sinks: list[Any] | None = None,
    on_warning: Callable[[str], None] | None = None,
    force: bool = False,
    newer: list[str] | None = None,
) -> RunResult:
    """Re-send exactly the retryable leads of an earlier report, with the same engine.

    Without a state, nothing tells whether a newer sync has since delivered newer consent for
    these leads (re-sending would roll a revocation back): the reports of those newer runs
    (`newer`) stand in for it; with neither, refused unless `force`."""
    options = replace(options or SyncOptions(paths=[]), dry_run=dry_run or bool(options and options.dry_run))
    if not options.state and not newer and not options.dry_run and not force:
        raise ConfigError(
            f"retry {report_dir}: without the state, a newer sync's consent cannot be told from this "
            "report's older payloads, and re-sending them could roll a revocation back; pass --state "
            "FILE (the one your syncs use), --newer REPORT (the reports of the runs since), or --force "
            "to re-send anyway"
        )
    refuse_bulk(config, options.via)
    started = time.time()
    warnings, warn = _warnings(on_warning)
    updates = [
        LeadUpdate(
            r["key"],
            r["payload"],
            r.get("source", ""),
            {k: stamp_from_json(v) for k, v in (r.get("stamps") or {}).items()},
        )  # fmt: skip
        for r in read_retryable(report_dir, warn)
    ]
    mismatched = [u.key for u in updates if config.lookup_field not in u.payload]
    if mismatched:
        raise FatalError(
            f"{report_dir}: leads were reported under another lookup field than the config's "
            f"'{config.lookup_field}' (e.g. {mismatched[0]}); use the config of the original run"
        )
    delivery = None
    with open_state(options) as store:
        if store is not None and credentials is not None and not options.dry_run:
            store.bind_instance(credentials.base_url)
        prior: PriorState | None = store
        if store is None and newer:
            prior = _NewerReports(newer)
        planner = Planner(
            config.mappings,
            FoldSchema.from_mappings(config.mappings),
            config.lookup_field,
            prior,
            config.action,
        )
        planner.pending = set()  # retry sends the report's leads, not the state's other pending ones
        tee = _Tee(planner.reconcile(updates), None)
        delivery = send_updates(config, credentials, options, tee, report, store, sinks, clock, on_progress,
                                len(updates), warn)  # fmt: skip
    summary = RunSummary(
        "retry-dry-run" if options.dry_run else "retry", started, time.time(), config.identity(),
        planner.stats, exit_code=exit_code(delivery), delivery=delivery, from_report=str(report_dir),
        retryable=len(updates),
    )  # fmt: skip
    report.finish(summary.to_json())
    fatal = delivery.fatal if delivery else None
    return RunResult(summary, summary.exit_code, tee.samples, fatal, warnings)
