"""`preview`, `check`, `fields`: the mapping workbench.

Each command parses its options, calls one function of `preview` or `check`, renders the
result with rich (or as JSON/CSV), and exits with the result's code.
"""

from __future__ import annotations

import csv
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from didomi_marketo import logs
from didomi_marketo.cli.common import AllowIncompleteOpt, ConfigOpt, PathsArg, expected_errors, out
from didomi_marketo.defaults import DEFAULT_DAILY_QUOTA, DEFAULT_SAMPLES
from didomi_marketo.errors import ConfigError

if TYPE_CHECKING:  # the commands import what they run (see cli/common.py)
    from didomi_marketo.check import CheckReport
    from didomi_marketo.preview import LeadDiff, PreviewResult


class Format(StrEnum):
    table = "table"
    json = "json"


class PreviewFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


# ---------------------------------------------------------------------------------------------
# preview


@expected_errors
def preview(
    paths: PathsArg,
    config: ConfigOpt,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            metavar="FILE",
            help="The current config: count and show what NEW changes against it.",
        ),
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            metavar="FILE",
            help="Compare with what Marketo last confirmed: what the next sync sends.",
        ),
    ] = None,
    fmt: Annotated[
        PreviewFormat,
        typer.Option(
            "--format",
            metavar="table|json|csv",
            help="table, json (one document) or csv (one row per lead and field).",
        ),
    ] = PreviewFormat.table,
    limit: Annotated[
        int, typer.Option("--limit", min=0, metavar="N", help="Sample leads to show.")
    ] = DEFAULT_SAMPLES,
    allow_incomplete: AllowIncompleteOpt = False,
) -> None:
    """Dry-run a mapping: per Marketo field, what the leads would get (and, with --compare or
    --state, what changes). Reads, folds and maps only: sends nothing, needs no credentials."""
    from didomi_marketo.config import load_config
    from didomi_marketo.preview import change_rows, run_preview
    from didomi_marketo.state import StateStore

    new = load_config(config)
    old = load_config(compare) if compare is not None else None
    if state is not None and compare is not None:
        raise ConfigError("--state and --compare are two baselines: give one")
    if state is not None and not state.is_file():
        raise ConfigError(f"--state {state}: no such state file (a sync with --state creates it)")
    writer = csv.writer(sys.stdout, lineterminator="\n") if fmt is PreviewFormat.csv else None
    on_lead = None
    if writer is not None:
        writer.writerow(["key", "field", "before", "after"])

        def on_lead(diff: LeadDiff) -> None:
            writer.writerows([k, f, _cell(b), _cell(a)] for k, f, b, a in change_rows(diff))

    store = StateStore(state, readonly=True) if state is not None else None
    try:
        result = run_preview(
            new, paths, old=old, confirmed=store, limit=limit, allow_incomplete=allow_incomplete,
            on_lead=on_lead,
        )  # fmt: skip
    finally:
        if store is not None:
            store.close()
    _show_rejections(result)
    if fmt is PreviewFormat.json:
        out.print_json(orjson.dumps(result.to_json()).decode())
    elif fmt is PreviewFormat.table:
        _render_preview(result, str(config))
    raise typer.Exit(result.exit_code)


def _cell(value: Any) -> str:
    """A CSV cell: text as is, other values as JSON; empty when not sent."""
    if value is None:
        return ""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _shown(value: Any) -> str:
    return "(not sent)" if value is None else orjson.dumps(value).decode()


def _show_rejections(result: PreviewResult) -> None:
    for r in result.rejections:
        logs.rejected(r.source, r.reason)
    more = result.rejected - len(result.rejections)
    if more > 0:
        logs.event(
            "rejected_more",
            f"... and {more} more rejected records",
            level=logging.WARNING,
            bare=True,
            count=more,
        )


IGNORED_LABELS = {
    "anonymous": "anonymous",
    "pending": "pending approval",
    "other_regulation": "other regulation",
    "deleted": "deleted",
}
CHANGE_MARK = {"added": "+", "removed": "-", "source changed": "~", "transform changed": "~"}


