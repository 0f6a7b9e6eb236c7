"""A local Marketo-compatible REST server for tests, demos and benchmarks.

It mimics the parts of Marketo Engage this tool talks to -- Identity tokens, Sync Leads, Get Leads
by filter type, describe/describe2, usage stats, bulk lead import -- and the instance limits (sliding rate window,
concurrency, daily quota), with faults that can be injected on demand or at random. The behaviour
follows recorded real traffic (tests/fixtures/marketo) and Adobe's docs; where Marketo's behaviour
is unknown the choice is noted next to the code.

Only the standard library and orjson are used, so `didomi-marketo sandbox` runs anywhere.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import http.server
import io
import itertools
import math
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

__all__ = ["FAULT_KINDS", "MarketoSandbox", "SandboxConfig", "serve_forever"]

MAX_BODY_BYTES = 1_048_576  # Marketo answers HTTP 413 above 1 MB
BULK_PREFIX = "/bulk/"
MAX_BULK_FILE_BYTES = 10_485_760  # Adobe: a bulk import file must be under 10 MB
MAX_BULK_BODY_BYTES = MAX_BULK_FILE_BYTES + 65_536  # the file plus the multipart envelope
MAX_URI_BYTES = 8192  # ... and HTTP 414 above 8 KB
MAX_BATCH = 300
MAX_FILTER_RESULTS = 1000
# Adobe's filterType list for standard fields (SW-MAPI); custom fields: see _searchable.
SEARCHABLE_STANDARD = frozenset(
    {
        "id", "cookies", "email", "twitterId", "facebookId", "linkedInId", "sfdcAccountId",
        "sfdcContactId", "sfdcLeadId", "sfdcLeadOwnerId", "sfdcOpptyId", "leadPartitionId",
    }
)  # fmt: skip
JSON_TYPE = "application/json;charset=UTF-8"
SCOPE = "apiuser@sandbox.local"
TOKEN_PATH = "/identity/oauth/token"
LEADS_PATH = "/rest/v1/leads.json"
ACTIONS = ("createOnly", "updateOnly", "createOrUpdate", "createDuplicate")
DEFAULT_GET_FIELDS = ("id", "email", "updatedAt", "createdAt", "firstName", "lastName")
DESCRIBE_FILE = Path(__file__).parent / "data" / "describe.json"
# Marketo resets the daily quota at 12:00 AM "CST"; whether DST applies is unknown: fixed UTC-6.
QUOTA_TZ = dt.timezone(dt.timedelta(hours=-6))
FAULT_KINDS = (
    "code:NNN",
    "http:NNN",
    "drop",
    "drop_after_apply",
    "http500_after_apply",
    "garbage",
    "short_result",
    "slow:SECONDS",
)

_ERROR_TEXT = {
    "600": "Access token not specified",
    "601": "Access token invalid",
    "602": "Access token expired",
    "603": "Access denied",
    "604": "Request time-out",
    "605": "HTTP Method not supported",
    "607": "Daily quota reached",
    "608": "API Temporarily Unavailable",
    "609": "Invalid JSON",
    "610": "Requested resource not found",
    "611": "System error",
    "612": "Invalid Content Type",
    "613": "Invalid Multipart Request",
    "614": "Invalid Subscription",
    "616": "Invalid subscription type",
    "701": "Required parameter cannot be blank",
    "702": "No data found for given search scenario",
    "704": "Invalid date",
    "713": "Transient Error",
    "719": "Lock wait timeout exception",
    "1003": "Invalid data",
    "1013": "Object not found",
    "1016": "Too many imports",
    "1029": "Too many jobs in queue",
}


@dataclass
class SandboxConfig:
    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"
    token_ttl: float = 3600.0  # seconds a new token lives
    rate_calls: int = 100  # sliding window: at most rate_calls ...
    rate_window: float = 20.0  # ... per rate_window seconds, else 606
    max_concurrency: int = 10  # more calls in flight than this -> 615
    daily_quota: int = 50_000  # counted calls per day, beyond -> 607
    latency: float = 0.0  # seconds each REST call sleeps before answering (counted in flight)
    leads_file: str | None = None  # JSON array of lead objects to seed the store
    next_id: int = 1  # first id for created leads
    seed: int = 0  # for probabilistic faults
    # Bulk import: a job waits at least bulk_queued_seconds in Queued, then imports for
    # bulk_import_seconds plus its rows at bulk_rows_per_second (compress them for tests).
    bulk_queued_seconds: float = 1.0
    bulk_import_seconds: float = 2.0
    bulk_rows_per_second: float = 100_000.0
    bulk_max_queued: int = 10  # jobs queued, the importing ones included; beyond -> 1016
    bulk_max_importing: int = 2


# --------------------------------------------------------------------------------------------
# Responses


@dataclass
class _Resp:
    status: int = 200
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    drop: bool = False  # close the socket without answering


_DROP = _Resp(drop=True)
_GARBAGE = b'{"requestId":"0#0","result":[{"id":1,"status":"upd'  # truncated: not valid JSON
_NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))


def _json(status: int, doc: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Resp:
    return _Resp(status, orjson.dumps(doc), JSON_TYPE, headers)


def _html(status: int, close: bool = False) -> _Resp:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    text = (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return _Resp(status, text.encode(), "text/html", close=close)


def _trim_last_result(resp: _Resp) -> _Resp:
    """The `short_result` fault: the same answer with its last result entry missing."""
    try:
        doc = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return resp
    if isinstance(doc, dict) and isinstance(doc.get("result"), list) and doc["result"]:
        doc["result"].pop()
        return _json(resp.status, doc, resp.headers)
    return resp


# --------------------------------------------------------------------------------------------
# Faults


_FAULT_RE = re.compile(
    r"code:(?P<code>\d{3,4})|http:(?P<http>[1-5]\d\d)|slow:(?P<slow>\d+(?:\.\d+)?)"
    r"|(?P<plain>drop|drop_after_apply|http500_after_apply|garbage|short_result)"
)


@dataclass(frozen=True)
class _Fault:
    kind: str  # as given, e.g. "code:604"
    name: str  # code | http | slow | drop | drop_after_apply | ...
    arg: str = ""


def _parse_fault(kind: str) -> _Fault:
    m = _FAULT_RE.fullmatch(kind.strip()) if isinstance(kind, str) else None
    if m is None:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
    for name in ("code", "http", "slow"):
        if m.group(name) is not None:
            return _Fault(kind, name, m.group(name))
    return _Fault(kind, m.group("plain"))


# --------------------------------------------------------------------------------------------
# Field validation. Each coercer returns the value to store, or _INVALID.

_INVALID: Any = object()
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TEXT_MAX_BYTES = 30_000  # Adobe: text area <= 30,000 bytes


def _c_bool(v: Any, length: int | None) -> Any:
    if v is True or v is False:
        return v
    if isinstance(v, str):
        s = v.strip().lower()
        if s == "true":
            return True
        if s == "false":
            return False
    return _INVALID


def _c_int(v: Any, length: int | None) -> Any:
    if isinstance(v, bool):
        return _INVALID
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
        n = int(v)
    else:
        return _INVALID
    return n if -(2**31) <= n < 2**31 else _INVALID


def _c_float(v: Any, length: int | None) -> Any:
    if isinstance(v, bool):
        return _INVALID
    if not isinstance(v, int | float) and not (isinstance(v, str) and _FLOAT_RE.fullmatch(v)):
        return _INVALID
    f = float(v)
    return f if math.isfinite(f) else _INVALID


def _c_str(v: Any, length: int | None) -> Any:
    if isinstance(v, str):
        s = v
    elif isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, int | float):
        s = str(v)
    else:
        return _INVALID
    return _INVALID if length is not None and len(s) > length else s


def _c_text(v: Any, length: int | None) -> Any:
    s = _c_str(v, length)
    if s is not _INVALID and len(s.encode()) > _TEXT_MAX_BYTES:
        return _INVALID
    return s


def _c_email(v: Any, length: int | None) -> Any:
    if not isinstance(v, str) or not v.isascii() or not _EMAIL_RE.fullmatch(v.strip()):
        return _INVALID
    return _INVALID if length is not None and len(v) > length else v.strip()


def _c_datetime(v: Any, length: int | None) -> Any:
    if not isinstance(v, str) or not _DATE_RE.match(v.strip()):
        return _INVALID
    try:
        d = dt.datetime.fromisoformat(v.strip())
    except ValueError:
        return _INVALID
    if d.tzinfo is None:  # Marketo would use the instance time zone; the sandbox assumes UTC
        d = d.replace(tzinfo=dt.UTC)
    # Marketo reads datetimes back in UTC with second precision, e.g. "2021-11-23T22:57:08Z"
    return d.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _c_date(v: Any, length: int | None) -> Any:
    if not isinstance(v, str) or not _DATE_RE.fullmatch(v.strip()):
        return _INVALID
    try:
        return dt.date.fromisoformat(v.strip()).isoformat()
    except ValueError:
        return _INVALID


def _c_any(v: Any, length: int | None) -> Any:
    return _INVALID if isinstance(v, dict | list) else v


_COERCERS: dict[str, Callable[[Any, int | None], Any]] = {
    "boolean": _c_bool,
    "integer": _c_int,
    "percent": _c_int,
    "score": _c_int,
    "reference": _c_int,
    "float": _c_float,
    "currency": _c_float,
    "string": _c_str,
    "url": _c_str,
    "phone": _c_str,
    "text": _c_text,
    "textarea": _c_text,
    "email": _c_email,
    "datetime": _c_datetime,
    "date": _c_date,
}


def _coerce(meta: _FieldMeta, value: Any) -> Any:
    if value is None or (isinstance(value, str) and value == ""):
        return None  # null (or "") is always accepted and clears the field
    return _COERCERS.get(meta.data_type, _c_any)(value, meta.length)


def _show(v: Any) -> str:
    """A value as Marketo quotes it in 'Invalid value for field ... and value ...'."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return orjson.dumps(v).decode()


