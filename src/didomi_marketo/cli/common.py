"""What every command shares: the consoles, option types declared once (with their help text and
DIDOMI_MARKETO_* environment variable), error -> exit code, the progress bar, and the log
(`logs`: every stderr line, text or JSON). Commands live in their own modules (run, state,
workbench...); each registers itself with `register(app)` and takes its examples from `examples`.

Exit codes (errors.EXIT_CODES): 0 all delivered or expectedly skipped; 1 some records rejected
or leads failed/skipped unexpectedly; 2 usage or config error; 3 run aborted (credentials,
access, quota, unreachable); 4 the state is locked by a run still going.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, cast

import typer

from didomi_marketo import __version__, logs
from didomi_marketo.defaults import MAX_CONCURRENCY, RATE_CALLS
from didomi_marketo.errors import ConfigError, DidomiMarketoError

# Start-up imports only what the command runs: the library (and rich, httpx...) is imported by
# the commands' bodies and these helpers when they need it, never to list or parse the options.
if TYPE_CHECKING:
    from rich.console import Console

    from didomi_marketo.config import Config
    from didomi_marketo.didomi.readers import DateWindow
    from didomi_marketo.report import Report
    from didomi_marketo.sync import RunResult

app = typer.Typer(
    name="didomi-marketo",
    help="Sync Didomi consent (exports, events, webhooks, API pages) into Marketo lead fields.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: reads well at 80 columns and in a pager, and shows flags as flags (typer
    # rich panels print `--dry-run <bool>` and squeeze the help into a narrow column).
    rich_markup_mode=None,
    context_settings={"max_content_width": 100, "help_option_names": ["--help", "-h"]},
)


class _LazyConsole:
    """A rich Console made on first use: a quiet sync never prints through one, and importing
    rich is 30 ms of its start-up."""

    def __init__(self, stderr: bool):
        self._stderr = stderr
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            # emoji=False: rich would turn `file.ndjson:100:` into `file.ndjson💯` (its :100: emoji code).
            self._console = Console(stderr=self._stderr, highlight=False, emoji=False)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


def real_console(console: Console) -> Console:
    """The Console behind `out` or `err` (made now if need be), for what needs the object itself."""
    return console.get() if isinstance(console, _LazyConsole) else console


out = cast("Console", _LazyConsole(stderr=False))
err = cast("Console", _LazyConsole(stderr=True))

ENV = "DIDOMI_MARKETO_"  # every option cron needs can come from the environment (flag > env > file)


class LogFormat(StrEnum):
    text = "text"
    json = "json"


ConfigOpt = Annotated[
    Path,
    typer.Option(
        "--config", "-c", envvar=ENV + "CONFIG", metavar="FILE",
        help="The Didomi Marketo integration config (JSON or YAML).",
    ),
]  # fmt: skip
PathsArg = Annotated[
    list[str],
    typer.Argument(metavar="PATH", help="Files, folders (recursive), s3:// or gs:// URLs, or - for stdin."),
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
    typer.Option(
        "--state", envvar=ENV + "STATE", metavar="FILE",
        help="SQLite state: send only what changed since Marketo last confirmed it.",
    ),
]  # fmt: skip
WaitLockOpt = Annotated[
    float,
    typer.Option(
        "--wait-lock", min=0, envvar=ENV + "WAIT_LOCK", metavar="SECONDS",
        help="Wait this long when another run holds the state (else exit 4).",
    ),
]  # fmt: skip
ViaOpt = Annotated[
    str,
    typer.Option(
        "--via", metavar="rest|bulk|auto",
        help="rest (Sync Leads), bulk (bulk import), or auto: bulk from --bulk-threshold leads.",
    ),
]  # fmt: skip
BulkThresholdOpt = Annotated[
    int,
    typer.Option(
        "--bulk-threshold", min=1, metavar="N", help="Leads to send from which --via auto uses bulk import."
    ),
]
LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format", envvar=ENV + "LOG_FORMAT",
        help="text, or json: every stderr line one JSON object (for log collectors).",
    ),
]  # fmt: skip
ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report", envvar=ENV + "REPORT", metavar="DIR",
        help="Write summary.json and NDJSON outcome files here.",
    ),
]  # fmt: skip
MaxCallsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-calls", min=1, envvar=ENV + "MAX_CALLS", metavar="N",
        help="Cap the Marketo calls this run may spend.",
    ),
]  # fmt: skip
MaxCallsPer20sOpt = Annotated[
    int | None,
    typer.Option(
        "--max-calls-per-20s", min=1, max=RATE_CALLS, envvar=ENV + "MAX_CALLS_PER_20S", metavar="N",
        help=f"Our share of Marketo's {RATE_CALLS} calls per 20 s (default {RATE_CALLS}).",
    ),
]  # fmt: skip
MaxConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--max-concurrency", min=1, max=MAX_CONCURRENCY, envvar=ENV + "MAX_CONCURRENCY", metavar="N",
        help=f"Our share of Marketo's {MAX_CONCURRENCY} concurrent calls (default {MAX_CONCURRENCY}).",
    ),
]  # fmt: skip
DailyQuotaOpt = Annotated[
    int, typer.Option("--daily-quota", min=1, metavar="N", help="Your subscription's daily call quota.")
]
RateWindowOpt = Annotated[
    float,
    typer.Option(
        "--rate-window", min=0.1, metavar="SECONDS",
        help="Length of Marketo's rate window (20; less only for a sandbox).",
    ),
]  # fmt: skip


def _version(value: bool) -> None:
    if value:
        typer.echo(f"didomi-marketo {__version__}")  # no rich console for one line
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Sync Didomi consent into Marketo lead fields."""
    # Each invocation starts from the environment's log format (tests run many in one process);
    # a command's --log-format then sets its own.
    logs.setup(_env_log_format())


