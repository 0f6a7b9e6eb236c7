"""Consent correctness at the edges (issue #9): no stale opt-in, ever.

One test (or one parametrised group) per rule of the README's "Consent semantics" that the edges
of real operation broke; each failed before the fix. Items 1 and 4 run end to end against the
sandbox, where Marketo's answer (1004, the lead's fields) matters.
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import event, make_config, write_ndjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.fold import Fold, FoldSchema
from didomi_marketo.didomi.records import Observation, observations
from didomi_marketo.mapping import FieldMapping, parse_property, parse_transforms
from didomi_marketo.outcomes import LeadOutcome
from didomi_marketo.plan import Planner
from didomi_marketo.state import StateStore

ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}
A = "ann@example.com"
NEWS = "didomiNewsletterOptIn"
ANALYTICS = "didomiAnalyticsOptIn"


def user(key: str | None, at: str, purposes: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A Didomi user (consent status)."""
    u: dict[str, Any] = {"id": f"didomi-{key}", "organization_user_id": key, "updated_at": at}
    if purposes is not None:
        u["consents"] = {"purposes": [{"id": p, "enabled": v} for p, v in purposes.items()]}
    u.update(extra)
    return u


def sandbox_with(sandbox_factory, *emails: str):
    sb = sandbox_factory()
    sb.seed_leads([{"email": e} for e in emails])
    return sb


def dry(cli, tmp_path: Path, *extra: Any, inputs: str = "in", **config: Any):
    """A dry run over tmp_path/inputs: (result, {key: payload}, summary)."""
    cfg = make_config(tmp_path, **config)
    out, rep = tmp_path / "out.ndjson", tmp_path / "dry-report"
    res = cli(
        "sync", tmp_path / inputs, "-c", cfg, "--dry-run", "--output", out, "--report", rep, "-q", *extra
    )
    payloads = {p["email"]: p for p in map(json.loads, out.read_text().splitlines())}
    return res, payloads, json.loads((rep / "summary.json").read_text())


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# 1. A skipped lead keeps its consent history


def _sync(cli, tmp_path: Path, config: Path, name: str, *extra: Any):
    return cli("sync", tmp_path / "in", "-c", config, "--state", tmp_path / "state.db", "-q",
               "--report", tmp_path / name, *extra, env=ENV)  # fmt: skip


def test_1_a_skipped_lead_never_gets_an_older_opt_in_and_gets_its_whole_newest_consent(
    sandbox_factory, tmp_path, cli
):
    sb = sandbox_factory()
    config = make_config(tmp_path, sb)
    # Run 1: the newest choice, an opt-out of the newsletter, for a lead Marketo does not have.
    write_ndjson(tmp_path / "in" / "1.ndjson", [
        event(A, "2026-11-10T00:00:00Z", {"newsletter": False, "product_analytics": True}),
    ])  # fmt: skip
    assert _sync(cli, tmp_path, config, "r1").exit_code == 0
    assert [u["code"] for u in lines(tmp_path / "r1" / "undelivered.ndjson")] == ["1004"]
    sb.seed_leads([{"email": A}])  # a form creates the lead meanwhile
    # Run 2: an OLDER opt-in arrives late, with a newer analytics choice.
    write_ndjson(tmp_path / "in" / "2.ndjson", [
        event(A, "2026-11-01T00:00:00Z", {"newsletter": True}),
        event(A, "2026-11-20T00:00:00Z", {"product_analytics": False}),
    ])  # fmt: skip
    assert _sync(cli, tmp_path, config, "r2").exit_code == 0
    lead = sb.lead_by_email(A)
    assert lead[NEWS] is False  # the newest consent (skipped in run 1) wins, not the late opt-in
    assert lead[ANALYTICS] is False
    # A run without --state over the same files agrees.
    fresh = sandbox_with(sandbox_factory, A)
    (tmp_path / "c").mkdir()
    assert (
        cli("sync", tmp_path / "in", "-c", make_config(tmp_path / "c", fresh), "-q", env=ENV).exit_code == 0
    )
    assert {k: fresh.lead_by_email(A)[k] for k in (NEWS, ANALYTICS)} == {NEWS: False, ANALYTICS: False}


