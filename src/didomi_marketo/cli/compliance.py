"""`explain` and `reconcile`: the questions a privacy team or an auditor asks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from didomi_marketo.cli.common import (
    AllowIncompleteOpt,
    ConfigOpt,
    QuietOpt,
    StateOpt,
    WaitLockOpt,
    expected_errors,
    load_config_with,
    make_report,
    out,
    print_warning,
    say,
    with_delivery,
)
from didomi_marketo.reconcile import ReconcileOptions, parse_since, run_reconcile
from didomi_marketo.render import print_reconcile

OptionalPathsArg = Annotated[
    list[str] | None,
    typer.Argument(help="Files, folders (recursive) or - for stdin; none: use the state alone."),
]


@expected_errors
def reconcile(
    config: ConfigOpt,
    paths: OptionalPathsArg = None,
    state: StateOpt = None,
    fix: Annotated[
        bool, typer.Option("--fix", help="Send the drifted leads through the normal delivery engine.")
    ] = False,
    since: Annotated[
        str | None, typer.Option("--since", help="Only leads whose consent changed after this date/time.")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write summary.json and drift.ndjson (and --fix outcomes) here."),
    ] = None,
    max_calls: Annotated[
        int | None, typer.Option("--max-calls", min=1, help="Refuse to spend more Marketo calls than this.")
    ] = None,
    daily_quota: Annotated[
        int, typer.Option("--daily-quota", min=1, help="Your subscription's daily call quota.")
    ] = 50_000,
    max_calls_per_20s: Annotated[
        int | None,
        typer.Option("--max-calls-per-20s", min=1, max=100, help="Share of the 100 calls/20 s limit."),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option("--max-concurrency", min=1, max=10, help="Share of the 10 concurrent calls."),
    ] = None,
    rate_window: Annotated[
        float,
        typer.Option("--rate-window", min=0.1, help="Seconds of the rate window (20; less for a sandbox)."),
    ] = 20.0,
    allow_incomplete: AllowIncompleteOpt = False,
    wait_lock: WaitLockOpt = 0.0,
    quiet: QuietOpt = False,
) -> None:
    """Read the mapped fields back from Marketo and compare them with Didomi's consent.

    Exit 0 no drift, 1 drift found (so cron can alert), 2 usage or config error, 3 aborted.
    With --fix the exit code is the sync's.
    """
    cfg = with_delivery(load_config_with(config), max_calls, max_calls_per_20s, max_concurrency)
    options = ReconcileOptions(
        paths=list(paths or []), state=str(state) if state else cfg.state, fix=fix,
        since=parse_since(since) if since else None, daily_quota=daily_quota,
        allow_incomplete=allow_incomplete, rate_window=rate_window, wait_lock=wait_lock,
    )  # fmt: skip
    credentials = cfg.credentials()
    rep = make_report(report, False)
    result = run_reconcile(cfg, options, rep, credentials=credentials, on_warning=print_warning)
    if not quiet:
        print_reconcile(out, result.summary, result.samples)
    if result.fatal:
        say("error", result.fatal)
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command()(reconcile)
