"""Rich rendering of run summaries, kept apart from the library so the CLI stays thin."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"didomi-marketo {summary['mode']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    leads = summary["leads"]
    rows: list[tuple[str, Any]] = []
    if "input" not in summary:  # a retry reads a report, not inputs: the same table from "leads"
        rows += [
            ("leads retryable in the report", leads["retryable"]),
            ("  unchanged since (a newer sync sent them)", leads["unchanged"]),
        ]
        return _with_delivery(table, rows, summary)
    inp = summary["input"]
    rows += [
        ("files read", inp["files"]),
        *(
            [("  files skipped (not data, or not regular files)", inp["files_skipped"])]
            if inp["files_skipped"]
            else []
        ),
        *([("  files unchanged since last sync", inp["files_unchanged"])] if inp["files_unchanged"] else []),
        ("records read", inp["records"]),
        ("  events / user statuses", f"{inp['events']} / {inp['user_statuses']}"),
        ("  rejected", inp["rejected"]),
        ("  ignored: anonymous", inp["ignored"]["anonymous"]),
        ("  ignored: pending approval", inp["ignored"]["pending"]),
        ("  ignored: other regulation", inp["ignored"]["other_regulation"]),
        ("  ignored: deleted", inp["ignored"]["deleted"]),
        ("  user.deleted (warning)", f"{inp['user_deletions']} ({inp['revoked']} revoked)"),
        ("leads folded", leads["folded"]),
        ("  nothing mapped to send", leads["nothing_to_send"]),
    ]
    if leads.get("unchanged"):
        rows.append(("  unchanged since last sync", leads["unchanged"]))
    if leads.get("rechecked"):
        rows.append(("  re-checked skipped leads", leads["rechecked"]))
    return _with_delivery(table, rows, summary)


def _with_delivery(table: Table, rows: list[tuple[str, Any]], summary: dict[str, Any]) -> Table:
    rows.append(("leads to send", summary["leads"]["to_send"]))
    d = summary.get("delivery")
    if d:
        rows += [
            ("delivery path", f"{d['path']} ({d['path_reason']})" if d.get("path_reason") else d["path"]),
            ("  posted to Marketo", d["sent"]),
            ("  created", d["created"]),
            ("  updated", d["updated"]),
        ]
        if d.get("bulk"):
            b = d["bulk"]
            rows += [
                ("  imported (bulk: created or updated)", d["imported"]),
                (
                    "bulk uploads / polls / file fetches",
                    f"{b['uploads']} / {b['polls']} / {b['file_fetches']}",
                ),
                ("bulk queue-full (1016) waits", b["queue_full_waits"]),
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
    if "fields" in summary and (summary["mode"] == "dry-run" or summary["leads"]["to_send"]):
        console.print(fields_table(summary))
    if summary["mode"] == "dry-run" and samples:
        console.print("[bold]sample payloads[/bold]")
        for s in samples:
            console.print(orjson.dumps(s).decode(), markup=False, highlight=False, soft_wrap=True)


def print_reconcile(console: Console, summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """`reconcile`: the leads compared, per field the four counts, a few drifted leads."""
    leads, calls = summary["leads"], summary["calls"]
    against = "the input files" if summary["compared_with"] == "inputs" else "the state's confirmed values"
    console.print(
        f"[bold]reconcile[/bold]: {leads['compared']} leads of {against} read back from Marketo in "
        f"{calls.get('reads', 0)} call(s): [bold]{leads['drifted']} drifted[/bold], {leads['in_sync']} in sync"
        + (
            f", {leads['not_in_marketo_expected']} not in Marketo (update-only never created them)"
            if leads["not_in_marketo_expected"]
            else ""
        )
    )
    table = Table(title="per Marketo field (leads)", title_justify="left")
    for col in ("field", "match", "differs", "missing in Marketo", "lead not found"):
        table.add_column(col, justify="left" if col == "field" else "right")
    for name, c in summary["fields"].items():
        table.add_row(
            name, str(c["match"]), str(c["differs"]), str(c["missing_in_marketo"]), str(c["lead_not_found"])
        )
    console.print(table)
    for s in samples:
        parts = [
            f"{name}: Didomi {orjson.dumps(f['didomi']).decode()} ({f['source']}) / Marketo "
            + {"lead_not_found": "(no lead)", "missing_in_marketo": "(blank)"}.get(
                f["status"], orjson.dumps(f["marketo"]).decode()
            )
            for name, f in s["fields"].items()
        ]
        console.print(f"  drift {s['key']}: " + "; ".join(parts), markup=False, soft_wrap=True)
    fix = summary.get("fix")
    if fix:
        console.print(
            f"--fix: {fix['sent']} leads sent in {fix['calls']} calls: {fix['created']} created, "
            f"{fix['updated']} updated, {sum(fix['skipped'].values())} skipped, {fix['failed']} failed"
        )


def _show(v: Any) -> str:
    return orjson.dumps(v).decode()


def print_explanation(console: Console, doc: dict[str, Any]) -> None:
    """`explain KEY`: the records in fold order, the verdict per field, Marketo's answers."""
    steps = doc["steps"]
    console.print(
        f"[bold]explain {escape(str(doc['key']))}[/bold] ({doc['identifier']}): {len(steps)} record(s) touched it"
        + (f", of {doc['inputs_read']} read" if doc["inputs_read"] else "")
        + (
            f" ({doc['files_without_key']} file(s) never mention it: not parsed)"
            if doc["files_without_key"]
            else ""
        )
    )
    for s in steps:
        when = f"updated {s['updated_at'] or '-'}"
        if s["created_at"]:
            when = f"created {s['created_at']}" + (f", version {s['updated_at']}" if s["updated_at"] else "")
        what = escape(f"{s['kind']} {s['source']}")
        console.print(f"[bold]#{s['n']}[/bold] {what}", soft_wrap=True, highlight=False)
        console.print(
            f"    {when} · regulation {s['regulation'] or 'gdpr (default)'} · status {s['status'] or '-'}",
            markup=False, soft_wrap=True,
        )  # fmt: skip
        says = ", ".join(f"{k}={_show(v)}" for k, v in s["said"].items()) or "nothing mapped"
        console.print(f"    says: {says}", markup=False, soft_wrap=True)
        if not s["applied"]:
            outcome = f"ignored: {s['ignored']}"
        elif s["older_than_state"] and not s["won"]:
            outcome = "applied, but older than the consent Marketo confirmed (state) for " + ", ".join(
                s["older_than_state"]
            )
        elif s["won"]:
            outcome = "applied; wins " + ", ".join(s["won"])
        else:
            outcome = "applied; every field it says is superseded by a later record"
        console.print(f"    {outcome}", markup=False, soft_wrap=True)
        for name, why in s["overtaken"].items():
            console.print(f"    {name}: overtaken by {why}", markup=False, soft_wrap=True)
    if doc["verdicts"]:
        table = Table(title="per Marketo field", title_justify="left")
        for col in ("field", "value", "won by", "consent at", "why"):
            table.add_column(col, overflow="fold")
        for v in doc["verdicts"]:
            won = f"#{v['step']}" if v["step"] else "-"
            cells = (v["field"], _show(v["value"]), won, str(v["consent_at"] or "-"), v["reason"])
            table.add_row(*(Text(str(c)) for c in cells))  # data, never markup
        console.print(table)
    if doc["payload"] is not None:
        console.print(
            f"[bold]payload[/bold]: {escape(_show(doc['payload']))}",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )
    if doc["payload_note"]:
        console.print(f"  {doc['payload_note']}", markup=False, soft_wrap=True)
    st = doc["state"]
    if st is not None:
        if st["confirmed"]:
            at = (
                datetime.fromtimestamp(round(st["confirmed_at"]), UTC).isoformat().replace("+00:00", "Z")
                if st["confirmed_at"]
                else "?"
            )
            console.print(
                f"[bold]Marketo confirmed[/bold] (state, {at}): {escape(_show(st['confirmed']))}",
                soft_wrap=True,
            )
        if st["pending"]:
            console.print(
                f"[bold]pending[/bold] ({escape(str(st['pending_reason']))}): {escape(_show(st['pending']))}",
                soft_wrap=True,
            )
        if st["skipped"]:
            console.print(
                "[bold]skipped[/bold] by Marketo: "
                + escape(f"{st['skipped']['code']} {st['skipped']['reason']}")
            )
    elif doc["inputs_read"] or doc["reports"]:
        console.print(
            "state: no record of this lead" if doc.get("state_given") else "state: not given (--state)"
        )
    for r in doc["reports"]:
        what = r.get("status") or r.get("category")
        extra = " ".join(str(r[k]) for k in ("code", "reason") if r.get(k))
        console.print(f"report {r['file']}: {what} {extra}".rstrip(), markup=False, soft_wrap=True)
    if not doc["found"]:
        console.print(f"{doc['key']}: no record, no state and no report mentions this key", markup=False)
