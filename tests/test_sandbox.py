"""The Marketo sandbox over real sockets: auth, limits, Sync Leads rules, faults, stats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import orjson
import pytest

from didomi_marketo.sandbox import MarketoSandbox

LEADS = "/rest/v1/leads.json"


# ---- helpers ---------------------------------------------------------------------------------


def raw_get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, verify=False, **kwargs)  # plain http: skip loading CA certificates


def raw_post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, verify=False, **kwargs)


def token_response(sb: MarketoSandbox, **overrides: str) -> httpx.Response:
    params = {
        "grant_type": "client_credentials",
        "client_id": sb.config.client_id,
        "client_secret": sb.config.client_secret,
        **overrides,
    }
    return raw_get(sb.base_url + "/identity/oauth/token", params=params)


def api(sb: MarketoSandbox) -> httpx.Client:
    """A keep-alive client with a valid bearer token."""
    token = token_response(sb).json()["access_token"]
    return httpx.Client(verify=False, base_url=sb.base_url, headers={"Authorization": f"Bearer {token}"})


def sync(client: httpx.Client, input_: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    resp = client.post(LEADS, json={"input": input_, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def error_code(doc: dict[str, Any]) -> str:
    assert doc["success"] is False, doc
    assert "result" not in doc
    (err,) = doc["errors"]
    return str(err["code"])


def reasons(result: dict[str, Any]) -> tuple[str, str]:
    assert result["status"] == "skipped", result
    assert "id" not in result
    (reason,) = result["reasons"]
    return reason["code"], reason["message"]


def run_parallel(n: int, fn: Any) -> list[Any]:
    """Run fn(i) in n threads released together; return results in index order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # surfaced by the caller's asserts
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    return out


# ---- identity and auth -----------------------------------------------------------------------


def test_identity_rejects_bad_credentials(sandbox):
    for overrides in ({"client_secret": "nope"}, {"client_id": "nope"}, {"client_id": ""}):
        resp = token_response(sandbox, **overrides)
        assert resp.status_code == 401
        assert resp.json() == {
            "error": "invalid_client",
            "error_description": "Bad client credentials",
        }
    assert sandbox.stats()["tokens_issued"] == 0


def test_identity_returns_same_token_with_remaining_lifetime(sandbox_factory):
    sb = sandbox_factory(token_ttl=30)
    first = token_response(sb).json()
    assert first["expires_in"] == 29
    time.sleep(1.05)
    # also via POST with a form body, as some clients send it
    resp = raw_post(
        sb.base_url + "/identity/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": sb.config.client_id,
            "client_secret": sb.config.client_secret,
        },
    )
    second = resp.json()
    assert resp.headers["cache-control"] == "no-store"
    assert second["access_token"] == first["access_token"]
    assert second["expires_in"] < first["expires_in"]
    assert sb.stats()["tokens_issued"] == 1


def test_identity_expires_in_counts_down_to_zero(sandbox_factory):
    sb = sandbox_factory(token_ttl=1.0)
    first = token_response(sb).json()
    assert first["expires_in"] == 1  # a fresh token never reads 0
    second = token_response(sb).json()
    assert (second["access_token"], second["expires_in"]) == (first["access_token"], 0)


def test_identity_requires_client_credentials_grant(sandbox):
    assert token_response(sandbox, grant_type="password").status_code == 400


def test_rest_auth_errors_600_601_602(sandbox_factory):
    sb = sandbox_factory(token_ttl=1.0)
    describe = sb.base_url + "/rest/v1/leads/describe.json"
    assert error_code(raw_get(describe).json()) == "600"
    bogus = {"Authorization": "Bearer 00000000-0000-0000-0000-000000000000:sb"}
    assert error_code(raw_get(describe, headers=bogus).json()) == "601"
    token = token_response(sb).json()["access_token"]
    assert raw_get(describe, headers={"Authorization": f"Bearer {token}"}).json()["success"]
    # the deprecated query parameter still works
    assert raw_get(describe, params={"access_token": token}).json()["success"]
    sb.expire_tokens()  # as if its hour had passed, without waiting for it
    expired = raw_get(describe, headers={"Authorization": f"Bearer {token}"}).json()
    assert error_code(expired) == "602"
    assert expired["errors"][0]["message"] == "Access token expired"
    fresh = token_response(sb).json()
    assert fresh["access_token"] != token
    assert raw_get(describe, params={"access_token": fresh["access_token"]}).json()["success"]
    stats = sb.stats()
    assert stats["tokens_issued"] == 2
    assert stats["auth_errors"] == 3
    assert stats["quota_used"] == 3  # auth failures are not counted


