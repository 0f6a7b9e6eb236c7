"""Marketo's lead schema: read it (describe2, else describe) and normalise it.

What the fields *are* lives here; whether a mapping fits them is `check.py`'s question.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from didomi_marketo.errors import FatalError
from didomi_marketo.marketo.client import CallFailed, GaveUp, MarketoClient, RetryPolicy
from didomi_marketo.marketo.credentials import Credentials

DESCRIBE2_PATH = "/rest/v1/leads/describe2.json"
DESCRIBE_PATH = "/rest/v1/leads/describe.json"


def normalise_fields(raw: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """describe (v1), describe2 (its "API Lead" document or its fields) or already normalised
    entries -> `{name, displayName, dataType, length, writable, rest, searchable}` each.

    `rest` is false for a v1 field without a `rest` entry (not usable through REST);
    `searchable` (describe2's searchableFields, usable as lookupField) is None when unknown.
    """
    out: list[dict[str, Any]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("fields"), list):  # describe2's object document
            searchable = {
                g[0] for g in entry.get("searchableFields") or [] if isinstance(g, list) and len(g) == 1
            }
            for f in normalise_fields(entry["fields"]):
                f["searchable"] = f["name"] in searchable if searchable else None
                out.append(f)
        elif "writable" in entry and "name" in entry:
            out.append(dict(entry))
        elif isinstance(entry.get("rest"), dict):
            rest = entry["rest"]
            out.append(_field(rest.get("name"), entry, not rest.get("readOnly", False), True))
        elif "updateable" in entry and "name" in entry:
            out.append(_field(entry.get("name"), entry, bool(entry["updateable"]), True))
        elif isinstance(entry.get("soap"), dict):  # v1 field valid for SOAP only
            out.append(_field(entry["soap"].get("name"), entry, False, False))
    return [f for f in out if isinstance(f.get("name"), str) and f["name"]]


def _field(name: Any, entry: dict[str, Any], writable: bool, rest: bool) -> dict[str, Any]:
    return {
        "name": name,
        "displayName": str(entry.get("displayName") or ""),
        "dataType": str(entry.get("dataType") or ""),
        "length": entry.get("length"),
        "writable": writable,
        "rest": rest,
        "searchable": None,
    }


async def get_json(client: MarketoClient, path: str) -> dict[str, Any]:
    """One GET with a short retry policy: re-auth on 601/602, back off on 606/615/604..."""
    policy = RetryPolicy(clock=client.clock, min_attempts=3, min_seconds=0.0, base_delay=0.5, max_delay=4.0)
    return await policy.run(lambda: client.call("GET", path))


async def fetch_schema_from(client: MarketoClient) -> tuple[list[dict[str, Any]], str]:
    """Marketo's lead fields (normalised) and which endpoint gave them: describe2, else describe.

    Raises AuthError (bad credentials) or FatalError (unreachable, access denied)."""
    try:
        fields = normalise_fields((await get_json(client, DESCRIBE2_PATH)).get("result") or [])
        if fields:
            return fields, "describe2"
    except (CallFailed, GaveUp):
        pass  # an instance (or proxy) without describe2: the v1 describe says the same
    try:
        fields = normalise_fields((await get_json(client, DESCRIBE_PATH)).get("result") or [])
    except (CallFailed, GaveUp) as e:
        raise FatalError(
            f"cannot read Marketo's lead fields at {client.credentials.base_url}: {_why(e)}"
        ) from None
    if not fields:
        raise FatalError(f"Marketo at {client.credentials.base_url} described no lead fields")
    return fields, "describe"


async def fetch_schema(client: MarketoClient) -> list[dict[str, Any]]:
    """Marketo's lead fields, normalised (see `normalise_fields`): describe2, else describe.

    The result is plain JSON (cacheable) and what `check.schema_problems` takes."""
    return (await fetch_schema_from(client))[0]


def _why(e: CallFailed | GaveUp) -> str:
    return str(e.last if isinstance(e, GaveUp) else e)


async def authenticate(client: MarketoClient) -> None:
    try:
        await client.token()
    except CallFailed as e:
        raise FatalError(f"cannot reach Marketo at {client.credentials.base_url}: {e.message}") from None


def read_lead_fields(credentials: Credentials, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Authenticate and read the lead fields once (for `fields` and `init --instance`)."""

    async def fetch() -> list[dict[str, Any]]:
        async with MarketoClient(credentials, timeout=timeout, max_connections=1) as client:
            await authenticate(client)
            return await fetch_schema(client)

    return asyncio.run(fetch())


def filter_fields(fields: Iterable[dict[str, Any]], match: str | None = None) -> list[dict[str, Any]]:
    """REST-usable fields whose REST name or display name contains `match` (any case), or whose
    data type is `match`; sorted by REST name."""
    wanted = (match or "").lower()
    out = [
        f
        for f in normalise_fields(fields)
        if f["rest"]
        and (
            not wanted
            or wanted in f["name"].lower()
            or wanted in f["displayName"].lower()
            or wanted == f["dataType"].lower()
        )
    ]
    return sorted(out, key=lambda f: f["name"].lower())
