"""`sync` and `retry`: the commands that deliver."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from didomi_marketo.cli.common import (
    AllowIncompleteOpt,
    BulkThresholdOpt,
    ConfigOpt,
    DailyQuotaOpt,
    LogFormatOpt,
    MaxCallsPer20sOpt,
    MaxConcurrencyOpt,
    PathsArg,
    ProgressBar,
    QuietOpt,
    RateWindowOpt,
    SinceOpt,
    StateOpt,
    UntilOpt,
    VerboseOpt,
    ViaOpt,
    WaitLockOpt,
    date_window,
    err,
    expected_errors,
    finish,
    load_config_with,
    make_report,
    print_warning,
    run_log,
    with_delivery,
)
from didomi_marketo.config import (
    DEFAULT_DAILY_QUOTA,
    MAX_CONCURRENCY,
    RATE_CALLS,
    RATE_WINDOW_SECONDS,
)
from didomi_marketo.didomi.readers import MAX_LINE_BYTES
from didomi_marketo.errors import ConfigError
from didomi_marketo.sync import DEFAULT_BULK_THRESHOLD, SyncOptions, run_retry, run_sync


@expected_errors
def sync(
    paths: PathsArg,
    config: ConfigOpt,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Everything but delivery: no credentials, no network.")
    ] = False,
    upsert: Annotated[
        bool | None,
        typer.Option("--upsert/--no-upsert", help="Override upsert_mode (create leads or only update)."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write summary.json and NDJSON outcome files here.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Dry run: write every payload as NDJSON.")
    ] = None,
    allow_incomplete: AllowIncompleteOpt = False,
    since: SinceOpt = None,
    until: UntilOpt = None,
    max_calls: Annotated[
        int | None, typer.Option("--max-calls", min=1, help="Cap the Marketo calls this run may spend.")
    ] = None,
    max_calls_per_20s: MaxCallsPer20sOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
    daily_quota: DailyQuotaOpt = DEFAULT_DAILY_QUOTA,
    rate_window: RateWindowOpt = RATE_WINDOW_SECONDS,
    max_line_bytes: Annotated[
        int,
        typer.Option(
            "--max-line-bytes", min=1024, help="Reject an input line (or JSON document) longer than this."
        ),
    ] = MAX_LINE_BYTES,
    state: StateOpt = None,
    full: Annotated[
        bool, typer.Option("--full", help="Ignore the state for this run (send everything), then refresh it.")
    ] = False,
    wait_lock: WaitLockOpt = 0.0,
    skip_schema_check: Annotated[
        bool,
        typer.Option(
            "--skip-schema-check", help="Send without checking mapped fields against Marketo first."
        ),
    ] = False,
    via: ViaOpt = "auto",
    bulk_threshold: BulkThresholdOpt = DEFAULT_BULK_THRESHOLD,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Processes reading and folding input (default: the cores)."),
    ] = None,
    recheck_skipped: Annotated[
        bool,
        typer.Option(
            "--recheck-skipped",
            help="With --state: also re-send the newest known consent of leads Marketo skipped "
            "as not found (1004) or ambiguous (1007), e.g. leads created since.",
        ),
    ] = False,
    log_format: LogFormatOpt = "text",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Read Didomi records, fold them per user, map them, and push Marketo lead updates."""
    log = run_log(log_format)
    cfg = load_config_with(config, upsert)
    cfg = with_delivery(cfg, max_calls, max_calls_per_20s, max_concurrency)
    credentials = None if dry_run else cfg.credentials()
    state_path = str(state) if state else cfg.state
    options = SyncOptions(
        paths=paths, dry_run=dry_run, allow_incomplete=allow_incomplete,
        output=str(output) if output else None, rate_window=rate_window, daily_quota=daily_quota,
        state=state_path, full=full, wait_lock=wait_lock, check_schema=not skip_schema_check,
        window=date_window(since, until),
        via=via, bulk_threshold=bulk_threshold, jobs=jobs,
        max_line_bytes=max_line_bytes,
        recheck_skipped=recheck_skipped,
    )  # fmt: skip
    if recheck_skipped and not state_path:
        raise ConfigError("--recheck-skipped needs --state (the skipped leads are in the state)")
    rep = make_report(report, verbose, log)
    log.event("start", command="sync", paths=paths, dry_run=dry_run, state=state_path, config=cfg.identity())
    with ProgressBar(not quiet and log.is_text) as progress:
        result = run_sync(
            cfg, options, rep, credentials=credentials, on_progress=log.progress(progress.update),
            on_warning=print_warning,
        )  # fmt: skip
    if verbose:
        for name in result.summary.inputs.skipped_files if result.summary.inputs else []:
            err.print(f"{name}: skipped (not data)", markup=False, highlight=False, soft_wrap=True)
    if rep.unshown and not verbose:
        err.print(
            f"... and {rep.unshown} more rejected records"
            + (f" (see {report}/rejected.ndjson)" if report else " (use --report DIR to list them all)"),
            markup=False,
        )
    log.event("end", summary=result.summary.to_json())
    finish(result, quiet)


@expected_errors
def retry(
    report_dir: Annotated[Path, typer.Argument(help="The --report DIR of an earlier run.")],
    config: ConfigOpt,
    report: Annotated[Path | None, typer.Option("--report", help="Write the new report here.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be re-sent.")] = False,
    max_calls: Annotated[int | None, typer.Option("--max-calls", min=1)] = None,
    max_calls_per_20s: Annotated[
        int | None, typer.Option("--max-calls-per-20s", min=1, max=RATE_CALLS)
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option("--max-concurrency", min=1, max=MAX_CONCURRENCY)
    ] = None,
    rate_window: Annotated[float, typer.Option("--rate-window", min=0.1)] = RATE_WINDOW_SECONDS,
    state: StateOpt = None,
    wait_lock: WaitLockOpt = 0.0,
    via: ViaOpt = "auto",
    bulk_threshold: BulkThresholdOpt = DEFAULT_BULK_THRESHOLD,
    newer: Annotated[
        list[Path] | None,
        typer.Option(
            "--newer",
            help="Without --state: a report of a later run; its newer consent is kept (repeatable).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Re-send without a state, even if a newer sync sent newer consent."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-send exactly the retryable leads of an earlier report, and write a fresh report.

    With --state, a lead that a newer sync already delivered is not rolled back. Without one,
    retry refuses (a newer sync may have sent newer consent) unless --force.
    """
    if not (report_dir / "undelivered.ndjson").is_file():
        raise ConfigError(f"{report_dir}: not a didomi-marketo report (no undelivered.ndjson)")
    if report is not None and report.resolve() == report_dir.resolve():
        raise ConfigError("--report must differ from the report being retried")
    cfg = with_delivery(load_config_with(config), max_calls, max_calls_per_20s, max_concurrency)
    credentials = None if dry_run else cfg.credentials()
    options = SyncOptions(
        paths=[], dry_run=dry_run, rate_window=rate_window,
        state=str(state) if state else cfg.state, wait_lock=wait_lock, via=via, bulk_threshold=bulk_threshold,
    )  # fmt: skip
    with ProgressBar(not quiet) as progress:
        result = run_retry(
            cfg, str(report_dir), make_report(report, False), dry_run=dry_run,
            credentials=credentials, options=options, on_progress=progress.update, on_warning=print_warning,
            force=force, newer=[str(d) for d in newer or []],
        )  # fmt: skip
    finish(result, quiet)


def register(app: typer.Typer) -> None:
    app.command()(sync)
    app.command()(retry)
