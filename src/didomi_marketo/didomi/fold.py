"""Fold consent observations per lead, property by property: the newest consent wins.

Invariants (the README's "Consent semantics" is the user-facing statement of the same rules):

- **Order.** Every applied value carries a stamp `(time, version)` in integer nanoseconds: the
  time is an event's `created_at` or a user status's `updated_at`; the version is an event's
  `updated_at` (a later version of one event id wins) and equals the time for a user status. Per
  property the value with the greatest stamp wins; an exact tie goes to the later record in input
  order. So for records with distinct stamps the result does not depend on the input order, or on
  how the input is cut into chunks (spills) or runs (the state applies the same order).
- **Nothing is blanked.** A null or absent value is no observation of that property: it never
  overwrites an earlier value. A later event for one purpose never erases another purpose.
- **Only what applies is folded.** Pending (`pending_approval`) records, other regulations than
  the configured ones, anonymous users, invalid keys, bad timestamps and malformed consent flags
  are counted and reported through `on_issue`, and change no lead.
- **Deletions.** `user.deleted` is counted (a warning) and, with `deletions: revoke`, folds as
  "no consent" (false) for every boolean consent property at the deleted user's `updated_at`,
  with the greatest version, so it wins over every record of that instant and loses to later ones.
- **Memory** is bounded by the distinct leads, not the events: one flat list per lead (below),
  and past `spill_threshold` leads the fold is written to a SQLite scratch table and merged at the
  end (`merge_states` applies the same order, ties to the later chunk).

A lead's fold state is a flat list, because there can be millions of them:

    [source path, source line, latest time, value0, time0, version0, value1, time1, version1, ...]

Read it through the accessors below (`source`, `latest`, `value_at`, `stamp_at`); only this module
indexes it.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from didomi_marketo.didomi.records import Observation, Unusable, event_fields, not_an_event, user_fields
from didomi_marketo.mapping import FieldMapping, Malformed, Property, value_ids
from didomi_marketo.scratch import ScratchDir

SRC_PATH, SRC_LINE, LATEST = 0, 1, 2
FIRST_SLOT = 3
SLOT_WIDTH = 3  # value, time, version
NEVER = -math.inf
REVOKED = 2**63 - 1  # the version of a deletion's "no consent": after every record of its instant

Stamp = tuple[float, float]  # (time, version), nanoseconds; NEVER when nothing was seen
NO_STAMP: Stamp = (NEVER, NEVER)


# -- the named accessors of a lead's fold state ------------------------------------------------


def source(state: list[Any]) -> str:
    """`path:line` of the last record (in input order) that touched the lead."""
    return f"{state[SRC_PATH]}:{state[SRC_LINE]}"


def latest(state: list[Any]) -> float:
    """The time of the latest applied record (NEVER if none)."""
    return state[LATEST]  # type: ignore[no-any-return]


def value_at(state: list[Any], slot: int) -> Any:
    """The winning value of the property at `slot` (FoldSchema.slots), None if never seen."""
    return state[slot]


def stamp_at(state: list[Any], slot: int) -> Stamp:
    """The (time, version) of the winning value of the property at `slot`."""
    return state[slot + 1], state[slot + 2]


def compact_stamp(stamp: Stamp) -> list[float]:
    """A stamp as a state stores it: `[time]` when the version is the time (most), else both."""
    return [stamp[0]] if stamp[0] == stamp[1] else [stamp[0], stamp[1]]


def stamp_from_json(value: Any) -> Stamp:
    """A stamp as stored in a state or report: `[time, version]` or `[time]` (ns), or a bare
    number of seconds from a state or report written before stamps had nanoseconds and versions."""
    if isinstance(value, list | tuple) and len(value) == 2:
        return (NEVER if value[0] is None else value[0], NEVER if value[1] is None else value[1])
    if isinstance(value, list | tuple) and len(value) == 1 and value[0] is not None:
        return value[0], value[0]  # `[time]`: the version is the time (compact_stamp)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        ns = round(value * 1_000_000) * 1000  # written from microsecond-precision text
        return ns, ns
    return NO_STAMP


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
        self.slots = {p.name: FIRST_SLOT + SLOT_WIDTH * i for i, p in enumerate(self.properties)}

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

    def revocation(self) -> list[Any]:
        """What a revoked (deleted) user folds as: False for every boolean consent property
        (purposes, legitimate interest, channels); nothing for preference values or user fields."""
        return [False if p.is_consent and p.value_type == "boolean" else None for p in self.properties]

    def empty_state(self, path: str, line: int) -> list[Any]:
        return [path, line, NEVER] + [None, NEVER, NEVER] * len(self.properties)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FRACTION = re.compile(r"[.,]([0-9]+)")
_MICROSECOND = timedelta(microseconds=1)
_NS_RANGE = range(-(2**63) + 1, 2**63 - 1)  # what a state stores as a 64-bit integer


def parse_timestamp(value: Any) -> int | None:
    """ISO 8601 / RFC 3339 to integer nanoseconds since the epoch, or None when invalid.

    A timestamp without offset is UTC; lower-case `t` and `z` are accepted (RFC 3339 allows
    them); every fractional digit up to nanoseconds counts (`.123456789` is later than
    `.123456700`; digits past the ninth are dropped).
    """
    if not isinstance(value, str) or not value:
        return None
    text = value.upper()
    ns_fraction = 0
    m = _FRACTION.search(text)
    if m is not None:
        ns_fraction = int(m.group(1)[:9].ljust(9, "0"))
        text = text[: m.start()] + text[m.end() :]
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        ns = (dt - EPOCH) // _MICROSECOND * 1000 + ns_fraction
    except OverflowError:
        return None
    return ns if ns in _NS_RANGE else None


def format_timestamp(ns: float) -> str:
    """Nanoseconds since the epoch as UTC ISO 8601 (`...Z`), to the microsecond."""
    return (EPOCH + timedelta(microseconds=int(ns) // 1000)).isoformat().replace("+00:00", "Z")


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
    revoked: int = 0  # user.deleted folded as "no consent" (deletions: revoke)
    invalid: int = 0  # observations rejected in the fold (bad key, timestamp, consent flag)
    rejected: int = 0  # every rejected record: those and the unreadable/unrecognised ones
    anonymous: int = 0
    pending: int = 0
    other_regulation: int = 0
    deleted: int = 0  # deletions ignored: every event.deleted, user.deleted under deletions: ignore
    user_deletions: int = 0  # every user.deleted seen (possibly an erasure request): a warning

    # Derived rather than counted: the fold's hot path does as few increments as it can.
    @property
    def observations(self) -> int:
        return self.user_statuses + self.events + self.revoked

    @property
    def applied(self) -> int:
        return self.observations - self.pending - self.other_regulation - self.anonymous - self.invalid

    def add(self, other: FoldStats) -> None:
        for f in fields(FoldStats):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


DELETIONS = ("ignore", "revoke")


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
        deletions: str = "ignore",
    ):
        assert deletions in DELETIONS, deletions
        self.schema = schema
        self.identifier = identifier
        self.regulations = regulations
        self.on_issue = on_issue
        self.deletions = deletions
        self.stats = FoldStats()
        self.spill_threshold = spill_threshold
        self.scratch_dir = scratch_dir
        self._leads: dict[str, list[Any]] = {}
        self._spill: sqlite3.Connection | None = None
        self._spill_file: ScratchDir | None = None
        self._chunk = 0
        self._slots = [schema.slots[p.name] for p in schema.properties]
        # Per property in slot order: (slot, purpose, preference, extractor). A purpose's
        # `enabled` (extractor ENABLED) or `values` entry (VALUES), the usual mappings, are read
        # inline in _apply; every other property through its compiled extractor.
        self._readers: list[tuple[int, str, str, Any]] = [
            (slot, *(_inline_reading(p) or ("", "", p.compile())))
            for slot, p in zip(self._slots, schema.properties)  # noqa: B905 - same length
        ]
        self._revocation = schema.revocation()
        # Consecutive observations usually belong to one user (an export line is a user and
        # their events): remember the last key's normalisation.
        self._last_raw_key: Any = None
        self._last_key: str | None = None
        self._last_why = ""
        self._timestamps: dict[str, int | None] = {}
        self._gdpr_by_default = "gdpr" in regulations  # a record without `regulation` is gdpr
        self._needs_purposes = schema.needs_purposes

    # -- input --------------------------------------------------------------------------------

    def add(self, obs: Observation, path: str) -> None:
        """Fold one observation read from `path` (observations come in input order)."""
        self.observe(path, obs.kind, obs.key, obs.timestamp, obs.consents, obs.user, obs.regulation,
                     obs.status, obs.line, obs.version)  # fmt: skip

    def observe(self, path: str, kind: str, raw_key: Any, timestamp: Any, consents: dict, user: dict,
                regulation: Any, status: Any, line: int, version: Any = None) -> None:  # fmt: skip
        """Fold one observation given as an Observation's fields (`records.emit_export_line` calls
        it for each record of a batch-export line, without building an Observation).

        This is the policy, rule by rule: whether the record applies at all (deletion mode,
        status, regulation, key, timestamp: a record that does not is counted, reported through
        `on_issue`, and changes nothing) and at which stamp (time, version). `_apply` is the
        mechanics: it reads each property's value and lands it in its slot when its stamp is
        newer (a malformed consent flag rejects the whole record there, leaving no trace).
        """
        stats = self.stats
        if kind == "event":
            stats.events += 1
        elif kind == "user":
            stats.user_statuses += 1
        else:  # a user.deleted
            stats.user_deletions += 1
            if self.deletions != "revoke":
                stats.deleted += 1
                self.on_issue("deleted", path, line, "user.deleted: not applied (deletions: ignore)", raw_key)
                return
            stats.revoked += 1
        if status is not None and status != "confirmed":
            stats.pending += 1
            what = "event status" if kind == "event" else "status of the event that caused it"
            self.on_issue("pending", path, line, f"{what} {status!r} is not confirmed", raw_key)
            return
        if regulation is None:
            if not self._gdpr_by_default:
                stats.other_regulation += 1
                self.on_issue(
                    "other_regulation", path, line, "regulation (gdpr by default) is not applied", raw_key
                )
                return
        elif (type(regulation) is not str or regulation not in self.regulations) and (
            bad := self._not_applied(regulation)
        ) is not None:
            stats.other_regulation += 1
            self.on_issue(
                "other_regulation", path, line,
                f"regulation {bad!r} is not applied (see properties.regulations)", raw_key,
            )  # fmt: skip
            return
        if raw_key is None or raw_key == "":
            stats.anonymous += 1
            self.on_issue(
                "anonymous", path, line, "no organization_user_id (anonymous user): cannot reach a lead", None
            )
            return
        if raw_key == self._last_raw_key and type(raw_key) is type(self._last_raw_key):
            key, why = self._last_key, self._last_why
        else:
            key, why = normalise_key(raw_key, self.identifier)
            self._last_raw_key, self._last_key, self._last_why = raw_key, key, why
        if key is None:
            self._invalid(path, line, why, raw_key)
            return
        # Timestamps repeat (an export line's events share a handful): parse each text once.
        ts: Any = self._timestamps.get(timestamp, _UNSEEN) if type(timestamp) is str else None
        if ts is _UNSEEN:
            ts = self._timestamp(timestamp)
        if ts is None:
            field_name = "created_at" if kind == "event" else "updated_at"
            what = "missing" if timestamp in (None, "") else f"invalid ({timestamp!r})"
            self._invalid(path, line, f"{_KIND_NAMES[kind]} {field_name} is {what}", raw_key)
            return
        ver = ts
        if kind == "event":
            # A later version of one event (event.updated: a correction, pending -> confirmed)
            # ranks after the earlier one, whatever the input order.
            if version is not None and (parsed := self._timestamp(version)) is not None:
                ver = parsed
        elif kind == "deletion":
            ver = REVOKED  # after every record of its instant
        self._apply(key, ts, ver, kind, consents, user, line, path, raw_key)

    def add_export_line(self, user: dict, events: list, line: int, path: str) -> None:
        """Fold one batch-export line `{"user", "events"}` (`records.export_line`): the same as
        `observe` for each of its observations in order (`records.emit_export_line`), fused into
        one loop for the bulk of a backfill, which has millions of them.

        Only a plain record takes the short way: confirmed (or no status), a configured
        regulation, the key of the record before it, a timestamp already parsed and valid, no
        event version. Its policy outcome is then known to be "apply". Every other record goes
        through `observe`, the one statement of the policy (a test holds the two equal).
        """
        stats = self.stats
        regulations = self.regulations
        gdpr = self._gdpr_by_default
        timestamps = self._timestamps
        apply = self._apply
        # The line's key, normalised once (cached across lines like `observe` does); None when
        # the user has none or it is invalid: then `observe` decides (and reports).
        raw = user.get("organization_user_id")
        key = None
        if type(raw) is str:
            if raw == self._last_raw_key and type(self._last_raw_key) is str:
                key = self._last_key
            else:
                key, why = normalise_key(raw, self.identifier)
                self._last_raw_key, self._last_key, self._last_why = raw, key, why
        consents = user.get("consents")
        if type(consents) is dict:
            reg = user.get("regulation")
            raw_ts = user.get("updated_at")
            ts: Any = timestamps.get(raw_ts, _UNSEEN) if type(raw_ts) is str else None
            if ts is _UNSEEN:
                ts = self._timestamp(raw_ts)
            if (
                key is not None
                and ts is not None
                and ((reg is None and gdpr) or (type(reg) is str and reg in regulations))
            ):
                stats.user_statuses += 1
                apply(key, ts, ts, "user", consents, user, line, path, raw)
            else:
                self.observe(path, *user_fields(user, line))
        elif isinstance(consents, dict):  # a dict subclass: not from orjson, but the same rule
            self.observe(path, *user_fields(user, line))
        for event in events:
            if type(event) is dict:
                owner = event.get("user")
                consents = event.get("consents")
                raw_ts = event.get("created_at")
                status = event.get("status")
                reg = event.get("regulation")
                # The owner's key, so the same lead: what `records.event_fields` gives, then.
                if (
                    key is not None
                    and type(owner) is dict
                    and owner.get("organization_user_id") == raw
                    and type(consents) is dict
                    and (status == "confirmed" or status is None)
                    and ((reg is None and gdpr) or (type(reg) is str and reg in regulations))
                    and type(raw_ts) is str
                    and event.get("updated_at") is None
                ):
                    ts = timestamps.get(raw_ts, _UNSEEN)
                    if ts is _UNSEEN:
                        ts = self._timestamp(raw_ts)
                    if ts is not None:
                        stats.events += 1
                        apply(key, ts, ts, "event", consents, owner, line, path, raw)
                        continue
                self.observe(path, *event_fields(event, line, user))
            elif isinstance(event, dict):
                self.observe(path, *event_fields(event, line, user))
            else:
                self.reject_unusable(not_an_event(event, line), path)

    def _not_applied(self, reg: Any) -> Any:
        """The first regulation of `reg` (one, or a tuple of the record's and its envelope's)
        that is not configured; None when all apply."""
        regs = reg if type(reg) is tuple else (reg,)
        for r in regs:
            if r is None:
                if not self._gdpr_by_default:
                    return "gdpr"
            # isinstance first: `regulation` may be any JSON value, and a list/object is
            # unhashable (`r not in frozenset` raised TypeError).
            elif not isinstance(r, str) or (r not in self.regulations and r.lower() not in self.regulations):
                return r
        return None

    def _timestamp(self, raw: Any) -> int | None:
        timestamps = self._timestamps
        if type(raw) is str:
            ts = timestamps.get(raw, _UNSEEN)
            if ts is not _UNSEEN:
                return ts  # type: ignore[return-value]
            ts = parse_timestamp(raw)
            if len(timestamps) >= 100_000:  # bounded: timestamps repeat, but not forever
                timestamps.clear()
            timestamps[raw] = ts
            return ts
        return None

    def _invalid(self, path: str, line: int, reason: str, key: Any) -> None:
        self.stats.rejected += 1
        self.stats.invalid += 1
        self.on_issue("rejected", path, line, reason, key)

    def _apply(self, key: str, ts: int, ver: int, kind: str, consents: dict, user: dict, line: int,
               path: str, raw_key: Any) -> None:  # fmt: skip
        """Mechanics: read each property's value (slot order) and write it into the lead's slot
        when (ts, ver) is at least the slot's stamp. Extracting and writing in one pass keeps the
        hot path lean; a Malformed flag restores the lead as it was and rejects the record."""
        leads = self._leads
        state = leads.get(key)
        new = state is None
        if state is None:
            if len(leads) >= self.spill_threshold:
                self._spill_out()
            state = leads[key] = self.schema.empty_state(path, line)
        if kind == "deletion":
            values = self._revocation
            for slot, value in zip(self._slots, values):  # noqa: B905 - same length by construction
                if value is not None:
                    t = state[slot + 1]
                    if ts >= t and (ts > t or ver >= state[slot + 2]):
                        state[slot], state[slot + 1], state[slot + 2] = value, ts, ver
        else:
            purposes: dict | None = None
            if self._needs_purposes:
                plist = consents.get("purposes")
                if type(plist) is list:
                    purposes = {}
                    try:
                        for p in plist:
                            purposes[p["id"]] = p
                    except (TypeError, KeyError):  # not an object, no id, an id that is a list...
                        purposes = _by_id(plist)
            saved = state[:]  # a C-level copy: cheaper than extracting every value first
            try:
                for slot, purpose, preference, extract in self._readers:
                    if extract is ENABLED or extract is VALUES:  # Property.extract, inline
                        if not purposes:
                            continue
                        p = purposes.get(purpose)
                        if p is None:
                            continue
                        if extract is ENABLED:  # a purpose's `enabled`
                            value = p.get("enabled")
                            if value is None:
                                continue
                            if value is not True and value is not False:
                                raise Malformed(f"consents.purposes[{purpose}].enabled", value)
                        else:  # a purpose's `values` entry
                            entries = p.get("values")
                            if not isinstance(entries, dict) or preference not in entries:
                                continue
                            entry = entries[preference]
                            value = entry.get("value") if type(entry) is dict else None
                            if type(value) is not str:
                                value = value_ids(entry)
                                if value is None:
                                    continue
                    else:
                        value = extract(purposes, consents, user)
                        if value is None:
                            continue
                    t = state[slot + 1]
                    # Most records are older than what the slot holds: one comparison then.
                    if ts >= t and (ts > t or ver >= state[slot + 2]):
                        state[slot] = value
                        state[slot + 1] = ts
                        state[slot + 2] = ver
            except Malformed as e:
                if new:
                    del leads[key]
                else:
                    state[:] = saved
                self._invalid(path, line, f"{_KIND_NAMES[kind]} rejected: {e}", raw_key)
                return
        state[SRC_PATH] = path
        state[SRC_LINE] = line
        if ts > state[LATEST]:
            state[LATEST] = ts

    def reject(self, category: str, path: str, line: int, reason: str, key: Any = None) -> None:
        """Count a record that never became an observation (bad JSON, unknown shape, deleted)."""
        if category == "deleted":
            self.stats.deleted += 1
        else:
            self.stats.rejected += 1
        self.on_issue(category, path, line, reason, key)

    def reject_unusable(self, record: Unusable, path: str) -> None:
        """`reject` a record that `records` recognised as unusable, read from `path`."""
        self.reject(record.category, path, record.line, record.reason, record.key)

    def staging(self) -> Fold:
        """An empty fold like this one, for one input file whose leads count only once the whole
        file was read (`take`); its issues go where this fold's go. The two together stay under
        the threshold: past half of it, this fold spills first (it soon would anyway), so that
        the staging fold never has to spill in small chunks."""
        if len(self._leads) > self.spill_threshold // 2:
            self._spill_out()
        return self.empty_like(spill_threshold=self.spill_threshold - len(self._leads))

    def empty_like(self, on_issue: IssueSink | None = None, *, spill_threshold: int | None = None,
                   scratch_dir: str | None = None) -> Fold:  # fmt: skip
        """An empty fold of the same kind and rules (schema, key, regulations, deletions); its
        issues, spill threshold and scratch folder are this one's unless given."""
        return type(self)(
            self.schema, self.identifier, self.regulations, on_issue or self.on_issue,
            spill_threshold=self.spill_threshold if spill_threshold is None else spill_threshold,
            scratch_dir=scratch_dir or self.scratch_dir, deletions=self.deletions,
        )  # fmt: skip

    def take(self, staged: Fold) -> None:
        """Fold in the leads `staged` folded from input that comes after all seen so far (as
        `absorb`; spilled ones stream from disk); its counts are the caller's to add. Into an
        empty fold (the first file, or the only one) they are moved as they are, at no cost."""
        if not self._leads and self._spill is None:
            self._leads, staged._leads = staged._leads, {}
            self._spill, staged._spill = staged._spill, None
            self._spill_file, staged._spill_file = staged._spill_file, None
            self._chunk, staged._chunk = staged._chunk, 0
            return
        absorb = self.absorb
        for key, state in staged.leads():
            absorb(key, state)

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
        """Distinct leads. Once spilled, counted in SQLite without spilling what is in memory."""
        if self._spill is None:
            return len(self._leads)
        db = self._spill
        db.execute("CREATE TEMP TABLE IF NOT EXISTS held (key TEXT)")
        try:
            db.executemany("INSERT INTO held VALUES (?)", ((k,) for k in self._leads))
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM (SELECT key FROM spill UNION SELECT key FROM held)"
                ).fetchone()[0]
            )
        finally:
            db.execute("DELETE FROM held")

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
            self._spill_file = ScratchDir("fold", self.scratch_dir)
            # Read back by the delivery's bookkeeping thread (deliver.Engine.run), one user at a time.
            db = sqlite3.connect(Path(self._spill_file.name) / "fold.sqlite", check_same_thread=False)
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


