"""Write sample_exports/: a Didomi batch-export partition, webhook events, a Consents API page,
configs, existing Marketo leads, and a file of bad records. Deterministic: re-running it
rewrites the same files. The story each file tells is in sample_exports/README.md.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sample_exports"
ORG = "acme-org"
DATA = ROOT / "didomi"
PARTITION = DATA / "export-id=exp_9f8e7d" / "date=2026-11-27" / "users"
TOPICS = ["product_news", "events", "offers"]
rng = random.Random(20261127)


def purpose(pid: str, enabled: bool | None, values: dict[str, str] | None = None) -> dict:
    p: dict = {"id": pid, "enabled": enabled, "metadata": {}}
    if values is not None:
        p["values"] = {k: {"value": v} for k, v in values.items()}
    return p


def consents(newsletter, analytics, email_channel=None, topics=None) -> dict:
    purposes = []
    if newsletter is not None:
        purposes.append(purpose("newsletter", newsletter, {"topics": topics} if topics else None))
    if analytics is not None:
        purposes.append(purpose("product_analytics", analytics))
    c: dict = {"purposes": purposes, "vendors": {"enabled": [], "disabled": []}}
    if email_channel is not None:
        c["channels"] = [{"id": "email", "enabled": email_channel, "metadata": {}}]
    return c


def user(email: str, updated_at: str, c: dict, country: str | None = "FR", n: int = 0) -> dict:
    return {
        "id": f"didomi-user-{zlib.crc32(email.encode()):08x}-{n}",
        "organization_id": ORG,
        "organization_user_id": email,
        "organization_user_id_type": "email",
        "version": 3,
        "created_at": "2025-03-02T10:00:00Z",
        "updated_at": updated_at,
        "country": country,
        "last_seen_country": country,
        "metadata": {"source": "preference-center"},
        "consents": c,
    }


def event(email: str | None, created_at: str, c: dict, **extra) -> dict:
    e = {
        "id": f"evt-{rng.getrandbits(48):012x}",
        "organization_id": ORG,
        "created_at": created_at,
        "updated_at": created_at,
        "status": "confirmed",
        "regulation": "gdpr",
        "user": {"id": f"didomi-user-{rng.getrandbits(32):08x}"},
        "consents": c,
    }
    if email is not None:
        e["user"]["organization_user_id"] = email
    e.update(extra)
    return e


def export_lines() -> list[dict]:
    lines = []
    # Hand-picked users whose outcome the README and the end-to-end test explain.
    lines.append(
        {  # alice: opted in on the 20th after opting out on the 1st; a webhook later flips it
            "user": user(
                "alice@example.com",
                "2026-11-20T08:00:00Z",
                consents(True, False, True, "product_news,events"),
            ),
            "events": [
                event("alice@example.com", "2026-11-01T09:00:00Z", consents(False, None)),
                event(
                    "alice@example.com",
                    "2026-11-20T08:00:00Z",
                    consents(True, False, True, "product_news,events"),
                ),
            ],
        }
    )
    lines.append(
        {  # bob: a pending event (double opt-in not confirmed) does not count
            "user": user("Bob@Example.com", "2026-11-10T12:00:00Z", consents(False, True)),
            "events": [
                event("Bob@Example.com", "2026-11-10T12:00:00Z", consents(False, True)),
                event(
                    "Bob@Example.com", "2026-11-26T12:00:00Z", consents(True, None), status="pending_approval"
                ),
            ],
        }
    )
    lines.append(
        {  # carol: her events carry only newsletter; analytics comes from her status
            "user": user(
                "carol@example.com",
                "2026-11-05T07:30:00Z",
                consents(True, True, None, "offers"),
                country="DE",
            ),
            "events": [
                event("carol@example.com", "2026-11-05T07:30:00Z", consents(True, None, None, "offers"))
            ],
        }
    )
    lines.append(
        {  # nobody@: not a lead in Marketo; upsert_mode false -> expected 1004 skip
            "user": user("nobody@example.com", "2026-11-12T10:00:00Z", consents(True, True)),
            "events": [event("nobody@example.com", "2026-11-12T10:00:00Z", consents(True, True))],
        }
    )
    # Generated users, all existing leads in Marketo.
    for i in range(1, 41):
        email = f"user{i:03d}@example.com"
        t_day = 1 + rng.randrange(25)
        nl, an = rng.random() < 0.6, rng.random() < 0.4
        topics = ",".join(sorted(rng.sample(TOPICS, rng.randrange(1, 3)))) if nl else None
        ts = f"2026-11-{t_day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z"
        c = consents(nl, an, rng.random() < 0.5, topics)
        lines.append(
            {
                "user": user(email, ts, c, country=rng.choice(["FR", "DE", "ES", "IT", None])),
                "events": [event(email, ts, c)],
            }
        )
    return lines


def webhooks() -> list[dict]:
    return [
        {
            "type": "event.created",
            "parameters": {
                "entity": event(  # alice opts out after the export
                    "alice@example.com", "2026-11-28T09:00:00Z", consents(False, None)
                )
            },
        },
        {
            "type": "event.created",
            "parameters": {
                "entity": event(  # an anonymous visitor
                    None, "2026-11-28T09:01:00Z", consents(True, True)
                )
            },
        },
        {
            "type": "event.created",
            "parameters": {
                "entity": event(  # a CPRA event must not touch GDPR consent
                    "carol@example.com", "2026-11-28T09:02:00Z", consents(False, False), regulation="cpra"
                )
            },
        },
        {
            "type": "user.updated",
            "parameters": {
                "source": {"id": "evt-src-1", "created_at": "2026-11-28T09:03:00Z"},
                "old_entity": user("user001@example.com", "2026-11-01T00:00:00Z", consents(False, False)),
                "new_entity": user(
                    "user001@example.com", "2026-11-28T09:03:00Z", consents(True, True, True, "events")
                ),
            },
        },
        {
            "type": "event.updated",
            "parameters": {
                "old_entity": event("user002@example.com", "2026-11-28T09:04:00Z", consents(None, True)),
                "new_entity": event("user002@example.com", "2026-11-28T09:04:00Z", consents(None, False)),
            },
        },
        {
            "type": "event.created",
            "parameters": {
                "entity": event(  # an old event delivered late: loses
                    "user003@example.com", "2026-10-01T00:00:00Z", consents(False, False)
                )
            },
        },
        {
            "type": "user.deleted",
            "parameters": {"entity": {"id": "didomi-user-x", "organization_user_id": "user004@example.com"}},
        },
        {
            "type": "event.created",
            "parameters": {
                "entity": event(  # a new user: not in Marketo yet
                    "zoe@example.com", "2026-11-28T09:05:00Z", consents(True, None, True, "offers")
                )
            },
        },
    ]


def api_page() -> dict:
    return {
        "data": [
            user(
                "dave@example.com",
                "2026-11-21T15:00:00Z",
                consents(True, False, False, "product_news"),
                country="ES",
            ),
            user("erin@example.com", "2026-11-22T16:00:00Z", consents(False, True), country="IT"),
        ],
        "limit": 100,
        "cursor": None,
    }


BAD_LINES = [
    '{"user": {"organization_user_id": "broken@example.com", "consents": {"purposes": [',
    '{"hello": "world"}',
    json.dumps(event("not-an-email", "2026-11-28T10:00:00Z", consents(True, None))),
    json.dumps(
        {k: v for k, v in event("frank@example.com", "", consents(True, None)).items() if k != "created_at"}
    ),
    json.dumps(event("frank@example.com", "2026-11-28T10:05:00Z", consents(True, True))),
]


def leads() -> list[dict]:
    emails = [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
        "erin@example.com",
        "frank@example.com",
    ]
    emails += [f"user{i:03d}@example.com" for i in range(1, 41)]
    return [
        {
            "email": e,
            "firstName": e.split("@")[0].capitalize(),
            "lastName": "Sample",
            "didomiNewsletterOptIn": False,
        }
        for e in emails
    ]


CONFIG = {
    "type_id": "marketo",
    "authentication": {
        "client_id": "${MARKETO_CLIENT_ID}",
        "client_secret": "${MARKETO_CLIENT_SECRET}",
        "instance": "http://127.0.0.1:8787/rest",
    },
    "properties": {"user_identifier": ["email"]},
    "mappings": [
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiAnalyticsOptIn", "value": "consents_purposes_product_analytics_enabled"},
        {"id": "didomiEmailChannelOptIn", "value": "consents_channels_email_enabled"},
        {"id": "didomiTopics", "value": "consents_purposes_newsletter_values_topics"},
        {"id": "didomiCountry", "value": "country"},
        {"id": "didomiConsentUpdatedAt", "value": "updated_at"},
    ],
    "upsert_mode": False,
}

YAML_CONFIG = """\
# The same Didomi console config as marketo.json, in YAML.
type_id: marketo
authentication:
  client_id: ${MARKETO_CLIENT_ID}
  client_secret: ${MARKETO_CLIENT_SECRET}
  instance: http://127.0.0.1:8787/rest
