"""Reading on every core gives exactly what one core gives (issue #11): the same folded leads
(values, ties, `path:line`), the same rejects in the same order, the same counts, the same
payloads."""

from __future__ import annotations

import functools
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import MAPPINGS, event, make_config, write_ndjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.fold import Fold, FoldSchema
from didomi_marketo.inputs import InputStats, read_into
from didomi_marketo.mapping import FieldMapping, parse_property

PROPS = ["consents_purposes_newsletter_enabled", "consents_purposes_product_analytics_enabled", "country"]
KEYS = ["a@example.com", "B@example.com", "b@example.com", "c@example.com", "not-an-email", ""]
TIMES = ["2026-11-01T00:00:00Z", "2026-11-01T00:00:00+00:00", "2026-11-02T08:00:00Z", "yesterday"]


FOLD_KINDS = ["event", "event", "user", "export", "pending", "broken", "array"]


def _record(
    draw: st.DrawFn, keys: list[str] = KEYS, times: list[str] = TIMES, kinds: list[str] = FOLD_KINDS
) -> Any:
    kind = draw(st.sampled_from(kinds))
    key = draw(st.sampled_from(keys))
    at = draw(st.sampled_from(times))
    purposes = {"newsletter": draw(st.sampled_from([True, False, None]))}
    if draw(st.booleans()):
        purposes["product_analytics"] = draw(st.booleans())
    if kind == "event":
        return event(key, at, purposes)
    if kind == "pending":
        return event(key, at, purposes, status="pending_approval")
    if kind == "ccpa":
        return event(key, at, purposes, regulation="ccpa")
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
    # The same payloads; on several cores they come shard by shard (README: the order of leads).
    assert sorted(out[1].splitlines()) == sorted(out[2].splitlines()) and len(out[1].splitlines()) == 40


