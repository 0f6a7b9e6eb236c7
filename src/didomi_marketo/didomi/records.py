"""Recognise Didomi record shapes anywhere in the input and turn them into consent observations.

Shapes (Didomi's documented formats): a batch-export line `{"user", "events"}`, a user
(consent status), an event (partial update), a webhook envelope `{"type", "parameters"}`, and a
Consents API page `{"data": [...]}`. Arrays of any of these are walked too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from didomi_marketo.didomi.readers import LinedDocument


@dataclass(slots=True)
class Observation:
    """One user status (at its `updated_at`), one event (at its `created_at`), or one user
    deletion (at the deleted user's `updated_at`) for one user."""

    kind: str  # "user" | "event" | "deletion"
    key: Any  # organization_user_id as found (validated later against the identifier)
    timestamp: Any  # the raw created_at / updated_at
    consents: dict
    user: dict  # the user object, or the event's `user`
    regulation: Any  # one value, or a tuple (a webhook's envelope, source event and entity)
    status: Any  # confirmed | pending_approval | None (an event's, or a user.updated's source's)
    line: int
    version: Any = None  # events: the raw updated_at (a later version of one event id wins)


@dataclass(slots=True)
class Unusable:
    """A record that cannot become an observation: deleted (ignored) or unrecognised (rejected)."""

    category: str  # "deleted" | "rejected"
    reason: str
    line: int
    key: Any = None


WEBHOOK_ENTITY = {
    "event.created": ("event", "entity"),
    "event.updated": ("event", "new_entity"),
    "user.created": ("user", "entity"),
    "user.updated": ("user", "new_entity"),
}


def observations(value: Any, line: int) -> Iterable[Observation | Unusable]:
    """Every observation in a parsed NDJSON line or document (with per-object lines)."""
    parts = export_line(value)
    if parts is not None:  # the bulk of a backfill: no generator layers
        return _export_observations(parts[0], parts[1], line)
    if isinstance(value, LinedDocument):
        return _walk(value.value, _LineCursor(value.object_lines, line))
    return _walk(value, _FixedLine(line))


def export_line(value: Any) -> tuple[dict, list] | None:
    """(user, events) when `value` is one batch-export line `{"user", "events"}`, else None."""
    if type(value) is dict:
        user, events = value.get("user"), value.get("events")
        if type(user) is dict and value.get("consents") is None and _export_events(user, events):
            return user, events or []
    return None


# emit(kind, key, timestamp, consents, user, regulation, status, line, version): an Observation's
# fields, in order. The fold takes them as they are (Fold.observe): a backfill has millions.
Emit = Callable[..., None]


class _FixedLine:
    """NDJSON: every record in a line has that line."""

    def __init__(self, line: int):
        self.line = line

    def at(self, obj: dict) -> int:
        return self.line

    def skip(self, obj: Any) -> None:
        pass


class _LineCursor:
    """Document: the n-th dict in pre-order starts at object_lines[n]."""

    def __init__(self, object_lines: list[int], default: int):
        self.lines, self.next, self.default = object_lines, 0, default

    def at(self, obj: dict) -> int:
        """Line of `obj`, which must be the next dict in pre-order; consumes it and its children."""
        line = self.lines[self.next] if self.next < len(self.lines) else self.default
        self.next += 1 + _count_dicts_inside(obj)
        return line

    def skip(self, obj: Any) -> None:
        self.next += _count_dicts(obj)


def _count_dicts(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + _count_dicts_inside(value)
    if isinstance(value, list):
        return sum(_count_dicts(v) for v in value)
    return 0


def _count_dicts_inside(obj: dict) -> int:
    return sum(_count_dicts(v) for v in obj.values())


def _walk(value: Any, cursor: _FixedLine | _LineCursor) -> Iterator[Observation | Unusable]:
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, cursor)
        return
    if not isinstance(value, dict):
        yield Unusable("rejected", f"expected a JSON object, got {_type_name(value)}", _cursor_line(cursor))
        return
    data = value.get("data")
    if isinstance(data, list) and "consents" not in value and "type" not in value:
        # A Consents API page: its records are the items, each at its own line.
        if isinstance(cursor, _LineCursor):
            cursor.next += 1  # the page object itself
        for child in value.values():
            if child is data:
                yield from _walk(data, cursor)
            else:
                cursor.skip(child)
        return
    line = cursor.at(value)
    yield from recognise(value, line)


def _cursor_line(cursor: _FixedLine | _LineCursor) -> int:
    if isinstance(cursor, _LineCursor):
        n = cursor.next
        return cursor.lines[n - 1] if 0 < n <= len(cursor.lines) else cursor.default
    return cursor.line


def recognise(obj: dict, line: int) -> Iterator[Observation | Unusable]:
    """Observations from one record object (not a page or an array)."""
    consents = obj.get("consents")
    user = obj.get("user")
    events = obj.get("events")
    if isinstance(user, dict) and consents is None and _export_events(user, events):
        yield from _export_observations(user, events or [], line)
    elif "type" in obj and isinstance(obj.get("parameters"), dict):
        yield from _webhook(obj, line)
    elif isinstance(consents, dict):
        if isinstance(user, dict):
            yield _event(obj, line)
        else:
            yield _user(obj, line)
    elif consents is None and "organization_user_id" in obj and not isinstance(user, dict):
        # A user status without `consents` (a user known to Didomi who made no choice yet):
        # nothing to send, not an error. Its timestamp and key are still checked by the fold.
        yield _user(obj, line)
    else:
        keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
        yield Unusable(
            "rejected",
            "not a Didomi record (expected a user, an event, a webhook, an export line or an API "
            f"page; keys: {keys})",
            line,
        )


def _user(user: dict, line: int, regulation: Any = None, status: Any = None) -> Observation:
    return Observation(*user_fields(user, line, regulation, status))


def user_fields(user: dict, line: int, regulation: Any = None, status: Any = None) -> tuple:
    consents = user.get("consents")
    return (
        "user", user.get("organization_user_id"), user.get("updated_at"),
        consents if isinstance(consents, dict) else {}, user,
        user.get("regulation") if regulation is None else regulation, status, line, None,
    )  # fmt: skip


def _event(event: dict, line: int, owner: dict | None = None, regulation: Any = None) -> Observation:
    return Observation(*event_fields(event, line, owner, regulation))


def event_fields(event: dict, line: int, owner: dict | None = None, regulation: Any = None) -> tuple:
    user = event.get("user")
    if not isinstance(user, dict):
        user = owner or {}
    key = user.get("organization_user_id")
    if key is None and owner is not None:
        key = owner.get("organization_user_id")
        user = {**owner, **user}
    consents = event.get("consents")
    return (
        "event", key, event.get("created_at"), consents if isinstance(consents, dict) else {},
        user, event.get("regulation") if regulation is None else regulation, event.get("status"), line,
        event.get("updated_at"),
    )  # fmt: skip


def _export_events(user: dict, events: Any) -> bool:
    """Whether `{"user", "events"}` is a batch-export line. Events may be null or absent when the
    user carries its consent status (no event in the period, or imported consents): the status
    still counts. A `user` without consents and without events is no export line."""
    return type(events) is list or (events is None and type(user.get("consents")) is dict)


def _export_observations(user: dict, events: list, line: int) -> list[Observation | Unusable]:
    out: list[Observation | Unusable] = []
    emit_export_line(user, events, line, lambda *fields: out.append(Observation(*fields)), out.append)
    return out


def emit_export_line(
    user: dict, events: list, line: int, emit: Emit, unusable: Callable[[Unusable], None]
) -> None:
    """The observations of one batch-export line, in order: the user's status, then each event."""
    if isinstance(user.get("consents"), dict):
        emit(*user_fields(user, line))
    for event in events:
        if isinstance(event, dict):
            emit(*event_fields(event, line, owner=user))
        else:
            unusable(not_an_event(event, line))


def not_an_event(item: Any, line: int) -> Unusable:
    """An `events[]` item of an export line that is not an object."""
    return Unusable("rejected", f"events[] item is {_type_name(item)}, not an event", line)


def _webhook(envelope: dict, line: int) -> Iterator[Observation | Unusable]:
    kind = envelope.get("type")
    params = envelope["parameters"]
    if kind == "user.deleted":
        # Often an erasure request: counted as a warning, and folded as "no consent" under
        # `deletions: revoke` (the fold decides). Ordered at the deleted user's updated_at.
        entity = params.get("entity") if isinstance(params.get("entity"), dict) else {}
        yield Observation(
            "deletion", entity.get("organization_user_id"),
            entity.get("deleted_at") or entity.get("updated_at"), {}, entity, None, None, line,
        )  # fmt: skip
        return
    if isinstance(kind, str) and kind.endswith(".deleted"):
        entity = params.get("entity") if isinstance(params.get("entity"), dict) else {}
        # entity.user may be any JSON value: only read a key from an object (a string crashed).
        owner = entity.get("user")
        key = entity.get("organization_user_id") or (
            owner.get("organization_user_id") if isinstance(owner, dict) else None
        )
        yield Unusable("deleted", f"webhook {kind} is not applied to Marketo", line, key)
        return
    # `type` may be any JSON value; a list or object is unhashable and crashed the lookup.
    if not isinstance(kind, str) or kind not in WEBHOOK_ENTITY:
        yield Unusable("rejected", f"unknown webhook type {kind!r}", line)
        return
    shape, slot = WEBHOOK_ENTITY[kind]
    entity = params.get(slot)
    if not isinstance(entity, dict):
        yield Unusable("rejected", f"webhook {kind} has no parameters.{slot} object", line)
        return
    # Every regulation the envelope names must apply: its own, the entity's, and (user.updated)
    # the one of the event that caused the update. Otherwise a CPRA event would overwrite
    # GDPR consent through the user status.
    source = params.get("source") if kind == "user.updated" else None
    source = source if isinstance(source, dict) else {}
    regs = tuple(
        r
        for r in (envelope.get("regulation"), source.get("regulation"), entity.get("regulation"))
        if r is not None
    )
    regulation = None if not regs else regs[0] if len(regs) == 1 else regs
    if shape == "event":
        yield _event(entity, line, regulation=regulation)
    elif entity.get("consents") is None or isinstance(entity.get("consents"), dict):
        yield _user(entity, line, regulation, source.get("status"))
    else:
        yield Unusable("rejected", f"webhook {kind}: parameters.{slot}.consents is not an object", line)


def _type_name(value: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