def test_expire_tokens_forces_602(sandbox):
    with api(sandbox) as client:
        sandbox.expire_tokens()
        assert error_code(client.get("/rest/v1/leads/describe.json").json()) == "602"


# ---- limits ----------------------------------------------------------------------------------


def test_rate_limit_606_sliding_window(sandbox_factory):
    # A 3 s window: six calls fit in it even on a host busy enough to slow each one down.
    sb = sandbox_factory(rate_calls=5, rate_window=3.0)
    with api(sb) as client:
        start = time.monotonic()
        for _ in range(5):
            assert client.get("/rest/v1/leads/describe.json").json()["success"]
        doc = client.get("/rest/v1/leads/describe.json").json()
        assert time.monotonic() - start < 3.0
        assert error_code(doc) == "606"
        assert doc["errors"][0]["message"] == "Max rate limit '5' exceeded with in '3' secs"
        time.sleep(max(0.0, 3.05 - (time.monotonic() - start)))
        assert client.get("/rest/v1/leads/describe.json").json()["success"]
    stats = sb.stats()
    assert stats["rate_limited"] == 1
    assert stats["quota_used"] == 6  # the rejected call is not counted


def test_concurrency_limit_615(sandbox_factory):
    sb = sandbox_factory(latency=0.4, max_concurrency=2)
    token = token_response(sb).json()["access_token"]

    def call(_: int) -> dict[str, Any]:
        return raw_get(
            sb.base_url + "/rest/v1/leads/describe.json",
            headers={"Authorization": f"Bearer {token}"},
        ).json()

    docs = run_parallel(4, call)
    ok = [d for d in docs if d["success"]]
    rejected = [d for d in docs if not d["success"]]
    assert len(ok) == 2
    assert [error_code(d) for d in rejected] == ["615", "615"]
    assert rejected[0]["errors"][0]["message"] == "Concurrent access limit '2' reached"
    stats = sb.stats()
    assert stats["max_in_flight_seen"] == 2
    assert stats["concurrency_limited"] == 2
    assert stats["in_flight"] == 0


def test_keep_alive_clients_at_the_concurrency_limit(sandbox_factory):
    """10 keep-alive clients calling back to back never trip 615 (in flight ends before reply)."""
    sb = sandbox_factory(latency=0.2)
    token = token_response(sb).json()["access_token"]
    connections_before = sb.stats()["connections_total"]

    def worker(i: int) -> list[bool]:
        with httpx.Client(base_url=sb.base_url, headers={"Authorization": f"Bearer {token}"}) as client:
            return [sync(client, [{"email": f"u{i}-{j}@example.com"}])["success"] for j in range(3)]

    results = run_parallel(10, worker)
    assert results == [[True, True, True]] * 10
    stats = sb.stats()
    assert stats["max_in_flight_seen"] == 10  # they did run in parallel (no wall-clock assertion)
    assert stats["concurrency_limited"] == 0
    assert stats["connections_total"] - connections_before == 10  # connections were reused
    assert len(sb.leads()) == 30


def test_daily_quota_607_and_reset(sandbox_factory):
    sb = sandbox_factory(daily_quota=3)
    with api(sb) as client:
        for _ in range(3):
            assert client.get("/rest/v1/leads/describe.json").json()["success"]
        doc = client.get("/rest/v1/leads/describe.json").json()
        assert error_code(doc) == "607"
        assert sync(client, [{"email": "a@example.com"}])["errors"][0]["code"] == "607"
        assert sb.leads() == []
        assert raw_post(sb.base_url + "/_sandbox/reset-quota").status_code == 200
        assert client.get("/rest/v1/leads/describe.json").json()["success"]
    assert sb.stats()["quota_exceeded"] == 2