properties:
  user_identifier: [email]
mappings:
  - id: didomiNewsletterOptIn
    value: consents_purposes_newsletter_enabled
  - id: didomiAnalyticsOptIn
    value: consents_purposes_product_analytics_enabled
  - id: didomiEmailChannelOptIn
    value: consents_channels_email_enabled
  - id: didomiTopics
    value: consents_purposes_newsletter_values_topics
  - id: didomiCountry
    value: country
  - id: didomiConsentUpdatedAt
    value: updated_at
upsert_mode: false
"""

# A proposed mapping change, for `preview --compare`: newsletter now also drives Marketo's own
# `unsubscribed` (inverted), analytics is dropped, topics get display names.
YAML_CONFIG_V2 = """\
type_id: marketo
authentication:
  client_id: ${MARKETO_CLIENT_ID}
  client_secret: ${MARKETO_CLIENT_SECRET}
  instance: http://127.0.0.1:8787/rest
properties:
  user_identifier: [email]
mappings:
  - id: didomiNewsletterOptIn
    value: consents_purposes_newsletter_enabled
  - id: unsubscribed
    value: consents_purposes_newsletter_enabled
    transform: invert
  - id: didomiEmailChannelOptIn
    value: consents_channels_email_enabled
  - id: didomiTopics
    value: consents_purposes_newsletter_values_topics
    transform: {map: {product_news: Product news, events: Events, offers: Offers}}
  - id: didomiCountry
    value: country
  - id: didomiConsentUpdatedAt
    value: updated_at
