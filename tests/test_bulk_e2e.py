"""End to end: `sync --via bulk|auto` through the sandbox's bulk import, over real sockets.

Jobs in these sandboxes import in a blink, and the config polls every 0.02-0.1 s instead of
5-30 s; where a test needs a job to stay in Marketo (the 1016 queue, a kill mid-poll) it moves
the sandbox's bulk clock by hand instead of sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config, write_ndjson

ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}
FAST_POLLS = {"bulk_poll_min_seconds": 0.02, "bulk_poll_max_seconds": 0.1}
MAPPINGS = [
    {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
    {"id": "didomiAnalyticsOptIn", "value": "consents_purposes_product_analytics_enabled"},
    {"id": "didomiTopics", "value": "consents_purposes_newsletter_values_topics"},
    {"id": "numberOfEmployees", "value": "metadata_employees"},
]
BAD = frozenset(
    {"u007@example.com", "u043@example.com", "u111@example.com"}
)  # employees "many": not an integer


def users(
    n: int, key=lambda i: f"u{i:03}@example.com", bad: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Didomi users whose leads carry 4 different sets of fields; the `bad` ones a bad value."""
    out = []
    for i in range(n):
        purposes: list[dict[str, Any]] = []
        if i % 4 in (0, 2, 3):
            p: dict[str, Any] = {"id": "newsletter", "enabled": i % 3 == 0}
            if i % 4 == 3:
                p["values"] = {"topics": {"value": "news,events"}}  # a comma inside one cell
            purposes.append(p)
        if i % 4 in (1, 2, 3):
            purposes.append({"id": "product_analytics", "enabled": i % 5 == 0})
        u: dict[str, Any] = {
            "id": f"didomi-{i}",
            "organization_user_id": key(i),
            "updated_at": "2026-11-20T10:00:00Z",
            "consents": {"purposes": purposes},
        }
        if i % 4 == 3:
            u["metadata"] = {"employees": "many" if key(i) in bad else 10 + i}
        out.append(u)
    return out


def config(tmp_path: Path, sb, **overrides: Any) -> Path:
    overrides.setdefault("mappings", MAPPINGS)
    overrides.setdefault("delivery", FAST_POLLS)
    return make_config(tmp_path, sb, **overrides)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def final_leads(sb) -> dict[str, dict[str, Any]]:
    """Every lead's fields, minus what Marketo stamps itself."""
    return {
        lead["email"]: {k: v for k, v in lead.items() if k not in ("id", "createdAt", "updatedAt")}
        for lead in sb.leads()
    }


def test_bulk_ends_every_lead_as_sync_leads_does_and_the_report_accounts_for_each(
    sandbox_factory, tmp_path, cli
):
    data = write_ndjson(tmp_path / "in" / "users.ndjson", users(200, bad=BAD))
    existing = [{"email": f"u{i:03}@example.com", "firstName": f"F{i}"} for i in range(0, 200, 3)]
    ends = {}
    for via in ("rest", "bulk"):
        sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
        sb.seed_leads(existing)
        rep = tmp_path / via
        cfg = config(tmp_path, sb, upsert_mode=True)
        result = cli("sync", data, "-c", cfg, "--via", via, "--report", rep, env=ENV)
        assert result.exit_code == 1, result.output  # the 3 bad leads are skipped unexpectedly
        summary = json.loads((rep / "summary.json").read_text())
        assert summary["delivery"]["path"] == via and f"--via {via}" in summary["delivery"]["path_reason"]
        delivered, undelivered = lines(rep / "delivered.ndjson"), lines(rep / "undelivered.ndjson")
        # Every lead to send is in the report exactly once.
        keys = [d["key"] for d in delivered] + [u["key"] for u in undelivered]
        assert sorted(keys) == sorted(f"u{i:03}@example.com" for i in range(200))
        assert {u["key"] for u in undelivered} == BAD
        assert all(u["status"] == "skipped" and not u["retryable"] for u in undelivered)
        assert all("Invalid value for field 'numberOfEmployees'" in u["reason"] for u in undelivered)
        ends[via] = (final_leads(sb), sb.stats())
    assert ends["bulk"][0] == ends["rest"][0]  # the same data ends the same way
    assert ends["bulk"][0]["u003@example.com"]["didomiTopics"] == "news,events"
    assert ends["bulk"][0]["u000@example.com"]["firstName"] == "F0"  # no blank cell erased it
    bulk_stats = ends["bulk"][1]
    # One upload per set of fields to send (4 here), no Sync Leads call.
    assert bulk_stats["bulk_uploads"] == 4 and bulk_stats["sync_calls"] == 0
    d = summary["delivery"]
    assert d["imported"] == 197 and d["skipped"] == {"bulk_failed": 3}
    assert d["bulk"]["uploads"] == 4 and d["bulk"]["file_fetches"] == 1  # only the file with failures