def test_1_recheck_skipped_sends_the_newest_known_consent_of_leads_created_since(
    sandbox_factory, tmp_path, cli
):
    sb = sandbox_factory()
    config = make_config(tmp_path, sb)
    write_ndjson(tmp_path / "in" / "1.ndjson", [
        event(A, "2026-11-01T00:00:00Z", {"newsletter": True, "product_analytics": True}),
        event(A, "2026-11-10T00:00:00Z", {"newsletter": False}),
        event("bob@example.com", "2026-11-10T00:00:00Z", {"newsletter": True}),
    ])  # fmt: skip
    assert _sync(cli, tmp_path, config, "r1").exit_code == 0  # both 1004
    sb.seed_leads([{"email": A}])
    assert _sync(cli, tmp_path, config, "r2").exit_code == 0  # nothing new: nothing sent
    assert NEWS not in sb.lead_by_email(A)
    res = _sync(cli, tmp_path, config, "r3", "--recheck-skipped")
    assert res.exit_code == 0, res.output
    lead = sb.lead_by_email(A)
    assert (lead[NEWS], lead[ANALYTICS]) == (False, True)  # the whole newest known consent
    summary = json.loads((tmp_path / "r3" / "summary.json").read_text())
    assert summary["leads"]["rechecked"] == 2 and summary["delivery"]["updated"] == 1
    assert sb.lead_by_email("bob@example.com") is None  # still not a lead: skipped again


def test_1_recheck_skipped_needs_a_state(tmp_path, cli):
    write_ndjson(tmp_path / "in" / "1.ndjson", [event(A, "2026-11-01T00:00:00Z", {"newsletter": True})])
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path), "--dry-run", "--recheck-skipped")
    assert res.exit_code == 2 and "--recheck-skipped needs --state" in res.output


# ---------------------------------------------------------------------------------------------
# 2. The regulation and status of what triggered a user status count


def user_updated(at: str, purposes: dict[str, Any], source: dict[str, Any] | None = None,
                 **envelope: Any) -> dict[str, Any]:  # fmt: skip
    params: dict[str, Any] = {
        "old_entity": user(A, "2026-01-01T00:00:00Z", {}),
        "new_entity": user(A, at, purposes),
    }
    if source is not None:
        params["source"] = {"id": "evt-src", "created_at": at, **source}
    return {"type": "user.updated", "parameters": params, **envelope}


@pytest.mark.parametrize(
    ("update", "ignored_as"),
    [
        (
            user_updated("2026-01-02T00:00:00Z", {"newsletter": True}, {"regulation": "cpra"}),
            "other_regulation",
        ),
        (
            user_updated("2026-01-02T00:00:00Z", {"newsletter": True}, {"status": "pending_approval"}),
            "pending",
        ),
        (
            user_updated("2026-01-02T00:00:00Z", {"newsletter": True}, {}, regulation="cpra"),
            "other_regulation",
        ),
        (
            {
                "type": "user.updated",
                "parameters": {
                    "new_entity": user(A, "2026-01-02T00:00:00Z", {"newsletter": True}, regulation="cpra")
                },
            },
            "other_regulation",
        ),
    ],
    ids=["source-cpra", "source-pending", "envelope-cpra", "entity-cpra"],
)
def test_2_a_user_status_caused_by_another_regulation_or_an_unconfirmed_event_does_not_apply(
    tmp_path, cli, update, ignored_as
):
    write_ndjson(
        tmp_path / "in" / "a.ndjson", [event(A, "2026-01-01T00:00:00Z", {"newsletter": False}), update]
    )
    res, payloads, summary = dry(cli, tmp_path)
    assert res.exit_code == 0
    assert payloads[A][NEWS] is False  # the GDPR opt-out stands
    assert summary["input"]["ignored"][ignored_as] == 1


def test_2_a_confirmed_gdpr_source_applies(tmp_path, cli):
    update = user_updated(
        "2026-01-02T00:00:00Z", {"newsletter": True}, {"regulation": "gdpr", "status": "confirmed"}
    )
    write_ndjson(
        tmp_path / "in" / "a.ndjson", [event(A, "2026-01-01T00:00:00Z", {"newsletter": False}), update]
    )
    _, payloads, _ = dry(cli, tmp_path)
    assert payloads[A][NEWS] is True


