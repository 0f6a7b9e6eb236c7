"""Every secret this process knows (the client secret, each access token), and their removal from
anything it writes.

A server may echo the request in an error message (the token in `errors[].message`, the secret of
the identity URL's query string), so the client redacts Marketo's answers before reading them, and
every writer (report files, the state, stderr, the JSON log) passes its output through `redact`
as well, whatever the text's source. The forms a secret travels in are all covered: as is,
JSON-escaped, and URL-encoded.
"""

from __future__ import annotations

from urllib.parse import quote, quote_plus

import orjson

MASK = "***"
MIN_LENGTH = 6  # shorter values would mask ordinary words; no real secret or token is that short
_forms: list[str] = []  # longest first, so a longer form is never half-masked by a shorter one
_byte_forms: list[bytes] = []


def register(secret: str) -> None:
    """Remember a secret for the rest of the process."""
    if len(secret) < MIN_LENGTH:
        return
    forms = {secret, orjson.dumps(secret).decode()[1:-1], quote_plus(secret), quote(secret, safe="")}
    new = forms - set(_forms)
    if new:
        _forms.extend(new)
        _forms.sort(key=len, reverse=True)
        _byte_forms[:] = [f.encode() for f in _forms]


def redact(text: str) -> str:
    for form in _forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


def redact_bytes(data: bytes) -> bytes:
    for form in _byte_forms:
        if form in data:
            data = data.replace(form, b"***")
    return data


def known() -> bool:
    return bool(_forms)
