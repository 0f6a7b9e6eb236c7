"""Cloud storage inputs: `s3://bucket/prefix` and `gs://bucket/prefix`, through fsspec (s3fs, gcsfs).

A URL is walked like a local folder (didomi/readers.py): the same `date=` partition and `_SUCCESS`
rules, the same skipping of hidden and `_`-prefixed names, the same InputFile / Problem /
IncompletePartition items, with the URL as the path in every report. Files stream through the same
readers, a range request at a time (nothing is downloaded to disk). Listings carry each object's
size and ETag, so `--state` skips an unchanged partition without reading it, and `--since` /
`--until` leave partitions out by their folder's name, before listing them.

Credentials come from each cloud's standard chain (botocore's: environment, profile, `role_arn`
with `source_profile`, container and instance roles; Google's application default credentials).
They are never printed: errors name the bucket and what was refused, with the provider's code.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from didomi_marketo.didomi.readers import (
    ALL_DATES,
    PARTITION_DIR,
    SUCCESS_MARKER,
    DateWindow,
    IncompletePartition,
    InputFile,
    Problem,
    skipped_name,
)
from didomi_marketo.errors import ConfigError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
READ_BUFFER = 8 << 20  # one range request per 8 MiB read: memory stays bounded, calls stay few
HEAD_BUFFER = 64 << 10  # sniffing a file's first bytes fetches 64 KiB, not 8 MiB
GCS_READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"


@dataclass(frozen=True)
class Backend:
    scheme: str  # as reports show it
    module: str  # the fsspec implementation to import
    extra: str  # pip extra that installs it
    title: str


BACKENDS = {
    "s3": Backend("s3", "s3fs", "s3", "S3"),
    "gs": Backend("gs", "gcsfs", "gcs", "Google Cloud Storage"),
    "gcs": Backend("gs", "gcsfs", "gcs", "Google Cloud Storage"),
}


def is_url(raw: str) -> bool:
    return URL.match(raw) is not None


def check_urls(paths: list[str]) -> None:
    """Before anything runs: every URL has a supported scheme and its extra installed (exit 2)."""
    problems: list[str] = []
    for raw in paths:
        m = URL.match(raw)
        if m is None:
            continue
        backend = BACKENDS.get(m.group(1).lower())
        if backend is None:
            problems.append(f"{raw}: unsupported URL scheme {m.group(1)}:// (s3:// and gs:// are)")
            continue
        try:
            __import__(backend.module)
        except ImportError:
            problems.append(
                f"{raw}: reading {backend.title} needs the {backend.extra} extra: "
                f"pip install 'didomi-marketo[{backend.extra}]'"
            )
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------
# Filesystems and their errors


class _Unusable(Exception):
    """The storage cannot be used at all (credentials missing or invalid): one line, exit 3."""


def _filesystem(backend: Backend) -> Any:
    """A fresh filesystem (never fsspec's instance cache: credentials may change between runs)."""
    if backend.module == "s3fs":
        import s3fs

        # No key given: botocore's chain finds them; AWS_ENDPOINT_URL(_S3) points it elsewhere.
        # Didomi's export bucket is Requester Pays: S3 refuses (403) a request that does not
        # accept the charges. On any other bucket the header changes nothing.
        return s3fs.S3FileSystem(skip_instance_cache=True, requester_pays=True)
    # The core class: gcsfs's default one first probes each bucket's layout over gRPC, an extra
    # round trip (and a long stall where gRPC is not served) that plain reads do not need.
    from gcsfs.core import GCSFileSystem

    if os.environ.get("STORAGE_EMULATOR_HOST"):  # the convention Google's own clients follow
        return GCSFileSystem(token="anon", skip_instance_cache=True)
    import google.auth
    import google.auth.exceptions

    try:
        credentials, project = google.auth.default(scopes=[GCS_READ_ONLY])
    except google.auth.exceptions.GoogleAuthError as e:
        raise _Unusable(
            f"no usable Google credentials ({_first_line(e)}): set GOOGLE_APPLICATION_CREDENTIALS "
            "or run `gcloud auth application-default login`"
        ) from None
    return GCSFileSystem(token=credentials, project=project, skip_instance_cache=True)


# Provider codes that mean "these credentials are not accepted" or "not allowed here".
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the access key is not known to AWS",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
    "TokenRefreshRequired": "the session token has expired",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "401", "Forbidden"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _code(e: BaseException) -> str | None:
    """The provider's error code, from botocore's ClientError or gcsfs's HttpError."""
    for err in (e, e.__cause__, e.__context__):
        if err is None:
            continue
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        status = getattr(err, "code", None)
        if isinstance(status, int):
            return str(status)
    return None


def explain(e: BaseException, url: str, bucket: str, doing: str) -> Problem:
    """One line for a storage failure at `url`: what was refused, on which bucket, and the
    provider's code (`denied` when credentials or permissions are the cause: the run exits 3)."""
    name = type(e).__name__
    code = _code(e)
    if isinstance(e, _Unusable):
        return Problem(url, 0, str(e), denied=True)
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return Problem(
            url, 0, f"no AWS credentials found for bucket '{bucket}' ({_first_line(e)}): set AWS_PROFILE, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run where an instance role applies", denied=True,
        )  # fmt: skip
    if code in _CREDENTIAL_CODES:
        reason = (
            f"bucket '{bucket}' refused the credentials while {doing}: {_CREDENTIAL_CODES[code]} ({code})"
        )
        return Problem(url, 0, reason, denied=True)
    if isinstance(e, PermissionError) or code in _DENIED_CODES:
        return Problem(
            url, 0, f"access denied to bucket '{bucket}' while {doing} ({code or _first_line(e)}): "
            "the credentials in use may not do this; check the role or policy", denied=True,
        )  # fmt: skip
    if isinstance(e, FileNotFoundError):
        return Problem(
            url, 0, f"no such bucket '{bucket}'" if code == "NoSuchBucket" else "no such file or folder"
        )
    return Problem(url, 0, f"cannot read bucket '{bucket}' while {doing}: {_first_line(e)}")


# ---------------------------------------------------------------------------------------------
# Remote files


def _as_os_error(problem: Problem) -> OSError:
    """The readers report an OSError as `cannot read`, and a PermissionError as denied access."""
    return PermissionError(problem.reason) if problem.denied else OSError(problem.reason)


class _RawObject(io.RawIOBase):
    """An fsspec file as a raw stream whose every failure is an OSError naming the bucket (the
    readers report OSErrors as `cannot read`; anything else would escape as a traceback)."""

    def __init__(self, fh: Any, url: str, bucket: str):
        self.fh, self.url, self.bucket = fh, url, bucket

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self.fh.readinto(buffer))
        except Exception as e:
            raise _as_os_error(explain(e, self.url, self.bucket, "reading an object")) from None

    def close(self) -> None:
        try:
            self.fh.close()
        finally:
            super().close()


