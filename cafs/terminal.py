"""Text for a terminal: strings that images and stores control, their control characters
escaped.

An image names its files, writes its own config, and (through an OCI layout annotation)
may name itself; a store's records and keys are whoever can write it. Printed raw, ESC
starts a terminal control sequence, BEL rings, and CR returns to the start of the line, so
a listing's setuid entry can display as whatever its name writes over it. Everything cafs
prints or logs that such a string reaches goes through `shown`: the error printer and the
log formatters whole, listings per field.
"""

from __future__ import annotations

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def shown(text: str | bytes) -> str:
    """`text` with every character that does not print as itself written as a Python
    escape: C0 and C1 controls and DEL (`\\x1b`, `\\r`), format characters such as
    bidirectional overrides (`\\u202e`), line separators, and bytes that are not UTF-8
    (`\\xff`, also where a str carries them as surrogate escapes). Printable text,
    non-ASCII included, is unchanged; backslashes are left alone (this is for reading,
    not parsing)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _SHORT:
        return _SHORT[ch]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as surrogateescape keeps it
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
