"""`state show|export|reset`: inspect or reset the store of incremental syncs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from didomi_marketo import logs
from didomi_marketo.cli.common import WaitLockOpt, expected_errors, out
from didomi_marketo.errors import ConfigError

state_app = typer.Typer(help="Inspect or reset the state store of incremental syncs.", no_args_is_help=True)
StateFileArg = Annotated[
    Path,
    typer.Option(
        "--state",
        envvar="DIDOMI_MARKETO_STATE",
        metavar="FILE",
        help="The state file (as given to sync --state).",
    ),
]


@state_app.command("show")
@expected_errors
def state_show(
    state: StateFileArg,
    key: Annotated[str | None, typer.Argument(metavar="KEY", help="A lead key (email or lead id).")] = None,
) -> None:
    """Counts, or one lead's last confirmed values, pending payload and skip reason."""
    from didomi_marketo.didomi.fold import normalise_key
    from didomi_marketo.state import StateStore, lead_record

    store = StateStore(state, readonly=True)
    try:
        if key is None:
            out.print_json(orjson.dumps(store.counts()).decode())
            return
        lookup = store.lead(key) or store.lead(normalise_key(key, "email")[0] or key)
        if lookup is None:
            logs.error(f"{key}: not in {state}", "not_found", key=key)
            raise typer.Exit(1)
        out.print_json(orjson.dumps(lead_record(lookup)).decode())
    finally:
        store.close()


@state_app.command("export")
@expected_errors
def state_export(
    state: StateFileArg,
    pending: Annotated[bool, typer.Option("--pending", help="Only leads waiting to be re-sent.")] = False,
) -> None:
    """Every lead in the state as NDJSON on stdout."""
    from didomi_marketo.state import StateStore

    store = StateStore(state, readonly=True)
    try:
        for rec in store.export(pending_only=pending):
            sys.stdout.write(orjson.dumps(rec).decode() + "\n")
    finally:
        store.close()


@state_app.command("reset")
@expected_errors
def state_reset(
    state: StateFileArg,
    yes: Annotated[bool, typer.Option("--yes", help="Do it: the next sync sends everything.")] = False,
    wait_lock: WaitLockOpt = 0.0,
) -> None:
    """Forget everything: the next sync re-sends every lead (like --full, for good)."""
    from didomi_marketo.state import reset_state

    if not yes:
        raise ConfigError("state reset deletes the state; add --yes to confirm")
    reset_state(state, wait_lock)
    out.print(f"reset {state}")


def register(app: typer.Typer) -> None:
    app.add_typer(state_app, name="state")
