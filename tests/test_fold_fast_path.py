"""`Fold.add_export_line` (the fused loop for batch-export lines) against the policy it shortens:
every line folds to the same leads, counts and issues as `records.observations` + `Fold.add`.

The lines are built to hit every branch that must leave the short way: pending and unknown
statuses, other regulations (and non-string ones), keys that change, are invalid, missing or
not strings, an event user without a key, bad or missing timestamps, event versions, malformed
flags, repeated purpose ids, odd purpose items, non-dict events and consents.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.fold import Fold, FoldSchema, _by_id, value_at
from didomi_marketo.didomi.records import Observation, export_line, observations
from didomi_marketo.mapping import FieldMapping, Malformed, parse_property

PROPERTIES = [
    "consents_purposes_newsletter_enabled",
    "consents_purposes_analytics_enabled",
    "consents_purposes_newsletter_values_topics",
    "consents_purposes_a_preferences_b_channel_c_enabled",  # two readings: the extractor's way
    "consents_channels_email_enabled",
    "country",
    "metadata_plan",
]
KEYS = ["a@example.com", "A@example.com ", "b@example.com", "not-an-email", "", None, 42, ["x"]]
TIMES = ["2026-10-01T00:00:00Z", "2026-10-02T00:00:00Z", "2026-10-02T00:00:00.5Z", "nope", "", None, 7, ["t"]]
FLAGS = [True, False, None, "yes", 0]
STATUSES = [None, "confirmed", "pending_approval", ["odd"]]
REGULATIONS = [None, None, "gdpr", "GDPR", "cpra", 3, ["gdpr"]]


def _purposes(draw: st.DrawFn) -> Any:
    items: list[Any] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["enabled", "enabled", "values", "channel", "odd"]))
        pid = draw(st.sampled_from(["newsletter", "analytics", "a", "other"]))
        if kind == "enabled":
            items.append({"id": pid, "enabled": draw(st.sampled_from(FLAGS))})
        elif kind == "values":
            entry = draw(st.sampled_from([{"value": "x,y"}, "bare", ["p", "q"], {"value": 3}, None]))
            items.append({"id": pid, "enabled": True, "values": {"topics": entry}})
        elif kind == "channel":
            ch = {"id": "c", "enabled": draw(st.sampled_from(FLAGS))}
            items.append({"id": "a", "preferences": [{"id": "b", "channels": [ch]}]})
        else:
            items.append(
                draw(st.sampled_from([None, "s", 3, {"enabled": True}, {"id": ["l"]}, {"id": None}]))
            )
    return draw(st.sampled_from([items, items, items, None, {"not": "a list"}]))


def _consents(draw: st.DrawFn) -> Any:
    consents = {"purposes": _purposes(draw)}
    if draw(st.booleans()):
        consents["channels"] = [{"id": "email", "enabled": draw(st.sampled_from(FLAGS))}]
    return draw(st.sampled_from([consents, consents, consents, None, "text"]))


@st.composite
def export_lines(draw: st.DrawFn) -> dict:
    key = draw(st.sampled_from(KEYS))
    user: dict[str, Any] = {"organization_user_id": key, "updated_at": draw(st.sampled_from(TIMES))}
    if draw(st.booleans()):
        user["consents"] = _consents(draw)
    if draw(st.booleans()):
        user["regulation"] = draw(st.sampled_from(REGULATIONS))
    if draw(st.booleans()):
        user["country"] = draw(st.sampled_from(["FR", "", 3]))
    if draw(st.booleans()):
        user["metadata"] = {"plan": draw(st.sampled_from(["pro", 3, ["x"]]))}
    events: list[Any] = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 12)) == 0:
            events.append(draw(st.sampled_from([None, "event", 3, []])))
            continue
        # Half the events are plain (the short way's), the others deviate in a few fields.
        plain = draw(st.booleans())
        event: dict[str, Any] = {
            "created_at": draw(st.sampled_from(TIMES[:3] if plain else TIMES)),
            "consents": {"purposes": _purposes(draw)} if plain else _consents(draw),
        }
        owner = "same" if plain else draw(st.sampled_from(["same", "none", "nokey", "other", "text"]))
        if owner == "same":
            event["user"] = {"organization_user_id": key, "id": "d1"}
        elif owner == "nokey":
            event["user"] = {"id": "d1", "country": "DE"}
        elif owner == "other":
            event["user"] = {"organization_user_id": draw(st.sampled_from(KEYS))}
        elif owner == "text":
            event["user"] = "someone"
        for name, values in (("status", STATUSES), ("regulation", REGULATIONS)):
            if draw(st.booleans()):
                event[name] = draw(st.sampled_from(values[:2] if plain else values))
        if draw(st.integers(0, 3)) == 0:
            event["updated_at"] = draw(st.sampled_from(TIMES))
        events.append(event)
    return {"user": user, "events": draw(st.sampled_from([events, events, None]))}


def _fold(identifier: str, regulations: frozenset[str]) -> tuple[Fold, list[tuple]]:
    issues: list[tuple] = []
    mappings = [FieldMapping(f"f{i}", parse_property(p)) for i, p in enumerate(PROPERTIES)]
    fold = Fold(
        FoldSchema.from_mappings(mappings), identifier, regulations, lambda *issue: issues.append(issue)
    )
    return fold, issues


def _add(fold: Fold, value: Any, line: int) -> None:
    for ob in observations(value, line):
        if isinstance(ob, Observation):
            fold.add(ob, "in.ndjson")
        else:
            fold.reject(ob.category, "in.ndjson", ob.line, ob.reason, ob.key)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(export_lines(), min_size=1, max_size=8),
    identifier=st.sampled_from(["email", "email", "leadID"]),
    regulations=st.sampled_from([frozenset({"gdpr"}), frozenset({"cpra"}), frozenset({"gdpr", "cpra"})]),
)
def test_the_fused_loop_folds_exactly_what_the_policy_folds(lines, identifier, regulations):
    fast, fast_issues = _fold(identifier, regulations)
    slow, slow_issues = _fold(identifier, regulations)
    for n, value in enumerate(lines, 1):
        parts = export_line(value)
        if parts is not None:  # (a user without consents or events is no export line)
            fast.add_export_line(parts[0], parts[1], n, "in.ndjson")
        else:
            _add(fast, value, n)
        _add(slow, value, n)
    assert dict(fast.leads()) == dict(slow.leads())
    assert fast.stats == slow.stats
    assert fast_issues == slow_issues


@settings(max_examples=300, deadline=None)
@given(purposes=st.composite(lambda draw: _purposes(draw))())
def test_the_inline_readers_read_what_property_extract_reads(purposes):
    """_apply reads a purpose's `enabled` and `values` inline: the same value, or the same
    malformed-flag rejection, as the property's own `extract`."""
    consents = {"purposes": purposes}
    user = {
        "organization_user_id": "a@example.com",
        "updated_at": "2026-10-01T00:00:00Z",
        "consents": consents,
    }
    fold, issues = _fold("email", frozenset({"gdpr"}))
    fold.add_export_line(user, [], 1, "in.ndjson")
    by_id = _by_id(purposes) if isinstance(purposes, list) else None
    expected: dict[str, Any] = {}
    try:
        for prop in fold.schema.properties:
            expected[prop.name] = prop.extract(by_id, consents, user)
    except Malformed:
        assert [i[0] for i in issues] == ["rejected"] and len(fold) == 0
        return
    state = dict(fold.leads()).get("a@example.com")
    got = {
        p.name: (value_at(state, fold.schema.slots[p.name]) if state else None)
        for p in fold.schema.properties
    }
    assert got == expected