# ---------------------------------------------------------------------------------------------
# 3. Versions of one event


def version(updated_at: str, enabled: bool, status: str = "confirmed") -> dict[str, Any]:
    e = event(A, "2026-03-01T10:00:00Z", {"newsletter": enabled}, id="evt-1", status=status)
    e["updated_at"] = updated_at
    return e


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("correction", [True, False])
def test_3_the_later_version_of_one_event_wins_whatever_the_input_order(tmp_path, cli, reverse, correction):
    v1 = version("2026-03-01T10:00:00Z", not correction)
    v2 = {"type": "event.updated", "parameters": {"old_entity": v1,
                                                  "new_entity": version("2026-03-05T00:00:00Z", correction)}}  # fmt: skip
    records = [v2, v1] if reverse else [v1, v2]
    write_ndjson(tmp_path / "in" / "a.ndjson", records + [v1])  # v1 re-delivered at the end too
    _, payloads, _ = dry(cli, tmp_path)
    assert payloads[A][NEWS] is correction


def test_3_a_double_opt_in_confirmed_later_folds_at_its_created_at(tmp_path, cli):
    pending = version("2026-03-01T10:00:00Z", True, status="pending_approval")
    confirmed = version("2026-03-09T00:00:00Z", True)  # confirmed after the opt-out below
    opt_out = event(A, "2026-03-05T00:00:00Z", {"newsletter": False})
    write_ndjson(tmp_path / "in" / "a.ndjson", [pending, opt_out, confirmed])
    _, payloads, summary = dry(cli, tmp_path)
    assert payloads[A][NEWS] is False  # the person opted out after the choice confirmed later
    assert summary["input"]["ignored"]["pending"] == 1


def test_3_versions_hold_across_incremental_runs(sandbox_factory, tmp_path, cli):
    sb = sandbox_with(sandbox_factory, A)
    config = make_config(tmp_path, sb)
    write_ndjson(tmp_path / "in" / "1.ndjson", [version("2026-03-05T00:00:00Z", False)])
    assert _sync(cli, tmp_path, config, "r1").exit_code == 0
    write_ndjson(tmp_path / "in" / "2.ndjson", [version("2026-03-01T10:00:00Z", True)])  # the old version
    assert _sync(cli, tmp_path, config, "r2").exit_code == 0
    assert sb.lead_by_email(A)[NEWS] is False


# ---------------------------------------------------------------------------------------------
# 4. Deletions are never silent


def deleted(key: str, at: str) -> dict[str, Any]:
    return {"type": "user.deleted", "parameters": {"entity": user(key, at, {"newsletter": True})}}


REVOKE_MAPPINGS = [
    {"id": NEWS, "value": "consents_purposes_newsletter_enabled"},
    {"id": ANALYTICS, "value": "consents_purposes_product_analytics_enabled"},
    {"id": "unsubscribed", "value": "consents_purposes_newsletter_enabled", "transform": "invert"},
    {"id": "didomiCountry", "value": "country"},
]


def test_4_ignore_counts_warns_and_lists_every_user_deleted(sandbox_factory, tmp_path, cli):
    sb = sandbox_with(sandbox_factory, A)
    write_ndjson(tmp_path / "in" / "a.ndjson", [
        event(A, "2026-04-01T00:00:00Z", {"newsletter": True}),
        deleted(A, "2026-04-02T00:00:00Z"),
    ])  # fmt: skip
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path, sb), "--report", tmp_path / "r", env=ENV)
    assert res.exit_code == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["user_deletions"] == 1 and summary["input"]["ignored"]["deleted"] == 1
    assert any("user.deleted" in w for w in summary["warnings"])
    assert "user.deleted" in res.stderr and "erasure" in res.stderr  # the terminal warning
    assert [(i["key"], i["category"]) for i in lines(tmp_path / "r" / "ignored.ndjson")] == [(A, "deleted")]
    assert sb.lead_by_email(A)[NEWS] is True  # ignore: Marketo keeps the consent


