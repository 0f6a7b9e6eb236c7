"""`make bench`: delivery at Marketo's limits (compressed tenfold) and local pipeline speed.

1. Delivery: the sandbox runs in its own process with 100 calls per 2 s, 10 concurrent calls
   and 200 ms per call. We sync a generated 60,000-lead export into it and compare the achieved
   leads/s with the ceiling those limits allow: min(100 / 2 s, 10 / 0.2 s) calls/s x 300 leads.
2. Pipeline: a dry run over a generated export (1,000,000 users x 5 events by default), on one
   core: events/s and the peak RSS of the process.

Every figure printed is measured in this run. Data is generated into a temporary folder.
Environment knobs: BENCH_LEADS (60000), BENCH_USERS (1000000), BENCH_EVENTS (5), BENCH_RUNS (3).
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
from generate import BENCH_CONFIG, write_leads, write_partition  # noqa: E402

LEADS = int(os.environ.get("BENCH_LEADS", 60_000))
USERS = int(os.environ.get("BENCH_USERS", 1_000_000))
EVENTS = int(os.environ.get("BENCH_EVENTS", 5))
RUNS = int(os.environ.get("BENCH_RUNS", 3))
CLI = [sys.executable, "-m", "didomi_marketo"]

RATE_CALLS, RATE_WINDOW, CONCURRENCY, LATENCY, BATCH = 100, 2.0, 10, 0.2, 300


def start_sandbox(leads: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*CLI, "sandbox", "--port", "0", "--leads", str(leads), "--rate-calls", str(RATE_CALLS),
         "--rate-window", str(RATE_WINDOW), "--max-concurrency", str(CONCURRENCY),
         "--latency", str(LATENCY), "--daily-quota", "1000000"],
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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="didomi-bench-") as d:
        tmp = Path(d)
        print(f"== delivery: {LEADS} leads into the sandbox, {RUNS} runs ==", flush=True)
        delivery = bench_delivery(tmp)
        for k, v in delivery.items():
            print(f"  {k}: {v}")
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
