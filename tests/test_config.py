"""Loading and validating the Didomi console's Marketo integration config (JSON or YAML)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config

from didomi_marketo.config import Config, load_config, normalise_instance
from didomi_marketo.errors import ConfigError
from didomi_marketo.mapping import parse_property
from didomi_marketo.marketo.credentials import Credentials, Secret

CONSOLE = {
    # What the Didomi Marketplace API returns around the integration: ignored.
    "id": "integration-123",
    "organization_id": "acme",
    "name": "Marketo",
    "description": "prod",
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-02T00:00:00Z",
    "version": 3,
    "enabled": True,
    "type_id": "marketo",
    "authentication": {
        "client_id": "cid",
        "client_secret": "csecret",
        "instance": "https://123-ABC-456.mktorest.com/rest",
    },
    "properties": {"user_identifier": ["email"]},
    "mappings": [
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {
            "id": "didomiTopics",
            "value": "consents_purposes_newsletter_values_topics",
            "transform": {"map": {"a": "A"}},
        },
        {"id": "didomiCountry", "value": "country"},
    ],
    "upsert_mode": False,
}

YAML = """\
# the same config as CONSOLE, in YAML
type_id: marketo
authentication:
  client_id: cid
  client_secret: csecret
  instance: https://123-ABC-456.mktorest.com/rest
properties:
  user_identifier: [email]
mappings:
  - id: didomiNewsletterOptIn
    value: consents_purposes_newsletter_enabled
  - id: didomiTopics
    value: consents_purposes_newsletter_values_topics
    transform:
      map: {a: A}
  - id: didomiCountry
    value: country
