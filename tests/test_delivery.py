"""The delivery engine against the sandbox with injected faults, over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MAPPINGS, event, make_config, write_ndjson

from didomi_marketo.config import load_config
from didomi_marketo.marketo.limiter import Limiter, RealClock
from didomi_marketo.report import Report
from didomi_marketo.sync import SyncOptions, run_sync


class FastClock:
    """Real time plus every sleep, taken instantly: backoff of minutes costs nothing."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def now(self) -> float:
        return time.monotonic() + self.skipped

    async def sleep(self, seconds: float) -> None:
        self.skipped += max(0.0, seconds)
        await asyncio.sleep(0)


def leads_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "leads.json"
    path.write_text(json.dumps([{"email": f"u{i}@example.com"} for i in range(n)]))
    return path


def events_file(tmp_path: Path, n: int, newsletter: bool = True) -> Path:
    return write_ndjson(
        tmp_path / "events.ndjson",
        [event(f"u{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": newsletter, "product_analytics": i % 2 == 0}) for i in range(n)],
    )  # fmt: skip


def sync(tmp_path: Path, sb, n: int, *, clock=None, report: str = "r", delivery=None, upsert=False, **cfg):
    """Run the library's sync of n events into sb; returns (result, report dir)."""
    config_path = make_config(tmp_path, sb, upsert_mode=upsert, delivery=delivery or {}, **cfg)
    config = load_config(config_path)
    rep_dir = tmp_path / report
    result = run_sync(
        config, SyncOptions(paths=[str(tmp_path / "events.ndjson")]), Report(rep_dir),
        credentials=config.credentials(), clock=clock or FastClock(),
    )  # fmt: skip
    return result, rep_dir


def assert_all_right(sb, n: int, newsletter: bool = True) -> None:
    for i in range(n):
        lead = sb.lead_by_email(f"u{i}@example.com")
        assert lead is not None, i
        assert lead["didomiNewsletterOptIn"] is newsletter, lead
        assert lead["didomiAnalyticsOptIn"] is (i % 2 == 0), lead


def undelivered(rep_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (rep_dir / "undelivered.ndjson").read_text().splitlines()]


@pytest.mark.parametrize(
    "kind", ["http:500", "http:502", "http:503", "code:604", "code:606", "code:608", "code:611",
             "code:615", "code:713", "drop", "garbage", "short_result"],
)  # fmt: skip
def test_transient_failures_are_retried_until_every_lead_lands(sandbox_factory, tmp_path, kind):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 700)))
    events_file(tmp_path, 700)
    sb.inject(kind, times=3)
    result, rep = sync(tmp_path, sb, 700)
    assert result.exit_code == 0, result.summary
    assert_all_right(sb, 700)
    d = result.summary.to_json()["delivery"]
    assert d["updated"] == 700 and d["failed"] == 0 and d["retries"] >= 3
    assert sb.stats()["faults_injected"] == 3
    assert undelivered(rep) == []


@pytest.mark.parametrize("kind", ["drop_after_apply", "http500_after_apply"])
def test_failure_after_apply_is_resent_and_creates_no_duplicates(sandbox_factory, tmp_path, kind):
    sb = sandbox_factory()  # empty Marketo: every lead is created (upsert)
    events_file(tmp_path, 400)
    sb.inject(kind, times=2)
    result, _ = sync(tmp_path, sb, 400, upsert=True)
    assert result.exit_code == 0
    assert len(sb.leads()) == 400  # createOrUpdate by email: a resent create updates
    assert_all_right(sb, 400)
    d = result.summary.to_json()["delivery"]
    assert d["created"] + d["updated"] == 400 and d["updated"] >= 1


def test_expiring_tokens_are_renewed(sandbox_factory, tmp_path):
    # 30 calls of 0.2 s, two at a time: 3 s of delivery with tokens that live 2 s.
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 1500)), token_ttl=2, latency=0.2)
    events_file(tmp_path, 1500)
    result, _ = sync(tmp_path, sb, 1500, clock=RealClock(), delivery={"max_concurrency": 2, "batch_size": 50})
    assert result.exit_code == 0, result.summary
    assert_all_right(sb, 1500)
    assert sb.stats()["tokens_issued"] >= 2