def test_usage_counts_accepted_calls_only(sandbox_factory):
    sb = sandbox_factory()
    with api(sb) as client:  # identity calls are not counted
        client.get("/rest/v1/leads/describe.json")
        sync(client, [{"email": "a@example.com"}])
        raw_get(sb.base_url + "/rest/v1/leads/describe.json")  # 600: not counted
        client.get("/rest/v1/nope.json")  # 610: not counted
        doc = client.get("/rest/v1/stats/usage.json").json()
    (day,) = doc["result"]
    assert day["total"] == 3  # describe, sync, and this usage call
    assert day["users"] == [{"userId": "apiuser@sandbox.local", "count": 3}]
    assert len(day["date"]) == 10
    assert sb.stats()["calls_total"] == 5


# ---- request-level errors ----------------------------------------------------------------------


def test_body_over_1mb_is_http_413(sandbox):
    big = [{"email": f"u{i}@example.com", "address": "x" * 4000} for i in range(270)]
    body = orjson.dumps({"input": big})
    assert len(body) > 1_048_576
    with api(sandbox) as client:
        resp = client.post(LEADS, content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 413
        # a body just under the limit is accepted
        assert sync(client, big[:200])["success"] is True
    assert sandbox.stats()["sync_batch_sizes"] == [200]


def test_wrong_content_type_612_and_bad_json_609(sandbox):
    with api(sandbox) as client:
        body = b'{"input":[{"email":"a@example.com"}]}'
        resp = client.post(LEADS, content=body, headers={"Content-Type": "text/plain"})
        assert error_code(resp.json()) == "612"
        resp = client.post(LEADS, content=body)  # no content type at all
        assert error_code(resp.json()) == "612"
        resp = client.post(LEADS, content=b'{"input":[', headers={"Content-Type": "application/json"})
        assert error_code(resp.json()) == "609"
        ok = client.post(LEADS, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert ok.json()["success"] is True
    assert sandbox.stats()["sync_calls"] == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"input": [{"email": f"u{i}@example.com"} for i in range(301)]}, "1003"),
        ({"input": []}, "1003"),
        ({"action": "createOrUpdate"}, "1003"),
        ({"input": [{"email": "a@example.com"}], "action": "upsert"}, "1003"),
        ({"input": [{"email": "a@example.com"}], "lookupField": "userId"}, "1006"),
    ],
    ids=["301-records", "empty-input", "no-input", "bad-action", "unknown-lookup"],
)
def test_request_level_errors(sandbox, body, code):
    with api(sandbox) as client:
        doc = client.post(LEADS, json=body).json()
    assert error_code(doc) == code
    assert sandbox.stats()["sync_calls"] == 0
    assert sandbox.leads() == []


def test_300_records_is_the_maximum_accepted(sandbox):
    with api(sandbox) as client:
        doc = sync(client, [{"email": f"u{i}@example.com"} for i in range(300)])
    assert [r["status"] for r in doc["result"]] == ["created"] * 300
    assert [r["id"] for r in doc["result"]] == list(range(1, 301))


def test_unknown_path_610_and_wrong_method_605(sandbox):
    with api(sandbox) as client:
        assert error_code(client.get("/rest/v1/leadz.json").json()) == "610"
        assert error_code(client.post("/rest/v1/leads/describe.json").json()) == "605"
        assert error_code(client.put(LEADS, json={"input": []}).json()) == "605"


# ---- per-record results ------------------------------------------------------------------------

TYPE_CASES = [
    # (field, value, accepted, stored)
    ("boolean_field", True, True, True),
    ("boolean_field", "FALSE", True, False),
    ("boolean_field", "other", False, None),
    ("boolean_field", 1, False, None),
    ("integer_field", 5, True, 5),
    ("integer_field", "7", True, 7),
    ("integer_field", 14.1, False, None),
    ("integer_field", True, False, None),
    ("percent_field", 99, True, 99),
    ("percent_field", "100%", False, None),
    ("score_field", 10, True, 10),
    ("float_field", 5.4, True, 5.4),
    ("float_field", 5, True, 5.0),
    ("float_field", "14c", False, None),
    ("currency_field", 34.66, True, 34.66),
    ("currency_field", "1e3", True, 1000.0),
    ("email_field", "valid@example.com", True, "valid@example.com"),
    ("email_field", "bademail", False, None),
    ("email_field", "a@b", False, None),
    ("datetime_field", "2020-08-30T05:49:48.000Z", True, "2020-08-30T05:49:48Z"),
    ("datetime_field", "2020-08-30T07:49:48+02:00", True, "2020-08-30T05:49:48Z"),
    ("datetime_field", "yesterday", False, None),
    ("date_field", "2020-08-30", True, "2020-08-30"),
    ("date_field", "2020-13-01", False, None),
    ("date_field", "30/08/2020", False, None),
    ("didomiTopics", "x" * 255, True, "x" * 255),
    ("didomiTopics", "x" * 256, False, None),
    ("sicCode", "1" * 41, False, None),
    ("didomiNewsletterOptIn", "true", True, True),
    ("didomiTopics", ["a", "b"], False, None),
]