@dataclass(frozen=True)
class RemoteFile:
    """One object, as listed: `readers.Source` for an InputFile."""

    fs: Any
    path: str  # bucket/key, as fsspec names it
    url: str
    bucket: str
    size: int
    etag: str
    partition_fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        return f"{self.size}:{self.etag}"

    def open(self, head_only: bool = False) -> IO[bytes]:
        try:
            fh = self.fs.open(self.path, "rb", cache_type="none")
        except Exception as e:
            raise _as_os_error(explain(e, self.url, self.bucket, "opening an object")) from None
        return io.BufferedReader(
            _RawObject(fh, self.url, self.bucket), HEAD_BUFFER if head_only else READ_BUFFER
        )


def _etag(entry: dict[str, Any]) -> str:
    # S3: ETag; GCS: generation (changes with every rewrite) or the JSON API's etag/md5.
    for k in ("ETag", "generation", "etag", "md5Hash"):
        if entry.get(k):
            return str(entry[k]).strip('"')
    return str(entry.get("LastModified") or entry.get("updated") or "")


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Discovery


def discover_url(
    url: str, allow_incomplete: bool = False, window: DateWindow = ALL_DATES
) -> Iterator[InputFile | Problem | IncompletePartition]:
    """Expand one `s3://` / `gs://` URL into its files, like readers.discover for a local path."""
    m = URL.match(url)
    assert m is not None
    backend = BACKENDS[m.group(1).lower()]
    root = url[m.end() :].strip("/")
    bucket = root.split("/", 1)[0]
    walker = _Walker(backend, bucket, allow_incomplete, window)
    try:
        yield from walker.start(root)
    except Exception as e:  # listing failed: the whole URL is one problem, the run goes on
        problem = explain(e, url, bucket, "listing")
        if isinstance(e, FileNotFoundError) and not problem.denied and walker.fs is not None:
            missing_bucket = root != bucket and not walker.fs.exists(bucket)
            problem = Problem(url, 0, f"no such bucket '{bucket}'" if missing_bucket else problem.reason)
        yield problem