def test_4_revoke_sends_no_consent_after_every_earlier_record_of_the_key(sandbox_factory, tmp_path, cli):
    sb = sandbox_with(sandbox_factory, A, "later@example.com")
    write_ndjson(tmp_path / "in" / "a.ndjson", [
        deleted(A, "2026-04-02T00:00:00Z"),  # read first, yet ordered after the records of its time
        event(A, "2026-04-01T00:00:00Z", {"newsletter": True, "product_analytics": True}),
        user(A, "2026-04-02T00:00:00Z", {"newsletter": True}, country="FR"),  # the same instant
        deleted("later@example.com", "2026-04-02T00:00:00Z"),
        event("later@example.com", "2026-04-03T00:00:00Z", {"newsletter": True}),  # consent again
    ])  # fmt: skip
    config = make_config(tmp_path, sb, mappings=REVOKE_MAPPINGS, deletions="revoke")
    res = cli("sync", tmp_path / "in", "-c", config, "--report", tmp_path / "r", "-q", env=ENV)
    assert res.exit_code == 0, res.output
    lead = sb.lead_by_email(A)
    assert (lead[NEWS], lead[ANALYTICS], lead["unsubscribed"]) == (False, False, True)
    assert lead["didomiCountry"] == "FR"  # not a consent field: left as it is
    assert sb.lead_by_email("later@example.com")[NEWS] is True
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["user_deletions"] == 2 and summary["input"]["revoked"] == 2


def test_4_deletions_must_be_ignore_or_revoke(tmp_path, cli):
    write_ndjson(tmp_path / "in" / "a.ndjson", [event(A, "2026-04-01T00:00:00Z", {"newsletter": True})])
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path, deletions="erase"), "--dry-run")
    assert res.exit_code == 2 and "deletions" in res.output and "ignore, revoke" in res.output


# ---------------------------------------------------------------------------------------------
# 5. Malformed consent is rejected, never dropped


@pytest.mark.parametrize(
    ("purpose", "field"),
    [
        ({"id": "newsletter", "enabled": "false"}, "consents.purposes[newsletter].enabled"),
        ({"id": "newsletter", "enabled": 0}, "consents.purposes[newsletter].enabled"),
        ({"id": "product_analytics", "enabled": "yes"}, "consents.purposes[product_analytics].enabled"),
    ],
)
def test_5_a_consent_flag_that_is_not_a_boolean_rejects_the_record_naming_the_field(
    tmp_path, cli, purpose, field
):
    bad = event(A, "2026-05-02T00:00:00Z", {})
    bad["consents"]["purposes"] = [purpose]
    write_ndjson(tmp_path / "in" / "a.ndjson", [event(A, "2026-05-01T00:00:00Z", {"newsletter": True}), bad])
    res, payloads, summary = dry(cli, tmp_path)
    assert res.exit_code == 1
    assert payloads[A][NEWS] is True  # the good record still lands; the bad one changes nothing
    assert summary["input"]["rejected"] == 1 and summary["input"]["applied"] == 1
    (rej,) = lines(tmp_path / "dry-report" / "rejected.ndjson")
    assert rej["source"].endswith("a.ndjson:2") and field in rej["reason"] and rej["key"] == A


# ---------------------------------------------------------------------------------------------
# 6. Timestamps as RFC 3339 allows


def test_6_lower_case_t_and_z_are_accepted(tmp_path, cli):
    write_ndjson(tmp_path / "in" / "a.ndjson", [
        event(A, "2026-06-01t10:00:00z", {"newsletter": False}),
        event(A, "2026-06-01T09:00:00Z", {"newsletter": True}),
    ])  # fmt: skip
    res, payloads, summary = dry(cli, tmp_path)
    assert res.exit_code == 0 and summary["input"]["rejected"] == 0
    assert payloads[A][NEWS] is False


def test_6_every_fractional_digit_orders(tmp_path, cli):
    write_ndjson(tmp_path / "in" / "a.ndjson", [
        event(A, "2026-06-01T10:00:00.123456789Z", {"newsletter": False}),  # 89 ns later
        event(A, "2026-06-01T10:00:00.123456700Z", {"newsletter": True}),
    ])  # fmt: skip
    _, payloads, _ = dry(cli, tmp_path)
    assert payloads[A][NEWS] is False


# ---------------------------------------------------------------------------------------------
# 7. A user without consents is not an error


