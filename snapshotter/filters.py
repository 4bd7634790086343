"""containerd's filter syntax for List: `labels."containerd.io/snapshot.ref"==sha256:..,parent==""`.

A List request carries filters that are OR-ed; within one filter, ','-separated selectors
are AND-ed. Each selector is a field path (dot-separated fields of letters, digits and '_',
or double-quoted) with an optional operator (`==`, `!=`, `~=` regexp) and a value: quoted,
or bare up to a ',' or a space. A `~=` value may also be quoted with '/' or '|'.

This is the grammar of containerd's filters.Parse, and what it refuses is refused here too
(FilterSyntaxError, answered as INVALID_ARGUMENT like overlayfs's Walk): a filter this
parser cannot read is a caller's mistake, and matching everything would hide it. The one
filter containerd itself sends (its metadata layer's remote-snapshot handshake,
`labels."containerd.io/snapshot.ref"==<chain>,parent==<parent>`) is in this grammar.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Adaptor = Callable[[list[str]], tuple[str, bool]]
_BARE_FIELD = re.compile(r"[A-Za-z0-9_]+")
_BARE_VALUE = re.compile(r"[^\s,]+")
_REGEXP_QUOTES = ('"', "/", "|")
_OPERATORS = ("==", "!=", "~=")


class FilterSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None = None  # None: the field must be present
    value: str = ""

    def matches(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(list(self.fieldpath))
        if self.operator is None:
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        try:
            return re.search(self.value, value) is not None
        except re.error:
            return False


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while not self.at_end() and self.text[self.pos].isspace():
            self.pos += 1

    def quoted(self) -> str:
        """A Go-style string quoted with the character at the cursor, with backslash escapes."""
        quote = self.text[self.pos]
        out: list[str] = []
        self.pos += 1
        while not self.at_end():
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch == "\\" and not self.at_end():
                esc = self.text[self.pos]
                self.pos += 1
                out.append({"n": "\n", "t": "\t"}.get(esc, esc))
            else:
                out.append(ch)
        raise FilterSyntaxError(f"unterminated quote in {self.text!r}")

    def field(self) -> str:
        if self.peek('"'):
            return self.quoted()
        match = _BARE_FIELD.match(self.text, self.pos)
        if not match:
            raise FilterSyntaxError(f"expected a field at {self.pos} in {self.text!r}")
        self.pos = match.end()
        return match.group()

    def value(self, regexp: bool) -> str:
        if any(self.peek(q) for q in (_REGEXP_QUOTES if regexp else ('"',))):
            return self.quoted()
        match = _BARE_VALUE.match(self.text, self.pos)
        if not match:
            raise FilterSyntaxError(f"expected a value at {self.pos} in {self.text!r}")
        self.pos = match.end()
        return match.group()


def _selector(scanner: _Scanner) -> Selector:
    scanner.skip_space()
    path = [scanner.field()]
    while scanner.peek("."):
        scanner.pos += 1
        path.append(scanner.field())
    scanner.skip_space()
    for op in _OPERATORS:
        if scanner.peek(op):
            scanner.pos += len(op)
            scanner.skip_space()
            return Selector(tuple(path), op, scanner.value(regexp=op == "~="))
    if not (scanner.at_end() or scanner.peek(",")):
        raise FilterSyntaxError(
            f'expected an operator ("=="|"!="|"~=") at {scanner.pos} in {scanner.text!r}'
        )
    return Selector(tuple(path))


def parse(text: str) -> list[Selector]:
    """One filter string -> the selectors (',') that must all match."""
    scanner = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        selectors.append(_selector(scanner))
        scanner.skip_space()
        if scanner.at_end():
            return selectors
        if not scanner.peek(","):
            raise FilterSyntaxError(f"unexpected {scanner.text[scanner.pos]!r} in {text!r}")
        scanner.pos += 1


def compile_filters(filters: Sequence[str]) -> Callable[[Adaptor], bool]:
    """A predicate over an adaptor, true where any filter matches; as containerd's ParseAll,
    no filters, or an empty one among them, match everything. FilterSyntaxError if any
    filter is malformed."""
    alternatives = [parse(text) for text in filters if text]
    if len(alternatives) < len(filters) or not alternatives:
        return lambda adaptor: True
    return lambda adaptor: any(all(s.matches(adaptor) for s in conj) for conj in alternatives)