def test_type_validation_per_record(sandbox):
    input_ = [{"email": f"t{i}@example.com", f: v} for i, (f, v, _, _) in enumerate(TYPE_CASES)]
    with api(sandbox) as client:
        doc = sync(client, input_)
    assert doc["success"] is True
    assert len(doc["result"]) == len(TYPE_CASES)
    for i, ((field, value, accepted, stored), result) in enumerate(
        zip(TYPE_CASES, doc["result"], strict=True)
    ):
        lead = sandbox.lead_by_email(f"t{i}@example.com")
        if accepted:
            assert result["status"] == "created", (field, value, result)
            assert lead is not None
            assert lead[field] == stored, (field, value)
            assert type(lead[field]) is type(stored)
        else:
            code, message = reasons(result)
            assert code == "1003", (field, value)
            shown = value if isinstance(value, str) else json.dumps(value).replace(", ", ",")
            assert message == f"Invalid value for field '{field}' and value '{shown}'"
            assert lead is None


def test_skip_codes_1004_1005_1006_1007_read_only_and_lookup(sandbox):
    sandbox.seed_leads(
        [
            {"email": "one@example.com", "firstName": "One"},
            {"email": "dup@example.com", "firstName": "First"},
            {"email": "DUP@example.com", "firstName": "Second"},
        ]
    )
    with api(sandbox) as client:
        update_only = sync(
            client,
            [{"email": "missing@example.com"}, {"email": "dup@example.com", "firstName": "X"}],
            action="updateOnly",
        )["result"]
        create_only = sync(
            client,
            [{"email": "ONE@example.com"}, {"email": "new@example.com"}],
            action="createOnly",
        )["result"]
        upsert = sync(
            client,
            [
                {"email": "a@example.com", "notAField": 1},
                {"email": "b@example.com", "didomiReadOnlyFlag": True},
                {"email": "c@example.com", "createdAt": "2020-01-01T00:00:00Z"},
                {"firstName": "no email"},
                {"email": None, "firstName": "null email"},
                {"email": "Dup@Example.com", "firstName": "Y"},
                {"email": "one@example.com", "firstName": "Uno"},
            ],
        )["result"]
        by_id = sync(client, [{"id": 1, "firstName": "Z"}], lookupField="id")["result"]
        by_id_create = sync(client, [{"id": 1, "firstName": "Z"}], lookupField="id", action="createOnly")[
            "result"
        ]

    assert reasons(update_only[0]) == ("1004", "Lead not found")
    assert reasons(update_only[1]) == ("1007", "Multiple lead match lookup criteria")
    assert reasons(create_only[0]) == ("1005", "Lead already exists")
    assert create_only[1] == {"id": 4, "status": "created"}
    assert reasons(upsert[0]) == ("1006", "Field 'notAField' not found")
    assert reasons(upsert[1]) == ("1003", "Field 'didomiReadOnlyFlag' is read only")
    assert reasons(upsert[2]) == ("1003", "Field 'createdAt' is read only")
    assert reasons(upsert[3])[0] == "1003"
    assert reasons(upsert[4])[0] == "1003"
    assert reasons(upsert[5])[0] == "1007"
    assert upsert[6] == {"id": 1, "status": "updated"}
    assert reasons(by_id[0]) == ("1003", "Invalid data")  # id needs updateOnly
    assert reasons(by_id_create[0]) == ("1003", "Invalid data")

    names = {lead.get("firstName") for lead in sandbox.leads()}
    assert names == {"Uno", "First", "Second", None}
    assert {lead["email"] for lead in sandbox.leads()} == {
        "one@example.com",
        "dup@example.com",
        "DUP@example.com",
        "new@example.com",
    }


