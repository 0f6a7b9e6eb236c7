"""The mapping workbench: preview a mapping change, check a config against Marketo's schema,
list Marketo's lead fields.

`run_preview` is read -> fold -> map without delivery (Census's sync dry run: per field, what
would be sent and what would change). `check_config`, `check_sample` and `check_schema` are the
offline and online checks (RudderStack validates field types against describe2 the same way);
`fetch_schema` reads the schema. Nothing here prints: the CLI renders what these return.
"""

from __future__ import annotations

import asyncio
import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from didomi_marketo.config import Config, Credentials
from didomi_marketo.didomi.fold import NEVER, Fold, FoldSchema
from didomi_marketo.didomi.records import Observation
from didomi_marketo.errors import ConfigError, FatalError
from didomi_marketo.mapping import BOOLEAN, DATETIME, STRING, FieldMapping, Property, Reading, classify_value
from didomi_marketo.marketo.client import CallFailed, GaveUp, MarketoClient, RetryPolicy
from didomi_marketo.plan import Planner
from didomi_marketo.report import IGNORED
from didomi_marketo.sync import DEFAULT_DAILY_QUOTA, InputStats, build_fold, read_into

ERROR, WARNING = "error", "warning"
DEFAULT_SAMPLES = 5
REJECTION_EXAMPLES = 10
DESCRIBE2_PATH = "/rest/v1/leads/describe2.json"
DESCRIBE_PATH = "/rest/v1/leads/describe.json"


# =============================================================================================
# Preview


class ConfirmedValues(Protocol):
    """What Marketo last confirmed per lead: `state.StateStore` or any object with this method."""

    def confirmed(self, key: str) -> dict[str, tuple[Any, float]] | None: ...


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of one lead whose sent value differs. `None` means "not sent"."""

    field: str
    before: Any
    after: Any


@dataclass(slots=True)
class LeadDiff:
    """One lead: what the new config sends (lookup field first) and how it differs."""

    key: str
    payload: dict[str, Any]  # {} when the new config sends nothing for this lead
    changes: list[FieldChange]  # alone: every field sent (before None)


@dataclass(frozen=True, slots=True)
class MappingChange:
    """How one Marketo field's mapping differs between the old and the new config."""

    field: str
    status: str  # added | removed | source changed | transform changed | unchanged
    before: str | None  # "consents_purposes_newsletter_enabled | invert"; None when not mapped
    after: str | None


@dataclass(frozen=True, slots=True)
class Rejection:
    source: str  # path:line
    reason: str


