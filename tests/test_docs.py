"""Every command has help, and the README documents every command and every option."""

from __future__ import annotations

import re

import pytest
import typer.main
from conftest import ROOT

from didomi_marketo.cli import app

README = (ROOT / "README.md").read_text() + (ROOT / "docs" / "workbench.md").read_text()


def commands() -> list[tuple[str, object]]:
    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
        else:
            out.append((name, cmd))
    return out


@pytest.mark.parametrize("name,cmd", commands(), ids=[n for n, _ in commands()])
def test_command_is_documented_with_its_options(name, cmd, cli):
    result = cli(*name.split(), "--help")
    assert result.exit_code == 0 and "Usage" in result.output
    assert cmd.help, f"{name} has no help text"
    assert re.search(rf"didomi-marketo {name}\b|`{name.split()[-1]}`", README), f"{name} not in README"
    for param in cmd.params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in README, f"{name} {opt} is not documented in the README"
