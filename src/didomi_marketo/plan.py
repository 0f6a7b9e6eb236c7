"""Folded leads -> Marketo lead payloads, and what a run would send.

Pure: nothing here talks to Marketo. A dry run and `preview` are this stage rendered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from didomi_marketo.didomi.fold import (
    NEVER,
    NO_STAMP,
    FoldSchema,
    Stamp,
    format_timestamp,
    latest,
    source,
    stamp_at,
    value_at,
)
from didomi_marketo.mapping import FieldMapping, classify_value
from didomi_marketo.marketo.codes import LEAD_NOT_FOUND
from didomi_marketo.outcomes import LeadUpdate, payload_hash

UPDATED_AT = -1  # the pseudo-slot of the `updated_at` property: the latest applied record's time
CONST_STAMP: Stamp = (0, 0)  # constants have no consent time: any real value is newer
RECHECK_CODES = ("1004", "1007")  # skips that may heal once the lead exists (or is unique)


def keep_newer(
    prior: Mapping[str, tuple[Any, Stamp]], fields: dict[str, Any], stamps: dict[str, Stamp]
) -> int:
    """The one rule "keep the newer consent", for sync, retry, preview and reconcile alike.

    For each field of `fields`, when `prior` (what the state knows: `LeadState.known()`) holds a
    value with a newer stamp than the input's, that value and stamp replace the input's, in place:
    an older record read late never overwrites a newer known consent. A tie goes to the input (it
    is read later). Returns how many fields it kept.
    """
    kept = 0
    for name in list(fields):
        entry = prior.get(name)
        if entry is not None and entry[1] > stamps.get(name, NO_STAMP):
            fields[name], stamps[name] = entry
            kept += 1
    return kept


def newest(*sources: Mapping[str, tuple[Any, Stamp]]) -> dict[str, tuple[Any, Stamp]]:
    """Per field, the (value, stamp) with the greatest stamp among `sources` (ties: the later)."""
    out: dict[str, tuple[Any, Stamp]] = {}
    for src in sources:
        for name, entry in src.items():
            have = out.get(name)
            if have is None or entry[1] >= have[1]:
                out[name] = entry
    return out


class PriorLead(Protocol):
    """What the state knows of one lead (state.LeadState)."""

    confirmed: dict[str, tuple[Any, Stamp]]  # what Marketo last confirmed
    skipped_hash: str | None
    skipped_code: str | None

    @property
    def pending(self) -> dict[str, Any] | None: ...

    def known(self) -> dict[str, tuple[Any, Stamp]]: ...  # the newest known consent per field


class PriorState(Protocol):
    """What the state store knows of the leads: see state.StateStore."""

    def lead(self, key: str) -> PriorLead | None: ...


@dataclass
class PlanStats:
    leads: int = 0
    to_send: int = 0
    nothing_to_send: int = 0
    unchanged: int = 0  # same values as Marketo last confirmed (or last permanently skipped)
    pending_resent: int = 0  # leads pending from an earlier run, not in this input, re-sent
    rechecked: int = 0  # leads skipped with 1004/1007, not in this input, re-sent (--recheck-skipped)
    kept_newer: int = 0  # fields where the state held a newer consent than the input
    fields: dict[str, Counter] = field(default_factory=dict)

    def add(self, other: PlanStats) -> None:
        """Count in another planner's stats (a key shard planned in a worker process)."""
        for f in fields(self):
            if f.name != "fields":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for name, counter in other.fields.items():
            self.fields.setdefault(name, Counter()).update(counter)


