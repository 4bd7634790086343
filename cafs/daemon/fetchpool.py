"""Bulk prefetch in worker processes: fetch, verify and cache blobs beyond one GIL.

Measured on a 16-core H100 node (docs/BENCHMARKS.md, "GPU weight path"): one Python
process moving blobs from S3 into the node cache tops out at about 440 MiB/s with 4 MiB
blobs and 780 MiB/s with 16 MiB ones, whatever its thread count, held by the GIL its HTTP
client takes between socket reads; 16 processes doing the same work moved 710-820 and
1,960-2,170 MiB/s. So a large prefetch plan (model weights) hands each blob to a pool of
worker processes, each of which GETs it, checks it against its key, writes it into the node cache
and records it there as trusted (`NodeCache.trust`); the daemon then opens the cache file
as it would one written by any other process, without hashing it again.

A worker that fails a blob (store error, bytes that do not match the key) only says so:
the caller fetches that blob itself, with its retries. A pool that breaks (a worker killed)
is given up for the rest of its plan; the prefetcher stops a pool when no plan is left.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import trio

from blobstore import BlobStore, open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import decode, envelope_limit
from cafs.cpus import usable_cpus

log = logging.getLogger(__name__)
MAX_WORKERS = 16  # where the measured gain flattened out on a 16-core node
MIN_PLAN_BYTES = 256 << 20  # smaller plans are not worth starting processes for


class PoolFailed(RuntimeError):
    """The pool could not bring this blob in; the caller fetches it itself."""


def auto_workers() -> int:
    """Worker processes for a node: none below 4 usable cores (affinity and cgroup quota),
    where one process is as good."""
    cores = usable_cpus()
    return min(cores, MAX_WORKERS) if cores >= 4 else 0


# --- in the worker processes -------------------------------------------------------------

_store: BlobStore | None = None
_cache: NodeCache | None = None


def worker_start(store_url: str, cache_dir: str) -> None:
    global _store, _cache
    _store = open_store(store_url, retries=False)  # a failure goes back to the daemon's retries
    _cache = NodeCache(cache_dir, fsync=False)


def worker_fill(key: str, size: int) -> int:
    """GET, verify, cache and trust one blob of `size` decoded bytes; its decoded size."""
    assert _store is not None and _cache is not None
    # BlobCorrupt if it is not `key`, ObjectTooLarge (unread) if it cannot be
    data = decode(_store.get(blob_key(key), envelope_limit(size)), key, size=size)
    _cache.insert(key, data, account=False)  # the daemon counts it: `NodeCache.added`
    fd = _cache.open(key, len(data))
    if fd is None:
        raise PoolFailed(f"blob {key} vanished from the cache right after insertion")
    try:
        _cache.trust(key, fd)
    finally:
        os.close(fd)
    return len(data)


# --- in the daemon ------------------------------------------------------------------------


class FetchPool:
    """Worker processes that bring blobs into the node cache; used from trio."""

    def __init__(self, store_url: str, cache_dir: Path, workers: int,
                 queue_while_starting: bool = False) -> None:
        # forkserver: workers forked from a clean server process, not from a daemon with
        # FUSE and trio threads running.
        ctx = multiprocessing.get_context("forkserver")
        self.workers = workers
        self.filled = 0  # blobs the workers brought into the cache
        self.failed = 0  # blobs they could not (left to the daemon)
        self._executor: ProcessPoolExecutor | None = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=worker_start, initargs=(store_url, str(cache_dir)))
        # Starting the workers takes a while (0.4 s for 4 on 2 cores, each importing its
        # store client): until all answered, blobs are fetched in the daemon, not queued
        # (unless asked to queue: processes the user asked for get every blob).
        self._starting = 0 if queue_while_starting else workers
        for _ in range(workers):
            self._executor.submit(abs, 0).add_done_callback(self._started)

    def _started(self, _: Future[int]) -> None:
        self._starting = max(0, self._starting - 1)  # executor thread; only counts down

    @property
    def usable(self) -> bool:
        return self._executor is not None

    @property
    def ready(self) -> bool:
        """Every worker is up: hand blobs to the pool from now on."""
        return self._executor is not None and self._starting <= 0

    async def fill(self, key: str, size: int) -> int:
        """Bring `key` (`size` decoded bytes) into the node cache through a worker; its
        size, or PoolFailed."""
        if self._executor is None:
            raise PoolFailed("the worker pool is gone")
        try:
            fut = self._executor.submit(worker_fill, key, size)
        except (BrokenProcessPool, RuntimeError) as exc:
            self.failed += 1
            self._broken(exc)
            raise PoolFailed(str(exc)) from None
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: Future[int]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            fut.cancel()
            raise
        try:
            size = fut.result()
        except BrokenProcessPool as exc:
            self.failed += 1
            self._broken(exc)
            raise PoolFailed(str(exc)) from None
        except Exception as exc:
            self.failed += 1
            raise PoolFailed(f"{type(exc).__name__}: {exc}") from None
        self.filled += 1
        return size

    def status(self) -> dict[str, Any]:
        return {"workers": self.workers, "running": self.usable, "filled_blobs": self.filled,
                "failed_blobs": self.failed}

    def _broken(self, exc: BaseException) -> None:
        if self._executor is not None:
            log.error("prefetch worker processes failed (%s): fetching in the daemon", exc)
            self.close()

    def close(self) -> None:
        """Stop the workers now: one stuck in a store call (retries, timeouts) would otherwise
        hold the daemon's exit. A worker killed mid-write leaves only a temp file."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list(getattr(executor, "_processes", {}).values())  # no public handle
        executor.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            with contextlib.suppress(OSError, ValueError):
                proc.terminate()


def open_pool(store: BlobStore, cache: NodeCache, workers: int,
              queue_while_starting: bool = False) -> FetchPool | None:
    """A pool for this mount's store and cache, or None (with the reason logged)."""
    if workers <= 0:
        return None
    try:
        return FetchPool(store.url, cache.root, workers, queue_while_starting)
    except (OSError, ValueError) as exc:
        log.warning("no prefetch worker processes (%s): fetching in the daemon", exc)
        return None


__all__ = ["MIN_PLAN_BYTES", "FetchPool", "PoolFailed", "auto_workers", "open_pool"]
