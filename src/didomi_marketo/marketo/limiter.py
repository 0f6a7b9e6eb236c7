"""Client-side limits: a sliding window of N calls per W seconds and M calls in flight.

Marketo counts a call when it arrives and until it answers; we count from just before sending
to after the answer, so our in-flight count always covers Marketo's. The window gets a small
margin because Marketo sees each call a little later than we start it, by a varying delay.

`stop` (Ctrl-C, SIGTERM, quota, --max-calls) wakes every caller waiting for a slot or for room
in the window at once: at real limits that wait can be the whole 20 s window.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Protocol

# Marketo's documented limits per instance, shared by every integration (our defaults too).
from didomi_marketo.defaults import MAX_CONCURRENCY as MAX_CONCURRENCY
from didomi_marketo.defaults import RATE_CALLS as RATE_CALLS
from didomi_marketo.defaults import RATE_WINDOW_SECONDS as RATE_WINDOW_SECONDS


class Clock(Protocol):
    """Time, injectable: tests pass a fake clock so retries and windows cost no real seconds."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Stopped(Exception):
    """The run was stopped (quota, abort, budget, Ctrl-C) while this call waited; it stays
    undelivered. Raised by a stopped Limiter and by the retry policy."""

    @property
    def reason(self) -> str:
        return str(self)


class Limiter:
    """Marketo's two limits, enforced before each call: `slot()` waits until a call fits in the
    sliding window (N calls per W seconds, with an arrival-jitter margin) and under the
    concurrency cap, then holds the slot until the answer. Shared by every worker of a run, and
    seeded with the calls made before delivery (auth, describe, usage) so they count too."""

    def __init__(self, calls: int, window: float, concurrency: int, clock: Clock | None = None):
        self.calls = calls
        self.window = window
        # Arrival-time jitter on Marketo's side: 1% of the window plus 50 ms (0.25 s of 20 s).
        self.effective_window = window * 1.01 + 0.05
        self.concurrency = concurrency
        self.clock = clock or RealClock()
        self._slots = asyncio.Semaphore(concurrency)
        self._started: deque[float] = deque()
        self._window_lock = asyncio.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._stopped = asyncio.Event()
        self._stop_reason = ""

    def stop(self, reason: str) -> None:
        """No more calls: every waiting caller (and every later one) raises Stopped."""
        if not self._stopped.is_set():
            self._stop_reason = reason
            self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def seed(self, started: Iterable[float]) -> None:
        """Count calls made outside this limiter (the schema check, the usage read) in the window."""
        self._started.extend(sorted(started))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one call slot: wait for a free concurrency slot, then for room in the window.
        Raises Stopped once the limiter is stopped, instead of waiting on."""
        async with self._slots:
            self._check()
            await self._enter_window()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1

    def _check(self) -> None:
        if self._stopped.is_set():
            raise Stopped(self._stop_reason)

    async def _enter_window(self) -> None:
        # Only the sleep below needs waking: the callers queued on the lock or the semaphore get
        # through them at once when the sleeper gives up, then find the limiter stopped.
        async with self._window_lock:
            while True:
                self._check()
                now = self.clock.now()
                horizon = now - self.effective_window
                started = self._started
                while started and started[0] <= horizon:
                    started.popleft()
                if len(started) < self.calls:
                    started.append(now)
                    return
                # At least a millisecond: float rounding must not leave a zero-length wait.
                wait = max(started[0] - horizon, 0.001)
                sleep = asyncio.ensure_future(self.clock.sleep(wait))
                stopped = asyncio.ensure_future(self._stopped.wait())
                try:
                    await asyncio.wait((sleep, stopped), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleep.cancel()
                    stopped.cancel()
