"""Large prefetched blobs stream from S3 into the node cache, hashed while written
(cafs.daemon.fetcher `_stream_in`, NodeCache.insert_pieces): only bytes that match their key are
ever renamed into place, whatever the store sends."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blobstore import BlobCorrupt, open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from cafs.daemon.fetcher import STREAM_MIN, Fetcher, FetchFailed, FetchPolicy
from cafs.daemon.stats import MountStats
from tests.conftest import S3Server

MiB = 1 << 20


def _leftovers(cache: NodeCache) -> list[str]:
    return os.listdir(cache.tmp)


def _prefetch_then_read(url: str, cache: NodeCache, key: str, size: int
                        ) -> tuple[bytes | Exception, Fetcher]:
    """Prefetch the blob in the background (the streamed path), then read it on demand."""
    stats = MountStats()

    async def main() -> tuple[bytes | Exception, Fetcher]:
        fetcher = Fetcher(open_store(url), cache, stats,
                          FetchPolicy(deadline=5.0, backoff_start=0.01))
        with contextlib.suppress(FetchFailed):  # a failed prefetch is no verdict
            await fetcher.prefetch(key, size, trio.CapacityLimiter(4))
        try:
            out = memoryview(bytearray(size))
            async with fetcher.open(key, size) as blob:
                got: bytes | Exception = bytes(out[: await blob.read_into(0, out)])
        except FetchFailed as exc:
            got = exc
        return got, fetcher

    return trio.run(main)


def test_large_blobs_stream_into_the_cache_verified_and_trusted(
        s3_server: S3Server, tmp_path: Path) -> None:
    store = open_store(s3_server.url)
    raw = os.urandom(STREAM_MIN + 12345)
    packed = b"\0" * (2 * MiB)  # compresses: a zstd envelope, decoded whole
    for data, compress in ((raw, False), (packed, True)):
        store.put(blob_key(digest(data)), encode(data, compress=compress))
    cache = NodeCache(tmp_path / "cache", fsync=False)
    for data in (raw, packed):
        key = digest(data)
        got, fetcher = _prefetch_then_read(s3_server.url, cache, key, len(data))
        assert got == data
        assert fetcher.verified(key)
        fd = cache.open(key, len(data))
        assert fd is not None
        try:
            assert cache.trusted(key, fd)  # other processes need not hash it again
        finally:
            os.close(fd)
        assert fetcher.stats.prefetch_bytes == len(data)
    assert _leftovers(cache) == []


@pytest.mark.parametrize("damage", ["flipped", "short", "long"])
def test_a_corrupt_large_blob_is_never_cached_and_the_read_fails(
        s3_server: S3Server, tmp_path: Path, damage: str) -> None:
    data = os.urandom(2 * MiB)
    key = digest(data)
    sent = {"flipped": data[:-1] + bytes([data[-1] ^ 1]),
            "short": data[:-1], "long": data + b"x"}[damage]
    open_store(s3_server.url).put(blob_key(key), encode(sent, compress=False))
    cache = NodeCache(tmp_path / "cache", fsync=False)
    got, fetcher = _prefetch_then_read(s3_server.url, cache, key, len(data))
    assert isinstance(got, FetchFailed)  # the reader's EIO
    assert not cache.path(key).exists()
    assert _leftovers(cache) == []
    assert not fetcher.verified(key)
    assert fetcher.stats.corrupt_blobs >= 1


def test_insert_pieces_keeps_only_matching_bytes(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache", fsync=False)
    data = os.urandom(3 * MiB + 7)
    key = digest(data)
    pieces = [data[i:i + MiB] for i in range(0, len(data), MiB)]

    def failing() -> Iterator[bytes]:
        yield pieces[0]
        raise OSError("connection reset mid-body")

    bad: list[tuple[int, list[bytes]]] = [
        (len(data), [*pieces[:-1], pieces[-1][:-1] + b"\0"]),  # damaged
        (len(data), pieces[:-1]),  # short
        (len(data) - 1, pieces),  # longer than the size
    ]
    for size, source in bad:
        with pytest.raises(BlobCorrupt):
            cache.insert_pieces(key, size, source)
    with pytest.raises(OSError, match="mid-body"):
        cache.insert_pieces(key, len(data), failing())
    assert not cache.path(key).exists()
    assert _leftovers(cache) == []
    cache.insert_pieces(key, len(data), iter(pieces))
    assert cache.path(key).read_bytes() == data
    assert cache.usage().bytes == len(data)
