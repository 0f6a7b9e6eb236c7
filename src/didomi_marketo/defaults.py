"""The defaults a user can override, declared once, in a module that imports nothing.

The command line shows them in `--help` and its option defaults; reading them from the modules
that enforce them would import those modules (asyncio, httpx, the fold...) before any command
runs. Each enforcing module imports its values from here under the same name.
"""

from __future__ import annotations

# Marketo's documented limits per instance, shared by every integration (our defaults too).
RATE_CALLS = 100  # calls per rate window
RATE_WINDOW_SECONDS = 20.0
MAX_CONCURRENCY = 10  # calls in flight
DEFAULT_DAILY_QUOTA = 50_000  # Marketo's default daily API quota (calls a day, reset at midnight US Central)

# Far above any real Didomi record (a few KB), far below what would exhaust memory.
MAX_LINE_BYTES = 16 * 1024 * 1024
DEFAULT_BULK_THRESHOLD = 50_000  # leads to send from which `--via auto` considers bulk import
DEFAULT_SAMPLES = 5  # sample payloads `preview` shows
