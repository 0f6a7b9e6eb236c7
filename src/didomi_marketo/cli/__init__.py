"""The `didomi-marketo` command line: parse options, call one library function, render, exit.

Each command module registers its commands here, explicitly; `common` holds what they share.
"""

from __future__ import annotations

from didomi_marketo.cli import compliance, run, sandbox, state, workbench
from didomi_marketo.cli.common import app

for _module in (run, workbench, state, compliance, sandbox):
    _module.register(app)


def main() -> None:
    """Console entry point."""
    app()


__all__ = ["app", "main"]
