"""Readahead of cache files: how far ahead, how often, and never on the event loop."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from blobstore import open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from cafs import fetcher as fetcher_module
from cafs.fetcher import Fetcher
from cafs.fs import STREAM_SLACK, _OpenFile
from cafs.stats import MountStats
from indexer.format import Inode

MiB = 1 << 20


def test_a_file_read_through_is_streaming_and_a_jump_is_not() -> None:
    node = Inode(2, 0o100644, 0, 0, 1, 100 * 4 * MiB, 0, 0, 0, 100, 0, 0)
    file = _OpenFile(node, ["k"] * 100)
    assert not file.streaming(0, MiB)  # the first read: nothing to follow yet
    assert file.streaming(MiB, 2 * MiB)
    assert file.streaming(4 * MiB, 5 * MiB)  # the kernel's requests out of order
    assert file.streaming(3 * MiB, 4 * MiB)
    assert not file.streaming(4 * MiB + STREAM_SLACK + 1, 6 * MiB + STREAM_SLACK)  # a seek
    assert file.streaming(6 * MiB + STREAM_SLACK, 7 * MiB + STREAM_SLACK)


def _resident(fd: int, pos: int) -> bool:
    try:
        return os.preadv(fd, [bytearray(1)], pos, os.RWF_NOWAIT) == 1
    except OSError:
        return False


def test_a_cache_file_is_read_ahead_once_a_second_and_only_when_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher_module, "ADVISE_AGAIN_AFTER", 0.2)
    url = f"file://{tmp_path}/store"
    data = os.urandom(4 * MiB)
    key = digest(data)
    open_store(url).put(blob_key(key), encode(data, compress=False))

    async def main() -> None:
        fetcher = Fetcher(open_store(url), NodeCache(tmp_path / "cache", fsync=False),
                          MountStats())
        assert not fetcher.advice_due(key)  # not open here: nothing to read ahead
        fd = await fetcher.fd(key, len(data))
        fetcher.unpin(fd)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not _resident(fd, len(data) - 1)
        assert fetcher.advice_due(key)
        assert not fetcher.advice_due(key)  # asked already: not again within the interval
        await fetcher.willneed(key)
        deadline = time.monotonic() + 5
        while not _resident(fd, len(data) - 1):  # the kernel reads the whole file ahead
            assert time.monotonic() < deadline, "WILLNEED did not bring the file in"
            await trio.sleep(0.01)
        await trio.sleep(0.25)
        assert fetcher.advice_due(key)  # its pages may have gone since: asked again
        fetcher.close()

    trio.run(main)
