"""One small exception root, grouped by what the caller does (as singer-sdk does).

The CLI maps each branch to an exit code: ConfigError -> 2, FatalError -> 3.
Record-level problems are never exceptions: they are outcomes, reported per record.
"""

from __future__ import annotations


class DidomiMarketoError(Exception):
    """Root of every error this library raises on purpose."""


class ConfigError(DidomiMarketoError):
    """The config or the command line is unusable; nothing was sent. Carries every problem found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class FatalError(DidomiMarketoError):
    """The run cannot go on: bad credentials, access denied, quota, unreachable instance."""


class AuthError(FatalError):
    """Marketo refused the client credentials (HTTP 401 at /identity) or access (603)."""
