"""What flows from planning through delivery into the report and the state.

A dependency-free module: the planner makes `LeadUpdate`s, the delivery engine (REST or bulk)
turns them into `LeadOutcome`s, and every `OutcomeSink` (report, state, tests) receives those
outcomes a batch at a time. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson


@dataclass(slots=True)
class LeadUpdate:
    """One lead to send: its key, the Marketo payload (lookup field first), where it came from."""

    key: str
    payload: dict[str, Any]
    source: str  # "path:line" of the latest record that touched the lead
    stamps: dict[str, tuple[float, float]] = field(default_factory=dict)  # field -> consent (time, version)


def payload_hash(fields: dict[str, Any]) -> str:
    """A stable hash of field values (the lookup field excluded), for "did anything change"."""
    return hashlib.sha1(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(slots=True)
class LeadOutcome:
    """What became of one lead: delivered (created/updated), skipped with Marketo's reason, or failed."""

    key: str
    payload: dict[str, Any]
    source: str
    status: str  # created | updated | imported (bulk: one or the other) | skipped | failed
    code: str = ""
    reason: str = ""  # Marketo's reason for a skip or failure; a bulk import's warning if delivered
    retryable: bool = False
    expected: bool = False  # an expected skip (1004 under updateOnly)
    lead_id: int | None = None
    stamps: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def delivered(self) -> bool:
        return self.status in ("created", "updated", "imported")


class OutcomeSink(Protocol):
    """Anything that takes outcomes a batch at a time: the report, the state, a test."""

    def batch_done(self, outcomes: list[LeadOutcome]) -> None: ...
