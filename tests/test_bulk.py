"""marketo/bulk.py: the CSV files it writes, and its jobs against the sandbox over real sockets,
on a hand-driven clock shared with the sandbox (no real seconds are slept)."""

from __future__ import annotations

import asyncio
import csv
import io

import pytest

from didomi_marketo.marketo.bulk import (
    FAILURE_COLUMN,
    BulkImporter,
    FileBuilder,
    cell,
    parse_rows,
)
from didomi_marketo.marketo.client import MarketoClient, RetryPolicy
from didomi_marketo.marketo.credentials import Credentials, Secret
from didomi_marketo.marketo.limiter import Limiter


def _rows(f) -> list[list[str]]:
    return list(csv.reader(io.StringIO(f.data().decode("utf-8"), newline="")))


def test_leads_with_different_field_sets_go_to_different_files_so_no_cell_is_empty():
    b = FileBuilder("email")
    payloads = [
        {"email": "a@x.com", "optIn": True, "topics": 'news, "events"'},
        {"email": "b@x.com", "optIn": False},
        {"email": "c@x.com", "topics": "é,ü\nline", "optIn": False},
        {"email": "d@x.com", "score": 3},
    ]
    for p in payloads:
        assert b.add(p, p["email"].encode()) is None
    files = {f.fields: f for f in b.flush()}
    assert set(files) == {("email", "optIn", "topics"), ("email", "optIn"), ("email", "score")}
    both = _rows(files[("email", "optIn", "topics")])
    assert both == [["email", "optIn", "topics"], ["a@x.com", "true", 'news, "events"'],
                    ["c@x.com", "false", "é,ü\nline"]]  # fmt: skip
    assert _rows(files[("email", "optIn")]) == [["email", "optIn"], ["b@x.com", "false"]]
    assert files[("email", "optIn", "topics")].tags_blob().splitlines() == [b"a@x.com", b"c@x.com"]
    for f in files.values():
        assert all(c != "" for row in _rows(f) for c in row)


def test_a_file_is_sealed_before_it_reaches_the_size_limit():
    b = FileBuilder("email", max_bytes=200)
    sealed = [f for i in range(40) if (f := b.add({"email": f"user{i:03}@example.com", "x": True}, b"t"))]
    sealed += b.flush()
    assert all(f.size < 200 and len(f.data()) == f.size for f in sealed)
    assert sum(f.rows for f in sealed) == 40 and len(sealed) > 1
    with pytest.raises(ValueError, match="over the bulk file limit"):
        FileBuilder("email", max_bytes=50).add({"email": "x" * 60}, b"t")


def test_cells_and_result_rows():
    assert [cell(True), cell(False), cell(3), cell("a")] == ["true", "false", "3", "a"]
    with pytest.raises(ValueError):
        cell(None)
    data = f"email,optIn,{FAILURE_COLUMN}\nA@X.com,maybe,bad value\n,true,no key\n".encode()
    assert parse_rows(data, "email", FAILURE_COLUMN) == ({"a@x.com": "bad value"}, 1)
    assert parse_rows(b"", "email", FAILURE_COLUMN) == ({}, 0)


class HandClock:
    """Time moves only when someone sleeps; the sandbox's bulk jobs read the same clock."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


class Gate:
    def __init__(self, clock: HandClock) -> None:
        self.limiter = Limiter(100, 20.0, 10, clock)

    def slot(self):
        return self.limiter.slot()


def _run(sb, clock, work):
    creds = Credentials("sandbox-client", Secret("sandbox-secret"), sb.base_url)

    async def main():
        async with MarketoClient(creds, clock=clock) as client:
            importer = BulkImporter(client, Gate(clock), RetryPolicy(clock), clock)
            return importer, await work(importer)

    return asyncio.run(main())


def test_a_job_is_polled_with_backoff_from_5_to_30_seconds_then_failures_map_to_keys(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=20, bulk_import_seconds=100)
    clock = HandClock()
    sb.bulk_clock = clock.now
    sb.seed_leads([{"email": "dup@x.com"}, {"email": "dup@x.com"}])
    b = FileBuilder("email")
    for email, value in (("ok@x.com", True), ("bad@x.com", "maybe"), ("dup@x.com", False)):
        b.add({"email": email, "didomiNewsletterOptIn": value}, email.encode())
    (f,) = b.flush()

    async def work(importer):
        batch_id = await importer.submit(f.data(), "email")
        return await importer.collect(batch_id, "email")

    importer, result = _run(sb, clock, work)
    assert result.status.status == "Complete"
    assert result.failures == {
        "bad@x.com": "Invalid value for field 'didomiNewsletterOptIn' and value 'maybe'"
    }
    assert list(result.warnings) == ["dup@x.com"] and result.unmatched == 0
    assert clock.sleeps[:5] == [5.0, 7.5, 11.25, 16.875, 25.3125] and max(clock.sleeps) == 30.0
    assert sum(clock.sleeps) >= 120  # it waited out the whole job, polling every <= 30 s
    s = importer.stats
    assert (s.uploads, s.file_fetches, s.polls) == (1, 2, len(clock.sleeps))
    assert sb.lead_by_email("ok@x.com")["didomiNewsletterOptIn"] is True


def test_a_full_queue_1016_is_waited_out_never_dropped(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=60, bulk_max_queued=2)
    clock = HandClock()
    sb.bulk_clock = clock.now
    for i in range(2):  # another integration's jobs fill the queue for 60 s
        assert "batchId" in sb.submit_bulk(f"email\nother{i}@x.com\n".encode())

    async def work(importer):
        batch_id = await importer.submit(b"email,didomiNewsletterOptIn\nme@x.com,true\n", "email")
        return await importer.collect(batch_id, "email")

    importer, result = _run(sb, clock, work)
    assert result.status.status == "Complete" and importer.stats.queue_full_waits >= 3
    assert sb.stats()["bulk_too_many_imports"] == importer.stats.queue_full_waits
    assert sb.lead_by_email("me@x.com")["didomiNewsletterOptIn"] is True


def test_a_failed_job_is_reported_failed_without_fetching_files(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=1)
    clock = HandClock()
    sb.bulk_clock = clock.now

    async def work(importer):
        return await importer.collect(await importer.submit(b"email,nope\na@x.com,1\n", "email"), "email")

    importer, result = _run(sb, clock, work)
    assert result.status.status == "Failed" and "nope" in result.status.message
    assert importer.stats.file_fetches == 0 and importer.stats.jobs_failed == 1


def test_one_poller_asks_about_the_oldest_job_only(sandbox_factory):
    """Four jobs, two importing at a time for 100 s each: polling each job on its own would
    spend ~26 calls; asking about the oldest unfinished one spends 16: 7 until the first two
    finish at 100 s, 1 for the second, 1 at once for the third (still importing), 6 until the
    last two finish at 200 s, 1 for the last."""
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=100)
    clock = HandClock()
    sb.bulk_clock = clock.now

    async def work(importer):
        ids = [await importer.submit(f"email\nu{i}@x.com\n".encode(), "email") for i in range(4)]
        return await asyncio.gather(*(importer.collect(i, "email") for i in ids))

    importer, results = _run(sb, clock, work)
    assert [r.status.status for r in results] == ["Complete"] * 4
    assert importer.stats.polls == 16 == sb.stats()["bulk_status_calls"]
