"""reconcile and explain at the edges: failures while reading Marketo, lead ids as keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from conftest import event, make_config, write_ndjson

GET_LEADS = "GET /rest/v1/leads.json"
FAST_RETRY = {"retry_min_attempts": 1, "retry_min_seconds": 0.5}


def _synced(tmp_path: Path, sandbox: Any, cli: Any, **config: Any) -> tuple[Path, Path]:
    data = write_ndjson(
        tmp_path / "events.ndjson",
        [event(f"r{i}@example.com", "2026-05-01T00:00:00Z", {"newsletter": True}) for i in range(10)],
    )
    cfg = make_config(tmp_path, sandbox, upsert_mode=True, **config)
    assert cli("sync", data, "--config", cfg, "-q").exit_code == 0
    return data, cfg


def test_a_transient_read_failure_is_retried_and_counted(tmp_path, sandbox, cli):
    data, cfg = _synced(tmp_path, sandbox, cli, delivery=FAST_RETRY)
    sandbox.inject("code:604", 1, path=GET_LEADS)
    report = tmp_path / "r"
    result = cli("reconcile", data, "--config", cfg, "--report", report)
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "summary.json").read_text())
    assert summary["calls"]["reads"] == 2  # the 604, then the answer
    assert summary["leads"]["in_sync"] == 10


def test_quota_and_access_failures_abort_with_exit_3_and_no_secret(tmp_path, sandbox, cli):
    data, cfg = _synced(tmp_path, sandbox, cli)
    sandbox.inject("code:607", 1, path=GET_LEADS)
    result = cli("reconcile", data, "--config", cfg, "--fix")
    assert result.exit_code == 3
    assert "daily quota" in result.output
    sandbox.inject("code:603", 1, path=GET_LEADS)
    assert cli("reconcile", data, "--config", cfg).exit_code == 3
    auth = {
        "client_id": "sandbox-client",
        "client_secret": "not-the-secret-42",
        "instance": sandbox.base_url + "/rest",
    }
    (tmp_path / "bad").mkdir()
    bad = make_config(tmp_path / "bad", sandbox, authentication=auth)
    result = cli("reconcile", data, "--config", bad)
    assert result.exit_code == 3
    assert "not-the-secret-42" not in result.output


def test_lead_ids_as_keys(tmp_path, sandbox, cli):
    sandbox.seed_leads([{"id": 7, "email": "seven@example.com"}, {"id": 12, "email": "twelve@example.com"}])
    data = write_ndjson(
        tmp_path / "events.ndjson",
        [
            event("007", "2026-05-01T00:00:00Z", {"newsletter": True}),
            event(12, "2026-05-01T00:00:00Z", {"newsletter": False}),
            event("99", "2026-05-01T00:00:00Z", {"newsletter": True}),  # not a lead: update-only skips it
        ],
    )
    cfg = make_config(tmp_path, sandbox, properties={"user_identifier": ["leadID"]})
    state = tmp_path / "state.db"
    assert cli("sync", data, "--config", cfg, "--state", state, "-q").exit_code == 0
    httpx.patch(
        sandbox.base_url + "/_sandbox/leads", json=[{"id": 12, "set": {"didomiNewsletterOptIn": True}}]
    )
    report = tmp_path / "r"
    result = cli("reconcile", data, "--config", cfg, "--state", state, "--report", report)
    assert result.exit_code == 1
    summary = json.loads((report / "summary.json").read_text())
    assert summary["leads"] == {"compared": 3, "in_sync": 1, "drifted": 1, "not_in_marketo_expected": 1}
    (drift,) = [json.loads(line) for line in (report / "drift.ndjson").read_text().splitlines()]
    assert (drift["key"], drift["marketo_ids"]) == ("12", [12])
    result = cli("explain", "0007", data, "--config", cfg, "--state", state, "--format", "json")
    doc = json.loads(result.stdout)
    assert doc["key"] == "7" and doc["payload"] == {"id": 7, "didomiNewsletterOptIn": True}
    assert doc["steps"][0]["source"].endswith("events.ndjson:1")


def test_a_mapped_field_marketo_does_not_know_is_a_config_error_at_once(tmp_path, sandbox, cli):
    data, _ = _synced(tmp_path, sandbox, cli)
    (tmp_path / "other").mkdir()
    cfg = make_config(
        tmp_path / "other",
        sandbox,
        mappings=[{"id": "didomiNope", "value": "consents_purposes_newsletter_enabled"}],
    )
    before = sandbox.stats()["get_leads_calls"]
    result = cli("reconcile", data, "--config", cfg)
    assert result.exit_code == 2
    assert "1006" in result.output and "didomiNope" in result.output
    assert sandbox.stats()["get_leads_calls"] == before + 1  # refused once, never retried