_UNSEEN = object()


ENABLED, VALUES = "enabled", "values"  # the readings _apply does inline


def _inline_reading(p: Property) -> tuple[str, str, str] | None:
    """(purpose, preference, ENABLED | VALUES) for a property _apply reads inline, else None."""
    if len(p.readings) != 1:
        return None
    r = p.readings[0]
    if r.kind == "purpose_enabled":
        return r.purpose, "", ENABLED
    if r.kind == "purpose_values":
        return r.purpose, r.preference, VALUES
    return None


def _by_id(purposes: list) -> dict[Any, dict]:
    """Purposes by id (the last of a repeated id wins); items that are not objects, or whose id
    cannot be a key (a list), are no purpose. A loop: a comprehension is a call of its own."""
    out: dict[Any, dict] = {}
    try:
        for p in purposes:
            out[p["id"]] = p
        return out
    except (TypeError, KeyError):  # an item that is not an object, has no id, or an odd id
        out = {}
        for p in purposes:
            if isinstance(p, dict):
                pid = p.get("id")
                if pid is None or isinstance(pid, str | int | float | bool):
                    out[pid] = p
        return out


_KIND_NAMES = {"event": "event", "user": "user", "deletion": "user.deleted"}


def merge_states(older: list[Any], newer: list[Any]) -> list[Any]:
    """Merge the fold of an earlier chunk of input with a later one (ties go to the later)."""
    out = list(newer)
    out[LATEST] = max(older[LATEST], newer[LATEST])
    for v in range(FIRST_SLOT, len(out), SLOT_WIDTH):
        if (older[v + 1], older[v + 2]) > (newer[v + 1], newer[v + 2]):
            out[v], out[v + 1], out[v + 2] = older[v], older[v + 1], older[v + 2]
    return out


def restore_never(state: list[Any]) -> list[Any]:
    """Spilled states store "never" (-inf, not JSON) as null; put it back."""
    if state[LATEST] is None:
        state[LATEST] = NEVER
    for v in range(FIRST_SLOT, len(state), SLOT_WIDTH):
        if state[v + 1] is None:
            state[v + 1] = NEVER
        if state[v + 2] is None:
            state[v + 2] = NEVER
    return state
