"""`explain KEY`: what happened to one person's consent, and why Marketo says what it says.

Nothing here decides consent: every record that touches the key is fed, in input order, through
a real `Fold` built exactly as `sync` builds it, and explain only watches. A record holds a
field when, right after it was added, the fold's slot equals what a fresh fold makes of that
record alone (its value and its stamp); a record was ignored when the fold reported it (pending,
other regulation, deleted, rejected...) with the fold's own reason; what a record says is read
with the mapping's own property readers (shown for ignored records too). One owner per rule: the
rules stay in `didomi/fold.py` and `plan.py`, and explain follows them when they change.

It never needs credentials and never calls Marketo: Marketo's answers come from the state
(confirmed values, pending payload, skip code) and from `--report` directories.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from didomi_marketo.config import Config
from didomi_marketo.didomi.fold import (
    NEVER,
    Fold,
    format_timestamp,
    latest,
    normalise_key,
    stamp_at,
    value_at,
)
from didomi_marketo.didomi.readers import (
    UNREADABLE,
    IncompletePartition,
    InputFile,
    Problem,
    Skipped,
    open_binary,
    read_records,
    sniff_json,
)
from didomi_marketo.didomi.records import Observation, Unusable, observations
from didomi_marketo.errors import ConfigError
from didomi_marketo.inputs import InputStats, build_fold, discover_all
from didomi_marketo.plan import Planner, keep_newer
from didomi_marketo.state import StateStore, lead_record

REPORT_FILES = ("delivered", "undelivered", "ignored", "rejected")


def consent_time(stamp: Any) -> str | None:
    """A consent stamp as the fold keeps it (a time, or a (time, version) pair) as ISO 8601;
    None for "never" and for constants (0)."""
    t = stamp[0] if isinstance(stamp, list | tuple) and stamp else stamp
    if not isinstance(t, int | float) or isinstance(t, bool) or t in (NEVER, 0) or t != t:
        return None
    return format_timestamp(t)


def wall_clock(t: float) -> str:
    """A wall-clock time (time.time()) as UTC ISO 8601, to the second."""
    return datetime.fromtimestamp(round(t), UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Step:
    """One input record that touched the key, in fold order."""

    n: int  # its number in fold order (an export line holds a user status and its events)
    source: str  # path:line
    kind: str  # user | event | a webhook that is not applied (deleted)
    created_at: Any = None
    updated_at: Any = None
    regulation: Any = None
    status: Any = None
    said: dict[str, Any] = field(default_factory=dict)  # Marketo field -> value, as it would be sent
    applied: bool = True
    ignored: str | None = None  # why the fold did not apply it (its category and reason)
    won: list[str] = field(default_factory=list)  # fields it wins in the end
    older_than_state: list[str] = field(default_factory=list)  # fields where the state holds newer
    overtaken: dict[str, str] = field(default_factory=dict)  # field it says -> the record holding it, why


@dataclass
class Verdict:
    """One Marketo field: the folded value, the record that won it, and why."""

    field: str
    value: Any
    step: int | None  # the Step that won it
    source: str | None
    consent_at: str | None
    reason: str


@dataclass
class Explanation:
    key: str
    identifier: str
    steps: list[Step] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    payload: dict[str, Any] | None = None  # what a sync would send now (None: nothing)
    payload_note: str = ""
    state: dict[str, Any] | None = None  # the state's record of the lead (state show KEY)
    reports: list[dict[str, Any]] = field(default_factory=list)  # lines of --report files
    inputs_read: int = 0  # records parsed
    files_without_key: int = 0  # files never spelling the key: not parsed at all
    state_given: bool = False

    @property
    def found(self) -> bool:
        return bool(self.steps or self.state or self.reports)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["found"] = self.found
        return out


def match_key(raw: str, identifier: str) -> str:
    """KEY as the sync matches it: emails case-insensitively, lead ids as numbers."""
    key, why = normalise_key(raw, identifier)
    if key is None:
        raise ConfigError(f"KEY {raw!r}: {why}")
    return key


# ---------------------------------------------------------------------------------------------
# the records of one key, through a real fold


class _Watcher:
    """Collects what the fold reports about the key's records (ignored, rejected)."""

    def __init__(self) -> None:
        self.last: tuple[str, str] | None = None

    def __call__(self, category: str, path: str, line: int, reason: str, key: Any) -> None:
        self.last = (category, reason)


@dataclass
class Trace:
    """One key's path through the fold: its records, per-field verdicts, final fold state."""

    steps: list[Step]
    verdicts: list[Verdict]
    state: list[Any] | None


