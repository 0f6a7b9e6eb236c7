"""The Didomi property grammar, value transforms, and turning a folded lead into a Marketo payload.

Didomi names the source of a mapping by flattening the user's JSON path with `_`
(`consents_purposes_newsletter_enabled`). Purpose, preference and channel ids may contain `_`
themselves, so a name is never split on `_`: it is matched against known prefixes and suffixes,
and every reading that fits is kept as a candidate. Which candidate applies is decided by the
ids present in each record (see `Property.extract`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------
# The grammar

PURPOSES = "consents_purposes_"
CHANNELS = "consents_channels_"
METADATA = "metadata_"
USER_FIELDS = ("organization_user_id", "country", "last_seen_country")
UPDATED_AT = "updated_at"

GRAMMAR_HELP = (
    "consents_purposes_<purpose>_enabled, consents_purposes_<purpose>_enabled_li, "
    "consents_purposes_<purpose>_preferences_<pref>_channel_<channel>_enabled, "
    "consents_purposes_<purpose>_values_<pref>, consents_channels_<channel>_enabled, "
    "organization_user_id, country, last_seen_country, updated_at, metadata_<key>"
)

# The type of value each kind of property produces, as Marketo's describe names types.
BOOLEAN, STRING, DATETIME = "boolean", "string", "datetime"


class Malformed(ValueError):
    """A consent flag that is neither a boolean nor null (`"false"`, `0`, `"yes"`): the record
    is rejected, never read as "no choice" (that would drop a person's choice without a trace)."""

    def __init__(self, where: str, value: Any):
        self.where, self.value = where, value
        super().__init__(f"{where} is {_show(value)}, not true, false or null")


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True)
class Reading:
    """One way to read a property name: a path into the Didomi consents or user object."""

    kind: str  # purpose_enabled | purpose_enabled_li | purpose_channel | purpose_values
    #           channel_enabled | user_field | metadata | updated_at
    purpose: str = ""
    preference: str = ""
    channel: str = ""
    key: str = ""  # user field name or metadata key


@dataclass(frozen=True, slots=True)
class Property:
    """A Didomi-side property named by a mapping `value`, with every reading that fits it."""

    name: str
    readings: tuple[Reading, ...]
    value_type: str

    @property
    def is_consent(self) -> bool:
        return self.readings[0].kind not in ("user_field", "metadata", "updated_at")

    def extract(self, purposes: dict[str, dict] | None, consents: dict, user: dict) -> Any:
        """The value this record gives the property, or None when it says nothing about it.
        Raises Malformed for a consent flag that is neither a boolean nor null.

        The first reading whose ids exist in the record wins, so `a_preferences_b_channel_c_enabled`
        is the nested preference when purpose `a` has preference `b`, else purpose
        `a_preferences_b_channel_c` itself.
        """
        for r in self.readings:
            kind = r.kind
            if kind == "purpose_enabled" or kind == "purpose_enabled_li":
                p = purposes.get(r.purpose) if purposes else None
                if p is not None:
                    name = "enabled" if kind == "purpose_enabled" else "enabled_li"
                    v = p.get(name)
                    if v is True or v is False or v is None:
                        return v
                    raise Malformed(f"consents.purposes[{r.purpose}].{name}", v)
            elif kind == "purpose_values":
                p = purposes.get(r.purpose) if purposes else None
                if p is not None:
                    values = p.get("values")
                    if isinstance(values, dict) and r.preference in values:
                        return value_ids(values[r.preference])
            elif kind == "purpose_channel":
                p = purposes.get(r.purpose) if purposes else None
                if p is not None:
                    pref = _find_by_id(p.get("preferences"), r.preference)
                    if pref is not None:
                        ch = _find_by_id(pref.get("channels"), r.channel)
                        if ch is not None:
                            v = ch.get("enabled")
                            if v is True or v is False or v is None:
                                return v
                            where = f"consents.purposes[{r.purpose}].preferences[{r.preference}]"
                            raise Malformed(f"{where}.channels[{r.channel}].enabled", v)
            elif kind == "channel_enabled":
                ch = _find_by_id(consents.get("channels"), r.channel)
                if ch is not None:
                    v = ch.get("enabled")
                    if v is True or v is False or v is None:
                        return v
                    raise Malformed(f"consents.channels[{r.channel}].enabled", v)
            elif kind == "user_field":
                v = user.get(r.key)
                return v if isinstance(v, str) and v else None
            elif kind == "metadata":
                md = user.get("metadata")
                if isinstance(md, dict):
                    v = md.get(r.key)
                    return v if isinstance(v, str | int | float | bool) else None
                return None
        return None

    def compile(self) -> Callable[[dict | None, dict, dict], Any]:
        """`extract` specialised for this property: the fold's hot path (millions of calls).

        Returns the same values as `extract`; a property with one reading (the usual case)
        becomes a single small closure without the dispatch on kinds.
        """
        if len(self.readings) != 1 or self.readings[0].kind not in ("purpose_enabled", "purpose_values"):
            return self.extract
        r = self.readings[0]
        purpose = r.purpose
        if r.kind == "purpose_enabled":

            def enabled(purposes: dict | None, consents: dict, user: dict) -> Any:
                if purposes:
                    p = purposes.get(purpose)
                    if p is not None:
                        v = p.get("enabled")
                        if v is True or v is False or v is None:
                            return v
                        raise Malformed(f"consents.purposes[{purpose}].enabled", v)
                return None

            return enabled
        preference = r.preference

        def values(purposes: dict | None, consents: dict, user: dict) -> Any:
            if purposes:
                p = purposes.get(purpose)
                if p is not None:
                    vals = p.get("values")
                    if isinstance(vals, dict) and preference in vals:
                        return value_ids(vals[preference])
            return None

        return values


