"""Inputs: discover files, read them, and fold their records into per-lead consent.

Used by every command that reads Didomi data (sync, preview, check --sample, explain, reconcile),
so each reads exactly as `sync` does. The consent rules themselves live in `didomi/fold.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from didomi_marketo.config import Config
from didomi_marketo.didomi.fold import Fold, FoldSchema, IssueSink
from didomi_marketo.didomi.readers import (
    ALL_DATES,
    DateWindow,
    IncompletePartition,
    InputFile,
    Problem,
    discover,
    read_records,
    sniff_json,
)
from didomi_marketo.didomi.records import Observation, observations
from didomi_marketo.mapping import FieldMapping
from didomi_marketo.outcomes import payload_hash
from didomi_marketo.state import StateStore, input_unit
from didomi_marketo.storage import check_urls, discover_url, is_url


@dataclass
class InputStats:
    files: int = 0
    files_skipped: int = 0  # not JSON (READMEs...) in a folder
    files_unchanged: int = 0  # skipped: unchanged since the state recorded them
    records: int = 0
    partitions_refused: list[str] = field(default_factory=list)
    access_denied: list[str] = field(default_factory=list)  # storage or the OS refused us: exit 3


def discover_all(
    paths: list[str], allow_incomplete: bool = False, window: DateWindow = ALL_DATES
) -> Iterator[InputFile | Problem | IncompletePartition]:
    """Local paths and `s3://` / `gs://` URLs, in command-line order, into the same items."""
    for raw in paths:
        if is_url(raw):
            yield from discover_url(raw, allow_incomplete, window)
        else:
            yield from discover([raw], allow_incomplete, window)


def read_into(fold: Fold, paths: list[str], allow_incomplete: bool, stats: InputStats,
              unchanged: InputFilter | None = None,
              window: DateWindow = ALL_DATES) -> None:  # fmt: skip
    """Feed every record of `paths` into the fold. `unchanged` skips inputs the state has seen;
    `window` selects `date=` partitions by name. Raises ConfigError for an unusable URL."""
    check_urls(paths)
    add, reject = fold.add, fold.reject

    def problem(p: Problem) -> None:
        if p.denied:
            stats.access_denied.append(p.path)
        reject("rejected", p.path, p.line, p.reason)

    for item in discover_all(paths, allow_incomplete, window):
        if isinstance(item, Problem):
            problem(item)
            continue
        if isinstance(item, IncompletePartition):
            stats.partitions_refused.append(item.partition)
            reject("rejected", item.partition, 0, str(item).split(": ", 1)[1])
            continue
        # Inside a Didomi partition every *.json.gz is data: no need to open it to decide (an
        # unchanged remote partition is then skipped without a single read).
        if item.walked and item.partition is None and not sniff_json(item):
            stats.files_skipped += 1
            continue
        if unchanged is not None and not unchanged(item):
            continue
        stats.files += 1
        path = item.display
        for rec in read_records(item):
            stats.records += 1
            if isinstance(rec, Problem):
                problem(rec)
                if rec.line == 0 and unchanged is not None:
                    unchanged.forget(item)  # not read: the next run must try it again
                continue
            value, line = rec
            for ob in observations(value, line):
                if isinstance(ob, Observation):
                    add(ob, path)
                else:
                    reject(ob.category, path, ob.line, ob.reason, ob.key)


def build_fold(
    config: Config,
    on_issue: IssueSink,
    spill_threshold: int = 250_000,
    mappings: list[FieldMapping] | None = None,
) -> Fold:
    """The fold for `config` (or for other mappings under its identifier and regulations)."""
    return Fold(
        FoldSchema.from_mappings(config.mappings if mappings is None else mappings),
        config.identifier,
        config.regulations,
        on_issue,
        spill_threshold=spill_threshold,
    )


class InputFilter:
    """Skips inputs (files, or whole export partitions) unchanged since a sync recorded them."""

    def __init__(self, store: StateStore, full: bool, config: Config):
        self.store, self.full = store, full
        # An input is "unchanged" only under the same mapping: a mapping change re-reads it.
        self.config_hash = payload_hash(config.identity() | {"client_id": None, "instance": None})
        self.units: dict[str, str] = {}
        self.unchanged = 0
        self._decided: dict[str, bool] = {}
        self._unit: dict[str, str] = {}

    @staticmethod
    def _key(f: InputFile) -> str:
        # A partition is one unit only when it was walked whole; a file named on the command
        # line is its own unit (else syncing one part would mark the whole partition done).
        return f.partition if f.walked and f.partition else f.display

    def forget(self, f: InputFile) -> None:
        """`f` could not be read (denied, network, corrupt): its unit is not recorded as synced."""
        unit = self._unit.get(self._key(f))
        if unit is not None:
            self.units.pop(unit, None)

    def __call__(self, f: InputFile) -> bool:
        key = self._key(f)
        if key not in self._decided:
            try:
                identity = input_unit(f, whole_partition=f.walked)
            except OSError:
                return True  # unreadable: read_records reports it with its reason
            if identity is None:
                return True  # stdin: always read
            unit, fingerprint = identity
            fingerprint = f"{fingerprint}:{self.config_hash}"
            self._decided[key] = self.full or not self.store.input_unchanged(unit, fingerprint)
            self._unit[key] = unit
            self.units[unit] = fingerprint
        if not self._decided[key]:
            self.unchanged += 1
        return self._decided[key]
