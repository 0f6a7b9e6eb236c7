"""The tree shows the flow: no import cycle anywhere (function-local imports included), and the
import-linter layers contract of pyproject.toml holds (didomi/ and marketo/ import nothing above)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "didomi_marketo"


def module_name(path: Path) -> str:
    parts = ["didomi_marketo", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, wherever the import statement stands."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_hidden_cycle():
    graph = import_graph()
    graph["didomi_marketo.marketo.codes"].add("didomi_marketo.sync")  # a function-local import
    assert find_cycle(graph) is not None


def test_the_layers_contract_holds():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        lint_imports = Path(shutil.which("lint-imports") or "")
    if not lint_imports.is_file():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    root = PACKAGE.parent.parent
    done = subprocess.run([str(lint_imports)], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


def test_one_summary_feeds_the_report_and_the_json_log(tmp_path, sandbox):
    """summary.json and the JSON log's `end` event come from the same RunSummary.to_json()."""
    import json

    from conftest import SAMPLES, make_config, run_subprocess

    config = make_config(tmp_path, sandbox, upsert_mode=True)
    result = run_subprocess(
        "sync", SAMPLES / "didomi", "--config", config, "--report", tmp_path / "r", "--log-format", "json",
        "--quiet",
    )  # fmt: skip
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    end = [e for e in events if e.get("event") == "end"]
    assert end, result.stderr
    assert end[-1]["summary"] == json.loads((tmp_path / "r" / "summary.json").read_text())
    assert end[-1]["summary"]["mode"] == "sync" and end[-1]["summary"]["delivery"]["sent"] > 0