@dataclass(frozen=True)
class _FieldMeta:
    name: str
    data_type: str
    length: int | None
    read_only: bool


def _skip(code: str, message: str) -> dict[str, Any]:
    return {"status": "skipped", "reasons": [{"code": code, "message": message}]}


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(x: float) -> str:
    return f"{x:g}"


# --------------------------------------------------------------------------------------------
# Lead store


class _Store:
    """Leads by id, with lazily built per-field indexes (email matched case-insensitively)."""

    def __init__(self, next_id: int) -> None:
        self.leads: dict[int, dict[str, Any]] = {}
        self.next_id = next_id
        self._idx: dict[str, dict[Any, set[int]]] = {"email": {}}

    @staticmethod
    def key(field_name: str, value: Any) -> Any:
        if value is None:
            return None
        if field_name == "email" and isinstance(value, str):
            return value.strip().lower()
        try:
            hash(value)
        except TypeError:
            return None
        return value

    def _index(self, field_name: str) -> dict[Any, set[int]]:
        idx = self._idx.get(field_name)
        if idx is None:
            idx = {}
            for lid, lead in self.leads.items():
                k = self.key(field_name, lead.get(field_name))
                if k is not None:
                    idx.setdefault(k, set()).add(lid)
            self._idx[field_name] = idx
        return idx

    def _unindex(self, lid: int, lead: Mapping[str, Any], names: Iterable[str]) -> None:
        for name in names:
            idx = self._idx.get(name)
            k = self.key(name, lead.get(name))
            if idx is not None and k is not None and k in idx:
                idx[k].discard(lid)
                if not idx[k]:
                    del idx[k]

    def _reindex(self, lid: int, lead: Mapping[str, Any], names: Iterable[str]) -> None:
        for name in names:
            idx = self._idx.get(name)
            k = self.key(name, lead.get(name))
            if idx is not None and k is not None:
                idx.setdefault(k, set()).add(lid)

    def find(self, field_name: str, value: Any) -> list[int]:
        if field_name == "id":
            return [value] if value in self.leads else []
        k = self.key(field_name, value)
        if k is None:
            return []
        return sorted(self._index(field_name).get(k, ()))

    def insert(self, lead: dict[str, Any], now: str) -> int:
        lead = dict(lead)
        lid = lead.pop("id", None)
        if lid is None:
            lid = self.next_id
        if not isinstance(lid, int) or isinstance(lid, bool) or lid in self.leads:
            raise ValueError(f"bad or duplicate lead id {lid!r}")
        self.next_id = max(self.next_id, lid + 1)
        stored = {"id": lid, **lead}
        stored.setdefault("createdAt", now)
        stored.setdefault("updatedAt", now)
        self.leads[lid] = stored
        self._reindex(lid, stored, list(self._idx))
        return lid

    def update(self, lid: int, changes: Mapping[str, Any], now: str) -> None:
        lead = self.leads[lid]
        names = [n for n in changes if n != "id"] + ["updatedAt"]
        self._unindex(lid, lead, names)
        for name in names[:-1]:
            lead[name] = changes[name]
        lead["updatedAt"] = now
        self._reindex(lid, lead, names)

    def delete(self, lid: int) -> bool:
        lead = self.leads.get(lid)
        if lead is None:
            return False
        self._unindex(lid, lead, list(self._idx))
        del self.leads[lid]
        return True

    def clone(self) -> _Store:
        other = _Store(self.next_id)
        other.leads = {lid: dict(lead) for lid, lead in self.leads.items()}
        other._idx = {}
        other._index("email")
        return other


# --------------------------------------------------------------------------------------------
# Bulk import jobs

BULK_LEADS_PATH = "/bulk/v1/leads.json"
_BULK_BATCH_RE = re.compile(r"/bulk/v1/leads/batch/(?P<id>\d{1,12})(?:/(?P<file>failures|warnings))?\.json")
_BULK_DELIMITERS = {"csv": ",", "tsv": "\t", "ssv": ";"}


@dataclass
class _BulkJob:
    lookup: str
    fmt: str
    header: list[str]
    rows: list[list[str]]
    fail_message: str | None = None  # the whole job fails (status Failed) with this message
    batch_id: int = 0
    list_id: str | None = None  # accepted; static lists are not modelled
    partition: str | None = None  # accepted; partitions are not modelled
    start: float = 0.0  # monotonic time it leaves Queued
    finish: float = 0.0  # ... and ends Importing
    applied: bool = False
    processed: int = 0
    failures: list[tuple[list[str], str]] = field(default_factory=list)
    warnings: list[tuple[list[str], str]] = field(default_factory=list)

    def message(self) -> str:
        n = self.processed
        text = f"Import succeeded, {n} records imported ({n} members)"
        if self.failures:
            text = f"Import completed with errors, {n} records imported ({n} members), {len(self.failures)} failed"
        if self.warnings:
            text += f", {len(self.warnings)} warning" + ("s" if len(self.warnings) > 1 else "")
        return text + ("." if self.warnings else "")


