"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from didomi_marketo.sandbox import MarketoSandbox, SandboxConfig


@pytest.fixture
def sandbox() -> Iterator[MarketoSandbox]:
    """A started Marketo sandbox with the default config."""
    sb = MarketoSandbox(SandboxConfig()).start()
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def sandbox_factory() -> Iterator[Callable[..., MarketoSandbox]]:
    """Call with SandboxConfig keyword arguments; every sandbox started is stopped at teardown."""
    started: list[MarketoSandbox] = []

    def make(**config: Any) -> MarketoSandbox:
        sb = MarketoSandbox(SandboxConfig(**config)).start()
        started.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in started:
            sb.stop()


# --------------------------------------------------------------------------------------------
# Helpers for the CLI tests (appended by the core engineer)

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from didomi_marketo.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_exports"
MAPPINGS = [
    {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"},
    {"id": "didomiAnalyticsOptIn", "value": "consents_purposes_product_analytics_enabled"},
]


def make_config(directory: Path, sandbox: MarketoSandbox | None = None, **overrides: Any) -> Path:
    """A Didomi console config pointing at `sandbox`, written as JSON; returns its path."""
    cfg: dict[str, Any] = {
        "type_id": "marketo",
        "authentication": {
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "instance": (sandbox.base_url + "/rest") if sandbox else "https://123-ABC-456.mktorest.com/rest",
        },
        "properties": {"user_identifier": ["email"]},
        "mappings": MAPPINGS,
        "upsert_mode": False,
    }
    cfg.update(overrides)
    path = directory / "config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def write_ndjson(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def event(key: str | None, at: str, purposes: dict[str, bool | None], **extra: Any) -> dict[str, Any]:
    """A Didomi consent event (partial update) for organization user `key`."""
    user = {"id": "didomi-" + str(key)}
    if key is not None:
        user["organization_user_id"] = key
    e = {
        "id": f"evt-{key}-{at}",
        "created_at": at,
        "user": user,
        "consents": {"purposes": [{"id": p, "enabled": v} for p, v in purposes.items()]},
    }
    e.update(extra)
    return e


@pytest.fixture
def cli() -> Callable[..., Any]:
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: Any, env: dict[str, str] | None = None, input: Any = None) -> Any:
        return runner.invoke(app, [str(a) for a in args], env=env, input=input, catch_exceptions=False)

    return invoke


def run_subprocess(*args: Any, env: dict[str, str] | None = None, timeout: float = 120, **kw: Any):
    """Run the real console entry point (python -m didomi_marketo) in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "didomi_marketo", *map(str, args)],
        capture_output=True, text=True, env=full_env, timeout=timeout, **kw,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Cloud storage emulators (tests/emulators.py): one moto S3 server and one gcp-storage-emulator
# per session, each a real HTTP server on a free 127.0.0.1 port, stopped at the end.

from emulators import NO_METADATA, GCSEmulator, S3Emulator, gcs_emulator, s3_emulator  # noqa: E402

# No credential chain in any test may reach a cloud metadata service.
os.environ.update(NO_METADATA)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Emulator]:
    with s3_emulator() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def gcs() -> Iterator[GCSEmulator]:
    with gcs_emulator() as emulator:
        yield emulator
