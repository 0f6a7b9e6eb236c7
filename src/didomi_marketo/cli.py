"""The `didomi-marketo` command line: parse options, call one library function, render, exit.

Exit codes: 0 all delivered or expectedly skipped; 1 some records rejected or leads
failed/skipped unexpectedly; 2 usage or config error; 3 run aborted (credentials, access,
quota, unreachable, lock held).
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from didomi_marketo import __version__
from didomi_marketo.config import Config, load_config
from didomi_marketo.errors import ConfigError, DidomiMarketoError, FatalError
from didomi_marketo.render import print_summary
from didomi_marketo.report import SHOW_ISSUES, Report
from didomi_marketo.sync import RunResult, SyncOptions, run_retry, run_sync

app = typer.Typer(
    name="didomi-marketo",
    help="Sync Didomi consent (exports, events, webhooks, API pages) into Marketo lead fields.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Didomi Marketo integration config (JSON or YAML).")
]
PathsArg = Annotated[list[str], typer.Argument(help="Files, folders (recursive) or - for stdin.")]
AllowIncompleteOpt = Annotated[
    bool, typer.Option("--allow-incomplete", help="Read export partitions without _SUCCESS.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print every rejected record.")]
StateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="SQLite state: send only what changed since Marketo last confirmed it."),
]
WaitLockOpt = Annotated[
    float, typer.Option("--wait-lock", min=0, help="Seconds to wait when another run holds the state.")
]
LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="text, or json: one JSON object a line on stderr (for cron).")
]


def _version(value: bool) -> None:
    if value:
        out.print(f"didomi-marketo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Sync Didomi consent into Marketo lead fields."""


_json_log: _Log | None = None  # set by a command run with --log-format json


def _say(level: str, message: str) -> None:
    """One line on stderr: `error: ...`, or a JSON event under --log-format json."""
    if _json_log is not None:
        _json_log.event(level, message=message)
    else:
        err.print(f"{level}: {message}", markup=False, highlight=False, soft_wrap=True)


def expected_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn the library's expected failures into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except ConfigError as e:
            for problem in e.problems:
                _say("error", problem)
            raise typer.Exit(2) from None
        except FatalError as e:
            _say("error", str(e))
            raise typer.Exit(3) from None
        except DidomiMarketoError as e:
            _say("error", str(e))
            raise typer.Exit(1) from None
        except (OSError, sqlite3.Error) as e:  # the disk, not the data: one line, run aborted
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            _say("error", f"{where}{reason}")
            raise typer.Exit(3) from None
        finally:
            global _json_log
            _json_log = None  # one command's --log-format never leaks into the next (tests)

    return wrapper


def _load(config_path: Path, upsert: bool | None = None) -> Config:
    return load_config(config_path).with_upsert(upsert)


class _Progress:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled and err.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=err, transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("delivering leads", total=None)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, stage: str, done: int, total: int | None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)


class _Warnings(list):
    """Warnings are printed the moment the library finds them (before a long run, not after)."""

    def append(self, warning: str) -> None:
        _say("warning", warning)
        super().append(warning)


def _finish(result: RunResult, quiet: bool) -> None:
    if not quiet:
        if "input" in result.summary:
            print_summary(out, result.summary, result.samples)
        else:
            out.print_json(orjson.dumps(result.summary).decode())
    if result.fatal:
        _say("error", result.fatal)
    raise typer.Exit(result.exit_code)


