"""The one stderr writer: JSON lines a collector can parse, text lines a person can read."""

from __future__ import annotations

import json

import pytest

from didomi_marketo import logs


@pytest.fixture(autouse=True)
def _reset():
    yield
    logs.setup("text")


def lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return err.splitlines()


def test_json_every_line_is_an_object_with_event_level_ts(capsys):
    logs.setup("json")
    logs.rejected("data/a.ndjson:7", "invalid email", key="not-an-email")
    logs.warning("schema check skipped")
    logs.error("bad credentials")
    logs.event("progress", phase="read", done=10, total=None)
    out = [json.loads(line) for line in lines(capsys)]
    assert [o["event"] for o in out] == ["rejected", "warning", "error", "progress"]
    assert [o["level"] for o in out] == ["warning", "warning", "error", "info"]
    assert all(o["ts"].endswith("Z") and o["ts"][10] == "T" for o in out)
    assert out[0] | {"ts": None} == {
        "ts": None, "level": "warning", "event": "rejected", "message": "data/a.ndjson:7: invalid email",
        "source": "data/a.ndjson:7", "reason": "invalid email", "key": "not-an-email",
    }  # fmt: skip
    assert out[3]["phase"] == "read" and out[3]["total"] is None and "message" not in out[3]


def test_json_crash_keeps_the_traceback_on_one_line(capsys):
    logs.setup("json")
    try:
        {}["missing"]
    except KeyError as e:
        logs.crash(e)
    (line,) = lines(capsys)
    obj = json.loads(line)
    assert obj["event"] == "crash" and obj["level"] == "critical"
    assert obj["exception"] == "KeyError: 'missing'" and "Traceback" in obj["traceback"]


def test_a_field_named_like_a_logrecord_attribute_is_kept(capsys):
    logs.setup("json")
    logs.event("start", filename="x.json", msg="m", levelname="nope")
    obj = json.loads(lines(capsys)[0])
    assert (obj["filename"], obj["msg"], obj["level"]) == ("x.json", "m", "info")


def test_text_prefixes_levels_shows_rejected_bare_and_hides_structured_events(capsys):
    logs.setup("text")
    logs.rejected("a.ndjson:3", "not JSON")
    logs.warning("careful")
    logs.error("broken")
    logs.event("start", command="sync")  # no message: for collectors only
    logs.event("progress", phase="read", done=1, total=2)
    assert lines(capsys) == ["a.ndjson:3: not JSON", "warning: careful", "error: broken"]


def test_progress_log_throttles_within_a_phase_but_not_across(capsys):
    logs.setup("json")
    now = [0.0]
    progress = logs.ProgressLog(every=10, clock=lambda: now[0])
    for t, phase in [(0, "read"), (1, "read"), (2, "fold"), (3, "fold"), (12.5, "fold"), (13, "deliver")]:
        now[0] = t
        progress(phase, int(t), None)
    assert [(o["phase"], o["done"]) for o in map(json.loads, lines(capsys))] == [
        ("read", 0), ("fold", 2), ("fold", 12), ("deliver", 13),
    ]  # fmt: skip


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="expected text or json"):
        logs.setup("xml")


def test_known_secrets_never_reach_stderr_in_text_or_json(capsys):
    from didomi_marketo.marketo import redact

    redact.register("s3cr3t-value-xyz")
    for fmt in ("text", "json"):
        logs.setup(fmt)
        logs.error("server said: bad secret s3cr3t-value-xyz")
        logs.event("start", config={"client_secret": "s3cr3t-value-xyz"})
    err = capsys.readouterr().err
    assert "s3cr3t-value-xyz" not in err and err.count("***") == 3
