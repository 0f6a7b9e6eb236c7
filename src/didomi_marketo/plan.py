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


@dataclass(slots=True)
class LeadUpdate:
    """One lead to send: its key, the Marketo payload (lookup field first), where it came from."""

    key: str
    payload: dict[str, Any]
    source: str  # "path:line" of the latest record that touched the lead
    stamps: dict[str, float] = field(default_factory=dict)  # field -> consent timestamp


class ConfirmedState(Protocol):
    """What Marketo last confirmed for a lead (the state store, issue #4)."""

    def confirmed(self, key: str) -> dict[str, tuple[Any, float]] | None: ...


@dataclass
class PlanStats:
    leads: int = 0
    to_send: int = 0
    nothing_to_send: int = 0
    unchanged: int = 0
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
        state: ConfirmedState | None = None,
    ):
        self.mappings = mappings
        self.schema = schema
        self.lookup_field = lookup_field
        self.state = state
        self.stats = PlanStats()
        for m in mappings:
            self.stats.fields[m.field] = Counter()
        self._sources = [
            (m, None if m.source is None else (LATEST if m.source.name == "updated_at" else schema.slots[m.source.name]))
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
        if fields:  # a constant alone never makes a lead worth sending
            for m in consts:
                fields[m.field] = m.render(None)
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
            if self.state is not None:
                fields, changed = self._against_confirmed(key, fields, stamps)
                if not changed:
                    stats.unchanged += 1
                    continue
            for name, value in fields.items():
                stats.count_field(name, classify_value(value))
            stats.to_send += 1
            payload = {lookup: int(key) if as_int else key, **fields}
            yield LeadUpdate(key, payload, f"{state[SRC_PATH]}:{state[SRC_LINE]}", stamps)

    def _against_confirmed(
        self, key: str, fields: dict[str, Any], stamps: dict[str, float]
    ) -> tuple[dict[str, Any], bool]:
        """Keep newer confirmed values (an old file read late changes nothing); diff the rest."""
        assert self.state is not None
        confirmed = self.state.confirmed(key)
        if not confirmed:
            return fields, True
        changed = False
        for name in list(fields):
            before = confirmed.get(name)
            if before is None:
                changed = True
                continue
            value, ts = before
            if ts > stamps.get(name, NEVER):
                self.stats.kept_newer += 1
                fields[name] = value
                stamps[name] = ts
            elif value != fields[name]:
                changed = True
        return fields, changed
