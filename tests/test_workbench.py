"""The mapping workbench: preview (alone, --compare, --state), check (offline, online), fields.

Preview numbers are checked against counts computed here, by a plain reading of the events
(latest created_at wins per purpose, ties to the later line), not through the library.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES, event, make_config, write_ndjson

from didomi_marketo.check import BLOCKING_KINDS, ERROR, WARNING, schema_problems
from didomi_marketo.config import load_config
from didomi_marketo.didomi.fold import stamp_from_json
from didomi_marketo.mapping import FieldMapping, parse_property, parse_transforms
from didomi_marketo.marketo.schema import normalise_fields
from didomi_marketo.preview import compare_mappings, run_preview
from didomi_marketo.state import LeadState

DESCRIBE = json.loads((Path(__file__).parent.parent / "src/didomi_marketo/data/describe.json").read_text())[
    "result"
]
CREDS_ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}
NO_CREDS_ENV = {"MARKETO_CLIENT_ID": None, "MARKETO_CLIENT_SECRET": None, "MARKETO_INSTANCE": None}
PURPOSES = ("newsletter", "product_analytics", "cookies")  # cookies is never mapped


# ---------------------------------------------------------------------------------------------
# A random but reproducible input, and the expected numbers computed by hand


def make_events(seed: int = 7, users: int = 40, events: int = 240) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(events):
        n = rng.randrange(users)
        key = f"User{n}@Example.com" if rng.random() < 0.2 else f"user{n}@example.com"
        at = f"2026-11-{rng.randrange(1, 28):02d}T{rng.randrange(24):02d}:00:00Z"  # ties happen
        purposes = {p: rng.choice([True, False, None]) for p in rng.sample(PURPOSES, rng.randrange(1, 4))}
        out.append(event(key, at, purposes))
    out.append(event("not-an-email", "2026-11-02T00:00:00Z", {"newsletter": True}))  # rejected
    out.append(event(None, "2026-11-02T00:00:00Z", {"newsletter": True}))  # anonymous: ignored
    out.append({**event("late@example.com", "x", {"newsletter": True}), "created_at": ""})  # rejected
    return out


def expected_state(events: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """lead -> {purpose: latest enabled}, read the simple way (lines in order, ties to the later)."""
    latest: dict[str, dict[str, tuple[str, bool]]] = {}
    for e in events:
        key = e["user"].get("organization_user_id")
        if not key or "@" not in key or not e["created_at"]:
            continue
        lead = latest.setdefault(key.lower(), {})
        for p in e["consents"]["purposes"]:
            if isinstance(p["enabled"], bool) and (
                p["id"] not in lead or e["created_at"] >= lead[p["id"]][0]
            ):
                lead[p["id"]] = (e["created_at"], p["enabled"])
    return {k: {p: v for p, (_, v) in purposes.items()} for k, purposes in latest.items()}


def mappings(*pairs: tuple[str, str] | tuple[str, str, Any]) -> list[dict[str, Any]]:
    out = []
    for pair in pairs:
        m: dict[str, Any] = {"id": pair[0], "value": pair[1]}
        if len(pair) == 3:
            m["transform"] = pair[2]
        out.append(m)
    return out


def nl(p: str) -> str:
    return f"consents_purposes_{p}_enabled"


def counts(values: list[Any], leads: int) -> dict[str, int]:
    t = sum(1 for v in values if v is True)
    f = sum(1 for v in values if v is False)
    o = sum(1 for v in values if v is not None and not isinstance(v, bool))
    return {"true": t, "false": f, "other": o, "absent": leads - t - f - o}


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    events = make_events()
    return write_ndjson(tmp_path / "in" / "events.ndjson", events), events


def config_at(directory: Path, sandbox=None, **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return make_config(directory, sandbox, **overrides)


# ---------------------------------------------------------------------------------------------
# preview


def test_preview_counts_equal_an_independent_count_and_touch_no_marketo(data, tmp_path, sandbox, cli):
    path, events = data
    config = config_at(tmp_path / "new", sandbox, authentication={
        "client_id": "${MARKETO_CLIENT_ID}", "client_secret": "${MARKETO_CLIENT_SECRET}",
        "instance": sandbox.base_url + "/rest",
    })  # fmt: skip
    result = cli("preview", path, "--config", config, "--format", "json", "--limit", "3", env=NO_CREDS_ENV)
    assert result.exit_code == 1, result.output  # two records were rejected
    doc = json.loads(result.stdout)
    summary = doc["summary"]

    state = expected_state(events)
    leads = len(state)
    assert summary["leads"] == leads
    assert summary["rejected"] == 2
    assert summary["ignored"]["anonymous"] == 1
    newsletter = [s.get("newsletter") for s in state.values()]
    analytics = [s.get("product_analytics") for s in state.values()]
    assert summary["fields"] == {
        "didomiNewsletterOptIn": counts(newsletter, leads),
        "didomiAnalyticsOptIn": counts(analytics, leads),
    }
    assert summary["to_send"] == sum(
        1 for s in state.values() if {"newsletter", "product_analytics"} & s.keys()
    )
    assert "changed" not in summary
    assert len(doc["samples"]) == 3
    for sample in doc["samples"]:  # each sample is a payload, lookup field first
        key = sample["email"]
        assert list(sample)[0] == "email"
        assert sample.get("didomiNewsletterOptIn") == state[key].get("newsletter")
        assert sample.get("didomiAnalyticsOptIn") == state[key].get("product_analytics")
    assert "not-an-email" in result.stderr  # why, one line per rejected record
    # Offline all the way: the sandbox named in the config never heard from us.
    stats = sandbox.stats()
    assert stats["calls_total"] == 0 and stats["identity_calls"] == 0 and stats["connections_total"] == 0


def test_preview_table_renders_counts_and_samples(data, tmp_path, cli):
    path, _ = data
    result = cli("preview", path, "-c", config_at(tmp_path / "c"), "--limit", "2", env=NO_CREDS_ENV)
    assert result.exit_code == 1
    for text in (
        "per Marketo field", "didomiNewsletterOptIn", "sample payloads", "rejected records, by reason",
        "organization_user_id … is not an email address",
    ):  # fmt: skip
        assert text in result.stdout


OLD = mappings(
    ("didomiNewsletterOptIn", nl("newsletter")),
    ("didomiAnalyticsOptIn", nl("product_analytics")),
    ("didomiPhoneOptIn", nl("newsletter")),
    ("didomiSmsChannelOptIn", nl("product_analytics")),
)
NEW = mappings(
    ("didomiNewsletterOptIn", nl("newsletter"), "text"),  # transform changed: true -> "true"
    ("didomiAnalyticsOptIn", nl("product_analytics")),  # unchanged
    ("didomiPhoneOptIn", nl("product_analytics")),  # source changed
    ("unsubscribed", nl("newsletter"), "invert"),  # added
)  # didomiSmsChannelOptIn removed


def test_preview_compare_counts_added_removed_and_changed_mappings(data, tmp_path, cli):
    path, events = data
    old = config_at(tmp_path / "old", mappings=OLD)
    new = config_at(tmp_path / "new", mappings=NEW)
    result = cli("preview", path, "-c", new, "--compare", old, "--format", "json", "--limit", "4")
    doc = json.loads(result.stdout)
    summary = doc["summary"]

    state = expected_state(events)
    with_nl = [k for k, s in state.items() if "newsletter" in s]
    with_an = [k for k, s in state.items() if "product_analytics" in s]
    phone_changes = [k for k, s in state.items() if s.get("newsletter") != s.get("product_analytics")]
    assert summary["changed"] == {
        "didomiNewsletterOptIn": len(with_nl),
        "didomiAnalyticsOptIn": 0,
        "didomiPhoneOptIn": len(phone_changes),
        "unsubscribed": len(with_nl),
        "didomiSmsChannelOptIn": len(with_an),
    }
    assert summary["leads_changed"] == len(set(with_nl) | set(with_an))
    statuses = {f: m["status"] for f, m in summary["mappings"].items()}
    assert statuses == {
        "didomiNewsletterOptIn": "transform changed",
        "didomiAnalyticsOptIn": "unchanged",
        "didomiPhoneOptIn": "source changed",
        "unsubscribed": "added",
        "didomiSmsChannelOptIn": "removed",
    }
    # The new config's own counts: unsubscribed is the inverse of the newsletter opt-in.
    inverted = [None if s.get("newsletter") is None else not s["newsletter"] for s in state.values()]
    assert summary["fields"]["unsubscribed"] == counts(inverted, len(state))
    assert summary["fields"]["didomiNewsletterOptIn"]["other"] == len(with_nl)  # now text
    assert doc["samples"]
    for sample in doc["samples"]:  # before -> after, field by field
        s = state[sample["key"]]
        for name, change in sample["changes"].items():
            if name == "unsubscribed":
                assert change == {"before": None, "after": not s["newsletter"]}
            elif name == "didomiSmsChannelOptIn":
                assert change == {"before": s["product_analytics"], "after": None}
            elif name == "didomiPhoneOptIn":
                assert change == {"before": s.get("newsletter"), "after": s.get("product_analytics")}
            else:
                assert name == "didomiNewsletterOptIn"
                assert change == {"before": s["newsletter"], "after": "true" if s["newsletter"] else "false"}

    rows = list(
        csv.DictReader(
            io.StringIO(cli("preview", path, "-c", new, "--compare", old, "--format", "csv").stdout)
        )
    )
    assert len(rows) == sum(summary["changed"].values())
    assert {r["field"] for r in rows if r["key"] == with_nl[0]} >= {"unsubscribed", "didomiNewsletterOptIn"}
    removed = [r for r in rows if r["field"] == "didomiSmsChannelOptIn"]
    assert all(r["after"] == "" and r["before"] in ("true", "false") for r in removed)

    table = cli("preview", path, "-c", new, "--compare", old).stdout
    assert "+ unsubscribed = consents_purposes_newsletter_enabled | invert" in table
    assert "- didomiSmsChannelOptIn (was consents_purposes_product_analytics_enabled)" in table
    assert "leads whose values change" in table and "sample leads (before -> after)" in table


def test_preview_compare_of_the_sample_configs(tmp_path, cli):
    """The bundled v2 proposal: adds unsubscribed (inverted), drops analytics, names topics."""
    v1, v2 = SAMPLES / "config" / "marketo.yaml", SAMPLES / "config" / "marketo-v2.yaml"
    result = cli(
        "preview", SAMPLES / "didomi", "-c", v2, "--compare", v1, "--format", "json", env=NO_CREDS_ENV
    )
    summary = json.loads(result.stdout)["summary"]
    assert summary["leads"] == 48 and summary["rejected"] == 4
    fields = summary["fields"]
    assert fields["unsubscribed"]["true"] == fields["didomiNewsletterOptIn"]["false"]
    assert summary["changed"]["unsubscribed"] == 48
    assert summary["changed"]["didomiAnalyticsOptIn"] == 47  # one lead never had an analytics value
    assert summary["changed"]["didomiTopics"] == fields["didomiTopics"]["other"] == 26
    assert summary["changed"]["didomiCountry"] == 0


def test_preview_compare_across_regulations_folds_each_config_apart(tmp_path, cli):
    events = [
        event("a@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}),
        event("a@example.com", "2026-11-02T00:00:00Z", {"newsletter": False}, regulation="cpra"),
        event("b@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}, regulation="cpra"),
    ]
    path = write_ndjson(tmp_path / "e.ndjson", events)
    m = mappings(("didomiNewsletterOptIn", nl("newsletter")))
    old = config_at(tmp_path / "old", mappings=m)
    new = config_at(
        tmp_path / "new", mappings=m, properties={"user_identifier": "email", "regulations": ["gdpr", "cpra"]}
    )
    doc = json.loads(cli("preview", path, "-c", new, "--compare", old, "--format", "json").stdout)
    assert doc["summary"]["changed"] == {"didomiNewsletterOptIn": 2}  # a: true -> false, b: new lead
    assert doc["summary"]["leads"] == 2
    changes = {s["key"]: s["changes"]["didomiNewsletterOptIn"] for s in doc["samples"]}
    assert changes == {
        "a@example.com": {"before": True, "after": False},
        "b@example.com": {"before": None, "after": True},
    }


def test_preview_refuses_configs_with_different_identifiers(data, tmp_path, cli):
    path, _ = data
    old = config_at(tmp_path / "old")
    new = config_at(tmp_path / "new", properties={"user_identifier": "leadID"})
    result = cli("preview", path, "-c", new, "--compare", old)
    assert result.exit_code == 2
    assert "cannot be matched" in result.stderr and "Traceback" not in result.output


class FakeState:
    """Only `lead(key)`: the compare must not need more of the state store."""

    def __init__(self, confirmed: dict[str, dict[str, tuple[Any, float]]]):
        self.data = confirmed

    def lead(self, key: str) -> LeadState | None:
        if key not in self.data:
            return None
        confirmed = {k: (v, stamp_from_json(t)) for k, (v, t) in self.data[key].items()}
        return LeadState(key, confirmed, None, None, None, None, None, None, {})


def test_preview_against_confirmed_state_diffs_like_the_next_sync(tmp_path):
    path = write_ndjson(tmp_path / "e.ndjson", [
        event("same@example.com", "2026-11-10T00:00:00Z", {"newsletter": True}),
        event("changed@example.com", "2026-11-10T00:00:00Z", {"newsletter": False}),
        event("older@example.com", "2026-11-01T00:00:00Z", {"newsletter": False}),  # Marketo has newer
        event("new@example.com", "2026-11-10T00:00:00Z", {"newsletter": True}),
    ])  # fmt: skip
    config = load_config(
        config_at(tmp_path / "c", mappings=mappings(("didomiNewsletterOptIn", nl("newsletter"))))
    )
    nov5 = 1793836800.0  # 2026-11-05T00:00:00Z
    store = FakeState({
        "same@example.com": {"didomiNewsletterOptIn": (True, nov5), "didomiAnalyticsOptIn": (True, nov5)},
        "changed@example.com": {"didomiNewsletterOptIn": (True, nov5)},
        "older@example.com": {"didomiNewsletterOptIn": (True, nov5)},
    })  # fmt: skip
    seen = []
    result = run_preview(config, [str(path)], confirmed=store, on_lead=seen.append)
    assert result.baseline == "state" and result.would_send is None  # no lead(): no planner count
    assert result.changed == {"didomiNewsletterOptIn": 2}  # changed@ and new@
    assert result.kept_newer == 1  # older@: Marketo's newer consent stays
    assert result.leads_changed == 2
    diffs = {d.key: [(c.field, c.before, c.after) for c in d.changes] for d in seen}
    assert diffs == {
        "same@example.com": [],
        "changed@example.com": [("didomiNewsletterOptIn", True, False)],
        "older@example.com": [],
        "new@example.com": [("didomiNewsletterOptIn", None, True)],
    }


def test_preview_state_option_counts_what_the_next_sync_sends(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    text = (SAMPLES / "config" / "marketo.yaml").read_text().replace("http://127.0.0.1:8787", sb.base_url)
    config = tmp_path / "marketo.yaml"
    config.write_text(text)
    v2 = tmp_path / "marketo-v2.yaml"
    v2.write_text(
        (SAMPLES / "config" / "marketo-v2.yaml").read_text().replace("http://127.0.0.1:8787", sb.base_url)
    )
    state = tmp_path / "state.db"
    cli("sync", SAMPLES / "didomi", "-c", config, "--state", state, "-q", env=CREDS_ENV)
    calls = sb.stats()["calls_total"]

    same = json.loads(
        cli("preview", SAMPLES / "didomi", "-c", config, "--state", state, "--format", "json").stdout
    )
    # Marketo holds nothing for the two leads it skipped as not found (1004, upsert off) ...
    assert same["summary"]["leads_changed"] == 2
    assert same["summary"]["changed"]["didomiNewsletterOptIn"] == 2
    assert same["summary"]["would_send"] == 0  # ... but sync does not re-send a permanent skip
    changed = json.loads(
        cli("preview", SAMPLES / "didomi", "-c", v2, "--state", state, "--format", "json").stdout
    )
    assert changed["summary"]["changed"]["unsubscribed"] == 48  # never sent before
    assert changed["summary"]["changed"]["didomiCountry"] == 1  # nobody@ (FR) is not in Marketo
    assert changed["summary"]["would_send"] == 48  # new values: even the 1004 skips are retried
    assert "didomiAnalyticsOptIn" not in changed["summary"]["changed"]  # not sent any more: no change
    assert sb.stats()["calls_total"] == calls  # previews sent nothing

    both = cli("preview", SAMPLES / "didomi", "-c", v2, "--state", state, "--compare", config)
    assert both.exit_code == 2
    missing = cli("preview", SAMPLES / "didomi", "-c", v2, "--state", tmp_path / "nope.db")
    assert missing.exit_code == 2 and "no such state file" in missing.stderr


# ---------------------------------------------------------------------------------------------
# check: online against the sandbox

BROKEN = mappings(
    ("didomiNewsleterOptIn", nl("newsletter")),  # typo
    ("didomiReadOnlyFlag", nl("newsletter")),  # read-only
    ("didomiSmsChannelOptIn", "consents_purposes_newsletter_values_topics"),  # string into boolean
    ("createdAt", "updated_at"),  # read-only system field
)
GOOD = mappings(
    ("didomiNewsletterOptIn", nl("newsletter")),
    ("unsubscribed", nl("newsletter"), "invert"),
    ("didomiTopics", "consents_purposes_newsletter_values_topics", {"map": {"events": "Events"}}),
    ("didomiConsentUpdatedAt", "updated_at"),
)


def test_check_flags_missing_readonly_and_mistyped_fields(sandbox, tmp_path, cli):
    config = config_at(tmp_path, sandbox, mappings=BROKEN)
    result = cli("check", "-c", config, "--format", "json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["online"] and report["schema_source"] == "describe2"
    by_field = {p["field"]: p for p in report["problems"]}
    assert by_field["didomiNewsleterOptIn"]["severity"] == ERROR
    assert "did you mean 'didomiNewsletterOptIn'" in by_field["didomiNewsleterOptIn"]["message"]
    assert (
        by_field["didomiReadOnlyFlag"]["severity"] == ERROR
        and "read-only" in by_field["didomiReadOnlyFlag"]["message"]
    )
    assert by_field["createdAt"]["severity"] == ERROR and "read-only" in by_field["createdAt"]["message"]
    mistyped = by_field["didomiSmsChannelOptIn"]
    assert (
        mistyped["severity"] == ERROR and "is boolean but the mapping produces string" in mistyped["message"]
    )
    assert mistyped["where"].startswith(f"{config}:")  # file:line of the mapping
    kinds = {p["field"]: p["kind"] for p in report["problems"]}
    assert kinds == {"didomiNewsleterOptIn": "missing", "didomiReadOnlyFlag": "read-only",
                     "didomiSmsChannelOptIn": "type", "createdAt": "read-only"}  # fmt: skip
    verdicts = {r["field"]: r["verdict"] for r in report["fields"]}
    assert verdicts == {"didomiNewsleterOptIn": "error", "didomiReadOnlyFlag": "error",
                        "didomiSmsChannelOptIn": "error", "createdAt": "error", "email": "ok"}  # fmt: skip
    assert report["usage"]["quota"] == 50_000 and report["usage"]["used"] >= 2

    table = cli("check", "-c", config)
    assert table.exit_code == 1
    assert "problems found: 4 error(s)" in table.stdout and "API calls today" in table.stdout


def test_check_passes_a_good_config(sandbox, tmp_path, cli):
    config = config_at(tmp_path, sandbox, mappings=GOOD)
    result = cli("check", "-c", config)
    assert result.exit_code == 0, result.output
    assert "ok: 0 error(s), 0 warning(s)" in result.stdout
    assert "sandbox-secret" not in result.output


def test_check_falls_back_to_describe_and_warns_on_boolean_text(sandbox, tmp_path, cli):
    sandbox.inject("code:610", path="/rest/v1/leads/describe2.json")
    config = config_at(tmp_path, sandbox, mappings=mappings(("didomiCountry", nl("newsletter"))))
    result = cli("check", "-c", config, "--format", "json")
    report = json.loads(result.stdout)
    assert report["schema_source"] == "describe"
    assert [p["severity"] for p in report["problems"]] == [WARNING]
    assert "consider transform text or yes_no" in report["problems"][0]["message"]
    assert result.exit_code == 0
    assert cli("check", "-c", config, "--strict").exit_code == 1


def test_check_quota_spent_is_a_problem(sandbox, tmp_path, cli):
    config = config_at(tmp_path, sandbox, mappings=GOOD)
    result = cli("check", "-c", config, "--daily-quota", "2", "--format", "json")
    report = json.loads(result.stdout)
    assert report["usage"]["remaining"] == 0
    assert result.exit_code == 1 and "quota is spent" in report["problems"][-1]["message"]


def test_check_exit_3_when_marketo_refuses_or_is_unreachable(sandbox, tmp_path, cli):
    bad = config_at(tmp_path / "bad", sandbox, authentication={
        "client_id": "sandbox-client", "client_secret": "wrong-secret", "instance": sandbox.base_url,
    })  # fmt: skip
    result = cli("check", "-c", bad)
    assert result.exit_code == 3
    assert "refused the client credentials" in result.stderr and "wrong-secret" not in result.output
    down = config_at(tmp_path / "down", authentication={
        "client_id": "x", "client_secret": "y", "instance": "http://127.0.0.1:9",
    })  # fmt: skip
    result = cli("check", "-c", down)
    assert (
        result.exit_code == 3 and "cannot reach Marketo" in result.stderr and "Traceback" not in result.output
    )
    assert cli("fields", "-c", down).exit_code == 3


# ---------------------------------------------------------------------------------------------
# check: offline


def test_check_offline_never_calls_marketo_and_reads_the_sample(data, sandbox, tmp_path, cli):
    path, _ = data
    config = config_at(tmp_path, sandbox, mappings=mappings(
        ("didomiNewsletterOptIn", nl("newsleter")),  # typo in the purpose id
        ("didomiAnalyticsOptIn", nl("product_analytics"), "yes_no"),  # fine offline: a string
        ("didomiTopics", "consents_purposes_newsletter_values_topics", "invert"),  # no-op
    ))  # fmt: skip
    result = cli("check", "-c", config, "--offline", "--sample", path, "--format", "json")
    report = json.loads(result.stdout)
    assert not report["online"]
    messages: dict[str, list[str]] = {}
    for p in report["problems"]:
        messages.setdefault(p["field"], []).append(p["message"])
    [typo] = messages["didomiNewsletterOptIn"]
    assert "purpose 'newsleter' never appears in the sample" in typo and "did you mean 'newsletter'" in typo
    assert len(messages["didomiTopics"]) == 2
    assert "transform invert has no effect on a string value" in messages["didomiTopics"][0]
    assert "preference 'topics' never appears in the sample" in messages["didomiTopics"][1]
    assert "didomiAnalyticsOptIn" not in messages
    assert result.exit_code == 0  # warnings only
    assert sandbox.stats()["calls_total"] == 0 and sandbox.stats()["identity_calls"] == 0


def test_check_sees_the_ids_of_every_record_of_an_export_line(tmp_path, cli):
    """Export lines take the fold's fused short way: the sample's ids must still be seen there,
    or a purpose found only in events would be called a typo."""
    line = {
        "user": {"organization_user_id": "a@example.com", "updated_at": "2026-11-01T00:00:00Z",
                 "consents": {"purposes": [{"id": "newsletter", "enabled": True}]}},
        "events": [{"created_at": "2026-11-02T00:00:00Z", "status": "confirmed",
                    "user": {"organization_user_id": "a@example.com"},
                    "consents": {"purposes": [{"id": "ads", "enabled": False}]}}],
    }  # fmt: skip
    sample = tmp_path / "export.ndjson"
    write_ndjson(sample, [line, line | {"user": line["user"] | {"organization_user_id": "b@example.com"}}])
    typo = config_at(tmp_path, mappings=mappings(("didomiNewsletterOptIn", nl("adz"))))
    result = cli("check", "-c", typo, "--offline", "--sample", sample, "--format", "json")
    [problem] = json.loads(result.stdout)["problems"]
    assert (
        "purpose 'adz' never appears in the sample (seen: ads, newsletter); did you mean 'ads'?"
        in (problem["message"])
    )


def test_check_without_credentials_stays_offline_and_says_so(tmp_path, cli):
    config = SAMPLES / "config" / "marketo.yaml"  # ${MARKETO_CLIENT_ID} ...
    result = cli("check", "-c", config, env=NO_CREDS_ENV)
    assert result.exit_code == 0
    assert "offline: credentials do not resolve" in result.stdout and "is not set" in result.stdout
    forced = cli("check", "-c", config, "--online", env=NO_CREDS_ENV)
    assert forced.exit_code == 2 and "MARKETO_CLIENT_ID is not set" in forced.stderr


def test_check_reports_every_config_error_at_once(tmp_path, cli):
    config = config_at(tmp_path, mappings=[{"id": "a", "value": "consents_purpose_x_enabled"}, {"id": "b"}])
    result = cli("check", "-c", config, "--offline")
    assert result.exit_code == 2
    assert result.stderr.count("error: ") == 2 and "config.json:" in result.stderr


# ---------------------------------------------------------------------------------------------
# schema_problems, pure


def fm(field: str, value: str | None, transform: Any = None) -> FieldMapping:
    transforms = parse_transforms(transform)[0] if transform is not None else ()
    return FieldMapping(field, parse_property(value) if value else None, transforms)


@pytest.mark.parametrize(
    ("mapping", "severity", "text"),
    [
        (fm("didomiNewsletterOptIn", nl("n")), None, ""),
        (fm("didomiTopics", nl("n")), WARNING, "consider transform text or yes_no"),
        (fm("didomiTopics", nl("n"), "yes_no"), None, ""),
        (fm("didomiNewsletterOptIn", nl("n"), "yes_no"), ERROR, "drop the yes_no/text transform"),
        (fm("didomiTopics", "consents_purposes_n_values_t"), None, ""),
        (fm("didomiConsentUpdatedAt", "updated_at"), None, ""),
        (fm("didomiCountry", "updated_at"), WARNING, "ISO 8601 text"),
        (fm("dateOfBirth", "updated_at"), ERROR, "YYYY-MM-DD"),
        (fm("numberOfEmployees", None, {"const": 3}), None, ""),
        (fm("numberOfEmployees", None, {"const": 2.5}), ERROR, "fractional"),
        (fm("annualRevenue", None, {"const": 3}), None, ""),
        (fm("numberOfEmployees", nl("n")), ERROR, "is integer but the mapping produces boolean"),
        (fm("didomiCountry", "country", {"map": {"FR": "x" * 300}}), ERROR, "at most 255 characters"),
        (fm("Unsubscribed", nl("n")), ERROR, "did you mean 'unsubscribed'"),
        (fm("Didomi Topics", "country"), ERROR, "did you mean 'didomiTopics'"),
        (fm("mktoName", "country"), ERROR, "read-only"),
        (fm("zzzz", "country"), ERROR, "is not a Marketo lead field"),
    ],
)
def test_check_schema_type_fit(mapping, severity, text):
    problems = schema_problems([mapping], "email", DESCRIBE)
    assert [p.severity for p in problems] == ([severity] if severity else [])
    if text:
        assert text in problems[0].message and problems[0].field == mapping.field


def test_check_schema_takes_describe_describe2_or_normalised_and_checks_the_lookup():
    describe2 = [{"name": "API Lead", "searchableFields": [["email"]], "fields": [
        {"name": "email", "displayName": "Email", "dataType": "string", "updateable": True},
        {"name": "didomiFlag", "displayName": "Flag", "dataType": "boolean", "updateable": False},
    ]}]  # fmt: skip
    problems = schema_problems([fm("didomiFlag", nl("n"))], "email", describe2)
    assert {(p.field, p.severity, p.kind) for p in problems} == {
        ("didomiFlag", ERROR, "read-only"), ("email", ERROR, "lookup"),
    }  # fmt: skip
    assert [p.field for p in problems if p.kind in BLOCKING_KINDS] == ["didomiFlag"]
    assert schema_problems([fm("didomiFlag", nl("n"))], "email", normalise_fields(describe2)) == problems
    # Lookup by id: it must exist and be searchable (describe2 only lists email here).
    id_problems = schema_problems([], "id", describe2)
    assert [(p.severity, p.field) for p in id_problems] == [(ERROR, "id")]
    assert schema_problems([], "id", DESCRIBE) == []
    soap_only = [
        {
            "id": 1,
            "displayName": "Secret",
            "dataType": "string",
            "soap": {"name": "secretSoap", "readOnly": False},
        }
    ]
    assert (
        "not available through the REST API"
        in schema_problems([fm("secretSoap", "country")], "email", soap_only + DESCRIBE)[0].message
    )


def test_compare_mappings_classifies_each_field():
    old = [fm("a", nl("x")), fm("b", nl("x")), fm("c", nl("x")), fm("d", nl("x"))]
    new = [fm("a", nl("x")), fm("b", nl("y")), fm("c", nl("x"), "invert"), fm("e", nl("x"))]
    assert [(c.field, c.status) for c in compare_mappings(old, new)] == [
        ("a", "unchanged"), ("b", "source changed"), ("c", "transform changed"), ("e", "added"),
        ("d", "removed"),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# fields


def test_fields_lists_rest_fields_with_match(sandbox, tmp_path, cli):
    config = config_at(tmp_path, sandbox)
    result = cli("fields", "-c", config, "--match", "didomi", "--format", "json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    expected = sorted(
        (
            f["rest"]["name"]
            for f in DESCRIBE
            if "rest" in f and "didomi" in (f["rest"]["name"] + f["displayName"]).lower()
        ),
        key=str.lower,
    )
    assert [r["name"] for r in rows] == expected
    by_name = {r["name"]: r for r in rows}
    assert by_name["didomiReadOnlyFlag"]["writable"] is False
    assert by_name["didomiTopics"]["dataType"] == "string" and by_name["didomiTopics"]["length"] == 255
    assert by_name["didomiNewsletterOptIn"]["mapped"] and not by_name["didomiTopics"]["mapped"]
    display = cli("fields", "-c", config, "--match", "Email Address")
    assert "email" in display.stdout and display.exit_code == 0
    by_type = json.loads(cli("fields", "-c", config, "-m", "datetime", "--format", "json").stdout)
    assert {r["dataType"] for r in by_type} == {"datetime"}
    assert len(by_type) == sum(1 for f in DESCRIBE if f["dataType"] == "datetime" and "rest" in f)


def test_fields_needs_credentials(tmp_path, cli):
    result = cli("fields", "-c", SAMPLES / "config" / "marketo.yaml", env=NO_CREDS_ENV)
    assert result.exit_code == 2 and "MARKETO_CLIENT_ID is not set" in result.stderr