def _parse_bulk_file(data: bytes, fmt: str, lookup: str, fields: Mapping[str, _FieldMeta]) -> _BulkJob:
    """The job for an uploaded file. A file Marketo could not import at all (not UTF-8, no header,
    an unknown or read-only column, no lookup column) still makes a job, which ends Failed."""
    job = _BulkJob(lookup, fmt, [], [])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        job.fail_message = "Import failed: the file is not valid UTF-8"
        return job
    try:
        table = list(csv.reader(io.StringIO(text, newline=""), delimiter=_BULK_DELIMITERS[fmt]))
    except csv.Error as e:
        job.fail_message = f"Import failed: unreadable file ({e})"
        return job
    if not table or not any(table[0]):
        job.fail_message = "Import failed: the file has no header row"
        return job
    job.header = [h.strip() for h in table[0]]
    job.rows = [row for row in table[1:] if row]
    for name in job.header:
        meta = fields.get(name)
        if meta is None:
            job.fail_message = f"Import failed: field '{name}' not found"
        elif meta.read_only and name != "id":
            job.fail_message = f"Import failed: field '{name}' is read only"
        if job.fail_message:
            return job
    if lookup not in job.header:
        job.fail_message = f"Import failed: the lookup field '{lookup}' is not a column of the file"
    return job


_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_DISPOSITION_RE = re.compile(r"^content-disposition:(.*)$", re.IGNORECASE | re.MULTILINE)
_NAME_RE = re.compile(r'(?:^|;)\s*name="([^"]*)"')
_FILENAME_RE = re.compile(r'(?:^|;)\s*filename="([^"]*)"')


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """multipart/form-data parts by name: (filename, bytes); None when the body is malformed.

    Split on the boundary by hand: the email package takes seconds over a 10 MB file."""
    m = _BOUNDARY_RE.search(content_type)
    if m is None:
        return None
    chunks = body.split(b"--" + m.group(1).encode("latin-1"))
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        return None
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:-1]:
        head, sep, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = _DISPOSITION_RE.search(head.decode("latin-1"))
        name = _NAME_RE.search(disposition.group(1)) if disposition else None
        if not sep or name is None or not data.endswith(b"\r\n"):
            return None
        filename = _FILENAME_RE.search(disposition.group(1)) if disposition else None
        parts[name.group(1)] = (filename.group(1) if filename else None, data[:-2])
    return parts


# --------------------------------------------------------------------------------------------
# The sandbox


@dataclass
class _SyncRequest:
    action: str
    lookup: str
    input: list[Any]
    keys: set[tuple[str, Any]]


@dataclass
class _Call:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    seq: int
    prepared: _SyncRequest | _Resp | None = None
    keys: set[tuple[str, Any]] = field(default_factory=set)


def _ok_after(action: Callable[[], None]) -> dict[str, Any]:
    action()
    return {"ok": True}


