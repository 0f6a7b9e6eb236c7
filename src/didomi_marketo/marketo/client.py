"""Marketo REST client: token handling, one call, and the retry policy around it.

The access token travels only in the `Authorization: Bearer` header. The client secret travels
in the identity URL's query string, the only place Adobe documents for it (its OpenAPI spec lists
`client_id`, `client_secret`, `grant_type` as query parameters of both GET and POST
/identity/oauth/token), so that URL is never put in a message. No message raised from here
contains a URL, a token or the client secret, and Marketo's answers are redacted before they are
read (a server may echo the request in an error message).

Every call has a total deadline (`timeout`, connect to last byte: a server dripping a byte a
second cannot hold it open), and an answer may not inflate past MAX_RESPONSE_BYTES.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import orjson

from didomi_marketo import __version__
from didomi_marketo.errors import AuthError
from didomi_marketo.marketo.codes import (
    NETWORK,
    TIMEOUT,
    TOO_LARGE,
    UNKNOWN_ERROR,
    UNREADABLE,
    Action,
    describe,
    request_action,
)
from didomi_marketo.marketo.credentials import Credentials
from didomi_marketo.marketo.limiter import MAX_CONCURRENCY, RATE_WINDOW_SECONDS, Clock, RealClock, Stopped
from didomi_marketo.marketo.redact import redact_bytes, register

T = TypeVar("T")
TOKEN_PATH = "/identity/oauth/token"
DEFAULT_TIMEOUT = 120.0  # seconds a call may take, connect to last byte
KEEPALIVE_SECONDS = RATE_WINDOW_SECONDS + 10  # an idle connection outlives a wait for the window
# A transient failure is given up only after this many retries spanning this long (what Didomi's
# own integration promises).
RETRY_MIN_ATTEMPTS = 5
RETRY_MIN_SECONDS = 300.0
# Marketo's largest answers (describe, 300 results) are well under 1 MB; a bigger one is broken.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class CallFailed(Exception):
    """One request-level failure, with the code that decides what happens next."""

    def __init__(self, code: str, message: str, *, maybe_applied: bool = False):
        self.code = code
        self.message = message
        self.maybe_applied = maybe_applied  # Marketo may have applied the batch anyway
        super().__init__(f"{code}: {message}" if message else code)

    @property
    def action(self) -> Action:
        return request_action(self.code)


class GaveUp(Exception):
    """A transient failure outlived the retry policy."""

    def __init__(self, last: CallFailed, attempts: int, elapsed: float):
        self.last, self.attempts, self.elapsed = last, attempts, elapsed
        super().__init__(f"gave up after {attempts} attempts over {elapsed:.0f} s; last error {last}")


@dataclass
class Token:
    value: str = field(repr=False)  # never in a repr, a log or a traceback
    expires_at: float = 0.0


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: building one (loading the CA bundle) takes tens of ms, and a
    sync makes several clients (the schema check's, then the delivery's right after the fold)."""
    return httpx.create_ssl_context()


def _verify(base_url: str) -> ssl.SSLContext:
    """The TLS context for `base_url`. Plain http (config allows it on loopback only: the
    sandbox) never uses one, so it gets a context that trusts no certificate at all instead of
    the CA bundle, whose 30-40 ms are on the way to the first call."""
    if base_url.lower().startswith("https:"):
        return _tls()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and trusts none


