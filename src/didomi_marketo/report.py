"""Outcomes -> report files (`--report DIR`) and the terminal summary.

Report files are NDJSON, one object a line, written as outcomes arrive (a killed run leaves a
usable partial report). Together they answer "what happened to user X" with one grep:

  rejected.ndjson     input records that cannot be used (path:line, reason)
  ignored.ndjson      records ignored on purpose: anonymous, pending, other regulation, deleted
  delivered.ndjson    leads Marketo created or updated (key, status, lead id, consent sent)
  undelivered.ndjson  leads skipped or failed, with code, reason, retryable, expected, payload
  summary.json        the counts, the config's identity (no secrets), start/end times
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from didomi_marketo.didomi.fold import Stamp, stamp_from_json
from didomi_marketo.errors import ConfigError
from didomi_marketo.marketo.redact import redact_bytes
from didomi_marketo.outcomes import LeadOutcome

IGNORED = ("anonymous", "pending", "other_regulation", "deleted")
SHOW_ISSUES = 20  # rejected records printed on stderr before "... and N more"


class Report:
    """Collects per-record issues and per-lead outcomes; writes files when given a directory."""

    def __init__(
        self,
        directory: str | Path | None,
        on_rejected: Callable[[dict[str, Any]], None] | None = None,
        show_limit: int = SHOW_ISSUES,
    ):
        self.directory = Path(directory) if directory else None
        self.on_rejected = on_rejected  # logs {source, reason, key} on stderr as found
        self.show_limit = show_limit
        self._files: dict[str, IO[bytes]] = {}
        self.shown = 0
        self.rejected = 0
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                # An earlier run's verdict must not sit beside this run's files: a run killed
                # before its end leaves no summary.json, which a monitor reads as "did not finish".
                (self.directory / "summary.json").unlink(missing_ok=True)
                for name in ("rejected", "ignored", "delivered", "undelivered"):
                    self._files[name] = open(self.directory / f"{name}.ndjson", "wb")  # noqa: SIM115
            except OSError as e:
                self.close()
                raise ConfigError(f"--report {self.directory}: cannot write there ({e.strerror})") from None

    def _write(self, name: str, obj: dict[str, Any]) -> None:
        f = self._files.get(name)
        if f is not None:  # whatever the source of a reason, no known secret reaches a file
            f.write(redact_bytes(orjson.dumps(obj)) + b"\n")

    # -- input issues -------------------------------------------------------------------------

    def issue(self, category: str, path: str, line: int, reason: str, key: Any = None) -> None:
        where = f"{path}:{line}" if line else path
        entry: dict[str, Any] = {"source": where, "category": category, "reason": reason}
        if key is not None:
            entry["key"] = key
        if category in IGNORED:
            self._write("ignored", entry)
            return
        self.rejected += 1
        self._write("rejected", entry)
        if self.on_rejected is not None and self.shown < self.show_limit:
            self.shown += 1
            self.on_rejected(entry)

    # -- lead outcomes ------------------------------------------------------------------------

    def batch_done(self, outcomes: list[LeadOutcome]) -> None:
        for o in outcomes:
            if o.delivered:
                entry: dict[str, Any] = {
                    "key": o.key,
                    "status": o.status,
                    "id": o.lead_id,
                    "source": o.source,
                }
                if o.stamps:  # each consent field sent, with its time: what `retry --newer` keeps
                    entry["consent"] = {k: [o.payload[k], at] for k, at in o.stamps.items() if k in o.payload}
                if o.reason:  # a bulk import row that imported with Marketo's warning
                    entry["warning"] = o.reason
                self._write("delivered", entry)
            else:
                self._write("undelivered", outcome_record(o))
        for f in self._files.values():
            f.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        if self.directory is not None:
            tmp = self.directory / "summary.json.tmp"
            tmp.write_bytes(redact_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2)))
            os.replace(tmp, self.directory / "summary.json")
        self.close()

    def fail(self, summary: dict[str, Any]) -> None:
        """A run that failed before its end still leaves summary.json with the reason. Best
        effort: the disk may be what failed, and the run's own error is the one to report."""
        with contextlib.suppress(OSError):
            self.finish(summary)

    def close(self) -> None:
        """Close every file, even when one cannot be flushed (a full disk); raise the first error."""
        first: OSError | None = None
        for f in self._files.values():
            try:
                f.close()
            except OSError as e:
                first = first or e
        self._files.clear()
        if first is not None:
            raise first

    @property
    def unshown(self) -> int:
        return self.rejected - self.shown


def outcome_record(o: LeadOutcome) -> dict[str, Any]:
    return {
        "key": o.key,
        "status": o.status,
        "code": o.code,
        "reason": o.reason,
        "retryable": o.retryable,
        "expected": o.expected,
        "source": o.source,
        "payload": o.payload,
        "stamps": o.stamps,
    }


def delivered_consent(directory: str | Path, into: dict[str, dict[str, tuple[Any, Stamp]]]) -> None:
    """Per lead, each consent field a report's run delivered with its consent time, the latest
    kept (for `retry --newer`: what a newer run sent must not be rolled back). An unreadable line
    is skipped: it can only make retry send more, never roll back what the file proves."""
    with open(Path(directory) / "delivered.ndjson", "rb") as f:
        for line in f:
            try:
                rec = orjson.loads(line)
                known = into.setdefault(rec["key"], {})
                for name, (value, at) in (rec.get("consent") or {}).items():
                    stamp = stamp_from_json(at)  # [time, version], or seconds from an older report
                    if name not in known or stamp > known[name][1]:
                        known[name] = (value, stamp)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue


def read_retryable(directory: str | Path, on_problem: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The retryable leads of a report's undelivered.ndjson (for `retry`).

    A report of a killed run may end in half a line: that line, and any line that is not a
    lead record, is reported through `on_problem` and skipped.
    """
    path = Path(directory) / "undelivered.ndjson"
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                ok = (
                    isinstance(rec, dict) and isinstance(rec["payload"], dict) and isinstance(rec["key"], str)
                )
            except (orjson.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                on_problem(f"{path}:{n}: not a lead record (a partial last line?); skipped")
                continue
            if rec.get("retryable"):
                yield rec