def test_actions_and_matching(sandbox):
    with api(sandbox) as client:
        created = sync(client, [{"email": "Mixed@Example.com", "firstName": "A"}])["result"]
        assert created == [{"id": 1, "status": "created"}]
        updated = sync(client, [{"email": "mixed@example.COM", "lastName": "B"}])["result"]
        assert updated == [{"id": 1, "status": "updated"}]
        dup = sync(client, [{"email": "mixed@example.com"}], action="createDuplicate")["result"]
        assert dup == [{"id": 2, "status": "created"}]
        # the same key twice in one batch: created, then updated
        twice = sync(client, [{"email": "t@example.com"}, {"email": "T@example.com"}])["result"]
        assert twice == [{"id": 3, "status": "created"}, {"id": 3, "status": "updated"}]
        by_id = sync(
            client,
            [{"id": 1, "email": "renamed@example.com"}, {"id": 99}],
            lookupField="id",
            action="updateOnly",
        )["result"]
        assert by_id[0] == {"id": 1, "status": "updated"}
        assert reasons(by_id[1])[0] == "1004"
        by_custom = sync(
            client,
            [{"didomiCountry": "FR", "firstName": "Fr"}],
            lookupField="didomiCountry",
        )["result"]
        assert by_custom == [{"id": 4, "status": "created"}]
        again = sync(client, [{"didomiCountry": "FR", "lastName": "L"}], lookupField="didomiCountry")
        assert again["result"] == [{"id": 4, "status": "updated"}]
        # an id inside a record is never written when it is not the lookup field
        with_id = sync(client, [{"email": "five@example.com", "id": 777}])["result"]
        assert with_id == [{"id": 5, "status": "created"}]
    lead = sandbox.lead_by_email("RENAMED@example.com")
    assert lead is not None
    assert (lead["id"], lead["firstName"], lead["lastName"]) == (1, "A", "B")
    assert lead["createdAt"].endswith("Z") and lead["updatedAt"] >= lead["createdAt"]
    assert sandbox.lead_by_email("mixed@example.com")["id"] == 2
    assert sandbox.lead_by_email("nobody@example.com") is None


def test_null_and_empty_string_clear_fields(sandbox):
    with api(sandbox) as client:
        sync(
            client,
            [{"email": "n@example.com", "firstName": "A", "didomiTopics": "x", "leadScore": 4}],
        )
        doc = sync(client, [{"email": "n@example.com", "firstName": None, "didomiTopics": "", "x": None}])
        assert reasons(doc["result"][0])[0] == "1006"  # unknown field even when null
        doc = sync(client, [{"email": "n@example.com", "firstName": None, "didomiTopics": ""}])
        assert doc["result"] == [{"id": 1, "status": "updated"}]
        got = client.get(
            LEADS,
            params={
                "filterType": "email",
                "filterValues": "n@example.com",
                "fields": "firstName,didomiTopics,leadScore",
            },
        ).json()
    assert got["result"] == [{"id": 1, "firstName": None, "didomiTopics": None, "leadScore": 4}]


def test_delete_leads_via_method_override(sandbox):
    sandbox.seed_leads([{"email": "a@example.com"}, {"email": "b@example.com"}])
    with api(sandbox) as client:
        doc = client.post(LEADS, params={"_method": "DELETE"}, json={"input": [{"id": 1}, {"id": 7}]}).json()
    assert doc["result"][0] == {"id": 1, "status": "deleted"}
    assert reasons(doc["result"][1])[0] == "1004"
    assert [lead["id"] for lead in sandbox.leads()] == [2]
    assert sandbox.lead_by_email("a@example.com") is None
    stats = sandbox.stats()
    assert (stats["sync_calls"], stats["delete_calls"]) == (0, 1)


# ---- reads -------------------------------------------------------------------------------------


