"""The state store (`--state FILE`): what Marketo confirmed, what is pending, which inputs were read.

SQLite in WAL mode, committed once per delivered batch, so a run killed at any moment (kill -9
included) loses at most the batches in flight: the next run re-sends only those.

Per lead key (a stamp is `[time, version]` in nanoseconds, see didomi/fold.py):
  confirmed     {field: [value, stamp]} Marketo last confirmed (created/updated)
  known         {field: [value, stamp]} the newest consent ever planned for the lead, whatever
                became of it (delivered, pending, skipped): an older record read later never
                overwrites it, and a lead Marketo skipped keeps its consent history
  pending       the payload of a lead that failed retryably (or was stopped by the quota):
                re-sent by the next sync even if no input mentions the lead again
  skipped_hash  hash of a payload Marketo skipped for a permanent reason (1004, 1006...):
                not re-sent until the lead's values change (1004/1007: until seen again)

States written before stamps had nanoseconds and versions hold bare seconds; they are read as
such (`stamp_from_json`), and a missing `known` column is added on the first write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from didomi_marketo.didomi.fold import NEVER, Stamp, compact_stamp, format_timestamp, stamp_from_json
from didomi_marketo.didomi.readers import InputFile
from didomi_marketo.errors import ConfigError, FatalError, LockHeld
from didomi_marketo.marketo.redact import redact
from didomi_marketo.outcomes import LeadOutcome, payload_hash
from didomi_marketo.plan import newest

SCHEMA = """
CREATE TABLE IF NOT EXISTS leads (
    key TEXT PRIMARY KEY,
    confirmed BLOB,
    confirmed_hash TEXT,
    confirmed_at REAL,
    pending BLOB,
    pending_reason TEXT,
    skipped_hash TEXT,
    skipped_code TEXT,
    skipped_reason TEXT,
    updated_at REAL NOT NULL,
    known BLOB
);
CREATE INDEX IF NOT EXISTS leads_pending ON leads(key) WHERE pending IS NOT NULL;
CREATE TABLE IF NOT EXISTS inputs (
    unit TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    synced_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB, at REAL);
