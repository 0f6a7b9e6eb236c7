"""The sandbox's Get Leads by filter limits and its behind-the-tool's-back edits (issue #14)."""

from __future__ import annotations

from typing import Any

import httpx
from test_sandbox import LEADS, api, error_code


def _get(client: httpx.Client, **params: str) -> dict[str, Any]:
    return client.get(LEADS, params=params).json()


def test_filter_type_must_be_searchable(sandbox):
    sandbox.seed_leads([{"email": "a@example.com", "firstName": "A", "didomiCountry": "FR"}])
    with api(sandbox) as client:
        # Adobe: a standard field that is not searchable is 1011 "Field '%s' not supported"
        assert error_code(_get(client, filterType="firstName", filterValues="A")) == "1011"
        # ... a custom string field is searchable; a custom boolean is not
        assert _get(client, filterType="didomiCountry", filterValues="FR")["result"][0]["id"] == 1
        assert error_code(_get(client, filterType="didomiNewsletterOptIn", filterValues="true")) == "1011"
        assert error_code(_get(client, filterType="nosuchfield", filterValues="x")) == "1003"


def test_filter_values_limit_and_long_uri(sandbox):
    emails = [f"user{i:04d}@example.com" for i in range(301)]
    sandbox.seed_leads([{"email": e} for e in emails])
    with api(sandbox) as client:
        assert error_code(_get(client, filterType="email", filterValues=",".join(emails))) == "1003"
        three_hundred = ",".join(emails[:300])
        # 300 emails are ~6.9 KB: with a long field list the URI passes 8 KB -> HTTP 414 ...
        fields = ",".join(["email", "firstName", "lastName"] * 120)
        long_get = client.get(
            LEADS, params={"filterType": "email", "filterValues": three_hundred, "fields": fields}
        )
        assert long_get.status_code == 414
        # ... and the same query as POST ?_method=GET with a form body is answered
        form = {"filterType": "email", "filterValues": three_hundred, "fields": "email"}
        doc = client.post(LEADS, params={"_method": "GET"}, data=form).json()
    assert len(doc["result"]) == 300
    assert {r["email"] for r in doc["result"]} == set(emails[:300])
    stats = sandbox.stats()
    assert stats["get_leads_post_calls"] == 1
    assert stats["get_leads_calls"] == 2  # the 414 never reached the handler
    assert stats["sync_calls"] == 0


def test_patch_edits_blanks_and_deletes_leads(sandbox):
    sandbox.seed_leads(
        [
            {"email": "a@example.com", "didomiNewsletterOptIn": True, "didomiCountry": "FR"},
            {"email": "b@example.com", "didomiNewsletterOptIn": True},
            {"email": "c@example.com", "didomiNewsletterOptIn": False},
        ]
    )
    edits = [
        {"email": "A@example.com", "set": {"didomiNewsletterOptIn": False, "didomiCountry": None}},
        {"id": 2, "delete": True},
        {"email": "nobody@example.com", "set": {"didomiCountry": "DE"}},
    ]
    resp = httpx.patch(sandbox.base_url + "/_sandbox/leads", json=edits)
    assert resp.status_code == 200
    assert resp.json() == {"updated": 1, "deleted": 1, "not_found": ["nobody@example.com"]}
    leads = {lead["email"]: lead for lead in sandbox.leads()}
    assert set(leads) == {"a@example.com", "c@example.com"}
    assert leads["a@example.com"]["didomiNewsletterOptIn"] is False
    assert leads["a@example.com"]["didomiCountry"] is None
    assert leads["c@example.com"]["didomiNewsletterOptIn"] is False


def test_patch_refuses_unknown_fields_without_applying_anything(sandbox):
    sandbox.seed_leads([{"email": "a@example.com", "didomiCountry": "FR"}])
    edits = [
        {"email": "a@example.com", "set": {"didomiCountry": "DE"}},
        {"email": "a@example.com", "set": {"zz": 1}},
    ]
    resp = httpx.patch(sandbox.base_url + "/_sandbox/leads", json=edits)
    assert resp.status_code == 400
    assert "zz" in resp.json()["error"]
    assert sandbox.leads()[0]["didomiCountry"] == "FR"
    bad = httpx.patch(sandbox.base_url + "/_sandbox/leads", content=b"{not json")
    assert bad.status_code == 400
    assert httpx.delete(sandbox.base_url + "/_sandbox/leads").status_code == 405
