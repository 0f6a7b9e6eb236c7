"""Load the Didomi console's Marketo integration config (JSON or YAML, one schema) and validate it.

Every problem is collected, each with its `file:line`, and raised at once as a ConfigError.
Credentials are resolved lazily (`Config.credentials()`), so dry runs and previews need none.

`Config` is frozen: an override (`--upsert`, `--max-concurrency`) returns a changed copy. Every
default the CLI shows and the library uses is declared once, here (or, for the reader's and the
client's own limits, in the module that enforces them and re-exported here).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import select
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

import httpx
import orjson
import yaml

from didomi_marketo.defaults import DEFAULT_DAILY_QUOTA as DEFAULT_DAILY_QUOTA
from didomi_marketo.errors import ConfigError
from didomi_marketo.mapping import FieldMapping, parse_property, parse_transforms
from didomi_marketo.marketo.client import DEFAULT_TIMEOUT, RETRY_MIN_ATTEMPTS, RETRY_MIN_SECONDS
from didomi_marketo.marketo.credentials import Credentials, Secret
from didomi_marketo.marketo.limiter import MAX_CONCURRENCY as MAX_CONCURRENCY
from didomi_marketo.marketo.limiter import RATE_CALLS as RATE_CALLS
from didomi_marketo.marketo.limiter import RATE_WINDOW_SECONDS as RATE_WINDOW_SECONDS

# Defaults and bounds, declared once: the CLI's options and the library both read these (the
# Marketo limits and the client's own from the module that enforces them).
BATCH_SIZE = 300  # Marketo: at most 300 leads per Sync Leads call

MAX_CONFIG_BYTES = 1024 * 1024  # a Didomi integration config is a few KB
FIFO_WAIT_SECONDS = 10.0  # a config read from a pipe (`-c <(...)`) must arrive within this
ALIAS_BUDGET = 10_000  # YAML nodes after alias expansion: a billion-laughs bomb stops here

# Keys the Didomi Marketplace API adds around an integration; accepted and ignored so that
# the JSON copied from the console or API works verbatim.
DIDOMI_ENVELOPE_KEYS = {
    "id", "organization_id", "name", "description", "created_at", "updated_at", "version",
    "enabled", "status", "type", "deleted_at",
}  # fmt: skip
TOP_KEYS = {
    "type_id", "authentication", "properties", "mappings", "upsert_mode", "state", "delivery", "deletions",
}  # fmt: skip
DELETIONS = ("ignore", "revoke")  # what a user.deleted does to the lead (README: Consent semantics)
AUTH_KEYS = {"client_id", "client_secret", "instance"}
PROPERTY_KEYS = {"user_identifier", "regulations"}
MAPPING_KEYS = {"id", "value", "transform"}
IDENTIFIERS = {"email": "email", "leadID": "id"}
ENV_OVERRIDES = {  # the environment beats the file (flag > environment > file)
    "client_id": "MARKETO_CLIENT_ID",
    "client_secret": "MARKETO_CLIENT_SECRET",
    "instance": "MARKETO_INSTANCE",
}
MUNCHKIN = re.compile(r"^\d{3}-[A-Za-z]{3}-\d{3}$")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _bounded(default: Any, low: float, high: float = float("inf"), why: str = "") -> Any:
    """A setting with its default and its valid range, in one declaration."""
    return field(default=default, metadata={"range": (low, high), "why": why})


@dataclass(frozen=True)
class DeliverySettings:
    """`delivery:` in the config. Each key's type (int or float), default and range."""

    max_calls_per_20s: int = _bounded(RATE_CALLS, 1, RATE_CALLS, "Marketo's limit")
    max_concurrency: int = _bounded(MAX_CONCURRENCY, 1, MAX_CONCURRENCY, "Marketo's limit")
    max_calls: int | None = _bounded(None, 1)
    batch_size: int = _bounded(BATCH_SIZE, 1, BATCH_SIZE, "Marketo's limit")
    timeout: float = _bounded(DEFAULT_TIMEOUT, 0.001, 3600.0)
    retry_min_attempts: int = _bounded(RETRY_MIN_ATTEMPTS, 1, 1000)
    retry_min_seconds: float = _bounded(RETRY_MIN_SECONDS, 0.001, 7 * 86400.0)
    # Bulk import jobs are polled every 5 s at first, then less often, up to every 30 s (Adobe's
    # advice); shorter only for a sandbox with compressed time.
    bulk_poll_min_seconds: float = _bounded(5.0, 0.001, 3600.0)
    bulk_poll_max_seconds: float = _bounded(30.0, 0.001, 3600.0)


