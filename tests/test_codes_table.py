"""The code table is complete: every failure kind the client reports is a row, and the README's
table names every row, so the documentation cannot drift from what the code does."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from didomi_marketo.marketo import codes
from didomi_marketo.marketo.codes import REQUEST_CODES, Action, request_action

ROOT = Path(__file__).resolve().parent.parent


def readme_code_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### What each Marketo code does")
    return text[start : text.index("\n## ", start)]


def test_every_request_code_is_in_the_readme_table():
    table = readme_code_table()
    for code in REQUEST_CODES:
        shown = code.replace("http:", "HTTP ") if code.startswith("http:") else code
        assert re.search(rf"(?<![\w:]){re.escape(shown)}(?!\d)", table) or f"`{code}`" in table, code


def test_a_mistyped_failure_kind_is_a_bug_not_five_minutes_of_retries():
    with pytest.raises(ValueError, match="netwrok"):
        request_action("netwrok")
    assert request_action("9999") is Action.RETRY  # a Marketo code Adobe added since
    assert request_action("http:502") is Action.RETRY and request_action("http:404") is Action.ABORT


def test_the_client_reports_failures_only_by_table_constants():
    """No string literal as a CallFailed code or an undelivered code: each is a named row."""
    kinds = {v for k, v in vars(codes).items() if k.isupper() and isinstance(v, str) and v in REQUEST_CODES}
    assert {
        "network",
        "timeout",
        "unreadable",
        "result_mismatch",
        "unknown_status",
        "auth",
        "stopped",
    } <= kinds
    for path in (ROOT / "src" / "didomi_marketo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "CallFailed",
                "_undelivered",
            ):
                args = node.args[1:2] if getattr(node.func, "attr", "") == "_undelivered" else node.args[:1]
                for a in args:
                    if isinstance(a, ast.Constant) and isinstance(a.value, str):
                        assert a.value in REQUEST_CODES, f"{path.name}:{node.lineno}: {a.value!r}"