def test_warning_rows_are_delivered_with_marketo_s_warning_in_the_report(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    sb.seed_leads([{"email": "u000@example.com"}, {"email": "u000@example.com"}])  # duplicates in Marketo
    data = write_ndjson(tmp_path / "users.ndjson", users(8))
    result = cli("sync", data, "-c", config(tmp_path, sb, upsert_mode=True), "--via", "bulk",
                 "--report", tmp_path / "r", env=ENV)  # fmt: skip
    assert result.exit_code == 0, result.output
    delivered = {d["key"]: d for d in lines(tmp_path / "r" / "delivered.ndjson")}
    assert len(delivered) == 8 and all(d["status"] == "imported" for d in delivered.values())
    assert "Multiple leads match" in delivered["u000@example.com"]["warning"]
    assert "warning" not in delivered["u004@example.com"]


def test_auto_uses_rest_for_update_only_email_and_says_why(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    sb.seed_leads([{"email": "u000@example.com"}])
    data = write_ndjson(tmp_path / "users.ndjson", users(20))
    cfg = config(tmp_path, sb, upsert_mode=False)
    result = cli("sync", data, "-c", cfg, "--bulk-threshold", "1", "--report", tmp_path / "r", env=ENV)
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "r" / "summary.json").read_text())["delivery"]
    assert d["path"] == "rest" and "upsert_mode is false" in d["path_reason"]
    assert "upsert_mode is false" in result.stdout  # the terminal summary says it too
    assert sb.stats()["bulk_uploads"] == 0 and len(sb.leads()) == 1  # nobody was created
    assert d["updated"] == 1 and d["expected_skips"] == 19


def test_via_bulk_with_update_only_email_is_a_usage_error_before_any_call(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory()
    data = write_ndjson(tmp_path / "users.ndjson", users(5))
    result = cli("sync", data, "-c", config(tmp_path, sb, upsert_mode=False), "--via", "bulk", env=ENV)
    assert result.exit_code == 2
    assert "--via bulk: upsert_mode is false with user_identifier email" in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert sb.stats()["calls_total"] == 0 and sb.stats()["identity_calls"] == 0


def test_auto_picks_bulk_at_the_threshold_and_lead_ids_import_update_only(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    ids = sb.seed_leads([{"email": f"lead{i}@example.com"} for i in range(10)])
    unknown = [str(max(ids) + 1000 + i) for i in range(5)]
    data = write_ndjson(tmp_path / "users.ndjson", users(15, key=lambda i: ([*map(str, ids), *unknown])[i]))
    # Batches of one lead make Sync Leads the costlier path (15 calls against 3 field sets' uploads).
    cfg = config(tmp_path, sb, properties={"user_identifier": ["leadID"]}, mappings=MAPPINGS[:2],
                 delivery={**FAST_POLLS, "batch_size": 1})  # fmt: skip
    result = cli("sync", data, "-c", cfg, "--bulk-threshold", "15", "--report", tmp_path / "r", env=ENV)
    assert result.exit_code == 0, result.output  # ids that are no lead: expected skips, as via REST
    d = json.loads((tmp_path / "r" / "summary.json").read_text())["delivery"]
    assert d["path"] == "bulk" and "at least --bulk-threshold 15" in d["path_reason"]
    assert d["imported"] == 10 and d["skipped"] == {"1004": 5} and d["expected_skips"] == 5
    assert len(sb.leads()) == 10  # update only: nothing created
    assert all(lead.get("didomiNewsletterOptIn") is not None or lead.get("didomiAnalyticsOptIn") is not None
               for lead in sb.leads())  # fmt: skip

    below = cli("sync", data, "-c", cfg, "--bulk-threshold", "16", "--report", tmp_path / "r2", env=ENV)
    assert below.exit_code == 0
    d2 = json.loads((tmp_path / "r2" / "summary.json").read_text())["delivery"]
    assert d2["path"] == "rest" and "--bulk-threshold 16" in d2["path_reason"]


def test_auto_keeps_sync_leads_when_field_sets_would_cost_more_uploads(sandbox_factory, tmp_path, cli):
    """Past the threshold, but the leads carry 4 sets of fields: bulk would spend ~12 calls (an
    upload and polls per set) where Sync Leads spends 1, so `auto` stays on Sync Leads, says why."""
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    data = write_ndjson(tmp_path / "users.ndjson", users(40))
    cfg = config(tmp_path, sb, upsert_mode=True)
    result = cli("sync", data, "-c", cfg, "--bulk-threshold", "10", "--report", tmp_path / "r", env=ENV)
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "r" / "summary.json").read_text())["delivery"]
    assert d["path"] == "rest" and "4 different sets of fields" in d["path_reason"], d["path_reason"]
    assert sb.stats()["bulk_uploads"] == 0 and d["calls"] == 1 and len(sb.leads()) == 40


