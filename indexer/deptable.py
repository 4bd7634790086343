"""The table format the `libraries` and `imports` records share: for each file of an index,
by inode, the inodes of the files it loads directly (docs/FORMAT.md).

Little-endian 32-bit words, base64 in the index's meta: `inode, count, dependency...` per
file, inodes strictly increasing. Every inode named must be a regular file of the index
that carries the record, which a mount has already verified; a record that breaks a rule is
refused whole (the mount goes on without it), never half used.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from indexer.format import Index

WORD = struct.Struct("<I")


class DepTableError(ValueError):
    """A dependency record is malformed."""


def encode(deps: Mapping[int, Sequence[int]]) -> str:
    """The table of `deps` (inode -> its direct dependencies, in order). Deterministic."""
    words: list[int] = []
    for ino in sorted(deps):
        words += [ino, len(deps[ino]), *deps[ino]]
    return base64.b64encode(b"".join(WORD.pack(w) for w in words)).decode()


class DepTable:
    """A decoded, checked dependency record."""

    def __init__(self, index: Index, record: Any, version: int, max_deps: int, what: str,
                 error: type[DepTableError] = DepTableError) -> None:
        raw = _field(record, version, what, error)
        if len(raw) % WORD.size:
            raise error(f"{what} table of {len(raw)} bytes is not whole words")
        words = [w for (w,) in WORD.iter_unpack(raw)]
        self.deps: dict[int, tuple[int, ...]] = {}
        pos, last = 0, 0
        while pos < len(words):
            if pos + 2 > len(words):
                raise error(f"{what} table ends inside a record")
            ino, count = words[pos], words[pos + 1]
            deps = tuple(words[pos + 2 : pos + 2 + count])
            if count > max_deps or len(deps) != count:
                raise error(f"{what} table: inode {ino}: bad dependency count {count}")
            if ino <= last:
                raise error(f"{what} table: inode {ino} out of order or repeated")
            for n in (ino, *deps):
                if not _regular(index, n):
                    raise error(f"{what} table: inode {n} is not a regular file of the index")
            self.deps[ino] = deps
            pos, last = pos + 2 + count, ino

    def closure(self, ino: int, limit: int) -> list[int]:
        """`ino` and everything it loads, directly or not, breadth first, at most `limit`
        files."""
        order, seen = [ino], {ino}
        for current in order:
            for dep in self.deps.get(current, ()):
                if dep not in seen and len(order) < limit:
                    seen.add(dep)
                    order.append(dep)
        return order


def _regular(index: Index, ino: int) -> bool:
    return 1 <= ino <= index.inode_count and index.inode(ino).is_reg


def _field(record: Any, version: int, what: str, error: type[DepTableError]) -> bytes:
    if not isinstance(record, dict):
        raise error(f"{what} record is not an object")
    if record.get("version") != version:
        raise error(f"{what} record version {record.get('version')!r}; this cafs reads "
                    f"{version}")
    encoded = record.get("table")
    if not isinstance(encoded, str):
        raise error(f"{what} record has no table")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error(f"{what} table is not base64: {exc}") from None
