"""The `didomi-marketo` command line: parse options, call one library function, render, exit.

Each command module registers its commands here, explicitly; `common` holds what they share.
"""

from __future__ import annotations

from didomi_marketo.cli import compliance, init, run, sandbox, state, workbench
from didomi_marketo.cli.common import app, main
from didomi_marketo.cli.examples import add_examples

for _module in (init, run, workbench, state, compliance, sandbox):
    _module.register(app)
add_examples(app)  # cli/examples.py: 2-3 real command lines at the end of each --help


__all__ = ["app", "main"]
