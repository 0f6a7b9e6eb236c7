"""CLI commands of the mapping workbench: preview, check, fields (registered on cli.app)."""

from __future__ import annotations
