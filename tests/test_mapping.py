"""The Didomi property grammar, transforms, and the planner that turns folded leads into payloads."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import event

from didomi_marketo.didomi.fold import Fold, FoldSchema
from didomi_marketo.didomi.records import observations
from didomi_marketo.mapping import (
    BOOLEAN,
    DATETIME,
    STRING,
    FieldMapping,
    Malformed,
    Reading,
    classify_value,
    parse_property,
    parse_transforms,
)
from didomi_marketo.plan import Planner

# ---------------------------------------------------------------------------------------------
# grammar


@pytest.mark.parametrize(
    ("name", "reading", "value_type"),
    [
        ("consents_purposes_newsletter_enabled", Reading("purpose_enabled", purpose="newsletter"), BOOLEAN),
        ("consents_purposes_purpose_id_enabled", Reading("purpose_enabled", purpose="purpose_id"), BOOLEAN),
        ("consents_purposes_ads_enabled_li", Reading("purpose_enabled_li", purpose="ads"), BOOLEAN),
        ("consents_purposes_my_ads_enabled_li", Reading("purpose_enabled_li", purpose="my_ads"), BOOLEAN),
        (
            "consents_purposes_news_values_topics",
            Reading("purpose_values", purpose="news", preference="topics"),
            STRING,
        ),
        (
            "consents_purposes_my_news_values_topic_list",
            Reading("purpose_values", purpose="my_news", preference="topic_list"),
            STRING,
        ),
        ("consents_channels_email_enabled", Reading("channel_enabled", channel="email"), BOOLEAN),
        ("consents_channels_e_mail_enabled", Reading("channel_enabled", channel="e_mail"), BOOLEAN),
        ("organization_user_id", Reading("user_field", key="organization_user_id"), STRING),
        ("country", Reading("user_field", key="country"), STRING),
        ("last_seen_country", Reading("user_field", key="last_seen_country"), STRING),
        ("updated_at", Reading("updated_at"), DATETIME),
        ("metadata_source", Reading("metadata", key="source"), STRING),
        ("metadata_crm_source_id", Reading("metadata", key="crm_source_id"), STRING),
    ],
)
def test_every_form_of_the_grammar(name, reading, value_type):
    prop = parse_property(name)
    assert prop.name == name
    assert reading in prop.readings
    assert prop.value_type == value_type


def test_nested_preference_name_keeps_both_readings_nested_first():
    prop = parse_property("consents_purposes_cookies_preferences_newsletter_channel_email_enabled")
    assert prop.readings[0] == Reading("purpose_channel", "cookies", "newsletter", "email")
    assert prop.readings[-1] == Reading(
        "purpose_enabled", purpose="cookies_preferences_newsletter_channel_email"
    )
    assert prop.value_type == BOOLEAN


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("consents_purpose_newsletter_enabled", "did you mean 'consents_purposes_newsletter_enabled'"),
        ("consent_purposes_newsletter_enabled", "did you mean 'consents_purposes_newsletter_enabled'"),
        ("purposes_newsletter_enabled", "did you mean 'consents_purposes_newsletter_enabled'"),
        ("consents_channel_email_enabled", "did you mean 'consents_channels_email_enabled'"),
        ("contry", "did you mean 'country'"),
        ("last_seen_contry", "did you mean 'last_seen_country'"),
        ("updatedat", "did you mean 'updated_at'"),
        ("consents_channels_email", "did you mean 'consents_channels_email_enabled'"),
        ("consents_purposes_newsletter", "ends in _enabled"),
    ],
)
def test_unknown_names_raise_with_did_you_mean(name, hint):
    with pytest.raises(ValueError) as e:
        parse_property(name)
    msg = str(e.value)
    assert f"'{name}'" in msg and hint in msg
    assert "consents_purposes_<purpose>_enabled" in msg  # the grammar is listed


@pytest.mark.parametrize(
    "name",
    [
        "",
        "metadata_",
        "consents_purposes__enabled",
        "consents_channels__enabled",
        "consents_purposes_x_values_",
        "user_id",
        "consents_vendors_google_enabled",
        "email",
    ],
)
def test_incomplete_or_foreign_names_are_errors(name):
    with pytest.raises(ValueError, match="unknown Didomi property"):
        parse_property(name)


# ---------------------------------------------------------------------------------------------
# reading values from records


def extract(
    name: str,
    purposes: list[dict] | None = None,
    channels: list[dict] | None = None,
    user: dict | None = None,
) -> Any:
    consents: dict[str, Any] = {}
    if purposes is not None:
        consents["purposes"] = purposes
    if channels is not None:
        consents["channels"] = channels
    pmap = {p["id"]: p for p in purposes} if purposes is not None else None
    return parse_property(name).extract(pmap, consents, user or {})


def nested(purpose: str, pref: str, channel: str, enabled: Any) -> dict:
    return {"id": purpose, "preferences": [{"id": pref, "channels": [{"id": channel, "enabled": enabled}]}]}


AMBIGUOUS = "consents_purposes_a_preferences_b_channel_c_enabled"


@pytest.mark.parametrize("value", [True, False])
def test_ambiguous_name_resolves_to_the_nested_preference_when_present(value):
    purposes = [nested("a", "b", "c", value), {"id": "a_preferences_b_channel_c", "enabled": not value}]
    assert extract(AMBIGUOUS, purposes) is value


@pytest.mark.parametrize(
    "purpose_a",
    [
        None,
        {"id": "a", "enabled": True},  # purpose a without preferences
        nested("a", "other", "c", True),  # no preference b
        nested("a", "b", "sms", True),  # preference b without channel c
    ],
)
def test_ambiguous_name_falls_back_to_the_flat_purpose(purpose_a):
    purposes = [{"id": "a_preferences_b_channel_c", "enabled": False}]
    if purpose_a is not None:
        purposes.insert(0, purpose_a)
    assert extract(AMBIGUOUS, purposes) is False


def test_ambiguous_name_with_neither_is_none():
    assert extract(AMBIGUOUS, [{"id": "a", "enabled": True}]) is None


def test_nested_ids_with_underscores_at_every_level():
    name = "consents_purposes_my_purpose_preferences_my_pref_channel_e_mail_enabled"
    assert extract(name, [nested("my_purpose", "my_pref", "e_mail", True)]) is True
    flat = {"id": "my_purpose_preferences_my_pref_channel_e_mail", "enabled": False}
    assert extract(name, [flat]) is False
    assert extract(name, [nested("my_purpose", "my_pref", "e_mail", True), flat]) is True


def test_nested_split_at_the_second_preferences_marker():
    name = "consents_purposes_p_preferences_q_preferences_r_channel_c_enabled"
    assert extract(name, [nested("p_preferences_q", "r", "c", False)]) is False
    assert extract(name, [nested("p", "q_preferences_r", "c", True)]) is True


def test_nested_null_channel_is_no_value():
    assert (
        extract(
            AMBIGUOUS, [nested("a", "b", "c", None), {"id": "a_preferences_b_channel_c", "enabled": True}]
        )
        is None
    )


@pytest.mark.parametrize(
    ("purpose", "expected"),
    [
        ({"id": "newsletter", "enabled": True}, True),
        ({"id": "newsletter", "enabled": False}, False),
        ({"id": "newsletter", "enabled": None}, None),
        ({"id": "newsletter"}, None),
        ({"id": "other", "enabled": True}, None),
        ({"id": "other", "enabled": "yes"}, None),  # a purpose the property does not read
    ],
)
def test_purpose_enabled(purpose, expected):
    assert extract("consents_purposes_newsletter_enabled", [purpose]) is expected


@pytest.mark.parametrize(
    ("name", "consents", "where"),
    [
        (
            "consents_purposes_newsletter_enabled",
            {"purposes": [{"id": "newsletter", "enabled": "true"}]},
            "consents.purposes[newsletter].enabled",
        ),
        (
            "consents_purposes_newsletter_enabled_li",
            {"purposes": [{"id": "newsletter", "enabled_li": 0}]},
            "consents.purposes[newsletter].enabled_li",
        ),
        (
            "consents_channels_email_enabled",
            {"channels": [{"id": "email", "enabled": "yes"}]},
            "consents.channels[email].enabled",
        ),
        (
            "consents_purposes_p_preferences_q_channel_c_enabled",
            {
                "purposes": [
                    {"id": "p", "preferences": [{"id": "q", "channels": [{"id": "c", "enabled": 1}]}]}
                ]
            },
            "consents.purposes[p].preferences[q].channels[c].enabled",
        ),
    ],
)
def test_malformed_consent_flag_raises_naming_the_field(name, consents, where):
    prop = parse_property(name)
    purposes = {p["id"]: p for p in consents.get("purposes", [])}
    for reader in (prop.extract, prop.compile()):
        with pytest.raises(Malformed) as e:
            reader(purposes, consents, {})
        assert str(e.value).startswith(where + " is ")


def test_purpose_enabled_li_reads_enabled_li_not_enabled():
    p = [{"id": "ads", "enabled": True, "enabled_li": False}]
    assert extract("consents_purposes_ads_enabled_li", p) is False
    assert extract("consents_purposes_ads_enabled", p) is True


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"topics": {"value": "product_news,events"}}, "product_news,events"),
        ({"topics": {"value": "events"}}, "events"),
        ({"topics": {"value": ""}}, ""),  # everything deselected is a value
        ({"topics": "a,b"}, "a,b"),
        ({"topics": {"value": ["a", "b"]}}, "a,b"),
        ({"topics": {"value": None}}, None),
        ({"other": {"value": "x"}}, None),
        ({}, None),
    ],
)
def test_v2_flat_preference_values(values, expected):
    assert (
        extract("consents_purposes_newsletter_values_topics", [{"id": "newsletter", "values": values}])
        == expected
    )


def test_values_with_underscores_in_purpose_and_preference():
    p = [{"id": "my_news", "values": {"topic_list": {"value": "a_b,c_d"}}}]
    assert extract("consents_purposes_my_news_values_topic_list", p) == "a_b,c_d"


@pytest.mark.parametrize(("enabled", "expected"), [(True, True), (False, False), (None, None)])
def test_top_level_channels(enabled, expected):
    channels = [
        {"id": "sms", "enabled": not enabled if enabled is not None else True},
        {"id": "email", "enabled": enabled},
    ]
    assert extract("consents_channels_email_enabled", channels=channels) is expected


def test_user_fields_and_metadata():
    user = {
        "organization_user_id": "a@x.io",
        "country": "FR",
        "last_seen_country": "",
        "updated_at": "x",
        "metadata": {"crm_id": 42, "tier": "gold", "flag": False, "nested": {"a": 1}},
    }
    assert extract("organization_user_id", user=user) == "a@x.io"
    assert extract("country", user=user) == "FR"
    assert extract("last_seen_country", user=user) is None  # empty is no value
    assert extract("metadata_crm_id", user=user) == 42
    assert extract("metadata_tier", user=user) == "gold"
    assert extract("metadata_flag", user=user) is False
    assert extract("metadata_nested", user=user) is None
    assert extract("metadata_missing", user=user) is None
    assert extract("country", user={"country": None}) is None


# ---------------------------------------------------------------------------------------------
# transforms


def transforms(spec: Any):
    out, problems = parse_transforms(spec)
    assert problems == []
    return out


def render(spec: Any, value: Any) -> Any:
    return FieldMapping("f", parse_property("consents_purposes_x_enabled"), transforms(spec)).render(value)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ("invert", True, False),
        ("invert", False, True),
        ("invert", "x", "x"),
        ("yes_no", True, "Yes"),
        ("yes_no", False, "No"),
        ("yes_no", "events", "events"),
        ("text", True, "true"),
        ("text", False, "false"),
        ({"map": {"product_news": "News", "events": "Events"}}, "events", "Events"),
        ({"map": {"product_news": "News", "events": "Events"}}, "product_news,events", "News,Events"),
        ({"map": {"product_news": "News"}}, "product_news,unknown", "News,unknown"),
        ({"map": {"product_news": "News"}}, "unknown", "unknown"),
        ({"map": {"a,b": "both"}}, "a,b", "both"),  # the whole list matches first
        ({"map": {"true": "subscribed", "false": "unsubscribed"}}, False, "unsubscribed"),
        ({"map": {True: "subscribed", False: "unsubscribed"}}, True, "subscribed"),  # YAML booleans as keys
        ({"map": {"1": "one"}}, 1, "one"),
        ({"const": "Didomi"}, True, "Didomi"),
        ({"const": 0}, None, 0),
        ({"const": False}, True, False),
        (["invert", "yes_no"], True, "No"),
        (["yes_no", "invert"], True, "Yes"),  # invert after yes_no: not a boolean any more
        (["invert", {"map": {"true": "in", "false": "out"}}], True, "out"),
        ([], True, True),
    ],
)
def test_transforms(spec, value, expected):
    out = render(spec, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("invers", "did you mean 'invert'"),
        ("yesno", "did you mean 'yes_no'"),
        ("bogus", "unknown transform 'bogus'"),
        ("map", "needs an argument: {map: {...}}"),
        ("const", "needs an argument: {const: value}"),
        ({"map": {}}, "non-empty object"),
        ({"map": ["a", "b"]}, "non-empty object"),
        ({"const": None}, "needs a value"),
        ({"map": {"a": "b"}, "const": 1}, "invalid transform"),
        ({"lookup": {}}, "invalid transform"),
        (5, "invalid transform"),
        (None, "invalid transform"),
    ],
)
def test_invalid_transforms(spec, words):
    out, problems = parse_transforms(spec)
    assert len(problems) == 1 and words in problems[0]
    assert out == ()


def test_transform_list_reports_every_bad_item():
    out, problems = parse_transforms(["invert", "nope", {"const": None}, "text"])
    assert [t.name for t in out] == ["invert", "text"]
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("name", "spec", "expected"),
    [
        ("consents_purposes_x_enabled", None, BOOLEAN),
        ("consents_purposes_x_enabled", "invert", BOOLEAN),
        ("consents_purposes_x_enabled", "yes_no", STRING),
        ("consents_purposes_x_enabled", "text", STRING),
        ("consents_purposes_x_values_y", {"map": {"a": True, "b": False}}, BOOLEAN),
        ("consents_purposes_x_values_y", {"map": {"a": "A"}}, STRING),
        ("consents_purposes_x_enabled", {"const": 3}, "integer"),
        ("updated_at", None, DATETIME),
    ],
)
def test_output_types(name, spec, expected):
    ts = () if spec is None else transforms(spec)
    assert FieldMapping("f", parse_property(name), ts).output_type == expected


@pytest.mark.parametrize(
    ("value", "bucket"), [(True, "true"), (False, "false"), ("true", "other"), (1, "other"), (0, "other")]
)
def test_classify_value(value, bucket):
    assert classify_value(value) == bucket


# ---------------------------------------------------------------------------------------------
# the planner


def mapping(field: str, value: str | None, transform: Any = None) -> FieldMapping:
    ts = () if transform is None else transforms(transform)
    return FieldMapping(field, parse_property(value) if value else None, ts)


def plan(mappings: list[FieldMapping], records: list[dict], identifier: str = "email"):
    schema = FoldSchema.from_mappings(mappings)
    fold = Fold(schema, identifier, frozenset({"gdpr"}), lambda *a: None)
    for i, rec in enumerate(records, 1):
        for ob in observations(rec, i):
            fold.add(ob, "in.ndjson")
    planner = Planner(mappings, schema, "id" if identifier == "leadID" else "email")
    updates = {u.key: u for u in planner.plan(fold.leads())}
    return updates, planner.stats


NEWS = mapping("newsOptIn", "consents_purposes_newsletter_enabled")
ANALYTICS = mapping("analyticsOptIn", "consents_purposes_product_analytics_enabled")


def test_null_and_absent_values_are_not_sent():
    updates, stats = plan(
        [NEWS, ANALYTICS, mapping("cty", "country")],
        [
            event("a@x.io", "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": None}),
        ],
    )
    assert updates["a@x.io"].payload == {"email": "a@x.io", "newsOptIn": True}
    assert stats.to_send == 1


def test_lead_with_nothing_mapped_is_counted_and_not_sent():
    updates, stats = plan(
        [NEWS, ANALYTICS],
        [
            event("a@x.io", "2026-01-01T00:00:00Z", {"unmapped": True}),
            event("b@x.io", "2026-01-01T00:00:00Z", {"newsletter": None}),
            event("c@x.io", "2026-01-01T00:00:00Z", {"newsletter": False}),
        ],
    )
    assert list(updates) == ["c@x.io"]
    assert (stats.leads, stats.to_send, stats.nothing_to_send) == (3, 1, 2)


def test_const_alone_does_not_make_a_lead_sendable():
    source = mapping("leadSource", None, {"const": "Didomi"})
    updates, stats = plan(
        [NEWS, source],
        [
            event("a@x.io", "2026-01-01T00:00:00Z", {"other": True}),
            event("b@x.io", "2026-01-01T00:00:00Z", {"newsletter": False}),
        ],
    )
    assert list(updates) == ["b@x.io"]
    assert updates["b@x.io"].payload == {"email": "b@x.io", "newsOptIn": False, "leadSource": "Didomi"}
    assert stats.nothing_to_send == 1


def test_const_on_a_property_is_sent_only_when_the_property_has_a_value():
    flag = mapping("hasTopics", "consents_purposes_newsletter_values_topics", {"const": True})
    topics = {"id": "newsletter", "enabled": True, "values": {"topics": {"value": "x"}}}
    with_topics = event("a@x.io", "2026-01-01T00:00:00Z", {})
    with_topics["consents"]["purposes"] = [topics]
    updates, _ = plan(
        [NEWS, flag], [with_topics, event("b@x.io", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    assert updates["a@x.io"].payload == {"email": "a@x.io", "newsOptIn": True, "hasTopics": True}
    assert updates["b@x.io"].payload == {"email": "b@x.io", "newsOptIn": True}


def test_map_to_null_is_not_sent():
    m = mapping("topics", "consents_purposes_newsletter_values_topics", {"map": {"none": None, "x": "X"}})
    recs = []
    for key, value in (("a@x.io", "none"), ("b@x.io", "x")):
        e = event(key, "2026-01-01T00:00:00Z", {"newsletter": True})
        e["consents"]["purposes"][0]["values"] = {"topics": {"value": value}}
        recs.append(e)
    updates, stats = plan([NEWS, m], recs)
    assert updates["a@x.io"].payload == {"email": "a@x.io", "newsOptIn": True}
    assert updates["b@x.io"].payload["topics"] == "X"


def test_booleans_stay_json_booleans():
    updates, _ = plan(
        [NEWS, ANALYTICS],
        [
            event("a@x.io", "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": False}),
        ],
    )
    payload = updates["a@x.io"].payload
    assert payload["newsOptIn"] is True and payload["analyticsOptIn"] is False
    assert json.dumps(payload) == '{"email": "a@x.io", "newsOptIn": true, "analyticsOptIn": false}'


def test_lookup_field_comes_first_and_lead_ids_are_integers():
    updates, _ = plan(
        [NEWS], [event("007", "2026-01-01T00:00:00Z", {"newsletter": True})], identifier="leadID"
    )
    payload = updates["7"].payload
    assert list(payload) == ["id", "newsOptIn"]
    assert payload["id"] == 7 and type(payload["id"]) is int


def test_per_field_true_false_other_counts():
    yes_no = mapping("newsText", "consents_purposes_newsletter_enabled", "yes_no")
    updates, stats = plan(
        [NEWS, ANALYTICS, yes_no],
        [
            event("a@x.io", "2026-01-01T00:00:00Z", {"newsletter": True, "product_analytics": True}),
            event("b@x.io", "2026-01-01T00:00:00Z", {"newsletter": True}),
            event("c@x.io", "2026-01-01T00:00:00Z", {"newsletter": False, "product_analytics": False}),
        ],
    )
    assert dict(stats.fields["newsOptIn"]) == {"true": 2, "false": 1}
    assert dict(stats.fields["analyticsOptIn"]) == {"true": 1, "false": 1}
    assert dict(stats.fields["newsText"]) == {"other": 3}


def test_unused_field_is_listed_with_no_counts():
    _, stats = plan([NEWS, ANALYTICS], [event("a@x.io", "2026-01-01T00:00:00Z", {"newsletter": True})])
    assert "analyticsOptIn" in stats.fields and sum(stats.fields["analyticsOptIn"].values()) == 0


def test_updated_at_is_the_latest_applied_timestamp_and_source_the_last_record():
    stamp = mapping("updatedAt", "updated_at")
    updates, _ = plan(
        [NEWS, stamp],
        [
            event("a@x.io", "2026-01-03T10:00:00+02:00", {"newsletter": True}),
            event("a@x.io", "2026-01-01T00:00:00Z", {"newsletter": False}),
        ],
    )
    u = updates["a@x.io"]
    assert u.payload == {"email": "a@x.io", "newsOptIn": True, "updatedAt": "2026-01-03T08:00:00Z"}
    assert u.source == "in.ndjson:2"


def test_transforms_are_applied_in_the_payload():
    inverted = mapping("newsOptOut", "consents_purposes_newsletter_enabled", "invert")
    updates, _ = plan([inverted], [event("a@x.io", "2026-01-01T00:00:00Z", {"newsletter": True})])
    assert updates["a@x.io"].payload == {"email": "a@x.io", "newsOptOut": False}
