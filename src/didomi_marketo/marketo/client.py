"""Marketo REST client: token handling, one call, and the retry policy around it.

The access token travels only in the `Authorization: Bearer` header. No message raised from
here contains a URL with a query string, a token or the client secret.
"""

from __future__ import annotations

import asyncio
import random
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
    UNKNOWN_ERROR,
    UNREADABLE,
    Action,
    describe,
    request_action,
)
from didomi_marketo.marketo.credentials import Credentials
from didomi_marketo.marketo.limiter import Clock, RealClock, Stopped

T = TypeVar("T")
TOKEN_PATH = "/identity/oauth/token"


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


class MarketoClient:
    """Talks to one Marketo instance. Use as `async with MarketoClient(...) as client`."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        timeout: float = 120.0,
        max_connections: int = 10,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.credentials = credentials
        self.clock = clock or RealClock()
        self._http = httpx.AsyncClient(
            base_url=credentials.base_url,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"User-Agent": f"didomi-marketo/{__version__}", "Accept-Encoding": "gzip"},
            transport=transport,
            follow_redirects=False,
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
            try:
                resp = await self._http.get(TOKEN_PATH, params=params)
            except httpx.HTTPError as e:
                raise CallFailed(NETWORK, f"{TOKEN_PATH}: {_transport_reason(e)}") from None
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
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                raise CallFailed(UNREADABLE, f"{TOKEN_PATH} answered an unreadable body") from None
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
        if resp.headers.get("Content-Type", "").lower().startswith("text/"):
            return resp.content
        if not resp.content.strip():
            return b""
        self._answer(resp, path, token)  # raises CallFailed for success:false
        return b""

    async def _request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **request: Any
    ) -> tuple[httpx.Response, str]:
        """Send with a valid token; transport failures and non-200 statuses become CallFailed."""
        token = await self.token()
        headers = {**(headers or {}), "Authorization": f"Bearer {token}"}
        self.recent_calls.append(self.clock.now())
        try:
            resp = await self._http.request(method, path, headers=headers, **request)
        except httpx.TimeoutException as e:
            raise CallFailed(TIMEOUT, f"{path}: {_transport_reason(e)}", maybe_applied=True) from None
        except httpx.HTTPError as e:
            raise CallFailed(NETWORK, f"{path}: {_transport_reason(e)}", maybe_applied=True) from None
        if resp.status_code != 200:
            raise CallFailed(
                f"http:{resp.status_code}",
                f"{path} answered HTTP {resp.status_code}",
                maybe_applied=resp.status_code >= 500,
            )
        return resp, token

    def _answer(self, resp: httpx.Response, path: str, token: str) -> dict[str, Any]:
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

    async def usage_today(self) -> int | None:
        body = await self.call("GET", "/rest/v1/stats/usage.json")
        result = body.get("result") or []
        return int(result[0].get("total", 0)) if result else 0


def _transport_reason(e: httpx.HTTPError) -> str:
    """The kind of transport failure, without the URL (it may carry credentials)."""
    name = type(e).__name__
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
    min_attempts: int = 5
    min_seconds: float = 300.0
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
