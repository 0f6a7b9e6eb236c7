"""`reconcile`: does Marketo still hold what people chose?

Fields drift: marketers edit them by hand, forms and list imports overwrite them, other
integrations write the same fields. Reconcile reads the mapped fields back from Marketo (Get
Leads by filter, 300 keys a call) and compares them with the folded Didomi consent: from input
files, or from the values Marketo last confirmed in the state when no input is given.

  plan     the expected values per lead (fold or state), limited by --since
  budget   the calls it will spend, refused beyond --max-calls or the quota left today
  read     the leads back from Marketo, through the delivery limiter's rules
  compare  per field: match | differs | missing in Marketo | lead not found
  fix      (--fix) the drifted leads through the normal delivery engine: same report and state
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from didomi_marketo.config import DEFAULT_DAILY_QUOTA, RATE_WINDOW_SECONDS, Config
from didomi_marketo.deliver import DeliveryStats
from didomi_marketo.didomi.fold import NEVER, Stamp, format_timestamp, latest, parse_timestamp, source
from didomi_marketo.errors import ConfigError, DidomiMarketoError, FatalError
from didomi_marketo.explain import consent_time, trace, wall_clock
from didomi_marketo.inputs import InputStats, build_fold, read_into
from didomi_marketo.marketo.client import CallFailed, GaveUp, MarketoClient, RetryPolicy, Stopped
from didomi_marketo.marketo.codes import QUOTA_RESET_NOTE, Action
from didomi_marketo.marketo.credentials import Credentials
from didomi_marketo.marketo.leads import LeadReader, ReadRefused, calls_for
from didomi_marketo.marketo.limiter import Limiter
from didomi_marketo.outcomes import LeadUpdate
from didomi_marketo.plan import Planner, keep_newer
from didomi_marketo.report import Report
from didomi_marketo.state import StateStore
from didomi_marketo.summary import delivery_json, exit_code
from didomi_marketo.sync import SyncOptions, open_state, send_updates

MATCH, DIFFERS, MISSING, NOT_FOUND = "match", "differs", "missing_in_marketo", "lead_not_found"
BUCKETS = (MATCH, DIFFERS, MISSING, NOT_FOUND)
SAMPLES = 5
TRACE_LIMIT = 10_000  # drifted leads whose per-field source is traced (one extra read of the inputs)


@dataclass
class ReconcileOptions:
    paths: list[str]  # empty: compare with the state's confirmed values
    state: str | None = None
    fix: bool = False
    since: int | None = None  # only leads whose consent changed after this (epoch nanoseconds)
    daily_quota: int = DEFAULT_DAILY_QUOTA
    allow_incomplete: bool = False
    rate_window: float = RATE_WINDOW_SECONDS
    wait_lock: float = 0.0


@dataclass
class Expected:
    """What Marketo should hold for one lead, and where each value came from."""

    key: str
    fields: dict[str, Any]
    stamps: dict[str, Stamp]
    source: str  # path:line of the latest record of the lead, or "state"
    confirmed: bool = False  # the state says Marketo confirmed this lead


@dataclass
class ReconcileResult:
    summary: dict[str, Any]
    exit_code: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    fatal: str | None = None


def parse_since(value: str) -> int:
    """--since: an ISO 8601 date or time (UTC when no offset is given)."""
    ts = parse_timestamp(value.strip())
    if ts is None:
        raise ConfigError(f"--since {value!r}: expected an ISO 8601 date or time, e.g. 2026-11-01")
    return ts


# ---------------------------------------------------------------------------------------------
# plan: the expected values


def _from_inputs(config: Config, options: ReconcileOptions, report: Report, store: StateStore | None,
                 inputs: InputStats) -> Iterator[Expected]:  # fmt: skip
    fold = build_fold(config, report.issue)
    try:
        read_into(fold, options.paths, options.allow_incomplete, inputs)
        planner = Planner(config.mappings, fold.schema, config.lookup_field, None, config.action)
        for key, state in fold.leads():
            fields, stamps = planner.values(state)
            if not fields:
                continue
            prior = store.lead(key) if store is not None else None
            if prior is not None:
                keep_newer(prior.known(), fields, stamps)  # an old file never outranks the state
            last = max([latest(state), *(t[0] for t in stamps.values())])
            if options.since is not None and last <= options.since:
                continue
            yield Expected(key, fields, stamps, source(state), bool(prior is not None and prior.confirmed))
    finally:
        fold.close()


def _from_state(config: Config, options: ReconcileOptions, store: StateStore) -> Iterator[Expected]:
    mapped = {m.field for m in config.mappings}
    for lead in store.leads():
        fields = {k: v[0] for k, v in lead.confirmed.items() if k in mapped}
        if not fields:
            continue
        stamps = {k: v[1] for k, v in lead.confirmed.items() if k in fields}
        if options.since is not None and max((s[0] for s in stamps.values()), default=NEVER) <= options.since:
            continue
        at = lead.confirmed_at
        where = f"state (confirmed {wall_clock(at)})" if at else "state"
        yield Expected(lead.key, fields, stamps, where, True)


# ---------------------------------------------------------------------------------------------
# compare


def same_value(didomi: Any, marketo: Any) -> bool:
    """Marketo reads values back in its own spelling: booleans may come back as strings,
    datetimes in UTC to the second, numbers as floats."""
    if didomi == marketo and type(didomi) is type(marketo):
        return True
    if isinstance(didomi, bool) or isinstance(marketo, bool):
        return _as_bool(didomi) is not None and _as_bool(didomi) == _as_bool(marketo)
    if isinstance(didomi, int | float) and isinstance(marketo, int | float | str):
        try:
            return float(didomi) == float(marketo)
        except ValueError:
            return False
    if isinstance(didomi, str) and isinstance(marketo, str):
        if didomi == marketo:
            return True
        a, b = _as_time(didomi), _as_time(marketo)
        return a is not None and a == b
    return False


def _as_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return None


def _as_time(v: str) -> int | None:
    if "T" not in v and " " not in v:
        return None  # a plain string, or a date (compared as text)
    # Marketo's own spelling (UTC, whole seconds): compared to the second, whatever the fold's unit
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00").replace(" ", "T"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return math.floor(t.timestamp())


@dataclass
class Comparison:
    fields: dict[str, Counter] = field(default_factory=dict)
    leads: int = 0
    drifted: int = 0
    not_found_expected: int = 0  # not in Marketo, and update-only never created them: no drift

    def count(self, name: str, bucket: str) -> None:
        self.fields.setdefault(name, Counter())[bucket] += 1


def compare(exp: Expected, rows: list[dict[str, Any]] | None, action: str,
            result: Comparison) -> dict[str, Any] | None:  # fmt: skip
    """Count each field of one lead; the drift record when something differs, else None."""
    result.leads += 1
    drift: dict[str, Any] = {}
    if not rows:
        # Under update-only a lead that is not in Marketo is what the sync expects (1004),
        # unless Marketo confirmed it once: then it was deleted behind the tool's back.
        for name in exp.fields:
            result.count(name, NOT_FOUND)
        if action == "updateOnly" and not exp.confirmed:
            result.not_found_expected += 1
            return None
        drift = {name: _drift(exp, name, NOT_FOUND, None) for name in exp.fields}
    else:
        row = rows[0]  # Marketo holds duplicates: compare the oldest (a sync would get 1007)
        for name, value in exp.fields.items():
            got = row.get(name)
            bucket = MISSING if got is None else MATCH if same_value(value, got) else DIFFERS
            result.count(name, bucket)
            if bucket != MATCH:
                drift[name] = _drift(exp, name, bucket, got)
    if not drift:
        return None
    result.drifted += 1
    out: dict[str, Any] = {"key": exp.key, "source": exp.source, "fields": drift}
    if rows:
        out["marketo_ids"] = [r.get("id") for r in rows]
    return out


def _drift(exp: Expected, name: str, bucket: str, marketo: Any) -> dict[str, Any]:
    return {
        "status": bucket,
        "didomi": exp.fields[name],
        "marketo": marketo,
        "consent_at": consent_time(exp.stamps.get(name)),
        "source": exp.source,
    }


# ---------------------------------------------------------------------------------------------
# the run


async def _usage(client: MarketoClient) -> int:
    try:
        return await client.usage_today() or 0
    except CallFailed as e:
        raise _fatal(e) from None


def _fatal(e: CallFailed | GaveUp | Stopped) -> FatalError:
    if isinstance(e, GaveUp):
        return FatalError(f"Marketo did not answer the reads: {e}")
    if isinstance(e, Stopped):
        return FatalError(str(e))
    if e.action is Action.QUOTA:
        return FatalError(f"Marketo daily quota reached (607); {QUOTA_RESET_NOTE}")
    return FatalError(f"Marketo refused the read: {e}")


async def _read_marketo(config: Config, credentials: Credentials, options: ReconcileOptions,
                        keys: list[str], calls: dict[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], list[float]]:  # fmt: skip
    settings = config.delivery
    async with MarketoClient(
        credentials, timeout=settings.timeout, max_connections=settings.max_concurrency
    ) as client:
        used = await _usage(client)
        calls["usage_before"] = used
        left = options.daily_quota - used
        budget = settings.max_calls
        needed = calls["estimated_reads"] + 1  # + the usage read just made
        if budget is not None and needed > budget:
            raise FatalError(
                f"reconcile needs {needed} calls ({calls['estimated_reads']} reads of 300 leads, 1 usage "
                f"read) but --max-calls is {budget}; nothing was read"
            )
        if needed > left:
            raise FatalError(
                f"reconcile needs {needed} calls but only {max(left, 0)} of the daily quota "
                f"({options.daily_quota}) are left today ({used} used); nothing was read"
            )
        limiter = Limiter(settings.max_calls_per_20s, options.rate_window, settings.max_concurrency)
        limiter.seed(client.recent_calls)
        policy = RetryPolicy(
            client.clock, min_attempts=settings.retry_min_attempts, min_seconds=settings.retry_min_seconds
        )
        fields = [m.field for m in config.mappings if m.field != config.lookup_field]
        reader = LeadReader(client, limiter, policy, config.lookup_field, fields,
                            max_calls=None if budget is None else budget - 1)  # fmt: skip
        try:
            found = await reader.read(keys)
        except ReadRefused as e:
            raise ConfigError(
                f"Marketo refused to read the mapped fields ({e.code}: {e.message}); "
                "check the mapping against Marketo with `didomi-marketo check`"
            ) from None
        except (CallFailed, GaveUp, Stopped) as e:
            raise _fatal(e) from None
        finally:
            calls["reads"] = reader.stats.calls
            calls["reads_as_post"] = reader.stats.post_calls
        return found, list(client.recent_calls)


def run_reconcile(
    config: Config,
    options: ReconcileOptions,
    report: Report,
    *,
    credentials: Credentials,
    on_warning: Callable[[str], None] | None = None,
    on_drift: Callable[[dict[str, Any]], None] | None = None,
) -> ReconcileResult:
    """Compare Marketo with the folded consent; with --fix, send the drifted leads."""
    started = time.time()
    warn = on_warning or (lambda _message: None)
    if not options.paths and not options.state:
        raise ConfigError("reconcile needs input PATHs to fold, or --state FILE to compare with")
    inputs = InputStats()
    sync_options = SyncOptions(
        paths=options.paths, dry_run=not options.fix, state=options.state, wait_lock=options.wait_lock,
        rate_window=options.rate_window, daily_quota=options.daily_quota,
    )  # fmt: skip
    comparison = Comparison()
    delivery: DeliveryStats | None = None
    calls: dict[str, Any] = {}
    drift_file = _open_drift(report.directory)
    samples: list[dict[str, Any]] = []
    try:
        with open_state(sync_options) as store:
            if store is not None and options.fix:
                store.bind_instance(credentials.base_url)
            if options.paths:
                expected = list(_from_inputs(config, options, report, store, inputs))
            else:
                assert store is not None
                expected = list(_from_state(config, options, store))
            calls["estimated_reads"] = calls_for(len(expected))
            found, earlier = asyncio.run(
                _read_marketo(config, credentials, options, [e.key for e in expected], calls)
            )
            drifted: list[Expected] = []
            records: list[dict[str, Any]] = []
            for exp in expected:
                record = compare(exp, found.get(exp.key), config.action, comparison)
                if record is not None:
                    drifted.append(exp)
                    records.append(record)
            if options.paths and records:
                _field_sources(config, options, records, drifted, warn)
            for record in records:
                if drift_file is not None:
                    drift_file.write(orjson.dumps(record) + b"\n")
                if len(samples) < SAMPLES:
                    samples.append(record)
                if on_drift is not None:
                    on_drift(record)
            if options.fix and drifted:
                delivery = _fix(
                    config, credentials, sync_options, drifted, report, store, calls, earlier, warn
                )
    except DidomiMarketoError as e:
        # The report still says what happened (cron reads summary.json); the CLI prints the error.
        summary = _summary(config, options, inputs, comparison, calls, delivery, started)
        summary["error"] = str(e)
        summary["exit_code"] = e.exit_code
        report.finish(summary)
        raise
    finally:
        if drift_file is not None:
            drift_file.close()
    summary = _summary(config, options, inputs, comparison, calls, delivery, started)
    # --fix answers as a sync does; a plain reconcile answers "did anything drift?"
    code = exit_code(delivery) if options.fix else (1 if comparison.drifted else 0)
    summary["exit_code"] = code
    report.finish(summary)
    return ReconcileResult(summary, code, samples, delivery.fatal if delivery else None)


def _field_sources(config: Config, options: ReconcileOptions, records: list[dict[str, Any]],
                   drifted: list[Expected], warn: Callable[[str], None]) -> None:  # fmt: skip
    """Name the record that won each drifted field (explain's trace: the fold's own verdicts),
    instead of the lead's latest record. One more read of the inputs, for the drifted leads."""
    if len(records) > TRACE_LIMIT:
        warn(f"{len(records)} drifted leads: drift.ndjson names each lead's latest record, not each field's")
        return
    traces = trace(config, options.paths, [e.key for e in drifted], options.allow_incomplete)
    for record, exp in zip(records, drifted, strict=True):
        verdicts = {v.field: v for v in traces[exp.key].verdicts}
        for name, f in record["fields"].items():
            v = verdicts.get(name)
            if v is not None and v.source is not None and v.value == exp.fields[name]:
                f["source"], f["why"] = v.source, v.reason
            elif v is not None and v.value != exp.fields[name]:
                f["source"], f["why"] = "state", "a newer consent Marketo confirmed earlier (the state)"