upsert_mode: false
"""


def write_gz(path: Path, lines: list[dict]) -> None:
    data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data, mtime=0))


def main() -> None:
    PARTITION.mkdir(parents=True, exist_ok=True)
    lines = export_lines()
    half = len(lines) // 2
    write_gz(PARTITION / "part-00000-7c1f.json.gz", lines[:half])
    write_gz(PARTITION / "part-00001-7c1f.json.gz", lines[half:])
    (PARTITION / "_SUCCESS").write_bytes(b"")
    (DATA / "webhooks").mkdir(exist_ok=True)
    (DATA / "webhooks" / "events-2026-11-28.ndjson").write_text(
        "".join(json.dumps(w) + "\n" for w in webhooks())
    )
    (DATA / "api").mkdir(exist_ok=True)
    (DATA / "api" / "consents-users-page.json").write_text(json.dumps(api_page(), indent=2) + "\n")
    (DATA / "bad").mkdir(exist_ok=True)
    (DATA / "bad" / "bad-records.ndjson").write_text("\n".join(BAD_LINES) + "\n")
    (ROOT / "config").mkdir(exist_ok=True)
    (ROOT / "config" / "marketo.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (ROOT / "config" / "marketo.yaml").write_text(YAML_CONFIG)
    (ROOT / "config" / "marketo-v2.yaml").write_text(YAML_CONFIG_V2)
    (ROOT / "leads.json").write_text(json.dumps(leads(), indent=1) + "\n")


if __name__ == "__main__":
    main()
