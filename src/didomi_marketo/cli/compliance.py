"""`explain` and `reconcile`: the questions a privacy team or an auditor asks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from didomi_marketo.cli.common import (
    AllowIncompleteOpt,
    ConfigOpt,
    DailyQuotaOpt,
    MaxCallsPer20sOpt,
    MaxConcurrencyOpt,
    QuietOpt,
    RateWindowOpt,
    StateOpt,
    WaitLockOpt,
    expected_errors,
    load_config_with,
    make_report,
    out,
    print_warning,
    real_console,
    say,
    with_delivery,
)
from didomi_marketo.defaults import DEFAULT_DAILY_QUOTA, RATE_WINDOW_SECONDS
from didomi_marketo.errors import ConfigError

OptionalPathsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="PATH", help="Files, folders (recursive) or - for stdin; none: use the state alone."
    ),
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
        str | None,
        typer.Option(
            "--since", metavar="WHEN", help="Only leads whose consent changed after this date/time."
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report", metavar="DIR", help="Write summary.json and drift.ndjson (and --fix outcomes) here."
        ),
    ] = None,
    max_calls: Annotated[
        int | None,
        typer.Option("--max-calls", min=1, metavar="N", help="Refuse to spend more Marketo calls than this."),
    ] = None,
    daily_quota: DailyQuotaOpt = DEFAULT_DAILY_QUOTA,
    max_calls_per_20s: MaxCallsPer20sOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
    rate_window: RateWindowOpt = RATE_WINDOW_SECONDS,
    allow_incomplete: AllowIncompleteOpt = False,
    wait_lock: WaitLockOpt = 0.0,
    quiet: QuietOpt = False,
) -> None:
    """Read the mapped fields back from Marketo and compare them with Didomi's consent.

    Exit 0 no drift, 1 drift found (so cron can alert), 2 usage or config error, 3 aborted.
    With --fix the exit code is the sync's.
    """
    from didomi_marketo.reconcile import ReconcileOptions, parse_since, run_reconcile
    from didomi_marketo.render import print_reconcile

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
        print_reconcile(real_console(out), result.summary, result.samples)
    if result.fatal:
        say("error", result.fatal)
    raise typer.Exit(result.exit_code)


@expected_errors
def explain(
    key: Annotated[
        str,
        typer.Argument(
            metavar="KEY", help="The lead key: an email, or a lead id (as the config's user_identifier)."
        ),
    ],
    config: ConfigOpt,
    paths: OptionalPathsArg = None,
    state: StateOpt = None,
    report: Annotated[
        list[Path] | None,
        typer.Option(
            "--report", metavar="DIR", help="A --report DIR of a sync, reconcile or retry (repeatable)."
        ),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", metavar="table|json", help="table, or json (one document on stdout).")
    ] = "table",
    allow_incomplete: AllowIncompleteOpt = False,
) -> None:
    """Explain one person's consent: every record that touched KEY, in fold order, what won each
    field and why, what would be or was sent, and Marketo's last answer. Needs no credentials.

    Exit 0 when something mentions KEY, 1 when nothing does, 2 usage or config error.
    """
    from didomi_marketo.explain import explain as run_explain
    from didomi_marketo.render import print_explanation

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: expected table or json")
    cfg = load_config_with(config)
    for directory in report or []:
        if not directory.is_dir():
            raise ConfigError(f"--report {directory}: no such report directory")
    result = run_explain(
        cfg, key, list(paths or []), state=str(state) if state else cfg.state, reports=list(report or []),
        allow_incomplete=allow_incomplete,
    )  # fmt: skip
    doc = result.to_json()
    if fmt == "json":
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        print_explanation(real_console(out), doc)
    raise typer.Exit(0 if result.found else 1)


def register(app: typer.Typer) -> None:
    app.command()(explain)
    app.command()(reconcile)
