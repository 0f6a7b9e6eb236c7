"""`reconcile` end to end against the sandbox (issue #14): sync 5,000 leads, make 37 of them
drift behind the tool's back, find exactly those, repair them in one Sync Leads call."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MAPPINGS, event, make_config, write_ndjson

from didomi_marketo.reconcile import same_value

LEADS = 5000
MAPPED = [*MAPPINGS, {"id": "didomiConsentUpdatedAt", "value": "updated_at"}]


def _email(i: int) -> str:
    return f"person{i:05d}@example.com"


@pytest.fixture
def synced(tmp_path: Path, sandbox: Any, cli: Any) -> dict[str, Any]:
    records = [
        event(
            _email(i),
            f"2026-03-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:07Z",
            {"newsletter": i % 2 == 0, "product_analytics": i % 3 == 0},
        )
        for i in range(LEADS)
    ]
    data = write_ndjson(tmp_path / "data" / "events.ndjson", records)
    cfg = make_config(tmp_path, sandbox, mappings=MAPPED, upsert_mode=True)
    state = tmp_path / "state.db"
    result = cli("sync", data, "--config", cfg, "--state", state, "-q")
    assert result.exit_code == 0, result.output
    assert len(sandbox.leads()) == LEADS
    return {"data": data, "cfg": cfg, "state": state, "tmp": tmp_path}


def _drift_behind_the_tools_back(sandbox: Any) -> dict[str, set[str]]:
    flipped = {_email(i) for i in range(100, 115)}  # 15: newsletter flipped
    blanked = {_email(i) for i in range(200, 210)}  # 10: analytics blanked
    deleted = {_email(i) for i in range(300, 312)}  # 12: leads deleted
    edits: list[dict[str, Any]] = []
    for e in sorted(flipped):
        now = sandbox.lead_by_email(e)["didomiNewsletterOptIn"]
        edits.append({"email": e, "set": {"didomiNewsletterOptIn": not now}})
    edits += [{"email": e, "set": {"didomiAnalyticsOptIn": None}} for e in sorted(blanked)]
    edits += [{"email": e, "delete": True} for e in sorted(deleted)]
    resp = httpx.patch(sandbox.base_url + "/_sandbox/leads", json=edits)
    assert resp.json() == {"updated": 25, "deleted": 12, "not_found": []}
    return {"flipped": flipped, "blanked": blanked, "deleted": deleted}


def _drift_lines(report: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (report / "drift.ndjson").read_text().splitlines()]


def test_reconcile_finds_exactly_the_drift_and_fix_repairs_it(synced, sandbox, cli):
    edited = _drift_behind_the_tools_back(sandbox)
    drifted = set().union(*edited.values())
    assert len(drifted) == 37
    report = synced["tmp"] / "reconcile"
    before = sandbox.stats()

    result = cli("reconcile", synced["data"], "--config", synced["cfg"], "--state", synced["state"],
                 "--report", report)  # fmt: skip
    assert result.exit_code == 1, result.output  # drift found: cron can alert
    summary = json.loads((report / "summary.json").read_text())
    assert summary["leads"] == {"compared": LEADS, "in_sync": LEADS - 37, "drifted": 37,
                                "not_in_marketo_expected": 0}  # fmt: skip
    assert summary["fields"]["didomiNewsletterOptIn"] == {
        "match": LEADS - 27, "differs": 15, "missing_in_marketo": 0, "lead_not_found": 12,
    }  # fmt: skip
    assert summary["fields"]["didomiAnalyticsOptIn"] == {
        "match": LEADS - 22, "differs": 0, "missing_in_marketo": 10, "lead_not_found": 12,
    }  # fmt: skip
    # the consent time round-trips through Marketo's second-precision UTC spelling
    assert summary["fields"]["didomiConsentUpdatedAt"]["match"] == LEADS - 12
    lines = _drift_lines(report)
    assert {d["key"] for d in lines} == drifted
    one = next(d for d in lines if d["key"] == _email(101))
    assert one["fields"]["didomiNewsletterOptIn"]["didomi"] is False  # 101 is odd: opted out
    assert one["fields"]["didomiNewsletterOptIn"]["marketo"] is True
    assert one["fields"]["didomiNewsletterOptIn"]["status"] == "differs"
    assert one["source"].endswith("events.ndjson:102")
    assert set(one["fields"]) == {"didomiNewsletterOptIn"}
    assert one["fields"]["didomiNewsletterOptIn"]["source"].endswith("events.ndjson:102")
    assert one["fields"]["didomiNewsletterOptIn"]["why"] == "latest consent timestamp"
    gone = next(d for d in lines if d["key"] == _email(300))
    assert {f["status"] for f in gone["fields"].values()} == {"lead_not_found"}
    stats = sandbox.stats()
    assert (
        stats["get_leads_calls"] - before["get_leads_calls"]
        == math.ceil(LEADS / 300)
        == summary["calls"]["reads"]
    )
    assert stats["sync_calls"] == before["sync_calls"]  # a reconcile without --fix writes nothing

    # the state alone (no input) tells the same story
    result = cli("reconcile", "--config", synced["cfg"], "--state", synced["state"], "-q")
    assert result.exit_code == 1

    fixed = synced["tmp"] / "fixed"
    before = sandbox.stats()
    result = cli("reconcile", synced["data"], "--config", synced["cfg"], "--state", synced["state"],
                 "--fix", "--report", fixed)  # fmt: skip
    assert result.exit_code == 0, result.output  # as sync: every lead delivered
    after = sandbox.stats()
    assert after["sync_calls"] - before["sync_calls"] == math.ceil(37 / 300) == 1
    assert after["sync_batch_sizes"][-1] == 37
    delivered = [json.loads(line) for line in (fixed / "delivered.ndjson").read_text().splitlines()]
    assert {d["key"] for d in delivered} == drifted
    assert {d["status"] for d in delivered if d["key"] in edited["deleted"]} == {"created"}
    assert sandbox.lead_by_email(_email(101))["didomiNewsletterOptIn"] is False
    assert sandbox.lead_by_email(_email(201))["didomiAnalyticsOptIn"] is True  # 201 % 3 == 0

    again = synced["tmp"] / "again"
    result = cli("reconcile", synced["data"], "--config", synced["cfg"], "--state", synced["state"],
                 "--report", again)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _drift_lines(again) == []
    assert json.loads((again / "summary.json").read_text())["leads"]["drifted"] == 0


def test_reconcile_refuses_to_exceed_max_calls_or_the_quota_left(synced, sandbox, cli):
    before = sandbox.stats()["get_leads_calls"]
    result = cli("reconcile", synced["data"], "--config", synced["cfg"], "--max-calls", 10)
    assert result.exit_code == 3
    assert "needs 18 calls" in result.output and "--max-calls is 10" in result.output
    report = synced["tmp"] / "refused"
    result = cli(
        "reconcile", synced["data"], "--config", synced["cfg"], "--daily-quota", 30, "--report", report
    )
    assert result.exit_code == 3
    assert "daily quota" in result.output
    summary = json.loads((report / "summary.json").read_text())
    assert summary["exit_code"] == 3 and "daily quota" in summary["error"]
    assert sandbox.stats()["get_leads_calls"] == before  # nothing was read


def test_since_limits_the_leads_compared(synced, sandbox, cli):
    result = cli(
        "reconcile", synced["data"], "--config", synced["cfg"], "--since", "2026-03-28T00:00:00Z", "-q"
    )
    assert result.exit_code == 0
    report = synced["tmp"] / "since"
    cli(
        "reconcile",
        "--config",
        synced["cfg"],
        "--state",
        synced["state"],
        "--since",
        "2026-03-28",
        "--report",
        report,
    )
    compared = json.loads((report / "summary.json").read_text())["leads"]["compared"]
    # consent on March 28 (i % 28 == 27) after midnight: 5000 // 28 leads (+1 for the remainder)
    assert compared == sum(1 for i in range(LEADS) if i % 28 == 27)
    assert (
        cli("reconcile", "--config", synced["cfg"], "--state", synced["state"], "--since", "soon").exit_code
        == 2
    )


def test_drift_names_the_record_that_won_the_field(tmp_path, sandbox, cli):
    """Not the lead's latest record: the one whose consent Marketo lost."""
    sandbox.seed_leads([{"email": "kim@example.com"}])
    data = write_ndjson(
        tmp_path / "events.ndjson",
        [
            event("kim@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}),
            event("kim@example.com", "2026-02-01T00:00:00Z", {"product_analytics": False}),
        ],
    )
    cfg = make_config(tmp_path, sandbox)
    assert cli("sync", data, "--config", cfg, "-q").exit_code == 0
    httpx.patch(sandbox.base_url + "/_sandbox/leads",
                json=[{"email": "kim@example.com", "set": {"didomiNewsletterOptIn": False}}])  # fmt: skip
    report = tmp_path / "r"
    result = cli("reconcile", data, "--config", cfg, "--report", report)
    assert result.exit_code == 1
    (drift,) = _drift_lines(report)
    assert drift["source"].endswith("events.ndjson:2")  # the lead's latest record
    assert drift["fields"]["didomiNewsletterOptIn"]["source"].endswith("events.ndjson:1")
    assert drift["fields"]["didomiNewsletterOptIn"]["consent_at"] == "2026-01-01T00:00:00Z"
    assert "events.ndjson:1) / Marketo false" in result.stdout


def test_reconcile_needs_inputs_or_a_state(tmp_path, sandbox, cli):
    cfg = make_config(tmp_path, sandbox)
    result = cli("reconcile", "--config", cfg)
    assert result.exit_code == 2
    assert "--state" in result.output


@pytest.mark.parametrize(
    ("didomi", "marketo", "same"),
    [
        (True, True, True),
        (True, "true", True),
        (False, "False", True),
        (False, None, False),
        (True, False, False),
        ("2026-03-01T10:00:07.250000Z", "2026-03-01T10:00:07Z", True),
        ("2026-03-01T10:00:07Z", "2026-03-01T11:00:07+01:00", True),
        ("2026-03-01T10:00:07Z", "2026-03-01T10:00:08Z", False),
        ("FR", "FR", True),
        ("FR", "fr", False),
        (3, "3", True),
    ],
)
def test_values_compare_as_marketo_spells_them(didomi, marketo, same):
    assert same_value(didomi, marketo) is same