def _q(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None


def _media_type(headers: Any) -> str:
    return str(headers.get("Content-Type") or "").split(";")[0].strip().lower()


class MarketoSandbox:
    """A Marketo-compatible server on 127.0.0.1, run in background threads.

    >>> with MarketoSandbox(SandboxConfig(latency=0.1)) as sb:
    ...     client = Client(sb.base_url + "/rest", sb.base_url + "/identity", ...)
    """

    def __init__(self, config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SandboxConfig()
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        describe = orjson.loads(DESCRIBE_FILE.read_bytes())
        self._describe: list[dict[str, Any]] = describe["result"]
        self._fields: dict[str, _FieldMeta] = {
            f["rest"]["name"]: _FieldMeta(
                f["rest"]["name"], f["dataType"], f.get("length"), bool(f["rest"]["readOnly"])
            )
            for f in self._describe
            if "rest" in f
        }
        # Custom fields: describe ids from 795 on (the recorded instance's test fields and the
        # sample's didomi* fields), except the standard `ecids`.
        self._custom = {f["rest"]["name"] for f in self._describe if "rest" in f and f["id"] >= 795} - {
            "ecids"
        }
        self._store = _Store(self.config.next_id)
        self._routes = self._route_table()
        if self.config.leads_file:
            self.seed_leads(orjson.loads(Path(self.config.leads_file).read_bytes()))
        # auth
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._current_token: str | None = None
        # limits
        self._window: deque[float] = deque()
        self._in_flight = 0
        self._quota_day = self._today()
        self._quota_used = 0
        self._usage: dict[str, int] = {}
        # faults
        self._queued: list[list[Any]] = []  # [fault, path, remaining]
        self._rates: dict[str, tuple[_Fault, float]] = {}
        self._rng = random.Random(self.config.seed)
        self._rid_rng = random.Random()
        self._seq = itertools.count(1)
        self._key_counts: dict[tuple[str, Any], int] = {}
        self._batches: list[tuple[int, int]] = []
        self._counters = dict.fromkeys(
            (
                "calls_total",
                "identity_calls",
                "sync_calls",
                "delete_calls",
                "get_leads_calls",
                "get_leads_post_calls",
                "describe_calls",
                "max_in_flight_seen",
                "rate_limited",
                "concurrency_limited",
                "quota_exceeded",
                "auth_errors",
                "tokens_issued",
                "same_key_overlaps",
                "faults_injected",
                "internal_errors",
                "bulk_uploads",
                "bulk_status_calls",
                "bulk_file_calls",
                "bulk_too_many_imports",
            ),
            0,
        )
        self.last_internal_error: str | None = None
        # bulk import: jobs by batch id, and when each of the importing slots is next free
        self._jobs: dict[int, _BulkJob] = {}
        self._job_ids = itertools.count(1001)
        self.bulk_clock: Callable[[], float] = time.monotonic  # tests may drive it by hand
        self._slots_free = [0.0] * max(1, self.config.bulk_max_importing)
        self._last_start = 0.0
        # server
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._connections_total = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> MarketoSandbox:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"marketo-sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes calls sleeping for latency; they drop without applying
        server.shutdown()
        server.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:  # keep-alive connections would otherwise outlive the server
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> MarketoSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("sandbox not started")
        return f"http://{self.host}:{self.port}"

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
                self._connections_total += 1
            else:
                self._conns.discard(conn)

    # ---- inspection and control ----------------------------------------------------------------

    def leads(self) -> list[dict[str, Any]]:
        with self._lock:
            self._advance_bulk()
            return [dict(self._store.leads[lid]) for lid in sorted(self._store.leads)]

    def lead_by_email(self, email: str) -> dict[str, Any] | None:
        with self._lock:
            self._advance_bulk()
            ids = self._store.find("email", email)
            return dict(self._store.leads[ids[0]]) if ids else None

    def seed_leads(self, leads: Iterable[Mapping[str, Any]]) -> list[int]:
        """Store leads as given (no validation; duplicates allowed, e.g. for 1007 tests)."""
        now = _now_iso()
        with self._lock:
            out = []
            for lead in leads:
                if not isinstance(lead, Mapping):
                    raise ValueError(f"a lead must be an object, not {lead!r}")
                out.append(self._store.insert(dict(lead), now))
            return out

    def inject(self, kind: str, times: int = 1, *, path: str = LEADS_PATH) -> None:
        fault = _parse_fault(kind)
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._queued.append([fault, path, int(times)])

    def inject_rate(self, kind: str, probability: float) -> None:
        fault = _parse_fault(kind)
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        with self._lock:
            if probability == 0:
                self._rates.pop(fault.kind, None)
            else:
                self._rates[fault.kind] = (fault, probability)

    def clear_faults(self) -> None:
        with self._lock:
            self._queued.clear()
            self._rates.clear()

    def reset_quota(self) -> None:
        with self._lock:
            self._quota_used = 0

    def expire_tokens(self) -> None:
        """Expire every issued token now (the next REST call with one gets 602)."""
        with self._lock:
            past = time.monotonic() - 1
            for tok in self._tokens:
                self._tokens[tok] = past

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._advance_bulk()
            out: dict[str, Any] = dict(self._counters)
            out["bulk_jobs"] = len(self._jobs)
            out["sync_batch_sizes"] = [size for _, size in sorted(self._batches)]
            out["in_flight"] = self._in_flight
            out["leads"] = len(self._store.leads)
            out["quota_used"] = self._quota_used
            out["faults_pending"] = sum(q[2] for q in self._queued)
        with self._conns_lock:
            out["connections_total"] = self._connections_total
        return out

    # ---- request entry point (called from handler threads) --------------------------------

    def _handle(self, method: str, target: str, headers: Any, body: bytes | None) -> _Resp:
        try:
            parts = urlsplit(target)
            path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
            if path.startswith("/_sandbox/"):
                return self._admin(method, path, body or b"")
            if path == "/identity" or path.startswith("/identity/"):
                return self._identity(method, path, query, headers, body)
            with self._lock:  # bulk jobs due by now apply before this call sees the store
                self._advance_bulk()
            if path == "/rest" or path.startswith("/rest/") or path.startswith(BULK_PREFIX):
                return self._rest(method, target, path, query, headers, body)
            return _html(404)
        except Exception:
            with self._lock:
                self._counters["internal_errors"] += 1
                self.last_internal_error = traceback.format_exc()
            return self._error("611")

    # ---- admin -------------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> _Resp:
        routes: dict[str, dict[str, Callable[[], Any]]] = {
            "/_sandbox/leads": {"GET": self.leads, "PATCH": lambda: self.edit_leads(orjson.loads(body))},
            "/_sandbox/stats": {"GET": self.stats},
            "/_sandbox/faults": {"POST": lambda: self._admin_faults(body)},
            "/_sandbox/reset-quota": {"POST": lambda: _ok_after(self.reset_quota)},
            "/_sandbox/expire-tokens": {"POST": lambda: _ok_after(self.expire_tokens)},
        }
        route = routes.get(path)
        if route is None:
            return _json(404, {"error": f"unknown sandbox endpoint {path}"})
        if method not in route:
            return _json(405, {"error": f"use {' or '.join(route)} for {path}"})
        try:
            return _json(200, route[method]())
        except orjson.JSONDecodeError as exc:
            return _json(400, {"error": f"the body is not JSON: {exc}"})
        except (ValueError, TypeError, KeyError) as exc:
            return _json(400, {"error": str(exc)})

    def _admin_faults(self, body: bytes) -> dict[str, Any]:
        doc = orjson.loads(body or b"{}")
        if not isinstance(doc, dict) or "kind" not in doc:
            raise ValueError('expected {"kind", "times"} or {"kind", "probability"}')
        if "probability" in doc:
            self.inject_rate(doc["kind"], float(doc["probability"]))
        else:
            self.inject(doc["kind"], int(doc.get("times", 1)), path=doc.get("path", LEADS_PATH))
        return {"ok": True}

    # ---- identity ----------------------------------------------------------------------------

    def _identity(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Any,
        body: bytes | None,
    ) -> _Resp:
        with self._lock:
            self._counters["identity_calls"] += 1
            fault = self._take_fault(path, is_sync=False)
        if body is None:
            return _html(413, close=True)
        if path != TOKEN_PATH:
            return _html(404)
        if method not in ("GET", "POST"):
            return _html(405)
        if fault is not None and fault.name == "slow" and self._stopping.wait(float(fault.arg)):
            return _DROP
        return self._with_fault(fault, lambda _dry: self._token(method, query, headers, body))

    def _token(self, method: str, query: dict[str, list[str]], headers: Any, body: bytes | None) -> _Resp:
        params = dict(query)
        if method == "POST" and body and _media_type(headers) == "application/x-www-form-urlencoded":
            for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items():
                params.setdefault(k, v)
        cid, secret = _q(params, "client_id"), _q(params, "client_secret")
        if cid != self.config.client_id or secret != self.config.client_secret:
            doc = {"error": "invalid_client", "error_description": "Bad client credentials"}
            return _json(401, doc, _NO_STORE)
        grant = _q(params, "grant_type")
        if grant != "client_credentials":
            err = (
                ("invalid_request", "Missing grant type")
                if not grant
                else (
                    "unsupported_grant_type",
                    f"Unsupported grant type: {grant}",
                )
            )
            return _json(400, {"error": err[0], "error_description": err[1]}, _NO_STORE)
        with self._lock:
            now = time.monotonic()
            tok = self._current_token
            fresh = tok is None or self._tokens[tok] <= now
            if fresh:
                tok = f"{uuid.uuid4()}:sb"
                self._tokens[tok] = now + self.config.token_ttl
                self._current_token = tok
                self._counters["tokens_issued"] += 1
            assert tok is not None
            # Whole seconds left, rounded down: a fresh 3600 s token reads 3599 as recorded, and
            # the last second reads 0 (seen in the wild). A fresh token never reads 0, though,
            # so a tiny token_ttl in tests does not look expired for its whole life.
            left = math.ceil(round(self._tokens[tok] - now, 3))
            remaining = max(1 if fresh else 0, left - 1)
        token = {
            "access_token": tok,
            "token_type": "bearer",
            "expires_in": remaining,
            "scope": SCOPE,
        }
        return _json(200, token, _NO_STORE)

    # ---- REST pipeline ---------------------------------------------------------------------

    def _rest(
        self,
        method: str,
        target: str,
        path: str,
        query: dict[str, list[str]],
        headers: Any,
        body: bytes | None,
    ) -> _Resp:
        with self._lock:
            self._counters["calls_total"] += 1
        if body is None:  # the gateway rejects big bodies before anything else
            return _html(413, close=True)
        if len(target) > MAX_URI_BYTES:
            return _html(414)

        code = self._check_token(self._token_from(headers, query))
        if code is not None:
            return self._error(code)

        override = _q(query, "_method")
        effective = override.upper() if method == "POST" and override else method
        routes = self._routes.get(path) or self._bulk_routes(path)
        if routes is None:
            return self._error("610")
        handler = routes.get(effective)
        if handler is None:
            return self._error("605")
        is_sync = path == LEADS_PATH and effective == "POST"

        with self._lock:
            limited = self._admit()
            if limited is not None:
                return self._error(*limited)
            call = _Call(effective, path, query, headers, body, next(self._seq))
            fault = self._take_fault(path, is_sync, effective)

        admitted = time.monotonic()
        try:
            if is_sync:
                call.prepared = self._prepare_sync(call)
                if isinstance(call.prepared, _SyncRequest):
                    self._register_keys(call, call.prepared.keys)
            # A `slow:S` fault holds the call before it is applied (kill tests rely on it).
            extra = float(fault.arg) if fault is not None and fault.name == "slow" else 0.0
            if extra > 0 and self._stopping.wait(extra):
                return _DROP
            resp = self._with_fault(fault, lambda dry: handler(call, dry))
            # `latency` is the whole service time of a call, validation and apply included, so
            # a benchmark against it measures the client, not this server's Python overhead.
            remaining = self.config.latency - (time.monotonic() - admitted - extra)
            if remaining > 0 and self._stopping.wait(remaining):
                return _DROP
            return resp
        finally:
            with self._lock:
                self._in_flight -= 1
                for key in call.keys:
                    n = self._key_counts[key] - 1
                    if n:
                        self._key_counts[key] = n
                    else:
                        del self._key_counts[key]

    def _route_table(self) -> dict[str, dict[str, Callable[[_Call, bool], _Resp]]]:
        return {
            LEADS_PATH: {"GET": self._get_leads, "POST": self._sync, "DELETE": self._delete},
            "/rest/v1/leads/delete.json": {"POST": self._delete},
            "/rest/v1/leads/describe.json": {"GET": self._describe_v1},
            "/rest/v1/leads/describe2.json": {"GET": self._describe_v2},
            "/rest/v1/stats/usage.json": {"GET": self._usage_stats},
        }

    @staticmethod
    def _token_from(headers: Any, query: dict[str, list[str]]) -> str | None:
        auth = headers.get("Authorization")
        if auth:
            scheme, _, value = str(auth).strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        return _q(query, "access_token") or None  # deprecated, still accepted

    def _check_token(self, token: str | None) -> str | None:
        with self._lock:
            if token is None:
                code: str | None = "600"
            elif token not in self._tokens:
                code = "601"
            elif self._tokens[token] <= time.monotonic():
                code = "602"
            else:
                code = None
            if code is not None:
                self._counters["auth_errors"] += 1
            return code

    @staticmethod
    def _today() -> str:
        return dt.datetime.now(QUOTA_TZ).date().isoformat()

    def _admit(self) -> tuple[str, str] | None:
        """Concurrency, then rate, then quota. Must hold the lock. Accepts the call if none hit."""
        cfg, now, c = self.config, time.monotonic(), self._counters
        if self._in_flight + 1 > cfg.max_concurrency:
            c["concurrency_limited"] += 1
            return "615", f"Concurrent access limit '{cfg.max_concurrency}' reached"
        cutoff = now - cfg.rate_window
        while self._window and self._window[0] <= cutoff:
            self._window.popleft()
        if len(self._window) >= cfg.rate_calls:
            c["rate_limited"] += 1
            return "606", self._rate_message()
        today = self._today()
        if today != self._quota_day:
            self._quota_day, self._quota_used = today, 0
        if self._quota_used >= cfg.daily_quota:
            c["quota_exceeded"] += 1
            return "607", "Daily quota reached"
        self._in_flight += 1
        c["max_in_flight_seen"] = max(c["max_in_flight_seen"], self._in_flight)
        self._window.append(now)
        self._quota_used += 1
        self._usage[today] = self._usage.get(today, 0) + 1
        return None

    def _take_fault(self, path: str, is_sync: bool, method: str = "") -> _Fault | None:
        """The next queued fault matching this call, else a random one (sync calls only).
        A fault queued for `"GET /rest/v1/leads.json"` hits Get Leads by filter (reconcile).

        Must hold the lock."""
        for i, entry in enumerate(self._queued):
            fault, fpath, _ = entry
            if (fpath == path and (path != LEADS_PATH or is_sync)) or fpath == f"{method} {path}":
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._queued[i]
                self._counters["faults_injected"] += 1
                return fault  # type: ignore[no-any-return]
        if is_sync:
            for fault, probability in self._rates.values():
                if self._rng.random() < probability:
                    self._counters["faults_injected"] += 1
                    return fault
        return None

    def _with_fault(self, fault: _Fault | None, compute: Callable[[bool], _Resp]) -> _Resp:
        if fault is None or fault.name == "slow":
            return compute(False)
        name = fault.name
        if name == "code":
            return self._error(fault.arg)
        if name == "http":
            return _html(int(fault.arg))
        if name == "drop":
            return _DROP
        if name == "garbage":
            return _Resp(200, _GARBAGE)
        if name == "short_result":
            return _trim_last_result(compute(True))
        resp = compute(False)
        if name == "drop_after_apply":
            return _DROP
        if name == "http500_after_apply":
            return _html(500)
        return resp

    def _register_keys(self, call: _Call, keys: set[tuple[str, Any]]) -> None:
        with self._lock:
            if any(k in self._key_counts for k in keys):
                self._counters["same_key_overlaps"] += 1
            for k in keys:
                self._key_counts[k] = self._key_counts.get(k, 0) + 1
            call.keys = keys

    # ---- response helpers ------------------------------------------------------------------

    def _request_id(self) -> str:
        return f"{self._rid_rng.getrandbits(16):x}#{int(time.time() * 1000):x}"

    def _error(self, code: str, message: str | None = None) -> _Resp:
        if message is None:
            if code == "606":
                message = self._rate_message()
            elif code == "615":
                message = f"Concurrent access limit '{self.config.max_concurrency}' reached"
            else:
                message = _ERROR_TEXT.get(code, f"Error {code}")
        doc = {
            "requestId": self._request_id(),
            "success": False,
            "errors": [{"code": code, "message": message}],
        }
        return _json(200, doc)

    def _rate_message(self) -> str:
        cfg = self.config
        return f"Max rate limit '{cfg.rate_calls}' exceeded with in '{_num(cfg.rate_window)}' secs"

    def _ok(self, result: list[Any], **extra: Any) -> _Resp:
        return _json(200, {"requestId": self._request_id(), "result": result, **extra, "success": True})

    # ---- Sync Leads --------------------------------------------------------------------------

    def _prepare_sync(self, call: _Call) -> _SyncRequest | _Resp:
        """Request-level checks of a Sync Leads body; the keys feed same_key_overlaps."""
        if _media_type(call.headers) != "application/json":
            return self._error("612")
        try:
            doc = orjson.loads(call.body)
        except orjson.JSONDecodeError:
            return self._error("609")
        if not isinstance(doc, dict):
            return self._error("609")
        action = doc.get("action") or "createOrUpdate"
        if action not in ACTIONS:
            return self._error(
                "1003", f"Invalid action '{_show(action)}', expected one of {', '.join(ACTIONS)}"
            )
        lookup = doc.get("lookupField") or "email"
        if not isinstance(lookup, str) or lookup not in self._fields:
            return self._error("1006", f"Lookup field '{_show(lookup)}' not found")
        records = doc.get("input")
        if not isinstance(records, list) or not records:
            return self._error("1003", "Invalid data: 'input' must be a non-empty array of leads")
        if len(records) > MAX_BATCH:
            return self._error(
                "1003", f"Too many records in input: {len(records)}, the maximum is {MAX_BATCH}"
            )
        keys = set()
        for rec in records:
            if isinstance(rec, dict):
                k = _Store.key(lookup, rec.get(lookup))
                if k is not None and k != "":
                    keys.add((lookup, k))
        return _SyncRequest(action, lookup, records, keys)

    def _sync(self, call: _Call, dry_run: bool) -> _Resp:
        req = call.prepared
        if not isinstance(req, _SyncRequest):
            return req if isinstance(req, _Resp) else self._error("611")
        with self._lock:
            store = self._store.clone() if dry_run else self._store
            now = _now_iso()
            results = [self._sync_one(rec, req, store, now) for rec in req.input]
            if not dry_run:
                self._counters["sync_calls"] += 1
                self._batches.append((call.seq, len(req.input)))
        return self._ok(results)

    def _sync_one(self, rec: Any, req: _SyncRequest, store: _Store, now: str) -> dict[str, Any]:
        if not isinstance(rec, dict):
            return _skip("1003", "Invalid data")
        lookup, action = req.lookup, req.action
        if lookup == "id" and action != "updateOnly":
            return _skip("1003", "Invalid data")  # Adobe: id only with updateOnly
        raw_key = rec.get(lookup)
        if raw_key is None or raw_key == "":
            return _skip("1003", f"Value for lookup field '{lookup}' not specified")
        changes: dict[str, Any] = {}
        for name, value in rec.items():
            meta = self._fields.get(name)
            if meta is None:
                return _skip("1006", f"Field '{name}' not found")
            if meta.read_only:
                return _skip("1003", f"Field '{name}' is read only")
            coerced = _coerce(meta, value)
            if coerced is _INVALID:
                return _skip("1003", f"Invalid value for field '{name}' and value '{_show(value)}'")
            changes[name] = coerced
        # `id` is system managed: it only selects a lead (lookupField id), it is never written.
        if lookup != "id":
            changes.pop("id", None)
        if action == "createDuplicate":
            return {"id": store.insert(changes, now), "status": "created"}
        matches = store.find(lookup, changes[lookup])
        if action == "createOnly":
            if matches:
                return _skip("1005", "Lead already exists")
            return {"id": store.insert(changes, now), "status": "created"}
        if len(matches) > 1:
            return _skip("1007", "Multiple lead match lookup criteria")
        if not matches:
            if action == "updateOnly":
                return _skip("1004", "Lead not found")
            return {"id": store.insert(changes, now), "status": "created"}
        store.update(matches[0], changes, now)
        return {"id": matches[0], "status": "updated"}

    # ---- Delete Leads ------------------------------------------------------------------------

    def _delete(self, call: _Call, dry_run: bool) -> _Resp:
        ids: list[Any]
        if call.body:
            if _media_type(call.headers) != "application/json":
                return self._error("612")
            try:
                doc = orjson.loads(call.body)
            except orjson.JSONDecodeError:
                return self._error("609")
            records = doc.get("input") if isinstance(doc, dict) else None
            if not isinstance(records, list) or not records:
                return self._error("1003", "Invalid data: 'input' must be a non-empty array")
            ids = [r.get("id") if isinstance(r, dict) else None for r in records]
        else:
            raw = ",".join(call.query.get("id", []))
            ids = [_c_int(s, None) for s in raw.split(",") if s.strip()]
            if not ids:
                return self._error("1003", "Invalid data: no lead ids given")
        if len(ids) > MAX_BATCH:
            return self._error("1003", f"Too many records: {len(ids)}, the maximum is {MAX_BATCH}")
        results: list[dict[str, Any]] = []
        with self._lock:
            store = self._store.clone() if dry_run else self._store
            for lid in ids:
                if not isinstance(lid, int) or isinstance(lid, bool):
                    results.append(_skip("1003", "Invalid data"))
                elif store.delete(lid):
                    results.append({"id": lid, "status": "deleted"})
                else:
                    results.append(_skip("1004", "Lead not found"))
            if not dry_run:
                self._counters["delete_calls"] += 1
        return self._ok(results)

    # ---- Get Leads by filter type ------------------------------------------------------------
    # Adobe (leads.md "Query"): `filterValues` takes up to 300 values; more than 1,000 matching
    # leads is 1003 "Too many results match the filter"; a URI over 8 KB is HTTP 414, so long
    # queries are sent as POST ?_method=GET with the query string as a form body. `filterType`
    # takes the searchable standard fields and custom fields of type string, email or integer;
    # another standard field is 1011 "Field '%s' not supported" (error-codes.md).

    def _get_leads(self, call: _Call, dry_run: bool) -> _Resp:
        params = dict(call.query)
        via_post = call.body and _media_type(call.headers) == "application/x-www-form-urlencoded"
        if via_post:  # POST ?_method=GET with the parameters in a form body (for long URIs)
            for k, v in parse_qs(call.body.decode("utf-8", "replace")).items():
                params.setdefault(k, v)
        with self._lock:
            self._counters["get_leads_calls"] += 1
            self._counters["get_leads_post_calls"] += bool(via_post)
        filter_type = _q(params, "filterType")
        if not filter_type:
            return self._error("1003", "filterType not specified")
        meta = self._fields.get(filter_type)
        if meta is None:
            return self._error("1003", f"Invalid filterType '{filter_type}'")
        if not self._searchable(meta):
            return self._error("1011", f"Field '{filter_type}' not supported")
        values = [v.strip() for v in (_q(params, "filterValues") or "").split(",") if v.strip()]
        if not values:
            return self._error("1003", "filterValues not specified")
        if len(values) > MAX_BATCH:
            return self._error("1003", f"Too many filterValues: {len(values)} (max {MAX_BATCH})")
        fields_param = _q(params, "fields")
        names = [f.strip() for f in fields_param.split(",") if f.strip()] if fields_param else []
        names = names or list(DEFAULT_GET_FIELDS)
        for name in names:
            if name not in self._fields:
                return self._error("1006", f"Field '{name}' not found")
        names = ["id", *[n for n in names if n != "id"]]
        try:
            batch = int(_q(params, "batchSize") or MAX_BATCH)
            offset = int((_q(params, "nextPageToken") or "SB0")[2:])
        except ValueError:
            return self._error("1003", "Invalid batchSize or nextPageToken")
        if not 1 <= batch <= MAX_BATCH or offset < 0:
            return self._error("1003", "Invalid batchSize or nextPageToken")
        with self._lock:
            store = self._store
            if filter_type == "email":
                found = {lid for v in values for lid in store.find("email", v)}
            elif filter_type == "id":
                found = {n for v in values if (n := _c_int(v, None)) in store.leads}
            else:
                wanted = set(values)
                found = {
                    lid
                    for lid, lead in store.leads.items()
                    if lead.get(filter_type) is not None and _show(lead[filter_type]) in wanted
                }
            if len(found) > MAX_FILTER_RESULTS:
                return self._error("1003", "Too many results match the filter")
            ordered = sorted(found)
            rows = [{n: store.leads[lid].get(n) for n in names} for lid in ordered[offset : offset + batch]]
        extra = {"nextPageToken": f"SB{offset + batch}"} if offset + batch < len(ordered) else {}
        return self._ok(rows, **extra)

    def _searchable(self, meta: _FieldMeta) -> bool:
        return meta.name in SEARCHABLE_STANDARD or (
            meta.name in self._custom and meta.data_type in ("string", "email", "integer")
        )

    # ---- Editing leads behind the tool's back (PATCH /_sandbox/leads) ------------------------
    # What a form fill, a list import or a marketer's hand edit does to a lead: tests and the
    # demo use it to make Marketo drift from what the tool sent (see `reconcile`).

    def edit_leads(self, edits: Any) -> dict[str, Any]:
        """Apply `[{"email"|"id": X, "set": {field: value|null}} | {"email"|"id": X, "delete": true}]`.

        Values are stored as given (null blanks a field) and `updatedAt` moves, as for any edit.
        Every edit is checked before any is applied: an unknown field changes nothing.
        """
        if not isinstance(edits, list):
            raise ValueError('expected a JSON array of {"email" or "id", "set" or "delete"}')
        plan: list[tuple[str, Any, dict[str, Any] | None]] = []
        for i, edit in enumerate(edits):
            if not isinstance(edit, dict):
                raise ValueError(f"edit {i}: expected an object")
            by = "id" if "id" in edit else "email"
            if edit.get(by) is None:
                raise ValueError(f'edit {i}: name the lead by "email" or "id"')
            changes = edit.get("set")
            if edit.get("delete") is True:
                plan.append((by, edit[by], None))
                continue
            if not isinstance(changes, dict) or not changes:
                raise ValueError(f'edit {i}: expected "set": {{field: value}} or "delete": true')
            unknown = [n for n in changes if n not in self._fields or n == "id"]
            if unknown:
                raise ValueError(f"edit {i}: field {unknown[0]!r} not found (or not editable)")
            plan.append((by, edit[by], changes))
        out: dict[str, Any] = {"updated": 0, "deleted": 0, "not_found": []}
        now = _now_iso()
        with self._lock:
            for by, value, changes in plan:
                ids = self._store.find(by, value)
                if not ids:
                    out["not_found"].append(value)
                for lid in ids:
                    if changes is None:
                        out["deleted"] += self._store.delete(lid)
                    else:
                        self._store.update(lid, changes, now)
                        out["updated"] += 1
        return out

    # ---- describe and usage ------------------------------------------------------------------

    def _describe_v1(self, call: _Call, dry_run: bool) -> _Resp:
        with self._lock:
            self._counters["describe_calls"] += 1
        return self._ok(self._describe)

    def _describe_v2(self, call: _Call, dry_run: bool) -> _Resp:
        with self._lock:
            self._counters["describe_calls"] += 1
        fields = []
        for f in self._describe:
            if "rest" not in f:
                continue
            entry = {"name": f["rest"]["name"], "displayName": f["displayName"]}
            entry["dataType"] = f["dataType"]
            if "length" in f:
                entry["length"] = f["length"]
            entry["updateable"] = not f["rest"]["readOnly"]
            entry["crmManaged"] = False
            fields.append(entry)
        doc = {"name": "API Lead", "searchableFields": [["email"], ["id"]], "fields": fields}
        return self._ok([doc])

    def _usage_stats(self, call: _Call, dry_run: bool) -> _Resp:
        with self._lock:
            day = self._today()
            total = self._usage.get(day, 0)
        users = [{"userId": SCOPE, "count": total}] if total else []
        return self._ok([{"date": day, "total": total, "users": users}])

    # ---- Bulk lead import (/bulk/v1/leads*) ----------------------------------------------------
    # A job's timeline is fixed when it is submitted (FIFO, bulk_max_importing at a time), and
    # jobs are applied lazily, in finishing order, by the first call (or inspection) that comes
    # after their finish time: deterministic, no background thread, and every call sees the
    # store as Marketo would at that moment.

    def _bulk_routes(self, path: str) -> dict[str, Callable[[_Call, bool], _Resp]] | None:
        if path == BULK_LEADS_PATH:
            return {"POST": self._bulk_create}
        m = _BULK_BATCH_RE.fullmatch(path)
        if m is None:
            return None
        if m.group("file") is None:
            return {"GET": self._bulk_status}
        return {"GET": self._bulk_file}

    def _advance_bulk(self) -> None:
        """Apply every job whose import has finished by now. Must hold the lock."""
        now = self.bulk_clock()
        due = [j for j in self._jobs.values() if not j.applied and j.finish <= now]
        for job in sorted(due, key=lambda j: (j.finish, j.batch_id)):
            self._apply_job(job)

    def _bulk_status_of(self, job: _BulkJob, now: float) -> str:
        if now < job.start:
            return "Queued"
        if now < job.finish:
            return "Importing"
        return "Failed" if job.fail_message else "Complete"

    def submit_bulk(
        self, data: bytes, *, lookup: str = "email", fmt: str = "csv", list_id: str | None = None,
        partition: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Queue an import job as POST /bulk/v1/leads.json would (tests fill the queue with it)."""
        with self._lock:
            self._advance_bulk()
            now = self.bulk_clock()
            active = sum(1 for j in self._jobs.values() if j.finish > now)
            if active >= self.config.bulk_max_queued:
                self._counters["bulk_too_many_imports"] += 1
                return {"error": ("1016", "Too many imports")}
            cfg = self.config
            job = _parse_bulk_file(data, fmt, lookup, self._fields)
            job.batch_id, job.list_id, job.partition = next(self._job_ids), list_id, partition
            # FIFO: not before it was queued a while, a slot is free, and the job ahead started.
            slot = min(range(len(self._slots_free)), key=self._slots_free.__getitem__)
            job.start = max(now + cfg.bulk_queued_seconds, self._slots_free[slot], self._last_start)
            job.finish = job.start + cfg.bulk_import_seconds + len(job.rows) / cfg.bulk_rows_per_second
            self._slots_free[slot] = job.finish
            self._last_start = job.start
            self._jobs[job.batch_id] = job
            self._counters["bulk_uploads"] += 1
            return {"batchId": job.batch_id, "importId": str(job.batch_id), "status": "Queued"}

    def bulk_jobs(self) -> list[dict[str, Any]]:
        """Every job with its status now (inspection for tests)."""
        with self._lock:
            self._advance_bulk()
            now = self.bulk_clock()
            return [self._job_view(j, now) for j in self._jobs.values()]

    def _job_view(self, job: _BulkJob, now: float) -> dict[str, Any]:
        status = self._bulk_status_of(job, now)
        view: dict[str, Any] = {"batchId": job.batch_id, "importId": str(job.batch_id), "status": status}
        if status == "Complete":
            view |= {
                "numOfLeadsProcessed": job.processed,
                "numOfRowsFailed": len(job.failures),
                "numOfRowsWithWarning": len(job.warnings),
                "message": job.message(),
            }
        elif status == "Failed":
            view |= {"numOfLeadsProcessed": 0, "numOfRowsFailed": 0, "numOfRowsWithWarning": 0,
                     "message": job.fail_message}  # fmt: skip
        else:
            view |= {"numOfLeadsProcessed": 0, "numOfRowsFailed": 0, "numOfRowsWithWarning": 0}
        return view

    def _bulk_create(self, call: _Call, dry_run: bool) -> _Resp:
        if _media_type(call.headers) != "multipart/form-data":
            return self._error("612")
        parts = _multipart(call.headers.get("Content-Type") or "", call.body)
        if parts is None:
            return self._error("613")
        params = {k: v[0] for k, v in call.query.items() if v}
        for name, (_filename, value) in parts.items():
            if name != "file":
                params.setdefault(name, value.decode("utf-8", "replace"))
        if "file" not in parts:
            return self._error("1003", "Invalid data: the 'file' part is missing")
        data = parts["file"][1]
        if len(data) >= MAX_BULK_FILE_BYTES:
            return self._error("1003", "File size exceeds 10 MB")
        fmt = params.get("format") or "csv"
        if fmt not in _BULK_DELIMITERS:
            return self._error("1003", f"Invalid format '{fmt}', expected csv, tsv or ssv")
        lookup = params.get("lookupField") or "email"
        if lookup not in self._fields:
            return self._error("1003", f"Invalid lookupField '{lookup}'")
        if dry_run:  # a `short_result`-style fault computing the answer must not queue a job
            return self._ok([{"batchId": 0, "importId": "0", "status": "Queued"}])
        answer = self.submit_bulk(
            data, lookup=lookup, fmt=fmt, list_id=params.get("listId"), partition=params.get("partitionName")
        )
        if "error" in answer:
            return self._error(*answer["error"])
        return self._ok([answer])

    def _bulk_job(self, path: str) -> _BulkJob | _Resp:
        m = _BULK_BATCH_RE.fullmatch(path)
        job = self._jobs.get(int(m.group("id"))) if m else None
        # Marketo's answer for an unknown batch id is not documented: 1013 "Object not found".
        return job if job is not None else self._error("1013", "Import not found")

    def _bulk_status(self, call: _Call, dry_run: bool) -> _Resp:
        with self._lock:
            self._counters["bulk_status_calls"] += 1
            job = self._bulk_job(call.path)
            if isinstance(job, _Resp):
                return job
            return self._ok([self._job_view(job, self.bulk_clock())])

    def _bulk_file(self, call: _Call, dry_run: bool) -> _Resp:
        """failures.json / warnings.json: the file in the job's format, the original columns
        plus the reason column; empty when no row failed (or warned)."""
        failures = call.path.endswith("/failures.json")
        with self._lock:
            self._counters["bulk_file_calls"] += 1
            job = self._bulk_job(call.path)
            if isinstance(job, _Resp):
                return job
            if self._bulk_status_of(job, self.bulk_clock()) in ("Queued", "Importing"):
                return self._error("1003", "Import is not complete yet")
            rows = job.failures if failures else job.warnings
        if not rows:
            return _Resp(200, b"", "text/csv;charset=UTF-8")
        out = io.StringIO()
        writer = csv.writer(out, delimiter=_BULK_DELIMITERS[job.fmt], lineterminator="\n")
        writer.writerow([*job.header, "Import Failure Reason" if failures else "Import Warning Reason"])
        for cells, reason in rows:
            writer.writerow([*cells, reason])
        return _Resp(200, out.getvalue().encode("utf-8"), "text/csv;charset=UTF-8")

    def _apply_job(self, job: _BulkJob) -> None:
        """Import every row, as Sync Leads would (createOrUpdate, or update-only by id). Lock held."""
        job.applied = True
        if job.fail_message:
            return
        store, now, lookup = self._store, _now_iso(), job.lookup
        for cells in job.rows:
            if len(cells) != len(job.header):
                job.failures.append(
                    (cells, f"Invalid number of fields: {len(cells)}, expected {len(job.header)}")
                )
                continue
            changes: dict[str, Any] = {}
            reason = None
            for name, cell in zip(job.header, cells, strict=True):
                # An empty cell is taken as "no value" and clears the field: whether Marketo
                # does is not documented, so the sandbox assumes the worst for a client.
                value = _coerce(self._fields[name], cell)
                if value is _INVALID:
                    reason = f"Invalid value for field '{name}' and value '{cell}'"
                    break
                changes[name] = value
            if reason is None and changes.get(lookup) in (None, ""):
                reason = f"Value for lookup field '{lookup}' not specified"
            if reason is not None:
                job.failures.append((cells, reason))
                continue
            key = changes[lookup]
            if lookup == "id":  # update only: an id never creates a lead
                changes.pop("id")
                if key not in store.leads:
                    job.failures.append((cells, "Lead not found"))
                    continue
                store.update(key, changes, now)
            else:
                matches = store.find(lookup, key)
                if not matches:
                    store.insert(changes, now)
                elif len(matches) == 1:
                    store.update(matches[0], changes, now)
                else:
                    # Where Sync Leads skips with 1007, list imports update the most recently
                    # updated lead (Marketo Nation); the sandbox does that and warns.
                    newest = max(matches, key=lambda lid: (str(store.leads[lid].get("updatedAt")), lid))
                    store.update(newest, changes, now)
                    job.warnings.append(
                        (
                            cells,
                            f"Multiple leads match the lookup field '{lookup}'; lead {newest} was updated",
                        )
                    )
            job.processed += 1


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sandbox: MarketoSandbox) -> None:
        self.sandbox = sandbox
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # client went away
        with self.sandbox._lock:
            self.sandbox._counters["internal_errors"] += 1
            self.sandbox.last_internal_error = traceback.format_exc()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.sandbox._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sandbox._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._write(_html(400, close=True))
            return
        except OSError:
            self.close_connection = True
            return
        resp = self.server.sandbox._handle(method, self.path, self.headers, body)
        self._write(resp)

    def _read_body(self) -> bytes | None:
        """The request body, or None if it is over 1 MB (drained so the 413 reaches the client)."""
        if "chunked" in str(self.headers.get("Transfer-Encoding", "")).lower():
            return self._read_chunked()
        limit = self._limit()
        length_header = self.headers.get("Content-Length")
        if not length_header:
            return b""
        length = int(length_header)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > limit:
            if length > 64 * MAX_BODY_BYTES:
                self.close_connection = True
            else:
                self._drain(length)
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionResetError("short body")
        return body

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                raise ConnectionResetError("short body")
            length -= len(chunk)

    def _limit(self) -> int:
        """Bulk uploads may carry a file of up to 10 MB; every other call 1 MB."""
        return MAX_BULK_BODY_BYTES if self.path.startswith(BULK_PREFIX) else MAX_BODY_BYTES

    def _read_chunked(self) -> bytes | None:
        limit = self._limit()
        parts: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunk = self.rfile.read(size)
            self.rfile.readline(1024)
            total += size
            if total <= limit:
                parts.append(chunk)
        return b"".join(parts) if total <= limit else None

    def _write(self, resp: _Resp) -> None:
        if resp.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            phrase = HTTPStatus(resp.status).phrase
        except ValueError:
            phrase = "Error"
        lines = [
            f"HTTP/1.1 {resp.status} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {resp.content_type}",
            f"Content-Length: {len(resp.body)}",
        ]
        lines.extend(f"{k}: {v}" for k, v in resp.headers)
        if resp.close:
            self.close_connection = True
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head + resp.body)  # one write: no Nagle/delayed-ACK stall
        except OSError:
            self.close_connection = True


# --------------------------------------------------------------------------------------------
# CLI entry point


def serve_forever(
    config: SandboxConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: list[tuple[str, int]] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; prints only the 'listening on' line. `faults` are queued."""
    sandbox = MarketoSandbox(config, host, port).start()
    for kind, times in faults or []:
        sandbox.inject(kind, times)
    # The handler only appends to a list: a handler that takes a lock (Event.set) deadlocks when
    # a second signal lands while the first one's handler holds it (`kill %1` then a shell's
    # EXIT trap killing its jobs left a sandbox hanging on its port for good).
    signals: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: signals.append(signum))
    try:
        print(f"Marketo sandbox listening on {sandbox.base_url}", flush=True)
        while not signals:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
