"""Files, folders, gzip and stdin -> raw JSON records, each with its source `path:line`.

The format is detected by content, never by file name: gzip by its magic bytes; NDJSON when the
first non-blank line is a JSON value on its own; otherwise one JSON document (object or array).
A line number is the NDJSON line, or the line where the record's `{` starts in a document
(in the decompressed text for .gz files).

Whatever arrives, memory stays bounded: a line (or a whole JSON document) longer than
`max_line_bytes` is rejected at its line and skipped without being held in memory, a record
nested deeper than MAX_DEPTH is rejected, and nothing that is not a regular file is opened
unless it was named on the command line (a FIFO is then read as a stream, like stdin).
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from didomi_marketo.defaults import MAX_LINE_BYTES as MAX_LINE_BYTES

GzipFile: Any
CORRUPT_GZIP: tuple[type[Exception], ...]
try:  # ISA-L's inflate (the `isal` wheel): the same gzip, decompressed 2-3x faster than zlib
    from isal.igzip import IGzipFile as GzipFile
    from isal.isal_zlib import error as _IsalError

    CORRUPT_GZIP = (EOFError, zlib.error, _IsalError)  # type: ignore[assignment]
except ImportError:  # a platform without its wheel: the standard library's
    from gzip import GzipFile

    CORRUPT_GZIP = (EOFError, zlib.error)
# What opening and reading a few bytes may raise: the OS's errors and a broken gzip's.
UNREADABLE: tuple[type[Exception], ...] = (OSError, *CORRUPT_GZIP)

GZIP_MAGIC = b"\x1f\x8b"
PARTITION_DIR = re.compile(r"^date=\d{4}-\d{2}-\d{2}$")
SUCCESS_MARKER = "_SUCCESS"
# Didomi records nest about 8 levels; past this a record is refused before anything recurses.
MAX_DEPTH = 100


@dataclass(frozen=True, slots=True)
class Problem:
    """A piece of input that is not a record: bad JSON, an unreadable file."""

    path: str
    line: int
    reason: str
    denied: bool = False  # access was refused (permissions, credentials): a person must act


class Source(Protocol):
    """Where a file's bytes come from when it is not on the local disk (cloud storage: the
    `storage` module). Its identities come from the listing, so an unchanged input is skipped
    without being read."""

    @property
    def fingerprint(self) -> str: ...  # the object's own identity (size, ETag)

    @property
    def partition_fingerprint(self) -> str | None: ...  # its whole partition's, when listed whole

    def open(self, head_only: bool = False) -> IO[bytes]: ...


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file to read, and the export partition it belongs to (if any)."""

    path: Path  # a local file; for a `source` file only its display, as a path
    display: str  # the path or URL that reports show
    partition: str | None = None
    walked: bool = False  # found by walking a folder (not named on the command line)
    source: Source | None = None  # not a local file: read through this
    special: str | None = None  # "a FIFO", "a socket"...: not a regular file
    fifo: bool = False  # a FIFO named on the command line: read once, as a stream

    @property
    def is_stream(self) -> bool:
        """stdin or a named FIFO: read once, never fingerprinted or re-opened."""
        return self.fifo or self.display == "<stdin>"


@dataclass(frozen=True, slots=True)
class DateWindow:
    """`--since` / `--until`: which `date=YYYY-MM-DD` partitions a folder walk enters (inclusive).
    Chosen by the folder's name, so the partitions left out are never listed."""

    since: str | None = None
    until: str | None = None

    def admits(self, folder: str) -> bool:
        if not PARTITION_DIR.match(folder):
            return True
        day = folder[len("date=") :]
        return (self.since is None or day >= self.since) and (self.until is None or day <= self.until)


