"""Layer decompression: gzip (ISA-L, in its own thread), zstd and plain tar, by sniffing.

Media types lie in the wild (Docker's `.tar` that is gzip), so the stream's magic bytes
decide. Decompression runs in a separate thread where the library offers one, overlapping
with hashing and tar parsing in the caller's thread.
"""

from __future__ import annotations

import io
from typing import IO

import isal.igzip_threaded
import zstandard

from indexer.budgets import Meter, refusal
from indexer.layer import LayerError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Prefixed(io.RawIOBase):
    """A stream with some already-read bytes put back in front."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class BoundedReader(io.RawIOBase):
    """Counts decompressed bytes and stops a decompression bomb at the layer's budget, or
    at the image's (`image`, shared by all its layers)."""

    def __init__(self, inner: IO[bytes], limit: int, image: Meter | None = None) -> None:
        self._inner = inner
        self.limit = limit
        self._image = image
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(buf))
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise LayerError(f"corrupt or truncated layer: {exc}") from exc
        self.count += len(data)
        if self.count > self.limit:
            raise LayerError(refusal("max_layer_bytes", self.limit))
        if self._image is not None:
            self._image.spend(len(data))
        buf[: len(data)] = data
        return len(data)


def open_layer(raw: IO[bytes], limit: int, image: Meter | None = None) -> BoundedReader:
    """The uncompressed tar stream of a stored layer blob, at most `limit` bytes (and what
    is left of the image's budget `image`)."""
    head = raw.read(4)
    src = io.BufferedReader(_Prefixed(head, raw), buffer_size=1 << 20)
    inner: IO[bytes]
    try:
        if head.startswith(GZIP_MAGIC):
            inner = isal.igzip_threaded.open(src, "rb", threads=1)
        elif head.startswith(ZSTD_MAGIC):
            dctx = zstandard.ZstdDecompressor()
            inner = dctx.stream_reader(src, read_across_frames=True)
        else:
            inner = src
    except (OSError, zstandard.ZstdError) as exc:
        raise LayerError(f"cannot decompress layer: {exc}") from exc
    return BoundedReader(inner, limit, image)
