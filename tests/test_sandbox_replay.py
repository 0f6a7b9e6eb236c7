"""Replay recorded real Marketo traffic through the sandbox and compare shapes and codes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from didomi_marketo.sandbox import DESCRIBE_FILE, MarketoSandbox

FIXTURES = Path(__file__).parent / "fixtures" / "marketo"
SYNC_EXCHANGES: list[dict[str, Any]] = json.loads((FIXTURES / "sync-leads-real.json").read_text())
REQUEST_ID = re.compile(r"^[0-9a-f]+#[0-9a-f]+$")


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _token(client: httpx.Client, sb: MarketoSandbox) -> httpx.Response:
    cfg = sb.config
    params = {
        "grant_type": "client_credentials",
        "client_id": cfg.client_id,
        "client_secret": cfg.client_secret,
    }
    return client.get("/identity/oauth/token", params=params)


def test_replay_sync_leads_recording(sandbox_factory):
    sb = sandbox_factory(next_id=7149)
    with httpx.Client(verify=False, base_url=sb.base_url) as client:
        token = _token(client, sb).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        for n, exchange in enumerate(SYNC_EXCHANGES):
            resp = client.post(
                "/rest/v1/leads.json",
                params=exchange.get("query"),
                json=exchange["request"],
                headers=headers,
            )
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/json;charset=UTF-8"
            got, want = resp.json(), exchange["response"]
            where = f"exchange {n}: {exchange['request']}"
            assert set(got) == set(want) == {"requestId", "result", "success"}, where
            assert got["success"] is True, where
            assert REQUEST_ID.match(got["requestId"]), where
            assert len(got["result"]) == len(want["result"]), where
            for g, w in zip(got["result"], want["result"], strict=True):
                assert set(g) == set(w), where
                assert g["status"] == w["status"], where
                assert g.get("id") == w.get("id"), where
                if "reasons" in w:
                    assert [r["code"] for r in g["reasons"]] == [r["code"] for r in w["reasons"]]
                    for gr, wr in zip(g["reasons"], w["reasons"], strict=True):
                        if wr["code"] == "1003":
                            assert gr["message"] == wr["message"], where
    # the two deletes of the recording leave the store empty; 7150 was deleted earlier
    assert sb.leads() == []
    stats = sb.stats()
    assert stats["sync_calls"] == len(SYNC_EXCHANGES) - 2
    assert stats["delete_calls"] == 2
    assert stats["internal_errors"] == 0


def test_replay_state_matches_recorded_reads(sandbox_factory):
    """After the first four exchanges the recording shows lastName cleared by null."""
    sb = sandbox_factory(next_id=7149)
    with httpx.Client(verify=False, base_url=sb.base_url) as client:
        headers = {"Authorization": f"Bearer {_token(client, sb).json()['access_token']}"}
        for exchange in SYNC_EXCHANGES[:4]:
            client.post("/rest/v1/leads.json", json=exchange["request"], headers=headers)
    lead = sb.lead_by_email("USER1@example.com")
    assert lead is not None
    assert lead["id"] == 7149
    assert lead["firstName"] == "Alex"
    assert lead["lastName"] is None


@pytest.mark.parametrize("n", range(len(SYNC_EXCHANGES)))
def test_recorded_requests_fit_swagger_sync_lead_request(n):
    swagger = _load("swagger-leads-subset.json")
    schema = swagger["definitions"]["SyncLeadRequest"]
    request = SYNC_EXCHANGES[n]["request"]
    assert set(request) <= set(schema["properties"])
    assert set(schema["required"]) <= set(request)
    if "action" in request:
        assert request["action"] in schema["properties"]["action"]["enum"]
    assert isinstance(request["input"], list)
    assert all(isinstance(lead, dict) for lead in request["input"])


def test_identity_response_matches_recording(sandbox):
    recorded = _load("identity-real.json")
    with httpx.Client(verify=False, base_url=sandbox.base_url) as client:
        resp = _token(client, sandbox)
    assert resp.status_code == recorded[0]["status"] == 200
    body = resp.json()
    for exchange in recorded:
        want = exchange["response"]
        assert set(body) == set(want)
        assert {k: type(v) for k, v in body.items()} == {k: type(v) for k, v in want.items()}
        for header in ("Content-Type", "Cache-Control", "Pragma"):
            assert resp.headers[header] == exchange["headers"][header]
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3599  # a fresh token, as recorded
    assert re.fullmatch(r"[0-9a-f-]{36}:[a-z]+", body["access_token"])


def test_describe_served_extends_recording(sandbox):
    real = _load("describe-real.json")
    with httpx.Client(verify=False, base_url=sandbox.base_url) as client:
        token = _token(client, sandbox).json()["access_token"]
        resp = client.get("/rest/v1/leads/describe.json", headers={"Authorization": f"Bearer {token}"})
    body = resp.json()
    assert set(body) == {"requestId", "result", "success"}
    served, recorded = body["result"], real["result"]
    assert len(recorded) == 100
    assert served[:100] == recorded  # verbatim prefix: ids, names, types, lengths, soap
    assert served == json.loads(DESCRIBE_FILE.read_text())["result"]
    extra = {f["rest"]["name"]: f for f in served[100:]}
    assert {name: f["dataType"] for name, f in extra.items()} == {
        "date_field": "date",
        "didomiNewsletterOptIn": "boolean",
        "didomiAnalyticsOptIn": "boolean",
        "didomiEmailChannelOptIn": "boolean",
        "didomiSmsChannelOptIn": "boolean",
        "didomiTopics": "string",
        "didomiFrequency": "string",
        "didomiConsentUpdatedAt": "datetime",
        "didomiCountry": "string",
        "didomiPhoneOptIn": "boolean",
        "didomiReadOnlyFlag": "boolean",
    }
    for name, f in extra.items():
        assert f["id"] > 900
        assert set(f) <= {"id", "displayName", "dataType", "length", "rest", "soap"}
        assert f["rest"]["readOnly"] is (name == "didomiReadOnlyFlag")
        assert ("length" in f) is (f["dataType"] == "string")
    ids = [f["id"] for f in served]
    assert len(set(ids)) == len(ids)
    names = [f["rest"]["name"] for f in served]
    assert len(set(names)) == len(names)
    # every field the recording's sync requests use exists in the served describe
    used = {k for ex in SYNC_EXCHANGES for lead in ex["request"]["input"] for k in lead}
    assert used <= set(names)
