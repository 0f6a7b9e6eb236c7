"""Folded leads -> Marketo lead payloads, and what a run would send.

Pure: nothing here talks to Marketo. A dry run and `preview` are this stage rendered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from didomi_marketo.didomi.fold import LATEST, NEVER, SRC_LINE, SRC_PATH, FoldSchema, format_timestamp
from didomi_marketo.mapping import FieldMapping, classify_value
from didomi_marketo.marketo.codes import LEAD_NOT_FOUND
from didomi_marketo.outcomes import LeadUpdate, payload_hash


class PriorState(Protocol):
    """What the state store knows of a lead: see state.StateStore."""

    def lead(self, key: str) -> Any: ...  # LeadState | None: confirmed, pending, skipped_hash

    def confirmed(self, key: str) -> dict[str, tuple[Any, float]] | None: ...


@dataclass
class PlanStats:
    leads: int = 0
    to_send: int = 0
    nothing_to_send: int = 0
    unchanged: int = 0  # same values as Marketo last confirmed (or last permanently skipped)
    pending_resent: int = 0  # leads pending from an earlier run, not in this input, re-sent
    kept_newer: int = 0  # fields where the state held a newer consent than the input
    fields: dict[str, Counter] = field(default_factory=dict)

    def count_field(self, name: str, bucket: str) -> None:
        counter = self.fields.get(name)
        if counter is None:
            counter = self.fields[name] = Counter()
        counter[bucket] += 1


class Planner:
    """Turns fold states into LeadUpdates under one config's mappings."""

    def __init__(
        self,
        mappings: list[FieldMapping],
        schema: FoldSchema,
        lookup_field: str,
        state: PriorState | None = None,
        action: str = "updateOnly",
    ):
        self.mappings = mappings
        self.action = action
        self.schema = schema
        self.lookup_field = lookup_field
        self.state = state
        # Leads an earlier run left pending: re-sent even if this input never mentions them.
        self.pending: set[str] = (
            state.pending_keys() if state is not None and hasattr(state, "pending_keys") else set()
        )
        self.stats = PlanStats()
        # A lead is worth sending when a consent property has a value; timestamps, country or
        # metadata alone are not (unless the config maps no consent property at all).
        self._consent_fields = {m.field for m in mappings if m.source is not None and m.source.is_consent}
        for m in mappings:
            self.stats.fields[m.field] = Counter()
        self._sources = [
            (
                m,
                None
                if m.source is None
                else (LATEST if m.source.name == "updated_at" else schema.slots[m.source.name]),
            )
            for m in mappings
        ]

    def values(self, state: list[Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """The Marketo field values a fold state maps to, with each value's consent timestamp."""
        fields: dict[str, Any] = {}
        stamps: dict[str, float] = {}
        consts: list[FieldMapping] = []
        for m, slot in self._sources:
            if slot is None:
                consts.append(m)
                continue
            if slot == LATEST:
                ts = state[LATEST]
                if ts == NEVER:
                    continue
                value = format_timestamp(ts)
            else:
                value, ts = state[slot], state[slot + 1]
                if value is None:
                    continue
            rendered = m.render(value)
            if rendered is None:  # `map: {id: null}` would blank the Marketo field: null is never sent
                continue
            fields[m.field] = rendered
            stamps[m.field] = ts
        if self._consent_fields and self._consent_fields.isdisjoint(fields):
            return {}, {}
        if fields:  # a constant alone never makes a lead worth sending
            for m in consts:
                fields[m.field] = m.render(None)
                stamps[m.field] = 0.0  # constants have no consent time: any newer value wins
        return fields, stamps

    def plan(self, leads: Iterable[tuple[str, list[Any]]]) -> Iterator[LeadUpdate]:
        stats = self.stats
        lookup = self.lookup_field
        as_int = lookup == "id"
        for key, state in leads:
            stats.leads += 1
            fields, stamps = self.values(state)
            if not fields:
                stats.nothing_to_send += 1
                continue
            if self.state is not None and not self._worth_sending(key, fields, stamps):
                stats.unchanged += 1
                continue
            yield self._update(key, {lookup: int(key) if as_int else key, **fields},
                               f"{state[SRC_PATH]}:{state[SRC_LINE]}", stamps)  # fmt: skip
        if self.pending and self.state is not None:
            for key, payload, stamps in self.state.pending_payloads(self.pending):  # type: ignore[attr-defined]
                if lookup in payload:
                    stats.pending_resent += 1
                    yield self._update(key, payload, "state:pending", stamps)

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

    def _update(self, key: str, payload: dict[str, Any], source: str, stamps: dict[str, float]) -> LeadUpdate:
        stats = self.stats
        for name, value in payload.items():
            if name != self.lookup_field:
                stats.count_field(name, classify_value(value))
        stats.to_send += 1
        return LeadUpdate(key, payload, source, stamps)

    def _worth_sending(self, key: str, fields: dict[str, Any], stamps: dict[str, float]) -> bool:
        """Against the state: keep newer confirmed values (an old file read late changes nothing),
        then send when a value differs from what Marketo confirmed, or the lead is pending.
        A lead Marketo skipped for good (1004, 1006...) is not re-sent until its values change.
        """
        assert self.state is not None
        prior = self.state.lead(key)
        if prior is None:
            return True
        pending = key in self.pending
        self.pending.discard(key)
        if pending and prior.pending:
            # The pending payload was never confirmed: what this input does not say still
            # has to go out, and per field the later consent wins.
            p_stamps = prior.pending.get("stamps") or {}
            for name, value in prior.pending["payload"].items():
                if name != self.lookup_field and (
                    name not in fields or p_stamps.get(name, NEVER) > stamps.get(name, NEVER)
                ):
                    fields[name] = value
                    stamps[name] = p_stamps.get(name, 0.0)
        self.stats.kept_newer += keep_newer(prior.confirmed, fields, stamps)
        changed = any(
            name not in prior.confirmed or prior.confirmed[name][0] != value for name, value in fields.items()
        )
        if pending:
            return True
        if prior.skipped_code == LEAD_NOT_FOUND and self.action == "createOrUpdate":
            return True  # skipped as "not a lead" under updateOnly; upsert now creates it
        if changed and prior.skipped_hash is not None:
            return payload_hash(fields) != prior.skipped_hash
        return changed


def keep_newer(
    confirmed: dict[str, tuple[Any, float]], fields: dict[str, Any], stamps: dict[str, float]
) -> int:
    """Per field, the newer consent wins: where Marketo confirmed a value with a later consent
    time than the input's, that value replaces the input's (an old file read late changes
    nothing). Updates `fields` and `stamps` in place; returns how many fields it kept."""
    kept = 0
    for name in list(fields):
        before = confirmed.get(name)
        if before is not None and before[1] > stamps.get(name, NEVER):
            fields[name], stamps[name] = before
            kept += 1
    return kept
