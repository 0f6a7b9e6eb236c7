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
from emulators import read_only_policy, upload_tree

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


def test_unusable_google_credentials_are_one_line_exit_3(gcs, tmp_path, cli):
    bad = tmp_path / "sa.json"
    bad.write_text("{not json")
    env = {"STORAGE_EMULATOR_HOST": None, "GOOGLE_APPLICATION_CREDENTIALS": str(bad), "NO_GCE_CHECK": "true"}
    result = cli("sync", "gs://some-bucket/data", "-c", make_config(tmp_path), "--dry-run", env=env)
    assert result.exit_code == 3, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("gs://")]
    assert line.startswith("gs://some-bucket/data: no usable Google credentials (")
    assert line.endswith("set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`")
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Credentials from the standard chain: Didomi's bucket through an assumed role


def test_role_arn_with_source_profile_reads_a_bucket_only_the_role_may_read(s3, sandbox, tmp_path, cli):
    """Didomi's set-up: your own identity may only assume Didomi's role; the role may read."""
    bucket = bucket_name()
    s3.create_bucket(bucket)
    local = tmp_path / "export"
    export_partition(local, "2026-11-01", [didomi_user("role@example.com", "2026-11-01T00:00:00Z", True)])
    upload_tree(s3, local, f"s3://{bucket}/data")
    role_arn = s3.create_role("didomi-" + bucket, read_only_policy(bucket))
    key, secret = s3.create_user("me-" + bucket, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": role_arn}]})  # fmt: skip
    (tmp_path / "credentials").write_text(
        f"[me]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"
    )
    (tmp_path / "config").write_text(
        "[profile me]\nregion = us-east-1\n\n"
        f"[profile didomi]\nrole_arn = {role_arn}\nsource_profile = me\nexternal_id = acme-org\n"
        "region = us-east-1\n"
    )
    chain = {**s3.env(), "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
             "AWS_CONFIG_FILE": str(tmp_path / "config"),
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}  # fmt: skip
    config = make_config(tmp_path, sandbox)

    mine = cli(
        "sync", f"s3://{bucket}/data", "-c", config, "--upsert", env={**ENV, **chain, "AWS_PROFILE": "me"}
    )
    assert mine.exit_code == 3
    assert f"access denied to bucket '{bucket}' while listing (AccessDenied)" in mine.stderr
    assert sandbox.lead_by_email("role@example.com") is None

    role = cli(
        "sync", f"s3://{bucket}/data", "-c", config, "--upsert", env={**ENV, **chain, "AWS_PROFILE": "didomi"}
    )
    assert role.exit_code == 0, role.output
    assert sandbox.lead_by_email("role@example.com")["didomiNewsletterOptIn"] is True
    assert secret not in mine.output + role.output


# ---------------------------------------------------------------------------------------------
# --state: partitions already synced are skipped by their ETags, without being read


def test_state_skips_synced_partitions_by_etag_without_reading_them(s3, sandbox, tmp_path, cli):
    bucket = bucket_name()
    s3.create_bucket(bucket)
    local = tmp_path / "export"
    export_partition(local, "2026-11-01", [didomi_user("one@example.com", "2026-11-01T00:00:00Z", True)])
    export_partition(local, "2026-11-02", [didomi_user("two@example.com", "2026-11-02T00:00:00Z", True)])
    upload_tree(s3, local, f"s3://{bucket}/data")
    config, state, url = make_config(tmp_path, sandbox), tmp_path / "state.db", f"s3://{bucket}/data"
    first = cli("sync", url, "-c", config, "--upsert", "--state", state, env={**ENV, **s3.env()})
    assert first.exit_code == 0, first.output
    calls = sandbox.stats()["calls_total"]

    # A reader that may list the bucket but not read one object: any read would be denied.
    lister = s3.create_user("lister-" + bucket, {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"}]})  # fmt: skip
    second = cli("sync", url, "-c", config, "--upsert", "--state", state, "--report", tmp_path / "r2",
                 env={**ENV, **s3.env(*lister)})  # fmt: skip
    assert second.exit_code == 0, second.output
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["input"]["files"] == 0 and summary["input"]["files_unchanged"] == 2
    assert summary["delivery"]["sent"] == 0

    # A rewritten object has a new ETag: its partition is read again (and the lister may not).
    part = f"{url}/export-id=e1/date=2026-11-02/users/part-00000.json.gz"
    user = didomi_user("two@example.com", "2026-11-03T00:00:00Z", False)
    s3.put(part, gzip.compress((json.dumps({"user": user, "events": []}) + "\n").encode()))
    third = cli("sync", url, "-c", config, "--upsert", "--state", state, env={**ENV, **s3.env(*lister)})
    assert third.exit_code == 3
    assert f"{part}: cannot read: access denied to bucket '{bucket}' while reading an object" in third.stderr
    fourth = cli("sync", url, "-c", config, "--upsert", "--state", state, "--report", tmp_path / "r4",
                 env={**ENV, **s3.env()})  # fmt: skip
    assert fourth.exit_code == 0, fourth.output
    summary = json.loads((tmp_path / "r4" / "summary.json").read_text())
    assert summary["input"]["files"] == 1 and summary["input"]["files_unchanged"] == 1
    assert sandbox.lead_by_email("two@example.com")["didomiNewsletterOptIn"] is False
    assert sandbox.stats()["calls_total"] > calls


# ---------------------------------------------------------------------------------------------
# --since / --until: partitions chosen by name, the others never listed


def three_days(tmp_path: Path) -> Path:
    """Nov 1 and Nov 3 complete; Nov 2 still being written (no _SUCCESS)."""
    local = tmp_path / "export"
    for day, success in (("01", True), ("02", False), ("03", True)):
        users = [didomi_user(f"d{day}@example.com", f"2026-11-{day}T00:00:00Z", True)]
        export_partition(local, f"2026-11-{day}", users, success)
    return local


@pytest.mark.parametrize("where", ["local", "s3", "gcs"])
def test_since_and_until_select_partitions_by_name(where, request, sandbox, tmp_path, cli):
    local = three_days(tmp_path)
    env: dict[str, str | None] = dict(ENV)
    target = str(local)
    if where != "local":
        store = request.getfixturevalue(where)
        bucket = bucket_name()
        store.create_bucket(bucket)
        target = f"{'s3' if where == 's3' else 'gs'}://{bucket}/data"
        upload_tree(store, local, target)
        env.update(store.env())
    config = make_config(tmp_path, sandbox)
    # Nov 2 is outside the window: not even listed, so its missing _SUCCESS refuses nothing.
    result = cli("sync", target, "-c", config, "--upsert", "--since", "2026-11-03", "--report", tmp_path / "r",
                 env=env)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [lead["email"] for lead in sandbox.leads() if lead["email"].startswith("d")] == ["d03@example.com"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["input"]["files"] == 1 and summary["input"]["partitions_refused"] == []

    result = cli("sync", target, "-c", config, "--upsert", "--until", "2026-11-01", env=env)
    assert result.exit_code == 0, result.output
    emails = sorted(lead["email"] for lead in sandbox.leads() if lead["email"].startswith("d"))
    assert emails == ["d01@example.com", "d03@example.com"]

    result = cli("sync", target, "-c", config, "--upsert", "--since", "2026-11-01", "--until", "2026-11-02",
                 env=env)  # fmt: skip
    assert result.exit_code == 1  # Nov 2 is inside this window, and incomplete
    assert "date=2026-11-02/users: Didomi export partition has no _SUCCESS marker" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--since", "2026-13-01"], "--since 2026-13-01: not a day (YYYY-MM-DD)"),
        (["--until", "yesterday"], "--until yesterday: not a day (YYYY-MM-DD)"),
        (
            ["--since", "2026-11-03", "--until", "2026-11-01"],
            "--since 2026-11-03 is after --until 2026-11-01",
        ),
    ],
)
def test_a_bad_date_window_is_a_usage_error(args, message, tmp_path, cli):
    result = cli("sync", tmp_path, "-c", make_config(tmp_path), "--dry-run", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_a_url_naming_one_object_in_a_partition_follows_the_success_rule(s3, tmp_path, cli):
    local = three_days(tmp_path)
    bucket = bucket_name()
    s3.create_bucket(bucket)
    upload_tree(s3, local, f"s3://{bucket}/data")
    config, env = make_config(tmp_path), s3.env()
    done = f"s3://{bucket}/data/export-id=e1/date=2026-11-01/users/part-00000.json.gz"
    half = f"s3://{bucket}/data/export-id=e1/date=2026-11-02/users/part-00000.json.gz"
    result = cli("sync", done, "-c", config, "--dry-run", "--upsert", env=env)
    assert result.exit_code == 0, result.output
    result = cli("sync", half, "-c", config, "--dry-run", "--upsert", env=env)
    assert result.exit_code == 1
    assert f"s3://{bucket}/data/export-id=e1/date=2026-11-02/users: Didomi export partition" in result.stderr
    users = f"s3://{bucket}/data/export-id=e1/date=2026-11-03/users"  # a partition's users/ named directly
    result = cli(
        "sync", users, "-c", config, "--dry-run", "--upsert", "--output", tmp_path / "o.ndjson", env=env
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["email"] for x in (tmp_path / "o.ndjson").read_text().splitlines()] == [
        "d03@example.com"
    ]


# ---------------------------------------------------------------------------------------------
# Streaming: an object is read a range at a time, never fetched whole first


def test_a_large_object_streams_a_range_at_a_time(s3, monkeypatch):
    from didomi_marketo.didomi.readers import open_binary, read_records
    from didomi_marketo.storage import READ_BUFFER, discover_url

    bucket = bucket_name()
    s3.create_bucket(bucket)
    line = json.dumps(event("big@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})).encode() + b"\n"
    body = line * (3 * READ_BUFFER // len(line))  # three ranges' worth
    s3.put(f"s3://{bucket}/big.ndjson", body)
    for k, v in s3.env().items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    (item,) = discover_url(f"s3://{bucket}/big.ndjson")
    with open_binary(item) as fh:
        assert fh.readline() == line
        fetched = fh.raw.fh.loc  # how far the object has been requested so far
    assert fetched <= READ_BUFFER < len(body)
    assert sum(1 for _ in read_records(item)) == len(body) // len(line)  # and all of it reads


def test_explain_follows_a_person_through_a_bucket(s3, tmp_path, cli):
    """Every command that reads inputs reads URLs the same way (explain here; preview, check and
    reconcile share read_into)."""
    local = three_days(tmp_path)
    bucket = bucket_name()
    s3.create_bucket(bucket)
    upload_tree(s3, local, f"s3://{bucket}/data")
    result = cli("explain", "d03@example.com", "-c", make_config(tmp_path), f"s3://{bucket}/data",
                 "--allow-incomplete", "--format", "json", env=s3.env())  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"s3://{bucket}/data/export-id=e1/date=2026-11-03/users/part-00000.json.gz:1" in result.stdout


def test_state_skips_synced_gcs_partitions_by_generation(gcs, sandbox, tmp_path, cli):
    bucket = bucket_name()
    gcs.create_bucket(bucket)
    local = tmp_path / "export"
    export_partition(local, "2026-11-01", [didomi_user("g1@example.com", "2026-11-01T00:00:00Z", True)])
    export_partition(local, "2026-11-02", [didomi_user("g2@example.com", "2026-11-02T00:00:00Z", True)])
    url = f"gs://{bucket}/data"
    upload_tree(gcs, local, url)
    config, state, env = make_config(tmp_path, sandbox), tmp_path / "state.db", {**ENV, **gcs.env()}
    assert cli("sync", url, "-c", config, "--upsert", "--state", state, env=env).exit_code == 0

    def summary_of(run: str) -> dict[str, Any]:
        result = cli(
            "sync", url, "-c", config, "--upsert", "--state", state, "--report", tmp_path / run, env=env
        )
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / run / "summary.json").read_text())["input"]

    again = summary_of("r2")
    assert again["files"] == 0 and again["files_unchanged"] == 2
    user = didomi_user("g2@example.com", "2026-11-03T00:00:00Z", False)
    gcs.put(f"{url}/export-id=e1/date=2026-11-02/users/part-00000.json.gz",
            gzip.compress((json.dumps({"user": user, "events": []}) + "\n").encode()))  # fmt: skip
    changed = summary_of("r3")
    assert changed["files"] == 1 and changed["files_unchanged"] == 1
    assert sandbox.lead_by_email("g2@example.com")["didomiNewsletterOptIn"] is False


def test_no_aws_credentials_at_all_is_one_line_exit_3(s3, tmp_path, cli):
    env = {**s3.env(), "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}  # nothing in the chain
    result = cli("sync", "s3://any-bucket/data", "-c", make_config(tmp_path), "--dry-run", env=env)
    assert result.exit_code == 3, result.output
    assert result.stderr.splitlines()[0] == (
        "s3://any-bucket/data: no AWS credentials found for bucket 'any-bucket' (Unable to locate "
        "credentials): set AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run where an instance "
        "role applies"
    )