def test_a_full_bulk_queue_1016_is_waited_out_and_nothing_is_dropped(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=1000, bulk_max_queued=3)
    offset = [0.0]
    sb.bulk_clock = lambda: time.monotonic() + offset[0]
    for i in range(3):  # another integration's jobs fill the queue
        sb.submit_bulk(f"email\nother{i}@example.com\n".encode())
    done = threading.Event()

    def let_time_pass_after_two_refusals() -> None:
        while not done.wait(0.02):
            if sb.stats()["bulk_too_many_imports"] >= 2:
                offset[0] += 10_000  # their jobs, then ours, finish

    helper = threading.Thread(target=let_time_pass_after_two_refusals, daemon=True)
    helper.start()
    data = write_ndjson(tmp_path / "users.ndjson", users(40))
    try:
        result = cli("sync", data, "-c", config(tmp_path, sb, upsert_mode=True), "--via", "bulk",
                     "--report", tmp_path / "r", env=ENV)  # fmt: skip
    finally:
        done.set()
        helper.join()
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "r" / "summary.json").read_text())["delivery"]
    assert d["bulk"]["queue_full_waits"] >= 2 and d["imported"] == 40 and d["failed"] == 0
    assert len(lines(tmp_path / "r" / "delivered.ndjson")) == 40
    assert all(sb.lead_by_email(f"u{i:03}@example.com") for i in range(40))


