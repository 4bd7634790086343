"""A reader's small blob is served from its verified bytes at once and written to the node
cache behind the reply (`Fetcher.settle`); the cache file then takes over."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
import trio.testing
import zstandard
from test_blob import _FullCache

from blobstore import open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import CODEC_ZSTD, digest, encode, header
from cafs.daemon.fetcher import TRUST_MIN, Fetcher, FileBlob, HeldBlob
from cafs.daemon.stats import MountStats


def _store(tmp_path: Path, *sizes: int) -> tuple[str, list[bytes]]:
    url = f"file://{tmp_path}/store"
    store = open_store(url)
    blobs = [os.urandom(size) for size in sizes]
    for data in blobs:
        store.put(blob_key(digest(data)), encode(data, compress=False))
    return url, blobs


async def _read(fetcher: Fetcher, data: bytes) -> tuple[type, bytes]:
    out = memoryview(bytearray(len(data)))
    async with fetcher.open(digest(data), len(data)) as blob:
        return type(blob), bytes(out[: await blob.read_into(0, out)])


async def _settled(fetcher: Fetcher, data: bytes) -> None:
    with trio.fail_after(10):
        while fetcher.known(digest(data)) and fetcher.cached(digest(data)) is None:
            await trio.sleep(0.01)


def _with_settle(fetcher: Fetcher, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.settle)
                await trio.testing.wait_all_tasks_blocked()
                assert fetcher.settles
                await body()
                nursery.cancel_scope.cancel()
        finally:
            fetcher.close()
    trio.run(main)


def test_a_small_blob_is_served_first_and_cached_behind(tmp_path: Path) -> None:
    """The first read gets the bytes from memory; the cache file replaces them once
    written. Only a blob worth hashing again gets a trust record for other processes."""
    url, (small, larger) = _store(tmp_path, 10_000, TRUST_MIN + 1)
    cache = NodeCache(tmp_path / "cache", fsync=False)
    stats = MountStats()
    fetcher = Fetcher(open_store(url), cache, stats)

    async def body() -> None:
        for data in (small, larger):
            assert await _read(fetcher, data) == (HeldBlob, data)
            await _settled(fetcher, data)
            assert await _read(fetcher, data) == (FileBlob, data)
            assert cache.path(digest(data)).read_bytes() == data
        fd = cache.open(digest(small), len(small))
        assert fd is not None and not cache.trusted(digest(small), fd)
        os.close(fd)
        fd = cache.open(digest(larger), len(larger))
        assert fd is not None and cache.trusted(digest(larger), fd)
        os.close(fd)
        assert stats.cache_misses == 2 and stats.cache_errors == 0

    _with_settle(fetcher, body)


def test_a_chunk_sized_blob_is_served_from_memory_too(tmp_path: Path) -> None:
    """A library's 4 MiB chunk is read as the loader faults on it: its write and open must
    not be on that read's path either."""
    url, (data,) = _store(tmp_path, 4 << 20)
    cache = NodeCache(tmp_path / "cache", fsync=False)
    fetcher = Fetcher(open_store(url), cache, MountStats())

    async def body() -> None:
        assert await _read(fetcher, data) == (HeldBlob, data)
        await _settled(fetcher, data)
        assert await _read(fetcher, data) == (FileBlob, data)
        assert cache.path(digest(data)).read_bytes() == data

    _with_settle(fetcher, body)


def test_a_blob_the_cache_refuses_behind_the_reply_stays_in_memory(tmp_path: Path) -> None:
    url, (data,) = _store(tmp_path, 10_000)
    stats = MountStats()
    fetcher = Fetcher(open_store(url), _FullCache(tmp_path / "cache", fsync=False), stats)

    async def body() -> None:
        assert await _read(fetcher, data) == (HeldBlob, data)
        with trio.fail_after(10):
            while stats.cache_errors == 0:
                await trio.sleep(0.01)
        assert not fetcher.known(digest(data))
        assert await _read(fetcher, data) == (HeldBlob, data)  # from memory, not refetched
        assert stats.store_gets == 1

    _with_settle(fetcher, body)


def test_a_held_envelope_is_checked_before_it_is_served(tmp_path: Path) -> None:
    """An envelope a pack segment brought is served without a GET when it matches its key;
    a damaged one, or one declaring another size (here a zstd bomb of 1 GiB of zeros for a
    10 kB file: refused unopened), is counted and the blob fetched alone."""
    url, (good, damaged, bombed) = _store(tmp_path, 10_000, 10_000, 10_000)
    stats = MountStats()
    fetcher = Fetcher(open_store(url), NodeCache(tmp_path / "cache", fsync=False), stats)
    bad = bytearray(encode(damaged, compress=True))
    bad[-1] ^= 1
    squeeze = zstandard.ZstdCompressor().compressobj()
    zeros = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(1024)) + squeeze.flush()
    bomb = header(CODEC_ZSTD, 1 << 30) + zeros
    envelopes = {digest(good): memoryview(encode(good, compress=True)),
                 digest(damaged): memoryview(bytes(bad)), digest(bombed): memoryview(bomb)}
    fetcher.held = lambda key: envelopes.pop(key, None)

    async def body() -> None:
        assert await _read(fetcher, good) == (HeldBlob, good)
        assert stats.store_gets == 0 and stats.corrupt_blobs == 0
        assert await _read(fetcher, damaged) == (HeldBlob, damaged)
        assert stats.store_gets == 1 and stats.corrupt_blobs == 1
        started = time.monotonic()
        assert await _read(fetcher, bombed) == (HeldBlob, bombed)
        assert time.monotonic() - started < 1
        assert stats.store_gets == 2 and stats.corrupt_blobs == 2
        for data in (good, damaged, bombed):
            await _settled(fetcher, data)
            assert await _read(fetcher, data) == (FileBlob, data)

    _with_settle(fetcher, body)


def test_what_is_queued_when_the_mount_stops_is_still_cached(tmp_path: Path) -> None:
    """A mount stopped right after a read still leaves the blob in the node cache."""
    url, (data,) = _store(tmp_path, 10_000)
    cache = NodeCache(tmp_path / "cache", fsync=False)
    fetcher = Fetcher(open_store(url), cache, MountStats())

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetcher.settle)
                await trio.testing.wait_all_tasks_blocked()
                assert await _read(fetcher, data) == (HeldBlob, data)
                nursery.cancel_scope.cancel()  # before the task could write it
            assert fetcher.cached(digest(data)) is not None
        finally:
            fetcher.close()

    trio.run(main)
    assert cache.path(digest(data)).read_bytes() == data


def test_readers_waiting_on_the_fetch_are_served_from_memory_too(tmp_path: Path) -> None:
    """Readers that came while the blob was being fetched get the same bytes, not EIO (the
    load test caught a second reader finding the blob neither open nor in memory)."""
    url, (data,) = _store(tmp_path, 10_000)
    fetcher = Fetcher(open_store(url), NodeCache(tmp_path / "cache", fsync=False),
                      MountStats())

    async def body() -> None:
        got: list[tuple[type, bytes]] = []

        async def reader() -> None:
            got.append(await _read(fetcher, data))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
        assert got == [(HeldBlob, data)] * 8

    _with_settle(fetcher, body)
