"""The consent semantics of the fold: per key, per property, the latest timestamp wins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import event
from hypothesis import given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.fold import Fold, FoldSchema, latest, normalise_key, source
from didomi_marketo.didomi.records import Observation, observations
from didomi_marketo.mapping import FieldMapping, parse_property

NEWS = "consents_purposes_newsletter_enabled"
ANALYTICS = "consents_purposes_product_analytics_enabled"
EMAIL_CH = "consents_channels_email_enabled"
COUNTRY = "country"
PROPS = [NEWS, ANALYTICS, EMAIL_CH, COUNTRY]


class Run:
    """A fold over some mappings, with every issue it reported."""

    def __init__(self, props=PROPS, identifier="email", regulations=frozenset({"gdpr"}), spill=250_000):
        mappings = [FieldMapping(f"f{i}", parse_property(p)) for i, p in enumerate(props)]
        self.schema = FoldSchema.from_mappings(mappings)
        self.issues: list[tuple] = []
        self.fold = Fold(
            self.schema, identifier, regulations, lambda *a: self.issues.append(a), spill_threshold=spill
        )

    def feed(self, *records: Any, path: str = "in.ndjson", first_line: int = 1) -> Run:
        for i, rec in enumerate(records):
            for ob in observations(rec, first_line + i):
                assert isinstance(ob, Observation), ob
                self.fold.add(ob, path)
        return self

    def leads(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key, state in self.fold.leads():
            out[key] = {
                name: state[slot] for name, slot in self.schema.slots.items() if state[slot] is not None
            }
        return out

    def states(self) -> dict[str, list[Any]]:
        return {k: list(s) for k, s in self.fold.leads()}

    def categories(self) -> list[str]:
        return [i[0] for i in self.issues]


def ev(key, at, purposes=None, channels=None, **extra) -> dict[str, Any]:
    e = event(key, at, purposes or {}, **extra)
    if channels is not None:
        e["consents"]["channels"] = [{"id": c, "enabled": v} for c, v in channels.items()]
    return e


def status(key, updated_at, purposes, created_at="2020-01-01T00:00:00Z", **extra) -> dict[str, Any]:
    u = {
        "id": "didomi-" + str(key),
        "organization_user_id": key,
        "created_at": created_at,
        "updated_at": updated_at,
        "consents": {"purposes": [{"id": p, "enabled": v} for p, v in purposes.items()]},
    }
    u.update(extra)
    return u


A = "a@example.com"


# ---------------------------------------------------------------------------------------------
# latest wins


def test_latest_timestamp_wins_whatever_the_input_order():
    early = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True})
    late = ev(A, "2026-01-02T00:00:00Z", {"newsletter": False})
    assert Run().feed(early, late).leads() == {A: {NEWS: False}}
    assert Run().feed(late, early).leads() == {A: {NEWS: False}}


def test_ties_go_to_the_later_record_in_input_order():
    one = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True})
    two = ev(A, "2026-01-01T00:00:00Z", {"newsletter": False})
    assert Run().feed(one, two).leads()[A][NEWS] is False
    assert Run().feed(two, one).leads()[A][NEWS] is True


def test_equal_instants_written_differently_are_a_tie():
    one = ev(A, "2026-01-01T10:00:00+02:00", {"newsletter": True})
    two = ev(A, "2026-01-01T08:00:00Z", {"newsletter": False})
    assert Run().feed(one, two).leads()[A][NEWS] is False
    assert Run().feed(two, one).leads()[A][NEWS] is True


def test_later_event_for_one_purpose_never_erases_another():
    both = ev(
        A, "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": True}, channels={"email": True}
    )
    one = ev(A, "2026-01-05T00:00:00Z", {"newsletter": False})
    assert Run().feed(both, one).leads() == {A: {NEWS: False, ANALYTICS: True, EMAIL_CH: True}}


def test_properties_are_independent_each_takes_its_own_latest():
    e1 = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": False})
    e2 = ev(A, "2026-01-03T00:00:00Z", {"newsletter": False})
    e3 = ev(A, "2026-01-02T00:00:00Z", {"newsletter": True, "product_analytics": True})
    assert Run().feed(e1, e2, e3).leads()[A] == {NEWS: False, ANALYTICS: True}


def test_user_status_counts_at_updated_at_not_created_at():
    # created long ago, updated after the event: the status wins.
    st_ = status(A, "2026-01-10T00:00:00Z", {"newsletter": False}, created_at="2020-01-01T00:00:00Z")
    e = ev(A, "2026-01-05T00:00:00Z", {"newsletter": True})
    assert Run().feed(st_, e).leads()[A][NEWS] is False
    # updated before the event: the event wins even though it comes first in the input.
    st2 = status(A, "2026-01-01T00:00:00Z", {"newsletter": False}, created_at="2026-01-09T00:00:00Z")
    assert Run().feed(e, st2).leads()[A][NEWS] is True


def test_event_counts_at_created_at_not_updated_at():
    e = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True}, updated_at="2026-12-31T00:00:00Z")
    s = status(A, "2026-06-01T00:00:00Z", {"newsletter": False})
    assert Run().feed(e, s).leads()[A][NEWS] is False
    assert Run().feed(s, e).leads()[A][NEWS] is False


def test_export_line_event_later_than_status_wins():
    line = {
        "user": status(A, "2026-01-02T00:00:00Z", {"newsletter": False}),
        "events": [ev(A, "2026-01-03T00:00:00Z", {"newsletter": True})],
    }
    assert Run().feed(line).leads()[A][NEWS] is True


@pytest.mark.parametrize("null", ["null", "absent"])
def test_null_or_absent_value_is_never_an_observation(null):
    purposes = {"newsletter": None} if null == "null" else {}
    later_null = ev(A, "2026-01-05T00:00:00Z", purposes, channels={"email": None} if null == "null" else None)
    early = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True}, channels={"email": False})
    # Neither blanks the earlier value nor takes its timestamp (so the earlier one still lands
    # when it comes after in the input).
    assert Run().feed(early, later_null).leads() == {A: {NEWS: True, EMAIL_CH: False}}
    assert Run().feed(later_null, early).leads() == {A: {NEWS: True, EMAIL_CH: False}}


def test_non_boolean_enabled_is_not_an_observation():
    e1 = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True})
    e2 = ev(A, "2026-01-02T00:00:00Z", {})
    e2["consents"]["purposes"] = [{"id": "newsletter", "enabled": "false"}]
    assert Run().feed(e1, e2).leads()[A][NEWS] is True


def test_user_fields_fold_by_timestamp_too():
    s = status(A, "2026-01-02T00:00:00Z", {}, country="FR")
    e = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True})
    e["user"]["country"] = "DE"
    assert Run().feed(s, e).leads()[A] == {NEWS: True, COUNTRY: "FR"}


def test_latest_is_the_max_applied_timestamp():
    run = Run().feed(
        ev(A, "2026-01-03T00:00:00Z", {"other": True}), ev(A, "2026-01-01T00:00:00Z", {"newsletter": True})
    )
    (state,) = run.states().values()
    assert latest(state) == int(datetime(2026, 1, 3, tzinfo=UTC).timestamp()) * 10**9
    assert source(state) == "in.ndjson:2"  # the last record read


# ---------------------------------------------------------------------------------------------
# what applies


def test_pending_approval_is_ignored_and_counted():
    ok = ev(A, "2026-01-01T00:00:00Z", {"newsletter": False})
    pending = ev(A, "2026-01-02T00:00:00Z", {"newsletter": True}, status="pending_approval")
    run = Run().feed(ok, pending)
    assert run.leads()[A][NEWS] is False
    assert run.fold.stats.pending == 1 and run.fold.stats.applied == 1
    assert run.issues[0][:3] == ("pending", "in.ndjson", 2) and run.issues[0][4] == A


@pytest.mark.parametrize("status_value", ["confirmed", None])
def test_confirmed_or_absent_status_applies(status_value):
    extra = {} if status_value is None else {"status": status_value}
    run = Run().feed(ev(A, "2026-01-01T00:00:00Z", {"newsletter": True}, **extra))
    assert run.leads() == {A: {NEWS: True}} and run.fold.stats.pending == 0


@pytest.mark.parametrize(
    ("regulation", "regulations", "applies"),
    [
        (None, {"gdpr"}, True),
        ("gdpr", {"gdpr"}, True),
        ("GDPR", {"gdpr"}, True),
        ("cpra", {"gdpr"}, False),
        ("cpra", {"gdpr", "cpra"}, True),
        ("CpRa", {"gdpr", "cpra"}, True),
        (None, {"gdpr", "cpra"}, True),
        (None, {"cpra"}, False),  # absent means gdpr, which is not applied here
        ("gdpr", {"cpra"}, False),
        ("lgpd", {"gdpr", "cpra"}, False),
        (7, {"gdpr"}, False),
        (["gdpr"], {"gdpr"}, False),  # not a regulation id: not applied (and no crash)
        ({"id": "gdpr"}, {"gdpr"}, False),
    ],
)
def test_regulations(regulation, regulations, applies):
    extra = {} if regulation is None else {"regulation": regulation}
    run = Run(regulations=frozenset(regulations)).feed(
        ev(A, "2026-01-01T00:00:00Z", {"newsletter": True}, **extra)
    )
    assert (run.leads() == {A: {NEWS: True}}) is applies
    assert run.fold.stats.other_regulation == (0 if applies else 1)
    assert run.categories() == ([] if applies else ["other_regulation"])


def test_user_status_regulation_is_checked_too():
    run = Run().feed(status(A, "2026-01-01T00:00:00Z", {"newsletter": True}, regulation="cpra"))
    assert run.leads() == {} and run.fold.stats.other_regulation == 1


def test_cpra_event_does_not_overwrite_gdpr_consent_by_default():
    gdpr = ev(A, "2026-01-01T00:00:00Z", {"newsletter": True})
    cpra = ev(A, "2026-01-02T00:00:00Z", {"newsletter": False}, regulation="cpra")
    assert Run().feed(gdpr, cpra).leads()[A][NEWS] is True


@pytest.mark.parametrize("key", [None, ""])
def test_anonymous_is_counted_and_reported_with_its_line(key):
    e = ev(key, "2026-01-01T00:00:00Z", {"newsletter": True})
    if key == "":
        e["user"]["organization_user_id"] = ""
    run = Run().feed(ev(A, "2026-01-01T00:00:00Z", {"newsletter": True}), e, path="w.ndjson")
    assert list(run.leads()) == [A]
    assert run.fold.stats.anonymous == 1 and run.fold.stats.rejected == 0
    (issue,) = run.issues
    assert issue[:3] == ("anonymous", "w.ndjson", 2) and "anonymous" in issue[3]


# ---------------------------------------------------------------------------------------------
# keys


def test_email_keys_fold_case_insensitively():
    run = Run().feed(
        ev("Bob@Example.COM", "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": True}),
        ev("bob@example.com", "2026-01-02T00:00:00Z", {"newsletter": False}),
        ev("  BOB@example.com ", "2026-01-03T00:00:00Z", {}, channels={"email": True}),
    )
    assert run.leads() == {"bob@example.com": {NEWS: False, ANALYTICS: True, EMAIL_CH: True}}


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("jürgen@example.com", "ASCII"),
        ("a@exämple.com", "ASCII"),
        ("not-an-email", "not an email"),
        ("a@b", "not an email"),
        ("a b@example.com", "not an email"),
        ("a@@example.com", "not an email"),
        ("@example.com", "not an email"),
        (12345, "not an email"),
        ("a@example.com\nb@example.com", "not an email"),
    ],
)
def test_invalid_email_keys_are_rejected(key, why):
    run = Run().feed(ev(key, "2026-01-01T00:00:00Z", {"newsletter": True}))
    assert run.leads() == {}
    assert run.fold.stats.rejected == 1
    (issue,) = run.issues
    assert issue[0] == "rejected" and why in issue[3] and issue[4] == key


def test_lead_id_keys_fold_as_integers():
    run = Run(identifier="leadID").feed(
        ev("007", "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": True}),
        ev(7, "2026-01-02T00:00:00Z", {"newsletter": False}),
        ev(" 7", "2026-01-03T00:00:00Z", {}, channels={"email": True}),
    )
    assert run.leads() == {"7": {NEWS: False, ANALYTICS: True, EMAIL_CH: True}}


@pytest.mark.parametrize(
    "key",
    ["0", 0, -3, "-3", "+5", "1.5", 1.0, True, "abc", "1_000", "²", "٣", "a@example.com",
     "2147483648", 2**31, "9" * 25, "1" * 5000],  # past Marketo's 32-bit ids; int() refuses 4,300+ digits
)  # fmt: skip
def test_invalid_lead_ids_are_rejected(key):
    run = Run(identifier="leadID").feed(ev(key, "2026-01-01T00:00:00Z", {"newsletter": True}))
    assert run.leads() == {} and run.fold.stats.rejected == 1
    assert "not a lead id" in run.issues[0][3]


@pytest.mark.parametrize(
    ("key", "expected"), [("42", "42"), (42, "42"), ("00042", "42"), ("2147483647", "2147483647")]
)
def test_normalise_lead_id(key, expected):
    assert normalise_key(key, "leadID") == (expected, "")


# ---------------------------------------------------------------------------------------------
# timestamps


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (ev(A, "", {"newsletter": True}), "created_at"),
        ({**ev(A, "x", {"newsletter": True}), "created_at": None}, "created_at"),
        (ev(A, "yesterday", {"newsletter": True}), "created_at"),
        (ev(A, "2026-13-01T00:00:00Z", {"newsletter": True}), "created_at"),
        ({**ev(A, "x", {"newsletter": True}), "created_at": 1767225600}, "created_at"),
        (status(A, "", {"newsletter": True}), "updated_at"),
        (status(A, "soon", {"newsletter": True}), "updated_at"),
    ],
)
def test_missing_or_invalid_timestamp_is_rejected_naming_the_field(record, field):
    record = dict(record)
    if field == "created_at" and record.get("created_at") == "":
        del record["created_at"]
    run = Run().feed(record)
    assert run.leads() == {} and run.fold.stats.rejected == 1
    (issue,) = run.issues
    assert issue[0] == "rejected" and field in issue[3]
    assert ("missing" in issue[3]) is (record.get(field) in (None, ""))


def test_event_created_at_is_used_even_if_updated_at_is_valid():
    e = ev(A, "bad", {"newsletter": True}, updated_at="2026-01-01T00:00:00Z")
    run = Run().feed(e)
    assert run.leads() == {} and "created_at" in run.issues[0][3]


def test_offsets_compare_as_instants():
    # 10:00+02:00 is 08:00Z: earlier than 09:00Z although it sorts later as text.
    east = ev(A, "2026-01-01T10:00:00+02:00", {"newsletter": True})
    utc = ev(A, "2026-01-01T09:00:00Z", {"newsletter": False})
    assert Run().feed(utc, east).leads()[A][NEWS] is False
    assert Run().feed(east, utc).leads()[A][NEWS] is False
    west = ev(A, "2026-01-01T05:00:00-05:00", {"newsletter": True})  # 10:00Z
    assert Run().feed(west, utc).leads()[A][NEWS] is True


def test_timestamp_without_offset_is_utc_and_fractions_count():
    a = ev(A, "2026-01-01T09:00:00.500000", {"newsletter": True})
    b = ev(A, "2026-01-01T09:00:00.250Z", {"newsletter": False})
    assert Run().feed(a, b).leads()[A][NEWS] is True


# ---------------------------------------------------------------------------------------------
# spilling to SQLite


def spill_corpus() -> list[dict[str, Any]]:
    out = []
    for i in range(40):
        key = f"user{i % 7}@example.com"
        if i % 3 == 0:
            key = key.upper()
        day = 1 + (i * 7) % 11  # repeats: ties across chunks
        out.append(
            ev(
                key,
                f"2026-01-{day:02d}T00:00:00Z",
                {"newsletter": i % 2 == 0, "product_analytics": None if i % 5 == 0 else i % 3 == 0},
                channels={"email": i % 4 == 0} if i % 2 else None,
            )
        )
        if i % 6 == 0:
            out.append(
                status(key, f"2026-01-{day:02d}T12:00:00Z", {"newsletter": i % 4 == 0}, country=f"C{i}")
            )
    return out


@pytest.mark.parametrize("threshold", [1, 2, 3, 5])
def test_spill_gives_exactly_the_same_leads_as_no_spill(threshold):
    corpus = spill_corpus()
    memory = Run().feed(*corpus)
    spilled = Run(spill=threshold).feed(*corpus)
    assert spilled.fold._spill is not None  # it did spill
    assert spilled.states() == memory.states()  # values, timestamps, latest and source line
    assert len(spilled.fold) == len(memory.fold) == 7
    spilled.fold.close()


def test_spilled_keys_are_yielded_once_each():
    corpus = spill_corpus()
    run = Run(spill=2).feed(*corpus)
    keys = [k for k, _ in run.fold.leads()]
    assert len(keys) == len(set(keys)) == 7
    run.fold.close()


@pytest.mark.parametrize("second", [True, False])
def test_spill_tie_across_chunks_goes_to_the_later_record(second):
    at = "2026-01-01T00:00:00Z"
    run = Run(spill=1).feed(
        ev("x@example.com", at, {"newsletter": not second}),
        ev("y@example.com", at, {"newsletter": True}),  # a second lead: x is spilled
        ev("x@example.com", at, {"newsletter": second}),
    )
    assert run.fold._spill is not None
    assert run.leads()["x@example.com"][NEWS] is second
    run.fold.close()


def test_spill_keeps_never_seen_properties_empty():
    run = Run(spill=1).feed(
        ev("x@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}),
        ev("y@example.com", "2026-01-01T00:00:00Z", {"product_analytics": False}),
        ev("x@example.com", "2026-01-02T00:00:00Z", {}, channels={"email": True}),
    )
    assert run.leads() == {
        "x@example.com": {NEWS: True, EMAIL_CH: True},
        "y@example.com": {ANALYTICS: False},
    }
    run.fold.close()


# ---------------------------------------------------------------------------------------------
# property: order and chunking do not matter; equals a simple reference


EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
PURPOSE_IDS = ["newsletter", "product_analytics"]
KEYS = ["a@x.io", "A@X.io", "b@x.io", "c@x.io"]


def render(seconds: int, offset_hours: int) -> str:
    tz = timezone(timedelta(hours=offset_hours))
    text = (EPOCH + timedelta(seconds=seconds)).astimezone(tz).isoformat()
    return text.replace("+00:00", "Z") if offset_hours == 0 and seconds % 2 else text


@st.composite
def corpora(draw):
    n = draw(st.integers(1, 25))
    used: dict[str, set[int]] = {}
    records = []
    for i in range(n):
        key = draw(st.sampled_from(KEYS))
        taken = used.setdefault(key.lower(), set())
        seconds = draw(st.integers(0, 10_000).filter(lambda s, taken=taken: s not in taken))
        taken.add(seconds)
        purposes = draw(
            st.dictionaries(st.sampled_from(PURPOSE_IDS), st.sampled_from([True, False, None]), max_size=2)
        )
        kind = draw(st.sampled_from(["event", "event", "status", "pending", "cpra"]))
        at = render(seconds, draw(st.integers(-12, 12)))
        if kind == "status":
            rec = status(key, at, purposes, country=draw(st.sampled_from(["FR", "DE", None])))
        else:
            rec = ev(
                key,
                at,
                purposes,
                channels=draw(st.one_of(st.none(), st.fixed_dictionaries({"email": st.booleans()}))),
            )
            if kind == "pending":
                rec["status"] = "pending_approval"
            elif kind == "cpra":
                rec["regulation"] = "cpra"
        records.append((i, kind, key.lower(), seconds, rec))
    return records


def reference(corpus) -> dict[str, dict[str, Any]]:
    """Per key, per property: the value at the max timestamp among applicable records."""
    best: dict[str, dict[str, tuple[int, Any]]] = {}
    for _, kind, key, seconds, rec in corpus:
        if kind in ("pending", "cpra"):
            continue
        lead = best.setdefault(key, {})
        vals = {}
        for p in rec["consents"]["purposes"]:
            vals[f"consents_purposes_{p['id']}_enabled"] = p["enabled"]
        for c in rec["consents"].get("channels", []):
            vals[f"consents_channels_{c['id']}_enabled"] = c["enabled"]
        user = rec if kind == "status" else rec["user"]
        vals[COUNTRY] = user.get("country")
        for name, v in vals.items():
            if v is not None and (name not in lead or lead[name][0] < seconds):
                lead[name] = (seconds, v)
    return {k: {n: v for n, (_, v) in props.items()} for k, props in best.items()}


def reference_latest(corpus) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, kind, key, seconds, _ in corpus:
        if kind not in ("pending", "cpra"):
            out[key] = max(out.get(key, -1), int((EPOCH + timedelta(seconds=seconds)).timestamp()) * 10**9)
    return out


@settings(max_examples=150, deadline=None)
@given(corpus=corpora(), data=st.data())
def test_any_order_and_chunking_folds_to_the_reference(corpus, data):
    order = data.draw(st.permutations(corpus))
    threshold = data.draw(st.sampled_from([1, 2, 3, 250_000]))
    run = Run(spill=threshold).feed(*[rec for *_, rec in order])
    try:
        assert run.leads() == reference(corpus)
        latest_ = {k: latest(s) for k, s in run.states().items()}
        assert latest_ == reference_latest(corpus)
        assert run.fold.stats.pending == sum(1 for c in corpus if c[1] == "pending")
        assert run.fold.stats.other_regulation == sum(1 for c in corpus if c[1] == "cpra")
    finally:
        run.fold.close()


def test_len_counts_spilled_and_held_leads_without_spilling():
    run = Run(spill=2).feed(
        ev("x@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}),
        ev("y@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}),
        ev("z@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}),  # x, y spilled
        ev("x@example.com", "2026-01-02T00:00:00Z", {"newsletter": False}),  # x again, in memory
    )
    chunks, held = run.fold._chunk, dict(run.fold._leads)
    assert len(run.fold) == 3
    assert (run.fold._chunk, run.fold._leads) == (chunks, held)  # nothing was written out
    assert run.leads()["x@example.com"][NEWS] is False
    run.fold.close()


@settings(max_examples=150, deadline=None)
@given(corpora(), st.lists(st.integers(0, 25), max_size=3), st.sampled_from([1, 2, 3, 250_000]))
def test_files_staged_then_taken_fold_as_if_read_straight(corpus, cuts, spill):
    """Each file folded on its own (`staging`) and taken in input order (`take`): the same
    leads, ties included, as every record folded into one fold; whatever spills on either side."""
    records = [rec for *_, rec in corpus]
    straight = Run(spill=spill).feed(*records)
    staged_run = Run(spill=spill)
    bounds = sorted({0, len(records), *(c for c in cuts if c <= len(records))})
    for start, end in zip(bounds, bounds[1:]):  # noqa: B905 - consecutive bounds
        part = staged_run.fold.staging()
        for i, rec in enumerate(records[start:end]):
            for ob in observations(rec, start + i + 1):
                part.add(ob, "in.ndjson")  # type: ignore[arg-type]
        staged_run.fold.take(part)
        part.close()
    assert staged_run.states() == straight.states()
    straight.fold.close()
    staged_run.fold.close()
