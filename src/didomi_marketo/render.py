"""Rich rendering of run summaries, kept apart from the library so the CLI stays thin."""

from __future__ import annotations

from typing import Any

import orjson
from rich.console import Console
from rich.table import Table


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"didomi-marketo {summary['mode']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    inp = summary["input"]
    leads = summary["leads"]
    rows: list[tuple[str, Any]] = [
        ("files read", inp["files"]),
        ("records read", inp["records"]),
        ("  events / user statuses", f"{inp['events']} / {inp['user_statuses']}"),
        ("  rejected", inp["rejected"]),
        ("  ignored: anonymous", inp["ignored"]["anonymous"]),
        ("  ignored: pending approval", inp["ignored"]["pending"]),
        ("  ignored: other regulation", inp["ignored"]["other_regulation"]),
        ("  ignored: deleted", inp["ignored"]["deleted"]),
        ("leads folded", leads["folded"]),
        ("  nothing mapped to send", leads["nothing_to_send"]),
    ]
    if leads.get("unchanged"):
        rows.append(("  unchanged since last sync", leads["unchanged"]))
    rows.append(("leads to send", leads["to_send"]))
    d = summary.get("delivery")
    if d:
        rows += [
            ("  posted to Marketo", d["sent"]),
            ("  created", d["created"]),
            ("  updated", d["updated"]),
        ]
        for code, n in d["skipped"].items():
            rows.append((f"  skipped {code}", n))
        rows += [
            ("  failed (retryable)", f"{d['failed']} ({d['failed_retryable']})"),
            ("calls / retries / re-auths", f"{d['calls']} / {d['retries']} / {d['reauths']}"),
            ("backoff seconds", d["backoff_seconds"]),
            ("606 / 615 seen", f"{d['rate_limited_606']} / {d['concurrency_limited_615']}"),
            ("leads/s (delivery)", d["leads_per_second"]),
        ]
    for what, n in rows:
        table.add_row(what, str(n))
    return table


def fields_table(summary: dict[str, Any]) -> Table:
    table = Table(title="per Marketo field (leads)", title_justify="left")
    for col in ("field", "true", "false", "other", "absent"):
        table.add_column(col, justify="left" if col == "field" else "right")
    for name, c in summary["fields"].items():
        table.add_row(name, str(c["true"]), str(c["false"]), str(c["other"]), str(c["absent"]))
    return table


def print_summary(console: Console, summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    console.print(summary_table(summary))
    if summary["mode"] == "dry-run" or summary["leads"]["to_send"]:
        console.print(fields_table(summary))
    if summary["mode"] == "dry-run" and samples:
        console.print("[bold]sample payloads[/bold]")
        for s in samples:
            console.print(orjson.dumps(s).decode(), markup=False, highlight=False, soft_wrap=True)
