"""Prefetch through worker processes: the same verified, trusted cache files as in-process."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from blobstore import open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from cafs.daemon.fetcher import Fetcher, FetchPolicy
from cafs.daemon.fetchpool import auto_workers
from cafs.daemon.prefetch import Plan, PlanStatus, Prefetcher, PrefetchPolicy
from cafs.daemon.stats import MountStats

MiB = 1 << 20


def _store(tmp_path: Path, n: int, corrupt: int | None = None) -> tuple[str, list[tuple[str, int]]]:
    """A file store with `n` blobs (the `corrupt`-th stored under a key its bytes do not
    have); the plan of them."""
    url = f"file://{tmp_path}/store"
    store = open_store(url)
    blobs = []
    for i in range(n):
        data = os.urandom(MiB + i)
        key = digest(data)
        store.put(blob_key(key), encode(os.urandom(len(data)) if i == corrupt else data,
                                        compress=False))
        blobs.append((key, len(data)))
    return url, blobs


def _prefetch(url: str, cache: NodeCache, blobs: list[tuple[str, int]], processes: int,
              kill_workers: bool = False) -> tuple[PlanStatus, dict[str, Any]]:
    stats = MountStats()

    async def main() -> tuple[PlanStatus, dict[str, Any]]:
        store = open_store(url)
        fetcher = Fetcher(store, cache, stats, FetchPolicy(deadline=1.0, backoff_start=0.05))
        prefetcher = Prefetcher(fetcher, store, PrefetchPolicy(processes=processes))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetcher.run)
            if kill_workers:  # a pool whose workers die mid-plan: the daemon takes over
                pool = await prefetcher._pool_for(Plan("x", blobs, 4), 0)
                assert pool is not None
                await pool.fill(*blobs[0])
                for pid in list(pool._executor._processes):  # type: ignore[union-attr]
                    os.kill(pid, signal.SIGKILL)
            status = prefetcher.submit(Plan("weights", blobs, 4))
            while status.state != "done":
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        fetcher.close()
        return status, {**stats.snapshot(), **prefetcher.status()}

    return trio.run(main)


def test_worker_processes_fill_the_cache_with_verified_trusted_blobs(tmp_path: Path) -> None:
    url, blobs = _store(tmp_path, 8, corrupt=5)
    cache = NodeCache(tmp_path / "cache", fsync=False)
    status, stats = _prefetch(url, cache, blobs, processes=2)
    assert status.processes == 2
    assert status.done_blobs == 7 and status.failed_blobs == 1  # the corrupt one, refused
    assert stats["prefetch_blobs"] == 7 and stats["corrupt_blobs"] >= 1  # the daemon's try
    assert stats["processes"] == {"workers": 2, "running": False, "filled_blobs": 7,
                                  "failed_blobs": 1}  # closed with the prefetcher
    for i, (key, size) in enumerate(blobs):
        fd = cache.open(key, size)
        if i == 5:
            assert fd is None  # never cached, neither by a worker nor by the daemon
            continue
        assert fd is not None
        try:
            assert digest(os.pread(fd, size, 0)) == key
            assert cache.trusted(key, fd)  # recorded by the worker: nobody hashes it again
        finally:
            os.close(fd)
    assert cache.usage().bytes == sum(size for i, (_, size) in enumerate(blobs) if i != 5)


def test_a_pool_that_breaks_leaves_the_daemon_to_fetch(tmp_path: Path) -> None:
    url, blobs = _store(tmp_path, 6)
    cache = NodeCache(tmp_path / "cache", fsync=False)
    started = time.monotonic()
    status, stats = _prefetch(url, cache, blobs, processes=2, kill_workers=True)
    assert status.failed_blobs == 0 and status.done_blobs + status.cached_blobs == 6
    assert stats["processes"]["filled_blobs"] == 1 and stats["processes"]["failed_blobs"] >= 1
    assert time.monotonic() - started < 30
    for key, size in blobs:
        fd = cache.open(key, size)
        assert fd is not None
        os.close(fd)


def test_processes_are_off_unless_asked_or_large(tmp_path: Path) -> None:
    url, blobs = _store(tmp_path, 2)
    cache = NodeCache(tmp_path / "cache", fsync=False)
    status, stats = _prefetch(url, cache, blobs, processes=0)
    assert status.processes == 0 and status.done_blobs == 2 and stats["processes"] is None
    workers = auto_workers()
    assert workers == 0 or 4 <= workers <= 16


def test_closing_the_pool_stops_a_worker_stuck_in_the_store(tmp_path: Path,
                                                           monkeypatch: Any) -> None:
    """A store that accepts and never answers: unmounting must not wait for its timeouts."""
    import socket

    from cafs.daemon.fetchpool import FetchPool, PoolFailed

    silent = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    pool = FetchPool("s3://silent-bucket/p", tmp_path / "cache", 1, queue_while_starting=True)
    workers = list(pool._executor._processes.values())  # type: ignore[union-attr]

    async def main() -> None:
        async def fill() -> None:
            with contextlib.suppress(PoolFailed):  # its worker is killed: the daemon's turn
                await pool.fill("ab" * 32, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill)
            await trio.sleep(1.5)  # the worker is in its GET, waiting on the socket
            started = time.monotonic()
            pool.close()
            with trio.fail_after(10):
                while any(w.is_alive() for w in workers):
                    await trio.sleep(0.05)
            assert time.monotonic() - started < 5
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        silent.close()
    assert workers and not pool.usable
