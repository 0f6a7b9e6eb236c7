"""Marketo bulk lead import: CSV files, upload, job polling, failures and warnings files.

Adobe (Bulk Lead Import): a CSV under 10 MB whose header row names REST API fields; the job
is queued FIFO (at most 10 per instance, 2 importing, else 1016 "Too many imports"), moves
Queued -> Importing -> Complete | Failed, and is polled every 5 to 30 s. Rows that failed or
imported with a warning come back as files with the original columns plus one reason column.

Nothing here knows what a lead update or an outcome is: rows carry an opaque tag, results are
keyed by the lookup value, and deliver_bulk.py turns them into outcomes.
"""

from __future__ import annotations

import asyncio
import csv
import io
import tempfile
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from didomi_marketo.marketo.client import CallFailed, MarketoClient, RetryPolicy, Stopped
from didomi_marketo.marketo.codes import BULK_ROW_FAILED, LEAD_NOT_FOUND, UNREADABLE, Action
from didomi_marketo.marketo.limiter import Clock

BULK_LEADS_PATH = "/bulk/v1/leads.json"
# Adobe: "less than 10MB". 10,000,000 bytes leaves 4.6% of margin under 10 MiB, as Segment does.
MAX_FILE_BYTES = 10_000_000
MAX_ACTIVE_JOBS = 10  # Marketo queues 10 jobs per instance, the 2 importing included
POLL_MIN_SECONDS = 5.0  # Adobe: poll every 5 to 30 s
POLL_MAX_SECONDS = 30.0
POLL_GROWTH = 1.5
FAILURE_COLUMN = "Import Failure Reason"
WARNING_COLUMN = "Import Warning Reason"
DONE = ("Complete", "Failed")


# ---------------------------------------------------------------------------------------------
# CSV files


def cell(value: Any) -> str:
    """One CSV cell as Marketo reads it: booleans `true`/`false`, numbers as JSON writes them."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ValueError(f"cannot write {type(value).__name__} to a bulk import cell")


class CsvFile:
    """One file to upload: its header, rows and size, and each row's tag (in row order).

    Rows and tags live in temporary files, so a backfill of millions of leads holds only the
    files being filled and the jobs in flight on disk, never in memory.
    """

    def __init__(self, fields: tuple[str, ...]):
        self.fields = fields
        self.rows = 0
        self._csv: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._tags: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._text = io.StringIO()
        self._writer = csv.writer(self._text, lineterminator="\n")
        self.size = self._write(list(fields))

    def _encode(self, cells: list[str]) -> bytes:
        self._text.seek(0)
        self._text.truncate()
        self._writer.writerow(cells)  # the csv module quotes commas, quotes and newlines
        return self._text.getvalue().encode("utf-8")

    def _write(self, cells: list[str]) -> int:
        line = self._encode(cells)
        self._csv.write(line)
        return len(line)

    def row_bytes(self, payload: dict[str, Any]) -> bytes:
        return self._encode([cell(payload[f]) for f in self.fields])

    def add(self, line: bytes, tag: bytes) -> None:
        self._csv.write(line)
        self.size += len(line)
        self.rows += 1
        self._tags.write(tag.replace(b"\n", b" ") + b"\n")

    def data(self) -> bytes:
        self._csv.seek(0)
        return self._csv.read()

    def tags_blob(self) -> bytes:
        self._tags.seek(0)
        return self._tags.read()

    def close(self) -> None:
        self._csv.close()
        self._tags.close()


class FileBuilder:
    """Groups rows into files by the set of fields they carry, so no cell is ever empty (an
    empty cell could blank a field in Marketo), and seals a file before it reaches `max_bytes`.
    """

    def __init__(self, lookup_field: str, max_bytes: int = MAX_FILE_BYTES):
        self.lookup_field = lookup_field
        self.max_bytes = max_bytes
        self._open: dict[tuple[str, ...], CsvFile] = {}

    def add(self, payload: dict[str, Any], tag: bytes) -> CsvFile | None:
        """Add one row; returns a file that is full, if this row did not fit in it."""
        lookup = self.lookup_field
        fields = (lookup, *sorted(k for k in payload if k != lookup))
        current = self._open.get(fields)
        if current is None:
            current = self._open[fields] = CsvFile(fields)
        line = current.row_bytes(payload)
        sealed = None
        if current.rows and current.size + len(line) >= self.max_bytes:
            sealed = current
            current = self._open[fields] = CsvFile(fields)
        if current.size + len(line) >= self.max_bytes:
            current.close()
            del self._open[fields]
            raise ValueError(f"one lead's row is {len(line)} bytes: over the bulk file limit")
        current.add(line, tag)
        return sealed

    def flush(self) -> list[CsvFile]:
        """The files still being filled (at the end of the input)."""
        files = [f for f in self._open.values() if f.rows]
        self._open.clear()
        return files


# ---------------------------------------------------------------------------------------------
# Jobs


@dataclass
class JobStatus:
    batch_id: int
    status: str  # Queued | Importing | Complete | Failed
    processed: int = 0
    failed: int = 0
    warned: int = 0
    message: str = ""


@dataclass
class JobResult:
    """What one finished job says, per lookup value (as the keys were written)."""

    status: JobStatus
    failures: dict[str, str] = field(default_factory=dict)  # lookup value -> Marketo's reason
    warnings: dict[str, str] = field(default_factory=dict)
    unmatched: int = 0  # failure/warning rows we could not map back to a lookup value


class Gate(Protocol):
    """Where every bulk call takes its turn: the delivery limiter plus the run's budget."""

    def slot(self) -> AbstractAsyncContextManager[None]: ...


