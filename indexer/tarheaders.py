"""tarfile's special headers, read with bounds: a layer is untrusted input.

Python's tarfile reads a PAX extended header, a GNU long name or link, and a GNU sparse map
whole into memory before looking at it, so a layer of a few compressed megabytes could
declare a 2 GiB header and exhaust the indexer's memory. `BoundedTarInfo` (passed to
`tarfile.open` as `tarinfo=`) refuses such headers before reading them, with the limit Go's
archive/tar applies (and so containerd and umoci): 1 MiB per special header. Global PAX
headers, which tarfile keeps for the rest of the archive, share one such budget, and a
chain of special headers before one entry is kept short, as tarfile follows it by recursion.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator
from typing import Any

MAX_SPECIAL_HEADER = 1 << 20  # Go's archive/tar maxSpecialFileSize
MAX_CHAINED_HEADERS = 16  # special headers before one entry: a real one needs 3 at most
_DEPTH = "_cafs_special_depth"  # attribute kept on the TarFile being read


class HeaderTooLarge(tarfile.TarError):
    """A special header is over its bound; the layer is refused, never read further."""


def _kind(info: tarfile.TarInfo) -> str:
    return {
        tarfile.XHDTYPE: "PAX extended header",
        tarfile.SOLARIS_XHDTYPE: "PAX extended header",
        tarfile.XGLTYPE: "PAX global header",
        tarfile.GNUTYPE_LONGNAME: "GNU long name",
        tarfile.GNUTYPE_LONGLINK: "GNU long link name",
    }.get(info.type, f"tar header of type {info.type!r}")


def _check_size(info: tarfile.TarInfo, size: int) -> None:
    if size > MAX_SPECIAL_HEADER:
        raise HeaderTooLarge(
            f"{_kind(info)} of {size} bytes is over the limit of {MAX_SPECIAL_HEADER} bytes"
        )


def _global_bytes(tf: tarfile.TarFile) -> int:
    return sum(len(k) + len(v) for k, v in tf.pax_headers.items())


@contextlib.contextmanager
def _chained(info: tarfile.TarInfo, tf: tarfile.TarFile) -> Iterator[None]:
    """tarfile reads the entry after a special header recursively: count the nesting."""
    depth = getattr(tf, _DEPTH, 0) + 1
    if depth > MAX_CHAINED_HEADERS:
        raise HeaderTooLarge(f"over {MAX_CHAINED_HEADERS} special tar headers before one entry")
    setattr(tf, _DEPTH, depth)
    try:
        yield
    finally:
        setattr(tf, _DEPTH, depth - 1)


class _Budget:
    """The archive's stream, failing once a sparse map has read more than its bound."""

    def __init__(self, inner: Any, what: str) -> None:
        self._inner = inner
        self._what = what
        self._left = MAX_SPECIAL_HEADER

    def read(self, size: int) -> bytes:
        self._left -= size
        if self._left < 0:
            raise HeaderTooLarge(f"{self._what} is over the limit of {MAX_SPECIAL_HEADER} bytes")
        data: bytes = self._inner.read(size)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def _budget(tf: tarfile.TarFile, what: str) -> Iterator[None]:
    inner = tf.fileobj
    tf.fileobj = _Budget(inner, what)
    try:
        yield
    except ValueError as exc:  # tarfile's own parsing of a malformed map
        raise tarfile.ReadError(f"malformed {what}: {exc}") from None
    finally:
        tf.fileobj = inner


class BoundedTarInfo(tarfile.TarInfo):
    """TarInfo whose special headers are checked against their bounds before being read."""

    def _proc_pax(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        _check_size(self, self.size)
        if self.type == tarfile.XGLTYPE:
            _check_size(self, _global_bytes(tf) + self.size)
        with _chained(self, tf):
            return super()._proc_pax(tf)  # type: ignore[misc]

    def _proc_gnulong(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        _check_size(self, self.size)
        with _chained(self, tf):
            return super()._proc_gnulong(tf)  # type: ignore[misc]

    def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        with _budget(tf, "GNU sparse map"):
            return super()._proc_sparse(tf)  # type: ignore[misc]

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str],
                           tf: tarfile.TarFile) -> None:
        with _budget(tf, "GNU sparse map"):
            super()._proc_gnusparse_10(next, pax_headers, tf)  # type: ignore[misc]
