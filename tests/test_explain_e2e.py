"""`explain KEY` end to end (issue #14): a lead with records across an export partition, a
webhook file and a Consents API page, synced into the sandbox first."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import MAPPINGS, event, make_config, write_ndjson

MAPPED = [*MAPPINGS, {"id": "didomiConsentUpdatedAt", "value": "updated_at"}]


def _purposes(**enabled: bool) -> dict[str, Any]:
    return {"purposes": [{"id": k, "enabled": v} for k, v in enabled.items()]}


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    users = tmp_path / "exports" / "export-id=e1" / "date=2026-10-01" / "users"
    users.mkdir(parents=True)
    lines = [
        {"user": {"organization_user_id": "someone@example.com", "updated_at": "2026-10-01T09:00:00Z",
                  "consents": _purposes(newsletter=True)}, "events": []},
        {"user": {"organization_user_id": "pat@example.com", "updated_at": "2026-10-01T10:00:00Z",
                  "consents": _purposes(newsletter=True, product_analytics=True)}, "events": []},
    ]  # fmt: skip
    (users / "part-00000.json.gz").write_bytes(
        gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode())
    )
    (users / "_SUCCESS").write_text("")
    webhooks = write_ndjson(
        tmp_path / "webhooks" / "events.ndjson",
        [
            {"type": "event.created", "parameters": {"entity": event("someone@example.com", "2026-10-02T00:00:00Z",
                                                                      {"newsletter": False})}},
            {"type": "event.created", "parameters": {"entity": event("PAT@example.com", "2026-10-05T10:00:00Z",
                                                                      {"newsletter": False})}},
            {"type": "event.created", "parameters": {"entity": event("pat@example.com", "2026-10-09T00:00:00Z",
                                                                      {"product_analytics": True},
                                                                      regulation="cpra")}},
            {"type": "event.created", "parameters": {"entity": event("pat@example.com", "2026-10-10T00:00:00Z",
                                                                      {"newsletter": True},
                                                                      status="pending_approval")}},
        ],
    )  # fmt: skip
    page = {
        "data": [
            {"organization_user_id": "pat@example.com", "updated_at": "2026-10-07T00:00:00Z",
             "consents": _purposes(product_analytics=False)},
        ],
        "limit": 1,
        "cursor": None,
    }  # fmt: skip
    api = tmp_path / "api" / "page.json"
    api.parent.mkdir()
    api.write_text(json.dumps(page, indent=2))
    return {"exports": tmp_path / "exports", "webhooks": webhooks, "api": api}


def test_explain_shows_each_fields_winner_and_marketos_answer(tmp_path, inputs, sandbox, cli):
    sandbox.seed_leads([{"email": "pat@example.com"}, {"email": "someone@example.com"}])
    cfg = make_config(tmp_path, sandbox, mappings=MAPPED)
    state, report = tmp_path / "state.db", tmp_path / "report"
    paths = [inputs["exports"], inputs["webhooks"], inputs["api"]]
    result = cli("sync", *paths, "--config", cfg, "--state", state, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    sent = sandbox.lead_by_email("pat@example.com")

    # no credentials needed: the secret's variable is not even set
    (tmp_path / "offline").mkdir()
    auth = {"client_id": "${DM_TEST_UNSET_ID}", "client_secret": "${DM_TEST_UNSET_SECRET}",
            "instance": sandbox.base_url + "/rest"}  # fmt: skip
    offline = make_config(tmp_path / "offline", None, mappings=MAPPED, authentication=auth)
    result = cli("explain", "Pat@Example.COM", *paths, "--config", offline, "--state", state, "--report", report,
                 "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["key"] == "pat@example.com"  # matched as the sync matches it
    steps = doc["steps"]
    assert [s["source"].rsplit("/", 1)[-1] for s in steps] == [
        "part-00000.json.gz:2", "events.ndjson:2", "events.ndjson:3", "events.ndjson:4", "page.json:3",
    ]  # fmt: skip
    export, opt_out, cpra, pending, api = steps
    assert export["kind"] == "user" and export["said"] == {
        "didomiNewsletterOptIn": True,
        "didomiAnalyticsOptIn": True,
    }
    assert cpra["applied"] is False and cpra["ignored"].startswith("other_regulation")
    assert cpra["said"] == {"didomiAnalyticsOptIn": True}  # what it would have changed
    assert pending["applied"] is False and pending["ignored"].startswith("pending")
    assert export["won"] == [] and opt_out["won"] == ["didomiNewsletterOptIn"]
    assert api["won"] == ["didomiAnalyticsOptIn", "didomiConsentUpdatedAt"]
    verdicts = {v["field"]: v for v in doc["verdicts"]}
    assert verdicts["didomiNewsletterOptIn"]["value"] is False
    assert verdicts["didomiNewsletterOptIn"]["source"].endswith("events.ndjson:2")
    assert verdicts["didomiNewsletterOptIn"]["reason"] == "latest consent timestamp"
    assert verdicts["didomiAnalyticsOptIn"]["source"].endswith("page.json:3")
    assert verdicts["didomiConsentUpdatedAt"]["value"] == "2026-10-07T00:00:00Z"
    # it matches what the sync sent, and Marketo's answer is there, from the state and the report
    for name, value in doc["payload"].items():
        assert sent[name] == value
    assert "already confirmed" in doc["payload_note"]
    assert doc["state"]["confirmed"] == {k: v for k, v in doc["payload"].items() if k != "email"}
    assert [(r["file"].rsplit("/", 1)[-1].split(":")[0], r.get("status") or r["category"]) for r in doc["reports"]] == [
        ("delivered.ndjson", "updated"), ("ignored.ndjson", "other_regulation"), ("ignored.ndjson", "pending"),
    ]  # fmt: skip

    # the state alone (no input) still answers
    result = cli("explain", "pat@example.com", "--config", offline, "--state", state)
    assert result.exit_code == 0, result.output
    assert "Marketo confirmed" in result.stdout and "didomiNewsletterOptIn" in result.stdout

    # the table names each record and why each field holds its value
    result = cli("explain", "pat@example.com", *paths, "--config", offline)
    assert result.exit_code == 0
    assert "ignored: other_regulation" in result.stdout and "wins didomiNewsletterOptIn" in result.stdout


def test_unknown_and_invalid_keys(tmp_path, inputs, cli):
    cfg = make_config(tmp_path, None, mappings=MAPPED)
    result = cli("explain", "nobody@example.com", inputs["webhooks"], "--config", cfg)
    assert result.exit_code == 1
    assert "no record" in result.stdout
    # a file that never spells the key is not even parsed
    doc = json.loads(
        cli("explain", "nobody@example.com", *inputs.values(), "--config", cfg, "--format", "json").stdout
    )
    assert (doc["found"], doc["files_without_key"], doc["inputs_read"]) == (False, 3, 0)
    doc = json.loads(
        cli("explain", "SOMEONE@example.com", *inputs.values(), "--config", cfg, "--format", "json").stdout
    )
    assert (doc["files_without_key"], doc["inputs_read"], len(doc["steps"])) == (1, 6, 2)  # the API page
    result = cli("explain", "not-an-email", inputs["webhooks"], "--config", cfg)
    assert result.exit_code == 2
    assert "not an email" in result.output
    assert cli("explain", "pat@example.com", "--config", cfg, "--format", "yaml").exit_code == 2


def test_a_record_older_than_the_state_is_named_as_such(tmp_path, sandbox, cli):
    sandbox.seed_leads([{"email": "lee@example.com"}])
    newer = write_ndjson(
        tmp_path / "new.ndjson", [event("lee@example.com", "2026-06-01T00:00:00Z", {"newsletter": False})]
    )
    older = write_ndjson(
        tmp_path / "old.ndjson", [event("lee@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    cfg, state = make_config(tmp_path, sandbox), tmp_path / "state.db"
    assert cli("sync", newer, "--config", cfg, "--state", state, "-q").exit_code == 0
    doc = json.loads(
        cli("explain", "lee@example.com", older, "--config", cfg, "--state", state, "--format", "json").stdout
    )
    (step,) = doc["steps"]
    assert step["applied"] and step["won"] == [] and step["older_than_state"] == ["didomiNewsletterOptIn"]
    (verdict,) = [v for v in doc["verdicts"] if v["field"] == "didomiNewsletterOptIn"]
    assert (verdict["value"], verdict["source"], verdict["consent_at"]) == (
        False,
        "state",
        "2026-06-01T00:00:00Z",
    )
    assert doc["payload"]["didomiNewsletterOptIn"] is False
    assert "already confirmed" in doc["payload_note"]
    text = cli("explain", "lee@example.com", older, "--config", cfg, "--state", state).stdout
    assert "older than the consent Marketo confirmed" in text


def test_an_older_version_of_an_event_is_shown_overtaken_by_the_later_one(tmp_path, cli):
    def version(updated: str, enabled: bool, status: str = "confirmed") -> dict[str, Any]:
        e = event("amy@example.com", "2026-01-01T00:00:00Z", {"newsletter": enabled}, id="e1", status=status)
        return {"type": "event.updated", "parameters": {"new_entity": {**e, "updated_at": updated}}}

    data = write_ndjson(
        tmp_path / "w.ndjson",
        [version("2026-01-01T00:00:00Z", True, "pending_approval"), version("2026-01-03T00:00:00Z", True),
         version("2026-01-02T00:00:00Z", False)],
    )  # fmt: skip
    cfg = make_config(tmp_path, None)
    doc = json.loads(cli("explain", "amy@example.com", data, "--config", cfg, "--format", "json").stdout)
    pending, newest, older = doc["steps"]
    assert pending["ignored"].startswith("pending")
    assert newest["won"] == ["didomiNewsletterOptIn"] and newest["updated_at"] == "2026-01-03T00:00:00Z"
    assert older["applied"] and older["won"] == []
    assert older["overtaken"] == {
        "didomiNewsletterOptIn": "#2: same time as it, a later version of the event (its updated_at)"
    }
    (verdict,) = doc["verdicts"]
    assert (verdict["value"], verdict["step"]) == (True, 2)