def test_get_leads_by_filter(sandbox):
    sandbox.seed_leads(
        [
            {"email": "a@example.com", "firstName": "A", "didomiCountry": "FR"},
            {"email": "B@example.com", "firstName": "B", "didomiCountry": "DE"},
            {"email": "c@example.com", "firstName": "C", "didomiCountry": "FR"},
        ]
    )
    with api(sandbox) as client:

        def get(**params: str) -> dict[str, Any]:
            return client.get(LEADS, params=params).json()

        doc = get(filterType="email", filterValues="A@example.com,b@example.com,zz@example.com")
        assert [r["id"] for r in doc["result"]] == [1, 2]
        assert set(doc["result"][0]) == {
            "id",
            "email",
            "updatedAt",
            "createdAt",
            "firstName",
            "lastName",
        }
        assert doc["result"][1]["lastName"] is None
        doc = get(filterType="didomiCountry", filterValues="FR", fields="email,didomiCountry")
        assert doc["result"] == [
            {"id": 1, "email": "a@example.com", "didomiCountry": "FR"},
            {"id": 3, "email": "c@example.com", "didomiCountry": "FR"},
        ]
        assert get(filterType="id", filterValues="3,9", fields="firstName")["result"] == [
            {"id": 3, "firstName": "C"}
        ]
        page1 = get(filterType="didomiCountry", filterValues="FR,DE", batchSize="2")
        assert [r["id"] for r in page1["result"]] == [1, 2]
        page2 = get(
            filterType="didomiCountry",
            filterValues="FR,DE",
            batchSize="2",
            nextPageToken=page1["nextPageToken"],
        )
        assert [r["id"] for r in page2["result"]] == [3]
        assert "nextPageToken" not in page2
        assert get(filterType="email", filterValues="none@example.com")["result"] == []
        assert error_code(get(filterType="email", filterValues="a@example.com", fields="zz")) == ("1006")
        assert error_code(get(filterValues="a@example.com")) == "1003"


def test_describe2_shape(sandbox):
    with api(sandbox) as client:
        doc = client.get("/rest/v1/leads/describe2.json").json()
        describe = client.get("/rest/v1/leads/describe.json").json()["result"]
    assert doc["success"] is True
    (entry,) = doc["result"]
    assert entry["name"] == "API Lead"
    assert entry["searchableFields"] == [["email"], ["id"]]
    fields = {f["name"]: f for f in entry["fields"]}
    assert list(fields) == [f["rest"]["name"] for f in describe]
    for f in entry["fields"]:
        assert set(f) - {"length"} == {
            "name",
            "displayName",
            "dataType",
            "updateable",
            "crmManaged",
        }
        assert f["crmManaged"] is False
    assert fields["createdAt"]["updateable"] is False
    assert fields["didomiReadOnlyFlag"]["updateable"] is False
    assert fields["email"] == {
        "name": "email",
        "displayName": "Email Address",
        "dataType": "email",
        "length": 255,
        "updateable": True,
        "crmManaged": False,
    }


# ---- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["604", "608", "611", "601", "602", "606", "615", "607", "713"])
def test_fault_code_is_not_applied(sandbox, code):
    sandbox.inject(f"code:{code}")
    with api(sandbox) as client:
        doc = client.post(LEADS, json={"input": [{"email": "a@example.com"}]}).json()
        assert error_code(doc) == code
        assert sandbox.leads() == []
        assert sync(client, [{"email": "a@example.com"}])["result"][0]["status"] == "created"
    stats = sandbox.stats()
    assert stats["faults_injected"] == 1
    assert stats["sync_batch_sizes"] == [1]


@pytest.mark.parametrize("status", [500, 502, 503, 413])
def test_fault_http_status_is_not_applied(sandbox, status):
    sandbox.inject(f"http:{status}")
    with api(sandbox) as client:
        resp = client.post(LEADS, json={"input": [{"email": "a@example.com"}]})
        assert resp.status_code == status
        assert resp.headers["content-type"].startswith("text/html")
    assert sandbox.leads() == []
    assert sandbox.stats()["sync_calls"] == 0


