"""The sandbox's bulk lead import, over real sockets: jobs, statuses over time, queue limits,
failures and warnings files. The client side is tested in test_bulk.py."""

from __future__ import annotations

import csv
import io

import httpx
import pytest


def _token(sb) -> dict[str, str]:
    r = httpx.get(
        sb.base_url + "/identity/oauth/token",
        params={
            "grant_type": "client_credentials",
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
        },
    )
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _upload(sb, headers, text: str, **params: str) -> dict:
    params.setdefault("format", "csv")
    r = httpx.post(
        sb.base_url + "/bulk/v1/leads.json",
        headers=headers,
        data=params,
        files={"file": ("leads.csv", text.encode(), "text/csv")},
        timeout=120,  # a 9 MB upload on a busy host
    )
    assert r.status_code == 200
    return r.json()


def _status(sb, headers, batch_id: int) -> dict:
    return httpx.get(f"{sb.base_url}/bulk/v1/leads/batch/{batch_id}.json", headers=headers).json()


def _wait(sb, headers, batch_id: int) -> dict:
    """The job's final status (these sandboxes import at once)."""
    job = _status(sb, headers, batch_id)["result"][0]
    assert job["status"] in ("Complete", "Failed"), job
    return job


def test_a_job_goes_queued_importing_complete_and_applies_like_sync_leads(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=5, bulk_import_seconds=10, bulk_rows_per_second=1)
    now = [1000.0]
    sb.bulk_clock = lambda: now[0]  # the job's timeline, driven by hand
    sb.seed_leads([{"email": "old@example.com", "firstName": "Old", "didomiNewsletterOptIn": False}])
    h = _token(sb)
    text = "email,didomiNewsletterOptIn\nOld@Example.com,true\nnew@example.com,false\n"
    answer = _upload(sb, h, text)
    assert answer["success"] is True
    job = answer["result"][0]
    assert job["status"] == "Queued" and job["importId"] == str(job["batchId"])
    seen = []
    for t in (1004.9, 1005.0, 1016.9, 1017.0):  # queued 5 s, then 10 s + 2 rows at 1 row/s
        now[0] = t
        seen.append(_status(sb, h, job["batchId"])["result"][0]["status"])
        if t < 1017:
            assert sb.lead_by_email("new@example.com") is None  # applied only when complete
    assert seen == ["Queued", "Importing", "Importing", "Complete"]
    done = _status(sb, h, job["batchId"])["result"][0]
    assert (done["numOfLeadsProcessed"], done["numOfRowsFailed"], done["numOfRowsWithWarning"]) == (2, 0, 0)
    assert done["message"] == "Import succeeded, 2 records imported (2 members)"
    old = sb.lead_by_email("old@example.com")
    assert old["didomiNewsletterOptIn"] is True and old["firstName"] == "Old"  # other fields kept
    assert sb.lead_by_email("new@example.com")["didomiNewsletterOptIn"] is False  # created