def _fix(config: Config, credentials: Credentials, sync_options: SyncOptions, drifted: list[Expected],
         report: Report, store: StateStore | None, calls: dict[str, Any], earlier: list[float],
         warn: Callable[[str], None]) -> DeliveryStats | None:  # fmt: skip
    """The drifted leads through the normal delivery engine, with the whole expected payload."""
    budget = config.delivery.max_calls
    spent = 1 + calls.get("reads", 0)
    needed = math.ceil(len(drifted) / config.delivery.batch_size)
    if budget is not None and spent + needed > budget:
        raise FatalError(
            f"--fix needs {needed} more calls but only {max(budget - spent, 0)} of --max-calls {budget} "
            "are left; the drift is reported, nothing was sent"
        )
    if budget is not None:
        config = replace(config, delivery=replace(config.delivery, max_calls=budget - spent))
    lookup = config.lookup_field
    updates = [
        LeadUpdate(e.key, {lookup: int(e.key) if lookup == "id" else e.key, **e.fields}, e.source, e.stamps)
        for e in drifted
    ]
    return send_updates(config, credentials, sync_options, updates, report, store, None, None, None,
                        len(updates), warn, earlier)  # fmt: skip


def _open_drift(directory: Path | None) -> IO[bytes] | None:
    if directory is None:
        return None
    return open(directory / "drift.ndjson", "wb")  # noqa: SIM115 - closed by run_reconcile


