"""Cloud storage inputs end to end: `sync s3://…` and `sync gs://…` against moto's S3 server and
gcp-storage-emulator (real HTTP servers on 127.0.0.1, see tests/emulators.py) into the sandbox
Marketo. Nothing mocks the filesystem layer: s3fs and gcsfs talk HTTP to the emulators."""

from __future__ import annotations

import gzip
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES, event, make_config, write_ndjson
from emulators import upload_tree

ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}


def sample_config(tmp_path: Path, sandbox: Any) -> Path:
    text = (
        (SAMPLES / "config" / "marketo.json").read_text().replace("http://127.0.0.1:8787", sandbox.base_url)
    )
    path = tmp_path / "marketo.json"
    path.write_text(text)
    return path


def bucket_name() -> str:
    return "b-" + uuid.uuid4().hex[:12]  # one bucket per test: the emulators live for the session


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def leads_of(sandbox: Any) -> list[tuple[Any, ...]]:
    return sorted(tuple(sorted(lead.items())) for lead in sandbox.leads())


def comparable(lead_rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Leads without the sandbox's own bookkeeping (ids and update times differ between runs)."""
    drop = {"id", "updatedAt", "createdAt"}
    return sorted(tuple(kv for kv in row if kv[0] not in drop) for row in lead_rows)


def export_partition(root: Path, day: str, users: list[dict[str, Any]], success: bool = True) -> Path:
    """A Didomi batch-export partition `export-id=e1/date=DAY/users/part-0.json.gz`."""
    folder = root / "export-id=e1" / f"date={day}"
    (folder / "users").mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"user": u, "events": []}) + "\n" for u in users)
    (folder / "users" / "part-00000.json.gz").write_bytes(gzip.compress(text.encode()))
    if success:
        (folder / "_SUCCESS").write_bytes(b"")
    return folder


def didomi_user(email: str, at: str, newsletter: bool) -> dict[str, Any]:
    return {
        "id": "u-" + email,
        "organization_user_id": email,
        "updated_at": at,
        "consents": {"purposes": [{"id": "newsletter", "enabled": newsletter}]},
    }


# ---------------------------------------------------------------------------------------------
# The same export, locally and in a bucket, lands the same leads


@pytest.mark.parametrize("store_name", ["s3", "gcs"])
def test_sync_from_a_bucket_lands_the_same_leads_as_the_same_files_locally(
    store_name, request, sandbox_factory, tmp_path, cli
):
    store = request.getfixturevalue(store_name)
    scheme = "s3" if store_name == "s3" else "gs"
    bucket = bucket_name()
    store.create_bucket(bucket)
    assert upload_tree(store, SAMPLES / "didomi", f"{scheme}://{bucket}/didomi") == 6
    url = f"{scheme}://{bucket}/didomi"

    local_sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    local = cli("sync", SAMPLES / "didomi", "-c", sample_config(tmp_path, local_sb), "--report",
                tmp_path / "local", env=ENV)  # fmt: skip
    remote_sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    remote = cli("sync", url, "-c", sample_config(tmp_path, remote_sb), "--report", tmp_path / "remote",
                 env={**ENV, **store.env()})  # fmt: skip

    assert remote.exit_code == local.exit_code == 1, remote.output  # the bad-records file, both times
    assert comparable(leads_of(remote_sb)) == comparable(leads_of(local_sb))
    assert remote_sb.lead_by_email("alice@example.com")["didomiNewsletterOptIn"] is False
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    remote_summary = json.loads((tmp_path / "remote" / "summary.json").read_text())
    timing = {k for k in local_summary["delivery"] if "second" in k}
    assert {k: v for k, v in remote_summary["delivery"].items() if k not in timing} == {
        k: v for k, v in local_summary["delivery"].items() if k not in timing
    }
    assert remote_summary["input"]["files"] == local_summary["input"]["files"] == 5
    # Rejected records keep their `path:line`, the path being the URL.
    sources = sorted(r["source"] for r in lines(tmp_path / "remote" / "rejected.ndjson"))
    expected = sorted(
        r["source"].replace(str(SAMPLES / "didomi"), url)
        for r in lines(tmp_path / "local" / "rejected.ndjson")
    )
    assert sources == expected and f"{url}/bad/bad-records.ndjson:1" in sources
    assert f"{url}/bad/bad-records.ndjson:1: invalid JSON" in remote.stderr


# ---------------------------------------------------------------------------------------------
# Failures: one clear line each, the right exit code, nothing else lost