@dataclass
class BulkStats:
    uploads: int = 0
    polls: int = 0
    file_fetches: int = 0
    queue_full_waits: int = 0  # 1016 (or 1019) answers waited out
    jobs_failed: int = 0


def key_of(value: Any, lookup_field: str) -> str:
    """A lookup value as it reads in a CSV, normalised the way the keys were folded."""
    text = cell(value).strip() if not isinstance(value, str) else value.strip()
    return text.lower() if lookup_field == "email" else text


# Bulk rows carry Marketo's text and no code. One text has a Sync Leads twin that decides what a
# run means (an id that is no lead is an expected skip under update-only), so it gets that code.
_ROW_CODES = {"lead not found": LEAD_NOT_FOUND}


def row_code(reason: str) -> str:
    """The code a failed row is reported under: 1004 for "Lead not found", else `bulk_failed`."""
    return _ROW_CODES.get(reason.strip().lower(), BULK_ROW_FAILED)


def parse_rows(data: bytes, lookup_field: str, reason_column: str) -> tuple[dict[str, str], int]:
    """A failures/warnings file -> {lookup value: reason}, and how many rows had no lookup value."""
    text = data.decode("utf-8-sig", "replace")
    if not text.strip():
        return {}, 0
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    rows = [r for r in reader if r]
    if lookup_field not in header or reason_column not in header:
        return {}, len(rows)
    k, r = header.index(lookup_field), header.index(reason_column)
    found: dict[str, str] = {}
    unmatched = 0
    for row in rows:
        if len(row) <= max(k, r) or not row[k].strip():
            unmatched += 1
            continue
        found[key_of(row[k], lookup_field)] = row[r]
    return found, unmatched


