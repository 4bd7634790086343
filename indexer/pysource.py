"""The imports a Python source file runs when it is imported, read without running or
parsing it.

An interpreter importing a package reads its modules one after another, each a first read
that costs a lazily loaded image a round trip; which modules come next is written in the
module itself. This module finds the module-level `import` statements of a source file (and
those under a module-level `if`, `try` or `with`), leaving out what runs later or seldom:
imports inside a function or class body, under `if TYPE_CHECKING:` and under `if __name__
== "__main__":`. An import in an
`except` block is marked as the fallback of its `try` block's imports (`try: import
fast_json except ImportError: import json`): the resolver takes it only if they fail.

It is a line scanner, not Python's parser: an image's sources are untrusted input, and
`ast.parse` of a crafted file can take the indexer's memory or stack, while this reads each
line once, with patterns that cannot backtrack, and keeps at most `MAX_IMPORTS` results.
What it gets wrong (an import in a string that spans lines at a lower indent, an odd
continuation) costs a file fetched for nothing or a round trip, never a wrong byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

MAX_IMPORTS = 256  # statements' names kept per file
MAX_LINE = 4096  # bytes of one logical line looked at
_NAME = rb"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rb"%s(?:\.%s)*" % (_NAME, _NAME))
_IMPORT = re.compile(rb"import\s+(.*)", re.S)
_FROM = re.compile(rb"from\s+(\.*)\s*(%s(?:\s*\.\s*%s)*)?\s*import\s*(.*)" % (_NAME, _NAME),
                   re.S)
_SKIP_BLOCK = re.compile(rb"(?:async\s+)?def\s|class\s|if\s+(?:typing\.)?TYPE_CHECKING\s*:"
                         rb"|if\s+__name__\s*==\s*['\"]__main__['\"]\s*:")
_TRY = re.compile(rb"try\s*:")
_HANDLER = re.compile(rb"except\b")
_QUOTES = (b'"""', b"'''")


class Imported(NamedTuple):
    """One imported module: `from . import x` is (1, "", ("x",)); `import a.b` (0, "a.b",
    ()); the names of a `from` import may be submodules, or only attributes. An import in a
    `try` block has that block's number as `group`; one in its `except` block, the same
    number and `fallback`: it runs only if one of the `try` block's imports fails."""

    level: int  # leading dots of a relative import
    module: str
    names: tuple[str, ...]
    group: int = 0  # the module-level `try` block it is in, numbered from 1; 0: none
    fallback: bool = False


@dataclass
class _Try:
    indent: int
    group: int
    handling: bool = False  # in one of its `except` blocks


def imports(source: bytes) -> list[Imported]:
    """The module-level imports of `source`, in order, at most `MAX_IMPORTS` names."""
    found: list[Imported] = []
    count = 0
    tries: list[_Try] = []
    groups = 0
    for indent, line in _logical_lines(source):
        while tries and (tries[-1].indent > indent or (tries[-1].indent == indent
                         and not _HANDLER.match(line))):
            tries.pop()
        if tries and tries[-1].indent == indent:  # an `except` of the block: what follows
            tries[-1].handling = True
            continue
        if _TRY.match(line):
            groups += 1
            tries.append(_Try(indent, groups))
            continue
        group, fallback = (tries[-1].group, tries[-1].handling) if tries else (0, False)
        for statement in line.split(b";"):
            for item in _statement(statement.strip()):
                count += max(1, len(item.names))
                if count > MAX_IMPORTS:
                    return found
                found.append(item._replace(group=group, fallback=fallback))
    return found


def _logical_lines(source: bytes) -> Iterator[tuple[int, bytes]]:
    """The logical lines that run when the module is imported (`_SKIP_BLOCK`), with their
    indentation, joined across brackets and backslashes, stripped. Lines inside a
    triple-quoted string are skipped."""
    skipping: int | None = None  # indent of the block header being skipped
    quote: bytes | None = None  # the triple quote a string spanning lines opened
    pending = b""  # a logical line continued on the next physical one
    depth = 0  # brackets open in `pending`
    indent = 0
    for raw in source.splitlines():
        if quote is not None:
            if raw.count(quote) % 2:
                quote = None
            continue
        text = raw.split(b"#", 1)[0] if b"#" in raw and b"'" not in raw and b'"' not in raw \
            else raw
        stripped = text.strip()
        if pending:
            pending += b" " + stripped
        else:
            if not stripped:
                continue
            indent = len(text) - len(text.lstrip())
            if skipping is not None and indent <= skipping:
                skipping = None
            if skipping is None and _SKIP_BLOCK.match(stripped):
                skipping = indent
            pending = stripped if skipping is None else b""
            depth = 0
        quote = _opens_string(raw)
        if not pending:
            continue
        depth += stripped.count(b"(") + stripped.count(b"[") - stripped.count(b")") \
            - stripped.count(b"]")
        if (depth > 0 or pending.endswith(b"\\")) and len(pending) < MAX_LINE \
                and quote is None:
            pending = pending.rstrip(b"\\")
            continue
        yield indent, pending[:MAX_LINE]
        pending = b""


def _opens_string(raw: bytes) -> bytes | None:
    """The triple quote `raw` leaves open (an odd count of it), if any."""
    for q in _QUOTES:
        if raw.count(q) % 2:
            return q
    return None


def _statement(text: bytes) -> list[Imported]:
    """`import a.b as c, d` is two imports; `from .m import (x, y as z)` one. (An import
    statement holds no string, so a `#` starts its comment.)"""
    text = text.split(b"#", 1)[0].strip()
    if text.startswith(b"import") and (m := _IMPORT.fullmatch(text)):
        return [Imported(0, module, ()) for part in m.group(1).strip(b"()").split(b",")
                if (module := _first_dotted(part.split(b" as ")[0]))]
    if text.startswith(b"from") and (m := _FROM.fullmatch(text)):
        level = len(m.group(1))
        module = re.sub(rb"\s+", b"", m.group(2) or b"").decode()
        if not level and not module:
            return []
        rest = m.group(3).strip().strip(b"()")
        names = tuple(n for part in rest.split(b",")
                      if (n := _first_dotted(part.split(b" as ")[0])) and "." not in n)
        return [Imported(level, module, names)]
    return []


def _first_dotted(text: bytes) -> str:
    m = _DOTTED.fullmatch(text.strip())
    return m.group(0).decode() if m else ""
