"""Reading on every core gives exactly what one core gives (issue #11): the same folded leads
(values, ties, `path:line`), the same rejects in the same order, the same counts, the same
payloads."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

from conftest import MAPPINGS, event, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.fold import Fold, FoldSchema
from didomi_marketo.inputs import InputStats, read_into
from didomi_marketo.mapping import FieldMapping, parse_property

PROPS = ["consents_purposes_newsletter_enabled", "consents_purposes_product_analytics_enabled", "country"]
KEYS = ["a@example.com", "B@example.com", "b@example.com", "c@example.com", "not-an-email", ""]
TIMES = ["2026-11-01T00:00:00Z", "2026-11-01T00:00:00+00:00", "2026-11-02T08:00:00Z", "yesterday"]


def _record(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["event", "event", "user", "export", "pending", "broken", "array"]))
    key = draw(st.sampled_from(KEYS))
    at = draw(st.sampled_from(TIMES))
    purposes = {"newsletter": draw(st.sampled_from([True, False, None]))}
    if draw(st.booleans()):
        purposes["product_analytics"] = draw(st.booleans())
    if kind == "event":
        return event(key, at, purposes)
    if kind == "pending":
        return event(key, at, purposes, status="pending_approval")
    user = {"organization_user_id": key, "updated_at": at, "country": draw(st.sampled_from(["FR", "DE"])),
            "consents": {"purposes": [{"id": p, "enabled": v} for p, v in purposes.items()]}}  # fmt: skip
    if kind == "user":
        return user
    if kind == "export":
        return {"user": user, "events": [event(None, at, {"newsletter": not purposes["newsletter"]})]}
    if kind == "array":
        return [event(key, at, purposes), 42]
    return "{not json"


@st.composite
def exports(draw: st.DrawFn) -> list[list[Any]]:
    """2 to 4 files of up to 12 records over a few keys and instants: collisions and ties."""
    return draw(st.lists(st.lists(st.composite(_record)(), max_size=12), min_size=2, max_size=4))


def write(folder: Path, files: list[list[Any]]) -> None:
    for n, records in enumerate(files):
        lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
        if n % 2:
            (folder / f"part-{n}.ndjson.gz").write_bytes(gzip.compress(lines.encode()))
        else:
            (folder / f"part-{n}.ndjson").write_text(lines)


def fold_with(
    folder: Path, jobs: int, spill: int
) -> tuple[dict[str, list[Any]], list[tuple], Any, InputStats]:
    schema = FoldSchema.from_mappings([FieldMapping(f"f{i}", parse_property(p)) for i, p in enumerate(PROPS)])
    issues: list[tuple] = []
    fold = Fold(schema, "email", frozenset({"gdpr"}), lambda *a: issues.append(a), spill_threshold=spill)
    stats = InputStats()
    try:
        read_into(fold, [str(folder), str(folder / "missing.ndjson")], False, stats, jobs=jobs)
        leads = dict(fold.leads())
    finally:
        fold.close()
    return leads, issues, fold.stats, stats


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=exports(), spill=st.sampled_from([1, 2, 1000]), jobs=st.sampled_from([2, 3]))
def test_every_core_folds_exactly_what_one_core_folds(files, spill, jobs):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write(folder, files)
        one = fold_with(folder, 1, spill)
        many = fold_with(folder, jobs, spill)
    leads1, issues1, fold1, input1 = one
    leadsn, issuesn, foldn, inputn = many
    assert leadsn == leads1  # every value, its timestamp, the tie winner and the source path:line
    assert issuesn == issues1  # the same rejects, in the same order
    assert foldn == fold1 and inputn == input1


def test_cli_payloads_are_the_same_with_one_job_or_several(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    files = [
        [event(f"u{i}@example.com", f"2026-11-0{1 + i % 3}T00:00:00Z", {"newsletter": i % 2 == 0}) for i in range(40)],
        [event(f"U{i}@example.com", "2026-11-02T00:00:00Z", {"newsletter": True}) for i in range(0, 40, 3)],
        [event(f"u{i}@example.com", "2026-11-02T00:00:00Z", {"newsletter": False}) for i in range(0, 40, 5)]
        + ["{broken"],
    ]  # fmt: skip
    write(folder, files)
    config = make_config(tmp_path, None, mappings=MAPPINGS)
    out = {}
    for jobs in (1, 2):
        res = cli("sync", folder, "-c", config, "--dry-run", "--jobs", jobs, "--output", tmp_path / f"o{jobs}",
                  "--report", tmp_path / f"r{jobs}", "-q")  # fmt: skip
        assert res.exit_code == 1  # the broken line
        out[jobs] = (tmp_path / f"o{jobs}").read_text()
        rejected = (tmp_path / f"r{jobs}" / "rejected.ndjson").read_text()
        assert "part-2.ndjson:9" in rejected
    assert out[1] == out[2] and len(out[1].splitlines()) == 40