def _env_log_format() -> str:
    fmt = os.environ.get(ENV + "LOG_FORMAT", "text")
    return fmt if fmt in logs.FORMATS else "text"


def say(level: str, message: str) -> None:
    """One line on stderr: `error: ...` / `warning: ...`, or a JSON event under --log-format json."""
    if level == "error":
        logs.error(message)
    else:
        logs.warning(message)


def expected_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Turn the library's expected failures into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except ConfigError as e:
            for problem in e.problems:
                logs.error(problem)
            raise typer.Exit(e.exit_code) from None
        except DidomiMarketoError as e:  # each kind carries its exit code (errors.EXIT_CODES)
            logs.error(str(e))
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            raise typer.Exit(quiet_broken_pipe()) from None
        except (OSError, sqlite3.Error) as e:  # the disk, not the data: one line, run aborted
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            logs.error(f"{where}{reason}")
            raise typer.Exit(3) from None

    return wrapper


def date_window(since: str | None, until: str | None) -> DateWindow:
    """--since / --until as a DateWindow (inclusive days), or a ConfigError naming the option."""
    from didomi_marketo.didomi.readers import DateWindow

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


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (`| head`): stop quietly with 0, as Unix tools do.

    stdout is pointed at /dev/null so that the interpreter's last flush cannot complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test runner's buffer)
        pass
    return 0


def load_config_with(config_path: Path, upsert: bool | None = None) -> Config:
    from didomi_marketo.config import load_config

    return load_config(config_path).with_upsert(upsert)


PHASES = {  # the bar's label per phase of a run (sync.run_sync's on_progress)
    "read": "reading and folding records",
    "plan": "planning leads",
    "deliver": "delivering leads",
}


class ProgressBar:
    """A rich progress bar on a terminal, labelled by phase; nothing otherwise."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=real_console(err), transient=True,
            )  # fmt: skip
            self.task = self.bar.add_task("starting", total=None)
        self.phase = "starting"

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, phase: str, done: int, total: int | None) -> None:
        if self.bar is not None:
            # A new phase is drawn at once: a phase shorter than the bar's refresh tick would
            # otherwise never be shown, and the operator would not know what the run went through.
            new_phase, self.phase = phase != self.phase, phase
            self.bar.update(self.task, completed=done, total=total, description=PHASES.get(phase, phase),
                            refresh=new_phase)  # fmt: skip


def print_warning(warning: str) -> None:
    """Warnings are printed the moment the library finds them (before a long run, not after)."""
    say("warning", warning)


def finish(result: RunResult, quiet: bool, console: Console | None = out) -> None:
    """The summary table (on `console`: stdout; None: nowhere), the fatal error if any, the exit."""
    if not quiet and console is not None:
        from didomi_marketo.render import print_summary

        print_summary(real_console(console), result.summary.to_json(), result.samples)
    if result.fatal:
        logs.error(result.fatal)
    raise typer.Exit(result.exit_code)


def with_delivery(cfg: Config, max_calls: int | None, per_20s: int | None, concurrency: int | None) -> Config:
    return cfg.with_delivery(max_calls=max_calls, max_calls_per_20s=per_20s, max_concurrency=concurrency)


def make_report(directory: Path | None, verbose: bool, log: RunLog | None = None) -> Report:
    """A report whose rejected records are logged as found (the first 20, or all with -v)."""

    from didomi_marketo.report import SHOW_ISSUES, Report

    def show(entry: dict[str, Any]) -> None:
        logs.rejected(entry["source"], entry["reason"], entry.get("key"))

    return Report(directory, on_rejected=show, show_limit=sys.maxsize if verbose else SHOW_ISSUES)


def more_rejected(report: Report, directory: Path | None) -> None:
    """The "... and N more" notice after the first rejected records (an event in JSON too)."""
    if report.unshown:
        where = f"see {directory}/rejected.ndjson" if directory else "use --report DIR to list them all"
        logs.event(
            "rejected_more", f"... and {report.unshown} more rejected records ({where})",
            level=logging.WARNING, bare=True, count=report.unshown,
            file=str(directory / "rejected.ndjson") if directory else None,
        )  # fmt: skip


class RunLog:
    """What a delivering command logs for collectors: `start`, `progress` (each new phase, then
    every 10 s), `end` with the summary. On a terminal the bar and the table say the same."""

    def __init__(self, fmt: str):
        self.is_text = fmt == "text"
        self._progress = logs.ProgressLog()

    def event(self, name: str, **fields: Any) -> None:
        logs.event(name, **fields)

    def progress(self, bar: Callable[[str, int, int | None], None]) -> Callable[[str, int, int | None], None]:
        def update(phase: str, done: int, total: int | None) -> None:
            bar(phase, done, total)
            self._progress(phase, done, total)

        return update


def run_log(fmt: str) -> RunLog:
    """Set this command's log format (`--log-format`) and return its run log."""
    logs.setup(str(fmt))
    return RunLog(str(fmt))


