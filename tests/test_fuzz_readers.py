"""Issue 10: whatever bytes arrive, the readers and the record shapes never raise past the reader,
and memory stays bounded (arbitrary bytes, deep nesting, huge numbers, broken or inflating gzip)."""

from __future__ import annotations

import gzip
import json
import tempfile
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from didomi_marketo.didomi.fold import normalise_key, parse_timestamp
from didomi_marketo.didomi.readers import InputFile, Problem, read_records
from didomi_marketo.didomi.records import Observation, Unusable, observations

LIMIT = 64 * 1024  # the line limit the fuzz reads with: small, so that bombs hit it

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),  # past 64 bits: orjson reads them as floats
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["2026-11-01T00:00:00Z", "not a date", "a@example.com", "9" * 30, "user.created"]),
)
keys = st.sampled_from(["user", "events", "consents", "purposes", "id", "enabled", "organization_user_id",
                        "created_at", "updated_at", "type", "parameters", "entity", "new_entity", "data",
                        "status", "regulation", "values", "channels", "metadata"])  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """JSON that looks like Didomi records, as NDJSON or a pretty document, maybe deeply nested."""
    records = draw(st.lists(values, min_size=1, max_size=5))
    depth = draw(st.sampled_from([0, 0, 50, 101, 990, 1024, 1100]))
    if depth:
        records.append(json.loads("[" * min(depth, 1000) + "]" * min(depth, 1000)))
        text = "\n".join(json.dumps(r) for r in records[:-1]) + "\n" + "[" * depth + "]" * depth + "\n"
    elif draw(st.booleans()):
        text = "\n".join(json.dumps(r) for r in records) + "\n"
    else:
        text = json.dumps(records, indent=draw(st.sampled_from([None, 2])))
    data = text.encode()
    if draw(st.booleans()):  # break a line somewhere
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=8)) + data[cut:]
    return data


@st.composite
def gzipped(draw: st.DrawFn, inner: st.SearchStrategy[bytes]) -> bytes:
    data = gzip.compress(draw(inner))
    how = draw(st.sampled_from(["whole", "truncated", "flipped"]))
    if how == "truncated":
        data = data[: draw(st.integers(2, len(data)))]
    elif how == "flipped":
        i = draw(st.integers(2, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    return data


@st.composite
def bombs(draw: st.DrawFn) -> bytes:
    """A gzip that inflates to megabytes: one long line, or a first line that never ends."""
    megabytes = draw(st.integers(1, 16))
    head = draw(st.sampled_from([b'{"user": {"x": "', b"[", b"", b'{"a": 1}\n{"b": "']))
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = z.compress(head)
    block = draw(st.sampled_from([b"x", b" ", b"[", b'{"a":'])) * 2**20
    for _ in range(megabytes):
        out += z.compress(block)
    return out + z.compress(b'"}}\n') + z.flush()


inputs = st.one_of(st.binary(max_size=2048), documents(), gzipped(documents()), gzipped(st.binary(max_size=512)),
                   bombs())  # fmt: skip


def consume(data: bytes) -> list[Any]:
    """Everything a sync does with one file, up to the fold: read, recognise, check keys and times."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "input"
        path.write_bytes(data)
        out: list[Any] = []
        for rec in read_records(InputFile(path, str(path)), max_line_bytes=LIMIT):
            if isinstance(rec, Problem):
                out.append(rec)
                continue
            value, line = rec
            for ob in observations(value, line):
                assert isinstance(ob, Observation | Unusable)
                if isinstance(ob, Observation):
                    normalise_key(ob.key, "email")
                    normalise_key(ob.key, "leadID")
                    parse_timestamp(ob.timestamp)
                out.append(type(ob).__name__)
        return out


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(inputs)
def test_readers_and_records_never_raise_and_stay_bounded(data):
    tracemalloc.start()
    try:
        consume(data)  # raising anything here fails the test
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Inputs inflate to up to 16 MB; what is held at once stays near the line limit.
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MB for {len(data)} input bytes"