@app.command()
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
    max_calls: Annotated[
        int | None, typer.Option("--max-calls", min=1, help="Cap the Marketo calls this run may spend.")
    ] = None,
    max_calls_per_20s: Annotated[
        int | None,
        typer.Option("--max-calls-per-20s", min=1, max=100, help="Share of the 100 calls/20 s limit."),
    ] = None,
    max_concurrency: Annotated[
        int | None,
        typer.Option("--max-concurrency", min=1, max=10, help="Share of the 10 concurrent calls."),
    ] = None,
    daily_quota: Annotated[
        int, typer.Option("--daily-quota", min=1, help="Your subscription's daily call quota.")
    ] = 50_000,
    rate_window: Annotated[
        float,
        typer.Option("--rate-window", min=0.1, help="Seconds of the rate window (20; less for a sandbox)."),
    ] = 20.0,
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
    log_format: LogFormatOpt = "text",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Read Didomi records, fold them per user, map them, and push Marketo lead updates."""
    log = _log(log_format)
    cfg = _load(config, upsert)
    cfg = _with_delivery(cfg, max_calls, max_calls_per_20s, max_concurrency)
    credentials = None if dry_run else cfg.credentials()
    state_path = str(state) if state else cfg.state
    options = SyncOptions(
        paths=paths, dry_run=dry_run, allow_incomplete=allow_incomplete,
        output=str(output) if output else None, rate_window=rate_window, daily_quota=daily_quota,
        state=state_path, full=full, wait_lock=wait_lock, check_schema=not skip_schema_check,
    )  # fmt: skip
    rep = _report(report, verbose, log)
    log.event("start", command="sync", paths=paths, dry_run=dry_run, state=state_path, config=cfg.identity())
    with _Progress(not quiet and log.is_text) as progress:
        result = run_sync(
            cfg, options, rep, credentials=credentials, on_progress=log.progress(progress.update),
            warnings=_Warnings(),
        )  # fmt: skip
    if rep.unshown and not verbose:
        err.print(
            f"... and {rep.unshown} more rejected records"
            + (f" (see {report}/rejected.ndjson)" if report else " (use --report DIR to list them all)"),
            markup=False,
        )
    log.event("end", summary=result.summary)
    _finish(result, quiet)


@app.command()
@expected_errors
def retry(
    report_dir: Annotated[Path, typer.Argument(help="The --report DIR of an earlier run.")],
    config: ConfigOpt,
    report: Annotated[Path | None, typer.Option("--report", help="Write the new report here.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be re-sent.")] = False,
    max_calls: Annotated[int | None, typer.Option("--max-calls", min=1)] = None,
    max_calls_per_20s: Annotated[int | None, typer.Option("--max-calls-per-20s", min=1, max=100)] = None,
    max_concurrency: Annotated[int | None, typer.Option("--max-concurrency", min=1, max=10)] = None,
    rate_window: Annotated[float, typer.Option("--rate-window", min=0.1)] = 20.0,
    state: StateOpt = None,
    wait_lock: WaitLockOpt = 0.0,
    quiet: QuietOpt = False,
) -> None:
    """Re-send exactly the retryable leads of an earlier report, and write a fresh report.

    With --state, a lead that a newer sync already delivered is not rolled back.
    """
    if not (report_dir / "undelivered.ndjson").is_file():
        raise ConfigError(f"{report_dir}: not a didomi-marketo report (no undelivered.ndjson)")
    if report is not None and report.resolve() == report_dir.resolve():
        raise ConfigError("--report must differ from the report being retried")
    cfg = _with_delivery(_load(config), max_calls, max_calls_per_20s, max_concurrency)
    credentials = None if dry_run else cfg.credentials()
    options = SyncOptions(
        paths=[], dry_run=dry_run, rate_window=rate_window,
        state=str(state) if state else cfg.state, wait_lock=wait_lock,
    )  # fmt: skip
    with _Progress(not quiet) as progress:
        result = run_retry(
            cfg, str(report_dir), _report(report, False), dry_run=dry_run,
            credentials=credentials, options=options, on_progress=progress.update, warnings=_Warnings(),
        )  # fmt: skip
    _finish(result, quiet)


@app.command()
@expected_errors
def sandbox(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8787,
    host: Annotated[str, typer.Option(help="Loopback address to listen on.")] = "127.0.0.1",
    leads: Annotated[Path | None, typer.Option(help="JSON array of existing leads to seed.")] = None,
    client_id: Annotated[str, typer.Option(help="Accepted client id.")] = "sandbox-client",
    client_secret: Annotated[str, typer.Option(help="Accepted client secret.")] = "sandbox-secret",
    rate_calls: Annotated[int, typer.Option(help="Calls allowed per rate window.")] = 100,
    rate_window: Annotated[float, typer.Option(help="Rate window in seconds.")] = 20.0,
    max_concurrency: Annotated[int, typer.Option(help="Calls allowed in flight.")] = 10,
    daily_quota: Annotated[int, typer.Option(help="Calls allowed per day.")] = 50_000,
    token_ttl: Annotated[float, typer.Option(help="Seconds an access token lives.")] = 3600.0,
    latency: Annotated[float, typer.Option(help="Seconds each REST call takes.")] = 0.0,
    fault: Annotated[
        list[str] | None,
        typer.Option(help="KIND:TIMES, e.g. code:604:3 or http:502:2 or drop:1 (repeatable)."),
    ] = None,
) -> None:
    """Run a local Marketo-compatible server (for demos and tests; loopback only)."""
    from didomi_marketo.sandbox import SandboxConfig, serve_forever

    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("the sandbox only listens on loopback (127.0.0.1, localhost, ::1)")
    cfg = SandboxConfig(
        client_id=client_id, client_secret=client_secret, token_ttl=token_ttl,
        rate_calls=rate_calls, rate_window=rate_window, max_concurrency=max_concurrency,
        daily_quota=daily_quota, latency=latency, leads_file=str(leads) if leads else None,
    )  # fmt: skip
    faults = []
    for f in fault or []:
        kind, _, times = f.rpartition(":")
        if not kind or not times.isdigit():
            raise ConfigError(f"--fault {f!r}: expected KIND:TIMES, e.g. code:604:3")
        faults.append((kind, int(times)))
    serve_forever(cfg, host, port, faults=faults)


state_app = typer.Typer(help="Inspect or reset the state store of incremental syncs.", no_args_is_help=True)
app.add_typer(state_app, name="state")
StateFileArg = Annotated[Path, typer.Option("--state", help="The state file (as given to sync --state).")]


@state_app.command("show")
@expected_errors
def state_show(
    state: StateFileArg,
    key: Annotated[str | None, typer.Argument(help="A lead key (email or lead id).")] = None,
) -> None:
    """Counts, or one lead's last confirmed values, pending payload and skip reason."""
    from didomi_marketo.didomi.fold import normalise_key
    from didomi_marketo.state import StateStore, lead_record

    store = StateStore(state, readonly=True)
    try:
        if key is None:
            out.print_json(orjson.dumps(store.counts()).decode())
            return
        lookup = store.lead(key) or store.lead(normalise_key(key, "email")[0] or key)
        if lookup is None:
            err.print(f"{key}: not in {state}", markup=False)
            raise typer.Exit(1)
        out.print_json(orjson.dumps(lead_record(lookup)).decode())
    finally:
        store.close()