def _find_by_id(items: Any, wanted: str) -> dict | None:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and item.get("id") == wanted:
                return item
    return None


def value_ids(entry: Any) -> str | None:
    """v2 flat preferences: `{"value": "a,b"}`; tolerate a bare string or a list of ids."""
    v = entry.get("value") if isinstance(entry, dict) else entry
    if isinstance(v, list):
        v = ",".join(str(x) for x in v)
    return v if isinstance(v, str) else None


def parse_property(name: str) -> Property:
    """Parse a mapping `value`. Raises ValueError naming the grammar (and a close name, if any)."""
    if name in USER_FIELDS:
        return Property(name, (Reading("user_field", key=name),), STRING)
    if name == UPDATED_AT:
        return Property(name, (Reading("updated_at"),), DATETIME)
    if name.startswith(METADATA) and len(name) > len(METADATA):
        return Property(name, (Reading("metadata", key=name[len(METADATA) :]),), STRING)
    if name.startswith(CHANNELS) and name.endswith("_enabled"):
        channel = name[len(CHANNELS) : -len("_enabled")]
        if channel:
            return Property(name, (Reading("channel_enabled", channel=channel),), BOOLEAN)
    if name.startswith(PURPOSES):
        readings = _purpose_readings(name[len(PURPOSES) :])
        if readings:
            value_type = STRING if readings[0].kind == "purpose_values" else BOOLEAN
            # A name read both as a value list and as a boolean would make the type depend on
            # the data: keep only the readings of the first reading's type.
            readings = [r for r in readings if (r.kind == "purpose_values") == (value_type == STRING)]
            return Property(name, tuple(readings), value_type)
    raise ValueError(_unknown_property_message(name))


def _purpose_readings(rest: str) -> list[Reading]:
    readings: list[Reading] = []
    if rest.endswith("_enabled_li") and len(rest) > len("_enabled_li"):
        readings.append(Reading("purpose_enabled_li", purpose=rest[: -len("_enabled_li")]))
    if rest.endswith("_enabled") and len(rest) > len("_enabled"):
        body = rest[: -len("_enabled")]
        # Every split `<purpose>_preferences_<pref>_channel_<channel>`, most specific first.
        start = 0
        while (i := body.find("_preferences_", start)) > 0:
            after = body[i + len("_preferences_") :]
            j = 0
            while (k := after.find("_channel_", j)) > 0:
                channel = after[k + len("_channel_") :]
                if channel:
                    readings.append(Reading("purpose_channel", body[:i], after[:k], channel))
                j = k + 1
            start = i + 1
        readings.append(Reading("purpose_enabled", purpose=body))
    start = 0
    while (i := rest.find("_values_", start)) > 0:
        pref = rest[i + len("_values_") :]
        if pref:
            readings.append(Reading("purpose_values", purpose=rest[:i], preference=pref))
        start = i + 1
    return readings


KNOWN_EXAMPLES = [
    "consents_purposes_newsletter_enabled",
    "consents_purposes_newsletter_enabled_li",
    "consents_channels_email_enabled",
    "organization_user_id",
    "country",
    "last_seen_country",
    "updated_at",
]


def _unknown_property_message(name: str) -> str:
    hint = ""
    for wrong, right in (
        ("consents_purpose_", PURPOSES),
        ("consent_purposes_", PURPOSES),
        ("consents_channel_", CHANNELS),
        ("purposes_", PURPOSES),
    ):
        if name.startswith(wrong):
            hint = f" (did you mean '{right}{name[len(wrong) :]}'?)"
            break
    if not hint and name.startswith(PURPOSES):
        hint = " (a purpose property ends in _enabled, _enabled_li, or has _values_<pref>)"
    if not hint:
        close = difflib.get_close_matches(name, KNOWN_EXAMPLES, n=1, cutoff=0.75)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
    return f"unknown Didomi property '{name}'{hint}; expected one of: {GRAMMAR_HELP}"


# ---------------------------------------------------------------------------------------------
# Transforms

