"""One small exception root, grouped by what the caller does (as singer-sdk does).

Each branch carries its exit code, so the CLI maps every error the same way:
ConfigError -> 2, FatalError -> 3, LockHeld -> 4 (see EXIT_CODES).
Record-level problems are never exceptions: they are outcomes, reported per record.
"""

from __future__ import annotations

from typing import ClassVar

# The contract with cron, systemd and alerting (README "Exit codes"; `sync --help` lists it).
EXIT_CODES = {
    0: "every lead delivered or expectedly skipped",
    1: "records rejected, or leads failed or skipped unexpectedly",
    2: "usage or config error: nothing was sent",
    3: "aborted, a human must act (credentials, access, quota, crash)",
    4: "the state is locked by a run still going (safe to ignore)",
}


class DidomiMarketoError(Exception):
    """Root of every error this library raises on purpose."""

    exit_code: ClassVar[int] = 1


class ConfigError(DidomiMarketoError):
    """The config or the command line is unusable; nothing was sent. Carries every problem found."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class FatalError(DidomiMarketoError):
    """The run cannot go on: bad credentials, access denied, quota, unreachable instance."""

    exit_code = 3


class LockHeld(FatalError):
    """Another run holds the state: an overlap, not a failure (its own exit code, so alerting
    can tell a slow previous run from one that needs a human)."""

    exit_code = 4


class AuthError(FatalError):
    """Marketo refused the client credentials (HTTP 401 at /identity) or access (603)."""
