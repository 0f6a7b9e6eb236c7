"""The `didomi-marketo` command line: parse options, call one library function, render, exit.

Each command module registers its commands here, explicitly; `common` holds what they share.
"""

from __future__ import annotations

import sys

# httpx imports its own command line (click, pygments, rich) when imported: 50 ms of every
# start-up, for a `httpx.main` this program never calls. None in sys.modules makes that one
# import fail, and httpx then defines a stub `main` instead (its documented fallback).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from didomi_marketo.cli import compliance, init, run, sandbox, state, workbench  # noqa: E402
from didomi_marketo.cli.common import app, main  # noqa: E402
from didomi_marketo.cli.examples import add_examples  # noqa: E402

for _module in (init, run, workbench, state, compliance, sandbox):
    _module.register(app)
add_examples(app)  # cli/examples.py: 2-3 real command lines at the end of each --help


__all__ = ["app", "main"]