def test_without_the_extra_a_url_gets_one_line_naming_the_extra(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if `didomi-marketo[s3]` were not installed
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    config = make_config(tmp_path)
    result = cli("sync", "s3://bucket/data", "gs://other/x", "-c", config, "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: s3://bucket/data: reading S3 needs the s3 extra: pip install 'didomi-marketo[s3]'",
        "error: gs://other/x: reading Google Cloud Storage needs the gcs extra: pip install 'didomi-marketo[gcs]'",
    ]


def test_an_unsupported_scheme_is_a_usage_error(tmp_path, cli):
    result = cli("sync", "ftp://host/data", "-c", make_config(tmp_path), "--dry-run")
    assert result.exit_code == 2
    assert "ftp://host/data: unsupported URL scheme ftp:// (s3:// and gs:// are)" in result.stderr


def two_inputs(tmp_path: Path) -> Path:
    """A local file whose lead must land whatever happens to the bucket."""
    return write_ndjson(
        tmp_path / "local.ndjson", [event("a@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )


def test_wrong_aws_credentials_one_line_exit_3_and_the_rest_lands(s3, sandbox, tmp_path, cli):
    bucket = bucket_name()
    s3.create_bucket(bucket)
    s3.put(f"s3://{bucket}/x.ndjson", b"{}\n")
    secret = "wrong-secret-" + uuid.uuid4().hex
    env = {**ENV, **s3.env(key="AKIAIOSFODNN7WRONG1", secret=secret)}
    result = cli("sync", f"s3://{bucket}/data", two_inputs(tmp_path), "-c", make_config(tmp_path, sandbox),
                 "--upsert", "--report", tmp_path / "r", env=env)  # fmt: skip
    assert result.exit_code == 3, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("s3://")]
    assert line == (
        f"s3://{bucket}/data: bucket '{bucket}' refused the credentials while listing: "
        "the access key is not known to AWS (InvalidAccessKeyId)"
    )
    assert "Traceback" not in result.output and secret not in result.output
    assert secret not in (tmp_path / "r" / "rejected.ndjson").read_text()
    assert sandbox.lead_by_email("a@example.com")["didomiNewsletterOptIn"] is True  # nothing else lost
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["access_denied"] == [f"s3://{bucket}/data"] and summary["exit_code"] == 3


def test_a_wrong_secret_is_named_as_such(s3, tmp_path, cli):
    bucket = bucket_name()
    s3.create_bucket(bucket)
    result = cli("sync", f"s3://{bucket}", "-c", make_config(tmp_path), "--dry-run",
                 env=s3.env(secret="not-the-secret"))  # fmt: skip
    assert result.exit_code == 3
    assert "the secret key does not match the access key (SignatureDoesNotMatch)" in result.stderr


def test_access_denied_names_the_bucket_and_what_was_denied(s3, tmp_path, cli):
    bucket = bucket_name()
    s3.create_bucket(bucket)
    s3.put(f"s3://{bucket}/data/x.ndjson", b"{}\n")
    key, secret = s3.create_user("nobody-" + bucket)  # no policy: may do nothing
    result = cli("sync", f"s3://{bucket}/data", "-c", make_config(tmp_path), "--dry-run",
                 env=s3.env(key, secret))  # fmt: skip
    assert result.exit_code == 3
    assert (
        f"s3://{bucket}/data: access denied to bucket '{bucket}' while listing (AccessDenied)"
        in result.stderr
    )
    assert "Traceback" not in result.output


def test_a_missing_bucket_is_one_line_and_the_rest_lands(s3, sandbox, tmp_path, cli):
    result = cli("sync", "s3://no-such-bucket-here/data", two_inputs(tmp_path), "-c",
                 make_config(tmp_path, sandbox), "--upsert", env={**ENV, **s3.env()})  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "s3://no-such-bucket-here/data: no such bucket 'no-such-bucket-here'" in result.stderr
    assert "Traceback" not in result.output
    assert sandbox.lead_by_email("a@example.com")["didomiNewsletterOptIn"] is True


def test_a_partition_without_success_is_refused_and_the_others_land(s3, sandbox, tmp_path, cli):
    local = tmp_path / "export"
    export_partition(local, "2026-11-01", [didomi_user("done@example.com", "2026-11-01T00:00:00Z", True)])
    export_partition(local, "2026-11-02", [didomi_user("half@example.com", "2026-11-02T00:00:00Z", True)],
                     success=False)  # fmt: skip
    bucket = bucket_name()
    s3.create_bucket(bucket)
    upload_tree(s3, local, f"s3://{bucket}/data")
    result = cli("sync", f"s3://{bucket}/data", "-c", make_config(tmp_path, sandbox), "--upsert",
                 "--report", tmp_path / "r", env={**ENV, **s3.env()})  # fmt: skip
    assert result.exit_code == 1, result.output
    partition = f"s3://{bucket}/data/export-id=e1/date=2026-11-02/users"
    assert f"{partition}: Didomi export partition has no _SUCCESS marker" in result.stderr
    assert sandbox.lead_by_email("done@example.com")["didomiNewsletterOptIn"] is True
    assert sandbox.lead_by_email("half@example.com") is None
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["partitions_refused"] == [partition]
    # --allow-incomplete reads it, as for a local folder.
    again = cli("sync", f"s3://{bucket}/data", "-c", make_config(tmp_path, sandbox), "--upsert",
                "--allow-incomplete", env={**ENV, **s3.env()})  # fmt: skip
    assert again.exit_code == 0, again.output
    assert sandbox.lead_by_email("half@example.com")["didomiNewsletterOptIn"] is True
