"""The fetcher's blob handles: the context is the pin; a blob the cache cannot keep is a
handle like any other."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import trio

from blobstore import open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from cafs.daemon.fetcher import Fetcher, FetchPolicy, FileBlob, HeldBlob
from cafs.daemon.stats import MountStats


def _store(tmp_path: Path, count: int, size: int = 10_000) -> tuple[str, list[bytes]]:
    url = f"file://{tmp_path}/store"
    store = open_store(url)
    blobs = [os.urandom(size) for _ in range(count)]
    for data in blobs:
        store.put(blob_key(digest(data)), encode(data, compress=False))
    return url, blobs


async def _read(fetcher: Fetcher, data: bytes) -> bytes:
    out = memoryview(bytearray(len(data)))
    async with fetcher.open(digest(data), len(data)) as blob:
        return bytes(out[: await blob.read_into(0, out)])


def test_a_pinned_blob_stays_open_while_others_come_and_go(tmp_path: Path) -> None:
    """With room for one open cache file, a reader inside its context keeps its file open
    while other blobs are opened and evicted around it, and the blob just opened for a
    reader is never the one evicted (its reader pins it right after)."""
    url, (a, b, c, d) = _store(tmp_path, 4)

    async def main() -> None:
        fetcher = Fetcher(open_store(url), NodeCache(tmp_path / "cache", fsync=False),
                          MountStats(), FetchPolicy(max_open=1))
        try:
            async with fetcher.open(digest(a), len(a)) as held:
                assert isinstance(held, FileBlob)
                assert await _read(fetcher, b) == b  # opened beside the pinned one
                assert await _read(fetcher, c) == c  # b evicted, a kept
                assert fetcher.cached(digest(b)) is None
                out = memoryview(bytearray(len(a)))
                assert await held.read_into(0, out) == len(a) and bytes(out) == a
            assert await _read(fetcher, d) == d  # now a may go
            assert fetcher.cached(digest(a)) is None
        finally:
            fetcher.close()

    trio.run(main)


class _FullCache(NodeCache):
    def insert(self, digest: str, data: bytes | memoryview, account: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_blob_the_cache_cannot_take_is_held_and_served_from_memory(tmp_path: Path) -> None:
    url, (data,) = _store(tmp_path, 1)
    stats = MountStats()

    async def main() -> None:
        fetcher = Fetcher(open_store(url), _FullCache(tmp_path / "cache", fsync=False), stats)
        try:
            for _ in range(2):  # fetched once, then served from memory
                async with fetcher.open(digest(data), len(data)) as blob:
                    assert isinstance(blob, HeldBlob)
                    assert blob.span(0, 100) is None  # no file for libfuse to reply from
                    out = memoryview(bytearray(100))
                    assert await blob.read_into(len(data) - 40, out) == 40
                    assert bytes(out[:40]) == data[-40:]
        finally:
            fetcher.close()

    trio.run(main)
    assert stats.store_gets == 1 and stats.cache_errors == 1


def _dropped(blob: FileBlob) -> bool:
    """Drop the blob's pages from the page cache: DONTNEED skips pages still being written
    back or briefly held elsewhere, so it is asked again until none is offered."""
    for _ in range(50):
        os.fsync(blob.fd)
        os.posix_fadvise(blob.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if blob.span(4096, 8192) is None:
            return True
        time.sleep(0.02)
    return False


def test_a_span_is_offered_only_for_bytes_in_the_page_cache(tmp_path: Path) -> None:
    url, (data,) = _store(tmp_path, 1, size=1 << 20)
    key = digest(data)

    async def main() -> None:
        fetcher = Fetcher(open_store(url), NodeCache(tmp_path / "cache", fsync=False),
                          MountStats())
        try:
            async with fetcher.open(key, len(data)) as blob:
                assert isinstance(blob, FileBlob)
                assert _dropped(blob), "the kernel kept the cache file's pages"
                out = memoryview(bytearray(len(data)))
                assert await blob.read_into(0, out) == len(data)  # reads the disk
                assert blob.span(4096, 8192) == (blob.fd, 4096, 8192)
                assert blob.span(len(data) - 10, 100) == (blob.fd, len(data) - 10, 10)
                assert blob.span(len(data), 100) is None
        finally:
            fetcher.close()

    trio.run(main)