def _open_jobs(state: Path) -> list[tuple[Any, ...]]:
    if not state.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
        try:
            return db.execute("SELECT id, batch_id FROM bulk_jobs").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return []  # not created yet


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_a_run_killed_mid_poll_is_collected_by_the_next_run_without_uploading_again(
    sandbox_factory, tmp_path, cli
):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=1000)
    offset = [0.0]
    sb.bulk_clock = lambda: time.monotonic() + offset[0]  # jobs import until the test says so
    data = write_ndjson(tmp_path / "users.ndjson", users(60))
    cfg = config(tmp_path, sb, upsert_mode=True)
    state = tmp_path / "state.db"
    args = ["sync", data, "-c", cfg, "--via", "bulk", "--state", state, "--report", tmp_path / "r1", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "didomi_marketo", *map(str, args)],
        env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # every file uploaded, recorded, and being polled
            jobs = _open_jobs(state)
            if (
                len(jobs) == 4
                and all(b is not None for _, b in jobs)
                and sb.stats()["bulk_status_calls"] >= 4
            ):
                break
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.02)
        else:
            raise AssertionError(f"never saw 4 submitted jobs being polled: {_open_jobs(state)}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    uploads = sb.stats()["bulk_uploads"]
    assert uploads == 4 and sb.leads() == []  # nothing imported yet
    offset[0] += 100_000  # Marketo finishes the jobs while nobody runs

    result = cli("sync", data, "-c", cfg, "--via", "bulk", "--state", state, "--report", tmp_path / "r2",
                 env=ENV)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sb.stats()["bulk_uploads"] == uploads  # collected, not uploaded again
    assert _open_jobs(state) == []
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["delivery"]["imported"] == 60  # the collected outcomes are this run's
    assert summary["leads"]["unchanged"] == 60 and summary["leads"]["to_send"] == 0  # nothing resent
    assert len(lines(tmp_path / "r2" / "delivered.ndjson")) == 60
    assert len(sb.leads()) == 60
    assert sb.lead_by_email("u003@example.com")["didomiTopics"] == "news,events"


def test_retryable_bulk_outcomes_go_to_retry_and_the_state_like_rest_ones(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    sb.inject("code:611", 1000, path="/bulk/v1/leads.json")  # Marketo keeps failing the uploads
    data = write_ndjson(tmp_path / "users.ndjson", users(30))
    cfg = config(tmp_path, sb, upsert_mode=True,
                 delivery={**FAST_POLLS, "retry_min_attempts": 1, "retry_min_seconds": 0.01})  # fmt: skip
    state = tmp_path / "state.db"
    first = cli(
        "sync", data, "-c", cfg, "--via", "bulk", "--state", state, "--report", tmp_path / "r1", env=ENV
    )
    assert first.exit_code == 1, first.output
    failed = lines(tmp_path / "r1" / "undelivered.ndjson")
    assert len(failed) == 30 and all(u["retryable"] and u["code"] == "611" for u in failed)
    assert sb.leads() == []

    sb.clear_faults()
    again = cli("retry", tmp_path / "r1", "-c", cfg, "--via", "bulk", "--state", state,
                "--report", tmp_path / "r2", env=ENV)  # fmt: skip
    assert again.exit_code == 0, again.output
    assert len(lines(tmp_path / "r2" / "delivered.ndjson")) == 30 and len(sb.leads()) == 30
    uploads = sb.stats()["bulk_uploads"]

    # The state took the retried leads as confirmed: the next run has nothing pending to re-send
    # (pending leads, bulk or REST, are re-sent by the next --state run until confirmed).
    last = cli(
        "sync", data, "-c", cfg, "--via", "bulk", "--state", state, "--report", tmp_path / "r3", env=ENV
    )
    assert last.exit_code == 0, last.output
    summary = json.loads((tmp_path / "r3" / "summary.json").read_text())
    assert summary["leads"]["to_send"] == 0 and summary["leads"]["pending_resent"] == 0
    assert sb.stats()["bulk_uploads"] == uploads


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
def test_sigterm_mid_poll_leaves_the_jobs_for_the_next_run_and_exits_3(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=1000)
    offset = [0.0]
    sb.bulk_clock = lambda: time.monotonic() + offset[0]
    data = write_ndjson(tmp_path / "users.ndjson", users(20))
    cfg = config(tmp_path, sb, upsert_mode=True)
    state = tmp_path / "state.db"
    args = ["sync", data, "-c", cfg, "--via", "bulk", "--state", state, "--report", tmp_path / "r1", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "didomi_marketo", *map(str, args)],
                            env={**os.environ, **ENV}, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sb.stats()["bulk_status_calls"] < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "never saw the jobs polled"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3 and "Traceback" not in stderr
    undelivered = lines(tmp_path / "r1" / "undelivered.ndjson")
    assert len(undelivered) == 20 and all(u["retryable"] for u in undelivered)
    assert "left for the next --state run" in undelivered[0]["reason"]
    assert len(_open_jobs(state)) == 4

    offset[0] += 100_000
    result = cli("sync", data, "-c", cfg, "--via", "bulk", "--state", state, "--report", tmp_path / "r2",
                 env=ENV)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sb.stats()["bulk_uploads"] == 4 and _open_jobs(state) == []
    assert len(lines(tmp_path / "r2" / "delivered.ndjson")) == 20 and len(sb.leads()) == 20