class Planner:
    """Turns fold states into LeadUpdates under one config's mappings."""

    def __init__(
        self,
        mappings: list[FieldMapping],
        schema: FoldSchema,
        lookup_field: str,
        state: PriorState | None = None,
        action: str = "updateOnly",
        recheck_skipped: bool = False,
        send_all: bool = False,
        on_fresher: Callable[[str, dict[str, Any], dict[str, Stamp]], None] | None = None,
        pending: set[str] | None = None,
        rechecks: set[str] | None = None,
    ):
        self.mappings = mappings
        self.send_all = send_all  # --full: send every lead, changed or not (newer known still kept)
        # Leads not sent (same values as Marketo has) whose input restates them with a newer
        # stamp than the state knows: the state must learn the newer stamp (StateStore.remember_known).
        self.on_fresher = on_fresher
        self.action = action
        self.schema = schema
        self.lookup_field = lookup_field
        self.state = state
        # Leads an earlier run left pending: re-sent even if this input never mentions them.
        # `pending` and `rechecks`, when given, stand for the state's: a key shard's share of
        # them, planned in a worker (the parent read them once).
        if pending is None:
            pending = state.pending_keys() if state is not None and hasattr(state, "pending_keys") else set()
        self.pending: set[str] = pending
        # --recheck-skipped: leads Marketo skipped as absent (1004) or ambiguous (1007), re-sent
        # with their newest known consent (they may exist, or be unique, by now).
        if rechecks is None:
            rechecks = (
                state.skipped_keys(RECHECK_CODES)  # type: ignore[attr-defined]
                if recheck_skipped and state is not None
                else set()
            )
        self.rechecks: set[str] = rechecks
        self.stats = PlanStats()
        self._mapped = {m.field for m in mappings}
        # A lead is worth sending when a consent property has a value; timestamps, country or
        # metadata alone are not (unless the config maps no consent property at all).
        self._consent_fields = {m.field for m in mappings if m.source is not None and m.source.is_consent}
        for m in mappings:
            self.stats.fields[m.field] = Counter()
        # Per mapping: (mapping, slot, its transforms' render or None when it has none). Planning
        # runs once per lead: a million leads make every call here count.
        self._sources = [
            (
                m,
                None
                if m.source is None
                else (UPDATED_AT if m.source.name == "updated_at" else schema.slots[m.source.name]),
                m.render if m.transforms else None,
            )
            for m in mappings
        ]
        self._times: dict[float, str] = {}  # format_timestamp, cached: lead times repeat

    def values(
        self, state: list[Any], consent_known: bool = False
    ) -> tuple[dict[str, Any], dict[str, Stamp]]:
        """The Marketo field values a fold state maps to, with each value's consent stamp.

        A lead with no consent value has nothing to send, unless `consent_known` (the state holds
        consent for it from an earlier run: its newer country or updated_at must still go out)."""
        fields: dict[str, Any] = {}
        stamps: dict[str, Stamp] = {}
        consts: list[FieldMapping] = []
        for m, slot, render in self._sources:
            if slot is None:
                consts.append(m)
                continue
            if slot == UPDATED_AT:
                ts = latest(state)
                if ts == NEVER:
                    continue
                value = self._times.get(ts)
                if value is None:
                    if len(self._times) >= 10_000:
                        self._times.clear()
                    value = self._times[ts] = format_timestamp(ts)
                stamp: Stamp = (ts, ts)
            else:
                value = value_at(state, slot)
                if value is None:
                    continue
                stamp = stamp_at(state, slot)
            if render is not None:
                value = render(value)
                if value is None:  # `map: {id: null}` would blank the Marketo field: null is never sent
                    continue
            fields[m.field] = value
            stamps[m.field] = stamp
        if self._consent_fields and not consent_known and self._consent_fields.isdisjoint(fields):
            return {}, {}
        if fields:  # a constant alone never makes a lead worth sending
            for m in consts:
                fields[m.field] = m.render(None)
                stamps[m.field] = CONST_STAMP
        return fields, stamps

    def plan(self, leads: Iterable[tuple[str, list[Any]]]) -> Iterator[LeadUpdate]:
        """Yield the LeadUpdate of every folded lead worth sending, then the state's pending leads
        this input did not mention (and, with recheck_skipped, its 1004/1007 skips).

        Without a state every lead with a consent value is sent. With one, each lead's values
        are first merged with the newest consent the state knows (`keep_newer`); the lead is
        sent when a value differs from what Marketo confirmed, or it is pending; a lead Marketo
        skipped is sent with its full newest known consent once that changes.
        """
        yield from self.plan_folded(leads)
        yield from self.plan_from_state()

    def plan_folded(self, leads: Iterable[tuple[str, list[Any]]]) -> Iterator[LeadUpdate]:
        """The first part of `plan`: the folded leads. Each one seen leaves `pending` and
        `rechecks` (so key shards planned apart, each with its share of them, add up to `plan`)."""
        stats = self.stats
        lookup = self.lookup_field
        as_int = lookup == "id"
        for key, state in leads:
            stats.leads += 1
            fields, stamps = self.values(state)
            if not fields and self.state is not None and self._has_known_consent(key):
                # This run says only non-consent things about a lead an earlier run sent consent
                # for: a full run would send them, so an incremental one must too.
                fields, stamps = self.values(state, consent_known=True)
            if not fields:
                stats.nothing_to_send += 1
                continue
            if self.state is not None and not self._worth_sending(key, fields, stamps):
                stats.unchanged += 1
                continue
            yield self._update(key, {lookup: int(key) if as_int else key, **fields}, source(state), stamps)

    def plan_from_state(self) -> Iterator[LeadUpdate]:
        """The rest of `plan`: the state's pending leads (and rechecks) no folded lead covered."""
        stats = self.stats
        lookup = self.lookup_field
        as_int = lookup == "id"
        if self.pending and self.state is not None:
            for key, payload, stamps in self.state.pending_payloads(self.pending):  # type: ignore[attr-defined]
                self.rechecks.discard(key)
                if lookup in payload:
                    stats.pending_resent += 1
                    yield self._update(key, payload, "state:pending", stamps)
        if self.rechecks and self.state is not None:
            for key in sorted(self.rechecks):
                prior = self.state.lead(key)
                if prior is None:
                    continue
                fields, stamps = self._fill({}, {}, prior.known())
                if self._consent_fields and self._consent_fields.isdisjoint(fields):
                    continue  # a state written before it kept skipped leads' consent
                stats.rechecked += 1
                yield self._update(
                    key, {lookup: int(key) if as_int else key, **fields}, "state:recheck", stamps
                )

    def reconcile(self, updates: Iterable[LeadUpdate]) -> Iterator[LeadUpdate]:
        """`retry`: re-check earlier payloads against the state, so a newer sync is never undone."""
        lookup = self.lookup_field
        for u in updates:
            fields = {k: v for k, v in u.payload.items() if k != lookup}
            stamps = dict(u.stamps)
            if self.state is not None and not self._worth_sending(u.key, fields, stamps):
                self.stats.unchanged += 1
                continue
            yield self._update(u.key, {lookup: u.payload[lookup], **fields}, u.source, stamps)

    def _update(self, key: str, payload: dict[str, Any], source: str, stamps: dict[str, Stamp]) -> LeadUpdate:
        stats = self.stats
        counters, lookup = stats.fields, self.lookup_field
        for name, value in payload.items():  # every field of every lead sent: kept lean
            if name != lookup:
                counter = counters.get(name)
                if counter is None:  # a retried payload's field the mappings no longer have
                    counter = counters[name] = Counter()
                counter[classify_value(value)] += 1
        stats.to_send += 1
        return LeadUpdate(key, payload, source, stamps)

    def _has_known_consent(self, key: str) -> bool:
        assert self.state is not None
        prior = self.state.lead(key)
        if prior is None:
            return False
        return not self._consent_fields.isdisjoint(prior.known()) or not self._consent_fields.isdisjoint(
            prior.confirmed
        )

    def _fill(
        self, fields: dict[str, Any], stamps: dict[str, Stamp], known: Mapping[str, tuple[Any, Stamp]]
    ) -> tuple[dict[str, Any], dict[str, Stamp]]:
        """Add every mapped field the state knows and `fields` lacks (a lead Marketo never
        confirmed must get its whole newest consent, not only what this input says)."""
        for name, (value, stamp) in known.items():
            if name not in fields and name in self._mapped and name != self.lookup_field:
                fields[name] = value
                stamps[name] = stamp
        return fields, stamps

    def _worth_sending(self, key: str, fields: dict[str, Any], stamps: dict[str, Stamp]) -> bool:
        """Against the state: keep the newer known consent (an old file read late changes
        nothing), then send when a value differs from what Marketo confirmed, or the lead is
        pending. A lead Marketo never confirmed (pending, or skipped) carries its whole newest
        known consent. A lead skipped for good (1004, 1006...) is not re-sent until that newest
        known consent changes (a re-read file is not news; `--recheck-skipped` is the way to
        try 1004/1007 leads again).
        """
        assert self.state is not None
        prior = self.state.lead(key)
        if prior is None:
            return True
        pending = key in self.pending
        self.pending.discard(key)
        self.rechecks.discard(key)
        known = prior.known()
        self.stats.kept_newer += keep_newer(known, fields, stamps)
        if pending or prior.skipped_code is not None:
            self._fill(fields, stamps, known)
        changed = False
        for name, value in fields.items():
            before = prior.confirmed.get(name)
            if before is None or before[0] != value:
                changed = True
        if pending or self.send_all:
            return True
        if prior.skipped_code == LEAD_NOT_FOUND and self.action == "createOrUpdate":
            return True  # skipped as "not a lead" under updateOnly; upsert now creates it
        if changed and prior.skipped_hash is not None:
            changed = payload_hash(fields) != prior.skipped_hash
        fresher = any(name not in known or stamps[name] > known[name][1] for name in fields)
        if not changed and fresher and self.on_fresher is not None:
            self.on_fresher(key, fields, stamps)
        return changed
