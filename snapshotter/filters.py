"""containerd's filter syntax for List: `labels."containerd.io/snapshot.ref"==sha256:..,parent==""`.

A List request carries filters that are OR-ed; within one filter, ','-separated selectors
are AND-ed. Each selector is a field path (dot-separated, fields optionally double-quoted)
with an optional operator (`==`, `!=`, `~=` regexp) and value (quoted or bare).

containerd never depends on a backend honouring these: its metadata layer walks the backend
with the handshake filter and then re-checks kind, the `containerd.io/snapshot.ref` label and
the parent itself, and garbage collection walks without filters. (Checked on containerd
1.6.20: with every filter ignored, a two-layer remote chain still resolved each layer to its
own snapshot.) So a filter this parser cannot read matches everything rather than failing a
request containerd would have accepted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

Adaptor = Callable[[list[str]], tuple[str, bool]]
_BARE_FIELD = re.compile(r"[A-Za-z0-9_\-/]+")
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
        """A Go-style double-quoted string, with backslash escapes."""
        out: list[str] = []
        self.pos += 1
        while not self.at_end():
            ch = self.text[self.pos]
            self.pos += 1
            if ch == '"':
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

    def value(self) -> str:
        if self.peek('"'):
            return self.quoted()
        end = self.pos
        while end < len(self.text) and self.text[end] not in ",|":
            end += 1
        raw, self.pos = self.text[self.pos : end].strip(), end
        return raw


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
            return Selector(tuple(path), op, scanner.value())
    return Selector(tuple(path))


def parse(text: str) -> list[list[Selector]]:
    """One filter string -> alternatives ('|') of conjunctions (',') of selectors."""
    scanner = _Scanner(text)
    alternatives: list[list[Selector]] = [[]]
    while True:
        alternatives[-1].append(_selector(scanner))
        scanner.skip_space()
        if scanner.at_end():
            return alternatives
        if scanner.peek(","):
            scanner.pos += 1
        elif scanner.peek("|"):
            scanner.pos += 1
            alternatives.append([])
        else:
            raise FilterSyntaxError(f"unexpected {scanner.text[scanner.pos]!r} in {text!r}")


def compile_filters(filters: Sequence[str]) -> Callable[[Adaptor], bool]:
    """A predicate over an adaptor; no filters (or an unreadable one) matches everything."""
    alternatives: list[list[Selector]] = []
    for text in filters:
        if not text.strip():
            continue
        try:
            alternatives += parse(text)
        except FilterSyntaxError as exc:
            log.debug("ignoring filter containerd will re-check: %s", exc)
            return lambda adaptor: True
    if not alternatives:
        return lambda adaptor: True
    return lambda adaptor: any(all(s.matches(adaptor) for s in conj) for conj in alternatives)
