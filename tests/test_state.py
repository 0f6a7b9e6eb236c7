"""Incremental syncs with --state: change data capture, crash safety, the lock, the inspector."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import event, make_config, write_ndjson

EMAILS = [f"u{i:03d}@example.com" for i in range(100)]


def seed(tmp_path: Path, sandbox_factory, **cfg):
    leads = tmp_path / "leads.json"
    leads.write_text(json.dumps([{"email": e} for e in EMAILS]))
    return sandbox_factory(leads_file=str(leads), **cfg)


def base_events(tmp_path: Path) -> Path:
    """60 leads with newsletter (and analytics), 40 with analytics only."""
    recs = []
    for i, e in enumerate(EMAILS):
        purposes = {"product_analytics": i % 3 == 0}
        if i < 60:
            purposes["newsletter"] = i % 2 == 0
        recs.append(event(e, "2026-11-01T10:00:00Z", purposes))
    return write_ndjson(tmp_path / "in" / "base.ndjson", recs)


def sync(cli, tmp_path: Path, config: Path, *extra, state: str = "state.db"):
    return cli("sync", tmp_path / "in", "-c", config, "--state", tmp_path / state, "-q", *extra)


def sent(sb) -> int:
    return sum(sb.stats()["sync_batch_sizes"])


def test_second_sync_sends_nothing_and_new_events_send_exactly_those(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory)
    base_events(tmp_path)
    config = make_config(tmp_path, sb)
    assert sync(cli, tmp_path, config).exit_code == 0
    assert sent(sb) == 100

    res = sync(cli, tmp_path, config)  # same input: the file is skipped
    assert res.exit_code == 0 and sent(sb) == 100
    # Touched (re-read) but identical: every lead is unchanged, still nothing sent.
    os.utime(tmp_path / "in" / "base.ndjson", (time.time() + 5, time.time() + 5))
    assert sync(cli, tmp_path, config).exit_code == 0
    assert sent(sb) == 100

    write_ndjson(tmp_path / "in" / "new.ndjson", [  # 25 leads change their newsletter choice
        event(EMAILS[i], "2026-11-02T10:00:00Z", {"newsletter": i % 2 == 1}) for i in range(30, 55)
    ])  # fmt: skip
    before = sb.stats()["sync_batch_sizes"]
    assert sync(cli, tmp_path, config, "--report", tmp_path / "r").exit_code == 0
    assert sb.stats()["sync_batch_sizes"][len(before) :] == [25]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["files_unchanged"] == 1 and summary["leads"]["to_send"] == 25
    assert all(sb.lead_by_email(EMAILS[i])["didomiNewsletterOptIn"] is (i % 2 == 1) for i in range(30, 55))

    assert sync(cli, tmp_path, config, "--full").exit_code == 0  # --full re-sends everything
    assert sent(sb) == 100 + 25 + 100


def test_mapping_change_resends_only_the_affected_fields_leads(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory)
    base_events(tmp_path)
    config = make_config(tmp_path, sb)
    assert sync(cli, tmp_path, config).exit_code == 0
    changed = make_config(tmp_path, sb, mappings=[
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiAnalyticsOptIn", "value": "consents_purposes_product_analytics_enabled"},
        {"id": "unsubscribed", "value": "consents_purposes_newsletter_enabled", "transform": "invert"},
    ])  # fmt: skip
    assert sync(cli, tmp_path, changed).exit_code == 0
    assert sb.stats()["sync_batch_sizes"][1:] == [60]  # only the leads with a newsletter value
    assert sb.lead_by_email(EMAILS[0])["unsubscribed"] is False
    assert sb.lead_by_email(EMAILS[1])["unsubscribed"] is True
    assert sb.lead_by_email(EMAILS[70]).get("unsubscribed") in (None, False)  # untouched


def test_older_file_read_after_a_newer_one_changes_nothing(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory)
    write_ndjson(
        tmp_path / "in" / "newer.ndjson", [event(EMAILS[0], "2026-11-28T00:00:00Z", {"newsletter": False})]
    )
    config = make_config(tmp_path, sb)
    assert sync(cli, tmp_path, config).exit_code == 0
    (tmp_path / "in" / "newer.ndjson").unlink()
    write_ndjson(
        tmp_path / "in" / "older.ndjson", [event(EMAILS[0], "2026-10-01T00:00:00Z", {"newsletter": True})]
    )
    assert sync(cli, tmp_path, config, "--report", tmp_path / "r").exit_code == 0
    assert sb.lead_by_email(EMAILS[0])["didomiNewsletterOptIn"] is False
    assert sb.stats()["sync_calls"] == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["leads"]["kept_newer_fields"] == 1


def test_pending_leads_are_resent_by_the_next_sync(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory, daily_quota=2)  # the schema check, then one call
    base_events(tmp_path)
    config = make_config(tmp_path, sb, delivery={"batch_size": 40, "max_concurrency": 1})
    assert sync(cli, tmp_path, config).exit_code == 3  # the quota stops the run after one call
    assert sent(sb) == 40
    show = cli("state", "export", "--state", tmp_path / "state.db", "--pending")
    assert len(show.stdout.splitlines()) == 60
    sb.config.daily_quota = 100
    httpx.post(sb.base_url + "/_sandbox/reset-quota")
    res = sync(cli, tmp_path, config, "--report", tmp_path / "r")  # no new input at all
    assert res.exit_code == 0, res.output
    assert sent(sb) == 100
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["input"]["files_unchanged"] == 1
    assert cli("state", "export", "--state", tmp_path / "state.db", "--pending").stdout == ""


def test_permanent_skip_is_not_retried_until_values_change(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory)
    write_ndjson(
        tmp_path / "in" / "a.ndjson",
        [event("stranger@example.com", "2026-11-01T00:00:00Z", {"newsletter": True})],
    )
    config = make_config(tmp_path, sb)
    assert sync(cli, tmp_path, config).exit_code == 0  # 1004: an expected skip
    os.utime(tmp_path / "in" / "a.ndjson", (time.time() + 5, time.time() + 5))
    assert sync(cli, tmp_path, config).exit_code == 0
    assert sb.stats()["sync_calls"] == 1  # same values: not sent again
    write_ndjson(
        tmp_path / "in" / "b.ndjson",
        [event("stranger@example.com", "2026-11-05T00:00:00Z", {"newsletter": False})],
    )
    assert sync(cli, tmp_path, config).exit_code == 0
    assert sb.stats()["sync_calls"] == 2  # values changed: tried again
    assert sync(cli, tmp_path, config, "--upsert").exit_code == 0  # upsert now creates it
    assert sb.lead_by_email("stranger@example.com")["didomiNewsletterOptIn"] is False


def _spawn_sync(tmp_path: Path, config: Path, state: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "didomi_marketo", "sync", str(tmp_path / "in"), "-c", str(config),
         "--state", str(state), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_kill_minus_nine_mid_delivery_then_rerun_loses_nothing(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory, latency=0.4)
    base_events(tmp_path)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 2})
    state = tmp_path / "state.db"
    proc = _spawn_sync(tmp_path, config, state)
    deadline = time.monotonic() + 60
    while sb.stats()["sync_calls"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    applied_before = sent(sb)
    assert 0 < applied_before < 100
    confirmed = int(json.loads(cli("state", "show", "--state", state).stdout)["confirmed"])
    assert confirmed <= applied_before

    res = sync(cli, tmp_path, config, "--report", tmp_path / "r")
    assert res.exit_code == 0, res.output
    resent = sent(sb) - applied_before
    in_flight_leads = 2 * 10 + 2 * 10  # up to two batches in flight, two answered but not committed
    assert resent == 100 - confirmed
    assert resent <= 100 - applied_before + in_flight_leads
    for i, e in enumerate(EMAILS):
        lead = sb.lead_by_email(e)
        assert lead["didomiAnalyticsOptIn"] is (i % 3 == 0)
        if i < 60:
            assert lead["didomiNewsletterOptIn"] is (i % 2 == 0)


def test_a_second_run_on_the_same_state_refuses(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory, latency=0.5)
    base_events(tmp_path)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 1})
    state = tmp_path / "state.db"
    first = _spawn_sync(tmp_path, config, state)
    try:
        lock = Path(str(state) + ".lock")
        deadline = time.monotonic() + 30
        while not (lock.exists() and "pid" in lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = sync(cli, tmp_path, config)
        assert second.exit_code == 4  # an overlap, not "a human must act" (3)
        assert f"pid {first.pid}" in second.stderr and "--wait-lock" in second.stderr
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder (even kill -9): the next run proceeds.
    assert sync(cli, tmp_path, config).exit_code == 0


def test_state_show_and_reset(sandbox_factory, tmp_path, cli):
    sb = seed(tmp_path, sandbox_factory)
    base_events(tmp_path)
    config = make_config(tmp_path, sb)
    assert sync(cli, tmp_path, config).exit_code == 0
    state = tmp_path / "state.db"
    counts = json.loads(cli("state", "show", "--state", state).stdout)
    assert counts["confirmed"] == 100 and counts["pending"] == 0 and counts["inputs"] == 1
    one = json.loads(cli("state", "show", "--state", state, "U000@Example.com").stdout)
    assert one["confirmed"] == {"didomiNewsletterOptIn": True, "didomiAnalyticsOptIn": True}
    assert cli("state", "show", "--state", state, "nobody@example.com").exit_code == 1
    assert cli("state", "reset", "--state", state).exit_code == 2  # needs --yes
    assert cli("state", "reset", "--state", state, "--yes").exit_code == 0
    assert sync(cli, tmp_path, config).exit_code == 0
    assert sent(sb) == 200  # everything again after a reset


def test_json_logs_for_cron(sandbox_factory, tmp_path):
    sb = seed(tmp_path, sandbox_factory)
    base_events(tmp_path)
    config = make_config(tmp_path, sb)
    from conftest import run_subprocess

    proc = run_subprocess("sync", tmp_path / "in", "-c", config, "--log-format", "json", "-q")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert events[-1]["summary"]["delivery"]["updated"] == 100
    assert "sandbox-secret" not in proc.stderr


def test_json_logs_carry_errors_as_json_too(tmp_path):
    from conftest import run_subprocess

    config = make_config(tmp_path, None, authentication={
        "client_id": "id", "client_secret": "s3cr3t", "instance": "http://127.0.0.1:9/rest"})  # fmt: skip
    data = write_ndjson(
        tmp_path / "in.ndjson", [event(EMAILS[0], "2026-11-01T00:00:00Z", {"newsletter": True})]
    )
    proc = run_subprocess("sync", data, "-c", config, "--log-format", "json", "-q")
    assert proc.returncode == 3
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    assert events[-1]["event"] == "error" and "cannot connect" in events[-1]["message"]


def test_a_state_belongs_to_one_marketo_instance(sandbox_factory, tmp_path, cli):
    first, second = seed(tmp_path, sandbox_factory), seed(tmp_path, sandbox_factory)
    base_events(tmp_path)
    assert sync(cli, tmp_path, make_config(tmp_path, first)).exit_code == 0
    res = sync(cli, tmp_path, make_config(tmp_path, second))
    assert res.exit_code == 2 and "one state file per Marketo instance" in res.stderr
    assert second.stats()["sync_calls"] == 0