def test_failures_and_warnings_files_carry_the_original_columns_and_a_reason(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    sb.seed_leads([{"email": "dup@example.com"}, {"email": "dup@example.com"}])
    h = _token(sb)
    text = (
        "email,didomiNewsletterOptIn,didomiTopics\n"
        'ok@example.com,true,"a,b"\n'
        "bad@example.com,maybe,x\n"
        ",true,y\n"
        "dup@example.com,false,z\n"
    )
    job = _wait(sb, h, _upload(sb, h, text)["result"][0]["batchId"])
    assert (job["numOfLeadsProcessed"], job["numOfRowsFailed"], job["numOfRowsWithWarning"]) == (2, 2, 1)
    assert job["message"].startswith("Import completed with errors, 2 records imported")
    r = httpx.get(f"{sb.base_url}/bulk/v1/leads/batch/{job['batchId']}/failures.json", headers=h)
    assert r.headers["content-type"] == "text/csv;charset=UTF-8"
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["email", "didomiNewsletterOptIn", "didomiTopics", "Import Failure Reason"]
    assert rows[1] == ["bad@example.com", "maybe", "x",
                       "Invalid value for field 'didomiNewsletterOptIn' and value 'maybe'"]  # fmt: skip
    assert rows[2][3] == "Value for lookup field 'email' not specified"
    w = httpx.get(f"{sb.base_url}/bulk/v1/leads/batch/{job['batchId']}/warnings.json", headers=h)
    wrows = list(csv.reader(io.StringIO(w.text)))
    assert wrows[0][-1] == "Import Warning Reason" and wrows[1][0] == "dup@example.com"
    assert sb.lead_by_email("ok@example.com")["didomiTopics"] == "a,b"  # quoted comma survives
    assert sb.lead_by_email("bad@example.com") is None


def test_update_only_by_id_never_creates(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    (lid,) = sb.seed_leads([{"email": "a@example.com"}])
    h = _token(sb)
    text = f"id,didomiNewsletterOptIn\n{lid},true\n999999,true\n"
    job = _wait(sb, h, _upload(sb, h, text, lookupField="id")["result"][0]["batchId"])
    assert (job["numOfLeadsProcessed"], job["numOfRowsFailed"]) == (1, 1)
    assert len(sb.leads()) == 1 and sb.leads()[0]["didomiNewsletterOptIn"] is True
    r = httpx.get(f"{sb.base_url}/bulk/v1/leads/batch/{job['batchId']}/failures.json", headers=h)
    assert r.text.splitlines()[1] == "999999,true,Lead not found"


def test_an_unknown_column_fails_the_whole_job(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    h = _token(sb)
    job = _wait(sb, h, _upload(sb, h, "email,noSuchField\na@example.com,1\n")["result"][0]["batchId"])
    assert job["status"] == "Failed" and "noSuchField" in job["message"]
    assert sb.leads() == []


def test_ten_jobs_queue_two_import_and_the_eleventh_gets_1016(sandbox_factory):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=30)
    h = _token(sb)
    ids = [_upload(sb, h, f"email\nu{i}@example.com\n")["result"][0]["batchId"] for i in range(10)]
    statuses = [_status(sb, h, i)["result"][0]["status"] for i in ids]
    assert statuses.count("Importing") == 2 and statuses.count("Queued") == 8
    refused = _upload(sb, h, "email\nlate@example.com\n")
    assert refused["success"] is False and refused["errors"][0]["code"] == "1016"
    assert sb.stats()["bulk_too_many_imports"] == 1 and sb.stats()["bulk_jobs"] == 10


def test_request_errors_match_marketo(sandbox_factory):
    sb = sandbox_factory()
    h = _token(sb)
    not_multipart = httpx.post(sb.base_url + "/bulk/v1/leads.json", headers=h, json={"x": 1}).json()
    assert not_multipart["errors"][0]["code"] == "612"
    malformed = httpx.post(
        sb.base_url + "/bulk/v1/leads.json",
        headers={**h, "Content-Type": "multipart/form-data; boundary=XyZ"},
        content=b"--XyZ\r\nno headers here--XyZ--",
    ).json()
    assert malformed["errors"][0]["code"] == "613"
    unknown = httpx.get(sb.base_url + "/bulk/v1/leads/batch/424242.json", headers=h).json()
    assert unknown["success"] is False and unknown["errors"][0]["code"] == "1013"
    no_token = httpx.get(sb.base_url + "/bulk/v1/leads/batch/1.json").json()
    assert no_token["errors"][0]["code"] == "600"


@pytest.mark.parametrize("size", [MB := 1_048_576, 9 * MB])
def test_bulk_bodies_may_exceed_the_rest_limit(sandbox_factory, size):
    sb = sandbox_factory(bulk_queued_seconds=0, bulk_import_seconds=0)
    h = _token(sb)
    rows = size // 30
    text = "email,didomiTopics\n" + "".join(f"u{i}@example.com,{'x' * 10}\n" for i in range(rows))
    answer = _upload(sb, h, text)
    assert answer["success"] is True
