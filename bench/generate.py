"""Generate large Didomi batch-export partitions for the benchmark (never committed).

Each line is `{"user": {...}, "events": [...]}` as Didomi's batch export writes it, gzipped
NDJSON in `.../date=YYYY-MM-DD/users/part-N.json.gz` with a `_SUCCESS` marker.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import orjson

PURPOSES = ("newsletter", "product_analytics", "personalisation")


def _consents(rng: random.Random, k: int) -> dict:
    chosen = rng.sample(PURPOSES, k)
    purposes = [{"id": p, "enabled": rng.random() < 0.6} for p in chosen]
    if "newsletter" in chosen:
        purposes[chosen.index("newsletter")]["values"] = {"topics": {"value": "product_news,events"}}
    return {"purposes": purposes, "vendors": {"enabled": [], "disabled": []}}


def export_line(i: int, events: int, rng: random.Random) -> dict:
    email = f"user{i:08d}@example.com"
    evs = []
    for j in range(events):
        day = 1 + (j * 5 + i) % 27
        evs.append({
            "id": f"e{i:08d}-{j}",
            "created_at": f"2026-10-{day:02d}T{(i + j) % 24:02d}:{j * 7 % 60:02d}:00Z",
            "status": "confirmed",
            "user": {"id": f"d{i:08d}", "organization_user_id": email},
            "consents": _consents(rng, 1 + j % 2),
        })  # fmt: skip
    return {
        "user": {
            "id": f"d{i:08d}",
            "organization_id": "bench-org",
            "organization_user_id": email,
            "created_at": "2026-09-01T00:00:00Z",
            "updated_at": "2026-10-28T00:00:00Z",
            "country": "FR",
            "consents": _consents(rng, 3),
        },
        "events": evs,
    }


def write_partition(root: Path, users: int, events_per_user: int, parts: int = 4, seed: int = 7) -> Path:
    """Write a complete partition under root; returns the `users/` folder."""
    folder = root / "export-id=bench" / "date=2026-10-28" / "users"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_part = -(-users // parts)
    dumps = orjson.dumps
    for part in range(parts):
        start, stop = part * per_part, min(users, (part + 1) * per_part)
        with gzip.open(folder / f"part-{part:05d}.json.gz", "wb", compresslevel=1) as f:
            buf = []
            for i in range(start, stop):
                buf.append(dumps(export_line(i, events_per_user, rng)))
                if len(buf) >= 5000:
                    f.write(b"\n".join(buf) + b"\n")
                    buf.clear()
            if buf:
                f.write(b"\n".join(buf) + b"\n")
    (folder / "_SUCCESS").write_bytes(b"")
    return folder


def write_leads(path: Path, users: int) -> None:
    """Existing Marketo leads for the sandbox, matching the generated users."""
    path.write_text(json.dumps([{"email": f"user{i:08d}@example.com"} for i in range(users)]))


BENCH_CONFIG = {
    "type_id": "marketo",
    "authentication": {"client_id": "sandbox-client", "client_secret": "sandbox-secret", "instance": ""},
    "properties": {"user_identifier": ["email"]},
    "mappings": [
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiAnalyticsOptIn", "value": "consents_purposes_product_analytics_enabled"},
        {"id": "didomiTopics", "value": "consents_purposes_newsletter_values_topics"},
        {"id": "didomiConsentUpdatedAt", "value": "updated_at"},
    ],
    "upsert_mode": False,
}


# The API-call comparison: 4 purposes give 15 non-empty sets of fields to send.
CALLS_PURPOSES = ("newsletter", "product_analytics", "personalisation", "ads")
CALLS_CONFIG = dict(
    BENCH_CONFIG,
    mappings=[
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiAnalyticsOptIn", "value": "consents_purposes_product_analytics_enabled"},
        {"id": "didomiEmailChannelOptIn", "value": "consents_purposes_personalisation_enabled"},
        {"id": "boolean_field", "value": "consents_purposes_ads_enabled"},
    ],
    upsert_mode=True,  # bulk import creates or updates: the path auto may take with email
)


def write_field_set_users(path: Path, users: int) -> int:
    """Didomi users (NDJSON) whose leads carry one of 15 sets of fields; returns the set count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sets = 2 ** len(CALLS_PURPOSES) - 1
    with open(path, "wb") as f:
        for i in range(users):
            mask = 1 + i % sets
            purposes = [
                {"id": p, "enabled": (i >> b) % 2 == 0} for b, p in enumerate(CALLS_PURPOSES) if mask >> b & 1
            ]
            f.write(orjson.dumps({
                "id": f"d{i:08d}", "organization_user_id": f"user{i:08d}@example.com",
                "updated_at": "2026-10-28T00:00:00Z", "consents": {"purposes": purposes},
            }) + b"\n")  # fmt: skip
    return sets