class MarketoClient:
    """Talks to one Marketo instance. Use as `async with MarketoClient(...) as client`."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = MAX_CONCURRENCY,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.credentials = credentials
        self.clock = clock or RealClock()
        self.deadline = timeout
        register(str(credentials.client_secret))
        self._http = httpx.AsyncClient(
            base_url=credentials.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            # Idle connections are kept past the rate window: with httpx's 5 s default, a run
            # that waited out the window (20 s) opened every connection anew, and that window's
            # first round of calls took 350-450 ms instead of 300.
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=KEEPALIVE_SECONDS,
            ),
            headers={"User-Agent": f"didomi-marketo/{__version__}", "Accept-Encoding": "gzip"},
            transport=transport,
            follow_redirects=False,
            verify=_verify(credentials.base_url),
        )
        self._token: Token | None = None
        self._token_lock = asyncio.Lock()
        # When each recent REST call started: Marketo counts describe and usage calls in the
        # same rate window as syncs, so the delivery limiter starts from these.
        self.recent_calls: deque[float] = deque(maxlen=100)
        self._tokens_are_tiny = False
        self.reauths = 0

    async def __aenter__(self) -> MarketoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    # -- auth ---------------------------------------------------------------------------------

    async def token(self) -> str:
        """A token valid for a while yet; fetched once for all concurrent callers."""
        token = self._token
        if token is not None and self.clock.now() < token.expires_at:
            return token.value
        async with self._token_lock:
            token = self._token
            if token is not None and self.clock.now() < token.expires_at:
                return token.value
            self._token = await self._fetch_token()
            return self._token.value

    @property
    def current_token(self) -> Token | None:
        return self._token

    def reuse_token(self, token: Token) -> None:
        """Start from a token another client of this process fetched (same clock), instead of
        spending an identity round trip on a second one."""
        if self._token is None:
            self._token = token

    def invalidate(self, value: str | None) -> None:
        """Forget the token a call was refused with (601/602), unless already replaced."""
        if self._token is not None and (value is None or self._token.value == value):
            self._token = None
            self.reauths += 1

    async def _fetch_token(self) -> Token:
        creds = self.credentials
        params = {
            "grant_type": "client_credentials",
            "client_id": creds.client_id,
            "client_secret": str(creds.client_secret),
        }
        for attempt in range(3):
            # Not redacted: this answer is where the token comes from (an old one may come again).
            resp = await self._exchange("GET", TOKEN_PATH, redact=False, params=params)
            if resp.status_code == 401:
                raise AuthError(
                    f"Marketo refused the client credentials (HTTP 401 at {TOKEN_PATH}); "
                    "check client_id and client_secret"
                )
            if resp.status_code != 200:
                raise CallFailed(f"http:{resp.status_code}", f"{TOKEN_PATH} answered {resp.status_code}")
            try:
                body = orjson.loads(resp.content)
                value = body["access_token"]
                expires_in = float(body.get("expires_in", 0))
                if not isinstance(value, str) or not value:
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise CallFailed(UNREADABLE, f"{TOKEN_PATH} answered an unreadable body") from None
            register(value)
            if expires_in >= 1:
                # Renew a little before Marketo would expire it: 10% of its life, at most 60 s.
                margin = min(60.0, expires_in * 0.1)
                return Token(value, self.clock.now() + expires_in - margin)
            if self._tokens_are_tiny or attempt == 2:
                # This server mints tokens that live under a second: use each one at once.
                self._tokens_are_tiny = True
                return Token(value, self.clock.now())
            # expires_in 0: this token dies within the second; Marketo mints a new one after.
            await self.clock.sleep(1.0)
        raise AssertionError("unreachable")

    # -- calls --------------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        params: dict[str, Any] | None = None,
        form: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        data: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """One REST call. Returns the body when `success` is true; raises CallFailed otherwise.

        `body` is JSON already encoded (the engine encodes a batch before taking a call slot);
        `form` is sent url-encoded (Marketo's `POST ?_method=GET` for queries over 8 KB);
        `files` and `data` make a multipart/form-data body (bulk import).
        """
        content = orjson.dumps(json) if json is not None else body
        headers = {}
        if content is not None:
            headers["Content-Type"] = "application/json"
        elif form is not None:
            content = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        resp, token = await self._request(
            method, path, params=params, content=content, headers=headers, files=files, data=data
        )
        return self._answer(resp, path, token)

    async def fetch_file(self, path: str) -> bytes:
        """GET a file Marketo serves as text (bulk failures/warnings CSVs); an error comes as JSON."""
        resp, token = await self._request("GET", path)
        if resp.content_type.lower().startswith("text/"):
            return resp.content
        if not resp.content.strip():
            return b""
        self._answer(resp, path, token)  # raises CallFailed for success:false
        return b""

    async def _request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **request: Any
    ) -> tuple[_Reply, str]:
        """Send with a valid token; transport failures and non-200 statuses become CallFailed."""
        token = await self.token()
        headers = {**(headers or {}), "Authorization": f"Bearer {token}"}
        self.recent_calls.append(self.clock.now())
        resp = await self._exchange(method, path, headers=headers, **request)
        if resp.status_code != 200:
            raise CallFailed(
                f"http:{resp.status_code}",
                f"{path} answered HTTP {resp.status_code}",
                maybe_applied=resp.status_code >= 500,
            )
        return resp, token

    async def _exchange(self, method: str, path: str, *, redact: bool = True, **request: Any) -> _Reply:
        """One HTTP exchange within the call's total deadline, its answer capped and redacted.
        Transport failures become CallFailed (without the URL: it may carry the secret)."""
        try:
            async with asyncio.timeout(self.deadline):
                async with self._http.stream(method, path, **request) as resp:
                    content = await _read_capped(resp, path)
                    content = redact_bytes(content) if redact else content
                    return _Reply(resp.status_code, resp.headers.get("Content-Type", ""), content)
        except TimeoutError:
            raise CallFailed(
                TIMEOUT, f"{path}: no complete answer within {self.deadline:g} s", maybe_applied=True
            ) from None
        except httpx.TimeoutException as e:
            raise CallFailed(TIMEOUT, f"{path}: {_transport_reason(e)}", maybe_applied=True) from None
        except httpx.HTTPError as e:
            raise CallFailed(NETWORK, f"{path}: {_transport_reason(e)}", maybe_applied=True) from None

    def _answer(self, resp: _Reply, path: str, token: str) -> dict[str, Any]:
        try:
            body = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise CallFailed(
                UNREADABLE, f"{path} answered a body that is not JSON", maybe_applied=True
            ) from None
        if not isinstance(body, dict):
            raise CallFailed(UNREADABLE, f"{path} answered JSON that is not an object", maybe_applied=True)
        if body.get("success") is not True:
            errors = body.get("errors")
            first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
            code = str(first.get("code", ""))
            message = str(first.get("message", "")) or describe(code)
            if not code.isdigit():  # Marketo's codes are numbers; anything else is one row
                code, message = UNKNOWN_ERROR, f"success:false with code {code or 'none'!r}: {message}"
            failure = CallFailed(code, message)
            if failure.action is Action.REAUTH:
                self.invalidate(token)
            raise failure
        return body

    async def usage_today(self) -> int:
        """Calls spent today. Raises CallFailed, also for an answer of an unexpected shape."""
        body = await self.call("GET", "/rest/v1/stats/usage.json")
        result = body.get("result") or []
        try:
            total = result[0].get("total", 0) if result else 0
            if isinstance(total, bool) or not isinstance(total, int | float):
                raise TypeError
            return int(total)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError):
            raise CallFailed(UNREADABLE, "/rest/v1/stats/usage.json answered an unexpected body") from None


@dataclass(frozen=True, slots=True)
class _Reply:
    status_code: int
    content_type: str
    content: bytes


async def _read_capped(resp: httpx.Response, path: str) -> bytes:
    """The body, inflated by us (not httpx) so that a compressed bomb stops at the cap."""
    if resp.is_stream_consumed:  # built in memory (a mock transport): nothing left to stream
        return resp.content
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflater: Any = zlib.decompressobj(wbits=47)  # gzip or zlib, by its header
    elif encoding in ("identity", ""):
        inflater = None
    else:
        raise CallFailed(UNREADABLE, f"{path} answered in an unsupported encoding", maybe_applied=True)
    chunks: list[bytes] = []
    size = 0
    try:
        async for raw in resp.aiter_raw():
            data = raw
            while data:
                if inflater is None:
                    piece, data = data, b""
                else:  # never inflate more than the cap allows, whatever one chunk holds
                    piece = inflater.decompress(data, MAX_RESPONSE_BYTES - size + 1)
                    data = inflater.unconsumed_tail
                size += len(piece)
                if size > MAX_RESPONSE_BYTES:
                    raise CallFailed(
                        TOO_LARGE,
                        f"{path} answered over {MAX_RESPONSE_BYTES // 2**20} MB; not read",
                        maybe_applied=True,
                    )
                chunks.append(piece)
        if inflater is not None:
            chunks.append(inflater.flush())
    except zlib.error:
        raise CallFailed(
            UNREADABLE, f"{path} answered a corrupt compressed body", maybe_applied=True
        ) from None
    return b"".join(chunks)


def _transport_reason(e: httpx.HTTPError) -> str:
    """The kind of transport failure, without the URL (it may carry credentials)."""
    name = type(e).__name__
    cause: BaseException | None = e
    while cause is not None:  # a TLS failure is no "cannot connect": say which
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or "untrusted certificate"
            return (
                f"TLS certificate verification failed: {why} (a proxy intercepting TLS? "
                "point SSL_CERT_FILE at its CA)"
            )
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause.reason or type(cause).__name__}"
        cause = cause.__cause__ or cause.__context__
    detail = {
        "ConnectError": "cannot connect",
        "ConnectTimeout": "connection timed out",
        "ReadTimeout": "no answer in time",
        "WriteTimeout": "could not send in time",
        "PoolTimeout": "no free connection in time",
        "RemoteProtocolError": "connection closed without an answer",
        "ReadError": "connection broken while reading the answer",
        "WriteError": "connection broken while sending",
    }.get(name, "transport error")
    return f"{detail} ({name})"


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter; a transient failure is given up only after at least
    `min_attempts` retries spanning at least `min_seconds` (what Didomi's integration promises).
    """

    clock: Clock
    min_attempts: int = RETRY_MIN_ATTEMPTS
    min_seconds: float = RETRY_MIN_SECONDS
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_reauths: int = 3
    rng: random.Random | None = None
    retries: int = 0
    backoff_seconds: float = 0.0
    rate_limited: int = 0
    concurrency_limited: int = 0

    def __post_init__(self) -> None:
        self.rng = self.rng or random.Random()

    def delay(self, attempt: int) -> float:
        full = min(self.max_delay, self.base_delay * 2**attempt)
        return full * (0.5 + 0.5 * self.rng.random())  # type: ignore[union-attr]

    async def run(
        self, attempt_call: Callable[[], Awaitable[T]], should_stop: Callable[[], str | None] | None = None
    ) -> T:
        """Call until success. REAUTH retries at once; RETRY backs off; the rest raise."""
        first_failure: float | None = None
        transient = 0
        reauths = 0
        while True:
            try:
                return await attempt_call()
            except CallFailed as failure:
                action = failure.action
                if failure.code == "606":
                    self.rate_limited += 1
                elif failure.code == "615":
                    self.concurrency_limited += 1
                if action is Action.REAUTH and reauths < self.max_reauths:
                    reauths += 1
                    self.retries += 1
                    continue
                if action not in (Action.RETRY, Action.REAUTH):
                    raise
                now = self.clock.now()
                if first_failure is None:
                    first_failure = now
                elapsed = now - first_failure
                if transient >= self.min_attempts and elapsed >= self.min_seconds:
                    raise GaveUp(failure, transient + 1, elapsed) from None
                wait = self.delay(transient)
                transient += 1
                self.retries += 1
                self.backoff_seconds += wait
                await self.clock.sleep(wait)
                if should_stop is not None and (why := should_stop()):
                    raise Stopped(why) from None
