"""Marketo API credentials: the one place a client secret lives, and how it stays unprinted."""

from __future__ import annotations

from dataclasses import dataclass, field


class Secret(str):
    """A string that never shows itself in repr, str-formatting of containers, or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')"


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: Secret = field(repr=False)
    base_url: str  # scheme://host[:port], without /rest or /identity