class _Tracer:
    """Feeds one key's records through its own real fold and watches what the fold does."""

    def __init__(self, config: Config, key: str):
        self.config, self.key = config, key
        self.watcher = _Watcher()
        self.fold = build_fold(config, self.watcher)
        # Each property's slot in the fold state, and None for `updated_at` (the latest time).
        schema = self.fold.schema
        self.slots: list[tuple[str, int | None]] = [(p.name, schema.slots[p.name]) for p in schema.properties]
        self.slots.append(("updated_at", None))
        self.props = {p.name: p for p in self.fold.schema.properties}
        self.steps: list[Step] = []
        self.holder: dict[str, Step] = {}  # property (or "updated_at") -> the record holding it now
        self.reasons: dict[str, str] = {}
        self.alone: dict[int, list[Any]] = {}  # step -> what the fold makes of that record alone

    def add(self, path: str, obs: Observation | Unusable) -> None:
        steps, key = self.steps, self.key
        if isinstance(obs, Unusable):
            steps.append(Step(len(steps) + 1, f"{path}:{obs.line}", "webhook", applied=False,
                              ignored=f"{obs.category}: {obs.reason}"))  # fmt: skip
            return
        step = _step(len(steps) + 1, path, obs)
        step.said = _said(self.config, obs, self.props)
        steps.append(step)
        before = _state(self.fold, key)
        self.watcher.last = None
        self.fold.add(obs, path)
        if self.watcher.last is not None:
            step.applied = False
            step.ignored = f"{self.watcher.last[0]}: {self.watcher.last[1]}"
            return
        after, alone = _state(self.fold, key), _probe(self.config, obs, path, key)
        if after is None or alone is None:
            return
        # A record holds a slot when, right after it was added, the fold holds exactly what the
        # fold makes of that record alone: its value and its stamp (time, version).
        if latest(alone) == NEVER:
            return
        for name, slot in self.slots:
            if slot is None:
                held = latest(after) == latest(alone)
                stamp_before: Any = latest(before) if before else None
                stamp_after: Any = latest(after)
            else:
                mine = (value_at(alone, slot), stamp_at(alone, slot))
                held = mine[0] is not None and (value_at(after, slot), stamp_at(after, slot)) == mine
                stamp_before, stamp_after = (
                    (stamp_at(before, slot) if before else None),
                    stamp_at(after, slot),
                )
            if not held:
                continue
            previous = self.holder.get(name)
            self.holder[name] = step
            self.reasons[name] = _why(name, previous, stamp_before, stamp_after)
        self.alone[step.n] = alone

    def _overtaken(self) -> None:
        """For each applied record, the fields it says but does not hold in the end, and why."""
        fields_of: dict[str, list[str]] = {}
        for m in self.config.mappings:
            if m.source is not None:
                fields_of.setdefault(m.source.name, []).append(m.field)
        for name, slot in self.slots:
            holder = self.holder.get(name)
            if holder is None or slot is None:
                continue
            for step in self.steps:
                mine = self.alone.get(step.n)
                if step is holder or mine is None or value_at(mine, slot) is None:
                    continue
                why = _why(name, step, stamp_at(mine, slot), stamp_at(self.alone[holder.n], slot))
                for f in fields_of.get(name, []):
                    step.overtaken[f] = f"#{holder.n}: {why.replace(f'#{step.n}', 'it')}"

    def finish(self) -> Trace:
        try:
            state = _state(self.fold, self.key)
        finally:
            self.fold.close()
        planner = Planner(self.config.mappings, self.fold.schema, self.config.lookup_field)
        verdicts = _verdicts(self.config, planner, state, self.holder, self.reasons)
        for verdict in verdicts:
            winner = next((s for s in self.steps if s.n == verdict.step), None)
            if winner is not None:
                winner.won.append(verdict.field)
        self._overtaken()
        return Trace(self.steps, verdicts, state)


def _why(name: str, previous: Step | None, before: Any, after: Any) -> str:
    """Why the record with stamp `after` holds a slot over `previous` (with stamp `before`);
    a stamp is (time, version) for a property, the latest time for `updated_at`."""
    if name == "updated_at":
        return "the time of the latest applied record"
    if previous is None or before is None or before[0] < after[0]:
        return "latest consent timestamp"
    if before == after:
        return f"tie with #{previous.n} (same time): the later record in input order wins"
    return f"same time as #{previous.n}, a later version of the event (its updated_at)"