def test_7_a_user_without_consents_is_nothing_to_send_not_an_error(tmp_path, cli):
    write_ndjson(tmp_path / "in" / "a.ndjson", [
        user(A, "2026-07-01T00:00:00Z"),
        {"type": "user.created", "parameters": {"entity": user("bo@example.com", "2026-07-01T00:00:00Z")}},
        {"type": "user.updated", "parameters": {"new_entity": user("cy@example.com", "2026-07-01T00:00:00Z")}},
    ])  # fmt: skip
    res, payloads, summary = dry(cli, tmp_path)
    assert res.exit_code == 0
    assert summary["input"]["rejected"] == 0 and summary["input"]["user_statuses"] == 3
    assert summary["leads"]["nothing_to_send"] == 3 and payloads == {}


# ---------------------------------------------------------------------------------------------
# 8. Ties across an incremental run and a full run


def test_8_a_tie_with_the_state_goes_to_the_later_file_like_a_full_run(sandbox_factory, tmp_path, cli):
    sb = sandbox_with(sandbox_factory, A)
    config = make_config(tmp_path, sb)
    at = "2026-08-01T00:00:00.000000001Z"
    write_ndjson(tmp_path / "in" / "1.ndjson", [event(A, at, {"newsletter": True})])
    assert _sync(cli, tmp_path, config, "r1").exit_code == 0
    write_ndjson(tmp_path / "in" / "2.ndjson", [event(A, at, {"newsletter": False})])
    assert _sync(cli, tmp_path, config, "r2").exit_code == 0
    _, full, _ = dry(cli, tmp_path)  # one full run over the same files, in file order
    assert sb.lead_by_email(A)[NEWS] is full[A][NEWS] is False


def test_8_a_value_the_run_did_not_resend_still_counts_as_the_newest(sandbox_factory, tmp_path, cli):
    sb = sandbox_with(sandbox_factory, A)
    config = make_config(tmp_path, sb)
    write_ndjson(tmp_path / "in" / "1.ndjson", [event(A, "2026-08-01T00:00:00Z", {"newsletter": False})])
    assert _sync(cli, tmp_path, config, "r1").exit_code == 0
    # The opt-out restated later: Marketo already has it, nothing to send, but it is the newest.
    write_ndjson(tmp_path / "in" / "2.ndjson", [event(A, "2026-08-05T00:00:00Z", {"newsletter": False})])
    assert _sync(cli, tmp_path, config, "r2").exit_code == 0
    write_ndjson(tmp_path / "in" / "3.ndjson", [event(A, "2026-08-03T00:00:00Z", {"newsletter": True})])
    assert _sync(cli, tmp_path, config, "r3").exit_code == 0
    _, full, _ = dry(cli, tmp_path)
    assert sb.lead_by_email(A)[NEWS] is full[A][NEWS] is False


# ---------------------------------------------------------------------------------------------
# 9. Files skipped inside a partition


def test_9_a_file_that_is_not_json_gz_inside_a_partition_is_counted_and_named(tmp_path, cli):
    users = tmp_path / "in" / "date=2026-09-01" / "users"
    users.mkdir(parents=True)
    (users / "part-0.json.gz").write_bytes(
        gzip.compress(
            (
                json.dumps({"user": user(A, "2026-09-01T00:00:00Z", {"newsletter": True}), "events": []})
                + "\n"
            ).encode()
        )  # fmt: skip
    )
    (users / "part-1.json").write_text(json.dumps(user(A, "2026-09-02T00:00:00Z", {"newsletter": False})))
    (users / "_SUCCESS").write_text("")
    res, payloads, summary = dry(cli, tmp_path)
    assert payloads[A][NEWS] is True
    assert summary["input"]["files_skipped"] == 1
    assert summary["input"]["skipped_files"] == [str(users / "part-1.json")]
    verbose = cli("sync", tmp_path / "in", "-c", make_config(tmp_path), "--dry-run", "-v")
    assert f"{users / 'part-1.json'}: skipped" in verbose.stderr


# ---------------------------------------------------------------------------------------------
# Property: any sequence of incremental runs ends where one full run does (ties aside, item 8)

