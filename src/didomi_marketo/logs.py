"""Every stderr line goes through here: the standard `logging` module, as text or as JSON.

`--log-format json` makes every stderr line one JSON object (`ts`, `level`, `event`, then the
event's own fields) so a log collector can parse stderr whole: warnings, rejected records, the
"... and N more" notice, usage errors and crashes alike. Text is for people: `error: ...`,
`warning: ...`, a rejected record as `path:line: reason`. An event without a message (`start`,
`progress`, `end`) is for collectors only: on a terminal the progress bar and the summary table
say the same.

Usage: `logs.setup("json")` once per command, then `logs.error(...)`, `logs.warning(...)`,
`logs.rejected(...)`, `logs.event(...)`. The library below the CLI never writes to stderr itself.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

import orjson

from didomi_marketo.marketo.redact import redact, redact_bytes

FORMATS = ("text", "json")
LOGGER = logging.getLogger("didomi_marketo")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _utc(created: float) -> str:
    """ISO 8601 UTC with milliseconds: sortable, and what collectors parse without a hint."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{whole}.{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `ts`, `level`, `event`, `message` (if any), then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "message"),
        }
        message = record.getMessage()
        if message:
            out["message"] = message
        # Fields travel in one attribute, so a field named like a LogRecord attribute
        # ("filename", "msg") can neither clash nor be lost.
        for k, v in getattr(record, "fields", {}).items():
            out.setdefault(k, v)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["exception"] = f"{type(exc).__name__}: {exc}"
            # The traceback stays one JSON string: one line, still parseable.
            out["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        # Whatever a message or field carries (a server's echo of the request), no known secret.
        return redact_bytes(orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS)).decode()


class TextFormatter(logging.Formatter):
    """`level: message` for warnings and errors; bare records (rejected input) as they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and not getattr(record, "bare", False):
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


def _has_text(record: logging.LogRecord) -> bool:
    """Text shows what has something to say to a person (structured-only events are for JSON)."""
    return bool(record.getMessage() or record.exc_info)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def handleError(self, record: logging.LogRecord) -> None:
        # stderr itself is gone (a closed pipe): there is nobody left to tell.
        pass


_format = "text"


def setup(fmt: str = "text", verbose: bool = False) -> None:
    """Install the one stderr handler (replacing an earlier one: each command sets its own)."""
    global _format
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected text or json")
    _format = fmt
    for h in list(LOGGER.handlers):
        LOGGER.removeHandler(h)
    handler = _Stderr()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
        handler.addFilter(_has_text)
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    # httpx logs each request's URL at INFO: the identity URL carries the client secret in its
    # query (where Adobe documents it), so those lines must never reach any handler.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    LOGGER.propagate = False  # never twice through a root handler someone else configured


def is_json() -> bool:
    return _format == "json"


def event(
    name: str,
    message: str = "",
    *,
    level: int = logging.INFO,
    bare: bool = False,
    exc_info: ExcInfo | None = None,
    **fields: Any,
) -> None:
    """Log event `name`; `fields` become JSON keys (text shows only `message`)."""
    if not LOGGER.handlers:
        setup()
    LOGGER.log(
        level,
        "%s",
        message,
        exc_info=exc_info,
        extra={"event": name, "fields": fields, "bare": bare},
    )


def error(message: str, event_name: str = "error", **fields: Any) -> None:
    event(event_name, message, level=logging.ERROR, **fields)


def warning(message: str, **fields: Any) -> None:
    event("warning", message, level=logging.WARNING, **fields)


def rejected(source: str, reason: str, key: Any = None) -> None:
    """An input record that cannot be used: `path:line: reason` in text, fields in JSON."""
    fields: dict[str, Any] = {"source": source, "reason": reason}
    if key is not None:
        fields["key"] = key
    event("rejected", f"{source}: {reason}", level=logging.WARNING, bare=True, **fields)


def crash(exc: BaseException) -> None:
    """A bug: the traceback is kept (in JSON as one string field), secrets never are."""
    event(
        "crash",
        f"unexpected error ({type(exc).__name__}); please report it with this output",
        level=logging.CRITICAL,
        exc_info=(type(exc), exc, exc.__traceback__),
    )


class ProgressLog:
    """`progress` events for collectors: at each new phase, then at most every `every` seconds."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self._phase: str | None = None
        self._last = 0.0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = self.clock()
        if phase == self._phase and now - self._last < self.every:
            return
        self._phase, self._last = phase, now
        event("progress", phase=phase, done=done, total=total)