@state_app.command("export")
@expected_errors
def state_export(
    state: StateFileArg,
    pending: Annotated[bool, typer.Option("--pending", help="Only leads waiting to be re-sent.")] = False,
) -> None:
    """Every lead in the state as NDJSON on stdout."""
    from didomi_marketo.state import StateStore

    store = StateStore(state, readonly=True)
    try:
        for rec in store.export(pending_only=pending):
            sys.stdout.write(orjson.dumps(rec).decode() + "\n")
    finally:
        store.close()


@state_app.command("reset")
@expected_errors
def state_reset(
    state: StateFileArg,
    yes: Annotated[bool, typer.Option("--yes", help="Do it: the next sync sends everything.")] = False,
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """Forget everything: the next sync re-sends every lead (like --full, for good)."""
    from didomi_marketo.state import StateLock

    if not yes:
        raise ConfigError("state reset deletes the state; add --yes to confirm")
    with StateLock(state) as lock:
        lock.acquire(wait_lock)
        for suffix in ("", "-wal", "-shm"):
            Path(str(state) + suffix).unlink(missing_ok=True)
    out.print(f"reset {state}")


def _with_delivery(cfg: Config, max_calls, per_20s, concurrency) -> Config:
    from dataclasses import replace

    changes = {}
    if max_calls is not None:
        changes["max_calls"] = max_calls
    if per_20s is not None:
        changes["max_calls_per_20s"] = per_20s
    if concurrency is not None:
        changes["max_concurrency"] = concurrency
    if changes:
        cfg.delivery = replace(cfg.delivery, **changes)
    return cfg


def _report(directory: Path | None, verbose: bool, log: _Log | None = None) -> Report:
    def show(line: str) -> None:
        if log is not None and not log.is_text:
            log.event("rejected", record=line)
        else:
            err.print(line, markup=False, highlight=False, soft_wrap=True)

    return Report(directory, on_rejected=show, show_limit=sys.maxsize if verbose else SHOW_ISSUES)


class _Log:
    """`--log-format json`: one JSON object a line on stderr (start, progress, end) for collectors."""

    def __init__(self, fmt: str, every: float = 10.0):
        self.is_text = fmt == "text"
        self.every = every
        self._last = 0.0

    def event(self, name: str, **fields: Any) -> None:
        if not self.is_text:
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": name, **fields}
            sys.stderr.write(orjson.dumps(record, default=str).decode() + "\n")
            sys.stderr.flush()

    def progress(self, bar: Callable[[str, int, int | None], None]) -> Callable[[str, int, int | None], None]:
        def update(stage: str, done: int, total: int | None) -> None:
            bar(stage, done, total)
            now = time.monotonic()
            if not self.is_text and now - self._last >= self.every:
                self._last = now
                self.event("progress", stage=stage, done=done, total=total)

        return update


def _log(fmt: str) -> _Log:
    global _json_log
    if fmt not in ("text", "json"):
        raise ConfigError(f"--log-format {fmt!r}: expected text or json")
    log = _Log(fmt)
    _json_log = None if log.is_text else log
    return log


def main() -> None:
    """Console entry point."""
    app()


# The mapping workbench (preview, check, fields) registers its commands on `app`.
from didomi_marketo import cli_workbench  # noqa: E402, F401