@pytest.mark.parametrize("folder_name", ["we#ird", "why?", "100%41"])
def test_a_state_path_with_uri_characters_works_on_every_core(tmp_path, sandbox, cli, folder_name):
    """Workers open the state read-only through a SQLite URI: `#`, `?` and `%` in its path must
    stay part of the path (unescaped, `#` cut it short and opened another, empty file)."""
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder, [[event(f"u{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}) for i in range(part, 10, 2)]
                   for part in range(2)])  # fmt: skip
    config = make_config(tmp_path, sandbox, upsert_mode=True, mappings=MAPPINGS)
    state = tmp_path / folder_name / "state.db"
    state.parent.mkdir()
    res = cli("sync", folder, "-c", config, "--state", state, "--jobs", 2, "--report", tmp_path / "r", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["delivery"]["created"] == 10
    assert sorted(p.name for p in state.parent.iterdir() if not p.name.startswith("state.db")) == []


# ---------------------------------------------------------------------------------------------
# Planning on every core (sync, `--jobs` > 1): the workers that read also plan, each a key shard
# of the leads, against the state; the parent plans the state's pending and rechecked leads the
# input did not mention. Against one core: the same payloads, report lines, state and summary.

SYNC_KEYS = ["a@example.com", "A@example.com", "b@example.com", "c@example.com", "d@example.com",
             "e@example.com", "f@example.com", "g@example.com"]  # fmt: skip
IN_MARKETO = ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "f@example.com"]
SYNC_TIMES = [
    "2026-11-01T00:00:00Z",
    "2026-11-02T00:00:00Z",
    "2026-11-02T00:00:00.000Z",
    "2026-11-03T00:00:00Z",
]
SYNC_MAPPINGS = [
    *MAPPINGS,
    {"id": "didomiCountry", "value": "country"},
    {"id": "didomiConsentUpdatedAt", "value": "updated_at"},
]
# The state before the run: the prime run's first batch of 3 is delivered (e: 1004, skipped, as
# it is not in Marketo; a and b: confirmed), then the daily quota stops it: the rest is pending.
PRIME = [event(k, "2026-10-01T00:00:00Z", {"newsletter": i % 2 == 0, "product_analytics": True})
         for i, k in enumerate(["e@example.com", "a@example.com", "b@example.com", "c@example.com",
                                "d@example.com", "f@example.com", "g@example.com"])]  # fmt: skip


def _sync_record(draw: st.DrawFn) -> Any:
    return _record(
        draw, SYNC_KEYS, SYNC_TIMES, ["event", "event", "event", "user", "pending", "ccpa", "broken"]
    )


def _lines(path: Path, drop: tuple[str, ...] = ()) -> list[str]:
    """A report's NDJSON lines, without the fields that say when (not what)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append(json.dumps({k: v for k, v in rec.items() if k not in drop}, sort_keys=True))
    return out


def _summary(path: Path) -> dict[str, Any]:
    s = json.loads(path.read_text())
    out = {k: s[k] for k in ("leads", "fields", "input", "exit_code")}
    if "delivery" in s:
        out["delivery"] = {k: s["delivery"][k] for k in ("sent", "updated", "created", "skipped", "failed",
                                                        "failed_retryable", "stop_reason")}  # fmt: skip
    return out


def _sync_with(cli: Any, folder: Path, work: Path, jobs: int, spill: int) -> dict[str, Any]:
    """Prime a state (one core), then a dry run and a sync with `jobs` over `folder`: what each
    produced, in a form that does not depend on the order of the leads."""
    import httpx

    from didomi_marketo.sandbox import MarketoSandbox, SandboxConfig
    from didomi_marketo.sync import SyncOptions

    leads_file = write_ndjson(work / "leads.ndjson", [])
    leads_file.write_text(json.dumps([{"email": k} for k in IN_MARKETO]))
    sb = MarketoSandbox(SandboxConfig(leads_file=str(leads_file), daily_quota=2)).start()
    try:
        config = make_config(
            work, sb, mappings=SYNC_MAPPINGS, delivery={"batch_size": 3, "max_concurrency": 1}
        )
        state = work / "state.db"
        prime = write_ndjson(work / "prime" / "prime.ndjson", PRIME)
        assert cli("sync", prime, "-c", config, "--state", state, "-q").exit_code == 3  # the quota
        sb.config.daily_quota = 100_000
        httpx.post(sb.base_url + "/_sandbox/reset-quota")
        out: dict[str, Any] = {}
        with pytest.MonkeyPatch.context() as mp:
            # A tiny spill threshold: every fold (the parent's, each worker's) spills to SQLite.
            # (`sync` imports SyncOptions from didomi_marketo.sync when it runs.)
            tiny = functools.partial(SyncOptions, spill_threshold=spill)
            mp.setattr("didomi_marketo.sync.SyncOptions", tiny)
            dry = cli("sync", folder, "-c", config, "--state", state, "--recheck-skipped", "--dry-run",
                      "--jobs", jobs, "--output", work / "dry.ndjson", "--report", work / "dry", "-q")  # fmt: skip
            out["dry_exit"] = dry.exit_code
            out["dry_payloads"] = sorted(_lines(work / "dry.ndjson"))
            out["dry_summary"] = _summary(work / "dry" / "summary.json")
            # Without --output the workers send back only a few sample payloads: the same counts.
            cli("sync", folder, "-c", config, "--state", state, "--recheck-skipped", "--dry-run", "--jobs", jobs,
                "--report", work / "dry2", "-q")  # fmt: skip
            out["dry_summary_no_output"] = _summary(work / "dry2" / "summary.json")
            real = cli("sync", folder, "-c", config, "--state", state, "--recheck-skipped", "--jobs", jobs,
                       "--report", work / "r", "-q")  # fmt: skip
        out["exit"] = real.exit_code
        out["summary"] = _summary(work / "r" / "summary.json")
        for name in ("rejected", "ignored"):  # in input order, whatever the cores
            out[name] = _lines(work / "r" / f"{name}.ndjson") + _lines(work / "dry" / f"{name}.ndjson")
        for name in ("delivered", "undelivered"):
            out[name] = sorted(_lines(work / "r" / f"{name}.ndjson"))
        out["marketo"] = sorted(
            json.dumps({k: v for k, v in lead.items() if k not in ("createdAt", "updatedAt")}, sort_keys=True)
            for lead in sb.leads()
        )
        exported = cli("state", "export", "--state", state).stdout.splitlines()
        out["state"] = [{k: v for k, v in json.loads(x).items() if k != "confirmed_at"} for x in exported]
        return out
    finally:
        sb.stop()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.function_scoped_fixture])  # fmt: skip
@given(files=st.lists(st.lists(st.composite(_sync_record)(), max_size=10), min_size=2, max_size=4),
       spill=st.sampled_from([2, 250_000]))  # fmt: skip
def test_sync_on_every_core_sends_and_reports_exactly_what_one_core_does(cli, files, spill):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "in"
        folder.mkdir()
        write(folder, files)
        runs = {}
        for jobs in (1, 2):
            (Path(d) / f"j{jobs}").mkdir()
            runs[jobs] = _sync_with(cli, folder, Path(d) / f"j{jobs}", jobs, spill)
    one, two = runs[1], runs[2]
    assert one["state"] and one["summary"]["leads"]["folded"] >= 0
    for name in one:
        assert two[name] == one[name], name


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out.extend(int(c) for c in f.read().split())
    return out


def _reading_with_two_workers(tmp_path: Path) -> subprocess.Popen:
    """A dry run with --jobs 2 whose two workers are both reading (files big enough for it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(3):
        lines = (json.dumps(event(f"u{n}-{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}))
                 for i in range(60_000))  # fmt: skip
        (folder / f"part-{n}.ndjson").write_text("\n".join(lines) + "\n")
    config = make_config(tmp_path, None, mappings=MAPPINGS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "didomi_marketo", "sync", str(folder), "-c", str(config), "--dry-run", "--jobs", "2",
         "--report", str(tmp_path / "r"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while len(_children(proc.pid)) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its workers started: {proc.stderr.read()}")  # type: ignore[union-attr]
        subprocess.run(["sleep", "0.01"], check=True)
    return proc


LINUX_PROC = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="reads the process tree from /proc"
)


@LINUX_PROC
def test_a_parent_killed_while_reading_takes_its_workers_along_quietly(tmp_path):
    proc = _reading_with_two_workers(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # no chance to stop them itself
        # stderr closes once every process holding it is gone: the workers too.
        _, stderr = proc.communicate(timeout=120)  # a hang guard only
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


@LINUX_PROC
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_reading_stops_the_run_with_its_summary(tmp_path, sig):
    proc = _reading_with_two_workers(tmp_path)
    try:
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)  # a hang guard only
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr
    assert "interrupted" in stderr and "nothing was sent" in stderr and "Traceback" not in stderr, stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exit_code"] == 3 and "interrupted" in summary["error"]


@LINUX_PROC
def test_a_worker_killed_while_reading_fails_the_run_instead_of_hanging_it(tmp_path):
    """A worker that dies (the OOM killer, an operator's kill -9) must not leave the run waiting
    forever for its file: exit 3, summary.json says why, nothing recorded as synced."""
    proc = _reading_with_two_workers(tmp_path)
    try:
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)  # the hang this test is about
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr
    assert "worker process died" in stderr and "Traceback" not in stderr, stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exit_code"] == 3 and "worker process died" in summary["error"]


@LINUX_PROC
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_signal_while_a_dry_run_plans_stops_it_with_its_summary(tmp_path, jobs):
    """After the read, before anything could be sent: SIGTERM (a cron timeout) used to kill the
    run with 143 and no summary.json. Sent once the run says it is planning."""
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(3):  # 300,000 leads: their planning outlasts the signal's way by far
        lines = (json.dumps(event(f"u{n}-{i}@example.com", "2026-11-01T00:00:00Z", {"newsletter": True}))
                 for i in range(100_000))  # fmt: skip
        (folder / f"part-{n}.ndjson").write_text("\n".join(lines) + "\n")
    config = make_config(tmp_path, None, mappings=MAPPINGS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "didomi_marketo", "sync", str(folder), "-c", str(config), "--dry-run", "--jobs", jobs,
         "--report", str(tmp_path / "r"), "-q", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            entry = json.loads(line)
            if entry.get("event") == "progress" and entry.get("phase") == "plan":
                proc.send_signal(signal.SIGTERM)
                break
        else:
            pytest.fail("the run never said it was planning")
        stderr = proc.stderr.read()
        proc.wait(timeout=120)  # a hang guard only
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr
    assert "interrupted (SIGTERM) while planning a dry run: nothing was sent" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exit_code"] == 3 and "interrupted" in summary["error"]
