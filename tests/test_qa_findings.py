"""Defects a black-box tester found, each pinned end to end through the CLI."""

from __future__ import annotations

import json

from conftest import event, make_config, write_ndjson

from didomi_marketo.mapping import parse_transforms


def payloads(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_list_id_mapped_to_null_is_dropped_never_sent_as_none():
    (t,), problems = parse_transforms({"map": {"a": None, "b": "B", "c": True}})
    assert problems == []
    assert t.apply("a,b") == "B"
    assert t.apply("a,c") == "true"  # Marketo reads true, not Python's True
    assert t.apply("a,a") is None  # every id mapped to null: nothing to send
    assert t.apply("b,x") == "B,x"  # unknown ids pass through


def test_line_numbers_and_values_print_as_written_not_as_emoji(tmp_path, cli):
    """rich turned `file:100:` into `file💯` (and a drifted value ":100:" too) on the terminal."""
    from didomi_marketo.cli.common import err, out

    for console in (out, err):
        with console.capture() as captured:
            console.print("part-0.json.gz:100: invalid; value [/z],:1234:", markup=False)
        assert captured.get().strip() == "part-0.json.gz:100: invalid; value [/z],:1234:"
    good = [event(f"u{i}@x.example", "2026-11-20T10:00:00Z", {"newsletter": True}) for i in range(99)]
    data = write_ndjson(tmp_path / "l100.ndjson", [*good, {"hello": 1}])
    result = cli("sync", data, "--config", make_config(tmp_path), "--dry-run", "--quiet")
    assert f"{data}:100:" in result.stderr and "💯" not in result.stderr


def test_an_export_line_without_events_still_carries_the_user_status(tmp_path, cli):
    user = {
        "id": "d-1", "organization_user_id": "Status@X.example", "updated_at": "2026-11-20T10:00:00Z",
        "consents": {"purposes": [{"id": "newsletter", "enabled": True}]},
    }  # fmt: skip
    data = write_ndjson(tmp_path / "export.ndjson", [{"user": user, "events": None}, {"user": {**user,
                        "organization_user_id": "other@x.example"}}])  # fmt: skip
    out = tmp_path / "out.ndjson"
    result = cli("sync", data, "--config", make_config(tmp_path), "--dry-run", "--output", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    sent = {p["email"]: p for p in payloads(out)}
    assert sent["status@x.example"]["didomiNewsletterOptIn"] is True
    assert sent["other@x.example"]["didomiNewsletterOptIn"] is True


def test_a_killed_run_never_leaves_the_previous_runs_summary(tmp_path, cli):
    from didomi_marketo.report import Report

    report_dir = tmp_path / "r"
    data = write_ndjson(
        tmp_path / "e.ndjson", [event("a@x.example", "2026-11-20T10:00:00Z", {"newsletter": True})]
    )
    cli("sync", data, "--config", make_config(tmp_path), "--dry-run", "--report", report_dir, "--quiet")
    assert (report_dir / "summary.json").exists()
    Report(report_dir).close()  # the next run starts, and is killed before it ends
    assert not (report_dir / "summary.json").exists()


def test_an_incremental_run_sends_a_newer_country_for_a_lead_with_known_consent(tmp_path, cli, sandbox):
    """Run 1 sends consent and country DE; run 2 says only country FR (no consent in it). One full
    run over both sends FR, so the incremental run must too (it counted 'nothing to send')."""
    mappings = [
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiCountry", "value": "country"},
        {"id": "didomiConsentUpdatedAt", "value": "updated_at"},
    ]
    cfg = make_config(tmp_path, sandbox, mappings=mappings, upsert_mode=True)
    user = {"id": "u1", "organization_user_id": "cty@x.example", "created_at": "2026-11-01T00:00:00Z",
            "updated_at": "2026-11-10T10:00:00Z", "country": "DE",
            "consents": {"purposes": [{"id": "newsletter", "enabled": True}]}}  # fmt: skip
    later = {**user, "updated_at": "2026-11-20T10:00:00Z", "country": "FR", "consents": {"purposes": []}}
    first = write_ndjson(tmp_path / "u1.ndjson", [user])
    second = write_ndjson(
        tmp_path / "u2.ndjson", [{"type": "user.updated", "parameters": {"new_entity": later}}]
    )
    state = tmp_path / "state.db"
    assert cli("sync", first, "-c", cfg, "--state", state, "-q").exit_code == 0
    result = cli("sync", second, "-c", cfg, "--state", state, "-q")
    assert result.exit_code == 0, result.stderr
    (lead,) = sandbox.leads()
    assert lead["didomiCountry"] == "FR" and lead["didomiNewsletterOptIn"] is True
    assert lead["didomiConsentUpdatedAt"].startswith("2026-11-20T10:00:00")
    # a lead no earlier run sent consent for still has nothing to send (the documented rule)
    stranger = {**later, "organization_user_id": "new@x.example"}
    third = write_ndjson(
        tmp_path / "u3.ndjson", [{"type": "user.updated", "parameters": {"new_entity": stranger}}]
    )
    assert cli("sync", third, "-c", cfg, "--state", state, "-q").exit_code == 0
    assert [lead["email"] for lead in sandbox.leads()] == ["cty@x.example"]


def test_explain_prints_keys_and_values_that_look_like_markup_as_written(tmp_path, cli):
    """A value such as `[/z]` in free-form data crashed explain with a rich MarkupError."""
    mappings = [
        {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
        {"id": "didomiTopics", "value": "consents_purposes_newsletter_values_topics"},
    ]
    cfg = make_config(tmp_path, mappings=mappings)
    e = event("[/b]odd@x.example", "2026-11-20T10:00:00Z", {"newsletter": True})
    e["consents"]["purposes"][0]["values"] = {"topics": {"value": "[/z],[bold]"}}
    data = write_ndjson(tmp_path / "e.ndjson", [e])
    result = cli("explain", "[/b]odd@x.example", data, "--config", cfg)
    assert result.exit_code == 0, result.output
    assert "[/z],[bold]" in result.stdout and "[/b]odd@x.example" in result.stdout