@pytest.mark.parametrize(("kind", "applied"), [("drop", False), ("drop_after_apply", True)])
def test_fault_drop_closes_the_connection(sandbox, kind, applied):
    sandbox.inject(kind)
    with api(sandbox) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post(LEADS, json={"input": [{"email": "a@example.com"}]})
        assert (sandbox.lead_by_email("a@example.com") is not None) is applied
        # the client recovers on a new connection
        again = sync(client, [{"email": "a@example.com"}])["result"][0]
        assert again["status"] == ("updated" if applied else "created")


def test_fault_http500_after_apply(sandbox):
    sandbox.inject("http500_after_apply")
    with api(sandbox) as client:
        resp = client.post(LEADS, json={"input": [{"email": "a@example.com"}]})
    assert resp.status_code == 500
    assert sandbox.lead_by_email("a@example.com") is not None
    assert sandbox.stats()["sync_batch_sizes"] == [1]


def test_fault_garbage(sandbox):
    sandbox.inject("garbage")
    with api(sandbox) as client:
        resp = client.post(LEADS, json={"input": [{"email": "a@example.com"}]})
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)
    assert sandbox.leads() == []


def test_fault_short_result(sandbox):
    sandbox.inject("short_result")
    input_ = [{"email": f"u{i}@example.com"} for i in range(3)]
    with api(sandbox) as client:
        doc = sync(client, input_)
    assert doc["success"] is True
    assert [r["status"] for r in doc["result"]] == ["created", "created"]
    assert sandbox.leads() == []
    assert sandbox.stats()["sync_calls"] == 0


def test_fault_slow_then_normal(sandbox):
    sandbox.inject("slow:1")  # a second: far above one call's time, even on a busy host
    with api(sandbox) as client:
        start = time.monotonic()
        doc = sync(client, [{"email": "a@example.com"}])
        assert time.monotonic() - start >= 1
        assert doc["result"][0]["status"] == "created"
        start = time.monotonic()
        sync(client, [{"email": "b@example.com"}])
        assert time.monotonic() - start < 1


def test_faults_are_queued_in_order_and_only_hit_their_path(sandbox):
    sandbox.inject("code:604", times=2)
    sandbox.inject("http:502")
    sandbox.inject("code:611", path="/rest/v1/leads/describe.json")
    assert sandbox.stats()["faults_pending"] == 4
    with api(sandbox) as client:
        # reads of leads.json are not sync calls: the sync faults wait
        assert client.get(LEADS, params={"filterType": "id", "filterValues": "1"}).json()["success"]
        assert error_code(client.get("/rest/v1/leads/describe.json").json()) == "611"
        assert client.get("/rest/v1/leads/describe.json").json()["success"]
        outcomes = []
        for _ in range(4):
            resp = client.post(LEADS, json={"input": [{"email": "a@example.com"}]})
            outcomes.append(resp.status_code if resp.status_code != 200 else resp.json())
    assert error_code(outcomes[0]) == error_code(outcomes[1]) == "604"
    assert outcomes[2] == 502
    assert outcomes[3]["success"] is True
    assert sandbox.stats()["faults_injected"] == 4


def test_fault_rate_is_seeded(sandbox_factory):
    def run(seed: int) -> list[bool]:
        sb = sandbox_factory(seed=seed)
        sb.inject_rate("code:608", 0.5)
        with api(sb) as client:
            return [
                client.post(LEADS, json={"input": [{"email": f"u{i}@example.com"}]}).json()["success"]
                for i in range(20)
            ]

    first, second = run(7), run(7)
    assert first == second
    assert 0 < first.count(False) < 20


def test_inject_validates_kinds_and_admin_endpoint(sandbox):
    with pytest.raises(ValueError):
        sandbox.inject("explode")
    with pytest.raises(ValueError):
        sandbox.inject_rate("drop", 1.5)
    admin = sandbox.base_url + "/_sandbox/faults"
    assert raw_post(admin, json={"kind": "explode"}).status_code == 400
    assert raw_post(admin, json={"kind": "code:604", "times": 2}).status_code == 200
    assert raw_post(admin, json={"kind": "drop", "probability": 1.0}).status_code == 200
    with api(sandbox) as client:
        for _ in range(2):
            assert error_code(client.post(LEADS, json={"input": [{"email": "a@x.io"}]}).json())
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post(LEADS, json={"input": [{"email": "a@x.io"}]})
    stats = raw_get(sandbox.base_url + "/_sandbox/stats").json()
    assert stats["faults_injected"] == 3
    assert stats["calls_total"] == 3  # admin calls are not REST calls


