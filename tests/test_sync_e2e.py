"""End to end: the CLI against the sandbox Marketo over real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from conftest import SAMPLES, event, make_config, run_subprocess, write_ndjson

ENV = {"MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret"}


def sample_config(tmp_path: Path, sandbox, name: str = "marketo.json") -> Path:
    """The bundled Didomi console config, pointed at this test's sandbox."""
    text = (SAMPLES / "config" / name).read_text().replace("http://127.0.0.1:8787", sandbox.base_url)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sample_sync_lands_every_lead_as_the_semantics_say(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    config = sample_config(tmp_path, sb)
    result = cli("sync", SAMPLES / "didomi", "--config", config, "--report", tmp_path / "r", env=ENV)
    assert result.exit_code == 1, result.output  # the bad-records file is rejected, the rest lands
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())

    alice = sb.lead_by_email("alice@example.com")
    # Opted in in the export (Nov 20) but a webhook event on Nov 28 opted out: latest wins.
    assert alice["didomiNewsletterOptIn"] is False
    # The Nov 28 event only carried newsletter: analytics and topics from Nov 20 survive.
    assert alice["didomiAnalyticsOptIn"] is False
    assert alice["didomiTopics"] == "product_news,events"
    assert alice["didomiEmailChannelOptIn"] is True
    assert alice["didomiConsentUpdatedAt"].startswith("2026-11-28T09:00:00")

    bob = sb.lead_by_email("bob@example.com")  # export key was Bob@Example.com
    assert bob["didomiNewsletterOptIn"] is False  # his later pending_approval event did not apply
    assert bob["didomiAnalyticsOptIn"] is True

    carol = sb.lead_by_email("carol@example.com")
    assert carol["didomiNewsletterOptIn"] is True  # the CPRA event is not applied (gdpr only)
    assert carol["didomiCountry"] == "DE"

    assert sb.lead_by_email("user001@example.com")["didomiTopics"] == "events"  # user.updated webhook
    assert sb.lead_by_email("user002@example.com")["didomiAnalyticsOptIn"] is False  # event.updated
    dave = sb.lead_by_email("dave@example.com")  # from the Consents API page
    assert dave["didomiNewsletterOptIn"] is True and dave["didomiCountry"] == "ES"
    frank = sb.lead_by_email("frank@example.com")  # the good line among the bad ones still lands
    assert frank["didomiNewsletterOptIn"] is True

    # upsert_mode false: leads not in Marketo are expected 1004 skips, never created.
    assert sb.lead_by_email("nobody@example.com") is None
    assert sb.lead_by_email("zoe@example.com") is None
    undelivered = [json.loads(x) for x in (tmp_path / "r" / "undelivered.ndjson").read_text().splitlines()]
    assert {u["key"] for u in undelivered} == {"nobody@example.com", "zoe@example.com"}
    assert all(u["code"] == "1004" and u["expected"] and not u["retryable"] for u in undelivered)

    d = summary["delivery"]
    assert d["updated"] == 46 and d["created"] == 0 and d["skipped"] == {"1004": 2} and d["failed"] == 0
    assert summary["input"]["rejected"] == 4
    assert summary["input"]["ignored"] == {"anonymous": 1, "pending": 1, "other_regulation": 1, "deleted": 1}
    # Every lead once, in one full call (48 leads < 300).
    assert sb.stats()["sync_batch_sizes"] == [48]
    rejected = (tmp_path / "r" / "rejected.ndjson").read_text()
    assert "bad-records.ndjson:1" in rejected and "bad-records.ndjson:4" in rejected
    assert "bad-records.ndjson:5" not in rejected
    for line in ("bad-records.ndjson:1: invalid JSON", "bad-records.ndjson:3: organization_user_id"):
        assert line in result.stderr


def test_json_and_yaml_configs_sync_identically(sandbox_factory, tmp_path, cli):
    results = []
    for name in ("marketo.json", "marketo.yaml"):
        sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
        config = sample_config(tmp_path, sb, name)
        cli("sync", SAMPLES / "didomi", "-c", config, "-q", env=ENV)
        results.append(sorted((lead["email"], lead.get("didomiTopics")) for lead in sb.leads()))
    assert results[0] == results[1]
    assert ("alice@example.com", "product_news,events") in results[0]