def _render_preview(result: PreviewResult, config: str) -> None:
    from rich.table import Table

    title = f"didomi-marketo preview of {config}"
    if result.baseline:
        title += f" against {result.baseline}"
    out.print(f"[bold]{title}[/bold]", highlight=False)
    table = Table(show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    rows: list[tuple[str, Any]] = [("records read", result.records), ("  rejected", result.rejected)]
    rows += [(f"  ignored: {IGNORED_LABELS.get(k, k)}", n) for k, n in result.ignored.items()]
    rows += [("leads folded", result.leads), ("leads with values to send", result.to_send)]
    if result.baseline == "state":
        rows.append(("leads with values Marketo does not hold", result.leads_changed))
        if result.kept_newer:
            rows.append(("  fields kept (Marketo holds a newer consent)", result.kept_newer))
        if result.would_send is not None:
            rows.append(("leads the next sync would send", result.would_send))
            if result.pending_resent:
                rows.append(("  pending from an earlier run", result.pending_resent))
    elif result.comparing:
        rows.append(("leads whose values change", result.leads_changed))
    for what, n in rows:
        table.add_row(what, str(n))
    out.print(table)

    if result.rejected_reasons:
        why = Table(title="rejected records, by reason", title_justify="left")
        why.add_column("reason")
        why.add_column("records", justify="right")
        for reason, n in result.rejected_reasons.most_common(10):
            why.add_row(reason, str(n))
        out.print(why)

    changes = [m for m in result.mappings if m.status != "unchanged"]
    if changes or result.config_changes:
        out.print("[bold]mapping changes[/bold]")
        for m in changes:
            if m.status == "added":
                line = f"{m.field} = {m.after}"
            elif m.status == "removed":
                line = f"{m.field} (was {m.before}): no longer sent; Marketo keeps its last value"
            else:
                line = f"{m.field}: {m.status}: {m.before}  ->  {m.after}"
            out.print(f"  {CHANGE_MARK[m.status]} {line}", markup=False, highlight=False, soft_wrap=True)
        for key, before, after in result.config_changes:
            out.print(f"  ~ {key}: {before} -> {after}", markup=False, highlight=False)

    counts = result.field_counts()
    per_field = Table(title="per Marketo field (leads)", title_justify="left")
    columns = ["field", "true", "false", "other", "absent"] + (["changed"] if result.comparing else [])
    for col in columns:
        per_field.add_column(col, justify="left" if col == "field" else "right")
    names = list(counts) + [n for n in (result.changed or {}) if n not in counts]
    for name in names:
        c = counts.get(name)
        cells = [str(c[k]) for k in ("true", "false", "other", "absent")] if c else ["-"] * 4
        if result.changed is not None:
            cells.append(str(result.changed.get(name, 0)))
        per_field.add_row(name, *cells)
    out.print(per_field)

    if not result.samples:
        return
    if not result.comparing:
        out.print("[bold]sample payloads[/bold]")
        for s in result.samples:
            out.print(orjson.dumps(s).decode(), markup=False, highlight=False, soft_wrap=True)
        return
    samples = Table(title="sample leads (before -> after)", title_justify="left")
    for col in ("lead", "field", "before", "after"):
        samples.add_column(col)
    for s in result.samples:
        first = True
        for name, change in s["changes"].items():
            samples.add_row(
                s["key"] if first else "", name, _shown(change["before"]), _shown(change["after"])
            )
            first = False
    out.print(samples)


# ---------------------------------------------------------------------------------------------
# check


@expected_errors
def check(
    config: ConfigOpt,
    online: Annotated[
        bool | None,
        typer.Option(
            "--online/--offline",
            help="Check against the live Marketo schema (default: when credentials resolve).",
        ),
    ] = None,
    sample: Annotated[
        list[str] | None,
        typer.Option(
            "--sample", metavar="PATH", help="Didomi input to look for the mapped ids in (repeatable)."
        ),
    ] = None,
    allow_incomplete: AllowIncompleteOpt = False,
    daily_quota: Annotated[
        int, typer.Option("--daily-quota", min=1, metavar="N", help="Your subscription's daily call quota.")
    ] = DEFAULT_DAILY_QUOTA,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")] = False,
    fmt: Annotated[
        Format, typer.Option("--format", metavar="table|json", help="table or json.")
    ] = Format.table,
) -> None:
    """Check a config: offline (validation, transforms, ids in --sample) and, online, every mapped
    field against Marketo's describe (exists, writable, type fits), the lookup field, and quota."""
    from didomi_marketo.check import resolve_credentials, run_check
    from didomi_marketo.config import load_config

    cfg = load_config(config)
    credentials, note = resolve_credentials(cfg, online)
    report = run_check(
        cfg, credentials=credentials, sample=sample, allow_incomplete=allow_incomplete,
        daily_quota=daily_quota,
    )  # fmt: skip
    if note:
        report.notes.insert(0, note)
    if fmt is Format.json:
        out.print_json(orjson.dumps(report.to_json()).decode())
    else:
        _render_check(report)
    raise typer.Exit(report.exit_code(strict))


VERDICT_STYLE = {"ok": "green", "warning": "yellow", "error": "red"}


def _render_check(report: CheckReport) -> None:
    from rich.table import Table

    where = f"online: {report.instance}, {report.schema_source}" if report.online else "offline"
    out.print(f"[bold]didomi-marketo check of {report.config}[/bold] ({where})", highlight=False)
    table = Table()
    table.add_column("Marketo field", no_wrap=True)
    for col in ("sends", "Marketo type", "writable", "verdict"):
        table.add_column(col, no_wrap=True)
    for r in report.rows:
        writable = "-" if r.writable is None else ("yes" if r.writable else "[red]no[/]")
        produces = "(lookup field)" if r.source == "lookup" else r.produces
        table.add_row(
            r.field, produces, r.marketo_type or "-", writable, f"[{VERDICT_STYLE[r.verdict]}]{r.verdict}[/]"
        )
    out.print(table)
    for p in report.problems:
        style = VERDICT_STYLE[p.severity]
        label = f"{p.where}: " if p.where else ""
        subject = f"{p.field}: " if p.field and not p.message.startswith(f"'{p.field}'") else ""
        out.print(f"[{style}]{p.severity}[/]: ", end="")
        out.print(f"{label}{subject}{p.message}", markup=False, highlight=False, soft_wrap=True)
    if report.usage is not None:
        u = report.usage
        out.print(f"API calls today: {u.used} used of {u.quota}, {u.remaining} left", highlight=False)
    for n in report.notes:
        out.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)
    errors, warnings = len(report.errors), len(report.warnings)
    verdict = "[red]problems found[/]" if errors else "[green]ok[/]"
    out.print(f"{verdict}: {errors} error(s), {warnings} warning(s)")