upsert_mode: false
"""


@pytest.fixture(autouse=True)
def no_marketo_env(monkeypatch):
    for name in ("MARKETO_CLIENT_ID", "MARKETO_CLIENT_SECRET", "MARKETO_INSTANCE"):
        monkeypatch.delenv(name, raising=False)


def write_json(tmp_path: Path, cfg: Any, name: str = "c.json", **dump: Any) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(cfg, indent=dump.pop("indent", 2), **dump))
    return p


def write_text(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


def comparable(c: Config) -> tuple:
    return (
        c.identifier,
        c.upsert,
        c.regulations,
        c.state,
        c.delivery,
        c._auth,
        [(m.field, m.source, m.transforms) for m in c.mappings],
    )


def cfg(**overrides: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(CONSOLE))
    out.update(overrides)
    return out


# ---------------------------------------------------------------------------------------------
# the console JSON and its YAML twin


def test_console_json_works_verbatim(tmp_path):
    c = load_config(write_json(tmp_path, CONSOLE))
    assert c.identifier == "email" and c.lookup_field == "email"
    assert c.upsert is False and c.action == "updateOnly"
    assert c.regulations == frozenset({"gdpr"})
    assert [m.field for m in c.mappings] == ["didomiNewsletterOptIn", "didomiTopics", "didomiCountry"]
    assert c.mappings[0].source == parse_property("consents_purposes_newsletter_enabled")
    assert c.mappings[1].render("a") == "A"
    creds = c.credentials()
    # host names are case-insensitive; the normalised URL is lower case
    assert (creds.client_id, str(creds.client_secret), creds.base_url) == (
        "cid",
        "csecret",
        "https://123-abc-456.mktorest.com",
    )


def test_yaml_equivalent_gives_the_same_config(tmp_path):
    from_json = load_config(write_json(tmp_path, CONSOLE))
    from_yaml = load_config(write_text(tmp_path, YAML))
    assert comparable(from_yaml) == comparable(from_json)


def test_conftest_config_loads(tmp_path):
    c = load_config(make_config(tmp_path))
    assert [m.field for m in c.mappings] == ["didomiNewsletterOptIn", "didomiAnalyticsOptIn"]


def test_sample_configs_load_and_agree():
    samples = Path(__file__).resolve().parent.parent / "sample_exports" / "config"
    a, b = load_config(samples / "marketo.json"), load_config(samples / "marketo.yaml")
    assert comparable(a) == comparable(b)


def test_upsert_mode_true_with_email_is_create_or_update(tmp_path):
    c = load_config(write_json(tmp_path, cfg(upsert_mode=True)))
    assert c.upsert is True and c.action == "createOrUpdate"


def test_optional_sections_default(tmp_path):
    c = load_config(write_json(tmp_path, {"mappings": [{"id": "f", "value": "country"}]}))
    assert (c.identifier, c.upsert, c.regulations) == ("email", False, frozenset({"gdpr"}))


@pytest.mark.parametrize(("value", "expected"), [(["gdpr", "CPRA"], {"gdpr", "cpra"}), ("cpra", {"cpra"})])
def test_regulations_widen_and_are_lowercased(tmp_path, value, expected):
    c = load_config(write_json(tmp_path, cfg(properties={"user_identifier": "email", "regulations": value})))
    assert c.regulations == frozenset(expected)


# ---------------------------------------------------------------------------------------------
# environment variables


def test_env_substitution_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWS_FIELD", "newsOptIn")
    monkeypatch.setenv("PURPOSE", "newsletter")
    monkeypatch.setenv("IDENT", "leadID")
    monkeypatch.setenv("STATE_DIR", "/var/lib/x")
    c = load_config(
        write_json(
            tmp_path,
            cfg(
                properties={"user_identifier": "${IDENT}"},
                mappings=[{"id": "${NEWS_FIELD}", "value": "consents_purposes_${PURPOSE}_enabled"}],
                state="${STATE_DIR}/state.db",
            ),
        )
    )
    assert c.identifier == "leadID"
    assert c.mappings[0].field == "newsOptIn"
    assert c.mappings[0].source.name == "consents_purposes_newsletter_enabled"
    assert c.state == "/var/lib/x/state.db"


def test_env_substitution_in_authentication(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_ID", "the-id")
    monkeypatch.setenv("MY_SECRET", "the-secret")
    monkeypatch.setenv("MUNCHKIN", "111-AAA-222")
    c = load_config(
        write_json(
            tmp_path,
            cfg(
                authentication={
                    "client_id": "${MY_ID}",
                    "client_secret": "${MY_SECRET}",
                    "instance": "https://${MUNCHKIN}.mktorest.com",
                }
            ),
        )
    )
    creds = c.credentials()
    assert (creds.client_id, str(creds.client_secret), creds.base_url) == (
        "the-id",
        "the-secret",
        "https://111-aaa-222.mktorest.com",
    )


def test_missing_variable_outside_authentication_is_a_load_error_naming_it(tmp_path):
    path = write_json(tmp_path, cfg(mappings=[{"id": "${NO_SUCH_FIELD_VAR}", "value": "country"}]))
    (problem,) = [p for p in problems(path) if "NO_SUCH_FIELD_VAR" in p]
    assert "environment variable NO_SUCH_FIELD_VAR is not set" in problem
    assert problem.startswith(f"{path}:")
    line = int(problem.split(":")[1])
    assert "${NO_SUCH_FIELD_VAR}" in path.read_text().splitlines()[line - 1]


def test_missing_variable_in_authentication_only_fails_credentials(tmp_path):
    c = load_config(
        write_json(
            tmp_path,
            cfg(
                authentication={
                    "client_id": "${NO_SUCH_ID_VAR}",
                    "client_secret": "${NO_SUCH_SECRET_VAR}",
                    "instance": "111-AAA-222",
                }
            ),
        )
    )
    assert c.identity()["user_identifier"] == "email"  # a dry run can go on
    with pytest.raises(ConfigError) as e:
        c.credentials()
    text = "\n".join(e.value.problems)
    assert "NO_SUCH_ID_VAR" in text and "NO_SUCH_SECRET_VAR" in text
    assert len(e.value.problems) == 2
    assert all(re.match(rf"{re.escape(str(tmp_path))}/c\.json:\d+: ", p) for p in e.value.problems)


def test_marketo_env_fills_absent_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETO_CLIENT_ID", "env-id")
    monkeypatch.setenv("MARKETO_CLIENT_SECRET", "env-secret")
    monkeypatch.setenv("MARKETO_INSTANCE", "999-ZZZ-999")
    creds = load_config(write_json(tmp_path, cfg(authentication={}))).credentials()
    assert (creds.client_id, str(creds.client_secret), creds.base_url) == (
        "env-id",
        "env-secret",
        "https://999-ZZZ-999.mktorest.com",
    )
    # Present in the config too: the environment still wins (flag > environment > file), the
    # instance included.
    creds = load_config(write_json(tmp_path, CONSOLE)).credentials()
    assert (creds.client_id, str(creds.client_secret), creds.base_url) == (
        "env-id",
        "env-secret",
        "https://999-ZZZ-999.mktorest.com",
    )


def test_the_environment_beats_literal_values_and_spares_unset_refs(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETO_CLIENT_SECRET", "env-secret")
    c = load_config(write_json(tmp_path, cfg(authentication={
        "client_id": "file-id", "client_secret": "${NOT_SET_ANYWHERE}", "instance": "111-AAA-222"})))  # fmt: skip
    creds = c.credentials()  # the unset ${VAR} does not matter: MARKETO_CLIENT_SECRET overrides it
    assert (creds.client_id, str(creds.client_secret)) == ("file-id", "env-secret")
    assert c.identity()["client_id"] == "file-id"
    monkeypatch.setenv("MARKETO_CLIENT_ID", "env-id")
    monkeypatch.setenv("MARKETO_INSTANCE", "999-ZZZ-999")
    assert c.credentials().client_id == "env-id" and c.identity()["client_id"] == "env-id"
    assert c.credentials().base_url == "https://999-ZZZ-999.mktorest.com"
    assert c.identity()["instance"] == "999-ZZZ-999"


def test_marketo_env_fills_credentials_that_are_null_or_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETO_CLIENT_SECRET", "env-secret")
    monkeypatch.setenv("MARKETO_CLIENT_ID", "env-id")
    c = load_config(
        write_json(
            tmp_path, cfg(authentication={"client_id": "", "client_secret": None, "instance": "111-AAA-222"})
        )
    )
    creds = c.credentials()
    assert (creds.client_id, str(creds.client_secret)) == ("env-id", "env-secret")


def test_variable_set_to_empty_falls_back_or_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("EMPTY_ID", "")
    c = load_config(
        write_json(
            tmp_path,
            cfg(authentication={"client_id": "${EMPTY_ID}", "client_secret": "s", "instance": "111-AAA-222"}),
        )
    )
    with pytest.raises(ConfigError) as e:
        c.credentials()
    (problem,) = e.value.problems
    assert "client_id" in problem and "MARKETO_CLIENT_ID" in problem
    monkeypatch.setenv("MARKETO_CLIENT_ID", "from-env")
    assert c.credentials().client_id == "from-env"


def test_all_missing_credentials_are_reported_together(tmp_path):
    c = load_config(write_json(tmp_path, cfg(authentication=None)))
    with pytest.raises(ConfigError) as e:
        c.credentials()
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3
    for env in ("MARKETO_CLIENT_ID", "MARKETO_CLIENT_SECRET", "MARKETO_INSTANCE"):
        assert env in text


def test_bad_instance_from_env_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETO_INSTANCE", "http://marketo.example.com")
    c = load_config(write_json(tmp_path, cfg(authentication={"client_id": "a", "client_secret": "b"})))
    with pytest.raises(ConfigError, match="plain http"):
        c.credentials()


# ---------------------------------------------------------------------------------------------
# identifier and upsert


@pytest.mark.parametrize(
    ("value", "identifier", "lookup"),
    [
        ("email", "email", "email"),
        (["email"], "email", "email"),
        ("leadID", "leadID", "id"),
        (["leadID"], "leadID", "id"),
    ],
)
def test_user_identifier_as_string_or_one_item_list(tmp_path, value, identifier, lookup):
    c = load_config(write_json(tmp_path, cfg(properties={"user_identifier": value})))
    assert (c.identifier, c.lookup_field, c.action) == (identifier, lookup, "updateOnly")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["email", "leadID"], "must be one identifier"),
        ([], "must be one identifier"),
        ("leadId", "did you mean 'leadID'"),
        ("emial", "did you mean 'email'"),
        ("personID", "not supported"),
    ],
)
def test_bad_user_identifier(tmp_path, value, words):
    path = write_json(tmp_path, cfg(properties={"user_identifier": value}))
    (problem,) = problems(path)
    assert words in problem and "user_identifier" in problem
    assert problem.startswith(f"{path}:")


def test_upsert_with_lead_id_is_an_error(tmp_path):
    path = write_json(tmp_path, cfg(properties={"user_identifier": "leadID"}, upsert_mode=True))
    (problem,) = problems(path)
    assert "upsert_mode" in problem and "leadID" in problem
    line = int(problem.split(":")[1])
    assert '"upsert_mode"' in path.read_text().splitlines()[line - 1]


def test_upsert_flag_with_lead_id_is_an_error(tmp_path):
    c = load_config(write_json(tmp_path, cfg(properties={"user_identifier": "leadID"})))
    with pytest.raises(ConfigError, match="leadID"):
        c.with_upsert(True)
    assert c.with_upsert(False).upsert is False
    e = load_config(write_json(tmp_path, CONSOLE, name="e.json"))
    assert e.with_upsert(True).action == "createOrUpdate"
    assert e.action == "updateOnly"  # frozen: the override is a changed copy
    assert e.with_upsert(None) is e


def test_upsert_mode_must_be_boolean(tmp_path):
    (problem,) = problems(write_json(tmp_path, cfg(upsert_mode="yes")))
    assert "upsert_mode" in problem and "true or false" in problem


# ---------------------------------------------------------------------------------------------
# instance


@pytest.mark.parametrize(
    ("value", "base"),
    [
        ("https://123-ABC-456.mktorest.com/rest", "https://123-ABC-456.mktorest.com"),
        ("https://123-ABC-456.mktorest.com/rest/", "https://123-ABC-456.mktorest.com"),
        ("https://123-ABC-456.mktorest.com/rest/v1", "https://123-ABC-456.mktorest.com"),
        ("https://123-ABC-456.mktorest.com/identity", "https://123-ABC-456.mktorest.com"),
        ("https://123-ABC-456.mktorest.com", "https://123-ABC-456.mktorest.com"),
        ("https://123-ABC-456.mktorest.com/", "https://123-ABC-456.mktorest.com"),
        ("123-ABC-456.mktorest.com/rest", "https://123-abc-456.mktorest.com"),
        ("123-ABC-456", "https://123-ABC-456.mktorest.com"),
        ("  123-abc-456 ", "https://123-abc-456.mktorest.com"),
        ("http://127.0.0.1:8787/rest", "http://127.0.0.1:8787"),
        ("http://127.0.0.1", "http://127.0.0.1"),
        ("http://localhost:9000", "http://localhost:9000"),
        ("http://[::1]:8080/rest", "http://[::1]:8080"),
        ("https://marketo.internal:8443/rest", "https://marketo.internal:8443"),
    ],
)
def test_instance_forms(value, base):
    assert normalise_instance(value).lower() == base.lower()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("http://123-ABC-456.mktorest.com/rest", "plain http://"),
        ("http://10.0.0.1/rest", "plain http://"),
        ("http://localhost.evil.com", "plain http://"),
        ("http://127.0.0.1.nip.io", "plain http://"),
        ("ftp://123-ABC-456.mktorest.com", "not a Marketo REST endpoint"),
        ("https://123-ABC-456.mktorest.com/other/path", "unexpected path"),
        ("https://", "not a Marketo REST endpoint"),
    ],
)
def test_bad_instances(value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        normalise_instance(value)


def test_bad_instance_is_a_load_error_with_its_line(tmp_path):
    path = write_json(
        tmp_path,
        cfg(authentication={"client_id": "a", "client_secret": "b", "instance": "http://example.com/rest"}),
    )
    (problem,) = problems(path)
    line = int(problem.split(":")[1])
    assert "plain http://" in problem and '"instance"' in path.read_text().splitlines()[line - 1]


# ---------------------------------------------------------------------------------------------
# unknown keys, all errors at once, file:line


@pytest.mark.parametrize(
    ("overrides", "where", "hint"),
    [
        ({"upsert_mod": True}, "upsert_mod", "did you mean 'upsert_mode'"),
        ({"mapping": []}, "mapping", "did you mean 'mappings'"),
        (
            {"authentication": {**CONSOLE["authentication"], "client_secrt": "x"}},
            "authentication.client_secrt",
            "did you mean 'client_secret'",
        ),
        (
            {"properties": {"user_identifer": "email"}},
            "properties.user_identifer",
            "did you mean 'user_identifier'",
        ),
        (
            {"mappings": [{"id": "f", "value": "country", "transfrom": "text"}]},
            "mappings[0].transfrom",
            "did you mean 'transform'",
        ),
        ({"delivery": {"batchsize": 10}}, "delivery.batchsize", "did you mean 'batch_size'"),
    ],
)
def test_unknown_keys_are_errors_with_did_you_mean(tmp_path, overrides, where, hint):
    path = write_json(tmp_path, cfg(**overrides))
    (problem,) = problems(path)
    assert f": {where}: unknown key" in problem and hint in problem


BROKEN = {
    "type_id": "hubspot",
    "authentication": {"client_id": 5, "client_secret": "s", "instance": "http://example.com", "extra": 1},
    "properties": {"user_identifier": "leadId", "regulations": []},
    "mappings": [
        {"id": "a", "value": "consents_purpose_newsletter_enabled"},
        {"id": "a", "value": "country", "transform": "yesno"},
        {"id": "email", "value": "country"},
        {"id": "b"},
        "not-an-object",
    ],
    "upsert_mod": True,
    "delivery": {"batch_size": 1000, "timeout": -1},
    "state": 7,
}
BROKEN_YAML = """\
type_id: hubspot
authentication:
  client_id: 5
  client_secret: s
  instance: http://example.com
  extra: 1
