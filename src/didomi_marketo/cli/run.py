"""`sync` and `retry`: the commands that deliver."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from didomi_marketo import logs
from didomi_marketo.cli.common import (
    AllowIncompleteOpt,
    BulkThresholdOpt,
    ConfigOpt,
    DailyQuotaOpt,
    LogFormat,
    LogFormatOpt,
    MaxCallsOpt,
    MaxCallsPer20sOpt,
    MaxConcurrencyOpt,
    PathsArg,
    ProgressBar,
    QuietOpt,
    RateWindowOpt,
    ReportOpt,
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
    more_rejected,
    out,
    print_warning,
    run_log,
    with_delivery,
)
from didomi_marketo.defaults import (
    DEFAULT_BULK_THRESHOLD,
    DEFAULT_DAILY_QUOTA,
    MAX_LINE_BYTES,
    RATE_WINDOW_SECONDS,
)
from didomi_marketo.errors import ConfigError

if TYPE_CHECKING:
    from didomi_marketo.outcomes import LeadOutcome


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
    report: ReportOpt = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", metavar="FILE", help="Dry run: write every payload as NDJSON (- for stdout)."
        ),
    ] = None,
    allow_incomplete: AllowIncompleteOpt = False,
    since: SinceOpt = None,
    until: UntilOpt = None,
    max_calls: MaxCallsOpt = None,
    max_calls_per_20s: MaxCallsPer20sOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
    daily_quota: DailyQuotaOpt = DEFAULT_DAILY_QUOTA,
    rate_window: RateWindowOpt = RATE_WINDOW_SECONDS,
    max_line_bytes: Annotated[
        int,
        typer.Option(
            "--max-line-bytes",
            min=1024,
            metavar="BYTES",
            help="Reject an input line (or JSON document) longer than this.",
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
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            metavar="N",
            help="Processes reading and folding input (default: the cores).",
        ),
    ] = None,
    recheck_skipped: Annotated[
        bool,
        typer.Option(
            "--recheck-skipped",
            help="With --state: also re-send the newest known consent of leads Marketo skipped "
            "as not found (1004) or ambiguous (1007), e.g. leads created since.",
        ),
    ] = False,
    log_format: LogFormatOpt = LogFormat.text,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Read Didomi records, fold them per user, map them, and push Marketo lead updates."""
    from didomi_marketo.sync import SyncOptions, run_sync

    log = run_log(log_format)
    cfg = load_config_with(config, upsert)
    cfg = with_delivery(cfg, max_calls, max_calls_per_20s, max_concurrency)
    credentials = None if dry_run else cfg.credentials()
    state_path = str(state) if state else cfg.state
    options = SyncOptions(
        paths=paths, dry_run=dry_run, allow_incomplete=allow_incomplete,
        output=output, rate_window=rate_window, daily_quota=daily_quota,
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
            logs.event("skipped_file", f"{name}: skipped (not data)", file=name)
    else:
        more_rejected(rep, report)
    log.event("end", summary=result.summary.to_json())
    # `--output -` owns stdout: the table goes to stderr (in text; the `end` event has it in JSON).
    finish(result, quiet, out if output != "-" else err if log.is_text else None)


@expected_errors
def retry(
    report_dir: Annotated[Path, typer.Argument(metavar="DIR", help="The --report DIR of an earlier run.")],
    config: ConfigOpt,
    report: ReportOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be re-sent.")] = False,
    max_calls: MaxCallsOpt = None,
    max_calls_per_20s: MaxCallsPer20sOpt = None,
    max_concurrency: MaxConcurrencyOpt = None,
    rate_window: RateWindowOpt = RATE_WINDOW_SECONDS,
    state: StateOpt = None,
    wait_lock: WaitLockOpt = 0.0,
    via: ViaOpt = "auto",
    bulk_threshold: BulkThresholdOpt = DEFAULT_BULK_THRESHOLD,
    newer: Annotated[
        list[Path] | None,
        typer.Option(
            "--newer",
            metavar="REPORT",
            help="Without --state: a report of a later run; its newer consent is kept (repeatable).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Re-send without a state, even if a newer sync sent newer consent."),
    ] = False,
    log_format: LogFormatOpt = LogFormat.text,
    quiet: QuietOpt = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print every lead still not delivered, with its reason.")
    ] = False,
) -> None:
    """Re-send exactly the retryable leads of an earlier report, and write a fresh report.

    With --state, a lead that a newer sync already delivered is not rolled back. Without one,
    retry refuses (a newer sync may have sent newer consent) unless --force.
    """
    from didomi_marketo.sync import SyncOptions, run_retry

    log = run_log(log_format)
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
    log.event("start", command="retry", from_report=str(report_dir), dry_run=dry_run, config=cfg.identity())
    with ProgressBar(not quiet and log.is_text) as progress:
        result = run_retry(
            cfg, str(report_dir), make_report(report, verbose, log), dry_run=dry_run,
            credentials=credentials, options=options, on_progress=log.progress(progress.update),
            on_warning=print_warning, sinks=[LogUndelivered()] if verbose else None,
            force=force, newer=[str(d) for d in newer or []],
        )  # fmt: skip
    log.event("end", summary=result.summary.to_json())
    finish(result, quiet)


class LogUndelivered:
    """`retry -v`: each lead that is still not delivered, as it is known (key, code, reason)."""

    def batch_done(self, outcomes: list[LeadOutcome]) -> None:
        for o in outcomes:
            if not o.delivered:
                logs.event(
                    "undelivered", f"{o.key}: {o.status} {o.code} {o.reason}".replace("  ", " "),
                    level=logging.WARNING, bare=True, key=o.key, status=o.status, code=o.code,
                    reason=o.reason, retryable=o.retryable,
                )  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command()(sync)
    app.command()(retry)
