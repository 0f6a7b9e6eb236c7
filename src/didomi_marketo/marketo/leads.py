"""Read leads back from Marketo with Get Leads by filter (`reconcile`).

Adobe (leads.md, "Query"): `GET /rest/v1/leads.json?filterType=&filterValues=&fields=` takes up
to 300 values a call and pages with `nextPageToken`; a URI over 8 KB is refused with HTTP 414,
so a longer query goes as `POST ?_method=GET` with the query string as a form body. A field
asked for but absent from a result row is null.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from didomi_marketo.marketo.client import CallFailed, MarketoClient, RetryPolicy, Stopped
from didomi_marketo.marketo.limiter import Limiter

LEADS_PATH = "/rest/v1/leads.json"
MAX_FILTER_VALUES = 300  # Adobe: filterValues accepts up to 300 values
MAX_URI_BYTES = 8192  # above this Marketo answers HTTP 414
URI_MARGIN = 256  # the gateway may count a little more than our path and query (host, encoding)


def calls_for(keys: int) -> int:
    """Get Leads calls to read `keys` leads (one page each: no key matches more than 300)."""
    return math.ceil(keys / MAX_FILTER_VALUES)


def lead_key(row: dict[str, Any], lookup_field: str) -> str | None:
    """The key of a lead row as the fold spells it: emails lowercased, ids as decimal strings."""
    value = row.get(lookup_field)
    if value is None:
        return None
    if lookup_field == "id":
        return str(int(value))
    return str(value).strip().lower()


class ReadRefused(Exception):
    """Marketo refused the query itself with a 1xxx code (a field it does not know, 1006, or
    cannot filter on, 1011): the same query fails the same way, so it is never retried."""

    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


@dataclass
class ReadStats:
    calls: int = 0
    post_calls: int = 0  # sent as POST ?_method=GET (URI over 8 KB)
    pages: int = 0


@dataclass
class LeadReader:
    """Reads `fields` (and the lookup field) of the leads with the given keys.

    Shares the delivery limiter's rules: each call takes a slot of `limiter` (window and
    concurrency) and transient failures go through `policy`, as a Sync Leads call would.
    """

    client: MarketoClient
    limiter: Limiter
    policy: RetryPolicy
    lookup_field: str
    fields: list[str]
    max_calls: int | None = None
    stats: ReadStats = field(default_factory=ReadStats)

    def _base_uri_bytes(self) -> int:
        return len(self.client.credentials.base_url) + len(LEADS_PATH) + URI_MARGIN

    async def read(self, keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """key -> the Marketo rows found for it (several when Marketo holds duplicates)."""
        batch: list[str] = []
        batches: list[list[str]] = []
        for k in keys:
            batch.append(k)
            if len(batch) == MAX_FILTER_VALUES:
                batches.append(batch)
                batch = []
        if batch:
            batches.append(batch)
        found: dict[str, list[dict[str, Any]]] = {}
        pending = iter(batches)

        async def worker() -> None:
            for chunk in pending:  # one shared iterator: each chunk is read once
                for row in await self._read_chunk(chunk):
                    key = lead_key(row, self.lookup_field)
                    if key is not None:
                        found.setdefault(key, []).append(row)

        await asyncio.gather(*(worker() for _ in range(max(1, min(self.limiter.concurrency, len(batches))))))
        return found

    async def _read_chunk(self, keys: list[str]) -> list[dict[str, Any]]:
        params = {
            "filterType": self.lookup_field,
            "filterValues": ",".join(keys),
            "fields": ",".join(dict.fromkeys([self.lookup_field, *self.fields])),
        }
        rows: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = dict(params, **({"nextPageToken": token} if token else {}))
            body = await self.policy.run(lambda page=page: self._call(page))  # type: ignore[misc]
            result = body.get("result")
            if not isinstance(result, list):
                raise CallFailed("unreadable", f"{LEADS_PATH} answered without a result list")
            rows.extend(r for r in result if isinstance(r, dict))
            self.stats.pages += 1
            token = body.get("nextPageToken")
            if not token or not result:
                return rows

    async def _call(self, params: dict[str, str]) -> dict[str, Any]:
        long_uri = self._base_uri_bytes() + len(urlencode(params)) + 1 > MAX_URI_BYTES
        async with self.limiter.slot():
            if self.max_calls is not None and self.stats.calls >= self.max_calls:
                raise Stopped(f"the --max-calls budget of {self.max_calls} calls is spent")
            self.stats.calls += 1
            try:
                if long_uri:
                    self.stats.post_calls += 1
                    return await self.client.call("POST", LEADS_PATH, params={"_method": "GET"}, form=params)
                return await self.client.call("GET", LEADS_PATH, params=params)
            except CallFailed as e:
                if e.code.isdigit() and e.code.startswith("1"):
                    raise ReadRefused(e.code, e.message) from None
                raise