TRANSFORM_NAMES = ("invert", "yes_no", "text", "map", "const")


@dataclass(frozen=True, slots=True)
class Transform:
    name: str
    table: dict[str, Any] | None = None  # for `map`
    const: Any = None  # for `const`

    def describe(self) -> Any:
        """The transform as written in a config (for summaries and change detection)."""
        if self.name == "map":
            return {"map": self.table}
        if self.name == "const":
            return {"const": self.const}
        return self.name

    def apply(self, value: Any) -> Any:
        if self.name == "invert":
            return (not value) if isinstance(value, bool) else value
        if self.name == "yes_no":
            return ("Yes" if value else "No") if isinstance(value, bool) else value
        if self.name == "text":
            return ("true" if value else "false") if isinstance(value, bool) else value
        if self.name == "map":
            assert self.table is not None
            return _map_value(value, self.table)
        if self.name == "const":
            return self.const
        raise AssertionError(self.name)

    def output_type(self, input_type: str) -> str:
        if self.name in ("yes_no", "text"):
            return STRING if input_type == BOOLEAN else input_type
        if self.name == "map":
            outs = {type(v) for v in (self.table or {}).values()}
            return BOOLEAN if outs == {bool} else STRING
        if self.name == "const":
            return _type_of(self.const)
        return input_type


def _map_value(value: Any, table: dict[str, Any]) -> Any:
    """Map a value id (or each id of a comma-separated list); unknown ids pass through."""
    key = _table_key(value)
    if key in table:
        return table[key]
    if isinstance(value, str) and "," in value:
        # An id mapped to null is dropped from the list (null means "send nothing"), never sent
        # as the text "None"; a list whose every id maps to null sends nothing at all.
        mapped = [table.get(part, part) for part in value.split(",")]
        kept = [_cell_text(v) for v in mapped if v is not None]
        return ",".join(kept) if kept else None
    return value


def _cell_text(value: Any) -> str:
    """An element of a comma-separated list, as Marketo should read it (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _table_key(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    return STRING


def parse_transforms(spec: Any) -> tuple[tuple[Transform, ...], list[str]]:
    """`transform` is a name, `{map: {...}}`, `{const: x}`, or a list of those applied in order."""
    items = spec if isinstance(spec, list) else [spec]
    out: list[Transform] = []
    problems: list[str] = []
    for item in items:
        if isinstance(item, str):
            if item in ("invert", "yes_no", "text"):
                out.append(Transform(item))
            elif item in ("map", "const"):
                # A bare "map"/"const" was answered "did you mean 'map'?": say what it needs.
                arg = "{...}" if item == "map" else "value"
                problems.append(f"transform '{item}' needs an argument: {{{item}: {arg}}}")
            else:
                close = difflib.get_close_matches(item, TRANSFORM_NAMES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(
                    f"unknown transform '{item}'{hint}; expected invert, yes_no, text, "
                    "{map: {...}} or {const: value}"
                )
        elif isinstance(item, dict) and len(item) == 1 and "map" in item:
            table = item["map"]
            if isinstance(table, dict) and table:
                out.append(Transform("map", table={_table_key(k): v for k, v in table.items()}))
            else:
                problems.append("transform 'map' needs a non-empty object of value -> value")
        elif isinstance(item, dict) and len(item) == 1 and "const" in item:
            if item["const"] is None:
                problems.append("transform 'const' needs a value (null would blank the field)")
            else:
                out.append(Transform("const", const=item["const"]))
        else:
            problems.append(
                f"invalid transform {item!r}; expected invert, yes_no, text, "
                "{map: {...}} or {const: value}"
            )
    return tuple(out), problems


# ---------------------------------------------------------------------------------------------
# Mappings and payloads


@dataclass(frozen=True, slots=True)
class FieldMapping:
    """One Marketo field fed by one Didomi property (or a constant), through transforms."""

    field: str
    source: Property | None  # None for a mapping with only a `const` transform
    transforms: tuple[Transform, ...] = ()
    where: str = ""  # location in the config file, for messages

    @property
    def output_type(self) -> str:
        t = self.source.value_type if self.source else STRING
        for tr in self.transforms:
            t = tr.output_type(t)
        return t

    def render(self, value: Any) -> Any:
        for tr in self.transforms:
            value = tr.apply(value)
        return value


def classify_value(value: Any) -> str:
    """The bucket a sent value counts in for previews: true / false / other."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    return "other"


def describe_mapping(m: FieldMapping) -> str:
    """A mapping's source and transforms in one short line, for tables and diffs."""
    parts = [m.source.name] if m.source is not None else []
    for t in m.transforms:
        if t.name == "map":
            parts.append("map {" + ", ".join(f"{k}: {v}" for k, v in (t.table or {}).items()) + "}")
        elif t.name == "const":
            parts.append(f"const {t.const!r}")
        else:
            parts.append(t.name)
    return " | ".join(parts)