def trace(config: Config, paths: list[str], keys: Iterable[str], allow_incomplete: bool = False,
          stats: InputStats | None = None) -> dict[str, Trace]:  # fmt: skip
    """For each key: every record of `paths` that touches it, in fold order, and the verdicts.
    One read of the inputs for all the keys (reconcile traces its drifted leads at once)."""
    tracers = {k: _Tracer(config, k) for k in keys}
    try:
        for path, key, obs in _records_of(config, paths, set(tracers), allow_incomplete,
                                          stats if stats is not None else InputStats()):  # fmt: skip
            tracers[key].add(path, obs)
    except BaseException:
        for t in tracers.values():
            t.fold.close()
        raise
    return {k: t.finish() for k, t in tracers.items()}


def _records_of(config: Config, paths: list[str], keys: set[str], allow_incomplete: bool,
                stats: InputStats) -> Iterator[tuple[str, str, Observation | Unusable]]:  # fmt: skip
    """The observations (and deleted webhooks) whose key is one of `keys`, in input order."""
    identifier = config.identifier
    needles = [k.encode() for k in keys]
    last_raw: Any = None
    last_key: str | None = None
    for item in discover_all(paths, allow_incomplete):
        if isinstance(item, Problem | IncompletePartition | Skipped):
            continue  # `sync` reports these; explain follows the records that can reach the key
        if item.walked and not sniff_json(item):
            continue
        stats.files += 1
        if not _may_mention(item, needles):
            stats.files_skipped += 1  # never spells any of the keys: nothing to parse there
            continue
        # Held until the file is read whole: one that breaks off gives nothing, as in sync
        # (an opt-in before the break may be older than what the lost part says).
        held: list[tuple[str, str, Observation | Unusable]] = []
        whole = True
        for rec in read_records(item):
            if isinstance(rec, Problem):
                whole = whole and rec.line != 0
                continue
            value, line = rec
            stats.records += 1
            for ob in observations(value, line):
                raw = ob.key
                if raw is None:
                    continue
                if raw != last_raw or type(raw) is not type(last_raw):
                    last_raw, last_key = raw, normalise_key(raw, identifier)[0]
                if last_key in keys:
                    held.append((item.display, last_key, ob))
        if whole:
            yield from held


SCAN_CHUNK = 1 << 20


def _may_mention(item: InputFile, needles: list[bytes]) -> bool:
    """Whether a local file may hold a record of one of the keys: a file whose bytes never
    spell any key (in any letter case) cannot, and is not parsed at all. That is where explain
    beats a dry run's speed. A JSON `\\u` escape could spell a key: such files are parsed.
    stdin and remote files are read once, so they are always parsed."""
    if (
        item.display == "<stdin>"
        or getattr(item, "source", None) is not None
        or not needles
        or len(needles) > 64
    ):
        return True
    overlap = max(len(n) for n in needles) + 6
    tail = b""
    try:
        with open_binary(item) as fh:
            while chunk := fh.read(SCAN_CHUNK):
                low = tail + chunk.lower()
                if b"\\u" in low or any(n in low for n in needles):
                    return True
                tail = low[-overlap:]
    except UNREADABLE:
        return True  # read_records reports the real problem
    return False


def _step(n: int, path: str, obs: Observation) -> Step:
    created = obs.timestamp if obs.kind == "event" else None
    # a user status is at its updated_at; an event's updated_at is its version (when given)
    updated = obs.timestamp if obs.kind != "event" else obs.version
    return Step(n, f"{path}:{obs.line}", obs.kind, created, updated, obs.regulation, obs.status)


def _probe(config: Config, obs: Observation, path: str, key: str) -> list[Any] | None:
    """What the fold makes of this one record alone (its values and their timestamps)."""
    probe = build_fold(config, lambda *_: None)
    try:
        probe.add(obs, path)
        return _state(probe, key)
    finally:
        probe.close()


def _said(config: Config, obs: Observation, props: dict[str, Any]) -> dict[str, Any]:
    """What the record says about each mapped field, rendered as a sync would send it (shown for
    ignored records too: what they would have changed)."""
    plist = obs.consents.get("purposes")
    purposes = {p.get("id"): p for p in plist if isinstance(p, dict)} if isinstance(plist, list) else None
    out: dict[str, Any] = {}
    for m in config.mappings:
        if m.source is None or m.source.name not in props:
            continue
        try:
            value = props[m.source.name].extract(purposes, obs.consents, obs.user)
        except ValueError as e:  # a malformed consent flag: the fold rejects the record, say why
            out[m.field] = f"malformed ({e})"
            continue
        if value is not None:
            out[m.field] = m.render(value)
    return out


def _state(fold: Fold, key: str) -> list[Any] | None:
    for k, state in fold.leads():
        if k == key:
            return list(state)
    return None