def test_injected_token_errors_reauthenticate(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 10)))
    events_file(tmp_path, 10)
    sb.inject("code:601", times=1)
    sb.inject("code:602", times=1)
    result, _ = sync(tmp_path, sb, 10)
    assert result.exit_code == 0
    assert result.summary.to_json()["delivery"]["reauths"] == 2
    assert_all_right(sb, 10)


def test_persistent_outage_gives_up_after_five_minutes_then_retry_finishes(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 50)))
    events_file(tmp_path, 50)
    sb.inject("http:503", times=10_000)
    clock = FastClock()
    result, rep = sync(tmp_path, sb, 50, clock=clock)
    assert result.exit_code == 1
    d = result.summary.to_json()["delivery"]
    assert d["failed"] == 50 and d["failed_retryable"] == 50
    assert d["retries"] >= 5 and d["backoff_seconds"] >= 300  # Didomi's promise: 5 tries in 5 min
    assert d["backoff_seconds"] < 600
    lost = undelivered(rep)
    assert len(lost) == 50 and all(u["retryable"] and u["payload"]["email"] for u in lost)
    assert sb.lead_by_email("u0@example.com").get("didomiNewsletterOptIn") is None

    sb.clear_faults()
    res = cli("retry", rep, "-c", tmp_path / "config.json", "--report", tmp_path / "r2", "--force", "-q")
    assert res.exit_code == 0, res.output
    assert_all_right(sb, 50)
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["delivery"]["updated"] == 50


def test_daily_quota_stops_at_once_and_retry_finishes_after_reset(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 100)), daily_quota=4)  # describe + 3 calls
    events_file(tmp_path, 100)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 1})
    res = cli("sync", tmp_path / "events.ndjson", "-c", config, "--report", tmp_path / "r", "-q")
    assert res.exit_code == 3
    assert "quota" in res.stderr and "US Central" in res.stderr and "Traceback" not in res.stderr
    assert sb.stats()["quota_exceeded"] == 1  # no hammering: one refused call, then stop
    lost = undelivered(tmp_path / "r")
    assert len(lost) == 70 and all(u["retryable"] for u in lost)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["delivery"]["updated"] == 30 and summary["exit_code"] == 3

    sb.config.daily_quota = 1000  # a new day (and a bigger subscription)
    httpx.post(sb.base_url + "/_sandbox/reset-quota")
    res = cli("retry", tmp_path / "r", "-c", config, "--report", tmp_path / "r2", "--force", "-q")
    assert res.exit_code == 0, res.output
    assert_all_right(sb, 100)


def test_max_calls_budget_stops_and_leaves_the_rest_retryable(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 50)))
    events_file(tmp_path, 50)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 1})
    res = cli(
        "sync", tmp_path / "events.ndjson", "-c", config, "--max-calls", 2, "--report", tmp_path / "r", "-q"
    )
    assert res.exit_code == 3 and "--max-calls" in res.stderr
    assert sb.stats()["sync_calls"] == 2
    assert len(undelivered(tmp_path / "r")) == 30


def test_a_413_for_a_body_under_1_mb_is_resent_whole_not_split(sandbox_factory, tmp_path):
    # Our batches are under Marketo's 1 MB already: a 413 for one is a proxy's limit (issue 10).
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 300)))
    events_file(tmp_path, 300)
    sb.inject("http:413", times=1)
    result, _ = sync(tmp_path, sb, 300)
    assert result.exit_code == 0
    delivery = result.summary.to_json()["delivery"]
    assert delivery["splits"] == 0 and delivery["retries"] == 1
    assert sb.stats()["sync_batch_sizes"] == [300]
    assert_all_right(sb, 300)


