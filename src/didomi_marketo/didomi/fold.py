"""Fold consent observations per user, property by property: the latest timestamp wins.

Ties go to the later record in input order. A later event for one purpose never erases another
purpose, and a null/absent value is no observation at all (it never blanks a field).

Memory is bounded by the distinct leads, not the events: each lead is one small list, and past
`spill_threshold` leads the fold is written to a SQLite scratch table and merged at the end.
"""

from __future__ import annotations

import math
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from didomi_marketo.didomi.records import Observation
from didomi_marketo.mapping import FieldMapping, Property

# Layout of a lead's fold state (a plain list, because there can be millions of them):
#   [source path, source line, latest timestamp, value0, ts0, value1, ts1, ...]
SRC_PATH, SRC_LINE, LATEST = 0, 1, 2
FIRST_SLOT = 3
NEVER = -math.inf

EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
LEAD_ID = re.compile(r"[0-9]+\Z")
SPILL_THRESHOLD = 250_000  # leads held in memory before the fold spills to SQLite
MAX_LEAD_ID = 2**31 - 1  # Marketo lead ids are 32-bit signed integers


@dataclass
class FoldSchema:
    """The distinct Didomi properties the mappings read, each with a slot in the fold state."""

    properties: list[Property]
    slots: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.slots = {p.name: FIRST_SLOT + 2 * i for i, p in enumerate(self.properties)}

    @classmethod
    def from_mappings(cls, mappings: list[FieldMapping]) -> FoldSchema:
        props: dict[str, Property] = {}
        for m in mappings:
            if m.source is not None and m.source.name != "updated_at":
                props.setdefault(m.source.name, m.source)
        return cls(list(props.values()))

    @property
    def needs_purposes(self) -> bool:
        return any(r.kind.startswith("purpose") for p in self.properties for r in p.readings)

    def empty_state(self, path: str, line: int) -> list[Any]:
        return [path, line, NEVER] + [None, NEVER] * len(self.properties)


