"""`make bench`: delivery at Marketo's limits (compressed tenfold) and local pipeline speed.

1. Delivery: the sandbox runs in its own process with 100 calls per 2 s, 10 concurrent calls
   and 200 ms per call. We sync a generated 60,000-lead export into it and compare the achieved
   leads/s with the ceiling those limits allow: min(100 / 2 s, 10 / 0.2 s) calls/s x 300 leads.
2. Pipeline: a dry run over a generated export (1,000,000 users x 5 events by default), on one
   core: events/s and the peak RSS of the process.
3. API calls, Sync Leads against bulk import: 100,000 users whose leads carry 15 different sets of
   fields, synced into a fresh sandbox each way. Counts every call the run made (the sandbox's
   own count: identity, describe, syncs, uploads, polls, failure files), scaled per 100,000 leads.
   Time is compressed 25x (rate window 20 s -> 0.8 s; polls every 0.2-1.2 s instead of 5-30 s;
   a job queues 0.2 s and imports 1 s plus 100,000 rows/s), so polls per job are what they would
   be at Marketo if a job took about 30 s.

Every figure printed is measured in this run. Data is generated into a temporary folder.
Environment knobs: BENCH_LEADS (60000), BENCH_USERS (1000000), BENCH_EVENTS (5), BENCH_RUNS (3),
BENCH_CALL_USERS (100000), BENCH_ONLY (delivery, pipeline or calls: run just that part).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generate import (  # noqa: E402
    BENCH_CONFIG,
    CALLS_CONFIG,
    write_field_set_users,
    write_leads,
    write_partition,
)

LEADS = int(os.environ.get("BENCH_LEADS", 60_000))
USERS = int(os.environ.get("BENCH_USERS", 1_000_000))
EVENTS = int(os.environ.get("BENCH_EVENTS", 5))
RUNS = int(os.environ.get("BENCH_RUNS", 3))
CALL_USERS = int(os.environ.get("BENCH_CALL_USERS", 100_000))
ONLY = os.environ.get("BENCH_ONLY", "")
TIME_SCALE = 25.0  # the calls comparison compresses Marketo's time this much
CLI = [sys.executable, "-m", "didomi_marketo"]

RATE_CALLS, RATE_WINDOW, CONCURRENCY, LATENCY, BATCH = 100, 2.0, 10, 0.2, 300


def start_sandbox(leads: Path | None, *extra: str) -> tuple[subprocess.Popen, str]:
    seed = ["--leads", str(leads)] if leads else []
    proc = subprocess.Popen(
        [*CLI, "sandbox", "--port", "0", *seed, "--rate-calls", str(RATE_CALLS),
         "--rate-window", str(RATE_WINDOW), "--max-concurrency", str(CONCURRENCY),
         "--latency", str(LATENCY), "--daily-quota", "1000000", *extra],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()  # "Marketo sandbox listening on http://127.0.0.1:PORT"
    return proc, line.strip().rsplit(" ", 1)[-1]


def bench_delivery(tmp: Path) -> dict:
    data = tmp / "delivery"
    write_partition(data, LEADS, 1, parts=2)
    leads = tmp / "leads.json"
    write_leads(leads, LEADS)
    ceiling_calls = min(RATE_CALLS / RATE_WINDOW, CONCURRENCY / LATENCY)
    ceiling = ceiling_calls * BATCH
    rates, totals, sixes = [], [], []
    for _ in range(RUNS):
        proc, url = start_sandbox(leads)
        try:
            config = dict(BENCH_CONFIG, authentication=dict(BENCH_CONFIG["authentication"], instance=url))
            cfg = tmp / "delivery.json"
            cfg.write_text(json.dumps(config))
            report = tmp / "delivery-report"
            started = time.perf_counter()
            run = subprocess.run(
                [*CLI, "sync", str(data), "-c", str(cfg), "--rate-window", str(RATE_WINDOW),
                 "--report", str(report), "-q"], capture_output=True, text=True,
            )  # fmt: skip
            wall = time.perf_counter() - started
            summary = json.loads((report / "summary.json").read_text())
            d = summary["delivery"]
            if run.returncode != 0 or d["updated"] != LEADS:
                raise SystemExit(f"delivery run failed: {run.returncode} {run.stderr[-500:]} {d}")
            rates.append(d["leads_per_second"])
            totals.append(LEADS / wall)
            sixes.append(d["rate_limited_606"] + d["concurrency_limited_615"])
        finally:
            proc.terminate()
            proc.wait()
    achieved = statistics.median(rates)
    return {
        "leads": LEADS,
        "limits": f"{RATE_CALLS} calls/{RATE_WINDOW:g} s, {CONCURRENCY} concurrent, {LATENCY * 1000:.0f} ms/call",
        "ceiling_leads_per_s": ceiling,
        "achieved_leads_per_s_median": round(achieved, 1),
        "ratio": round(achieved / ceiling, 3),
        "runs": [round(r, 1) for r in rates],
        "end_to_end_leads_per_s_median": round(statistics.median(totals), 1),
        "606_615_seen": sixes,
    }


def bench_pipeline(tmp: Path) -> dict:
    data = tmp / "pipeline"
    t = time.perf_counter()
    write_partition(data, USERS, EVENTS, parts=8)
    generated = time.perf_counter() - t
    cfg = tmp / "pipeline.json"
    cfg.write_text(json.dumps(BENCH_CONFIG))
    events = USERS * EVENTS
    walls, rss = [], []
    for _ in range(RUNS):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        # taskset keeps the dry run on one core, as the target says.
        cmd = [*CLI, "sync", str(data), "-c", str(cfg), "--dry-run", "-q"]
        if os.path.exists("/usr/bin/taskset"):
            cmd = ["taskset", "-c", "0", *cmd]
        run = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        if run.returncode != 0:
            raise SystemExit(f"dry run failed: {run.stderr[-500:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss.append(max(after, before) / 1024)  # KiB -> MiB; max over children so far
    wall = statistics.median(walls)
    return {
        "users": USERS,
        "events": events,
        "generate_seconds": round(generated, 1),
        "dry_run_seconds_median": round(wall, 2),
        "events_per_s_median": round(events / wall),
        "records_per_s_median": round((events + USERS) / wall),
        "peak_rss_mib": round(max(rss), 1),
        "runs_seconds": [round(w, 2) for w in walls],
    }


def _sandbox_stats(url: str) -> dict:
    import httpx

    return httpx.get(url + "/_sandbox/stats").json()


def bench_calls(tmp: Path) -> dict:
    """API calls per 100,000 leads: Sync Leads against bulk import, polls included."""
    data = tmp / "calls" / "users.ndjson"
    sets = write_field_set_users(data, CALL_USERS)
    per = 100_000 / CALL_USERS
    out: dict = {"users": CALL_USERS, "field_sets": sets}
    window = 20.0 / TIME_SCALE
    poll = {"bulk_poll_min_seconds": 5.0 / TIME_SCALE, "bulk_poll_max_seconds": 30.0 / TIME_SCALE}
    for via in ("rest", "bulk"):
        proc, url = start_sandbox(None, "--latency", "0", "--rate-window", str(window),
                                  "--bulk-queued-seconds", "0.2", "--bulk-import-seconds", "1")  # fmt: skip
        try:
            config = dict(CALLS_CONFIG, authentication=dict(CALLS_CONFIG["authentication"], instance=url),
                          delivery=poll)  # fmt: skip
            cfg = tmp / f"calls-{via}.json"
            cfg.write_text(json.dumps(config))
            report = tmp / f"calls-{via}-report"
            started = time.perf_counter()
            run = subprocess.run(
                [*CLI, "sync", str(data), "-c", str(cfg), "--via", via, "--rate-window", str(window),
                 "--report", str(report), "-q"], capture_output=True, text=True,
            )  # fmt: skip
            wall = time.perf_counter() - started
            d = json.loads((report / "summary.json").read_text())["delivery"]
            if run.returncode != 0 or d["created"] + d["updated"] + d["imported"] != CALL_USERS:
                raise SystemExit(f"calls run ({via}) failed: {run.returncode} {run.stderr[-500:]} {d}")
            seen = _sandbox_stats(url)
        finally:
            proc.terminate()
            proc.wait()
        row = {
            "calls_seen_by_marketo": seen["calls_total"] + seen["identity_calls"],
            "calls_per_100k_leads": round((seen["calls_total"] + seen["identity_calls"]) * per, 1),
            "seconds": round(wall, 1),
        }
        if via == "rest":
            row["sync_leads_calls"] = seen["sync_calls"]
        else:
            b = d["bulk"]
            row |= {"uploads": b["uploads"], "polls": b["polls"], "file_fetches": b["file_fetches"],
                    "queue_full_waits": b["queue_full_waits"]}  # fmt: skip
        out[via] = row
    return out


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="didomi-bench-") as d:
        tmp = Path(d)
        if ONLY in ("", "calls"):
            print(f"== API calls: {CALL_USERS} users, 15 sets of fields, Sync Leads vs bulk ==", flush=True)
            calls = bench_calls(tmp)
            for k, v in calls.items():
                print(f"  {k}: {v}")
            print(f"  bulk uploads {calls['bulk']['uploads']} for {calls['field_sets']} sets of fields "
                  f"(target: one per set per 10 MB): "
                  f"{'OK' if calls['bulk']['uploads'] == calls['field_sets'] else 'MORE'}")  # fmt: skip
            if ONLY:
                return
        if ONLY == "pipeline":
            pipeline = bench_pipeline(tmp)
            for k, v in pipeline.items():
                print(f"  {k}: {v}")
            return
        print(f"== delivery: {LEADS} leads into the sandbox, {RUNS} runs ==", flush=True)
        delivery = bench_delivery(tmp)
        for k, v in delivery.items():
            print(f"  {k}: {v}")
        if ONLY == "delivery":
            return
        print(f"== pipeline: dry run over {USERS} users x {EVENTS} events, {RUNS} runs ==", flush=True)
        pipeline = bench_pipeline(tmp)
        for k, v in pipeline.items():
            print(f"  {k}: {v}")
        print("== targets ==")
        print(f"  delivery ratio {delivery['ratio']:.3f} (target >= 0.9): "
              f"{'OK' if delivery['ratio'] >= 0.9 else 'BELOW'}")  # fmt: skip
        print(f"  pipeline {pipeline['events_per_s_median']} events/s (target >= 100000): "
              f"{'OK' if pipeline['events_per_s_median'] >= 100_000 else 'BELOW'}")  # fmt: skip
        print(f"  pipeline peak RSS {pipeline['peak_rss_mib']} MiB (target < 300): "
              f"{'OK' if pipeline['peak_rss_mib'] < 300 else 'ABOVE'}")  # fmt: skip


if __name__ == "__main__":
    main()