properties:
  user_identifier: leadId
  regulations: []
mappings:
  - id: a
    value: consents_purpose_newsletter_enabled
  - id: a
    value: country
    transform: yesno
  - id: email
    value: country
  - id: b
  - not-an-object
upsert_mod: true
delivery:
  batch_size: 1000
  timeout: -1
state: 7
"""
EXPECTED = [
    ("type_id", "'hubspot' is not a Marketo integration"),
    ("authentication.client_id", "must be a string"),
    ("authentication.instance", "plain http://"),
    ("authentication.extra", "unknown key"),
    ("properties.user_identifier", "did you mean 'leadID'"),
    ("properties.regulations", "non-empty list"),
    ("mappings[0].value", "did you mean 'consents_purposes_newsletter_enabled'"),
    ("mappings[1].id", "already mapped by mappings[0]"),
    ("mappings[1].transform", "did you mean 'yes_no'"),
    ("mappings[2].id", "lookup field"),
    ("mappings[3].value", "is required"),
    ("mappings[4]", "must be an object"),
    ("upsert_mod", "did you mean 'upsert_mode'"),
    ("delivery.batch_size", "between 1 and 300"),
    ("delivery.timeout", "positive number"),
    ("state", "file path"),
]


def key_token(where: str) -> str:
    """What must be on the reported line: the last key (or the list item's dash)."""
    last = re.split(r"[.\[]", where)[-1].rstrip("]")
    return last


@pytest.mark.parametrize("form", ["json", "json-tabs", "yaml"])
def test_all_errors_are_reported_at_once_each_with_file_and_line(tmp_path, form):
    if form == "yaml":
        path = write_text(tmp_path, BROKEN_YAML)
    else:
        path = write_json(tmp_path, BROKEN, indent="\t" if form == "json-tabs" else 2)
    got = problems(path)
    lines = path.read_text().splitlines()
    assert len(got) == len(EXPECTED), "\n".join(got)
    for where, words in EXPECTED:
        (match,) = [p for p in got if f": {where}: " in p]
        assert words in match, match
        m = re.match(rf"{re.escape(str(path))}:(\d+): ", match)
        assert m, f"no file:line in {match!r}"
        line = lines[int(m.group(1)) - 1]
        token = key_token(where)
        if token.isdigit():  # a list item: the line of the item
            assert "not-an-object" in line
        elif where == "mappings[3].value":  # an absent key: the line where its mapping starts
            assert line.strip() in ("{", "- id: b")
        else:
            assert token in line, (match, line)


def test_invalid_json_is_reported_with_its_line(tmp_path):
    path = write_text(tmp_path, '{\n  "type_id": "marketo",\n  "mappings": [,]\n}\n', "c.json")
    (problem,) = problems(path)
    assert problem.startswith(f"{path}:3: invalid JSON")


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    path = write_text(tmp_path, "type_id: marketo\nmappings:\n  - id: a\n   value: [unclosed\n")
    (problem,) = problems(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML", problem)


@pytest.mark.parametrize("text", ["[]", "- a\n- b\n", "just text\n", "42\n"])
def test_config_must_be_an_object(tmp_path, text):
    (problem,) = problems(write_text(tmp_path, text))
    assert "must be an object" in problem


@pytest.mark.parametrize("mappings", [None, [], {"id": "x"}])
def test_mappings_must_be_a_non_empty_list(tmp_path, mappings):
    (problem,) = problems(write_json(tmp_path, cfg(mappings=mappings)))
    assert "mappings" in problem and "non-empty list" in problem


def test_missing_config_file(tmp_path):
    (problem,) = problems(tmp_path / "nope.json")
    assert "cannot read config" in problem


def test_const_only_mapping_needs_no_value(tmp_path):
    c = load_config(
        write_json(
            tmp_path,
            cfg(
                mappings=[
                    {"id": "src", "transform": {"const": "Didomi"}},
                    {"id": "n", "value": "consents_purposes_n_enabled"},
                ]
            ),
        )
    )
    assert c.mappings[0].source is None and c.mappings[0].render(None) == "Didomi"


def test_delivery_settings(tmp_path):
    c = load_config(
        write_json(tmp_path, cfg(delivery={"batch_size": 100, "max_concurrency": 2, "timeout": 5.5}))
    )
    assert (c.delivery.batch_size, c.delivery.max_concurrency, c.delivery.timeout) == (100, 2, 5.5)
    assert c.delivery.max_calls_per_20s == 100  # default


# ---------------------------------------------------------------------------------------------
# secrets


def test_secret_never_shows_in_repr():
    s = Secret("hunter2-value")
    assert str(s) == "hunter2-value"  # usable as the real value
    assert "hunter2" not in repr(s)
    assert "hunter2" not in repr([s]) and "hunter2" not in repr({"k": s})
    assert "hunter2" not in f"{s!r}" and "hunter2" not in str((s,))
    creds = Credentials("id", s, "https://x.mktorest.com")
    assert "hunter2" not in repr(creds)


def test_config_repr_and_identity_have_no_secret(tmp_path, monkeypatch):
    secret = "csecret-DO-NOT-LEAK"
    c = load_config(
        write_json(tmp_path, cfg(authentication={**CONSOLE["authentication"], "client_secret": secret}))
    )
    assert secret not in repr(c)
    ident = c.identity()
    dumped = json.dumps(ident)
    assert secret not in dumped
    assert ident["client_id"] == "cid" and ident["instance"] == CONSOLE["authentication"]["instance"]
    assert ident["lookupField"] == "email" and ident["action"] == "updateOnly"
    assert ident["mappings"][0] == {
        "id": "didomiNewsletterOptIn",
        "value": "consents_purposes_newsletter_enabled",
    }
    assert secret not in repr(c.credentials())


def test_identity_of_an_env_secret_has_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKETO_CLIENT_SECRET", "env-secret-DO-NOT-LEAK")
    monkeypatch.setenv("MARKETO_CLIENT_ID", "env-id")
    c = load_config(write_json(tmp_path, cfg(authentication={"instance": "111-AAA-222"})))
    assert "DO-NOT-LEAK" not in json.dumps(c.identity())
    assert c.identity()["client_id"] == "env-id"
