"""The Get Leads by filter reader against the sandbox, over real sockets (issue #14)."""

from __future__ import annotations

import asyncio
from typing import Any

from didomi_marketo.config import Credentials, Secret
from didomi_marketo.marketo.client import MarketoClient, RetryPolicy
from didomi_marketo.marketo.leads import LeadReader, calls_for
from didomi_marketo.marketo.limiter import Limiter


def _read(sandbox: Any, keys: list[str], fields: list[str], lookup: str = "email") -> tuple[dict, LeadReader]:
    creds = Credentials("sandbox-client", Secret("sandbox-secret"), sandbox.base_url)

    async def go() -> tuple[dict, LeadReader]:
        async with MarketoClient(creds) as client:
            limiter = Limiter(100, 20.0, 10)
            reader = LeadReader(client, limiter, RetryPolicy(client.clock), lookup, fields)
            return await reader.read(keys), reader

    return asyncio.run(go())


def test_reads_300_keys_a_call_and_only_the_fields_asked(sandbox):
    emails = [f"u{i}@example.com" for i in range(650)]
    sandbox.seed_leads([{"email": e.upper(), "didomiCountry": "FR", "firstName": "X"} for e in emails])
    found, reader = _read(
        sandbox, [*emails, "absent@example.com"], ["didomiCountry", "didomiNewsletterOptIn"]
    )
    assert set(found) == set(emails)  # keys as the fold spells them: lowercased
    row = found["u7@example.com"][0]
    assert row["didomiCountry"] == "FR" and row["didomiNewsletterOptIn"] is None
    assert "firstName" not in row
    assert reader.stats.calls == calls_for(651) == 3
    assert reader.stats.post_calls == 0
    assert sandbox.stats()["get_leads_calls"] == 3


def test_long_queries_go_as_post_method_get(sandbox):
    emails = [f"a-rather-long-address-number-{i:04d}@subdomain.example.com" for i in range(320)]
    sandbox.seed_leads([{"email": e} for e in emails])
    found, reader = _read(sandbox, emails, ["didomiCountry"])
    assert len(found) == 320
    # the first 300 keys make a URI over 8 KB: POST ?_method=GET; the last 20 fit in a GET
    assert (reader.stats.calls, reader.stats.post_calls) == (2, 1)
    stats = sandbox.stats()
    assert (stats["get_leads_calls"], stats["get_leads_post_calls"]) == (2, 1)


def test_lead_ids_and_duplicates(sandbox):
    sandbox.seed_leads([{"id": 5, "email": "d@example.com"}, {"id": 9, "email": "d@example.com"}])
    found, _ = _read(sandbox, ["5", "9", "12"], ["email"], lookup="id")
    assert sorted(found) == ["5", "9"]
    found, _ = _read(sandbox, ["d@example.com"], ["didomiCountry"])
    assert [r["id"] for r in found["d@example.com"]] == [5, 9]