ALL_DATES = DateWindow()


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file deliberately not read (not data inside an export partition): counted, named."""

    path: str
    reason: str


class IncompletePartition(Exception):
    def __init__(self, partition: str):
        self.partition = partition
        super().__init__(
            f"{partition}: Didomi export partition has no {SUCCESS_MARKER} marker (the export is "
            "still being written); refusing to read it. Use --allow-incomplete to read it anyway"
        )


# ---------------------------------------------------------------------------------------------
# Which files


def is_partition(directory: Path) -> bool:
    """A Didomi batch-export partition: `.../date=YYYY-MM-DD/users/` (or the date= folder)."""
    if directory.name == "users" and PARTITION_DIR.match(directory.parent.name):
        return True
    return bool(PARTITION_DIR.match(directory.name)) and (directory / "users").is_dir()


def partition_complete(directory: Path) -> bool:
    """Didomi writes `_SUCCESS` when the partition is complete; accept it in users/ or date=."""
    candidates = [directory / SUCCESS_MARKER]
    if directory.name == "users":
        candidates.append(directory.parent / SUCCESS_MARKER)
    else:
        candidates.append(directory / "users" / SUCCESS_MARKER)
    return any(c.exists() for c in candidates)


def skipped_name(name: str) -> bool:
    """Hidden files and folders, `_`-markers and `_`-prefixed folders (Spark's `_temporary/`)."""
    return name.startswith((".", "_"))


def discover(
    paths: list[str], allow_incomplete: bool = False, window: DateWindow = ALL_DATES
) -> Iterator[InputFile | Problem | IncompletePartition | Skipped]:
    """Expand the command-line paths into files, in a stable (sorted) order.

    Inside an export partition only `*.json.gz` files are data; any other file is yielded as
    Skipped (counted and named, never silently dropped).
    Elsewhere in a folder, hidden files and `_`-markers are skipped and the rest is sniffed.
    """
    for raw in paths:
        if raw == "-":
            yield InputFile(Path("-"), "<stdin>")
            continue
        path = Path(raw)
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            yield Problem(raw, 0, _stat_problem(path, e), isinstance(e, PermissionError))
            continue
        if stat.S_ISDIR(mode):
            yield from _walk(path, allow_incomplete, window)
        elif stat.S_ISFIFO(mode):
            yield InputFile(path, str(path), fifo=True)  # named on purpose: read it like stdin
        elif stat.S_ISREG(mode):
            partition = _enclosing_partition(path)
            # A file named inside a partition is as partial as the partition: the _SUCCESS
            # rule applies to it too (before, only folder walks checked the marker).
            if partition is not None and not allow_incomplete and not partition_complete(partition):
                yield IncompletePartition(str(partition))
                continue
            yield InputFile(path, str(path), str(partition) if partition else None)
        else:
            yield Problem(raw, 0, f"not a regular file ({_kind(mode)}); not read")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def _stat_problem(path: Path, e: OSError) -> str:
    """Say what is wrong with a path: a symlink loop or a dangling link is no "no such file"."""
    if e.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if e.errno == errno.ENOENT and path.is_symlink():
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    if e.errno == errno.ENOENT:
        return "no such file or directory"
    return f"cannot read: {e.strerror or e}"


def _enclosing_partition(path: Path) -> Path | None:
    for parent in path.parents:
        if is_partition(parent):
            return parent
    return None


def _walk(
    root: Path, allow_incomplete: bool, window: DateWindow
) -> Iterator[InputFile | IncompletePartition | Problem | Skipped]:
    unreadable: list[OSError] = []
    seen: set[str] = set()  # real paths: symlinked folders are followed, loops are not
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append, followlinks=True):
        while unreadable:  # a folder we may not list is reported, never silently skipped
            e = unreadable.pop()
            yield _unreadable_folder(e, dirpath)
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden folders and `_`-prefixed ones (Spark's `_temporary/`, half-written output) are skipped.
        # Partitions outside --since/--until are dropped by name, before they are listed.
        dirnames[:] = sorted(d for d in dirnames if not skipped_name(d) and window.admits(d))
        here = Path(dirpath)
        if is_partition(here) and here.name != "users":
            continue  # its users/ folder is the partition; we get there next
        partition = _enclosing_partition(here / "x")
        if (
            partition is not None
            and here == partition
            and not allow_incomplete
            and not partition_complete(partition)
        ):
            yield IncompletePartition(str(partition))
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if skipped_name(name):
                continue
            if partition is not None and not name.endswith(".json.gz"):
                yield Skipped(str(here / name), "not *.json.gz inside an export partition")
                continue
            path = here / name
            try:
                mode = os.stat(path).st_mode
            except OSError as err:
                yield Problem(str(path), 0, _stat_problem(path, err), isinstance(err, PermissionError))
                continue
            # A FIFO, socket or device in a folder would block open() forever (holding the state
            # lock) or stream without end: never opened, counted as skipped.
            special = None if stat.S_ISREG(mode) else _kind(mode)
            yield InputFile(path, str(path), str(partition) if partition else None, True, special=special)
    for e in unreadable:
        yield _unreadable_folder(e, str(root))


def _unreadable_folder(e: OSError, where: str) -> Problem:
    denied = isinstance(e, PermissionError)
    return Problem(str(e.filename or where), 0, f"cannot read folder: {e.strerror}", denied)


# ---------------------------------------------------------------------------------------------
# Records from one file


def open_binary(f: InputFile, head_only: bool = False) -> IO[bytes]:
    """Open a file, stdin, a FIFO or a remote file, transparently gunzipping gzip content.
    `head_only`: only its first bytes will be read (a remote file then fetches a small range).
    Streams are never read whole: their first bytes are read and put back in front."""
    if f.display == "<stdin>":
        raw: IO[bytes] = sys.stdin.buffer
    elif f.source is not None:
        raw = f.source.open(head_only)
    else:
        raw = open(f.path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    if isinstance(raw, io.BufferedReader) and not f.is_stream:
        head = raw.peek(2)[:2]
    else:
        head = b""
        while len(head) < 2 and (chunk := raw.read(2 - len(head))):
            head += chunk
        raw = io.BufferedReader(_Chain(head, raw))  # type: ignore[arg-type]
    if head == GZIP_MAGIC:
        return GzipFile(fileobj=raw, mode="rb")  # type: ignore[no-any-return]
    return raw


class _Chain(io.RawIOBase):
    """Bytes already read, then the rest of a stream: a pipe cannot be rewound."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.rest is not sys.stdin.buffer:
            self.rest.close()
        super().close()


# Names that say "data": such a file is always read, so a broken first line is rejected with its
# path:line instead of the whole file being skipped as "not JSON" without a word.
DATA_SUFFIXES = (".json", ".ndjson", ".jsonl", ".gz")


def sniff_json(f: InputFile) -> bool:
    """Whether a file found in a folder is data to read: named as data, or looking like JSON (or
    gzip) in its first bytes. What is skipped (READMEs and the like) is counted by the caller."""
    if f.special is not None:
        return False  # never opened: see _walk
    if f.path.name.lower().endswith(DATA_SUFFIXES):
        return True
    try:
        with open_binary(f, head_only=True) as fh:
            head = fh.read(512).lstrip()
    except UNREADABLE:
        return True  # let read_records report the real problem
    return not head or head[:1] in (b"{", b"[")


def read_records(f: InputFile, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[Any, int] | Problem]:
    """Yield (parsed JSON value, line) for each top-level value, or a Problem per bad line."""
    if f.special is not None:
        yield Problem(f.display, 0, f"not a regular file ({f.special}); not read")
        return
    try:
        fh = open_binary(f)
    except OSError as e:
        reason = _stat_problem(f.path, e) if e.errno == errno.ELOOP else f"cannot read: {e.strerror or e}"
        yield Problem(f.display, 0, reason, isinstance(e, PermissionError))
        return
    except CORRUPT_GZIP as e:  # stdin: a truncated or corrupt gzip
        yield Problem(f.display, 0, f"cannot read: corrupt or truncated gzip ({e})")
        return
    try:
        yield from _records(fh, f.display, max_line_bytes)
    except CORRUPT_GZIP as e:  # BadGzipFile is an OSError; the inflate errors are not
        yield Problem(f.display, 0, f"cannot read: corrupt or truncated gzip ({e})")
    except (OSError, UnicodeDecodeError) as e:
        yield Problem(f.display, 0, f"cannot read: {e}", isinstance(e, PermissionError))
    finally:
        fh.close()


def _lines(fh: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of `fh`, each at most `limit` bytes; a longer one comes out as None (its bytes
    are skipped, never held)."""
    readline = fh.readline
    while line := readline(limit + 1):
        if len(line) > limit and line[-1:] != b"\n":
            while (rest := readline(1 << 20)) and rest[-1:] != b"\n":
                pass  # skip to the end of the line, 1 MB at a time
            yield None
        else:
            yield line


def _too_long(display: str, line: int, limit: int) -> Problem:
    return Problem(display, line, f"line longer than {limit:,} bytes (--max-line-bytes); skipped")


def _records(fh: IO[bytes], display: str, limit: int) -> Iterator[tuple[Any, int] | Problem]:
    lines = _lines(fh, limit)
    lineno = 0
    first: bytes | None = None
    for line in lines:
        lineno += 1
        if line is None:
            yield _too_long(display, lineno, limit)
            continue
        if line.strip():
            first = line
            break
    if first is None:
        return  # empty file: nothing to do
    first_line = lineno
    try:
        value = orjson.loads(first)
    except orjson.JSONDecodeError:
        value = _NOT_JSON
    if value is not _NOT_JSON:
        yield _checked(value, first, display, first_line)
        yield from _ndjson(lines, display, lineno, limit)
        return
    # Not NDJSON at its first line: a (pretty-printed) document, or NDJSON whose first line is
    # broken. The next line tells which without reading the file whole: in NDJSON it is a
    # record of its own; in a document it is a fragment (`"key": {`).
    second: bytes | None = None
    for line in lines:
        lineno += 1
        if line is None:
            yield Problem(display, first_line, f"invalid JSON: {_json_error(first)}")
            yield _too_long(display, lineno, limit)
            yield from _ndjson(lines, display, lineno, limit)
            return
        if line.strip():
            second = line
            break
    if second is not None and first.strip() not in (b"[", b"{") and _is_record(second):
        yield Problem(display, first_line, f"invalid JSON: {_json_error(first)}")
        yield from _ndjson(iter((second,)), display, lineno - 1, limit)
        yield from _ndjson(lines, display, lineno, limit)
        return
    # A document: read whole, but never more than the limit.
    head = first + b"\n" * (lineno - first_line - (second is not None)) + (second or b"")
    rest = fh.read(max(0, limit - len(head)) + 1)
    text = head + rest
    if len(text) > limit:
        yield Problem(display, first_line, f"JSON document longer than {limit:,} bytes (--max-line-bytes); "
                      "not read (NDJSON, one record a line, has no such limit)")  # fmt: skip
        return
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        if _other_lines_parse(text):
            yield from _ndjson(_lines(io.BytesIO(text), limit), display, first_line - 1, limit)
        else:
            bad_line = first_line + text.count(b"\n", 0, max(0, e.pos))
            yield Problem(display, bad_line, f"invalid JSON: {_reason(e)}")
        return
    if _too_deep(doc):
        yield Problem(display, first_line, _DEEP)
        return
    yield from _document(doc, text, first_line, display)


_NOT_JSON = object()
_DEEP = f"nested too deeply (over {MAX_DEPTH} levels); not read"


def _json_error(line: bytes) -> str:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return _reason(e)
    return "not a JSON value"


def _reason(e: orjson.JSONDecodeError) -> str:
    return _DEEP if "depth" in e.msg else e.msg


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(orjson.loads(line), dict | list)
    except orjson.JSONDecodeError:
        return False


def _checked(value: Any, line: bytes, display: str, lineno: int) -> tuple[Any, int] | Problem:
    # Counting brackets is C-speed; only a line with that many can be that deep.
    if line.count(b"{") + line.count(b"[") > MAX_DEPTH and _too_deep(value):
        return Problem(display, lineno, _DEEP)
    return value, lineno


def _too_deep(value: Any) -> bool:
    """Whether `value` nests deeper than MAX_DEPTH (iterative: it must not recurse itself)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(v, dict):
            stack.extend((c, depth + 1) for c in v.values() if isinstance(c, dict | list))
        elif isinstance(v, list):
            stack.extend((c, depth + 1) for c in v if isinstance(c, dict | list))
    return False


def _other_lines_parse(text: bytes) -> bool:
    """Whether a text that is not one JSON document is NDJSON with some broken lines."""
    for line in text.split(b"\n")[1:50]:
        if line.strip():
            try:
                orjson.loads(line)
                return True
            except orjson.JSONDecodeError:
                continue
    return False


def _ndjson(
    lines: Iterator[bytes | None], display: str, lineno: int, limit: int
) -> Iterator[tuple[Any, int] | Problem]:
    loads = orjson.loads
    depth_check = MAX_DEPTH
    for line in lines:
        lineno += 1
        if line is None:
            yield _too_long(display, lineno, limit)
            continue
        try:
            value = loads(line)
        except orjson.JSONDecodeError as e:
            if line.strip():
                yield Problem(display, lineno, f"invalid JSON: {_reason(e)}")
            continue
        if line.count(b"{") + line.count(b"[") > depth_check and _too_deep(value):
            yield Problem(display, lineno, _DEEP)
            continue
        yield value, lineno


# Tokens that matter for finding where each object starts: strings (skipped whole), `{`, newlines.
_TOKENS = re.compile(rb'"(?:[^"\\\n]|\\.)*"|\{|\n')


def _document(doc: Any, text: bytes, first_line: int, display: str) -> Iterator[tuple[Any, int]]:
    """Yield the document with the line of every object, so records inside keep their line.

    orjson gives no positions, but objects are parsed in document order: the n-th `{` in the
    text (outside strings) is the n-th dict of a pre-order walk. `ObjectLines` pairs them.
    """
    starts: list[int] = []
    line = first_line
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok == b"\n":
            line += 1
        elif tok == b"{":
            starts.append(line)
    yield LinedDocument(doc, starts), first_line


@dataclass(slots=True)
class LinedDocument:
    """A parsed JSON document plus the start line of each of its objects, in pre-order."""

    value: Any
    object_lines: list[int]
