"""The node cache: atomic inserts, LRU eviction that never removes a blob in use."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from blobstore.cache import NodeCache
from blobstore.envelope import digest


def _blob(n: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([n % 256]) * size
    return digest(data), data


def test_insert_open_and_size_check(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, budget=1 << 20)
    key, data = _blob(1)
    assert cache.open(key, len(data)) is None
    cache.insert(key, data)
    fd = cache.open(key, len(data))
    assert fd is not None and os.pread(fd, 10, 0) == data[:10]
    os.close(fd)
    assert cache.open(key, len(data) + 1) is None  # wrong size: dropped, never trusted
    assert not cache.path(key).exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_eviction_is_lru_and_skips_pinned_blobs(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, budget=10_000)
    blobs = [_blob(n) for n in range(8)]
    for n, (key, data) in enumerate(blobs):
        cache.insert(key, data)
        os.utime(cache.path(key), (time.time() - 1000 + n, time.time() - 1000 + n))
    pinned = cache.open(blobs[0][0], 1000)  # the oldest, but in use
    assert pinned is not None
    key, data = _blob(99)
    cache.insert(key, data)  # 9000 bytes: under budget, nothing evicted yet
    assert all(cache.path(k).exists() for k, _ in blobs)
    for n in range(100, 103):
        k, v = _blob(n)
        cache.insert(k, v)  # crosses the budget: evict to 80%
    usage = cache.usage()
    assert usage.bytes <= cache.budget
    assert cache.path(blobs[0][0]).exists(), "a pinned blob was evicted"
    assert not cache.path(blobs[1][0]).exists(), "LRU order not respected"
    os.close(pinned)


def test_evict_skips_files_locked_by_another_process(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, budget=1 << 30)
    key, data = _blob(5)
    cache.insert(key, data)
    pid = os.fork()
    if pid == 0:  # child: hold a shared lock like a reader in another mount
        fd = os.open(cache.path(key), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        time.sleep(2)
        os._exit(0)
    time.sleep(0.5)
    cache.evict(target=0)
    assert cache.path(key).exists()
    os.waitpid(pid, 0)
    cache.evict(target=0)
    assert not cache.path(key).exists()


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path, budget=1 << 20)
    stale = tmp_path / "tmp" / "x.1.abcd"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.evict()
    assert not stale.exists()


def test_a_verified_file_is_trusted_by_other_processes_until_it_changes(tmp_path: Path) -> None:
    key, data = _blob(7)
    writer = NodeCache(tmp_path, budget=1 << 20)
    writer.insert(key, data)
    fd = writer.open(key, len(data))
    assert fd is not None
    writer.trust(key, fd)
    os.close(fd)
    reader = NodeCache(tmp_path, budget=1 << 20)  # another process, same boot
    fd = reader.open(key, len(data))
    assert fd is not None and reader.trusted(key, fd)
    os.close(fd)
    time.sleep(0.01)  # past the filesystem's timestamp granularity
    reader.path(key).write_bytes(b"X" * len(data))  # changed in place: same inode and size
    fd = reader.open(key, len(data))
    assert fd is not None and not reader.trusted(key, fd)
    os.close(fd)


def test_trust_records_are_symlinks_and_an_older_record_file_is_not_trusted(
        tmp_path: Path) -> None:
    """A record is a symlink (its target lives in the inode: checking it reads no data
    block); a record of the older format, a regular file, is no trust and is replaced."""
    key, data = _blob(9)
    cache = NodeCache(tmp_path, budget=1 << 20)
    cache.insert(key, data)
    fd = cache.open(key, len(data))
    assert fd is not None
    entry = cache._entry(key)
    assert entry is not None
    entry.parent.mkdir(parents=True)
    st = os.fstat(fd)
    entry.write_text(f"{st.st_ino} {st.st_size} {st.st_ctime_ns}")  # the older format
    assert not cache.trusted(key, fd)
    cache.trust(key, fd)
    assert entry.is_symlink() and cache.trusted(key, fd)
    os.close(fd)
    assert [p.name for p in entry.parent.iterdir()] == [key]  # no temp link left


def test_the_lru_touch_keeps_trust_and_a_new_boot_drops_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, data = _blob(8)
    cache = NodeCache(tmp_path, budget=1 << 20)
    cache.insert(key, data)
    old = time.time() - 3600
    os.utime(cache.path(key), (old, old))  # due for the LRU touch on the next open
    fd = cache.open(key, len(data))
    assert fd is not None
    cache.trust(key, fd)
    os.close(fd)
    os.utime(cache.path(key), (old, old))  # outside cafs: trust is gone...
    fd = cache.open(key, len(data))
    assert fd is not None and not cache.trusted(key, fd)
    cache.trust(key, fd)
    os.close(fd)
    fd = cache.open(key, len(data))  # ...while cafs's own touch keeps it
    assert fd is not None and cache.trusted(key, fd)
    assert os.fstat(fd).st_mtime > old + 3000
    os.close(fd)
    monkeypatch.setattr("blobstore.cache._boot_id", lambda: "another-boot")
    rebooted = NodeCache(tmp_path, budget=1 << 20)
    fd = rebooted.open(key, len(data))
    assert fd is not None and not rebooted.trusted(key, fd)
    os.close(fd)
    assert list((tmp_path / "trusted").iterdir()) == []  # the old boot's records are gone
    rebooted.discard(key)
    assert not any((tmp_path / "trusted").rglob(key))


def test_index_and_erofs_files_count_and_leave_by_age(tmp_path: Path) -> None:
    """The copies of indexes and EROFS images a mount keeps are under the budget too: by
    age with the blobs, never their temp files, and a file in use is touched to the end."""
    from blobstore.cache import touch

    cache = NodeCache(tmp_path, budget=10_000)
    old = time.time() - 1000
    (tmp_path / "indexes").mkdir()
    (tmp_path / "erofs").mkdir()
    index, image = tmp_path / "indexes" / ("a" * 64), tmp_path / "erofs" / ("b" * 64 + ".v1")
    writing = tmp_path / "erofs" / (".c.1234")  # a writer's temp file, not yet renamed
    for n, path in enumerate((index, image, writing)):
        path.write_bytes(b"x" * 2000)
        os.utime(path, (old + n, old + n))
    key, data = _blob(1, 3000)
    cache.insert(key, data)
    os.utime(cache.path(key), (old + 10, old + 10))
    usage = cache.usage()
    assert (usage.blobs, usage.metadata, usage.bytes) == (1, 2, 7000)
    touch(image)  # a mount used it just now
    cache.evict(target=5000)
    assert not index.exists() and image.exists() and cache.path(key).exists()
    assert writing.exists()  # younger than an hour: a writer may still rename it
    os.utime(writing, (old - 7200, old - 7200))
    cache.evict(target=0)
    assert not image.exists() and not writing.exists() and not cache.path(key).exists()
    assert cache.usage() == type(usage)(0, 0, cache.budget, 0)
