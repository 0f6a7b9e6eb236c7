"""The examples at the end of every command's `--help`: real command lines, kept runnable.

They use the names an operator would (`exports/` for the Didomi files, `marketo.yaml` for the
config); tests/test_help_examples.py links those names to sample_exports/ and runs every line
against the sandbox, so an example that stops working fails the tests.
"""

from __future__ import annotations

import typer

from didomi_marketo.errors import EXIT_CODES

WITH_EXIT_CODES = {"sync", "retry"}  # the commands cron runs list the exit codes too

# command -> [(what it does, the command line)]
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "sync": [
        (
            "what would be sent, per field (no credentials, no network)",
            "didomi-marketo sync exports/ -c marketo.yaml --dry-run",
        ),
        (
            "send, and list everything not delivered in report/",
            "didomi-marketo sync exports/ -c marketo.yaml --report report/",
        ),
        (
            "cron: only what changed since the last run",
            "didomi-marketo sync exports/ -c marketo.yaml --state state.db -q",
        ),
    ],
    "retry": [
        (
            "list the leads an earlier run could not deliver",
            "didomi-marketo retry report/ -c marketo.yaml --state state.db --dry-run",
        ),
        (
            "re-send them, never older than what the state says was sent",
            "didomi-marketo retry report/ -c marketo.yaml --state state.db --report r2/",
        ),
        (
            "and print each lead still not delivered, with its reason",
            "didomi-marketo retry report/ -c marketo.yaml --state state.db -v",
        ),
    ],
    "preview": [
        ("per Marketo field, what the leads would get", "didomi-marketo preview exports/ -c marketo.yaml"),
        (
            "what a new mapping changes against the current one",
            "didomi-marketo preview exports/ -c new.yaml --compare marketo.yaml",
        ),
        (
            "each change as a CSV row, into another tool",
            "didomi-marketo preview exports/ -c new.yaml --format csv | head",
        ),
    ],
    "check": [
        ("the config against the instance's live fields", "didomi-marketo check -c marketo.yaml"),
        ("without Marketo: the config alone", "didomi-marketo check -c marketo.yaml --offline"),
    ],
    "fields": [
        (
            "the instance's lead fields whose name contains didomi",
            "didomi-marketo fields -c marketo.yaml --match didomi",
        ),
    ],
    "reconcile": [
        (
            "per field, do Marketo's values match the exports?",
            "didomi-marketo reconcile exports/ -c marketo.yaml",
        ),
        (
            "against what the state says Marketo confirmed, then fix the drift",
            "didomi-marketo reconcile -c marketo.yaml --state state.db --fix",
        ),
    ],
    "explain": [
        (
            "everything that touched one person, and what won each field",
            "didomi-marketo explain zoe@example.com exports/ -c marketo.yaml",
        ),
        (
            "with what the last sync sent and Marketo answered",
            "didomi-marketo explain zoe@example.com -c marketo.yaml --report report/",
        ),
    ],
    "state show": [
        ("how many leads are confirmed, pending, skipped", "didomi-marketo state show --state state.db"),
        (
            "one lead: last confirmed values, pending payload",
            "didomi-marketo state show --state state.db zoe@example.com",
        ),
    ],
    "state export": [
        (
            "every lead waiting to be re-sent, as NDJSON",
            "didomi-marketo state export --state state.db --pending",
        ),
        ("the first lead of the state", "didomi-marketo state export --state state.db | head -1"),
    ],
    "state reset": [
        (
            "forget everything: the next sync sends every lead",
            "didomi-marketo state reset --state state.db --yes",
        ),
    ],
    "sandbox": [
        (
            "a local Marketo with leads to update (Ctrl-C stops it)",
            "didomi-marketo sandbox --leads leads.json",
        ),
        (
            "a free port, slow calls and three 606 refusals",
            "didomi-marketo sandbox --port 0 --latency 0.2 --fault code:606:3",
        ),
    ],
    "init": [
        ("a commented starter config, to edit", "didomi-marketo init -o starter.yaml"),
        (
            "from the JSON the Didomi console shows",
            "didomi-marketo init --from-didomi console.json -o marketo.yaml --force",
        ),
        (
            "with the instance's consent-like fields as suggestions",
            "didomi-marketo init --instance http://127.0.0.1:8787 --force -o marketo.yaml",
        ),
    ],
}


def epilog(command: str) -> str:
    """The `Examples:` block for `command` (click keeps `\\b` blocks as written)."""
    lines = ["Examples:", ""]
    for what, line in EXAMPLES.get(command, []):
        lines += ["\b", f"  # {what}", f"  {line}", ""]
    if command in WITH_EXIT_CODES:
        lines += ["Exit codes:", "", "\b"] + [f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()]
    return "\n".join(lines).rstrip()


def add_examples(app: typer.Typer, prefix: str = "") -> None:
    """Give every registered command (and sub-command) its examples, unless it set an epilog."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else "")
        if info.epilog is None and (prefix + name) in EXAMPLES:
            info.epilog = epilog(prefix + name)
    for group in app.registered_groups:
        if group.typer_instance is not None and group.name:
            add_examples(group.typer_instance, f"{prefix}{group.name} ")
