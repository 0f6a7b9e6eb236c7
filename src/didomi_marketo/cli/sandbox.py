"""`sandbox`: the local Marketo-compatible server, for demos and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from didomi_marketo.cli.common import expected_errors
from didomi_marketo.errors import ConfigError


@expected_errors
def sandbox(
    port: Annotated[int, typer.Option(metavar="PORT", help="Port on 127.0.0.1 (0 picks a free one).")] = 8787,
    host: Annotated[str, typer.Option(metavar="HOST", help="Loopback address to listen on.")] = "127.0.0.1",
    leads: Annotated[
        Path | None, typer.Option(metavar="FILE", help="JSON array of existing leads to seed.")
    ] = None,
    client_id: Annotated[str, typer.Option(metavar="ID", help="Accepted client id.")] = "sandbox-client",
    client_secret: Annotated[
        str, typer.Option(metavar="SECRET", help="Accepted client secret.")
    ] = "sandbox-secret",
    rate_calls: Annotated[int, typer.Option(metavar="N", help="Calls allowed per rate window.")] = 100,
    rate_window: Annotated[float, typer.Option(metavar="SECONDS", help="Rate window in seconds.")] = 20.0,
    max_concurrency: Annotated[int, typer.Option(metavar="N", help="Calls allowed in flight.")] = 10,
    daily_quota: Annotated[int, typer.Option(metavar="N", help="Calls allowed per day.")] = 50_000,
    token_ttl: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds an access token lives.")
    ] = 3600.0,
    latency: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds each REST call takes.")] = 0.0,
    bulk_queued_seconds: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds a bulk import job stays Queued at least.")
    ] = 1.0,
    bulk_import_seconds: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Seconds a bulk import job imports (plus 100,000 rows/s)."),
    ] = 2.0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KIND:TIMES", help="KIND:TIMES, e.g. code:604:3 or http:502:2 or drop:1 (repeatable)."
        ),
    ] = None,
) -> None:
    """Run a local Marketo-compatible server (for demos and tests; loopback only)."""
    from didomi_marketo.sandbox import SandboxConfig, serve_forever

    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError("the sandbox only listens on loopback (127.0.0.1, localhost, ::1)")
    cfg = SandboxConfig(
        client_id=client_id, client_secret=client_secret, token_ttl=token_ttl,
        rate_calls=rate_calls, rate_window=rate_window, max_concurrency=max_concurrency,
        daily_quota=daily_quota, latency=latency, leads_file=str(leads) if leads else None,
        bulk_queued_seconds=bulk_queued_seconds, bulk_import_seconds=bulk_import_seconds,
    )  # fmt: skip
    faults = []
    for f in fault or []:
        kind, _, times = f.rpartition(":")
        if not kind or not times.isdigit():
            raise ConfigError(f"--fault {f!r}: expected KIND:TIMES, e.g. code:604:3")
        faults.append((kind, int(times)))
    serve_forever(cfg, host, port, faults=faults)


def register(app: typer.Typer) -> None:
    app.command()(sandbox)