class BulkImporter:
    """Uploads files and follows their jobs to the end, within the gate, with retries."""

    def __init__(
        self,
        client: MarketoClient,
        gate: Gate,
        policy: RetryPolicy,
        clock: Clock,
        *,
        poll_min: float = POLL_MIN_SECONDS,
        poll_max: float = POLL_MAX_SECONDS,
        should_stop: Callable[[], str | None] = lambda: None,
    ):
        self.client = client
        self.gate = gate
        self.policy = policy
        self.clock = clock
        self.poll_min = poll_min
        self.poll_max = max(poll_max, poll_min)
        self.should_stop = should_stop
        self.stats = BulkStats()
        self._waiting: dict[int, asyncio.Future[JobStatus]] = {}  # by batch id, oldest first
        self._poller: asyncio.Task[None] | None = None

    async def _call(self, attempt: Callable[[], Any]) -> Any:
        async def once() -> Any:
            async with self.gate.slot():
                return await attempt()

        return await self.policy.run(once, self.should_stop)

    async def submit(self, data: bytes, lookup_field: str) -> int:
        """Create the import job; a full queue (1016) is waited out, never dropped."""
        delay = self.poll_min
        while True:
            try:
                body = await self._call(
                    lambda: self.client.call(
                        "POST",
                        BULK_LEADS_PATH,
                        files={"file": ("leads.csv", data, "text/csv")},
                        data={"format": "csv", "lookupField": lookup_field},
                    )
                )
            except CallFailed as e:
                if e.action is not Action.WAIT:
                    raise
                self.stats.queue_full_waits += 1
                await self.clock.sleep(delay)
                delay = min(self.poll_max, delay * POLL_GROWTH)
                if why := self.should_stop():
                    raise Stopped(why) from None
                continue
            self.stats.uploads += 1
            result = (body.get("result") or [{}])[0]
            try:
                return int(result["batchId"])
            except (KeyError, TypeError, ValueError):
                raise CallFailed(UNREADABLE, "the bulk import answer has no batchId") from None

    async def status(self, batch_id: int) -> JobStatus:
        body = await self._call(lambda: self.client.call("GET", f"/bulk/v1/leads/batch/{batch_id}.json"))
        self.stats.polls += 1
        r = (body.get("result") or [{}])[0]
        return JobStatus(
            batch_id,
            str(r.get("status", "")),
            int(r.get("numOfLeadsProcessed") or 0),
            int(r.get("numOfRowsFailed") or 0),
            int(r.get("numOfRowsWithWarning") or 0),
            str(r.get("message") or ""),
        )

    async def wait(self, batch_id: int) -> JobStatus:
        """Wait until the job is Complete or Failed.

        One poller serves every job, oldest first: Marketo imports its FIFO queue two at a time,
        so a job behind an unfinished one is rarely done, and polling it would spend a call for
        nothing. The poller asks about the oldest job first after poll_min, then less often, up
        to every poll_max; when a job finishes it asks about the next one at once."""
        future: asyncio.Future[JobStatus] = asyncio.get_running_loop().create_future()
        self._waiting[batch_id] = future
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        return await future

    async def _poll(self) -> None:
        delay: float | None = self.poll_min
        await self.clock.sleep(self.poll_min)
        while self._waiting:
            batch_id, future = next(iter(self._waiting.items()))
            try:
                job = await self.status(batch_id)
            except Exception as e:  # noqa: BLE001 - every waiting job learns why, none hangs
                self._fail_waiting(e)
                return
            if job.status in DONE:
                del self._waiting[batch_id]
                future.set_result(job)
                delay = None  # the next job may be done already: ask at once, then from poll_min
                continue
            if why := self.should_stop():
                self._fail_waiting(Stopped(why))
                return
            delay = self.poll_min if delay is None else min(self.poll_max, delay * POLL_GROWTH)
            await self.clock.sleep(delay)

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)

    async def collect(self, batch_id: int, lookup_field: str) -> JobResult:
        """Wait for the job, then read its failures and warnings (only when there are some)."""
        job = await self.wait(batch_id)
        result = JobResult(job)
        if job.status == "Failed":
            self.stats.jobs_failed += 1
            return result
        for count, name, column, into in (
            (job.failed, "failures", FAILURE_COLUMN, result.failures),
            (job.warned, "warnings", WARNING_COLUMN, result.warnings),
        ):
            if not count:
                continue
            path = f"/bulk/v1/leads/batch/{batch_id}/{name}.json"
            data = await self._call(lambda p=path: self.client.fetch_file(p))  # type: ignore[misc]
            self.stats.file_fetches += 1
            rows, unmatched = parse_rows(data, lookup_field, column)
            into.update(rows)
            # Rows the file did not name (or could not): the caller cannot tell which leads.
            result.unmatched += unmatched + max(0, count - len(rows) - unmatched)
        return result