# ---------------------------------------------------------------------------------------------
# fields


@expected_errors
def fields(
    config: ConfigOpt,
    match: Annotated[
        str | None,
        typer.Option(
            "--match",
            "-m",
            metavar="TEXT",
            help="Only fields whose REST or display name contains TEXT, or of type TEXT.",
        ),
    ] = None,
    fmt: Annotated[
        Format, typer.Option("--format", metavar="table|json", help="table or json.")
    ] = Format.table,
) -> None:
    """List Marketo's lead fields a mapping can target: REST name, display name, type, writable."""
    from rich.table import Table

    from didomi_marketo.check import list_fields
    from didomi_marketo.config import load_config

    cfg = load_config(config)
    rows = list_fields(cfg, cfg.credentials(), match)
    if fmt is Format.json:
        out.print_json(orjson.dumps(rows).decode())
    else:
        title = f"Marketo lead fields ({len(rows)}" + (f" matching '{match}')" if match else ")")
        table = Table(title=title, title_justify="left")
        table.add_column("REST name", no_wrap=True)
        table.add_column("display name")
        for col in ("type", "writable", "mapped"):
            table.add_column(col, no_wrap=True)
        for f in rows:
            kind = f["dataType"] + (f"({f['length']})" if f["length"] else "")
            writable = "yes" if f["writable"] else "[red]no[/]"
            table.add_row(f["name"], f["displayName"], kind, writable, "yes" if f["mapped"] else "")
        out.print(table)
    if not rows:
        logs.warning(f"no Marketo field matches '{match}'")


def register(app: typer.Typer) -> None:
    app.command()(preview)
    app.command()(check)
    app.command()(fields)