def _summary(config: Config, options: ReconcileOptions, inputs: InputStats, comparison: Comparison,
             calls: dict[str, Any], delivery: DeliveryStats | None, started: float) -> dict[str, Any]:  # fmt: skip
    fields = {
        m.field: {b: comparison.fields.get(m.field, Counter()).get(b, 0) for b in BUCKETS}
        for m in config.mappings
        if m.field != config.lookup_field
    }
    summary: dict[str, Any] = {
        "mode": "reconcile-fix" if options.fix else "reconcile",
        "compared_with": "inputs" if options.paths else "state",
        "since": format_timestamp(options.since) if options.since is not None else None,
        "started_at": wall_clock(started),
        "finished_at": wall_clock(time.time()),
        "config": config.identity(),
        "leads": {
            "compared": comparison.leads,
            "in_sync": comparison.leads - comparison.drifted - comparison.not_found_expected,
            "drifted": comparison.drifted,
            "not_in_marketo_expected": comparison.not_found_expected,
        },
        "fields": fields,
        "calls": calls,
    }
    if options.paths:
        summary["input"] = {"files": inputs.files, "records": inputs.records,
                            "partitions_refused": inputs.partitions_refused}  # fmt: skip
    if delivery is not None:
        summary["fix"] = delivery_json(delivery)
    return summary