PROP_MAPPINGS = [
    FieldMapping("news", parse_property("consents_purposes_newsletter_enabled")),
    FieldMapping("analytics", parse_property("consents_purposes_product_analytics_enabled")),
    FieldMapping("email_ok", parse_property("consents_channels_email_enabled")),
    FieldMapping(
        "unsubscribed", parse_property("consents_purposes_newsletter_enabled"), parse_transforms("invert")[0]
    ),
]
PROP_KEYS = ["a@x.io", "b@x.io", "c@x.io"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


@st.composite
def histories(draw):
    """Records with distinct (time, version) stamps per key, except exact re-deliveries."""
    n = draw(st.integers(1, 14))
    times = iter(draw(st.lists(st.integers(0, 100_000), min_size=3 * n, max_size=3 * n, unique=True)))
    records: list[dict[str, Any]] = []
    flag = st.sampled_from([True, False, None])
    for i in range(n):
        key = draw(st.sampled_from(PROP_KEYS))
        purposes = draw(
            st.dictionaries(st.sampled_from(["newsletter", "product_analytics"]), flag, max_size=2)
        )
        kind = draw(
            st.sampled_from(["event", "event", "status", "versions", "deletion", "pending", "cpra", "again"])
        )
        t = next(times)
        if kind == "status":
            records.append(user(key, at(t), purposes))
        elif kind == "deletion":
            records.append(deleted(key, at(t)))
        elif kind == "again" and records:
            records.append(draw(st.sampled_from(records)))  # re-delivered as it was
        elif kind == "versions":  # one event id, two versions (the later updated_at wins)
            for u, p in (
                (next(times), purposes),
                (next(times), {k: not v for k, v in purposes.items() if v is not None}),
            ):
                e = event(key, at(t), p, id=f"evt-{i}")
                e["updated_at"] = at(t + u)
                records.append(e)
        else:
            e = event(key, at(t), purposes)
            if draw(st.booleans()):
                e["consents"]["channels"] = [{"id": "email", "enabled": draw(st.booleans())}]
            if kind == "pending":
                e["status"] = "pending_approval"
            elif kind == "cpra":
                e["regulation"] = "cpra"
            records.append(e)
    return records


class World:
    """A state store and a Marketo holding `existing` leads; `run` folds, plans and delivers."""

    def __init__(self, path: Path, existing: set[str]):
        self.store = StateStore(path)
        self.existing = set(existing)
        self.marketo: dict[str, dict[str, Any]] = {}
        self.schema = FoldSchema.from_mappings(PROP_MAPPINGS)

    def run(self, records: list[dict[str, Any]], recheck: bool = False) -> None:
        fold = Fold(self.schema, "email", frozenset({"gdpr"}), lambda *a: None, deletions="revoke")
        for line, rec in enumerate(records, 1):
            for ob in observations(rec, line):
                if isinstance(ob, Observation):
                    fold.add(ob, "in.ndjson")
        fresher: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        planner = Planner(PROP_MAPPINGS, self.schema, "email", self.store, "updateOnly", recheck_skipped=recheck,
                          on_fresher=lambda k, f, s: fresher.append((k, dict(f), dict(s))))  # fmt: skip
        updates = list(planner.plan(fold.leads()))
        self.store.remember_known(fresher)
        outcomes = []
        for u in updates:
            if u.key in self.existing:
                self.marketo.setdefault(u.key, {}).update(
                    {k: v for k, v in u.payload.items() if k != "email"}
                )
                outcomes.append(LeadOutcome(u.key, u.payload, u.source, "updated", stamps=u.stamps))
            else:
                outcomes.append(LeadOutcome(u.key, u.payload, u.source, "skipped", "1004", "not found",
                                            expected=True, stamps=u.stamps))  # fmt: skip
        self.store.batch_done(outcomes)

    def known(self) -> dict[str, dict[str, Any]]:
        return {lead.key: lead.known() for lead in self.store.leads() if lead.known()}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), data=st.data())
