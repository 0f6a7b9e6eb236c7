"""Check a config: offline (the config alone, a sample of the data) and online (Marketo's schema
and today's quota). RudderStack validates field types against describe2 the same way.

`schema_problems` is also sync's pre-flight: it refuses to send what Marketo would skip for every
lead. Nothing here prints: the CLI renders what these return.
"""

from __future__ import annotations

import asyncio
import difflib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from didomi_marketo.config import DEFAULT_DAILY_QUOTA, Config
from didomi_marketo.didomi.fold import Fold, FoldSchema, value_at
from didomi_marketo.didomi.records import emit_export_line
from didomi_marketo.errors import ConfigError
from didomi_marketo.inputs import InputStats, read_into
from didomi_marketo.mapping import (
    BOOLEAN,
    DATETIME,
    STRING,
    FieldMapping,
    Property,
    Reading,
    describe_mapping,
)
from didomi_marketo.marketo.client import CallFailed, MarketoClient
from didomi_marketo.marketo.credentials import Credentials
from didomi_marketo.marketo.schema import (
    authenticate,
    fetch_schema_from,
    filter_fields,
    normalise_fields,
    read_lead_fields,
)
from didomi_marketo.preview import IssueTally, PreviewResult

ERROR, WARNING = "error", "warning"


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

    def observe(self, path: str, kind: str, raw_key: Any, timestamp: Any, consents: dict, user: dict,
                *rest: Any) -> None:  # fmt: skip
        seen = self.seen
        consents = consents if isinstance(consents, dict) else {}
        for p in _dicts(consents.get("purposes")):
            seen["purpose"].add(str(p.get("id")))
            values = p.get("values")
            if isinstance(values, dict):
                seen["preference"].update(str(k) for k in values)
            for pref in _dicts(p.get("preferences")):
                seen["preference"].add(str(pref.get("id")))
                seen["preference channel"].update(str(c.get("id")) for c in _dicts(pref.get("channels")))
        seen["channel"].update(str(c.get("id")) for c in _dicts(consents.get("channels")))
        user = user if isinstance(user, dict) else {}
        seen["user field"].update(k for k, v in user.items() if isinstance(v, str) and v)
        md = user.get("metadata")
        if isinstance(md, dict):
            seen["metadata key"].update(str(k) for k in md)
        super().observe(path, kind, raw_key, timestamp, consents, user, *rest)

    def staging(self) -> Fold:
        staged = super().staging()
        assert isinstance(staged, _SeenFold)
        staged.seen = self.seen  # the ids every file carries, read in full or not
        return staged

    def add_export_line(self, user: dict, events: list, line: int, path: str) -> None:
        # Not the fused short way: every record goes through `observe`, which notes its ids.
        emit_export_line(
            user, events, line, partial(self.observe, path), partial(self.reject_unusable, path=path)
        )


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
    tally = IssueTally(PreviewResult(config.lookup_field, None))
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
                if value_at(state, slot) is not None:
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


def schema_problems(
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
        await authenticate(client)
        fields, source = await fetch_schema_from(client)
        try:
            used = await client.usage_today()
            note = None
        except CallFailed as e:
            used, note = None, f"today's usage could not be read ({e})"
        return fields, source, used, note


def list_fields(config: Config, credentials: Credentials, match: str | None = None) -> list[dict[str, Any]]:
    """Marketo's lead fields a mapping can target, each with `mapped` (by this config)."""

    mapped = {m.field for m in config.mappings}
    rows = filter_fields(read_lead_fields(credentials, config.delivery.timeout), match)
    for f in rows:
        f["mapped"] = f["name"] in mapped or f["name"] == config.lookup_field
    return rows