@dataclass
class PreviewResult:
    lookup_field: str
    baseline: str | None  # None (alone), "config <path>" or "state"
    leads: int = 0  # leads folded (under either config when comparing)
    to_send: int = 0  # leads the new config maps at least one field for
    leads_changed: int = 0  # comparing: leads with at least one field sent differently
    kept_newer: int = 0  # --state: fields where Marketo holds a newer consent than the input
    would_send: int | None = None  # --state with a state store: what the next sync sends
    pending_resent: int = 0  # ... of which leads left pending by an earlier run
    records: int = 0
    rejected: int = 0
    ignored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IGNORED, 0))
    rejected_reasons: Counter = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)
    fields: dict[str, Counter] = field(default_factory=dict)  # new config: true/false/other
    changed: dict[str, int] | None = None
    mappings: list[MappingChange] = field(default_factory=list)
    config_changes: list[tuple[str, str, str]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def comparing(self) -> bool:
        return self.changed is not None

    @property
    def exit_code(self) -> int:
        """As `sync --dry-run`: 1 when input records were rejected, else 0."""
        return 1 if self.rejected else 0

    def field_counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, c in self.fields.items():
            t, f, o = c.get("true", 0), c.get("false", 0), c.get("other", 0)
            out[name] = {"true": t, "false": f, "other": o, "absent": self.leads - t - f - o}
        return out

    def to_json(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "leads": self.leads,
            "rejected": self.rejected,
            "fields": self.field_counts(),
        }
        if self.changed is not None:
            summary["changed"] = dict(self.changed)
            summary["leads_changed"] = self.leads_changed
            summary["compared_with"] = self.baseline
            if self.baseline == "state":
                summary["kept_newer"] = self.kept_newer
                if self.would_send is not None:
                    summary["would_send"] = self.would_send
                    summary["pending_resent"] = self.pending_resent
            else:
                summary["mappings"] = {
                    m.field: {"status": m.status, "before": m.before, "after": m.after} for m in self.mappings
                }
                summary["config_changes"] = {k: {"before": b, "after": a} for k, b, a in self.config_changes}
        summary["to_send"] = self.to_send
        summary["records"] = self.records
        summary["ignored"] = dict(self.ignored)
        summary["rejected_reasons"] = dict(self.rejected_reasons.most_common())
        summary["rejections"] = [{"source": r.source, "reason": r.reason} for r in self.rejections]
        return {"summary": summary, "samples": list(self.samples)}


class _Tally:
    """The fold's issue sink: counts rejected and ignored records, keeps a few examples."""

    QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def __init__(self, result: PreviewResult):
        self.result = result

    def issue(self, category: str, path: str, line: int, reason: str, key: Any = None) -> None:
        r = self.result
        if category in r.ignored:
            r.ignored[category] += 1
            return
        r.rejected += 1
        # Group "why" without the values: "organization_user_id … is not an email address".
        r.rejected_reasons[self.QUOTED.sub("…", reason)] += 1
        if len(r.rejections) < REJECTION_EXAMPLES:
            r.rejections.append(Rejection(f"{path}:{line}" if line else path, reason))


def describe_mapping(m: FieldMapping) -> str:
    """A mapping's source and transforms in one short line, for tables and diffs."""
    parts = [m.source.name] if m.source is not None else []
    for t in m.transforms:
        if t.name == "map":
            parts.append("map {" + ", ".join(f"{k}: {v}" for k, v in (t.table or {}).items()) + "}")
        elif t.name == "const":
            parts.append(f"const {t.const!r}")
        else:
            parts.append(t.name)
    return " | ".join(parts)


def compare_mappings(old: list[FieldMapping], new: list[FieldMapping]) -> list[MappingChange]:
    """Per Marketo field, how its mapping changes: the new config's order, then removed fields."""
    before = {m.field: m for m in old}
    after = {m.field: m for m in new}
    out = []
    for name, m in after.items():
        o = before.get(name)
        if o is None:
            status = "added"
        elif (o.source.name if o.source else None) != (m.source.name if m.source else None):
            status = "source changed"
        elif o.transforms != m.transforms:
            status = "transform changed"
        else:
            status = "unchanged"
        out.append(MappingChange(name, status, describe_mapping(o) if o else None, describe_mapping(m)))
    for name, o in before.items():
        if name not in after:
            out.append(MappingChange(name, "removed", describe_mapping(o), None))
    return out


def compare_configs(old: Config, new: Config) -> list[tuple[str, str, str]]:
    """(setting, before, after) for the settings outside the mappings that change what a sync does."""
    out = []
    if old.upsert != new.upsert:
        out.append(("upsert_mode", str(old.upsert).lower(), str(new.upsert).lower()))
    if old.regulations != new.regulations:
        out.append(("regulations", ", ".join(sorted(old.regulations)), ", ".join(sorted(new.regulations))))
    return out


def same_value(a: Any, b: Any) -> bool:
    """Equal as Marketo would receive them: True is not 1, "1" is not 1."""
    return type(a) is type(b) and a == b


class _Samples:
    """Up to `limit` samples, preferring leads that show a field no sample shows yet."""

    def __init__(self, limit: int):
        self.limit = limit
        self.chosen: list[tuple[int, dict[str, Any]]] = []
        self.spare: list[tuple[int, dict[str, Any]]] = []
        self.covered: set[str] = set()
        self.seen = 0

    def offer(self, names: Iterable[str], make: Callable[[], dict[str, Any]]) -> None:
        if self.limit <= 0:
            return
        n = self.seen
        self.seen += 1
        fresh = set(names) - self.covered
        if fresh and len(self.chosen) < self.limit:
            self.covered |= fresh
            self.chosen.append((n, make()))
        elif len(self.spare) < self.limit:
            self.spare.append((n, make()))

    def result(self) -> list[dict[str, Any]]:
        picked = self.chosen + self.spare[: self.limit - len(self.chosen)]
        return [s for _, s in sorted(picked, key=lambda p: p[0])]


def run_preview(
    new: Config,
    paths: list[str],
    *,
    old: Config | None = None,
    confirmed: ConfirmedValues | None = None,
    limit: int = DEFAULT_SAMPLES,
    allow_incomplete: bool = False,
    on_lead: Callable[[LeadDiff], None] | None = None,
    spill_threshold: int = 250_000,
) -> PreviewResult:
    """Read, fold and map `paths` under `new` without sending anything (no credentials).

    With `old`, every lead is also mapped under the old config and compared field by field;
    with `confirmed` (any object with the state store's `confirmed(key)`), the new values are
    compared with what Marketo last confirmed, as the next sync would (a newer confirmed value
    is kept); when it is a whole state store (`lead()`, `pending_keys()`...), sync's own Planner
    also counts what the next sync would send (`would_send`, pending re-sends included).
    `on_lead` sees every lead's diff (for CSV output); samples keep `limit` of them.
    Raises ConfigError when the configs cannot be compared.
    """
    if old is not None and confirmed is not None:
        raise ConfigError("compare with one baseline: an old config or a state, not both")
    if old is not None and old.identifier != new.identifier:
        raise ConfigError(
            f"{old.path} identifies leads by {old.identifier} and {new.path} by {new.identifier}: "
            "their leads cannot be matched for a comparison"
        )
    baseline = "state" if confirmed is not None else (f"config {old.path}" if old is not None else None)
    result = PreviewResult(new.lookup_field, baseline)
    changed: dict[str, int] | None = None
    if baseline is not None:
        changed = result.changed = {}
    if old is not None:
        result.mappings = compare_mappings(old.mappings, new.mappings)
        result.config_changes = compare_configs(old, new)
    tally = _Tally(result)
    inputs = InputStats()
    lookup, as_int = new.lookup_field, new.lookup_field == "id"
    samples = _Samples(limit)
    fields = result.fields
    for m in new.mappings:
        fields[m.field] = Counter()
    if changed is not None:
        for name in [m.field for m in new.mappings] + [c.field for c in result.mappings]:
            changed.setdefault(name, 0)

    def one_lead(
        key: str, after: dict[str, Any], stamps: dict[str, float], before: dict[str, Any] | None
    ) -> None:
        if confirmed is not None:  # may keep a newer confirmed value in `after`, as sync does
            before = _confirmed_before(confirmed.confirmed(key), after, stamps, result)
        result.leads += 1
        if after:
            result.to_send += 1
        for name, value in after.items():
            fields[name][classify_value(value)] += 1
        if before is None:  # alone: everything sent is new
            diffs = [FieldChange(n, None, v) for n, v in after.items()]
        else:
            diffs = [
                FieldChange(n, before.get(n), after.get(n))
                for n in (after.keys() | before.keys() if confirmed is None else after.keys())
                if not same_value(before.get(n), after.get(n))
            ]
            diffs.sort(key=lambda c: order.get(c.field, len(order)))
            assert changed is not None
            for c in diffs:
                changed[c.field] = changed.get(c.field, 0) + 1
            if diffs:
                result.leads_changed += 1
        payload = {lookup: int(key) if as_int else key, **after} if after else {}
        if on_lead is not None:
            on_lead(LeadDiff(key, payload, diffs))
        if before is None:
            if after:
                samples.offer(after, lambda: payload)
        elif diffs:
            samples.offer(
                (c.field for c in diffs),
                lambda: {
                    "key": key,
                    "changes": {c.field: {"before": c.before, "after": c.after} for c in diffs},
                },
            )

    order = {name: i for i, name in enumerate(changed or fields)}
    together = old is None or old.regulations == new.regulations
    if not together and "-" in paths:
        raise ConfigError(
            "the two configs apply different regulations, so the input is folded twice: "
            "read it from files, not stdin"
        )
    old_values: dict[str, dict[str, Any]] = {}
    if not together:
        assert old is not None
        old_fold = build_fold(old, _Tally(PreviewResult(old.lookup_field, None)).issue, spill_threshold)
        try:
            read_into(old_fold, paths, allow_incomplete, InputStats())
            apart = Planner(old.mappings, old_fold.schema, old.lookup_field)
            for key, state in old_fold.leads():
                old_values[key] = apart.values(state)[0]
        finally:
            old_fold.close()

    mappings = new.mappings + (old.mappings if old is not None and together else [])
    fold = build_fold(new, tally.issue, spill_threshold, mappings)
    try:
        read_into(fold, paths, allow_incomplete, inputs)
        planner = Planner(new.mappings, fold.schema, lookup)
        old_planner = Planner(old.mappings, fold.schema, lookup) if old is not None and together else None

        def leads() -> Iterator[tuple[str, list[Any]]]:
            for key, state in fold.leads():
                after, stamps = planner.values(state)
                if old_planner is not None:
                    before: dict[str, Any] | None = old_planner.values(state)[0]
                elif old is not None:
                    before = old_values.pop(key, {})
                else:
                    before = None
                one_lead(key, after, stamps, before)
                yield key, state

        if confirmed is not None and hasattr(confirmed, "lead") and hasattr(confirmed, "pending_keys"):
            sync_planner = Planner(new.mappings, fold.schema, lookup, confirmed, action=new.action)  # type: ignore[arg-type]
            result.would_send = sum(1 for _ in sync_planner.plan(leads()))
            result.pending_resent = sync_planner.stats.pending_resent
        else:
            for _ in leads():
                pass
    finally:
        fold.close()
    for key, before in old_values.items():  # leads only the old config folds
        one_lead(key, {}, {}, before)
    result.records = inputs.records
    result.samples = samples.result()
    return result


def _confirmed_before(
    confirmed: dict[str, tuple[Any, float]] | None,
    after: dict[str, Any],
    stamps: dict[str, float],
    result: PreviewResult,
) -> dict[str, Any]:
    """What Marketo holds for the fields the new config sends; like `Planner`, a confirmed value
    with a newer consent than the input's is kept (so it is no change)."""
    before: dict[str, Any] = {}
    if not confirmed:
        return before
    for name in list(after):
        entry = confirmed.get(name)
        if entry is None:
            continue
        value, ts = entry
        before[name] = value
        if ts > stamps.get(name, NEVER):
            result.kept_newer += 1
            after[name] = value
    return before


def change_rows(diff: LeadDiff) -> Iterator[tuple[str, str, Any, Any]]:
    """CSV rows (key, field, before, after) of one lead's diff; None means not sent."""
    for c in diff.changes:
        yield diff.key, c.field, c.before, c.after


# =============================================================================================
# Check: findings


@dataclass(frozen=True, slots=True)
class SchemaProblem:
    """One finding of `check`: an error makes the config unfit to sync, a warning is advice."""

    field: str  # the Marketo field, or "" for the config as a whole
    severity: str  # "error" | "warning"
    message: str
    where: str = ""  # file:line in the config, when known
    kind: str = ""  # missing | not-rest | read-only | type | length | lookup | config | sample | quota


# The problems that make every lead carrying the field fail (1006 / read-only skips): what sync
# refuses to start with. Type and length errors fail per value; lookup errors fail every lead.
BLOCKING_KINDS = frozenset({"missing", "not-rest", "read-only"})


@dataclass(frozen=True, slots=True)
class FieldCheck:
    """One row of the check table: a mapped field (or the lookup field) and its verdict."""

    field: str
    source: str  # the mapping as `describe_mapping` shows it; "lookup" for the lookup field
    produces: str  # boolean | string | datetime | integer | float
    marketo_type: str | None = None  # None offline or when the field does not exist
    writable: bool | None = None
    verdict: str = "ok"  # ok | warning | error


# ---------------------------------------------------------------------------------------------
# Offline


def check_config(config: Config) -> list[SchemaProblem]:
    """What can be judged without Marketo, beyond `load_config`'s validation: the lookup, no-op
    or overridden transforms, map keys that can never match."""
    problems: list[SchemaProblem] = []
    for m in config.mappings:

        def add(severity: str, message: str, m: FieldMapping = m) -> None:
            problems.append(SchemaProblem(m.field, severity, message, m.where, "config"))

        if m.field == "id":
            add(
                ERROR,
                "'id' is system-managed: it can only be the lookup (user_identifier leadID), "
                "never a mapped field",
            )
        if m.field == "email" and config.identifier == "leadID":
            add(
                WARNING,
                "maps onto 'email' while leads are found by id: this rewrites each lead's email address",
            )
        t = m.source.value_type if m.source is not None else None
        for i, tr in enumerate(m.transforms):
            if tr.name in ("invert", "yes_no", "text") and t is not None and t != BOOLEAN:
                add(WARNING, f"transform {tr.name} has no effect on a {t} value (it turns true/false only)")
            elif tr.name == "map" and t == BOOLEAN:
                keys = set(tr.table or {}) - {"true", "false"}
                if keys:
                    add(
                        WARNING,
                        f"transform map: keys {', '.join(sorted(keys))} never match a boolean "
                        "(use true and false)",
                    )
            elif tr.name == "map":
                kinds = {type(v) for v in (tr.table or {}).values() if v is not None}
                if bool in kinds and len(kinds) > 1:
                    add(WARNING, "transform map mixes true/false with text: Marketo gets either, per lead")
            elif tr.name == "const" and (i > 0 or m.source is not None):
                what = f"the value of {m.source.name}" if m.source is not None else "earlier transforms"
                add(WARNING, f"const {tr.const!r} replaces {what}: every lead gets {tr.const!r}")
            t = tr.output_type(t) if t is not None else tr.output_type(STRING)
    return problems


class _SeenFold(Fold):
    """A fold that also notes every id the input carries, to tell a typo from a quiet purpose."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, set[str]] = {
            k: set()
            for k in ("purpose", "preference", "channel", "preference channel", "user field", "metadata key")
        }

    def add(self, obs: Observation, path: str) -> None:
        seen = self.seen
        consents = obs.consents if isinstance(obs.consents, dict) else {}
        for p in _dicts(consents.get("purposes")):
            seen["purpose"].add(str(p.get("id")))
            values = p.get("values")
            if isinstance(values, dict):
                seen["preference"].update(str(k) for k in values)
            for pref in _dicts(p.get("preferences")):
                seen["preference"].add(str(pref.get("id")))
                seen["preference channel"].update(str(c.get("id")) for c in _dicts(pref.get("channels")))
        seen["channel"].update(str(c.get("id")) for c in _dicts(consents.get("channels")))
        user = obs.user if isinstance(obs.user, dict) else {}
        seen["user field"].update(k for k, v in user.items() if isinstance(v, str) and v)
        md = user.get("metadata")
        if isinstance(md, dict):
            seen["metadata key"].update(str(k) for k in md)
        super().add(obs, path)


def _dicts(items: Any) -> Iterator[dict]:
    if isinstance(items, list):
        yield from (i for i in items if isinstance(i, dict))


def _reading_ids(r: Reading) -> list[tuple[str, str]]:
    """(kind of id, id) a reading needs in the input."""
    if r.kind in ("purpose_enabled", "purpose_enabled_li"):
        return [("purpose", r.purpose)]
    if r.kind == "purpose_values":
        return [("purpose", r.purpose), ("preference", r.preference)]
    if r.kind == "purpose_channel":
        return [("purpose", r.purpose), ("preference", r.preference), ("preference channel", r.channel)]
    if r.kind == "channel_enabled":
        return [("channel", r.channel)]
    if r.kind == "user_field":
        return [("user field", r.key)]
    if r.kind == "metadata":
        return [("metadata key", r.key)]
    return []


def check_sample(config: Config, paths: list[str], allow_incomplete: bool = False) -> list[SchemaProblem]:
    """Warn on mappings whose Didomi id never appears in a sample of the input (a typo, or a
    purpose this organisation does not use), or that no lead of the sample gets a value for."""
    tally = _Tally(PreviewResult(config.lookup_field, None))
    fold = _SeenFold(
        FoldSchema.from_mappings(config.mappings), config.identifier, config.regulations, tally.issue
    )
    inputs = InputStats()
    try:
        read_into(fold, paths, allow_incomplete, inputs)
        with_value: Counter = Counter()
        leads = 0
        for _, state in fold.leads():
            leads += 1
            for name, slot in fold.schema.slots.items():
                if state[slot] is not None:
                    with_value[name] += 1
    finally:
        fold.close()
    problems: list[SchemaProblem] = []
    if inputs.records == 0:
        return [SchemaProblem("", WARNING, f"the sample ({', '.join(paths)}) has no records", kind="sample")]
    if tally.result.rejected:
        problems.append(
            SchemaProblem(
                "",
                WARNING,
                f"{tally.result.rejected} record(s) of the sample were rejected "
                f"(e.g. {tally.result.rejections[0].source}: {tally.result.rejections[0].reason})",
                kind="sample",
            )
        )
    for m in config.mappings:
        if m.source is None or m.source.name == "updated_at" or with_value[m.source.name]:
            continue
        message = _missing_ids(m.source, fold.seen)
        if message is None:
            message = (
                f"{m.source.name}: its ids appear in the sample, but no lead of the "
                f"{leads} folded gets a value for it"
            )
        problems.append(SchemaProblem(m.field, WARNING, message, m.where, "sample"))
    return problems


def _missing_ids(source: Property, seen: dict[str, set[str]]) -> str | None:
    """Why no reading of `source` can apply to the sample, or None when one can."""
    first_missing: list[tuple[str, str]] | None = None
    for r in source.readings:
        missing = [(kind, i) for kind, i in _reading_ids(r) if i not in seen[kind]]
        if not missing:
            return None
        if first_missing is None:
            first_missing = missing
    assert first_missing is not None
    kind, wanted = first_missing[0]
    known = sorted(seen[kind])
    close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    listed = ", ".join(known[:12]) + (", …" if len(known) > 12 else "") if known else "none"
    return f"{source.name}: {kind} '{wanted}' never appears in the sample (seen: {listed}){hint}"


# ---------------------------------------------------------------------------------------------
# Online: the schema


def normalise_fields(raw: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """describe (v1), describe2 (its "API Lead" document or its fields) or already normalised
    entries -> `{name, displayName, dataType, length, writable, rest, searchable}` each.

    `rest` is false for a v1 field without a `rest` entry (not usable through REST);
    `searchable` (describe2's searchableFields, usable as lookupField) is None when unknown.
    """
    out: list[dict[str, Any]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("fields"), list):  # describe2's object document
            searchable = {
                g[0] for g in entry.get("searchableFields") or [] if isinstance(g, list) and len(g) == 1
            }
            for f in normalise_fields(entry["fields"]):
                f["searchable"] = f["name"] in searchable if searchable else None
                out.append(f)
        elif "writable" in entry and "name" in entry:
            out.append(dict(entry))
        elif isinstance(entry.get("rest"), dict):
            rest = entry["rest"]
            out.append(_field(rest.get("name"), entry, not rest.get("readOnly", False), True))
        elif "updateable" in entry and "name" in entry:
            out.append(_field(entry.get("name"), entry, bool(entry["updateable"]), True))
        elif isinstance(entry.get("soap"), dict):  # v1 field valid for SOAP only
            out.append(_field(entry["soap"].get("name"), entry, False, False))
    return [f for f in out if isinstance(f.get("name"), str) and f["name"]]


def _field(name: Any, entry: dict[str, Any], writable: bool, rest: bool) -> dict[str, Any]:
    return {
        "name": name,
        "displayName": str(entry.get("displayName") or ""),
        "dataType": str(entry.get("dataType") or ""),
        "length": entry.get("length"),
        "writable": writable,
        "rest": rest,
        "searchable": None,
    }


async def _get(client: MarketoClient, path: str) -> dict[str, Any]:
    """One GET with a short retry policy: re-auth on 601/602, back off on 606/615/604..."""
    policy = RetryPolicy(clock=client.clock, min_attempts=3, min_seconds=0.0, base_delay=0.5, max_delay=4.0)
    return await policy.run(lambda: client.call("GET", path))


async def fetch_schema_from(client: MarketoClient) -> tuple[list[dict[str, Any]], str]:
    """Marketo's lead fields (normalised) and which endpoint gave them: describe2, else describe.

    Raises AuthError (bad credentials) or FatalError (unreachable, access denied)."""
    try:
        fields = normalise_fields((await _get(client, DESCRIBE2_PATH)).get("result") or [])
        if fields:
            return fields, "describe2"
    except (CallFailed, GaveUp):
        pass  # an instance (or proxy) without describe2: the v1 describe says the same
    try:
        fields = normalise_fields((await _get(client, DESCRIBE_PATH)).get("result") or [])
    except (CallFailed, GaveUp) as e:
        raise FatalError(
            f"cannot read Marketo's lead fields at {client.credentials.base_url}: {_why(e)}"
        ) from None
    if not fields:
        raise FatalError(f"Marketo at {client.credentials.base_url} described no lead fields")
    return fields, "describe"


async def fetch_schema(client: MarketoClient) -> list[dict[str, Any]]:
    """Marketo's lead fields, normalised (see `normalise_fields`): describe2, else describe.

    The result is plain JSON (cacheable) and what `check_schema` takes."""
    return (await fetch_schema_from(client))[0]


def _why(e: CallFailed | GaveUp) -> str:
    return str(e.last if isinstance(e, GaveUp) else e)


# Type fit: (what the mapping produces) -> Marketo dataTypes that take it as is, and those that
# take it with a caveat. Anything else is refused (Marketo skips the lead with 1003/1001).
TEXT_TYPES = frozenset({"string", "text", "textarea"})
NUMBER_TYPES = frozenset({"integer", "float", "currency", "percent", "score"})
FITS: dict[str, frozenset[str]] = {
    BOOLEAN: frozenset({"boolean"}),
    STRING: TEXT_TYPES | {"email", "url", "phone"},
    DATETIME: frozenset({"datetime"}),
    "integer": NUMBER_TYPES,
    "float": frozenset({"float", "currency"}),
}
CAVEATS: dict[str, str] = {
    BOOLEAN: "sent as JSON true/false, stored as the text 'true'/'false'; consider transform text or yes_no",
    DATETIME: "sent as ISO 8601 text",
    "integer": "sent as a number, stored as text",
    "float": "sent as a number, stored as text",
}
UNWRITABLE_TYPES = frozenset({"formula", "lead_function", "reference"})


def _fit(m: FieldMapping, produces: str, data_type: str) -> tuple[str, str]:
    """(verdict, message) for sending what `m` produces into a field of `data_type`."""
    if data_type in FITS.get(produces, ()):
        return "ok", ""
    via = [t.name for t in m.transforms if t.name in ("yes_no", "text", "map", "const")]
    how = (
        f" (after transform {via[-1]})"
        if via and produces != (m.source.value_type if m.source else STRING)
        else ""
    )
    if data_type in UNWRITABLE_TYPES:
        return ERROR, f"is a {data_type} field: Marketo computes or links it, a mapping cannot write it"
    if data_type in TEXT_TYPES and produces in CAVEATS:
        return WARNING, f"is {data_type} but the mapping produces {produces}{how}: {CAVEATS[produces]}"
    hint = ""
    if (
        data_type == BOOLEAN
        and produces == STRING
        and any(t.name in ("yes_no", "text") for t in m.transforms)
    ):
        hint = "; drop the yes_no/text transform"
    elif data_type == BOOLEAN and produces == STRING:
        hint = "; map a *_enabled property, or use transform {map: {<id>: true, ...}}"
    elif data_type == "date" and produces == DATETIME:
        hint = "; Marketo wants YYYY-MM-DD there: map onto a datetime field"
    elif produces == "float" and data_type in NUMBER_TYPES:
        hint = "; a fractional number is refused there"
    return (
        ERROR,
        f"is {data_type} but the mapping produces {produces}{how}: Marketo would refuse every value{hint}",
    )


def _literal_values(m: FieldMapping) -> list[Any]:
    """Values the mapping can send that are known without data (const, map results)."""
    out: list[Any] = []
    for t in m.transforms:
        if t.name == "const":
            out = [t.const]
        elif t.name == "map":
            out = list((t.table or {}).values())
    return [v for v in out if isinstance(v, str)]


def schema_report(
    mappings: list[FieldMapping], lookup_field: str, describe_fields: Iterable[dict[str, Any]]
) -> tuple[list[FieldCheck], list[SchemaProblem]]:
    """Each mapping (and the lookup field) against Marketo's fields: rows and problems."""
    fields = normalise_fields(describe_fields)
    by_name = {f["name"]: f for f in fields}
    rows: list[FieldCheck] = []
    problems: list[SchemaProblem] = []
    for m in mappings:
        produces = m.output_type
        found: list[SchemaProblem] = []

        def add(kind: str, severity: str, message: str, m: FieldMapping = m, found: list = found) -> None:
            found.append(SchemaProblem(m.field, severity, message, m.where, kind))

        f = by_name.get(m.field)
        if f is None:
            add("missing", ERROR, f"'{m.field}' is not a Marketo lead field{_suggest(m.field, fields)}")
        elif not f["rest"]:
            add("not-rest", ERROR, f"'{m.field}' is not available through the REST API (no rest name)")
        else:
            if not f["writable"]:
                add(
                    "read-only",
                    ERROR,
                    f"'{m.field}' is read-only in Marketo: every lead carrying it would be skipped",
                )
            verdict, message = _fit(m, produces, f["dataType"])
            if verdict != "ok":
                add("type", verdict, f"'{m.field}' {message}")
            length = f.get("length")
            if isinstance(length, int) and f["dataType"] in TEXT_TYPES | {"email", "url", "phone"}:
                long = [v for v in _literal_values(m) if len(v) > length]
                if long:
                    add(
                        "length",
                        ERROR,
                        f"'{m.field}' holds at most {length} characters; {long[0]!r} is longer",
                    )
        verdict = ERROR if any(p.severity == ERROR for p in found) else (WARNING if found else "ok")
        rows.append(
            FieldCheck(
                m.field,
                describe_mapping(m),
                produces,
                f["dataType"] if f else None,
                f["writable"] if f else None,
                verdict,
            )
        )
        problems += found
    row, found = _check_lookup(lookup_field, by_name, fields)
    rows.append(row)
    problems += found
    return rows, problems


def check_schema(
    mappings: list[FieldMapping], lookup_field: str, describe_fields: Iterable[dict[str, Any]]
) -> list[SchemaProblem]:
    """Every mapped field exists, is writable, takes what the mapping produces; the lookup field
    fits. Pure: `describe_fields` is `fetch_schema`'s result (raw describe/describe2 works too)."""
    return schema_report(mappings, lookup_field, describe_fields)[1]


def _check_lookup(
    lookup: str, by_name: dict[str, dict[str, Any]], fields: list[dict[str, Any]]
) -> tuple[FieldCheck, list[SchemaProblem]]:
    expected = {"email": "email", "id": "integer"}.get(lookup)
    f = by_name.get(lookup)
    found: list[SchemaProblem] = []
    if f is None or not f["rest"]:
        found.append(
            SchemaProblem(
                lookup,
                ERROR,
                f"lookup field '{lookup}' is not a Marketo REST lead field; no lead could be found",
                kind="lookup",
            )
        )
    else:
        if lookup == "email" and f["dataType"] != "email":
            found.append(
                SchemaProblem(
                    lookup, ERROR, f"lookup field 'email' is {f['dataType']}, not email", kind="lookup"
                )
            )
        if f.get("searchable") is False:
            found.append(
                SchemaProblem(
                    lookup,
                    WARNING,
                    f"lookup field '{lookup}' is not among describe2's "
                    "searchable fields; Marketo may refuse it as lookupField",
                    kind="lookup",
                )
            )
    verdict = ERROR if any(p.severity == ERROR for p in found) else (WARNING if found else "ok")
    return FieldCheck(
        lookup, "lookup", expected or "", f["dataType"] if f else None, f["writable"] if f else None, verdict
    ), found


def _suggest(name: str, fields: list[dict[str, Any]]) -> str:
    """'; did you mean ...?' over REST names and display names (case-insensitive)."""
    candidates: dict[str, str] = {}  # lowercased REST or display name -> REST name
    for f in fields:
        if f["rest"]:
            candidates.setdefault(f["name"].lower(), f["name"])
            if f["displayName"]:
                candidates.setdefault(f["displayName"].lower(), f["name"])
    wanted = name.lower()
    if wanted in candidates:
        exact = candidates[wanted]
        return f"; did you mean '{exact}'? (REST names are case-sensitive; display names are not REST names)"
    scored = sorted(((difflib.SequenceMatcher(None, wanted, c).ratio(), c) for c in candidates), reverse=True)
    close: list[str] = []
    for ratio, c in scored:
        # The best match, and the ones nearly as good: a typo rarely has three equal readings.
        if ratio < 0.6 or ratio < scored[0][0] - 0.05:
            break
        if candidates[c] not in close:
            close.append(candidates[c])
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close[:3]) + "?"


# ---------------------------------------------------------------------------------------------
# The whole check


@dataclass
class Usage:
    used: int
    quota: int

    @property
    def remaining(self) -> int:
        return max(self.quota - self.used, 0)


@dataclass
class CheckReport:
    config: str
    online: bool = False
    schema_source: str | None = None  # describe2 | describe
    instance: str | None = None
    rows: list[FieldCheck] = field(default_factory=list)
    problems: list[SchemaProblem] = field(default_factory=list)
    usage: Usage | None = None
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def errors(self) -> list[SchemaProblem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[SchemaProblem]:
        return [p for p in self.problems if p.severity == WARNING]

    def exit_code(self, strict: bool = False) -> int:
        return 1 if self.errors or (strict and self.warnings) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "online": self.online,
            "instance": self.instance,
            "schema_source": self.schema_source,
            "fields": [
                {
                    "field": r.field,
                    "source": r.source,
                    "produces": r.produces,
                    "marketo_type": r.marketo_type,
                    "writable": r.writable,
                    "verdict": r.verdict,
                }
                for r in self.rows
            ],
            "problems": [
                {
                    "field": p.field,
                    "severity": p.severity,
                    "message": p.message,
                    "where": p.where,
                    "kind": p.kind,
                }
                for p in self.problems
            ],
            "usage": None
            if self.usage is None
            else {
                "used": self.usage.used,
                "quota": self.usage.quota,
                "remaining": self.usage.remaining,
            },
            "notes": list(self.notes),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }


def resolve_credentials(config: Config, online: bool | None) -> tuple[Credentials | None, str | None]:
    """Credentials for an online check, or why the check stays offline.

    online True: required (ConfigError when they do not resolve); False: none; None: if they do.
    """
    if online is False:
        return None, "offline: the Marketo schema, writability and quota were not checked (--offline)"
    try:
        return config.credentials(), None
    except ConfigError as e:
        if online:
            raise
        return None, (
            f"offline: credentials do not resolve ({e.problems[0]}), so the Marketo schema, "
            "writability and quota were not checked"
        )


def run_check(
    config: Config,
    *,
    credentials: Credentials | None,
    sample: list[str] | None = None,
    allow_incomplete: bool = False,
    daily_quota: int = DEFAULT_DAILY_QUOTA,
) -> CheckReport:
    """Offline checks, the sample (if any), and with credentials the live schema and quota.

    Raises AuthError / FatalError when Marketo cannot be reached or refuses the credentials."""
    report = CheckReport(config.path)
    report.problems += check_config(config)
    if sample:
        report.problems += check_sample(config, sample, allow_incomplete)
    if credentials is None:
        rows = [FieldCheck(m.field, describe_mapping(m), m.output_type) for m in config.mappings]
        report.rows = _with_verdicts(rows, report.problems)
        return report
    fields, source, used, usage_note = asyncio.run(_online(credentials, config.delivery.timeout))
    report.online, report.schema_source, report.instance = True, source, credentials.base_url
    rows, problems = schema_report(config.mappings, config.lookup_field, fields)
    report.rows = rows
    report.problems = problems + report.problems
    if used is not None:
        report.usage = Usage(used, daily_quota)
        if report.usage.remaining == 0:
            report.problems.append(
                SchemaProblem(
                    "",
                    ERROR,
                    f"today's API quota is spent ({used} of {daily_quota} "
                    "calls): a sync now would stop at once",
                    kind="quota",
                )
            )
        elif report.usage.remaining < daily_quota // 10:
            report.problems.append(
                SchemaProblem(
                    "",
                    WARNING,
                    f"only {report.usage.remaining} of today's {daily_quota} API calls are left",
                    kind="quota",
                )
            )
    if usage_note:
        report.notes.append(usage_note)
    report.rows = _with_verdicts(report.rows, report.problems)
    return report


def _with_verdicts(rows: list[FieldCheck], problems: list[SchemaProblem]) -> list[FieldCheck]:
    """Each row's verdict: the worst finding about its field, offline or online."""
    worst: dict[str, str] = {}
    for p in problems:
        if p.severity == ERROR or worst.get(p.field) != ERROR:
            worst[p.field] = p.severity
    return [replace(r, verdict=worst.get(r.field, "ok")) for r in rows]


async def _online(
    credentials: Credentials, timeout: float
) -> tuple[list[dict[str, Any]], str, int | None, str | None]:
    async with MarketoClient(credentials, timeout=timeout, max_connections=2) as client:
        await _authenticate(client)
        fields, source = await fetch_schema_from(client)
        try:
            used = await client.usage_today()
            note = None
        except CallFailed as e:
            used, note = None, f"today's usage could not be read ({e})"
        return fields, source, used, note


async def _authenticate(client: MarketoClient) -> None:
    try:
        await client.token()
    except CallFailed as e:
        raise FatalError(f"cannot reach Marketo at {client.credentials.base_url}: {e.message}") from None


# =============================================================================================
# Fields


def filter_fields(fields: Iterable[dict[str, Any]], match: str | None = None) -> list[dict[str, Any]]:
    """REST-usable fields whose REST name or display name contains `match` (any case), or whose
    data type is `match`; sorted by REST name."""
    wanted = (match or "").lower()
    out = [
        f
        for f in normalise_fields(fields)
        if f["rest"]
        and (
            not wanted
            or wanted in f["name"].lower()
            or wanted in f["displayName"].lower()
            or wanted == f["dataType"].lower()
        )
    ]
    return sorted(out, key=lambda f: f["name"].lower())


def list_fields(config: Config, credentials: Credentials, match: str | None = None) -> list[dict[str, Any]]:
    """Marketo's lead fields a mapping can target, each with `mapped` (by this config)."""

    async def fetch() -> list[dict[str, Any]]:
        async with MarketoClient(credentials, timeout=config.delivery.timeout, max_connections=1) as client:
            await _authenticate(client)
            return await fetch_schema(client)

    mapped = {m.field for m in config.mappings}
    rows = filter_fields(asyncio.run(fetch()), match)
    for f in rows:
        f["mapped"] = f["name"] in mapped or f["name"] == config.lookup_field
    return rows