# ---- stats and admin ---------------------------------------------------------------------------


def test_same_key_overlaps(sandbox_factory):
    sb = sandbox_factory(latency=0.4)
    token = token_response(sb).json()["access_token"]

    def post(emails: list[str]) -> dict[str, Any]:
        return raw_post(
            sb.base_url + LEADS,
            json={"input": [{"email": e} for e in emails]},
            headers={"Authorization": f"Bearer {token}"},
        ).json()

    batches = [["a@example.com", "b@example.com"], ["c@example.com", "B@EXAMPLE.COM"]]
    run_parallel(2, lambda i: post(batches[i]))
    assert sb.stats()["same_key_overlaps"] == 1
    # disjoint keys in flight together do not count
    run_parallel(2, lambda i: post([f"x{i}@example.com"]))
    assert sb.stats()["same_key_overlaps"] == 1
    # nor do the same keys sent one after the other
    post(["a@example.com"])
    post(["a@example.com"])
    stats = sb.stats()
    assert stats["same_key_overlaps"] == 1
    assert stats["sync_batch_sizes"] == [2, 2, 1, 1, 1, 1]


def test_admin_leads_and_seeding_from_file(sandbox_factory, tmp_path):
    seed = tmp_path / "leads.json"
    seed.write_text(json.dumps([{"id": 40, "email": "a@example.com"}, {"email": "b@example.com"}]))
    sb = sandbox_factory(leads_file=str(seed), next_id=10)
    leads = raw_get(sb.base_url + "/_sandbox/leads").json()
    assert [(lead["id"], lead["email"]) for lead in leads] == [
        (40, "a@example.com"),
        (41, "b@example.com"),
    ]
    with api(sb) as client:
        assert sync(client, [{"email": "c@example.com"}])["result"] == [{"id": 42, "status": "created"}]


def test_twenty_300_lead_batches_create_every_lead(sandbox):
    """Full-size batches one after another (how fast is for `make bench`, not for a test)."""
    batches = [
        [
            {
                "email": f"u{b}-{i}@example.com",
                "didomiNewsletterOptIn": i % 2 == 0,
                "didomiTopics": "news,offers",
                "didomiConsentUpdatedAt": "2024-05-01T10:00:00Z",
                "didomiCountry": "FR",
            }
            for i in range(300)
        ]
        for b in range(20)
    ]
    with api(sandbox) as client:
        for batch in batches:
            assert sync(client, batch)["result"][-1]["status"] == "created"
    assert len(sandbox.leads()) == 6000


def test_stop_closes_keep_alive_connections(sandbox_factory):
    sb = sandbox_factory()
    client = api(sb)
    assert client.get("/rest/v1/leads/describe.json").json()["success"]
    sb.stop()
    with pytest.raises(httpx.TransportError):
        client.get("/rest/v1/leads/describe.json")
    client.close()


def test_serve_forever_prints_url_and_exits_on_sigterm():
    code = (
        "from didomi_marketo.sandbox import SandboxConfig, serve_forever\n"
        "serve_forever(SandboxConfig(), '127.0.0.1', 0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("Marketo sandbox listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert raw_get(url + "/_sandbox/stats").status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out == "" and err == ""


def test_fault_on_identity_path(sandbox):
    sandbox.inject("http:503", path="/identity/oauth/token")
    assert token_response(sandbox).status_code == 503
    assert token_response(sandbox).status_code == 200
    assert sandbox.stats()["calls_total"] == 0  # identity calls are not REST calls


def test_method_get_override_and_chunked_body(sandbox):
    sandbox.seed_leads([{"email": "a@example.com", "firstName": "A"}])
    with api(sandbox) as client:
        form = {"filterType": "email", "filterValues": "A@example.com", "fields": "firstName"}
        doc = client.post(LEADS, params={"_method": "GET"}, data=form).json()
        assert doc["result"] == [{"id": 1, "firstName": "A"}]
        chunked = client.post(
            LEADS,
            content=iter([b'{"input":[{"email":"b@exa', b'mple.com"}]}']),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.json()["result"] == [{"id": 2, "status": "created"}]
