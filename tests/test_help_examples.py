"""Every example at the end of a `--help` runs, as printed, against the sandbox and the sample data.

The examples use an operator's names: `exports/` (the Didomi files), `marketo.yaml` (the config),
`new.yaml` (a changed mapping), `console.json` (the Didomi console's JSON), `leads.json`. Here
they are sample_exports/ files in a scratch folder, and MARKETO_INSTANCE (which beats the file)
points at a sandbox on a free port. Two rewrites, both said here: the sandbox examples get
`--port 0` (8787 may be busy on a shared machine), and `init --instance http://127.0.0.1:8787`
gets this sandbox's address.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main
from conftest import SAMPLES

from didomi_marketo.cli import app

BIN = Path(sys.executable).parent
ORDER = ["sync", "preview", "check", "fields", "reconcile", "retry", "explain",
         "state show", "state export", "state reset", "init", "sandbox"]  # fmt: skip


def help_examples() -> list[tuple[str, str]]:
    group = typer.main.get_command(app)
    names = []
    for name, cmd in group.commands.items():
        names += [f"{name} {sub}" for sub in cmd.commands] if hasattr(cmd, "commands") else [name]  # type: ignore[attr-defined]
    found = []
    for name in sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        text = subprocess.run([BIN / "didomi-marketo", *name.split(), "--help"], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "80"}, check=True).stdout  # fmt: skip
        lines = text.split("Examples:", 1)[1].split("Exit codes:")[0].splitlines()
        found += [(name, line.strip()) for line in lines if line.strip().startswith("didomi-marketo ")]
    return found


def test_every_command_has_examples():
    names = {n for n, _ in help_examples()}
    for name in (
        "sync",
        "retry",
        "preview",
        "check",
        "fields",
        "state show",
        "state export",
        "sandbox",
        "init",
    ):
        assert name in names


def test_every_help_example_runs(sandbox_factory, tmp_path):
    sb = sandbox_factory(leads_file=str(SAMPLES / "leads.json"))
    (tmp_path / "exports").symlink_to(SAMPLES / "didomi")
    shutil.copy(SAMPLES / "config" / "marketo.yaml", tmp_path / "marketo.yaml")
    shutil.copy(SAMPLES / "config" / "marketo-v2.yaml", tmp_path / "new.yaml")
    shutil.copy(SAMPLES / "config" / "marketo.json", tmp_path / "console.json")
    shutil.copy(SAMPLES / "leads.json", tmp_path / "leads.json")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "80",
           "MARKETO_CLIENT_ID": "sandbox-client", "MARKETO_CLIENT_SECRET": "sandbox-secret",
           "MARKETO_INSTANCE": sb.base_url + "/rest"}  # fmt: skip
    examples = help_examples()
    assert len(examples) >= 20
    for name, line in examples:
        if name == "sandbox":
            _run_sandbox(line + " --port 0", tmp_path, env)
            continue
        line = line.replace("http://127.0.0.1:8787", sb.base_url)
        proc = subprocess.run(["bash", "-c", "set -o pipefail; " + line], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        # 1 is data, not usage: the sample has bad records on purpose (and check/explain may warn)
        assert proc.returncode in (0, 1), f"{line}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr and "sandbox-secret" not in proc.stdout + proc.stderr, line
    assert (tmp_path / "report" / "summary.json").is_file() and (tmp_path / "r2" / "summary.json").is_file()
    assert "id: unsubscribed" in (tmp_path / "marketo.yaml").read_text()  # init --instance suggested it


def _run_sandbox(line: str, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.Popen(["bash", "-c", "exec " + line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        first = ""
        while time.monotonic() < deadline and not first:
            first = proc.stdout.readline() if proc.stdout else ""
        assert "listening" in first, f"{line}: {first}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