@pytest.mark.parametrize("code", ["code:603", "code:610", "code:612", "code:613"])
def test_abort_codes_exit_three(sandbox_factory, tmp_path, code):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 20)))
    events_file(tmp_path, 20)
    sb.inject(code, times=1)
    result, rep = sync(tmp_path, sb, 20)
    assert result.exit_code == 3 and code.split(":")[1] in result.fatal
    assert all(u["retryable"] for u in undelivered(rep))


def test_limits_are_never_exceeded_and_keys_never_overlap(sandbox_factory, tmp_path):
    # Sandbox limits as ours, its window a tenth shorter: a client over its limits shows up as a
    # 606 or 615, and a busy host's arrival jitter (past our 60 ms margin at a 1 s window) not.
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 3000)), rate_calls=8, rate_window=0.9,
                         max_concurrency=3, latency=0.05)  # fmt: skip
    events_file(tmp_path, 3000)
    config = load_config(make_config(tmp_path, sb, delivery={"batch_size": 100, "max_concurrency": 3,
                                                             "max_calls_per_20s": 8}))  # fmt: skip
    started = time.monotonic()
    result = run_sync(config, SyncOptions(paths=[str(tmp_path / "events.ndjson")], rate_window=1.0),
                      Report(None), credentials=config.credentials())  # fmt: skip
    elapsed = time.monotonic() - started
    stats = sb.stats()
    assert result.exit_code == 0
    assert stats["rate_limited"] == 0 and stats["concurrency_limited"] == 0
    assert stats["same_key_overlaps"] == 0
    assert stats["sync_calls"] == 30 and stats["max_in_flight_seen"] <= 3
    assert elapsed >= 3.0  # 30 calls at 8 per second cannot take less
    assert_all_right(sb, 3000)


def test_limiter_never_exceeds_window_or_concurrency():
    class VirtualClock:
        t = 0.0

        def now(self) -> float:
            return self.t

        async def sleep(self, s: float) -> None:
            self.t += s
            await asyncio.sleep(0)

    clock = VirtualClock()
    limiter = Limiter(calls=10, window=2.0, concurrency=3, clock=clock)
    starts: list[float] = []
    in_flight = 0
    peak = 0

    async def call(i: int) -> None:
        nonlocal in_flight, peak
        async with limiter.slot():
            starts.append(clock.now())
            in_flight += 1
            peak = max(peak, in_flight)
            await clock.sleep(0.01 * (i % 7))
            in_flight -= 1

    async def main() -> None:
        await asyncio.gather(*(call(i) for i in range(95)))

    asyncio.run(main())
    assert len(starts) == 95 and peak == 3
    starts.sort()
    for i in range(len(starts) - 10):
        assert starts[i + 10] - starts[i] >= 2.0  # never 11 calls within one window


def test_warns_before_a_run_that_would_not_fit_in_todays_quota(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 600)), daily_quota=40)
    events_file(tmp_path, 600)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 2})
    res = cli("sync", tmp_path / "events.ndjson", "-c", config, "-q", "--daily-quota", 40)
    # 2 used: the schema check's describe and the usage read itself count in the quota.
    assert "needs about 60 calls but only 38 of the daily quota (40) are left today (2 used)" in res.stderr
    assert res.stderr.index("warning:") < res.stderr.index("error:")  # said before the run
    assert res.exit_code == 3  # and it does stop at the quota


def test_a_run_under_one_percent_of_the_quota_spends_no_call_on_reading_usage(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 600)))
    events_file(tmp_path, 600)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 2})
    res = cli("sync", tmp_path / "events.ndjson", "-c", config, "-q")  # 60 calls of 50,000
    assert res.exit_code == 0 and "warning" not in res.stderr
    stats = sb.stats()
    assert stats["sync_calls"] == 60
    assert stats["calls_total"] == stats["sync_calls"] + stats["describe_calls"]  # no usage read


