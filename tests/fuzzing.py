"""Mutations of stored formats for property tests: what one flipped bit, a hand edit or a
hostile writer can make of a valid object, and a check that decoding it stays bounded."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Deterministic (no example database, a fixed sequence), a few seconds per property.
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Values that break naive decoders: past 64 bits, negative, not finite, the wrong type.
EDGE_INTS = [0, -1, 1 << 31, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64,
             10**30, -(10**30)]
json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                              max_size=4),
    max_leaves=12)


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, fields: tuple[int, ...] = ()) -> bytes:
    """`data` with a few bits flipped, bytes overwritten, a u64 (one of the format's
    `fields` offsets, or anywhere) set to an edge value, or cut short or extended."""
    out = bytearray(data)
    if fields and draw(st.booleans()):
        at = draw(st.sampled_from(fields))
        value = draw(st.sampled_from([v for v in EDGE_INTS if 0 <= v < 1 << 64]))
        out[at : at + 8] = value.to_bytes(8, "little")
        if draw(st.booleans()):
            return bytes(out)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "byte", "u64", "cut", "append"]))
        if kind == "cut" or not out:
            del out[draw(st.integers(0, len(out))):]
        elif kind == "append":
            out += draw(st.binary(min_size=1, max_size=64))
        else:
            at = draw(st.integers(0, len(out) - 1))
            if kind == "flip":
                out[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "byte":
                out[at] = draw(st.integers(0, 255))
            else:
                value = draw(st.sampled_from([v for v in EDGE_INTS if 0 <= v < 1 << 64]))
                out[at : at + 8] = value.to_bytes(8, "little")
    return bytes(out)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for n, value in enumerate(obj):
            out += _paths(value, (*prefix, n))
    return out


@st.composite
def mutated_json(draw: st.DrawFn, obj: Any) -> bytes:
    """`obj` with one of its values (at any depth) replaced by any JSON value or removed,
    serialised; or its serialisation mutated byte by byte."""
    if draw(st.booleans()):
        return draw(mutated_bytes(json.dumps(obj).encode()))
    copy = json.loads(json.dumps(obj))
    path = draw(st.sampled_from(_paths(copy)))
    if not path:
        return json.dumps(draw(json_values)).encode()
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return json.dumps(copy).encode()


def decodes_within(decode: Callable[[], Any], allowed: tuple[type[BaseException], ...],
                   limit: int) -> Any:
    """Run `decode`: it must return or raise one of `allowed`, allocating under `limit`
    bytes at its peak. Returns its result (None if it raised)."""
    tracemalloc.start()
    try:
        try:
            result = decode()
        except allowed:
            result = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"decoding peaked at {peak} bytes (limit {limit})"
    return result
