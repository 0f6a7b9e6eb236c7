"""`didomi-marketo init`: a commented starter config (YAML) a new operator can read and edit.

From nothing, from the JSON the Didomi console shows (`--from-didomi`: its mappings, identifier,
regulations and upsert mode; never its secrets), and with the instance's consent-like boolean
fields as suggestions (`--instance`, through describe).
"""

from __future__ import annotations

from typing import Any

import yaml

# A field "looks like consent" when its REST or display name says so (Marketo's own
# `unsubscribed` included); only booleans, writable through REST, are suggested.
CONSENT_WORDS = ("consent", "optin", "opt_in", "opt-in", "opt in", "optout", "opt_out", "opt-out", "unsubscri",
                 "subscri", "newsletter", "gdpr", "permission", "marketing", "didomi")  # fmt: skip

EXAMPLE_MAPPING = {"id": "didomiNewsletterOptIn", "value": "consents_purposes_newsletter_enabled"}


def consent_like(fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Writable boolean REST fields whose name suggests consent, sorted by name."""
    out = []
    for f in fields:
        words = f"{f.get('name', '')} {f.get('displayName', '')}".lower()
        if (
            f.get("rest")
            and f.get("writable")
            and str(f.get("dataType", "")).lower() == "boolean"
            and any(w in words for w in CONSENT_WORDS)
        ):
            out.append(f)
    return sorted(out, key=lambda f: str(f["name"]).lower())


def starter_config(
    console: dict[str, Any] | None = None,
    instance: str | None = None,
    suggestions: list[dict[str, Any]] | None = None,
) -> str:
    """The YAML text: valid as written (load_config accepts it), commented for a first reader."""
    console = console or {}
    auth = console.get("authentication") if isinstance(console.get("authentication"), dict) else {}
    instance = instance or (auth or {}).get("instance") or "${MARKETO_INSTANCE}"
    props = console.get("properties") if isinstance(console.get("properties"), dict) else {}
    identifier = (props or {}).get("user_identifier") or ["email"]
    regulations = (props or {}).get("regulations")
    mappings = console.get("mappings") if isinstance(console.get("mappings"), list) else None
    upsert = bool(console.get("upsert_mode", False))

    lines = [
        "# didomi-marketo config: the Didomi console's Marketo integration, in YAML.",
        "# Check it with `didomi-marketo check -c THIS_FILE` (add --offline without credentials),",
        "# preview it with `didomi-marketo sync EXPORTS -c THIS_FILE --dry-run`.",
        "type_id: marketo",
        "",
        "# Secrets stay out of this file: ${VAR} is read from the environment when needed, and",
        "# MARKETO_CLIENT_ID / MARKETO_CLIENT_SECRET / MARKETO_INSTANCE override these values.",
        "authentication:",
        "  client_id: ${MARKETO_CLIENT_ID}",
        "  client_secret: ${MARKETO_CLIENT_SECRET}",
        "  # the REST endpoint (https://123-ABC-456.mktorest.com/rest), its base URL, or the Munchkin id",
        f"  instance: {_scalar(instance)}",
        "",
        "properties:",
        "  # email (the lookup field) or leadID (Marketo lead ids, update only)",
        f"  user_identifier: {_flow(identifier)}",
        '  # regulations whose consent is applied (default [gdpr]; see README "Consent semantics")',
        f"  {'' if regulations else '# '}regulations: {_flow(regulations or ['gdpr'])}",
        "",
        '# Marketo field (id) <- Didomi value. Grammar: README "Mapping value grammar";',
        "# optional transform: invert, yes_no, text, {map: {...}}, {const: X}.",
        "mappings:",
    ]
    for m in mappings or [EXAMPLE_MAPPING]:
        lines += _indent(yaml.safe_dump([m], sort_keys=False, allow_unicode=True), "  ")
    mapped = {m.get("id") for m in mappings or [EXAMPLE_MAPPING] if isinstance(m, dict)}
    unmapped = [f for f in suggestions or [] if f["name"] not in mapped]
    if unmapped:
        lines.append("  # Consent-like boolean fields of the instance (describe) not mapped yet:")
        for f in unmapped:
            label = f" ({f['displayName']})" if f.get("displayName") and f["displayName"] != f["name"] else ""
            lines += [f"  # - id: {f['name']}{label}", "  #   value: consents_purposes_<purpose>_enabled"]
    lines += [
        "",
        "# false (Didomi's default): update existing leads only, a lead Marketo does not know is an",
        "# expected skip; true: create leads too.",
        f"upsert_mode: {'true' if upsert else 'false'}",
        "",
        "# Beyond Didomi (optional): the state file for incremental syncs, and delivery limits.",
        "# state: /var/lib/didomi-marketo/state.db",
        "# delivery: {max_calls_per_20s: 50, max_concurrency: 5}",
        "",
    ]
    return "\n".join(lines)


def _scalar(value: str) -> str:
    return value if value.startswith("${") else yaml.safe_dump(value, default_style=None).splitlines()[0]


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _indent(text: str, prefix: str) -> list[str]:
    return [prefix + line for line in text.rstrip("\n").splitlines()]
