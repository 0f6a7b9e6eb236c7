"""Deliver lead updates to Marketo: full batches, concurrent calls within the limits, retries,
and one outcome per lead (created / updated / skipped / failed, retryable or not).

Each lead is sent once per run (the fold made keys unique), so no two in-flight calls ever
carry the same lookup value: Marketo documents that concurrent upserts of one key duplicate it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from didomi_marketo.config import DeliverySettings
from didomi_marketo.errors import AuthError
from didomi_marketo.marketo.bulk import BulkStats
from didomi_marketo.marketo.client import CallFailed, GaveUp, MarketoClient, RetryPolicy, Stopped
from didomi_marketo.marketo.codes import (
    AUTH,
    INTERNAL,
    QUOTA_RESET_NOTE,
    RESULT_MISMATCH,
    SMALL_BODY_REFUSED,
    STOPPED,
    UNKNOWN_STATUS,
    Action,
    describe,
    is_expected_skip,
)
from didomi_marketo.marketo.limiter import RATE_WINDOW_SECONDS, Clock, Limiter, RealClock
from didomi_marketo.outcomes import LeadOutcome, LeadUpdate, OutcomeSink

MAX_BODY_BYTES = 1_000_000  # Marketo refuses > 1 MB (1,048,576) with HTTP 413; keep a margin
ENVELOPE_BYTES = 100  # {"action":...,"lookupField":...,"input":[ ]}
SYNC_PATH = "/rest/v1/leads.json"
# While delivering, the bookkeeping thread holds the GIL for long stretches: a shorter switch
# interval hands it to the event loop within half a millisecond of an answer (default: 5 ms).
SWITCH_INTERVAL = 0.0005


@dataclass
class DeliveryStats:
    sent: int = 0  # leads posted to Marketo at least once
    created: int = 0
    updated: int = 0
    imported: int = 0  # bulk import: delivered, but Marketo does not say created or updated
    skipped: Counter = field(default_factory=Counter)  # code -> leads
    expected_skips: int = 0
    failed: int = 0
    failed_retryable: int = 0
    calls: int = 0
    batches: int = 0
    splits: int = 0
    retries: int = 0
    reauths: int = 0
    backoff_seconds: float = 0.0
    rate_limited: int = 0  # 606 seen
    concurrency_limited: int = 0  # 615 seen
    max_in_flight: int = 0
    first_call_at: float | None = None
    last_answer_at: float | None = None
    stop_reason: str | None = None  # why the run stopped early (quota, abort, budget)
    fatal: str | None = None  # the fatal error's message, for exit code 3
    path: str = "rest"  # rest (Sync Leads) | bulk (bulk import)
    path_reason: str = ""  # why that path: the --via choice, or what `auto` saw
    bulk: BulkStats | None = None

    @property
    def delivery_seconds(self) -> float:
        if self.first_call_at is None or self.last_answer_at is None:
            return 0.0
        return max(0.0, self.last_answer_at - self.first_call_at)

    @property
    def leads_per_second(self) -> float:
        s = self.delivery_seconds
        return (self.delivered + sum(self.skipped.values())) / s if s else 0.0

    @property
    def delivered(self) -> int:
        return self.created + self.updated + self.imported

    @property
    def unexpected_skips(self) -> int:
        return sum(self.skipped.values()) - self.expected_skips


def batches(updates: Iterable[LeadUpdate], size: int) -> Iterable[list[LeadUpdate]]:
    """Full batches: at most `size` leads and under 1 MB of JSON each."""
    batch: list[LeadUpdate] = []
    used = ENVELOPE_BYTES
    for u in updates:
        n = len(orjson.dumps(u.payload)) + 1
        if batch and (len(batch) >= size or used + n > MAX_BODY_BYTES):
            yield batch
            batch, used = [], ENVELOPE_BYTES
        batch.append(u)
        used += n
    if batch:
        yield batch


class Engine:
    """Runs batches through `concurrency` workers sharing one limiter, retry policy and client."""

    def __init__(
        self,
        client: MarketoClient,
        *,
        action: str,
        lookup_field: str,
        settings: DeliverySettings,
        sink: OutcomeSink,
        clock: Clock | None = None,
        on_progress: Callable[[int], None] | None = None,
        window_seconds: float = RATE_WINDOW_SECONDS,
        earlier_calls: Iterable[float] = (),
        stats: DeliveryStats | None = None,
    ):
        self.client = client
        self.action = action
        self.lookup_field = lookup_field
        self.settings = settings
        self.sink = sink
        self.clock = clock or client.clock or RealClock()
        self.limiter = Limiter(
            settings.max_calls_per_20s, window_seconds, settings.max_concurrency, self.clock
        )
        self.limiter.seed([*earlier_calls, *client.recent_calls])
        self.policy = RetryPolicy(
            self.clock, min_attempts=settings.retry_min_attempts, min_seconds=settings.retry_min_seconds
        )
        self.on_progress = on_progress
        self.stats = stats or DeliveryStats()  # a run that collected bulk jobs first goes on counting
        self._books: ThreadPoolExecutor | None = None  # run(): planning and the sinks, off the loop

    # -- the run ------------------------------------------------------------------------------

    async def run(self, updates: Iterable[LeadUpdate]) -> DeliveryStats:
        """Deliver every update and hand one outcome per lead to the sink, batch by batch.

        Batches (<= batch_size leads, < 1 MB) go to `max_concurrency` workers sharing one limiter;
        each batch is retried per the code table until it succeeds or gives up. A stop (quota,
        --max-calls, abort, signal) drains the rest as `stopped` outcomes, so nothing is lost.

        The bookkeeping (planning the next batch: the `updates` iterator, and recording outcomes:
        the sinks) runs in one thread of its own, one step at a time and in order, so that the
        event loop is free to send the next call the moment an answer frees a slot: done on the
        loop, it cost 10-25 ms per batch, and at 10 calls in flight a round of 300 ms calls took
        about 400 ms. The sinks and the iterator are only ever touched from that thread."""
        queue: asyncio.Queue[list[LeadUpdate] | None] = asyncio.Queue(
            maxsize=self.settings.max_concurrency * 2
        )
        loop = asyncio.get_running_loop()
        self._books = ThreadPoolExecutor(1, thread_name_prefix="delivery-books")
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL))
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.settings.max_concurrency)]
        try:
            planned = iter(batches(updates, self.settings.batch_size))
            while (batch := await loop.run_in_executor(self._books, next, planned, None)) is not None:
                await queue.put(batch)
        finally:
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
            self._books.shutdown()
            self._books = None
            sys.setswitchinterval(switch_interval)
        return self._final_stats()

    def _final_stats(self) -> DeliveryStats:
        stats = self.stats
        stats.retries += self.policy.retries
        stats.backoff_seconds += self.policy.backoff_seconds
        stats.rate_limited += self.policy.rate_limited
        stats.concurrency_limited += self.policy.concurrency_limited
        stats.reauths = self.client.reauths  # the client's count: engines of one run share it
        stats.max_in_flight = max(stats.max_in_flight, self.limiter.max_in_flight)
        return stats

    async def _worker(self, queue: asyncio.Queue[list[LeadUpdate] | None]) -> None:
        """Deliver batch after batch. A batch's outcomes are written while the worker already sends
        its next batch (at most one write in flight per worker): waiting for the state's write
        (8 ms on average, 60 ms at worst, one at a time in the bookkeeping thread) left ten
        workers idle in turn and stretched every round of calls by 15-45 ms."""
        recording: asyncio.Task[None] | None = None
        while (batch := await queue.get()) is not None:
            outcomes = await self._deliver_or_stop(batch)
            if recording is not None:
                await recording  # never raises: a worker must never die, the producer would block
            recording = asyncio.create_task(self._record(batch, outcomes))
        if recording is not None:
            await recording

    async def _deliver_or_stop(self, batch: list[LeadUpdate]) -> list[LeadOutcome]:
        """`_deliver`, and for an answer we did not foresee: stop the run, keep draining, and the
        batch is undelivered (retryable), so that every lead still gets an outcome."""
        try:
            return await self._deliver(batch)
        except Exception as e:  # noqa: BLE001 - see above
            return self._undelivered(batch, INTERNAL, self._unexpected(e))

    def _unexpected(self, e: Exception) -> str:
        why = f"delivery stopped by an unexpected error: {type(e).__name__}: {e}"
        self.stop(why, fatal=why)
        return why

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: finish the calls in flight, leave everything else retryable."""
        why = "interrupted: calls in flight were finished, the rest is left retryable"
        self.stop(why, fatal=why)

    def stop(self, reason: str, fatal: str | None = None) -> None:
        if self.stats.stop_reason is None:
            self.stats.stop_reason = reason
        # Workers waiting for room in the rate window give up now, not when the window turns.
        self.limiter.stop(self.stats.stop_reason)
        if fatal and self.stats.fatal is None:
            self.stats.fatal = fatal

    async def _deliver(self, batch: list[LeadUpdate]) -> list[LeadOutcome]:
        """One batch's outcomes, in the batch's order: sent (and retried, or split) until Marketo
        answered or the policy gave up; the caller records them."""
        if self.stats.stop_reason:
            return self._undelivered(batch, STOPPED, self.stats.stop_reason)
        try:
            results = await self.policy.run(lambda: self._send(batch), lambda: self.stats.stop_reason)
        except GaveUp as e:
            note = " (Marketo may have applied it: resending is safe)" if e.last.maybe_applied else ""
            return self._undelivered(batch, e.last.code, f"{e}{note}")
        except Stopped as e:
            self.stop(e.reason, fatal=e.reason)  # a no-op unless the --max-calls budget stopped it
            return self._undelivered(batch, STOPPED, e.reason)
        except AuthError as e:
            self.stop(str(e), fatal=str(e))
            return self._undelivered(batch, AUTH, str(e))
        except CallFailed as e:
            action = e.action
            if action is Action.SPLIT and len(batch) > 1:
                self.stats.splits += 1
                half = len(batch) // 2
                # Each half on its own: what Marketo answered for one stays its outcome,
                # whatever happens to the other.
                return await self._deliver_or_stop(batch[:half]) + await self._deliver_or_stop(batch[half:])
            if action is Action.QUOTA:
                why = f"Marketo daily quota reached (607); {QUOTA_RESET_NOTE}"
                self.stop(why, fatal=why)
            elif action is Action.ABORT:
                why = f"Marketo refused the call: {e} ({describe(e.code)})"
                self.stop(why, fatal=why)
            elif action is Action.SPLIT:
                return self._undelivered(batch, e.code, "lead payload alone is over 1 MB", retryable=False)
            return self._undelivered(batch, e.code, str(e))
        return self._outcomes(batch, results)

    async def _send(self, batch: list[LeadUpdate]) -> list[dict[str, Any]]:
        """One attempt: take a call slot, spend one call of the budget, read per-lead results."""
        stats = self.stats
        # Encode before taking a slot: a slot is Marketo's time, not ours.
        body = orjson.dumps(
            {"action": self.action, "lookupField": self.lookup_field, "input": [u.payload for u in batch]}
        )
        async with self.slot():
            try:
                answer = await self.client.call("POST", SYNC_PATH, body=body)
            except CallFailed as e:
                if e.action is Action.SPLIT and len(body) <= MAX_BODY_BYTES:
                    # Under Marketo's bound already: halves cannot help (a proxy answering 413 to
                    # everything split 490 leads into 978 calls, then skipped each for good).
                    raise CallFailed(
                        SMALL_BODY_REFUSED, f"{e.message} for {len(body):,} bytes (under 1 MB)"
                    ) from None
                raise
        results = answer.get("result")
        if not isinstance(results, list) or len(results) != len(batch):
            got = len(results) if isinstance(results, list) else "no"
            raise CallFailed(
                RESULT_MISMATCH,
                f"Marketo answered {got} results for {len(batch)} leads; not counted as delivered",
                maybe_applied=True,
            )
        stats.batches += 1
        return results

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One call's turn: a limiter slot, then the stop flag and the --max-calls budget."""
        stats = self.stats
        budget = self.settings.max_calls
        async with self.limiter.slot():
            if stats.stop_reason:
                raise Stopped(stats.stop_reason)
            stats.calls += 1
            if budget is not None and stats.calls >= budget:
                # The budget's last call: whoever waits for a slot or the window gives up now
                # (and stops the run); a run that needs no more calls ends normally.
                self.limiter.stop(f"the --max-calls budget of {budget} calls is spent")
            if stats.first_call_at is None:
                stats.first_call_at = self.clock.now()
            try:
                yield
            finally:
                stats.last_answer_at = self.clock.now()

    # -- outcomes -----------------------------------------------------------------------------

    def _outcomes(self, batch: list[LeadUpdate], results: list[dict[str, Any]]) -> list[LeadOutcome]:
        """result[i] answers input[i] (Adobe: same order)."""
        out = []
        for u, r in zip(batch, results, strict=True):
            status = r.get("status") if isinstance(r, dict) else None
            if status in ("created", "updated"):
                out.append(
                    LeadOutcome(u.key, u.payload, u.source, status, lead_id=r.get("id"), stamps=u.stamps)
                )
                continue
            reasons = r.get("reasons") if isinstance(r, dict) else None
            first = (
                reasons[0] if isinstance(reasons, list) and reasons and isinstance(reasons[0], dict) else {}
            )
            code = str(first.get("code", "unknown"))
            message = str(first.get("message", "")) or describe(code)
            if status == "skipped":
                out.append(
                    LeadOutcome(
                        u.key, u.payload, u.source, "skipped", code, message,
                        expected=is_expected_skip(code, self.action), stamps=u.stamps,
                    )
                )  # fmt: skip
            else:
                out.append(
                    LeadOutcome(
                        u.key, u.payload, u.source, "failed", UNKNOWN_STATUS,
                        f"Marketo answered status {status!r}", retryable=True, stamps=u.stamps,
                    )
                )  # fmt: skip
        return out

    def _undelivered(
        self, batch: list[LeadUpdate], code: str, reason: str, retryable: bool = True
    ) -> list[LeadOutcome]:
        return [
            LeadOutcome(
                u.key, u.payload, u.source, "failed", code, reason, retryable=retryable, stamps=u.stamps
            )
            for u in batch
        ]

    def _finish(self, batch: list[LeadUpdate], outcomes: list[LeadOutcome]) -> None:
        self.sink.batch_done(outcomes)  # first: a lead is counted only once its outcome is recorded
        self._counted(outcomes)

    async def _record(self, batch: list[LeadUpdate], outcomes: list[LeadOutcome]) -> None:
        """`_finish` for run(): the sinks write in the bookkeeping thread while the loop sends.
        A sink that cannot write (disk full, state locked) stops the run; the batch then counts
        as undelivered, retryable, in whatever sink can still take it. Never raises (its worker
        awaits it): a progress display that fails stops the run too, and the batch stays counted
        as it was recorded."""
        assert self._books is not None, "only while run() goes"
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._books, self.sink.batch_done, outcomes)
        except Exception as e:  # noqa: BLE001 - the run must go on draining, with an outcome per lead
            outcomes = self._undelivered(batch, INTERNAL, self._unexpected(e))
            with contextlib.suppress(Exception):  # the sink is what failed: they are counted below
                await loop.run_in_executor(self._books, self.sink.batch_done, outcomes)
        try:
            self._counted(outcomes)  # counts first: only the progress display can raise
        except Exception as e:  # noqa: BLE001 - see above
            self._unexpected(e)

    def _counted(self, outcomes: list[LeadOutcome]) -> None:
        self._count(outcomes)
        if self.on_progress is not None:
            self.on_progress(len(outcomes))

    def _count(self, outcomes: list[LeadOutcome]) -> None:
        stats = self.stats
        for o in outcomes:
            if o.code != STOPPED:
                stats.sent += 1
            if o.status == "created":
                stats.created += 1
            elif o.status == "updated":
                stats.updated += 1
            elif o.status == "imported":
                stats.imported += 1
            elif o.status == "skipped":
                stats.skipped[o.code] += 1
                stats.expected_skips += o.expected
            else:
                stats.failed += 1
                stats.failed_retryable += o.retryable