CREATE TABLE IF NOT EXISTS bulk_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id INTEGER,
    lookup_field TEXT NOT NULL,
    rows BLOB NOT NULL,
    created_at REAL NOT NULL,
    submitted_at REAL
);
"""
BLOCK = 65536


@dataclass
class LeadState:
    key: str
    confirmed: dict[str, tuple[Any, Stamp]]
    confirmed_at: float | None
    pending: dict[str, Any] | None  # {"payload": {...}, "stamps": {field: stamp}}
    pending_reason: str | None
    skipped_hash: str | None
    skipped_code: str | None
    skipped_reason: str | None
    known_values: dict[str, tuple[Any, Stamp]]

    def known(self) -> dict[str, tuple[Any, Stamp]]:
        """The newest known consent per field: confirmed, planned (known) or pending, newest wins."""
        pending: dict[str, tuple[Any, Stamp]] = {}
        if self.pending:
            stamps = self.pending.get("stamps") or {}
            pending = {
                k: (v, stamp_from_json(stamps[k])) for k, v in self.pending["payload"].items() if k in stamps
            }
        return newest(self.confirmed, self.known_values, pending)


def _entries(blob: bytes | None) -> dict[str, tuple[Any, Stamp]]:
    return {k: (v[0], stamp_from_json(v[1])) for k, v in orjson.loads(blob).items()} if blob else {}


def _encode(entries: dict[str, tuple[Any, Stamp]]) -> bytes:
    return orjson.dumps({k: [v, compact_stamp(st)] for k, (v, st) in entries.items()})


def _merged(existing: bytes | None, fields: dict[str, Any], stamps: dict[str, Any],
            confirmed: bytes | None = None) -> bytes | None:  # fmt: skip
    """`existing` ({field: [value, stamp]}) with the newer of each field of `fields` merged in;
    None when that is exactly `confirmed` (the usual delivered lead: nothing to keep twice)."""
    merged = newest(_entries(existing), {k: (v, stamp_from_json(stamps[k])) for k, v in fields.items()})
    if confirmed is not None and merged == _entries(confirmed):
        return None
    return _encode(merged)


class StateStore:
    """Open with `StateStore(path)`; `close()` when done. One writer at a time (see `lock`)."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.unrecorded = 0  # outcomes the run could not write here (a full disk): not durable
        if readonly and not self.path.is_file():
            raise FatalError(f"{self.path}: no such state file")
        try:
            if readonly:  # inspect or plan without creating, migrating or locking anything
                # as_uri escapes what a URI would read as its own (`#`, `?`, `%`) in the path.
                uri = self.path.resolve().as_uri() + "?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                self.db.execute("SELECT 1 FROM leads LIMIT 1")
            else:
                self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each commit
                self.db.executescript(SCHEMA)
                columns = {r[1] for r in self.db.execute("PRAGMA table_info(leads)")}
                if "known" not in columns:  # a state written before skipped leads kept consent
                    self.db.execute("ALTER TABLE leads ADD COLUMN known BLOB")
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(leads)")}
            self._known_column = "known" if "known" in columns else "NULL"
        except sqlite3.Error as e:
            raise FatalError(f"{self.path}: not a usable didomi-marketo state file ({e})") from None

    def close(self) -> None:
        self.db.close()

    # -- planning (plan.ConfirmedState) ---------------------------------------------------------

    def lead(self, key: str) -> LeadState | None:
        row = self.db.execute(
            "SELECT key, confirmed, confirmed_at, pending, pending_reason, skipped_hash, skipped_code,"
            f" skipped_reason, {self._known_column} FROM leads WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        pending = orjson.loads(row[3]) if row[3] else None
        return LeadState(
            row[0], _entries(row[1]), row[2], pending, row[4], row[5], row[6], row[7], _entries(row[8])
        )

    def skipped_keys(self, codes: tuple[str, ...]) -> set[str]:
        """Leads Marketo last skipped with one of `codes` (for --recheck-skipped)."""
        marks = ", ".join("?" * len(codes))
        return {
            r[0] for r in self.db.execute(f"SELECT key FROM leads WHERE skipped_code IN ({marks})", codes)
        }

    def pending_keys(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM leads WHERE pending IS NOT NULL")}

    def pending_payloads(self, keys: set[str]) -> Iterator[tuple[str, dict[str, Any], dict[str, Stamp]]]:
        for key in sorted(keys):
            row = self.db.execute("SELECT pending FROM leads WHERE key = ?", (key,)).fetchone()
            if row and row[0]:
                rec = orjson.loads(row[0])
                stamps = {k: stamp_from_json(v) for k, v in (rec.get("stamps") or {}).items()}
                yield key, rec["payload"], stamps

    # -- outcomes (deliver.OutcomeSink): one transaction per batch ------------------------------

    def batch_done(self, outcomes: list[LeadOutcome]) -> None:
        """One transaction: the batch's rows read in one query, then each lead written. This runs
        for every batch of a delivery (in its bookkeeping thread), so each lead's stored consent
        is decoded once and nothing is merged twice."""
        now = time.time()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._rows([o.key for o in outcomes])  # key -> (confirmed, known)
            for o in outcomes:
                sent = {k: (v, stamp_from_json(o.stamps[k])) for k, v in o.payload.items() if k in o.stamps}
                row = rows.get(o.key)
                # Whatever became of the lead, the newest consent planned for it is kept.
                known_before = _entries((row[1] or row[0]) if row else None)
                merged = newest(known_before, sent)
                if o.delivered:
                    # `confirmed` is what Marketo now holds: what was sent, even if older.
                    entries = _entries(row[0]) if row else {}
                    entries.update(sent)
                    confirmed: bytes | None = _encode(entries)
                    known = None if merged == entries else _encode(merged)  # None: known is confirmed
                    values = {k: v[0] for k, v in entries.items()}
                    db.execute(
                        "INSERT INTO leads (key, confirmed, confirmed_hash, confirmed_at, updated_at, known)"
                        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET confirmed=excluded.confirmed,"
                        " confirmed_hash=excluded.confirmed_hash, confirmed_at=excluded.confirmed_at,"
                        " pending=NULL, pending_reason=NULL, skipped_hash=NULL, skipped_code=NULL,"
                        " skipped_reason=NULL, updated_at=excluded.updated_at, known=excluded.known",
                        (o.key, confirmed, payload_hash(values), now, now, known),
                    )
                else:
                    confirmed, known = (row[0] if row else None), _encode(merged)
                    if o.retryable:
                        stamps = {k: compact_stamp(stamp_from_json(v)) for k, v in o.stamps.items()}
                        pending = orjson.dumps({"payload": o.payload, "stamps": stamps})
                        db.execute(
                            "INSERT INTO leads (key, pending, pending_reason, updated_at, known)"
                            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET pending=excluded.pending,"
                            " pending_reason=excluded.pending_reason, updated_at=excluded.updated_at,"
                            " known=excluded.known",
                            (o.key, pending, redact(f"{o.code}: {o.reason}"), now, known),
                        )
                    else:
                        fields = {k: v for k, (v, _) in sent.items()}
                        db.execute(
                            "INSERT INTO leads (key, skipped_hash, skipped_code, skipped_reason, updated_at, known)"
                            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET pending=NULL,"
                            " pending_reason=NULL, skipped_hash=excluded.skipped_hash,"
                            " skipped_code=excluded.skipped_code, skipped_reason=excluded.skipped_reason,"
                            " updated_at=excluded.updated_at, known=excluded.known",
                            (o.key, payload_hash(fields), o.code, redact(o.reason), now, known),
                        )
                rows[o.key] = (confirmed, known)  # a key twice in one batch sees its first write
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk does): a second ROLLBACK would
            # raise "no transaction is active" and hide the real error (ENOSPC).
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _rows(self, keys: list[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
        """(confirmed, known) of each of `keys` the state holds, in queries of 500 keys."""
        found: dict[str, tuple[bytes | None, bytes | None]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            query = f"SELECT key, confirmed, known FROM leads WHERE key IN ({', '.join('?' * len(chunk))})"
            for key, confirmed, known in self.db.execute(query, chunk):
                found[key] = (confirmed, known)
        return found

    # -- bulk import jobs (deliver_bulk.JobJournal) ---------------------------------------------
    # A job is recorded with its leads before its upload starts, and gets its batch id as soon
    # as Marketo answers: a run killed while a job imports leaves it here for the next run to
    # collect, instead of uploading it again. The row goes once the job's outcomes are recorded.

    def bulk_intent(self, lookup_field: str, rows: bytes) -> int:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO bulk_jobs (lookup_field, rows, created_at) VALUES (?, ?, ?)",
                (lookup_field, zlib.compress(rows, 1), time.time()),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def bulk_submitted(self, job: int, batch_id: int) -> None:
        with self.db:
            self.db.execute(
                "UPDATE bulk_jobs SET batch_id = ?, submitted_at = ? WHERE id = ?",
                (batch_id, time.time(), job),
            )

    def bulk_done(self, job: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM bulk_jobs WHERE id = ?", (job,))

    def open_bulk_jobs(self) -> list[tuple[int, int | None, str, bytes]]:
        """(job, batch id or None, lookup field, the leads' rows) of each job not yet collected."""
        rows = self.db.execute(
            "SELECT id, batch_id, lookup_field, rows FROM bulk_jobs ORDER BY id"
        ).fetchall()
        return [(r[0], r[1], r[2], zlib.decompress(r[3])) for r in rows]

    # -- inputs already synced ------------------------------------------------------------------

    def input_unchanged(self, unit: str, fingerprint: str) -> bool:
        row = self.db.execute("SELECT fingerprint FROM inputs WHERE unit = ?", (unit,)).fetchone()
        return row is not None and row[0] == fingerprint

    def remember_known(self, leads: list[tuple[str, dict[str, Any], dict[str, Stamp]]]) -> None:
        """Merge newer stamps of values a run did not need to send (same values as Marketo has)
        into `known`: a later run must compare with the newest consent seen, not the newest sent
        (else an opt-in older than an unsent re-statement of an opt-out would win)."""
        db = self.db
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, fields, stamps in leads:
                row = db.execute("SELECT confirmed, known FROM leads WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    known = _merged(row[1] or row[0], fields, stamps, row[0])
                    db.execute("UPDATE leads SET known = ?, updated_at = ? WHERE key = ?", (known, now, key))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remember_inputs(self, units: dict[str, str]) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO inputs VALUES (?, ?, ?) ON CONFLICT(unit) DO UPDATE SET"
                " fingerprint=excluded.fingerprint, synced_at=excluded.synced_at",
                [(u, f, now) for u, f in units.items()],
            )

    # -- cached values (the describe of the online schema check) --------------------------------

    def cached(self, name: str, max_age: float) -> Any:
        row = self.db.execute("SELECT v, at FROM meta WHERE k = ?", (name,)).fetchone()
        if row is None or time.time() - row[1] > max_age:
            return None
        return orjson.loads(row[0])

    def cache(self, name: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v, at=excluded.at",
            (name, orjson.dumps(value), time.time()),
        )

    def bind_instance(self, base_url: str) -> None:
        """A state describes one Marketo instance: pointing it at another would send nothing."""
        row = self.db.execute("SELECT v FROM meta WHERE k = 'instance'").fetchone()
        if row is None:
            self.db.execute(
                "INSERT INTO meta VALUES ('instance', ?, ?)", (orjson.dumps(base_url), time.time())
            )
        elif orjson.loads(row[0]) != base_url:
            raise ConfigError(
                f"{self.path} records what {orjson.loads(row[0])} confirmed, not {base_url}: "
                "use one state file per Marketo instance"
            )

    # -- inspection (`state show|export`) -----------------------------------------------------

    def counts(self) -> dict[str, int]:
        one = self.db.execute(
            "SELECT COUNT(*), COUNT(confirmed), COUNT(pending), COUNT(skipped_hash) FROM leads"
        ).fetchone()
        inputs = self.db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0]
        jobs = self.db.execute("SELECT COUNT(*) FROM bulk_jobs").fetchone()[0] if self._has_jobs() else 0
        return {
            "leads": one[0], "confirmed": one[1], "pending": one[2], "skipped": one[3], "inputs": inputs,
            "bulk_jobs_open": jobs,
        }  # fmt: skip

    def _has_jobs(self) -> bool:
        """A state written before bulk import, opened read-only, has no bulk_jobs table."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'bulk_jobs'").fetchone() is not None

    def leads(self, pending_only: bool = False) -> Iterator[LeadState]:
        """Every lead of the state (or the pending ones), by key."""
        where = " WHERE pending IS NOT NULL" if pending_only else ""
        for (key,) in self.db.execute(f"SELECT key FROM leads{where} ORDER BY key").fetchall():
            lead = self.lead(key)
            assert lead is not None
            yield lead

    def export(self, pending_only: bool = False) -> Iterator[dict[str, Any]]:
        for lead in self.leads(pending_only):
            yield lead_record(lead)


def lead_record(lead: LeadState) -> dict[str, Any]:
    return {
        "key": lead.key,
        "confirmed": {k: v[0] for k, v in lead.confirmed.items()},
        "consent_timestamps": {k: _when(v[1]) for k, v in lead.confirmed.items()},
        "known": {k: v[0] for k, v in lead.known().items()},
        "confirmed_at": lead.confirmed_at,
        "pending": lead.pending["payload"] if lead.pending else None,
        "pending_reason": lead.pending_reason,
        "skipped": {"code": lead.skipped_code, "reason": lead.skipped_reason} if lead.skipped_hash else None,
    }


def _when(stamp: Stamp) -> str | None:
    """A stamp as people read it: its time (ISO 8601 UTC)."""
    return format_timestamp(stamp[0]) if stamp[0] not in (NEVER, 0) else None


# ---------------------------------------------------------------------------------------------
# Input identity: a file, or a whole export partition


def file_fingerprint(path: Path) -> str:
    """Size, mtime and a hash of the first and last 64 KiB: cheap, and catches rewrites."""
    st = path.stat()
    h = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(BLOCK))
        if st.st_size > BLOCK:
            f.seek(max(BLOCK, st.st_size - BLOCK))
            h.update(f.read(BLOCK))
    return h.hexdigest()


def input_unit(f: InputFile, whole_partition: bool = True) -> tuple[str, str] | None:
    """(unit, fingerprint) of an input: the partition for files inside one (when it is read
    whole), else the file. None for stdin."""
    if f.is_stream:
        return None
    if f.source is not None:  # cloud storage: identities from the listing (ETags), nothing read
        if f.partition and whole_partition and f.source.partition_fingerprint:
            return f.partition, f.source.partition_fingerprint
        return f.display, f.source.fingerprint
    if f.partition and whole_partition:
        part = Path(f.partition)
        files = sorted(p for p in part.rglob("*.json.gz") if p.is_file())
        h = hashlib.sha1()
        for p in files:
            h.update(f"{p.relative_to(part)}:{file_fingerprint(p)}\n".encode())
        return str(part.resolve()), h.hexdigest()
    return str(f.path.resolve()), file_fingerprint(f.path)


# ---------------------------------------------------------------------------------------------
# The lock: one run per state file


def make_state_folder(path: Path) -> None:
    """Create the folders up to the state file, private (0700: the state holds lead emails).

    A fresh server has no /var/lib/didomi-marketo: creating it here saves every cron recipe a
    mkdir step. An existing folder keeps its mode (the operator chose it)."""
    missing = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise FatalError(
                f"{path}: cannot create the state folder {folder} ({e.strerror}); "
                "create it, writable by the user running didomi-marketo, or choose another --state"
            ) from None


class StateLock:
    """An OS file lock next to the state (`STATE.lock`), holding the owner's pid and start time."""

    def __init__(self, state_path: str | Path):
        # Keyed on the resolved path: the same state reached through a symlink is one state.
        self.path = Path(str(Path(state_path).resolve()) + ".lock")
        self._fd: int | None = None

    def acquire(self, wait_seconds: float = 0.0) -> None:
        deadline = time.monotonic() + wait_seconds
        make_state_folder(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FatalError(f"{self.path}: cannot create the state lock: {e.strerror}") from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise LockHeld(
                        f"{self.path}: another run holds the state lock ({holder}); "
                        "use --wait-lock SECONDS to wait for it"
                    ) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {started}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def reset_state(path: str | Path, wait_lock: float = 0.0) -> None:
    """Delete the state (and SQLite's WAL files) under its lock: the next sync sends everything."""
    with StateLock(path) as lock:
        lock.acquire(wait_lock)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