DELIVERY_KEYS = {f.name for f in fields(DeliverySettings)}


@dataclass(frozen=True)
class Config:
    """A validated Didomi Marketo integration config (the console's JSON or YAML), with `file:line`
    of each setting kept for later messages. Credentials resolve lazily (`credentials()`), so
    dry runs and previews need none; `identity()` is the secret-free form for reports.
    Frozen: an override (`--upsert`, `--max-concurrency`) returns a changed copy."""

    path: str
    identifier: str  # "email" | "leadID"
    upsert: bool
    mappings: list[FieldMapping]
    regulations: frozenset[str]
    state: str | None = None
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    deletions: str = "ignore"  # user.deleted: "ignore" (counted, warned) or "revoke" (no consent)
    _auth: dict[str, Any] = field(default_factory=dict, repr=False)
    _lines: dict[tuple, int] = field(default_factory=dict, repr=False)

    @property
    def lookup_field(self) -> str:
        return IDENTIFIERS[self.identifier]

    @property
    def action(self) -> str:
        return "createOrUpdate" if self.upsert else "updateOnly"

    def with_upsert(self, upsert: bool | None) -> Config:
        """Apply `--upsert/--no-upsert` (a copy), re-checking the leadID rule."""
        if upsert is None:
            return self
        if upsert and self.identifier == "leadID":
            raise ConfigError(
                f"{self.path}: --upsert cannot be used with user_identifier leadID "
                "(lead ids cannot create leads)"
            )
        return replace(self, upsert=upsert)

    def with_delivery(self, **changes: Any) -> Config:
        """Apply command-line delivery overrides (a copy); None means "not given"."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, delivery=replace(self.delivery, **changes)) if changes else self

    def credentials(self) -> Credentials:
        """Resolve credentials: MARKETO_* variables first, then the config. Raises ConfigError.

        Precedence is flag > environment > file, as everywhere: a MARKETO_CLIENT_ID set for a
        cron job or a systemd EnvironmentFile= overrides a literal value left in the file."""
        p = _Problems(self.path, self._lines)
        values: dict[str, str] = {}
        for key, env in ENV_OVERRIDES.items():
            v = os.environ.get(env)
            if not v:
                before = len(p.items)
                v = _substitute_env(self._auth.get(key), ("authentication", key), p)
                if len(p.items) > before:
                    continue  # a ${VAR} the file names is not set: already reported
            if not v:
                p.items.append(f"{self.path}: authentication.{key} is missing (set {env} or the config)")
            else:
                values[key] = str(v)
        if p.items:
            raise ConfigError(p.items)
        try:
            base = normalise_instance(values["instance"])
        except ValueError as e:
            raise ConfigError(f"{self.path}: authentication.instance: {e}") from None
        return Credentials(values["client_id"], Secret(values["client_secret"]), base)

    def identity(self) -> dict[str, Any]:
        """What the run was configured with, safe to print or store (no secret)."""
        return {
            "config": self.path,
            "user_identifier": self.identifier,
            "lookupField": self.lookup_field,
            "action": self.action,
            "upsert_mode": self.upsert,
            "regulations": sorted(self.regulations),
            "deletions": self.deletions,
            "mappings": [
                {"id": m.field, "value": m.source.name if m.source else None}
                | ({"transform": [t.describe() for t in m.transforms]} if m.transforms else {})
                for m in self.mappings
            ],
            "client_id": os.environ.get("MARKETO_CLIENT_ID") or self._auth.get("client_id"),
            "instance": without_userinfo(os.environ.get("MARKETO_INSTANCE") or self._auth.get("instance")),
        }


def without_userinfo(url: str | None) -> str | None:
    """An instance URL without a `user:password@` part: never printed, logged or stored."""
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}***@{host}{slash}{path}"


def normalise_instance(value: str) -> str:
    """Accept a REST endpoint, a base URL or a bare Munchkin id; return scheme://host[:port]."""
    value = value.strip()
    if MUNCHKIN.match(value):
        return f"https://{value}.mktorest.com"
    if "://" not in value:
        value = "https://" + value
    shown = without_userinfo(value)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"'{shown}' is not a Marketo REST endpoint, base URL or Munchkin id") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{shown}' is not a Marketo REST endpoint, base URL or Munchkin id")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"'{shown}': a user or password in the URL is not used by Marketo; remove it")
    try:  # the parser that will send the calls must accept the host (an invalid IDNA name crashed it)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
        httpx.URL(f"{parts.scheme}://{host}/")
    except (httpx.InvalidURL, UnicodeError):
        raise ValueError(f"'{shown}': '{parts.hostname}' is not a valid host name") from None
    path = parts.path.rstrip("/")
    for suffix in ("/rest/v1", "/rest", "/identity"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if path:
        raise ValueError(f"unexpected path '{parts.path}' in '{shown}'")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(
            f"plain http:// is refused for '{parts.hostname}' (credentials would travel in clear); "
            "use https://"
        )
    netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # IPv6
        netloc = f"[{parts.hostname}]" + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError with every problem found."""
    path = str(path)
    raw = _read_config(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}); save the config as UTF-8"
        ) from None
    try:
        data, lines = _parse(path, text)
        return _validate(path, data, lines)
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a Didomi integration config") from None


def _read_config(path: str) -> bytes:
    """The config's bytes. A regular file, or a pipe (`-c <(envsubst < cfg.yaml)`) that delivers
    within FIFO_WAIT_SECONDS: a FIFO nobody writes to must not hang the run. At most 1 MB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a folder, not a config file")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ConfigError(f"{path}: not a regular file; give the config file itself")
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + FIFO_WAIT_SECONDS
        while True:
            if stat.S_ISFIFO(mode):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise ConfigError(f"{path}: nothing arrived from the pipe in {FIFO_WAIT_SECONDS:g} s")
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:
                raise ConfigError(
                    f"{path}: over {MAX_CONFIG_BYTES // 1024} KB; not a Didomi integration config"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    finally:
        os.close(fd)


def _parse(path: str, text: str) -> tuple[Any, dict[tuple, int]]:
    """Parse JSON or YAML (by content) and find the line of every key, for messages."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            # `file:line` like every other config error (the line was only inside the message).
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:
        try:
            # Aliases are counted on the node graph first: a 555-byte billion-laughs config
            # must be refused before anything expands it.
            _check_aliases(path, yaml.compose(text, Loader=yaml.SafeLoader))
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if stripped.startswith(("{", "[")):
        # Tabs are JSON whitespace but YAML refuses them, which lost every line number of a
        # tab-indented JSON config. Valid JSON has no raw tab inside strings, so a space is safe.
        text = text.replace("\t", " ")
    try:  # JSON is YAML too: the composer gives every node a line.
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        node = None
    lines: dict[tuple, int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return data, lines


def _check_aliases(path: str, root: yaml.Node | None) -> None:
    """Refuse a YAML document whose aliases expand past ALIAS_BUDGET nodes (sizes memoised per
    node, so the check itself stays linear in the text)."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        kids = _children(node)
        if children_done:
            total = 1 + sum(sizes.get(id(k), 0) for k in kids)
            if total > ALIAS_BUDGET:
                raise ConfigError(
                    f"{path}:{node.start_mark.line + 1}: YAML aliases expand to over {ALIAS_BUDGET:,} "
                    "values; refused (an alias bomb?)"
                )
            sizes[id(node)] = total
        else:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _node_lines(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            _node_lines(v, key, out)
            out[key] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _node_lines(v, (*path, i), out)


class _Problems:
    def __init__(self, path: str, lines: dict[tuple, int]):
        self.path, self.lines = path, lines
        self.items: list[str] = []

    def where(self, loc: tuple) -> str:
        probe = loc
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        return f"{self.path}:{line}" if line else self.path

    def add(self, loc: tuple, message: str) -> None:
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        self.items.append(f"{self.where(loc)}: {name + ': ' if name else ''}{message}")

    def unknown_keys(
        self, obj: dict, allowed: set[str], loc: tuple, ignored: Collection[str] = frozenset()
    ) -> None:
        for key in obj:
            if key not in allowed and key not in ignored:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.add((*loc, key), f"unknown key{hint} (known: {', '.join(sorted(allowed))})")


def _substitute_env(value: Any, loc: tuple, problems: _Problems) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match) -> str:
            name = m.group(1)
            if name not in os.environ:
                problems.add(loc, f"environment variable {name} is not set")
                return ""
            return os.environ[name]

        return ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute_env(v, (*loc, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, (*loc, i), problems) for i, v in enumerate(value)]
    return value


def _validate(path: str, data: Any, lines: dict[tuple, int]) -> Config:
    p = _Problems(path, lines)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be an object (the Didomi integration JSON)")
    # ${VAR} in authentication is resolved only when credentials are needed, so a dry run
    # or a preview works without them; everywhere else a missing variable is an error now.
    auth_raw = data.get("authentication")
    data = _substitute_env({k: v for k, v in data.items() if k != "authentication"}, (), p)
    if auth_raw is not None:
        data["authentication"] = auth_raw
    p.unknown_keys(data, TOP_KEYS, (), ignored=DIDOMI_ENVELOPE_KEYS)

    type_id = data.get("type_id")
    if type_id is not None and type_id != "marketo":
        p.add(("type_id",), f"'{type_id}' is not a Marketo integration (expected 'marketo')")

    auth = data.get("authentication") or {}
    if not isinstance(auth, dict):
        p.add(("authentication",), "must be an object with client_id, client_secret, instance")
        auth = {}
    p.unknown_keys(auth, AUTH_KEYS, ("authentication",))
    for key in AUTH_KEYS & auth.keys():
        if auth[key] is not None and not isinstance(auth[key], str):
            p.add(("authentication", key), "must be a string")
    if isinstance(auth.get("instance"), str) and auth["instance"] and "${" not in auth["instance"]:
        try:
            normalise_instance(auth["instance"])
        except ValueError as e:
            p.add(("authentication", "instance"), str(e))

    props = data.get("properties") or {}
    if not isinstance(props, dict):
        p.add(("properties",), "must be an object")
        props = {}
    p.unknown_keys(props, PROPERTY_KEYS, ("properties",))
    identifier = _identifier(props.get("user_identifier", "email"), p)
    regulations = props.get("regulations", ["gdpr"])
    if isinstance(regulations, str):
        regulations = [regulations]
    if not (isinstance(regulations, list) and regulations and all(isinstance(r, str) for r in regulations)):
        p.add(("properties", "regulations"), "must be a non-empty list of regulation ids")
        regulations = ["gdpr"]

    upsert = data.get("upsert_mode", False)
    if not isinstance(upsert, bool):
        p.add(("upsert_mode",), "must be true or false")
        upsert = False
    if upsert and identifier == "leadID":
        p.add(("upsert_mode",), "upsert_mode true cannot be used with user_identifier leadID "
              "(lead ids cannot create leads)")  # fmt: skip

    mappings = _mappings(data.get("mappings"), p, identifier)

    state = data.get("state")
    if state is not None and not isinstance(state, str):
        p.add(("state",), "must be a file path")
        state = None
    delivery = _delivery(data.get("delivery") or {}, p)
    deletions = data.get("deletions", "ignore")
    if deletions not in DELETIONS:
        p.add(("deletions",), f"must be one of {', '.join(DELETIONS)}, not {deletions!r}")
        deletions = "ignore"

    if p.items:
        raise ConfigError(p.items)
    return Config(
        path=path,
        identifier=identifier,
        upsert=upsert,
        mappings=mappings,
        regulations=frozenset(r.lower() for r in regulations),
        state=state,
        delivery=delivery,
        deletions=deletions,
        _auth={k: auth.get(k) for k in AUTH_KEYS},
        _lines=lines,
    )


def _identifier(value: Any, p: _Problems) -> str:
    loc = ("properties", "user_identifier")
    if isinstance(value, list):
        if len(value) != 1:
            p.add(loc, "must be one identifier: email or leadID")
            return "email"
        value = value[0]
    if value not in IDENTIFIERS:
        close = difflib.get_close_matches(str(value), list(IDENTIFIERS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        p.add(loc, f"'{value}' is not supported{hint} (expected email or leadID)")
        return "email"
    return value


def _mappings(raw: Any, p: _Problems, identifier: str) -> list[FieldMapping]:
    if not isinstance(raw, list) or not raw:
        p.add(("mappings",), "must be a non-empty list of {id: <Marketo field>, value: <Didomi property>}")
        return []
    out: list[FieldMapping] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(raw):
        loc = ("mappings", i)
        if not isinstance(m, dict):
            p.add(loc, "must be an object {id, value}")
            continue
        p.unknown_keys(m, MAPPING_KEYS, loc)
        target = m.get("id")
        if not isinstance(target, str) or not target.strip():
            p.add((*loc, "id"), "must be a Marketo field REST name")
            continue
        if target in seen:
            p.add((*loc, "id"), f"field '{target}' is already mapped by mappings[{seen[target]}]")
        seen[target] = i
        if target == IDENTIFIERS[identifier]:
            p.add((*loc, "id"), f"'{target}' is the lookup field; it is always sent as the key")
        transforms, problems = parse_transforms(m["transform"]) if "transform" in m else ((), [])
        for problem in problems:
            p.add((*loc, "transform"), problem)
        has_const = any(t.name == "const" for t in transforms)
        source = None
        value = m.get("value")
        if value is None and not has_const:
            p.add(
                (*loc, "value"), "is required (a Didomi property, e.g. consents_purposes_newsletter_enabled)"
            )
        elif value is not None:
            if not isinstance(value, str):
                p.add((*loc, "value"), "must be a string")
            else:
                try:
                    source = parse_property(value)
                except ValueError as e:
                    p.add((*loc, "value"), str(e))
        out.append(FieldMapping(target, source, transforms, where=p.where(loc)))
    return out


def _delivery(raw: Any, p: _Problems) -> DeliverySettings:
    """Each key checked against its declared type and range (DeliverySettings)."""
    if not isinstance(raw, dict):
        p.add(("delivery",), "must be an object")
        return DeliverySettings()
    p.unknown_keys(raw, DELIVERY_KEYS, ("delivery",))
    types = get_type_hints(DeliverySettings)
    values: dict[str, Any] = {}
    for f in fields(DeliverySettings):
        if f.name not in raw:
            continue
        v, loc = raw[f.name], ("delivery", f.name)
        whole = types[f.name] in (int, int | None)
        if v is None and f.default is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or (whole and not isinstance(v, int)):
            p.add(loc, f"must be a {'whole number' if whole else 'number'}, not {v!r}")
            continue
        low, high = f.metadata["range"]
        if v <= 0:
            p.add(loc, f"must be a positive number, not {v!r}")
            continue
        if not low <= v <= high:
            bounds = f"at least {low:g}" if high == float("inf") else f"between {low:g} and {high:g}"
            why = f" ({f.metadata['why']})" if f.metadata["why"] else ""
            p.add(loc, f"must be {bounds}{why}, not {v!r}")
            continue
        values[f.name] = v
    return DeliverySettings(**values)
