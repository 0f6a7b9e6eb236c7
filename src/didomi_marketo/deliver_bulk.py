"""Deliver lead updates by Marketo bulk import, to the same outcomes as Sync Leads.

Leads go into CSV files, one per set of fields to send and per 10 MB (marketo/bulk.py); at most
10 jobs are in Marketo's queue at once; each finished job's failures and warnings rows are
mapped back to their leads by the lookup column. Every lead then gets the LeadOutcome a Sync
Leads call would have given it (delivered, skipped with Marketo's reason, or failed retryable),
and the report and the state take them as they take REST outcomes.

Crash safety: with a journal (the state), a job is recorded with its leads before its upload
starts and its batch id as soon as Marketo answers; the next run collects the jobs a killed
run left in Marketo (`resume`) instead of uploading them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson

from didomi_marketo.deliver import DeliveryStats, Engine
from didomi_marketo.errors import AuthError
from didomi_marketo.marketo.bulk import (
    MAX_ACTIVE_JOBS,
    MAX_FILE_BYTES,
    BulkImporter,
    CsvFile,
    FileBuilder,
    JobResult,
    key_of,
    row_code,
)
from didomi_marketo.marketo.client import CallFailed, GaveUp, Stopped
from didomi_marketo.marketo.codes import (
    AUTH,
    BULK_JOB_FAILED,
    BULK_UNMATCHED,
    INTERNAL,
    QUOTA_RESET_NOTE,
    STOPPED,
    Action,
    describe,
    is_expected_skip,
)
from didomi_marketo.outcomes import LeadOutcome, LeadUpdate

CHUNK = 1000  # outcomes handed to the sinks (one state transaction) at a time


class JobJournal(Protocol):
    """Where submitted jobs survive a crash: the state store."""

    def bulk_intent(self, lookup_field: str, rows: bytes) -> int: ...

    def bulk_submitted(self, job: int, batch_id: int) -> None: ...

    def bulk_done(self, job: int) -> None: ...

    def open_bulk_jobs(self) -> list[tuple[int, int | None, str, bytes]]: ...


def _row(u: LeadUpdate) -> bytes:
    """What a job must remember of a lead to give it an outcome later, in this or the next run."""
    return orjson.dumps([u.key, u.source, u.payload, u.stamps])


def _updates(rows: Iterable[bytes]) -> Iterator[LeadUpdate]:
    for line in rows:
        if line:
            key, source, payload, stamps = orjson.loads(line)
            yield LeadUpdate(key, payload, source, stamps)


def _chunks(updates: Iterable[LeadUpdate]) -> Iterator[list[LeadUpdate]]:
    chunk: list[LeadUpdate] = []
    for u in updates:
        chunk.append(u)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BulkEngine(Engine):
    """The REST engine's limiter, retry policy, budget, stop and sinks, with bulk jobs for calls."""

    def __init__(
        self,
        *args: Any,
        journal: JobJournal | None = None,
        max_file_bytes: int = MAX_FILE_BYTES,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.journal = journal
        self.max_file_bytes = max_file_bytes
        s = self.settings
        self.importer = BulkImporter(
            self.client, self, self.policy, self.clock, poll_min=s.bulk_poll_min_seconds,
            poll_max=s.bulk_poll_max_seconds, should_stop=lambda: self.stats.stop_reason,
        )  # fmt: skip
        if self.stats.bulk is not None:  # a run that resumed jobs first goes on counting
            self.importer.stats = self.stats.bulk
        self.stats.bulk = self.importer.stats
        # Under lookupField id the import is update-only; else it creates or updates.
        self.bulk_action = "updateOnly" if self.lookup_field == "id" else "createOrUpdate"

    # -- the run ------------------------------------------------------------------------------

    async def run(self, updates: Iterable[LeadUpdate]) -> DeliveryStats:
        """Upload one file per field set per 10 MB, at most MAX_ACTIVE_JOBS jobs in Marketo."""
        builder = FileBuilder(self.lookup_field, self.max_file_bytes)
        room = asyncio.Semaphore(MAX_ACTIVE_JOBS)
        jobs: list[asyncio.Task[None]] = []

        async def launch(f: CsvFile) -> None:
            await room.acquire()
            jobs.append(asyncio.create_task(self._job(f, room)))

        try:
            for n, u in enumerate(updates):
                if (full := builder.add(u.payload, _row(u))) is not None:
                    await launch(full)
                if n % 500 == 0:
                    await asyncio.sleep(0)  # let polls and uploads run while files fill
            for f in builder.flush():
                await launch(f)
        finally:
            await asyncio.gather(*jobs)
        return self._final_stats()

    async def resume(self) -> DeliveryStats:
        """Collect the jobs an earlier (killed) run left in Marketo, before anything is planned.

        A job recorded without a batch id died during its upload: Marketo may or may not have
        it, so it is forgotten and its leads, never confirmed in the state, are planned again.
        So is a job keyed by another lookup field (the config's identifier changed since)."""
        assert self.journal is not None
        tasks = []
        for job, batch_id, lookup_field, rows in self.journal.open_bulk_jobs():
            if batch_id is None or lookup_field != self.lookup_field:
                self.journal.bulk_done(job)
                continue
            tasks.append(asyncio.create_task(self._collect(job, batch_id, rows.splitlines())))
        await asyncio.gather(*tasks)
        return self._final_stats()

    # -- one job ------------------------------------------------------------------------------

    async def _job(self, f: CsvFile, room: asyncio.Semaphore) -> None:
        try:
            rows = f.tags_blob()
            if self.stats.stop_reason:
                self._fail(_updates(rows.splitlines()), STOPPED, self.stats.stop_reason)
                return
            job = self.journal.bulk_intent(self.lookup_field, rows) if self.journal else None
            try:
                batch_id = await self.importer.submit(f.data(), self.lookup_field)
            except Exception as e:
                code, why = self._failure(e)
                self._fail(_updates(rows.splitlines()), code, why)
                if self.journal is not None and job is not None:
                    self.journal.bulk_done(job)
                return
            if self.journal is not None and job is not None:
                self.journal.bulk_submitted(job, batch_id)
            await self._collect(job, batch_id, rows.splitlines())
        except Exception as e:  # noqa: BLE001 - a job must never die silently: stop the run
            why = f"delivery stopped by an unexpected error: {type(e).__name__}: {e}"
            self.stop(why, fatal=why)
        finally:
            f.close()
            room.release()

    async def _collect(self, job: int | None, batch_id: int, rows: list[bytes]) -> None:
        try:
            result = await self.importer.collect(batch_id, self.lookup_field)
        except Exception as e:
            # The job is still in Marketo: keep it in the journal, so the next run collects it.
            code, why = self._failure(e)
            self._fail(_updates(rows), code, f"{why}; bulk job {batch_id} is left for the next --state run")
            return
        for chunk in _chunks(_updates(rows)):
            self._finish(chunk, [self._outcome(u, result) for u in chunk])
        if self.journal is not None and job is not None:
            self.journal.bulk_done(job)  # after the outcomes: a crash in between collects again

    def _outcome(self, u: LeadUpdate, result: JobResult) -> LeadOutcome:
        job = result.status
        if job.status == "Failed":
            why = f"bulk job {job.batch_id} failed: {job.message or 'no reason given'}"
            return LeadOutcome(u.key, u.payload, u.source, "failed", BULK_JOB_FAILED, why, retryable=True,
                               stamps=u.stamps)  # fmt: skip
        key = key_of(u.payload[self.lookup_field], self.lookup_field)
        if key in result.failures:
            reason = result.failures[key]
            code = row_code(reason)
            return LeadOutcome(u.key, u.payload, u.source, "skipped", code, reason,
                               expected=is_expected_skip(code, self.bulk_action), stamps=u.stamps)  # fmt: skip
        if key in result.warnings:
            return LeadOutcome(
                u.key, u.payload, u.source, "imported", reason=result.warnings[key], stamps=u.stamps
            )
        if result.unmatched:
            why = f"bulk job {job.batch_id}: {result.unmatched} failed or warned rows named no lead"
            return LeadOutcome(u.key, u.payload, u.source, "failed", BULK_UNMATCHED, why, retryable=True,
                               stamps=u.stamps)  # fmt: skip
        return LeadOutcome(u.key, u.payload, u.source, "imported", stamps=u.stamps)

    # -- failures -----------------------------------------------------------------------------

    def _failure(self, e: Exception) -> tuple[str, str]:
        """(code, reason) for a job that could not be uploaded or followed; stops the run when
        the cause would stop Sync Leads too (quota, abort, credentials)."""
        if isinstance(e, GaveUp):
            return e.last.code, str(e)
        if isinstance(e, Stopped):
            self.stop(e.reason, fatal=e.reason)  # a no-op unless the --max-calls budget stopped it
            return STOPPED, e.reason
        if isinstance(e, AuthError):
            self.stop(str(e), fatal=str(e))
            return AUTH, str(e)
        if isinstance(e, CallFailed):
            if e.action is Action.QUOTA:
                why = f"Marketo daily quota reached (607); {QUOTA_RESET_NOTE}"
                self.stop(why, fatal=why)
            elif e.action is Action.ABORT:
                why = f"Marketo refused the call: {e} ({describe(e.code)})"
                self.stop(why, fatal=why)
            return e.code, str(e)
        why = f"delivery stopped by an unexpected error: {type(e).__name__}: {e}"
        self.stop(why, fatal=why)
        return INTERNAL, why

    def _fail(self, updates: Iterable[LeadUpdate], code: str, reason: str) -> None:
        for chunk in _chunks(updates):
            self._finish(chunk, self._undelivered(chunk, code, reason))
