"""Preview a mapping change: read -> fold -> map without delivery (no credentials).

Census's sync dry run: per field, what would be sent and what would change, against an old
config or against what Marketo last confirmed (the state). Nothing here prints: the CLI renders
what `run_preview` returns.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from didomi_marketo.config import Config
from didomi_marketo.defaults import DEFAULT_SAMPLES as DEFAULT_SAMPLES
from didomi_marketo.didomi.fold import SPILL_THRESHOLD, Stamp
from didomi_marketo.errors import ConfigError
from didomi_marketo.inputs import InputStats, build_fold, read_into
from didomi_marketo.mapping import FieldMapping, classify_value, describe_mapping
from didomi_marketo.plan import Planner, PriorState, keep_newer
from didomi_marketo.report import IGNORED

REJECTION_EXAMPLES = 10


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


class IssueTally:
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
    confirmed: PriorState | None = None,
    limit: int = DEFAULT_SAMPLES,
    allow_incomplete: bool = False,
    on_lead: Callable[[LeadDiff], None] | None = None,
    spill_threshold: int = SPILL_THRESHOLD,
) -> PreviewResult:
    """Read, fold and map `paths` under `new` without sending anything (no credentials).

    With `old`, every lead is also mapped under the old config and compared field by field;
    with `confirmed` (the state store, or any object with its `lead(key)`), the new values are
    compared with what Marketo last confirmed, as the next sync would (a newer known consent
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
    tally = IssueTally(result)
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
        key: str, after: dict[str, Any], stamps: dict[str, Stamp], before: dict[str, Any] | None
    ) -> None:
        if confirmed is not None:  # may keep a newer known consent in `after`, as sync does
            prior = confirmed.lead(key)
            before = {}
            if prior is not None:
                result.kept_newer += keep_newer(prior.known(), after, stamps)
                before = {n: prior.confirmed[n][0] for n in after if n in prior.confirmed}
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
        old_fold = build_fold(old, IssueTally(PreviewResult(old.lookup_field, None)).issue, spill_threshold)
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


def change_rows(diff: LeadDiff) -> Iterator[tuple[str, str, Any, Any]]:
    """CSV rows (key, field, before, after) of one lead's diff; None means not sent."""
    for c in diff.changes:
        yield diff.key, c.field, c.before, c.after