def test_dry_run_sends_nothing_and_needs_no_credentials(sandbox, tmp_path, cli):
    config = sample_config(tmp_path, sandbox)
    out = tmp_path / "payloads.ndjson"
    result = cli("sync", SAMPLES / "didomi", "-c", config, "--dry-run", "--output", out, env={})
    assert result.exit_code == 1  # the bad records
    stats = sandbox.stats()
    assert stats["calls_total"] == 0 and stats["tokens_issued"] == 0
    payloads = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(payloads) == 48
    alice = next(p for p in payloads if p["email"] == "alice@example.com")
    assert alice["didomiNewsletterOptIn"] is False
    assert "leads to send" in result.stdout and "didomiNewsletterOptIn" in result.stdout
    assert "sample payloads" in result.stdout


def test_upsert_flag_creates_missing_leads(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    config = sample_config(tmp_path, sb)
    result = cli("sync", SAMPLES / "didomi", "-c", config, "--upsert", "-q", env=ENV)
    assert result.exit_code == 1  # still the bad records
    assert sb.lead_by_email("zoe@example.com")["didomiTopics"] == "offers"
    assert sb.lead_by_email("nobody@example.com")["didomiNewsletterOptIn"] is True


def test_clean_input_exits_zero_and_pending_or_anonymous_alone_do_not_fail(sandbox, tmp_path, cli):
    data = write_ndjson(tmp_path / "in.ndjson", [
        event(None, "2026-01-01T00:00:00Z", {"newsletter": True}),
        event("x@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}, status="pending_approval"),
        event("ghost@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}),
    ])  # fmt: skip
    result = cli("sync", data, "-c", make_config(tmp_path, sandbox), "-q")
    assert result.exit_code == 0, result.output  # ghost is a 1004 expected skip


def test_unexpected_skip_exits_one(sandbox, tmp_path, cli):
    data = write_ndjson(
        tmp_path / "in.ndjson", [event("a@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    config = make_config(
        tmp_path, sandbox, mappings=[{"id": "noSuchField", "value": "consents_purposes_newsletter_enabled"}]
    )
    result = cli(
        "sync", data, "-c", config, "--upsert", "--report", tmp_path / "r", "-q", "--skip-schema-check"
    )
    assert result.exit_code == 1
    (u,) = [json.loads(x) for x in (tmp_path / "r" / "undelivered.ndjson").read_text().splitlines()]
    assert u["code"] == "1006" and not u["expected"] and not u["retryable"]


def test_sync_refuses_to_send_to_a_missing_or_read_only_field(sandbox, tmp_path, cli):
    data = write_ndjson(
        tmp_path / "in.ndjson", [event("a@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    config = make_config(tmp_path, sandbox, mappings=[
        {"id": "didomiNewsletterOptln", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiReadOnlyFlag", "value": "consents_purposes_newsletter_enabled"},
    ])  # fmt: skip
    result = cli("sync", data, "-c", config, "-q")
    assert result.exit_code == 2
    assert (
        "didomiNewsletterOptln" in result.stderr and "didomiNewsletterOptIn" in result.stderr
    )  # did you mean
    assert "didomiReadOnlyFlag" in result.stderr and "nothing was sent" in result.stderr
    assert sandbox.stats()["sync_calls"] == 0


def test_on_several_cores_a_refused_schema_sends_nothing_though_the_workers_planned(sandbox, tmp_path, cli):
    """The workers plan while the schema check finishes; a refusal still sends nothing and the
    state records nothing (what they planned is thrown away)."""
    for part in range(2):
        write_ndjson(tmp_path / "in" / f"part-{part}.ndjson",
                     [event(f"u{part}-{i}@example.com", "2026-01-01T00:00:00Z", {"newsletter": True}) for i in range(50)])  # fmt: skip
    config = make_config(tmp_path, sandbox, mappings=[
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiReadOnlyFlag", "value": "consents_purposes_newsletter_enabled"},
    ])  # fmt: skip
    state = tmp_path / "state.db"
    result = cli("sync", tmp_path / "in", "-c", config, "--state", state, "--jobs", 2, "-q")
    assert result.exit_code == 2 and "nothing was sent" in result.stderr
    assert sandbox.stats()["sync_calls"] == 0
    import sqlite3

    with contextlib.closing(sqlite3.connect(state)) as db:
        assert db.execute("SELECT COUNT(*) FROM leads").fetchone()[0] == 0


def test_schema_is_read_once_a_day_with_a_state(sandbox, tmp_path, cli):
    data = write_ndjson(
        tmp_path / "in.ndjson", [event("a@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    config = make_config(tmp_path, sandbox)
    for _ in range(2):
        assert cli("sync", data, "-c", config, "-q", "--state", tmp_path / "s.db", "--full").exit_code == 0
    assert sandbox.stats()["describe_calls"] == 1


def test_lead_id_identifier_updates_by_id(sandbox_factory, tmp_path, cli):
    leads = tmp_path / "leads.json"
    leads.write_text(json.dumps([{"email": "a@example.com"}, {"email": "b@example.com"}]))
    sb = sandbox_factory(leads_file=str(leads), next_id=100)
    ids = {lead["email"]: lead["id"] for lead in sb.leads()}
    data = write_ndjson(tmp_path / "in.ndjson", [
        event(str(ids["a@example.com"]), "2026-01-01T00:00:00Z", {"newsletter": True}),
        event(ids["b@example.com"], "2026-01-01T00:00:00Z", {"newsletter": False}),
        event("not-a-number", "2026-01-01T00:00:00Z", {"newsletter": False}),
    ])  # fmt: skip
    config = make_config(tmp_path, sb, properties={"user_identifier": "leadID"})
    result = cli("sync", data, "-c", config, "-q")
    assert result.exit_code == 1  # the non-numeric key is rejected
    assert sb.lead_by_email("a@example.com")["didomiNewsletterOptIn"] is True
    assert sb.lead_by_email("b@example.com")["didomiNewsletterOptIn"] is False
    assert "not a lead id" in result.stderr


def test_stdin_gzip_input(sandbox_factory, tmp_path, cli):
    import gzip

    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    body = gzip.compress(
        json.dumps(event("alice@example.com", "2030-01-01T00:00:00Z", {"newsletter": True})).encode()
    )
    result = cli("sync", "-", "-c", make_config(tmp_path, sb), "-q", input=body)
    assert result.exit_code == 0, result.output
    assert sb.lead_by_email("alice@example.com")["didomiNewsletterOptIn"] is True


def test_incomplete_partition_is_refused_unless_allowed(sandbox_factory, tmp_path, cli):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    part = tmp_path / "exp" / "date=2026-11-27" / "users"
    shutil.copytree(SAMPLES / "didomi" / "export-id=exp_9f8e7d" / "date=2026-11-27" / "users", part)
    (part / "_SUCCESS").unlink()
    (part / "notes.txt").write_text("not data")
    config = sample_config(tmp_path, sb)
    result = cli("sync", tmp_path / "exp", "-c", config, "-q", env=ENV)
    assert result.exit_code == 1
    assert "_SUCCESS" in result.stderr and str(part) in result.stderr
    assert sb.stats()["sync_calls"] == 0
    result = cli("sync", tmp_path / "exp", "-c", config, "-q", "--allow-incomplete", env=ENV)
    assert result.exit_code == 0, result.stderr  # notes.txt is ignored inside a partition
    assert sb.lead_by_email("carol@example.com")["didomiNewsletterOptIn"] is True


def test_bad_credentials_exit_three_without_leaking_the_secret(sandbox, tmp_path):
    data = write_ndjson(
        tmp_path / "in.ndjson", [event("a@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    config = make_config(tmp_path, sandbox, authentication={
        "client_id": "sandbox-client", "client_secret": "wrong-SECRET-value-123",
        "instance": sandbox.base_url + "/rest"})  # fmt: skip
    proc = run_subprocess("sync", data, "-c", config, "--verbose")
    assert proc.returncode == 3
    assert "credentials" in proc.stderr and "Traceback" not in proc.stderr
    assert "wrong-SECRET-value-123" not in proc.stdout + proc.stderr


def test_unreachable_instance_exits_three(tmp_path):
    data = write_ndjson(
        tmp_path / "in.ndjson", [event("a@example.com", "2026-01-01T00:00:00Z", {"newsletter": True})]
    )
    config = make_config(tmp_path, None, authentication={
        "client_id": "id", "client_secret": "s3cr3t-zzz", "instance": "http://127.0.0.1:9/rest"})  # fmt: skip
    proc = run_subprocess("sync", data, "-c", config)
    assert proc.returncode == 3, proc.stderr
    assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cr3t-zzz" not in proc.stderr + proc.stdout


def test_secrets_never_reach_output_or_report(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"), token_ttl=1)
    config = sample_config(tmp_path, sb)
    proc = run_subprocess(
        "sync", SAMPLES / "didomi", "-c", config, "--verbose", "--report", tmp_path / "r", env=ENV
    )
    assert proc.returncode == 1
    everything = proc.stdout + proc.stderr + "".join(p.read_text() for p in (tmp_path / "r").iterdir())
    assert "sandbox-secret" not in everything
    assert ":sb" not in everything  # sandbox tokens end in ':sb'
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["config"]["client_id"]


def test_config_errors_exit_two_with_every_problem(tmp_path, cli):
    config = tmp_path / "c.yaml"
    config.write_text(
        "type_id: marketo\n"
        "authentication: {client_id: a, client_secret: b, instance: 'http://example.com'}\n"
        "properties:\n  user_identifier: leadId\n"
        "mappings:\n  - id: x\n    value: consents_purpose_newsletter_enabled\n"
        "upsert_mod: true\n"
    )
    result = cli("sync", tmp_path, "-c", config, "--dry-run")
    assert result.exit_code == 2
    err = result.stderr
    assert "c.yaml:2" in err and "plain http://" in err
    assert "c.yaml:4" in err and "did you mean 'leadID'" in err
    assert "c.yaml:7" in err and "did you mean 'consents_purposes_newsletter_enabled'" in err
    assert "c.yaml:8" in err and "did you mean 'upsert_mode'" in err


def test_missing_credentials_are_a_config_error(sandbox, tmp_path, cli):
    config = make_config(tmp_path, sandbox, authentication={"instance": sandbox.base_url})
    data = write_ndjson(tmp_path / "in.ndjson", [])
    result = cli("sync", data, "-c", config, env={"MARKETO_CLIENT_ID": "", "MARKETO_CLIENT_SECRET": ""})
    assert result.exit_code == 2
    assert "MARKETO_CLIENT_SECRET" in result.stderr


def test_summary_times_each_step_since_the_process_started(sandbox_factory, tmp_path):
    """timings.since_start: when the run's steps happened, in seconds since the process started
    (the interpreter and the imports count too), in the order they happened."""
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    config = sample_config(tmp_path, sb)
    run = run_subprocess("sync", SAMPLES / "didomi", "-c", config, "--report", tmp_path / "r", "-q", env=ENV)
    assert run.returncode == 1, run.stderr  # the sample's bad-records file
    timings = json.loads((tmp_path / "r" / "summary.json").read_text())["timings"]
    steps = timings["since_start"]
    assert set(steps) >= {"read_started", "preflight_started", "token", "schema_and_usage", "fold_ended",
                          "first_call", "last_answer", "summary"}  # fmt: skip
    assert list(steps.values()) == sorted(steps.values()) and steps["read_started"] > 0
    assert steps["schema_and_usage"] <= steps["first_call"] < steps["last_answer"] <= steps["summary"]
    assert timings["first_call_after_fold_seconds"] >= 0
