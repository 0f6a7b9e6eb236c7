"""Stops are prompt: workers waiting for room in the rate window give up at once (issue #11).

The client's window here is an hour, so a worker that kept waiting would hang the test (until
pytest-timeout fails it) rather than make it slow: nothing below measures time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest
from conftest import make_config
from test_delivery import events_file, leads_file, undelivered

from didomi_marketo.marketo.limiter import Limiter, Stopped


class FrozenClock:
    """Time never moves: a caller sleeping for the window sleeps until it is woken."""

    def __init__(self) -> None:
        self.sleepers = 0

    def now(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.sleepers += 1
        await asyncio.Event().wait()  # forever, unless cancelled


def test_stop_wakes_the_caller_waiting_for_the_window_and_those_queued_behind_it():
    clock = FrozenClock()
    limiter = Limiter(calls=2, window=20.0, concurrency=4, clock=clock)
    outcomes: list[str] = []

    async def call() -> None:
        try:
            async with limiter.slot():
                outcomes.append("called")
        except Stopped as e:
            outcomes.append(f"gave up: {e.reason}")

    async def main() -> None:
        tasks = [asyncio.create_task(call()) for _ in range(5)]
        while clock.sleepers == 0:  # two called; one sleeps for the window, two queue behind it
            await asyncio.sleep(0)
        assert outcomes == ["called", "called"] and not any(t.done() for t in tasks[2:])
        limiter.stop("quota reached")
        await asyncio.gather(*tasks)  # would never return if a waiter kept waiting

    asyncio.run(main())
    assert outcomes == ["called", "called"] + ["gave up: quota reached"] * 3
    assert clock.sleepers == 1


def test_a_stopped_limiter_refuses_new_callers():
    limiter = Limiter(calls=10, window=20.0, concurrency=2, clock=FrozenClock())
    limiter.stop("interrupted")

    async def main() -> None:
        async with limiter.slot():
            pass

    with pytest.raises(Stopped, match="interrupted"):
        asyncio.run(main())


def _hour_window_config(tmp_path, sb):
    # Two calls an hour on our side: the third batch waits for the window, an hour.
    return make_config(
        tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 2, "max_calls_per_20s": 2}
    )


@pytest.mark.parametrize("stop", ["max-calls", "607"])
def test_budget_and_quota_stops_do_not_wait_for_the_window(sandbox_factory, tmp_path, cli, stop):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 50)))
    events_file(tmp_path, 50)
    config = _hour_window_config(tmp_path, sb)
    args = ["--max-calls", 2] if stop == "max-calls" else []
    if stop == "607":
        sb.inject("code:607", times=1)
    res = cli("sync", tmp_path / "events.ndjson", "-c", config, "--rate-window", 3600,
              "--skip-schema-check", "--report", tmp_path / "r", "-q", *args)  # fmt: skip
    assert res.exit_code == 3
    assert ("--max-calls" if stop == "max-calls" else "607") in res.stderr
    assert sb.stats()["sync_calls"] <= 2  # nobody waited out the hour to make a third call
    updated = json.loads((tmp_path / "r" / "summary.json").read_text())["delivery"]["updated"]
    assert updated == 10 * sb.stats()["sync_calls"]  # calls that Marketo applied (not the 607)
    lost = undelivered(tmp_path / "r")
    assert len(lost) == 50 - updated and all(u["retryable"] for u in lost)


def test_sigterm_does_not_wait_for_the_window(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 50)))
    events_file(tmp_path, 50)
    config = _hour_window_config(tmp_path, sb)
    proc = subprocess.Popen(
        [sys.executable, "-m", "didomi_marketo", "sync", str(tmp_path / "events.ndjson"), "-c", str(config),
         "--rate-window", "3600", "--skip-schema-check", "--report", str(tmp_path / "r"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while sb.stats()["sync_calls"] < 2:  # both calls of the window made: the rest now waits
            if proc.poll() is not None:
                pytest.fail(f"the sync ended before the window filled: {proc.stderr.read()}")  # type: ignore[union-attr]
            subprocess.run(["sleep", "0.05"], check=True)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)  # a hang guard only: the window is an hour
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3 and "interrupted" in stderr and "Traceback" not in stderr
    assert sb.stats()["sync_calls"] == 2
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["delivery"]["updated"] == 20 and summary["delivery"]["failed_retryable"] == 30