def test_retry_with_state_never_rolls_back_a_newer_sync(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 20)))
    events_file(tmp_path, 20)  # newsletter true, Nov 1
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 1})
    state = tmp_path / "state.db"
    sb.inject("code:607", times=1)  # the first call hits the quota: everything stays pending
    res = cli(
        "sync", tmp_path / "events.ndjson", "-c", config, "--state", state, "--report", tmp_path / "r", "-q"
    )
    assert res.exit_code == 3 and len(undelivered(tmp_path / "r")) == 20
    # A newer sync (Nov 2: u0..u4 opt out) delivers before anyone runs `retry`.
    newer = write_ndjson(tmp_path / "newer" / "e.ndjson", [
        event(f"u{i}@example.com", "2026-11-02T00:00:00Z", {"newsletter": False}) for i in range(5)
    ])  # fmt: skip
    assert cli("sync", newer, "-c", config, "--state", state, "-q").exit_code == 0
    # The newer sync also re-sent the 15 other pending leads (state: pending is retried).
    res = cli("retry", tmp_path / "r", "-c", config, "--state", state, "--report", tmp_path / "r2", "-q")
    assert res.exit_code == 0, res.output
    for i in range(20):
        lead = sb.lead_by_email(f"u{i}@example.com")
        assert lead["didomiNewsletterOptIn"] is (i >= 5)
        assert lead["didomiAnalyticsOptIn"] is (i % 2 == 0)  # from the pending payload, never lost
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["leads"]["to_send"] == 0 and summary["leads"]["unchanged"] == 20


def test_a_fold_spilled_to_disk_is_delivered_with_a_state(sandbox_factory, tmp_path):
    """Planning (the fold's spill read back, the state read) and recording (the state written)
    run in the engine's bookkeeping thread, not the thread that folded: every lead still lands
    once, and the state records each as confirmed (a second run sends nothing)."""
    n = 700
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, n)))
    events_file(tmp_path, n)
    config = load_config(make_config(tmp_path, sb, upsert_mode=False))
    options = SyncOptions(paths=[str(tmp_path / "events.ndjson")], spill_threshold=100,
                          state=str(tmp_path / "state.sqlite"))  # fmt: skip
    first = run_sync(config, options, Report(None), credentials=config.credentials(), clock=FastClock())
    assert first.summary.delivery is not None and first.summary.delivery.updated == n
    assert_all_right(sb, n)
    assert sorted(sb.stats()["sync_batch_sizes"]) == [100, 300, 300]
    again = run_sync(config, options, Report(None), credentials=config.credentials(), clock=FastClock())
    assert again.summary.delivery is not None and again.summary.delivery.sent == 0


def test_a_worker_sends_its_next_batch_while_its_last_outcomes_are_being_written(sandbox_factory, tmp_path):
    """One worker, three batches: the first batch's write waits until Marketo has seen the second
    call. Were the worker to wait for its write before sending again, that never happens."""
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, 6)))
    events_file(tmp_path, 6)
    config = load_config(make_config(tmp_path, sb, delivery={"batch_size": 2, "max_concurrency": 1}))

    class SlowFirstWrite:
        def __init__(self) -> None:
            self.calls_seen_by_first_write: int | None = None
            self.written: list[str] = []

        def batch_done(self, outcomes) -> None:
            if self.calls_seen_by_first_write is None:
                deadline = time.monotonic() + 10
                while sb.stats()["sync_calls"] < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.calls_seen_by_first_write = sb.stats()["sync_calls"]
            self.written += [o.key for o in outcomes]

    sink = SlowFirstWrite()
    result = run_sync(config, SyncOptions(paths=[str(tmp_path / "events.ndjson")]), Report(None),
                      credentials=config.credentials(), sinks=[sink])  # fmt: skip
    assert result.exit_code == 0
    assert sink.calls_seen_by_first_write is not None and sink.calls_seen_by_first_write >= 2
    assert sorted(sink.written) == sorted(f"u{i}@example.com" for i in range(6))  # each lead once
    assert result.summary.to_json()["delivery"]["updated"] == 6
    assert_all_right(sb, 6)


def known_stamps(state: Path) -> dict[str, Any]:
    from didomi_marketo.state import StateStore

    store = StateStore(state)
    try:
        return {lead.key: lead.known() for lead in store.leads()}
    finally:
        store.close()