def _verdicts(config: Config, planner: Planner, state: list[Any] | None, holder: dict[str, Step],
              reasons: dict[str, str]) -> list[Verdict]:  # fmt: skip
    """Per mapped field: the value a sync sends (planner.values), and the record holding it."""
    if state is None:
        return []
    fields, stamps = planner.values(state)
    out = []
    for m in config.mappings:
        if m.field not in fields:
            continue
        at = consent_time(stamps.get(m.field))
        if m.source is None:
            out.append(Verdict(m.field, fields[m.field], None, None, None, "a constant of the mapping"))
            continue
        won = holder.get(m.source.name)
        out.append(Verdict(m.field, fields[m.field], won.n if won else None, won.source if won else None, at,
                           reasons.get(m.source.name, "latest consent timestamp")))  # fmt: skip
    return out


def _older_than_state(result: Explanation, fields: dict[str, Any], stamps: dict[str, Any],
                      before: dict[str, Any]) -> None:  # fmt: skip
    """Where the state holds a newer consent than every input record (an old file read late),
    the state's value is what a sync keeps: the verdict says so, and the record that led the
    inputs for that field is marked older than the state."""
    for v in result.verdicts:
        if stamps.get(v.field) == before.get(v.field):
            continue
        step = next((s for s in result.steps if s.n == v.step), None)
        if step is not None and v.field in step.won:
            step.won.remove(v.field)
            step.older_than_state.append(v.field)
        v.value, v.step, v.source = fields[v.field], None, "state"
        v.consent_at = consent_time(stamps.get(v.field))
        v.reason = "Marketo confirmed a newer consent than any input record (the state); the newer wins"


# ---------------------------------------------------------------------------------------------
# Marketo's answers: the state and the reports


def report_lines(directories: Iterable[Path], key: str) -> list[dict[str, Any]]:
    """Every line of the reports' NDJSON files about `key`, with the file it came from."""
    out = []
    for directory in directories:
        for name in REPORT_FILES:
            path = Path(directory) / f"{name}.ndjson"
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if key.encode() not in line.lower():
                        continue  # cheap: most lines are about other leads
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and str(rec.get("key", "")).lower() == key:
                        out.append({"file": f"{path}:{n}", **rec})
    return out


def explain(config: Config, raw_key: str, paths: list[str], *, state: str | None = None,
            reports: list[Path] | None = None, allow_incomplete: bool = False) -> Explanation:  # fmt: skip
    key = match_key(raw_key, config.identifier)
    result = Explanation(key, config.identifier)
    stats = InputStats()
    fold_state = None
    if paths:
        traced = trace(config, paths, [key], allow_incomplete, stats)[key]
        result.steps, result.verdicts, fold_state = traced.steps, traced.verdicts, traced.state
        result.inputs_read = stats.records
        result.files_without_key = stats.files_skipped
    prior = None
    result.state_given = bool(state)
    if state:
        if not Path(state).is_file():
            raise ConfigError(f"--state {state}: no such state file")
        store = StateStore(state, readonly=True)
        try:
            prior = store.lead(key)
        finally:
            store.close()
        if prior is not None:
            result.state = lead_record(prior)
    result.reports = report_lines(reports or [], key)
    if fold_state is not None:
        planner = Planner(config.mappings, build_fold(config, lambda *_: None).schema, config.lookup_field)
        fields, stamps = planner.values(fold_state)
        if not fields:
            result.payload_note = "nothing to send: no mapped consent property has a value"
        else:
            before = dict(stamps)
            kept = keep_newer(prior.confirmed, fields, stamps) if prior is not None else 0
            if kept:
                _older_than_state(result, fields, stamps, before)
            lookup = config.lookup_field
            result.payload = {lookup: int(key) if lookup == "id" else key, **fields}
            confirmed = {k: v[0] for k, v in prior.confirmed.items()} if prior is not None else {}
            if prior is not None and all(confirmed.get(k) == v for k, v in fields.items()):
                result.payload_note = "Marketo already confirmed these values: the next sync sends nothing"
            elif prior is not None and prior.pending:
                result.payload_note = f"pending: the next sync re-sends it ({prior.pending_reason})"
            else:
                result.payload_note = "what the next sync sends (without --state: every sync)"
            if kept:
                result.payload_note += f"; {kept} field(s) keep a newer consent the state holds"
    elif prior is not None and prior.confirmed:
        lookup = config.lookup_field
        result.payload = {
            lookup: int(key) if lookup == "id" else key,
            **{k: v[0] for k, v in prior.confirmed.items()},
        }
        result.payload_note = "the values Marketo last confirmed (from the state; no input given)"
    return result
