"""`init`: write a commented starter config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from didomi_marketo import logs
from didomi_marketo.cli.common import expected_errors, out
from didomi_marketo.errors import ConfigError

if TYPE_CHECKING:  # the command imports what it runs (see cli/common.py)
    from didomi_marketo.marketo.credentials import Credentials


@expected_errors
def init(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="Write the config here (default: stdout)."),
    ] = None,
    from_didomi: Annotated[
        Path | None,
        typer.Option(
            "--from-didomi",
            metavar="FILE",
            help="The Marketo integration JSON from the Didomi console: keep its mappings (not its secrets).",
        ),
    ] = None,
    instance: Annotated[
        str | None,
        typer.Option(
            "--instance",
            metavar="URL",
            help="Suggest the instance's consent-like boolean fields (needs MARKETO_CLIENT_ID/SECRET).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --output if it exists.")] = False,
) -> None:
    """Write a commented starter config (YAML): edit it, then `check` and `sync --dry-run` it."""
    from didomi_marketo.marketo.schema import read_lead_fields
    from didomi_marketo.starter import consent_like, starter_config

    if output is not None and output.exists() and not force:
        raise ConfigError(f"{output} exists: add --force to overwrite it")
    console = _read_console(from_didomi) if from_didomi is not None else None
    suggestions = None
    if instance is not None:
        suggestions = consent_like(read_lead_fields(_credentials(instance)))
        if not suggestions:
            logs.warning(f"{instance}: no writable boolean field looks like consent; map one by name")
    text = starter_config(console, instance, suggestions)
    if output is None:
        out.file.write(text)
        return
    try:
        output.write_text(text)
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot write ({e.strerror})") from None
    logs.event("written", f"wrote {output}", file=str(output), suggestions=len(suggestions or []))


def _read_console(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"--from-didomi {path}: cannot read ({e.strerror})") from None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        import yaml

        try:  # the same config as YAML is fine too
            value = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise ConfigError(f"--from-didomi {path}: neither JSON nor YAML ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f'--from-didomi {path}: expected the integration object ({{"type_id": ...}})')
    return value


def _credentials(instance: str) -> Credentials:
    from didomi_marketo.config import normalise_instance
    from didomi_marketo.marketo.credentials import Credentials, Secret

    problems = [f"--instance: set {v} in the environment" for v in ("MARKETO_CLIENT_ID", "MARKETO_CLIENT_SECRET")
                if not os.environ.get(v)]  # fmt: skip
    if problems:
        raise ConfigError(problems)
    try:
        base = normalise_instance(instance)
    except ValueError as e:
        raise ConfigError(f"--instance {instance}: {e}") from None
    return Credentials(os.environ["MARKETO_CLIENT_ID"], Secret(os.environ["MARKETO_CLIENT_SECRET"]), base)


def register(app: typer.Typer) -> None:
    app.command()(init)
