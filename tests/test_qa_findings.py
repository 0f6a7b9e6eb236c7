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
