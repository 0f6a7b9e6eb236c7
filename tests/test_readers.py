"""Input stage: files, folders, gzip, stdin -> raw records with their `path:line`.

Format is detected by content (never by file name); line numbers point at the record: the NDJSON
line, or the line where the record's `{` starts in a JSON document (decompressed text for .gz).
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import event, write_ndjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.readers import (
    IncompletePartition,
    InputFile,
    LinedDocument,
    Problem,
    Skipped,
    discover,
    read_records,
    sniff_json,
)
from didomi_marketo.didomi.records import Observation, observations

# ---------------------------------------------------------------------------------------------
# helpers


def input_file(path: Path) -> InputFile:
    return InputFile(path, str(path))


def raw(path: Path) -> list[Any]:
    """read_records output for one file."""
    return list(read_records(input_file(path)))


def records(path: Path | str) -> list[tuple[str, Any, int]]:
    """(kind, didomi user id, line) for every observation of one file (or '-' for stdin)."""
    f = InputFile(Path("-"), "<stdin>") if path == "-" else input_file(Path(path))
    out: list[tuple[str, Any, int]] = []
    for rec in read_records(f):
        if isinstance(rec, Problem):
            out.append(("problem", rec.reason, rec.line))
            continue
        value, line = rec
        for ob in observations(value, line):
            if isinstance(ob, Observation):
                out.append((ob.kind, ob.user.get("id"), ob.line))
            else:
                out.append((ob.category, ob.reason, ob.line))
    return out


def ev(n: int, key: str = "a@example.com") -> dict[str, Any]:
    """An event whose user id `u<n>` identifies it in the output."""
    e = event(key, f"2026-01-01T00:00:{n:02d}Z", {"newsletter": n % 2 == 0})
    e["user"]["id"] = f"u{n}"
    return e


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def displays(items: list[Any]) -> list[str]:
    return [i.display for i in items if isinstance(i, InputFile)]


# ---------------------------------------------------------------------------------------------
# format detection


def test_ndjson_one_record_per_line_with_line_numbers(tmp_path):
    p = write_ndjson(tmp_path / "x.ndjson", [ev(1), ev(2), ev(3)])
    assert records(p) == [("event", "u1", 1), ("event", "u2", 2), ("event", "u3", 3)]


def test_pretty_json_array_records_carry_the_line_of_their_opening_brace(tmp_path):
    text = json.dumps([ev(1), ev(2)], indent=2)
    p = write(tmp_path / "x.txt", text)
    lines = text.split("\n")
    got = records(p)
    assert [r[:2] for r in got] == [("event", "u1"), ("event", "u2")]
    for _, uid, line in got:
        assert lines[line - 1].strip() == "{", (uid, line)
    assert got[0][2] == 2  # `[` is line 1, the first record starts on line 2
    assert got[1][2] > got[0][2] + 5


def test_pretty_json_object_document(tmp_path):
    p = write(tmp_path / "doc.json", "\n\n" + json.dumps(ev(7), indent=4))
    assert records(p) == [("event", "u7", 3)]  # two blank lines before the document


def test_compact_one_line_array_gives_every_record_line_one(tmp_path):
    p = write(tmp_path / "arr.json", json.dumps([ev(1), ev(2), ev(3)]))
    assert records(p) == [("event", "u1", 1), ("event", "u2", 1), ("event", "u3", 1)]


def test_records_nested_in_arrays_of_a_document(tmp_path):
    text = (
        "[\n  [\n    "
        + json.dumps(ev(1))
        + ",\n    "
        + json.dumps(ev(2))
        + "\n  ],\n  "
        + json.dumps(ev(3))
        + "\n]\n"
    )
    p = write(tmp_path / "nested.json", text)
    assert records(p) == [("event", "u1", 3), ("event", "u2", 4), ("event", "u3", 6)]


def test_consents_api_page_items_carry_their_own_line(tmp_path):
    users = [
        {
            "id": f"u{i}",
            "organization_user_id": f"p{i}@example.com",
            "updated_at": "2026-01-01T00:00:00Z",
            "metadata": {"nested": {"deep": {"x": 1}}},
            "consents": {"purposes": [{"id": "newsletter", "enabled": True, "metadata": {}}]},
        }
        for i in range(3)
    ]
    # `limit`/`cursor` before and after `data`, an object-valued key before data: none of them
    # may shift the lines of the items.
    page = {"meta": {"x": {"y": 1}}, "data": users, "limit": 100, "cursor": None}
    text = json.dumps(page, indent=2)
    p = write(tmp_path / "page.json", text)
    got = records(p)
    assert [r[:2] for r in got] == [("user", "u0"), ("user", "u1"), ("user", "u2")]
    lines = text.split("\n")
    for _, uid, line in got:
        assert lines[line - 1].strip() == "{"
        assert f'"id": "{uid}"' in lines[line]  # the item's first key is on the next line


def test_consents_api_page_inside_an_array_and_after_another_record(tmp_path):
    page = {"data": [ev(2), ev(3)], "limit": 2, "cursor": "abc"}
    text = json.dumps([ev(1), page, ev(4)], indent=1)
    got = records(write(tmp_path / "p.json", text))
    assert [r[1] for r in got] == ["u1", "u2", "u3", "u4"]
    lines = text.split("\n")
    for _, uid, line in got:
        # the record starts at `line`; its user id is further down but before the next record
        nxt = [g[2] for g in got if g[2] > line]
        window = "\n".join(lines[line - 1 : (min(nxt) - 1) if nxt else None])
        assert f'"id": "{uid}"' in window


def test_string_values_with_braces_newline_escapes_and_quotes_do_not_shift_lines(tmp_path):
    tricky = ev(1)
    tricky["metadata"] = {"note": 'has { and } and "quotes" \\ and \n newline { {', "k{": "{"}
    text = json.dumps([tricky, ev(2)], indent=2, ensure_ascii=False)
    got = records(write(tmp_path / "t.json", text))
    lines = text.split("\n")
    assert [r[1] for r in got] == ["u1", "u2"]
    assert lines[got[1][2] - 1].strip() == "{"
    assert '"id": "evt-' in lines[got[1][2]]
    assert "u2" in "\n".join(lines[got[1][2] - 1 :])


@pytest.mark.parametrize("name", ["data.ndjson", "data.json", "data.txt", "noext"])
def test_gzip_is_detected_by_content_whatever_the_extension(tmp_path, name):
    body = "".join(json.dumps(ev(i)) + "\n" for i in range(1, 4))
    p = write(tmp_path / name, gzip.compress(body.encode()))
    assert records(p) == [("event", "u1", 1), ("event", "u2", 2), ("event", "u3", 3)]


def test_gzip_of_a_pretty_document_reports_decompressed_lines(tmp_path):
    text = json.dumps([ev(1), ev(2)], indent=2)
    plain = records(write(tmp_path / "plain.json", text))
    packed = records(write(tmp_path / "packed.json.gz", gzip.compress(text.encode())))
    assert packed == plain
    assert plain[0][2] == 2


def test_gzip_of_a_compact_array(tmp_path):
    p = write(tmp_path / "a.json", gzip.compress(json.dumps([ev(1), ev(2)]).encode()))
    assert records(p) == [("event", "u1", 1), ("event", "u2", 1)]


def test_plain_file_named_gz_is_read_as_plain(tmp_path):
    p = write(tmp_path / "x.json.gz", json.dumps(ev(1)) + "\n")
    assert records(p) == [("event", "u1", 1)]


@pytest.mark.parametrize("compress", [False, True])
def test_stdin_dash_reads_ndjson_and_gzip(monkeypatch, compress):
    body = ("\n" + json.dumps(ev(1)) + "\n" + json.dumps(ev(2)) + "\n").encode()
    if compress:
        body = gzip.compress(body)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    (item,) = list(discover(["-"]))
    assert item.display == "<stdin>"
    assert records("-") == [("event", "u1", 2), ("event", "u2", 3)]


def test_stdin_pretty_document(monkeypatch):
    body = json.dumps({"data": [ev(5)], "limit": 1, "cursor": None}, indent=2).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body)))
    assert records("-") == [("event", "u5", 3)]


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_json_line_is_a_problem_at_its_line_and_other_lines_still_yield(tmp_path):
    text = json.dumps(ev(1)) + "\n" + '{"broken": \n' + "\n" + json.dumps(ev(2)) + "\nnot json at all\n"
    got = records(write(tmp_path / "x.ndjson", text))
    assert [(g[0], g[2]) for g in got] == [("event", 1), ("problem", 2), ("event", 4), ("problem", 5)]
    assert got[1][1].startswith("invalid JSON")


def test_ndjson_whose_first_line_is_broken_still_yields_the_rest(tmp_path):
    text = '{"user": {"organization_user_id": "x@example.com", "consents": {"purposes": [\n'
    text += json.dumps(ev(1)) + "\n" + json.dumps(ev(2)) + "\n"
    got = records(write(tmp_path / "x.ndjson", text))
    assert [(g[0], g[2]) for g in got] == [("problem", 1), ("event", 2), ("event", 3)]
    assert [g[1] for g in got[1:]] == ["u1", "u2"]


def test_broken_first_line_after_blank_lines_keeps_true_line_numbers(tmp_path):
    text = "\n\n{oops\n" + json.dumps(ev(1)) + "\n"
    got = records(write(tmp_path / "x.ndjson", text))
    assert [(g[0], g[2]) for g in got] == [("problem", 3), ("event", 4)]


def test_gz_ndjson_with_broken_first_line(tmp_path):
    text = "{oops\n" + json.dumps(ev(1)) + "\n"
    got = records(write(tmp_path / "x.gz", gzip.compress(text.encode())))
    assert [(g[0], g[2]) for g in got] == [("problem", 1), ("event", 2)]


def test_broken_pretty_document_is_one_problem_at_the_error_line(tmp_path):
    text = '{\n  "user": {\n    "a": 1,\n  }\n}\n'  # trailing comma on line 3, error seen on line 4
    got = records(write(tmp_path / "x.json", text))
    assert len(got) == 1 and got[0][0] == "problem"
    assert got[0][2] in (3, 4)


def test_blank_lines_are_skipped_and_do_not_shift_numbers(tmp_path):
    text = "\n   \n" + json.dumps(ev(1)) + "\n\n\t\n" + json.dumps(ev(2)) + "\n\n"
    assert records(write(tmp_path / "x.ndjson", text)) == [("event", "u1", 3), ("event", "u2", 6)]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", gzip.compress(b""), gzip.compress(b"\n\n")])
def test_empty_files_yield_nothing(tmp_path, content):
    assert raw(write(tmp_path / "empty.json", content)) == []


def test_crlf_line_endings(tmp_path):
    text = json.dumps(ev(1)) + "\r\n" + json.dumps(ev(2)) + "\r\n"
    assert records(write(tmp_path / "x.ndjson", text)) == [("event", "u1", 1), ("event", "u2", 2)]


def test_truncated_gzip_is_a_problem_not_a_crash(tmp_path):
    body = gzip.compress(("".join(json.dumps(ev(i)) + "\n" for i in range(40))).encode())
    got = raw(write(tmp_path / "x.gz", body[: len(body) // 2]))
    assert got and isinstance(got[-1], Problem) and "cannot read" in got[-1].reason


def test_non_object_ndjson_lines_are_rejected_at_their_line(tmp_path):
    got = records(write(tmp_path / "x.ndjson", '42\n"text"\nnull\n' + json.dumps(ev(1)) + "\n"))
    assert [(g[0], g[2]) for g in got] == [("rejected", 1), ("rejected", 2), ("rejected", 3), ("event", 4)]


def test_missing_path_is_a_problem(tmp_path):
    (item,) = list(discover([str(tmp_path / "nope.json")]))
    assert isinstance(item, Problem) and "no such file" in item.reason


def test_document_values_are_lined_documents(tmp_path):
    (rec,) = raw(write(tmp_path / "d.json", json.dumps([ev(1)], indent=2)))
    value, line = rec
    assert isinstance(value, LinedDocument) and line == 1
    assert value.object_lines[0] == 2


# ---------------------------------------------------------------------------------------------
# folders


def test_folder_walk_is_sorted_recursive_and_skips_hidden_and_underscore_files(tmp_path):
    root = tmp_path / "in"
    for rel in [
        "b.ndjson",
        "a.ndjson",
        "sub/c.ndjson",
        "sub/deeper/a.json",
        ".hidden.ndjson",
        "_SUCCESS",
        "_meta.json",
        ".git/config.json",
        "A.ndjson",
    ]:
        write(root / rel, json.dumps(ev(1)) + "\n")
    got = displays(list(discover([str(root)])))
    rels = [str(Path(d).relative_to(root)) for d in got]
    assert rels == ["A.ndjson", "a.ndjson", "b.ndjson", "sub/c.ndjson", "sub/deeper/a.json"]
    assert all(isinstance(i, InputFile) and i.walked for i in discover([str(root)]))


def test_explicit_file_is_not_marked_walked(tmp_path):
    p = write(tmp_path / "_underscore.ndjson", json.dumps(ev(1)) + "\n")
    (item,) = list(discover([str(p)]))
    assert isinstance(item, InputFile) and not item.walked  # named explicitly: read it


def test_paths_are_taken_in_command_line_order(tmp_path):
    a = write(tmp_path / "z.ndjson", "{}\n")
    b = write(tmp_path / "a.ndjson", "{}\n")
    assert displays(list(discover([str(a), str(b)]))) == [str(a), str(b)]


@pytest.mark.parametrize(
    ("content", "is_json"),
    [
        (b"# README\nThis folder holds exports\n", False),
        (b"date,user\n1,2\n", False),
        (b'\n\n  {"a": 1}\n', True),
        (b"[\n]", True),
        (b"", True),
        (gzip.compress(b'{"a": 1}\n'), True),
        (gzip.compress(b"plain text, gzipped"), False),
    ],
)
def test_sniff_json_skips_non_json_files(tmp_path, content, is_json):
    assert sniff_json(input_file(write(tmp_path / "README", content))) is is_json


@pytest.mark.parametrize("name", ["events.ndjson", "part-0.json.gz", "users.JSONL", "page.json"])
def test_a_file_named_as_data_is_read_even_when_its_first_line_is_broken(tmp_path, name):
    """Skipping it would drop every good record after the broken line without a word."""
    assert sniff_json(input_file(write(tmp_path / name, b'not json\n{"a": 1}\n')))


def test_a_broken_first_line_in_a_folder_is_rejected_and_the_rest_is_read(tmp_path, cli):
    from conftest import event, make_config

    folder = tmp_path / "in"
    folder.mkdir()
    good = json.dumps(event("a@x.example", "2026-11-20T10:00:00Z", {"newsletter": True}))
    (folder / "events.ndjson").write_text("not json at all\n" + good + "\n")
    (folder / "README.md").write_text("# what this folder holds\n")
    out = tmp_path / "payloads.ndjson"
    result = cli("sync", folder, "--config", make_config(tmp_path), "--dry-run", "--output", out, "--quiet")
    assert result.exit_code == 1  # a rejected record
    assert f"{folder / 'events.ndjson'}:1" in result.stderr
    assert [json.loads(line)["email"] for line in out.read_text().splitlines()] == ["a@x.example"]


# ---------------------------------------------------------------------------------------------
# export partitions


def partition(tmp_path: Path, success: str | None = "users") -> Path:
    users = tmp_path / "exp" / "export-id=e1" / "date=2026-11-27" / "users"
    write(users / "part-00001.json.gz", gzip.compress((json.dumps(ev(2)) + "\n").encode()))
    write(users / "part-00000.json.gz", gzip.compress((json.dumps(ev(1)) + "\n").encode()))
    write(users / "notes.txt", "not data")
    write(users / "part-00002.json", json.dumps(ev(3)) + "\n")  # not .json.gz: ignored
    write(users / "part-00003.ndjson", json.dumps(ev(3)) + "\n")
    if success == "users":
        write(users / "_SUCCESS", "")
    elif success == "date":
        write(users.parent / "_SUCCESS", "")
    return users


@pytest.mark.parametrize("success", ["users", "date"])
def test_complete_partition_reads_only_json_gz(tmp_path, success):
    users = partition(tmp_path, success)
    items = list(discover([str(tmp_path / "exp")]))
    assert displays(items) == [str(users / "part-00000.json.gz"), str(users / "part-00001.json.gz")]
    # The rest is not read, but named: never silently dropped.
    assert sorted(i.path for i in items if isinstance(i, Skipped)) == [
        str(users / n) for n in ("notes.txt", "part-00002.json", "part-00003.ndjson")
    ]
    assert all(isinstance(i, InputFile | Skipped) for i in items)
    assert {i.partition for i in items if isinstance(i, InputFile)} == {str(users)}


@pytest.mark.parametrize(
    "start", ["exp", "exp/export-id=e1/date=2026-11-27", "exp/export-id=e1/date=2026-11-27/users"]
)
def test_partition_without_success_is_refused(tmp_path, start):
    users = partition(tmp_path, None)
    items = list(discover([str(tmp_path / start)]))
    assert len(items) == 1 and isinstance(items[0], IncompletePartition)
    assert items[0].partition == str(users)
    assert "_SUCCESS" in str(items[0]) and "--allow-incomplete" in str(items[0])


def test_partition_without_success_is_read_with_allow_incomplete(tmp_path):
    users = partition(tmp_path, None)
    items = list(discover([str(tmp_path / "exp")], allow_incomplete=True))
    assert displays(items) == [str(users / "part-00000.json.gz"), str(users / "part-00001.json.gz")]


def test_incomplete_partition_does_not_stop_other_inputs(tmp_path):
    partition(tmp_path, None)
    other = write(tmp_path / "exp" / "webhooks" / "w.ndjson", json.dumps(ev(9)) + "\n")
    items = list(discover([str(tmp_path / "exp")]))
    assert [type(i).__name__ for i in items] == ["IncompletePartition", "InputFile"]
    assert items[1].display == str(other) and items[1].partition is None


def test_file_named_inside_an_incomplete_partition_is_refused(tmp_path):
    users = partition(tmp_path, None)
    (item,) = list(discover([str(users / "part-00000.json.gz")]))
    assert isinstance(item, IncompletePartition) and item.partition == str(users)
    (item,) = list(discover([str(users / "part-00000.json.gz")], allow_incomplete=True))
    assert isinstance(item, InputFile) and item.partition == str(users)


def test_date_folder_without_users_is_not_a_partition(tmp_path):
    p = write(tmp_path / "date=2026-01-01" / "x.ndjson", json.dumps(ev(1)) + "\n")
    assert displays(list(discover([str(tmp_path)]))) == [str(p)]


# ---------------------------------------------------------------------------------------------
# property: the same records whatever the container


purpose_ids = st.sampled_from(["newsletter", "product_analytics", "purpose_id", "a_preferences_b"])
text = st.text(alphabet=st.sampled_from('ab{}[]"\\\n\t é,:'), max_size=8)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), text)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(text, kids, max_size=3)),
    max_leaves=6,
)


@st.composite
def didomi_events(draw) -> list[dict[str, Any]]:
    n = draw(st.integers(0, 8))
    out = []
    for i in range(n):
        e = {
            "id": f"evt-{i}",
            "created_at": f"2026-01-{draw(st.integers(1, 28)):02d}T00:00:00Z",
            "user": {
                "id": f"u{i}",
                "organization_user_id": draw(st.sampled_from(["a@x.io", "b@x.io", None])),
            },
            "consents": {
                "purposes": [
                    {"id": p, "enabled": draw(st.sampled_from([True, False, None])), "metadata": {}}
                    for p in draw(st.lists(purpose_ids, max_size=3, unique=True))
                ]
            },
        }
        if draw(st.booleans()):
            e["metadata"] = draw(json_value)  # nested objects and tricky strings before/after
        if draw(st.booleans()):
            e["status"] = draw(st.sampled_from(["confirmed", "pending_approval"]))
        out.append(e)
    return out


def summary(path: Path) -> list[tuple[Any, ...]]:
    out = []
    for rec in read_records(input_file(path)):
        assert not isinstance(rec, Problem), rec
        value, line = rec
        for ob in observations(value, line):
            assert isinstance(ob, Observation), ob
            out.append((ob.user["id"], ob.key, ob.timestamp, ob.status, ob.consents, ob.line))
    return out


def check_lines(text: str, got: list[tuple[Any, ...]], per_line: bool) -> None:
    lines = text.split("\n")
    starts = [g[-1] for g in got]
    assert starts == sorted(starts)
    for i, g in enumerate(got):
        uid, line = g[0], g[-1]
        if per_line:
            assert f'"id": "{uid}"' in lines[line - 1]
        else:
            assert lines[line - 1].lstrip().startswith("{")
            end = starts[i + 1] if i + 1 < len(starts) else len(lines)
            window = "\n".join(lines[line - 1 : end])
            assert f'"id": "{uid}"' in window


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=didomi_events(), indent=st.sampled_from([1, 2, 4]), blank=st.integers(0, 2))
def test_same_records_as_ndjson_pretty_array_compact_array_and_gzip(tmp_path_factory, events, indent, blank):
    d = tmp_path_factory.mktemp("prop")
    ndjson = "\n" * blank + "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
    pretty = "\n" * blank + json.dumps(events, indent=indent, ensure_ascii=False)
    compact = json.dumps(events)
    forms = {
        "ndjson": write(d / "a", ndjson),
        "pretty": write(d / "b", pretty),
        "ndjson.gz": write(d / "c", gzip.compress(ndjson.encode())),
        "pretty.gz": write(d / "d", gzip.compress(pretty.encode())),
        "compact": write(d / "e", compact),
    }
    got = {name: summary(p) for name, p in forms.items()}
    expected = [
        (e["user"]["id"], e["user"]["organization_user_id"], e["created_at"], e.get("status"), e["consents"])
        for e in events
    ]
    for name, recs in got.items():
        assert [r[:-1] for r in recs] == expected, name
    check_lines(ndjson, got["ndjson"], per_line=True)
    check_lines(pretty, got["pretty"], per_line=False)
    assert got["ndjson.gz"] == got["ndjson"]
    assert got["pretty.gz"] == got["pretty"]
    assert all(r[-1] == 1 for r in got["compact"])


def test_unrecognised_object_in_a_document_is_rejected_at_its_own_line(tmp_path):
    text = json.dumps([ev(1), 7, {"hello": "world"}], indent=2)
    got = records(write(tmp_path / "x.json", text))
    assert [g[0] for g in got] == ["event", "rejected", "rejected"]
    lines = text.split("\n")
    assert lines[got[2][2] - 1].strip() == "{"
    assert '"hello"' in lines[got[2][2]]
