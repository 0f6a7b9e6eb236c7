"""Expected failures end in one line and an exit code, never a hang, a traceback or a lost lead."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLES, event, make_config, write_ndjson

from didomi_marketo.config import load_config
from didomi_marketo.marketo.client import CallFailed, MarketoClient
from didomi_marketo.marketo.credentials import Credentials, Secret
from didomi_marketo.report import Report
from didomi_marketo.sync import SyncOptions, run_sync

PARTITION = SAMPLES / "didomi" / "export-id=exp_9f8e7d" / "date=2026-11-27" / "users"
ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}


def leads(tmp_path: Path, n: int) -> str:
    path = tmp_path / "leads.json"
    path.write_text(json.dumps([{"email": f"u{i}@example.com"} for i in range(n)]))
    return str(path)


def events(tmp_path: Path, n: int) -> Path:
    return write_ndjson(
        tmp_path / "in" / "events.ndjson",
        [event(f"u{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}) for i in range(n)],
    )


def test_one_file_of_a_partition_does_not_mark_the_partition_synced(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    part = tmp_path / "exp" / "date=2026-11-27" / "users"
    shutil.copytree(PARTITION, part)
    config = make_config(tmp_path, sb)
    state = tmp_path / "s.db"
    first = sorted(part.glob("*.json.gz"))[0]
    assert cli("sync", first, "-c", config, "--state", state, "-q").exit_code == 0
    sent_first = sum(sb.stats()["sync_batch_sizes"])
    res = cli("sync", tmp_path / "exp", "-c", config, "--state", state, "-q", "--report", tmp_path / "r")
    assert res.exit_code == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["files"] == 2  # the whole partition is read: it was never synced whole
    assert sent_first + summary["leads"]["to_send"] == 44


class FailingSink:
    def batch_done(self, outcomes):
        raise OSError(28, "No space left on device")


def test_a_failing_sink_stops_the_run_instead_of_hanging(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=leads(tmp_path, 200))
    events(tmp_path, 200)
    config = load_config(make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 2}))
    started = time.monotonic()
    result = run_sync(config, SyncOptions(paths=[str(tmp_path / "in")]), Report(None),
                      credentials=config.credentials(), sinks=[FailingSink()])  # fmt: skip
    assert time.monotonic() - started < 30
    assert result.exit_code == 3 and "No space left on device" in result.fatal
    d = result.summary.to_json()["delivery"]
    assert d["failed"] == 200 and d["failed_retryable"] == 200  # every lead accounted for


def test_an_unforeseen_error_shape_is_a_failure_not_a_crash():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth/token"):
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        return httpx.Response(200, json={"success": False, "errors": {"code": "611"}})

    async def call() -> None:
        creds = Credentials("id", Secret("s"), "https://123-ABC-456.mktorest.com")
        async with MarketoClient(creds, transport=httpx.MockTransport(handler)) as client:
            await client.call("POST", "/rest/v1/leads.json", json={"input": []})

    with pytest.raises(CallFailed) as info:
        asyncio.run(call())
    assert info.value.code == "unknown"


def test_corrupt_gzip_is_reported_and_the_rest_lands(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads(tmp_path, 5))
    events(tmp_path, 5)
    good = gzip.compress(b'{"a": 1}\n' * 1000)
    (tmp_path / "in" / "broken.json.gz").write_bytes(good[:40] + b"\x00garbage" + good[60:])
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path, sb), "-q")
    assert res.exit_code == 1
    assert "broken.json.gz" in res.stderr and "gzip" in res.stderr and "Traceback" not in res.stderr
    assert sb.lead_by_email("u4@example.com")["didomiNewsletterOptIn"] is True
    res = cli("sync", "-", "-c", make_config(tmp_path, sb), "-q", input=good[:-30])  # truncated stdin
    assert res.exit_code == 1 and "<stdin>" in res.stderr and "truncated gzip" in res.stderr


def test_unusable_paths_are_one_line_errors(sandbox, tmp_path, cli):
    data = events(tmp_path, 1)
    config = make_config(tmp_path, sandbox)
    (tmp_path / "afile").write_text("x")
    res = cli("sync", data, "-c", config, "--report", tmp_path / "afile", "-q")
    assert res.exit_code == 2 and "--report" in res.stderr
    res = cli("sync", data, "-c", config, "--dry-run", "--output", tmp_path / "no" / "such" / "o.ndjson")
    assert res.exit_code == 2 and "--output" in res.stderr
    (tmp_path / "bad.db").write_text("this is not sqlite")
    for args in (["sync", data, "-c", config, "--state", tmp_path / "bad.db", "-q"],
                 ["state", "show", "--state", tmp_path / "bad.db"]):  # fmt: skip
        res = cli(*args)
        assert res.exit_code == 3 and "not a usable didomi-marketo state file" in res.stderr
    # A state folder that cannot be created (a file is in the way): one line naming it, exit 3.
    res = cli("sync", data, "-c", config, "--state", tmp_path / "afile" / "sub" / "s.db", "-q")
    assert res.exit_code == 3 and "cannot create the state folder" in res.stderr
    assert "Traceback" not in res.stderr
    # A state that does not exist yet: the dry run previews a first run, says so, creates nothing.
    res = cli("sync", data, "-c", config, "--dry-run", "--state", tmp_path / "new" / "s.db")
    assert res.exit_code == 0 and "does not exist yet: previewing a first run" in res.stderr
    assert "leads to send" in res.stdout and not (tmp_path / "new").exists()


def test_retry_skips_a_partial_last_line(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads(tmp_path, 3))
    rep = tmp_path / "r"
    rep.mkdir()
    lines = [json.dumps({"key": f"u{i}@example.com", "payload": {"email": f"u{i}@example.com",
             "didomiNewsletterOptIn": True}, "retryable": True, "stamps": {}}) for i in range(2)]  # fmt: skip
    (rep / "undelivered.ndjson").write_text("\n".join(lines) + '\n{"key": "u2@exam')
    res = cli("retry", rep, "-c", make_config(tmp_path, sb), "--force", "-q")
    assert res.exit_code == 0
    assert "undelivered.ndjson:3" in res.stderr and "skipped" in res.stderr
    assert sb.lead_by_email("u1@example.com")["didomiNewsletterOptIn"] is True


def test_ctrl_c_finishes_in_flight_calls_and_leaves_the_rest_retryable(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=leads(tmp_path, 100), latency=0.5)
    events(tmp_path, 100)
    config = make_config(tmp_path, sb, delivery={"batch_size": 10, "max_concurrency": 2})
    proc = subprocess.Popen(
        [sys.executable, "-m", "didomi_marketo", "sync", str(tmp_path / "in"), "-c", str(config),
         "--report", str(tmp_path / "r"), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while sb.stats()["sync_calls"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3 and "interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    d = summary["delivery"]
    applied = sum(sb.stats()["sync_batch_sizes"])
    assert d["updated"] == applied  # in-flight calls were finished and recorded
    assert d["failed_retryable"] == 100 - applied > 0
    lost = [json.loads(x) for x in (tmp_path / "r" / "undelivered.ndjson").read_text().splitlines()]
    assert len(lost) == 100 - applied and all(u["retryable"] for u in lost)


def test_max_calls_is_never_exceeded_with_concurrent_workers(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads(tmp_path, 100))
    events(tmp_path, 100)
    config = make_config(tmp_path, sb, delivery={"batch_size": 5, "max_concurrency": 10})
    res = cli("sync", tmp_path / "in", "-c", config, "--max-calls", 3, "--max-calls-per-20s", 2,
              "--rate-window", 1, "-q")  # fmt: skip
    assert res.exit_code == 3
    assert sb.stats()["sync_calls"] == 3


def test_a_blip_at_identity_is_retried(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=leads(tmp_path, 3))
    events(tmp_path, 3)
    sb.inject("http:502", times=1, path="/identity/oauth/token")
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path, sb), "-q")
    assert res.exit_code == 0, res.stderr
    assert sb.lead_by_email("u2@example.com")["didomiNewsletterOptIn"] is True