def test_incremental_runs_end_where_one_full_run_does(history, data, tmp_path_factory):
    order = data.draw(st.permutations(history))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=3)))
    runs = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    existing = set(data.draw(st.lists(st.sampled_from(PROP_KEYS), unique=True)))
    created = [set(data.draw(st.lists(st.sampled_from(PROP_KEYS), unique=True, max_size=1))) for _ in runs]
    tmp = tmp_path_factory.mktemp("prop")
    step = World(tmp / "incremental.db", existing)
    recheck = False
    for records, new_leads in zip(runs, created, strict=True):
        step.run(records, recheck=recheck)  # --recheck-skipped after leads were created
        recheck = bool(new_leads - step.existing)
        step.existing |= new_leads  # a form creates these leads after the run
    step.run([], recheck=True)
    full = World(tmp / "full.db", step.existing)
    full.run(history)
    assert step.known() == full.known()  # the newest consent of every lead, sent or skipped
    assert step.marketo == full.marketo  # and Marketo ends at it
    step.store.close()
    full.store.close()


# ---------------------------------------------------------------------------------------------
# A file that breaks off mid-way gives no lead: its opt-ins could be older than the lost part


def _broken_event_file(path: Path) -> None:
    """late@ opts in, 4,000 other events, then opts out; gzipped NDJSON cut after half of its
    compressed bytes (a copy interrupted): what is left holds the opt-in only."""
    records = [
        event("late@example.com", "2026-11-01T10:00:00Z", {"newsletter": True}),
        *[event(f"filler{i}@example.com", "2026-11-01T12:00:00Z", {"newsletter": True}) for i in range(4000)],
        event("late@example.com", "2026-11-01T11:00:00Z", {"newsletter": False}),
    ]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode(), compresslevel=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_file_read_only_in_part_gives_no_lead_and_is_named_in_the_report(cli, tmp_path, jobs):
    _broken_event_file(tmp_path / "in" / "b-events.ndjson.gz")
    write_ndjson(tmp_path / "in" / "a-events.ndjson",
                 [event("whole@example.com", "2026-11-01T10:00:00Z", {"newsletter": True})])  # fmt: skip
    write_ndjson(tmp_path / "in" / "c-events.ndjson",
                 [event("other@example.com", "2026-11-01T10:00:00Z", {"newsletter": False})])  # fmt: skip
    res = cli("sync", tmp_path / "in", "-c", make_config(tmp_path), "--dry-run", "--jobs", jobs, "--output", "-",
              "--report", tmp_path / "r")  # fmt: skip
    assert res.exit_code == 1, res.stderr
    sent = {p["email"] for p in map(json.loads, res.stdout.splitlines()) if p.get("email")}
    assert sent == {"whole@example.com", "other@example.com"}  # nothing of the broken file
    rejected = lines(tmp_path / "r" / "rejected.ndjson")
    broken = [r for r in rejected if r["source"].startswith(str(tmp_path / "in" / "b-events.ndjson.gz"))]
    assert any("corrupt or truncated gzip" in r["reason"] for r in broken)
    assert any("read only in part" in r["reason"] and "leads folded from it" in r["reason"] for r in broken)
    # The other files' payloads are exactly those of a run without the broken file.
    (tmp_path / "in" / "b-events.ndjson.gz").unlink()
    without = cli("sync", tmp_path / "in", "-c", make_config(tmp_path), "--dry-run", "--jobs", jobs,
                  "--output", "-")  # fmt: skip
    assert sorted(res.stdout.splitlines()) == sorted(without.stdout.splitlines())


def test_explain_leaves_out_a_file_read_only_in_part_as_sync_does(cli, tmp_path):
    _broken_event_file(tmp_path / "in" / "b-events.ndjson.gz")
    write_ndjson(tmp_path / "in" / "a-events.ndjson",
                 [event("late@example.com", "2026-11-01T09:00:00Z", {"newsletter": False})])  # fmt: skip
    config = make_config(tmp_path)
    broken = cli("explain", "late@example.com", tmp_path / "in", "-c", config, "--format", "json")
    (tmp_path / "in" / "b-events.ndjson.gz").unlink()
    without = cli("explain", "late@example.com", tmp_path / "in", "-c", config, "--format", "json")
    assert broken.exit_code == without.exit_code == 0, broken.stderr
    seen, expected = json.loads(broken.stdout), json.loads(without.stdout)
    assert seen.pop("inputs_read") > expected.pop("inputs_read")  # its records were read...
    assert seen == expected  # ...and none of them is a step
    assert "b-events" not in broken.stdout  # the opt-in read before the break is not a step
