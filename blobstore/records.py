"""JSON records read from a store, checked before use: bounded in size, typed field by field.

A profile, an image record, a chain pointer or a lease is whatever the store holds: one
flipped bit or a hand-edited object must give its reader's own error, never a `TypeError`
(a string where a size was), an `OverflowError` (a size past 2**63) or a `MemoryError` (a
length nobody can allocate) from somewhere further on. Every getter here raises only
`RecordError` (a `ValueError`), which each decoder turns into its declared error.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from blobstore.base import BlobStore
from blobstore.errors import BlobCorrupt

HEX64 = re.compile(r"[0-9a-f]{64}")
SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


class RecordError(ValueError):
    """A record that is not what its format says."""


def read(store: BlobStore, key: str, limit: int) -> bytes:
    """The object's bytes, read no further than `limit` (+1 to tell it is over).
    BlobNotFound if absent, BlobCorrupt if larger than any record of its kind."""
    data = store.get_range(key, 0, limit + 1)
    if len(data) > limit:
        raise BlobCorrupt(f"{key} is over {limit} bytes: not a record of its kind")
    return data


def parse(data: bytes) -> Fields:
    """The JSON object in `data` (RecordError if it is not one: bad JSON, too deep)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RecordError(f"not JSON: {exc}") from None
    return Fields(obj, "record")


class Fields:
    """A JSON object's fields, each taken with its type and bounds checked."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise RecordError(f"{where} is not a JSON object")
        self.obj: dict[str, Any] = obj
        self.where = where

    def _get(self, name: str, default: Any = ...) -> Any:
        if name not in self.obj:
            if default is ...:
                raise RecordError(f"{self.where} has no {name!r}")
            return default
        return self.obj[name]

    def has(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def integer(self, name: str, lo: int, hi: int, default: Any = ...) -> int:
        return check_int(self._get(name, default), lo, hi, f"{self.where}.{name}")

    def number(self, name: str, default: Any = ...) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecordError(f"{self.where}.{name} is not a number: {short(value)}")
        try:
            out = float(value)
        except OverflowError:
            raise RecordError(f"{self.where}.{name} is out of range") from None
        if not math.isfinite(out):
            raise RecordError(f"{self.where}.{name} is not finite")
        return out

    def text(self, name: str, max_len: int, pattern: re.Pattern[str] | None = None,
            default: Any = ...) -> str:
        return check_str(self._get(name, default), max_len, pattern, f"{self.where}.{name}")

    def opt_text(self, name: str, max_len: int, pattern: re.Pattern[str] | None = None
                ) -> str | None:
        value = self._get(name, None)
        return None if value is None else self.text(name, max_len, pattern)

    def items(self, name: str, max_len: int) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            raise RecordError(f"{self.where}.{name} is not a list")
        if len(value) > max_len:
            raise RecordError(f"{self.where}.{name} has over {max_len} items")
        return value

    def sub(self, name: str) -> Fields:
        return Fields(self._get(name), f"{self.where}.{name}")


def check_int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{what} is not a whole number: {short(value)}")
    if not lo <= value <= hi:
        raise RecordError(f"{what} = {short(value)} is outside {lo}..{hi}")
    return value


def check_str(value: Any, max_len: int, pattern: re.Pattern[str] | None, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} is not a string: {short(value)}")
    if len(value) > max_len:
        raise RecordError(f"{what} is over {max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise RecordError(f"{what} is malformed: {short(value)}")
    return value


def short(value: Any) -> str:
    """A value for an error message: never a whole record."""
    if isinstance(value, list | dict):
        return f"a JSON {'list' if isinstance(value, list) else 'object'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