def _log_format_in(args: list[str]) -> str:
    """`--log-format` as given, read before click parses (a usage error must honour it too)."""
    fmt = _env_log_format()
    for i, arg in enumerate(args):
        if arg == "--log-format" and i + 1 < len(args):
            fmt = args[i + 1]
        elif arg.startswith("--log-format="):
            fmt = arg.split("=", 1)[1]
    return fmt if fmt in logs.FORMATS else "text"


def main(args: list[str] | None = None) -> None:
    """Console entry point: every way out goes through the log and ends in a documented exit code.

    click's own handling prints usage errors as text and lets crashes out as bare tracebacks;
    here a usage error is one `usage_error` event under --log-format json, a crash one `crash`
    event (exit 3: a human must act), and a closed stdout (`| head`) a quiet exit 0."""
    import typer.main

    argv = sys.argv[1:] if args is None else args
    command = typer.main.get_command(app)
    try:
        code = command.main(argv, prog_name="didomi-marketo", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        logs.setup(_log_format_in(argv))
        logs.error("aborted")
        code = 3
    except BrokenPipeError:
        code = quiet_broken_pipe()
    except Exception as e:
        usage = _usage_error(e)
        logs.setup(_log_format_in(argv))
        if usage is None:
            logs.crash(e)
            code = 3
        elif logs.is_json():
            ctx = getattr(e, "ctx", None)
            logs.error(
                e.format_message(), "usage_error",  # type: ignore[attr-defined]
                command=ctx.command_path if ctx is not None else "didomi-marketo",
            )  # fmt: skip
            code = usage
        else:
            e.show()  # type: ignore[attr-defined]  # click's usage line, the error, the --help hint
            code = usage
    code = _flush_stdout(code if isinstance(code, int) else 0, argv)
    if args is None:  # the program itself (not a test calling main): no teardown to wait for
        exit_now(code)
    sys.exit(code)


def _flush_stdout(code: int, argv: list[str]) -> int:
    """What a command printed must reach its file before the exit code says so: an unwritable
    stdout (a full disk: `state export > file`) is exit 3 with one line, never a quiet 0; a
    closed pipe (`| head`) stays a quiet 0."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe() if code == 0 else code
    except (OSError, ValueError) as e:
        logs.setup(_log_format_in(argv))
        logs.error(f"could not write to standard output: {getattr(e, 'strerror', None) or e}")
        return code or 3
    return code


def exit_now(code: int) -> NoReturn:
    """Leave as the interpreter would, minus its teardown: flush the log, stdout and stderr, run
    the exit handlers, and go. Tearing down the ~600 modules and the objects of a sync took 50-90
    ms, all of it after the last answer from Marketo. The run has closed what it wrote (report,
    state, --output) by now; should a library still run a thread that is not a daemon, the
    interpreter's own exit waits for it as usual."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing can reach it
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _usage_error(e: Exception) -> int | None:
    """The exit code of a click usage error (bad option, missing argument...), else None."""
    from typer._click.exceptions import ClickException  # typer 0.27+ vendors click

    return e.exit_code if isinstance(e, ClickException) else None
