"""Recognising Didomi record shapes: export lines, users, events, webhooks, API pages, arrays."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import event

from didomi_marketo.didomi.records import Observation, Unusable, observations, recognise

CONSENTS = {"purposes": [{"id": "newsletter", "enabled": True}], "vendors": {"enabled": [], "disabled": []}}


def user(key: str | None = "a@example.com", at: str = "2026-01-02T00:00:00Z", **extra: Any) -> dict[str, Any]:
    u = {"id": "didomi-u", "updated_at": at, "created_at": "2025-01-01T00:00:00Z", "consents": CONSENTS}
    if key is not None:
        u["organization_user_id"] = key
    u.update(extra)
    return u


def obs(value: Any, line: int = 1) -> list[Observation | Unusable]:
    return list(observations(value, line))


def only(value: Any) -> Observation | Unusable:
    (o,) = obs(value)
    return o


# ---------------------------------------------------------------------------------------------
# users and events


def test_user_object_is_a_status_at_updated_at():
    u = user(country="FR", regulation="gdpr")
    o = only(u)
    assert isinstance(o, Observation)
    assert (o.kind, o.key, o.timestamp, o.regulation, o.status) == (
        "user",
        "a@example.com",
        "2026-01-02T00:00:00Z",
        "gdpr",
        None,
    )
    assert o.consents is u["consents"] and o.user is u


def test_event_uses_its_user_and_created_at():
    e = event(
        "b@example.com",
        "2026-03-01T00:00:00Z",
        {"newsletter": False},
        status="confirmed",
        regulation="cpra",
        updated_at="2027-01-01T00:00:00Z",
    )
    o = only(e)
    assert isinstance(o, Observation)
    assert (o.kind, o.key, o.timestamp, o.status, o.regulation) == (
        "event",
        "b@example.com",
        "2026-03-01T00:00:00Z",
        "confirmed",
        "cpra",
    )
    assert o.user is e["user"] and o.consents is e["consents"]


def test_event_without_organization_user_id_has_no_key():
    o = only(event(None, "2026-01-01T00:00:00Z", {"newsletter": True}))
    assert isinstance(o, Observation) and o.kind == "event" and o.key is None


def test_user_without_organization_user_id_has_no_key():
    o = only(user(None))
    assert isinstance(o, Observation) and o.kind == "user" and o.key is None


# ---------------------------------------------------------------------------------------------
# batch export lines


def test_export_line_gives_the_user_status_then_each_event():
    line = {
        "user": user("owner@example.com", country="FR"),
        "events": [
            event("owner@example.com", "2026-01-01T00:00:00Z", {"newsletter": False}),
            event("other@example.com", "2026-01-03T00:00:00Z", {"newsletter": True}),
        ],
        "extra_top_level_key": 1,
    }
    got = obs(line, 7)
    assert [(o.kind, o.key, o.timestamp, o.line) for o in got] == [
        ("user", "owner@example.com", "2026-01-02T00:00:00Z", 7),
        ("event", "owner@example.com", "2026-01-01T00:00:00Z", 7),
        ("event", "other@example.com", "2026-01-03T00:00:00Z", 7),  # its own key wins
    ]


@pytest.mark.parametrize("event_user", [None, {"id": "didomi-x"}, {"id": "x", "organization_user_id": None}])
def test_export_events_without_their_own_key_take_the_line_users(event_user):
    e: dict[str, Any] = {"id": "e1", "created_at": "2026-01-01T00:00:00Z", "consents": CONSENTS}
    if event_user is not None:
        e["user"] = event_user
    got = obs({"user": user("owner@example.com", country="DE"), "events": [e]})
    assert [(o.kind, o.key) for o in got] == [("user", "owner@example.com"), ("event", "owner@example.com")]
    # The event still reads user fields (country...) from the line's user where it has none.
    assert got[1].user["country"] == "DE"


def test_export_event_user_fields_override_the_line_users():
    e = {"created_at": "2026-01-01T00:00:00Z", "consents": CONSENTS, "user": {"id": "x", "country": "IT"}}
    got = obs({"user": user("owner@example.com", country="DE"), "events": [e]})
    assert got[1].key == "owner@example.com" and got[1].user["country"] == "IT"


def test_export_line_without_user_consents_gives_only_events():
    u = user("o@example.com")
    del u["consents"]
    got = obs({"user": u, "events": [event("o@example.com", "2026-01-01T00:00:00Z", {"n": True})]})
    assert [o.kind for o in got] == ["event"]


def test_export_line_with_no_events():
    assert [o.kind for o in obs({"user": user(), "events": []})] == ["user"]


def test_export_line_non_object_event_is_rejected():
    got = obs({"user": user(), "events": ["oops", 3]}, 4)
    assert [type(o).__name__ for o in got] == ["Observation", "Unusable", "Unusable"]
    assert all(o.category == "rejected" and o.line == 4 for o in got[1:])
    assert "a string" in got[1].reason and "a number" in got[2].reason


# ---------------------------------------------------------------------------------------------
# webhooks


def test_webhook_event_created_uses_entity():
    e = event("w@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})
    o = only({"type": "event.created", "parameters": {"entity": e}})
    assert isinstance(o, Observation) and (o.kind, o.key, o.timestamp) == (
        "event",
        "w@example.com",
        e["created_at"],
    )


def test_webhook_event_updated_uses_new_entity_not_old():
    old = event("w@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})
    new = event("w@example.com", "2026-01-05T00:00:00Z", {"newsletter": False})
    o = only({"type": "event.updated", "parameters": {"source": {}, "old_entity": old, "new_entity": new}})
    assert (
        isinstance(o, Observation) and o.timestamp == "2026-01-05T00:00:00Z" and o.consents is new["consents"]
    )


def test_webhook_user_created_uses_entity():
    u = user("c@example.com")
    o = only({"type": "user.created", "parameters": {"entity": u}})
    assert isinstance(o, Observation) and (o.kind, o.key) == ("user", "c@example.com") and o.user is u


def test_webhook_user_updated_uses_new_entity():
    old, new = user("u@example.com", "2026-01-01T00:00:00Z"), user("u@example.com", "2026-02-01T00:00:00Z")
    src = event("u@example.com", "2026-02-01T00:00:00Z", {"newsletter": True})
    o = only({"type": "user.updated", "parameters": {"source": src, "old_entity": old, "new_entity": new}})
    assert isinstance(o, Observation) and o.kind == "user" and o.timestamp == "2026-02-01T00:00:00Z"


@pytest.mark.parametrize(
    ("kind", "entity", "key"),
    [
        ("event.deleted", {"id": "e", "user": {"organization_user_id": "ev@example.com"}}, "ev@example.com"),
        ("event.deleted", {"id": "e", "user": "not-an-object"}, None),
        ("event.deleted", "not-an-object", None),
        ("purpose.deleted", {}, None),
    ],
)
def test_deleted_webhooks_are_unusable_deleted_with_their_key(kind, entity, key):
    o = only({"type": kind, "parameters": {"entity": entity}})
    assert isinstance(o, Unusable) and o.category == "deleted" and o.key == key and kind in o.reason


@pytest.mark.parametrize("kind", ["consent.created", "user.merged", "", None, 5, ["user.created"], {"a": 1}])
def test_unknown_webhook_type_is_rejected(kind):
    o = only({"type": kind, "parameters": {"entity": user()}})
    assert isinstance(o, Unusable) and o.category == "rejected" and "unknown webhook type" in o.reason


@pytest.mark.parametrize(
    ("kind", "params", "words"),
    [
        ("event.updated", {"entity": {}}, "parameters.new_entity"),  # updates need new_entity
        ("user.created", {"new_entity": {}}, "parameters.entity"),
        ("user.updated", {"new_entity": {"organization_user_id": "x", "consents": "x"}}, "not an object"),
        ("event.created", {"entity": "text"}, "parameters.entity"),
    ],
)
def test_webhook_without_usable_entity_is_rejected(kind, params, words):
    o = only({"type": kind, "parameters": params})
    assert isinstance(o, Unusable) and o.category == "rejected" and words in o.reason


# ---------------------------------------------------------------------------------------------
# API pages, arrays, junk


def test_consents_api_page_yields_each_item():
    page = {"data": [user("a@example.com"), user("b@example.com")], "limit": 100, "cursor": None}
    assert [(o.kind, o.key) for o in obs(page)] == [("user", "a@example.com"), ("user", "b@example.com")]


def test_events_api_response_without_limit_or_cursor():
    page = {"data": [event("e@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]}
    assert [(o.kind, o.key) for o in obs(page)] == [("event", "e@example.com")]


def test_empty_page_yields_nothing():
    assert obs({"data": [], "limit": 100, "cursor": None}) == []


def test_array_of_mixed_records():
    arr = [
        user("a@example.com"),
        event("b@example.com", "2026-01-01T00:00:00Z", {"n": True}),
        {"type": "user.deleted", "parameters": {"entity": {"organization_user_id": "c@example.com"}}},
        [event("d@example.com", "2026-01-01T00:00:00Z", {"n": True})],
        {"data": [user("e@example.com")], "limit": 1, "cursor": "x"},
    ]
    got = obs(arr)
    assert [(type(o).__name__, o.key) for o in got] == [
        ("Observation", "a@example.com"),
        ("Observation", "b@example.com"),
        ("Observation", "c@example.com"),  # a user.deleted: the fold counts it (and may revoke)
        ("Observation", "d@example.com"),
        ("Observation", "e@example.com"),
    ]


def test_unrecognised_object_is_rejected_listing_its_keys():
    o = only({"hello": "world", "zeta": 1, "alpha": {}})
    assert isinstance(o, Unusable) and o.category == "rejected"
    assert "keys: alpha, hello, zeta" in o.reason


def test_empty_object_is_rejected():
    o = only({})
    assert isinstance(o, Unusable) and o.category == "rejected" and "keys: none" in o.reason


@pytest.mark.parametrize(
    ("value", "word"),
    [(42, "a number"), ("x", "a string"), (None, "null"), (True, "a boolean"), (1.5, "a number")],
)
def test_non_object_items_are_rejected(value, word):
    got = obs([value, user()], 3)
    assert isinstance(got[0], Unusable) and got[0].category == "rejected" and word in got[0].reason
    assert isinstance(got[1], Observation)


def test_consents_that_is_not_an_object_is_not_a_record():
    o = only({"organization_user_id": "a@example.com", "consents": [1, 2]})
    assert isinstance(o, Unusable) and o.category == "rejected"


def test_event_with_non_object_consents_in_a_webhook_has_empty_consents():
    e = {
        "created_at": "2026-01-01T00:00:00Z",
        "user": {"organization_user_id": "a@example.com"},
        "consents": 5,
    }
    o = only({"type": "event.created", "parameters": {"entity": e}})
    assert isinstance(o, Observation) and o.consents == {}


def test_recognise_is_usable_directly_with_a_line():
    (o,) = list(recognise(user(), 99))
    assert o.line == 99