def test_a_run_refused_by_the_schema_check_leaves_the_state_as_it_was(sandbox_factory, tmp_path, cli):
    """Planning 2,500 leads that re-state what Marketo already has yields "known" stamps (the
    token call is slowed to a second: time in which planning could run ahead); they must not
    reach the state when the checks then refuse the run."""
    from didomi_marketo.sandbox import TOKEN_PATH

    n = 2500
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, n)))
    env = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}
    state = tmp_path / "state.db"
    events_file(tmp_path, n)
    config = make_config(tmp_path, sb)
    assert (
        cli("sync", tmp_path / "events.ndjson", "-c", config, "--state", state, "-q", env=env).exit_code == 0
    )
    before = known_stamps(state)
    # The same consents, a day later, now also mapped to a field Marketo does not have.
    write_ndjson(tmp_path / "events.ndjson", [
        event(f"u{i}@example.com", "2026-11-02T00:00:00Z", {"newsletter": True, "product_analytics": i % 2 == 0})
        for i in range(n)])  # fmt: skip
    mappings = [*MAPPINGS, {"id": "noSuchField", "value": "consents_purposes_marketing_enabled"}]
    config = make_config(tmp_path, sb, mappings=mappings)
    sb.inject("slow:1", path=TOKEN_PATH)
    res = cli("sync", tmp_path / "events.ndjson", "-c", config, "--state", state, "-q", env=env)
    assert res.exit_code == 2 and "noSuchField" in res.stderr
    assert known_stamps(state) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_progress_display_that_fails_stops_the_run_and_every_lead_still_gets_one_outcome(
    sandbox_factory, tmp_path, concurrency
):
    """The bar's write failing (a terminal gone) once: the run stops, as for any unexpected
    error, but no batch is lost or reported twice, and one worker alone does not hang the run."""
    n = 3000
    sb = sandbox_factory(leads_file=str(leads_file(tmp_path, n)))
    events_file(tmp_path, n)
    config = load_config(
        make_config(tmp_path, sb, delivery={"batch_size": 300, "max_concurrency": concurrency})
    )
    failed_once = []

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "deliver" and not failed_once:
            failed_once.append(done)
            raise OSError(5, "Input/output error")

    result = run_sync(config, SyncOptions(paths=[str(tmp_path / "events.ndjson")]), Report(tmp_path / "r"),
                      credentials=config.credentials(), on_progress=progress)  # fmt: skip
    assert failed_once and result.exit_code == 3 and "Input/output error" in (result.fatal or "")
    delivery = result.summary.to_json()["delivery"]
    assert delivery["updated"] + delivery["failed"] == n and delivery["failed"] > 0
    reported = [json.loads(line)["key"] for name in ("delivered", "undelivered")
                for line in (tmp_path / "r" / f"{name}.ndjson").read_text().splitlines()]  # fmt: skip
    assert sorted(reported) == sorted(f"u{i}@example.com" for i in range(n))  # each lead once


def test_planning_runs_ahead_only_while_the_preflight_calls_are_under_way():
    from didomi_marketo.config import DeliverySettings
    from didomi_marketo.outcomes import LeadUpdate
    from didomi_marketo.sync import _plan_while_waiting

    class Preflight:
        def __init__(self, checks: int) -> None:
            self.checks = checks

        def running(self) -> bool:
            self.checks -= 1
            return self.checks >= 0

    def planned(n: int):
        pulled = []

        def updates():
            for i in range(n):
                pulled.append(i)
                yield LeadUpdate(f"u{i}", {"email": f"u{i}"}, f"f:{i}")

        return pulled, (n, None, None, updates())

    settings = DeliverySettings(batch_size=10, max_concurrency=2)  # two rounds: 40 updates
    for checks, n, ahead in ((1000, 100, 40), (2, 100, 20), (0, 100, 0), (1000, 25, 25)):
        pulled, plan = planned(n)
        _, _, _, updates = _plan_while_waiting(plan, Preflight(checks), settings)  # type: ignore[arg-type]
        assert len(pulled) == ahead, (checks, n)
        assert [u.key for u in updates] == [f"u{i}" for i in range(n)]  # all of them, in order