def parse_timestamp(value: Any) -> float | None:
    """ISO 8601 to epoch seconds; a timestamp without offset is taken as UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def format_timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def normalise_key(key: Any, identifier: str) -> tuple[str | None, str]:
    """(lead key, "") or (None, why not). Emails fold case-insensitively, as Marketo matches them."""
    if identifier == "leadID":
        if isinstance(key, bool):
            return None, "organization_user_id is not a lead id (positive integer)"
        # ASCII digits only: str.isdigit() also accepts "²" (int() then crashed) and "٣"
        # (silently read as lead 3).
        # Digits are counted before int(): Python refuses to convert over 4,300 of them.
        if isinstance(key, str) and LEAD_ID.match(key.strip()):
            digits = key.strip().lstrip("0")
            n = int(digits or "0") if len(digits) <= 10 else MAX_LEAD_ID + 1
        elif isinstance(key, int):
            n = key
        else:
            return None, f"organization_user_id {_short(key)} is not a lead id (positive integer)"
        if 0 < n <= MAX_LEAD_ID:
            return str(n), ""
        return None, (
            f"organization_user_id {_short(key)} is not a lead id (a positive integer up to {MAX_LEAD_ID}, "
            "Marketo's range)"
        )
    if not isinstance(key, str):
        return None, f"organization_user_id {_short(key)} is not an email address"
    k = key.strip()
    if not k.isascii():
        return None, f"organization_user_id {_short(key)} is not an ASCII email (Marketo requires ASCII)"
    if not EMAIL.match(k):
        return None, f"organization_user_id {_short(key)} is not an email address"
    return k.lower(), ""


def _short(key: Any) -> str:
    """repr of a key, cut: a 5,000-digit id must not become a 5,000-character message."""
    text = repr(key)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} characters)"


IssueSink = Callable[[str, str, int, str, Any], None]  # (category, path, line, reason, key)


@dataclass
class FoldStats:
    user_statuses: int = 0
    events: int = 0
    invalid: int = 0  # observations rejected in the fold (bad key, bad timestamp)
    rejected: int = 0  # every rejected record: those and the unreadable/unrecognised ones
    anonymous: int = 0
    pending: int = 0
    other_regulation: int = 0
    deleted: int = 0

    # Derived rather than counted: the fold's hot path does as few increments as it can.
    @property
    def observations(self) -> int:
        return self.user_statuses + self.events

    @property
    def applied(self) -> int:
        return self.observations - self.pending - self.other_regulation - self.anonymous - self.invalid


class Fold:
    """Per-lead fold state; `add` takes observations in input order, `leads` yields the result."""

    def __init__(
        self,
        schema: FoldSchema,
        identifier: str,
        regulations: frozenset[str],
        on_issue: IssueSink,
        spill_threshold: int = SPILL_THRESHOLD,
        scratch_dir: str | None = None,
    ):
        self.schema = schema
        self.identifier = identifier
        self.regulations = regulations
        self.on_issue = on_issue
        self.stats = FoldStats()
        self.spill_threshold = spill_threshold
        self.scratch_dir = scratch_dir
        self._leads: dict[str, list[Any]] = {}
        self._spill: sqlite3.Connection | None = None
        self._spill_file: tempfile.TemporaryDirectory | None = None
        self._chunk = 0
        self._extractors = [(schema.slots[p.name], p.compile()) for p in schema.properties]
        # Consecutive observations usually belong to one user (an export line is a user and
        # their events): remember the last key's normalisation.
        self._last_raw_key: Any = None
        self._last_key: str | None = None
        self._last_why = ""
        self._timestamps: dict[str, float | None] = {}
        self._gdpr_by_default = "gdpr" in regulations  # a record without `regulation` is gdpr
        self._needs_purposes = schema.needs_purposes

    # -- input --------------------------------------------------------------------------------

    def add(self, obs: Observation, path: str) -> None:
        stats = self.stats
        if obs.kind == "event":
            stats.events += 1
            if obs.status is not None and obs.status != "confirmed":
                stats.pending += 1
                self.on_issue(
                    "pending", path, obs.line, f"event status {obs.status!r} is not confirmed", obs.key
                )
                return
        else:
            stats.user_statuses += 1
        reg = obs.regulation
        # isinstance first: `regulation` may be any JSON value, and a list/object is unhashable
        # (`reg not in frozenset` raised TypeError).
        if reg is not None and (
            not isinstance(reg, str) or (reg not in self.regulations and reg.lower() not in self.regulations)
        ):
            stats.other_regulation += 1
            self.on_issue(
                "other_regulation",
                path,
                obs.line,
                f"regulation {reg!r} is not applied (see properties.regulations)",
                obs.key,
            )
            return
        if reg is None and not self._gdpr_by_default:
            stats.other_regulation += 1
            self.on_issue(
                "other_regulation", path, obs.line, "regulation (gdpr by default) is not applied", obs.key
            )
            return
        if obs.key is None or obs.key == "":
            stats.anonymous += 1
            self.on_issue(
                "anonymous",
                path,
                obs.line,
                "no organization_user_id (anonymous user): cannot reach a lead",
                None,
            )
            return
        if obs.key == self._last_raw_key and type(obs.key) is type(self._last_raw_key):
            key, why = self._last_key, self._last_why
        else:
            key, why = normalise_key(obs.key, self.identifier)
            self._last_raw_key, self._last_key, self._last_why = obs.key, key, why
        if key is None:
            stats.rejected += 1
            stats.invalid += 1
            self.on_issue("rejected", path, obs.line, why, obs.key)
            return
        raw_ts = obs.timestamp
        timestamps = self._timestamps
        if type(raw_ts) is str and raw_ts in timestamps:
            ts = timestamps[raw_ts]
        else:
            ts = parse_timestamp(raw_ts)
            if type(raw_ts) is str:
                if len(timestamps) >= 100_000:  # bounded: timestamps repeat, but not forever
                    timestamps.clear()
                timestamps[raw_ts] = ts
        if ts is None:
            field_name = "created_at" if obs.kind == "event" else "updated_at"
            stats.rejected += 1
            stats.invalid += 1
            what = "missing" if obs.timestamp in (None, "") else f"invalid ({obs.timestamp!r})"
            self.on_issue("rejected", path, obs.line, f"{obs.kind} {field_name} is {what}", obs.key)
            return
        consents = obs.consents
        purposes = None
        if self._needs_purposes:
            plist = consents.get("purposes")
            if type(plist) is list:
                try:
                    purposes = {p["id"]: p for p in plist}
                except (TypeError, KeyError):  # an item that is not an object, or has no id
                    purposes = {p.get("id"): p for p in plist if isinstance(p, dict)}
        user = obs.user
        state = self._leads.get(key)
        if state is None:
            if len(self._leads) >= self.spill_threshold:
                self._spill_out()
            state = self._leads[key] = self.schema.empty_state(path, obs.line)
        else:
            state[SRC_PATH] = path
            state[SRC_LINE] = obs.line
        if ts >= state[LATEST]:
            state[LATEST] = ts
        for slot, extract in self._extractors:
            value = extract(purposes, consents, user)
            if value is not None and ts >= state[slot + 1]:
                state[slot] = value
                state[slot + 1] = ts

    def reject(self, category: str, path: str, line: int, reason: str, key: Any = None) -> None:
        """Count a record that never became an observation (bad JSON, unknown shape, deleted)."""
        if category == "deleted":
            self.stats.deleted += 1
        else:
            self.stats.rejected += 1
        self.on_issue(category, path, line, reason, key)

    def absorb(self, key: str, state: list[Any]) -> None:
        """Fold in a lead's state that another Fold built from input that comes AFTER all input
        seen so far (a parallel reader's file): the same result as adding its observations."""
        mine = self._leads.get(key)
        if mine is not None:
            self._leads[key] = merge_states(mine, state)
            return
        if len(self._leads) >= self.spill_threshold:
            self._spill_out()
        self._leads[key] = state

    # -- output -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._leads) if self._spill is None else self._count_spilled()

    def size_hint(self) -> int:
        """Distinct leads, or once spilled an upper bound (a lead spilled in two chunks counts
        twice) that costs no sort: enough for a quota estimate or a progress bar."""
        if self._spill is None:
            return len(self._leads)
        return int(self._spill.execute("SELECT COUNT(*) FROM spill").fetchone()[0]) + len(self._leads)

    def leads(self) -> Iterator[tuple[str, list[Any]]]:
        """Every folded lead once (sorted by key when the fold spilled to disk)."""
        if self._spill is None:
            yield from self._leads.items()
            return
        self._spill_out()
        merge = merge_states
        current_key: str | None = None
        current: list[Any] | None = None
        for key, blob in self._spill.execute("SELECT key, state FROM spill ORDER BY key, chunk"):
            state = restore_never(orjson.loads(blob))
            if key == current_key:
                current = merge(current, state)  # type: ignore[arg-type]
            else:
                if current is not None:
                    yield current_key, current  # type: ignore[misc]
                current_key, current = key, state
        if current is not None:
            yield current_key, current  # type: ignore[misc]

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        if self._spill_file is not None:
            self._spill_file.cleanup()
            self._spill_file = None

    def _spill_out(self) -> None:
        if self._spill is None:
            self._spill_file = tempfile.TemporaryDirectory(prefix="didomi-fold-", dir=self.scratch_dir)
            db = sqlite3.connect(Path(self._spill_file.name) / "fold.sqlite")
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE spill (key TEXT, chunk INTEGER, state BLOB)")
            self._spill = db
        dumps = orjson.dumps
        chunk = self._chunk
        # -inf is not JSON: store "never" as null and restore it on the way back (merge_states).
        self._spill.executemany(
            "INSERT INTO spill VALUES (?, ?, ?)",
            ((k, chunk, dumps([None if v == NEVER else v for v in s])) for k, s in self._leads.items()),
        )
        self._spill.commit()
        self._chunk += 1
        self._leads.clear()

    def _count_spilled(self) -> int:
        self._spill_out()
        assert self._spill is not None
        return self._spill.execute("SELECT COUNT(DISTINCT key) FROM spill").fetchone()[0]


def merge_states(older: list[Any], newer: list[Any]) -> list[Any]:
    """Merge the fold of an earlier chunk of input with a later one (ties go to the later)."""
    out = list(newer)
    out[LATEST] = max(older[LATEST], newer[LATEST])
    for v in range(FIRST_SLOT, len(out), 2):
        if older[v + 1] > newer[v + 1]:
            out[v], out[v + 1] = older[v], older[v + 1]
    return out


def restore_never(state: list[Any]) -> list[Any]:
    """Spilled states store "never" (-inf, not JSON) as null; put it back."""
    if state[LATEST] is None:
        state[LATEST] = NEVER
    for t in range(FIRST_SLOT + 1, len(state), 2):
        if state[t] is None:
            state[t] = NEVER
    return state