class _Walker:
    def __init__(self, backend: Backend, bucket: str, allow_incomplete: bool, window: DateWindow):
        self.backend, self.bucket = backend, bucket
        self.allow_incomplete, self.window = allow_incomplete, window
        self.fs: Any = None

    def url(self, path: str) -> str:
        return f"{self.backend.scheme}://{path.rstrip('/')}"

    def ls(self, path: str) -> list[dict[str, Any]]:
        entries = self.fs.ls(path, detail=True)
        return [e for e in entries if e["name"].rstrip("/") != path.rstrip("/") or e["type"] == "file"]

    def start(self, root: str) -> Iterator[InputFile | Problem | IncompletePartition]:
        self.fs = _filesystem(self.backend)
        parts = root.split("/")
        if len(parts) > 2 and parts[-1] == "users" and PARTITION_DIR.match(parts[-2]):
            date_folder = "/".join(parts[:-1])  # the URL names a partition's users/ folder
            markers = {SUCCESS_MARKER} if self.fs.exists(f"{date_folder}/{SUCCESS_MARKER}") else set()
            yield from self._partition(root, markers)
            return
        entries = self.ls(root)
        if not entries:
            raise FileNotFoundError(root)
        if len(entries) == 1 and entries[0]["type"] == "file" and entries[0]["name"].rstrip("/") == root:
            yield from self._named_file(root, entries[0])
            return
        yield from self._walk(root, entries)

    def _named_file(self, path: str, entry: dict[str, Any]) -> Iterator[InputFile | IncompletePartition]:
        """A URL naming one object: read it, under its partition's `_SUCCESS` rule (as locally)."""
        parts = path.split("/")
        partition = None
        for i in range(len(parts) - 2, 0, -1):
            if parts[i] == "users" and PARTITION_DIR.match(parts[i - 1]):
                partition = "/".join(parts[: i + 1])
                break
        if partition is not None and not self.allow_incomplete:
            date_folder = partition.rsplit("/", 1)[0]
            if not any(self.fs.exists(f"{d}/{SUCCESS_MARKER}") for d in (partition, date_folder)):
                yield IncompletePartition(self.url(partition))
                return
        yield self._file(path, entry, self.url(partition) if partition else None, False, None)

    def _file(
        self,
        path: str,
        entry: dict[str, Any],
        partition: str | None,
        walked: bool,
        partition_fingerprint: str | None,
    ) -> InputFile:
        url = self.url(path)
        size = int(entry.get("size") or 0)
        source = RemoteFile(self.fs, path, url, self.bucket, size, _etag(entry), partition_fingerprint)
        return InputFile(Path(url), url, partition, walked, source)

    def _walk(
        self, here: str, entries: list[dict[str, Any]]
    ) -> Iterator[InputFile | Problem | IncompletePartition]:
        names = {_base(e["name"]) for e in entries}
        dirs = sorted(
            e["name"].rstrip("/")
            for e in entries
            if e["type"] == "directory" and not skipped_name(_base(e["name"])) and self.window.admits(_base(e["name"]))
        )  # fmt: skip
        name = _base(here)
        if PARTITION_DIR.match(name) and "users" in {_base(d) for d in dirs}:
            # A Didomi partition's date= folder: its users/ folder is the partition (and its
            # own files are not data), as in a local walk.
            for d in dirs:
                if _base(d) == "users":
                    yield from self._partition(d, names)
                else:
                    yield from self._walk(d, self.ls(d))
            return
        for e in sorted(entries, key=lambda e: e["name"]):
            if e["type"] == "file" and not skipped_name(_base(e["name"])):
                yield self._file(e["name"].rstrip("/"), e, None, True, None)
        for d in dirs:
            yield from self._walk(d, self.ls(d))

    def _partition(self, here: str, parent_names: set[str]) -> Iterator[InputFile | IncompletePartition]:
        """`date=.../users`: every `*.json.gz` beneath it, from one recursive listing, once
        Didomi's `_SUCCESS` is there (in users/ or in the date= folder, whose names we have)."""
        url = self.url(here)
        found = self.fs.find(here, detail=True)
        if not found:
            raise FileNotFoundError(here)
        complete = SUCCESS_MARKER in parent_names or f"{here}/{SUCCESS_MARKER}" in found
        if not complete and not self.allow_incomplete:
            yield IncompletePartition(url)
            return
        files = []
        for path, entry in sorted(found.items()):
            rel = path[len(here) :].strip("/")
            data = entry.get("type") == "file" and rel.endswith(".json.gz")
            if data and not any(skipped_name(part) for part in rel.split("/")):
                files.append((path, rel, entry))
        digest = hashlib.sha1()
        for _, rel, entry in files:
            digest.update(f"{rel}:{entry.get('size')}:{_etag(entry)}\n".encode())
        fingerprint = digest.hexdigest()
        for path, _, entry in files:
            yield self._file(path, entry, url, True, fingerprint)
