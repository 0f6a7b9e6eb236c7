"""What every command shares: the consoles, option types declared once, error -> exit code,
the progress bar, the run log. Commands live in their own modules (run, state, workbench...).

Exit codes (errors.EXIT_CODES): 0 all delivered or expectedly skipped; 1 some records rejected
or leads failed/skipped unexpectedly; 2 usage or config error; 3 run aborted (credentials,
access, quota, unreachable); 4 the state is locked by a run still going.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from didomi_marketo import __version__
from didomi_marketo.config import MAX_CONCURRENCY, RATE_CALLS, Config, load_config
from didomi_marketo.didomi.readers import DateWindow
from didomi_marketo.errors import ConfigError, DidomiMarketoError
from didomi_marketo.marketo.redact import redact, redact_bytes
from didomi_marketo.render import print_summary
from didomi_marketo.report import SHOW_ISSUES, Report
from didomi_marketo.sync import RunResult

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
PathsArg = Annotated[
    list[str], typer.Argument(help="Files, folders (recursive), s3:// or gs:// URLs, or - for stdin.")
]
AllowIncompleteOpt = Annotated[
    bool, typer.Option("--allow-incomplete", help="Read export partitions without _SUCCESS.")
]
SinceOpt = Annotated[
    str | None,
    typer.Option("--since", metavar="YYYY-MM-DD", help="Read only date= partitions from this day on."),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", metavar="YYYY-MM-DD", help="Read only date= partitions up to this day."),
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
ViaOpt = Annotated[
    str,
    typer.Option(
        "--via", help="rest (Sync Leads), bulk (bulk import), or auto: bulk from --bulk-threshold leads."
    ),
]
BulkThresholdOpt = Annotated[
    int, typer.Option("--bulk-threshold", min=1, help="Leads to send from which --via auto uses bulk import.")
]
MaxCallsPer20sOpt = Annotated[
    int | None,
    typer.Option(
        "--max-calls-per-20s", min=1, max=RATE_CALLS, help=f"Share of the {RATE_CALLS} calls/20 s limit."
    ),
]
MaxConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--max-concurrency",
        min=1,
        max=MAX_CONCURRENCY,
        help=f"Share of the {MAX_CONCURRENCY} concurrent calls.",
    ),
]
DailyQuotaOpt = Annotated[
    int, typer.Option("--daily-quota", min=1, help="Your subscription's daily call quota.")
]
RateWindowOpt = Annotated[
    float, typer.Option("--rate-window", min=0.1, help="Seconds of the rate window (20; less for a sandbox).")
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


_json_log: RunLog | None = None  # set by a command run with --log-format json


def say(level: str, message: str) -> None:
    """One line on stderr: `error: ...`, or a JSON event under --log-format json."""
    message = redact(message)  # whatever its source, no known secret reaches stderr
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
                say("error", problem)
            raise typer.Exit(e.exit_code) from None
        except DidomiMarketoError as e:  # each kind carries its exit code (errors.EXIT_CODES)
            say("error", str(e))
            raise typer.Exit(e.exit_code) from None
        except (OSError, sqlite3.Error) as e:  # the disk, not the data: one line, run aborted
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            say("error", f"{where}{reason}")
            raise typer.Exit(3) from None
        finally:
            global _json_log
            _json_log = None  # one command's --log-format never leaks into the next (tests)

    return wrapper


def date_window(since: str | None, until: str | None) -> DateWindow:
    """--since / --until as a DateWindow (inclusive days), or a ConfigError naming the option."""
    problems = []
    for flag, value in (("--since", since), ("--until", until)):
        if value is None:
            continue
        try:
            if date.fromisoformat(value).isoformat() != value:
                raise ValueError
        except ValueError:
            problems.append(f"{flag} {value}: not a day (YYYY-MM-DD)")
    if not problems and since and until and since > until:
        problems.append(f"--since {since} is after --until {until}: no partition would be read")
    if problems:
        raise ConfigError(problems)
    return DateWindow(since, until)


def load_config_with(config_path: Path, upsert: bool | None = None) -> Config:
    return load_config(config_path).with_upsert(upsert)


class ProgressBar:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled and err.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=err, transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("delivering leads", total=None)

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, stage: str, done: int, total: int | None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)


def print_warning(warning: str) -> None:
    """Warnings are printed the moment the library finds them (before a long run, not after)."""
    say("warning", warning)


def finish(result: RunResult, quiet: bool) -> None:
    if not quiet:
        if not result.summary.is_retry:
            print_summary(out, result.summary.to_json(), result.samples)
        else:
            out.print_json(orjson.dumps(result.summary.to_json()).decode())
    if result.fatal:
        say("error", result.fatal)
    raise typer.Exit(result.exit_code)


def with_delivery(cfg: Config, max_calls: int | None, per_20s: int | None, concurrency: int | None) -> Config:
    return cfg.with_delivery(max_calls=max_calls, max_calls_per_20s=per_20s, max_concurrency=concurrency)


def make_report(directory: Path | None, verbose: bool, log: RunLog | None = None) -> Report:
    def show(line: str) -> None:
        if log is not None and not log.is_text:
            log.event("rejected", record=line)
        else:
            err.print(line, markup=False, highlight=False, soft_wrap=True)

    return Report(directory, on_rejected=show, show_limit=sys.maxsize if verbose else SHOW_ISSUES)


class RunLog:
    """`--log-format json`: one JSON object a line on stderr (start, progress, end) for collectors."""

    def __init__(self, fmt: str, every: float = 10.0):
        self.is_text = fmt == "text"
        self.every = every
        self._last = 0.0

    def event(self, name: str, **fields: Any) -> None:
        if not self.is_text:
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": name, **fields}
            sys.stderr.write(redact_bytes(orjson.dumps(record, default=str)).decode() + "\n")
            sys.stderr.flush()

    def progress(self, bar: Callable[[str, int, int | None], None]) -> Callable[[str, int, int | None], None]:
        def update(stage: str, done: int, total: int | None) -> None:
            bar(stage, done, total)
            now = time.monotonic()
            if not self.is_text and now - self._last >= self.every:
                self._last = now
                self.event("progress", stage=stage, done=done, total=total)

        return update


def run_log(fmt: str) -> RunLog:
    global _json_log
    if fmt not in ("text", "json"):
        raise ConfigError(f"--log-format {fmt!r}: expected text or json")
    log = RunLog(fmt)
    _json_log = None if log.is_text else log
    return log
