"""What a run did, as one typed value: `RunSummary` feeds summary.json, the terminal table and the
JSON log alike (each reads `to_json()`), and `exit_code` is decided here, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from didomi_marketo.deliver import DeliveryStats
from didomi_marketo.didomi.fold import FoldStats, format_timestamp
from didomi_marketo.errors import ConfigError, DidomiMarketoError
from didomi_marketo.inputs import InputStats
from didomi_marketo.plan import PlanStats


def exit_code(
    delivery: DeliveryStats | None, rejected_input: bool = False, input_denied: bool = False
) -> int:
    """3 aborted, or cloud storage refused our credentials (a person must act; the rest of the
    input was still delivered); 1 rejected input or leads failed/skipped unexpectedly; else 0."""
    if (delivery is not None and delivery.fatal) or input_denied:
        return 3
    if rejected_input:
        return 1
    if delivery is not None and (delivery.failed or delivery.unexpected_skips):
        return 1
    return 0


def _iso(t: float) -> str:
    return format_timestamp(round(t) * 10**9)


@dataclass
class RunSummary:
    """A sync, a dry run or a retry. `inputs`/`fold` are None for a retry (it reads a report, not
    inputs); `delivery` is None for a dry run."""

    mode: str  # sync | dry-run | retry | retry-dry-run
    started: float
    finished: float
    config: dict[str, Any]  # Config.identity(): safe to print
    plan: PlanStats
    exit_code: int = 0
    inputs: InputStats | None = None
    fold: FoldStats | None = None
    leads_folded: int = 0
    delivery: DeliveryStats | None = None
    from_report: str | None = None  # retry: the report it re-sends from
    retryable: int = 0  # retry: leads found retryable in that report
    extra: dict[str, Any] = field(default_factory=dict)  # sections a feature adds (e.g. the path)

    @property
    def is_retry(self) -> bool:
        return self.inputs is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.from_report is not None:
            out["from_report"] = self.from_report
        out["started_at"] = _iso(self.started)
        out["finished_at"] = _iso(self.finished)
        if not self.is_retry:
            out["duration_seconds"] = round(self.finished - self.started, 3)
        out["config"] = self.config
        if self.inputs is not None and self.fold is not None:
            out["input"] = _input_json(self.inputs, self.fold)
            out["leads"] = {
                "folded": self.leads_folded,
                "nothing_to_send": self.plan.nothing_to_send,
                "unchanged": self.plan.unchanged,
                "pending_resent": self.plan.pending_resent,
                "rechecked": self.plan.rechecked,
                "kept_newer_fields": self.plan.kept_newer,
                "to_send": self.plan.to_send,
            }
            out["fields"] = _fields_json(self.plan)
        else:
            out["leads"] = {
                "retryable": self.retryable,
                "unchanged": self.plan.unchanged,
                "to_send": self.plan.to_send,
            }
        out.update(self.extra)
        if self.delivery is not None:
            out["delivery"] = delivery_json(self.delivery)
        out["exit_code"] = self.exit_code
        return out


def _input_json(inputs: InputStats, fs: FoldStats) -> dict[str, Any]:
    return {
        "files": inputs.files,
        "files_skipped": inputs.files_skipped,
        "skipped_files": inputs.skipped_files,
        "files_unchanged": inputs.files_unchanged,
        "partitions_refused": inputs.partitions_refused,
        "access_denied": inputs.access_denied,
        "records": inputs.records,
        "observations": fs.observations,
        "user_statuses": fs.user_statuses,
        "events": fs.events,
        "applied": fs.applied,
        "rejected": fs.rejected,
        "ignored": {
            "anonymous": fs.anonymous,
            "pending": fs.pending,
            "other_regulation": fs.other_regulation,
            "deleted": fs.deleted,
        },
        "user_deletions": fs.user_deletions,
        "revoked": fs.revoked,
    }


def _fields_json(plan: PlanStats) -> dict[str, dict[str, int]]:
    return {
        name: {
            "true": counter.get("true", 0),
            "false": counter.get("false", 0),
            "other": counter.get("other", 0),
            "absent": plan.to_send - sum(counter.values()),
        }
        for name, counter in plan.fields.items()
    }


def delivery_json(d: DeliveryStats) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": d.path,
        "path_reason": d.path_reason,
        "sent": d.sent,
        "created": d.created,
        "updated": d.updated,
        "imported": d.imported,
        "skipped": dict(sorted(d.skipped.items())),
        "expected_skips": d.expected_skips,
        "failed": d.failed,
        "failed_retryable": d.failed_retryable,
        "calls": d.calls,
        "batches": d.batches,
        "splits": d.splits,
        "retries": d.retries,
        "reauths": d.reauths,
        "backoff_seconds": round(d.backoff_seconds, 3),
        "rate_limited_606": d.rate_limited,
        "concurrency_limited_615": d.concurrency_limited,
        "max_in_flight": d.max_in_flight,
        "delivery_seconds": round(d.delivery_seconds, 3),
        "leads_per_second": round(d.leads_per_second, 1),
        "stop_reason": d.stop_reason,
    }
    if d.bulk is not None:
        b = d.bulk
        out["bulk"] = {
            "uploads": b.uploads,
            "polls": b.polls,
            "file_fetches": b.file_fetches,
            "queue_full_waits": b.queue_full_waits,
            "jobs_failed": b.jobs_failed,
        }
    return out


def failed_run(
    mode: str, started: float, finished: float, config: dict[str, Any], error: BaseException
) -> dict[str, Any]:
    """summary.json of a run that stopped before its end (bad credentials, a refused schema, the
    state locked, a full disk): when, with what, and why, with the exit code the CLI gives it."""
    if isinstance(error, ConfigError):
        reason = "; ".join(error.problems)
    elif isinstance(error, OSError) and error.strerror:
        reason = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        reason = str(error)
    return {
        "mode": mode,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "config": config,
        "error": reason,
        "exit_code": error.exit_code if isinstance(error, DidomiMarketoError) else 3,
    }
