"""Files, folders, gzip and stdin -> raw JSON records, each with its source `path:line`.

The format is detected by content, never by file name: gzip by its magic bytes; NDJSON when the
first non-blank line is a JSON value on its own; otherwise one JSON document (object or array).
A line number is the NDJSON line, or the line where the record's `{` starts in a document
(in the decompressed text for .gz files).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

GZIP_MAGIC = b"\x1f\x8b"
PARTITION_DIR = re.compile(r"^date=\d{4}-\d{2}-\d{2}$")
SUCCESS_MARKER = "_SUCCESS"


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
) -> Iterator[InputFile | Problem | IncompletePartition]:
    """Expand the command-line paths into files, in a stable (sorted) order.

    Inside an export partition only `*.json.gz` files are data; everything else is ignored.
    Elsewhere in a folder, hidden files and `_`-markers are skipped and the rest is sniffed.
    """
    for raw in paths:
        if raw == "-":
            yield InputFile(Path("-"), "<stdin>")
            continue
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, allow_incomplete, window)
        elif path.is_file():
            partition = _enclosing_partition(path)
            # A file named inside a partition is as partial as the partition: the _SUCCESS
            # rule applies to it too (before, only folder walks checked the marker).
            if partition is not None and not allow_incomplete and not partition_complete(partition):
                yield IncompletePartition(str(partition))
                continue
            yield InputFile(path, str(path), str(partition) if partition else None)
        else:
            yield Problem(raw, 0, "no such file or directory")


def _enclosing_partition(path: Path) -> Path | None:
    for parent in path.parents:
        if is_partition(parent):
            return parent
    return None


def _walk(
    root: Path, allow_incomplete: bool, window: DateWindow
) -> Iterator[InputFile | IncompletePartition | Problem]:
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
                continue
            yield InputFile(here / name, str(here / name), str(partition) if partition else None, True)
    for e in unreadable:
        yield _unreadable_folder(e, str(root))


def _unreadable_folder(e: OSError, where: str) -> Problem:
    denied = isinstance(e, PermissionError)
    return Problem(str(e.filename or where), 0, f"cannot read folder: {e.strerror}", denied)


# ---------------------------------------------------------------------------------------------
# Records from one file


def open_binary(f: InputFile, head_only: bool = False) -> IO[bytes]:
    """Open a file (or stdin), transparently gunzipping when the content is gzip.
    `head_only`: only its first bytes will be read (a remote file then fetches a small range)."""
    if f.display == "<stdin>":
        data = sys.stdin.buffer.read()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
        return io.BytesIO(data)
    if f.source is not None:
        raw: IO[bytes] = f.source.open(head_only)
    else:
        raw = open(f.path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    head = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def sniff_json(f: InputFile) -> bool:
    """Whether a file found in a folder looks like JSON (or gzip): skip READMEs and the like."""
    try:
        with open_binary(f, head_only=True) as fh:
            head = fh.read(512).lstrip()
    except (OSError, EOFError, zlib.error):
        return True  # let read_records report the real problem
    return not head or head[:1] in (b"{", b"[")


def read_records(f: InputFile) -> Iterator[tuple[Any, int] | Problem]:
    """Yield (parsed JSON value, line) for each top-level value, or a Problem per bad line."""
    try:
        fh = open_binary(f)
    except OSError as e:
        yield Problem(f.display, 0, f"cannot read: {e.strerror or e}", isinstance(e, PermissionError))
        return
    except (EOFError, zlib.error) as e:  # stdin: a truncated or corrupt gzip
        yield Problem(f.display, 0, f"cannot read: corrupt or truncated gzip ({e})")
        return
    try:
        yield from _records(fh, f.display)
    except (EOFError, zlib.error) as e:  # BadGzipFile is an OSError; zlib.error is not
        yield Problem(f.display, 0, f"cannot read: corrupt or truncated gzip ({e})")
    except (OSError, UnicodeDecodeError) as e:
        yield Problem(f.display, 0, f"cannot read: {e}", isinstance(e, PermissionError))
    finally:
        fh.close()


def _records(fh: IO[bytes], display: str) -> Iterator[tuple[Any, int] | Problem]:
    lineno = 0
    first: bytes | None = None
    for line in fh:
        lineno += 1
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
    if value is _NOT_JSON:
        # Not NDJSON at its first line: a whole (pretty-printed) document, or NDJSON whose first
        # line is broken. Try the document; fall back to line by line.
        rest = fh.read()
        text = first + rest
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            if _other_lines_parse(text):
                yield from _ndjson(io.BytesIO(text), display, first_line - 1)
            else:
                bad_line = first_line + text.count(b"\n", 0, max(0, e.pos))
                yield Problem(display, bad_line, f"invalid JSON: {e.msg}")
            return
        yield from _document(doc, text, first_line, display)
        return
    yield value, first_line
    yield from _ndjson(fh, display, lineno)


_NOT_JSON = object()


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


def _ndjson(fh: IO[bytes], display: str, lineno: int) -> Iterator[tuple[Any, int] | Problem]:
    loads = orjson.loads
    for line in fh:
        lineno += 1
        try:
            yield loads(line), lineno
        except orjson.JSONDecodeError as e:
            if line.strip():
                yield Problem(display, lineno, f"invalid JSON: {e.msg}")


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
