"""Readahead of cache files: whole files whatever the disk's readahead setting, once a
second at most, and only for files open here."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blobstore import open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from cafs.daemon import pagecache, readahead
from cafs.daemon.fetcher import Fetcher, FileBlob
from cafs.daemon.stats import MountStats

MiB = 1 << 20


def _queue(disk: Path, read_ahead_kb: int, max_sectors_kb: int) -> None:
    (disk / "queue").mkdir(parents=True)
    (disk / "queue" / "read_ahead_kb").write_text(f"{read_ahead_kb}\n")
    (disk / "queue" / "max_sectors_kb").write_text(f"{max_sectors_kb}\n")


def test_the_window_is_the_larger_of_readahead_and_request_size(tmp_path: Path) -> None:
    devices, links = tmp_path / "devices", tmp_path / "dev-block"
    links.mkdir()
    _queue(devices / "vda", 128, 1280)
    (devices / "vda" / "vda1").mkdir()  # a partition: no queue of its own
    _queue(devices / "sda", 4096, 512)
    (links / "254:0").symlink_to(devices / "vda")
    (links / "254:1").symlink_to(devices / "vda" / "vda1")
    (links / "8:0").symlink_to(devices / "sda")
    assert pagecache.device_window(os.makedev(254, 0), links) == 1280 << 10
    assert pagecache.device_window(os.makedev(254, 1), links) == 1280 << 10
    assert pagecache.device_window(os.makedev(8, 0), links) == 4096 << 10
    assert pagecache.device_window(os.makedev(0, 42), links) == pagecache.DEFAULT_WINDOW


def test_refused_advice_is_no_error() -> None:
    read, write = os.pipe()  # posix_fadvise on a pipe: ESPIPE
    try:
        pagecache.willneed(read, 0, 1 << 20)
    finally:
        os.close(read)
        os.close(write)


def _pages_resident(fd: int) -> int:
    """Counted by util-linux's fincore (mincore(2)): a read with RWF_NOWAIT, however
    small, starts the kernel's readahead itself and would bring in the pages it looks for."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          f"/proc/{os.getpid()}/fd/{fd}"],
                         check=True, capture_output=True, text=True).stdout
    return int(out) // 4096


async def _all_pages_arrive(fd: int, size: int) -> None:
    deadline = time.monotonic() + 5
    while (resident := _pages_resident(fd)) < size // 4096:
        assert time.monotonic() < deadline, f"{resident} of {size // 4096} pages read ahead"
        await trio.sleep(0.02)


async def _dropped(fetcher: Fetcher, key: str, size: int) -> FileBlob:
    """The blob's cache file, open in the fetcher, none of its pages in memory."""
    async with fetcher.open(key, size):
        pass
    blob = fetcher.cached(key)
    assert blob is not None
    os.sync()
    os.posix_fadvise(blob.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert _pages_resident(blob.fd) == 0
    return blob


def _stored_blob(tmp_path: Path, size: int) -> tuple[str, str]:
    url = f"file://{tmp_path}/store"
    data = os.urandom(size)
    key = digest(data)
    open_store(url).put(blob_key(key), encode(data, compress=False))
    return url, key


def test_a_cache_file_is_read_ahead_once_a_second_and_only_when_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readahead, "ADVISE_AGAIN_AFTER", 0.2)
    url, key = _stored_blob(tmp_path, 4 * MiB)

    async def main() -> None:
        fetcher = Fetcher(open_store(url), NodeCache(tmp_path / "cache", fsync=False),
                          MountStats())
        try:
            assert fetcher.cached(key) is None  # not open here: nothing to read ahead
            blob = await _dropped(fetcher, key, 4 * MiB)
            assert readahead.advice_due(blob)
            assert not readahead.advice_due(blob)  # asked already: not within the interval
            async with blob:
                await blob.willneed()
            await _all_pages_arrive(blob.fd, 4 * MiB)
            await trio.sleep(0.25)
            assert readahead.advice_due(blob)  # its pages may have gone since: asked again
        finally:
            fetcher.close()

    trio.run(main)


@pytest.fixture
def small_readahead_disk(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem on a loop device left at the kernel's default 128 KiB readahead,
    with 64 KiB requests: one WILLNEED call reads 128 KiB of it."""
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        queue = Path("/sys/block") / Path(dev).name / "queue"
        (queue / "read_ahead_kb").write_text("128")
        (queue / "max_sectors_kb").write_text("64")
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@pytest.mark.root
@pytest.mark.parametrize("asked_by", ["readahead", "a read that misses"])
def test_a_whole_chunk_is_read_ahead_on_a_disk_with_small_readahead(
        tmp_path: Path, small_readahead_disk: Path, asked_by: str) -> None:
    url, key = _stored_blob(tmp_path, 4 * MiB)

    async def main() -> None:
        fetcher = Fetcher(open_store(url), NodeCache(small_readahead_disk / "cache"),
                          MountStats())
        try:
            blob = await _dropped(fetcher, key, 4 * MiB)
            assert pagecache.window(blob.fd) == 128 << 10
            async with blob:
                if asked_by == "readahead":
                    assert readahead.advice_due(blob)
                    await blob.willneed()
                else:  # the read's thread asks for the rest of the chunk before it waits
                    out = memoryview(bytearray(4096))
                    assert await blob.read_into(0, out) == 4096
            await _all_pages_arrive(blob.fd, 4 * MiB)  # one call for the file: 32 pages
        finally:
            fetcher.close()

    trio.run(main)
