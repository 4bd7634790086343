"""Uploads blobs the store lacks, in parallel, with bounded memory.

The tar reader hands over each chunk once; compression (zstd releases the GIL) and the
store round trips run in a thread pool, so reading, hashing, compressing and uploading
overlap. A byte budget stops a fast reader from queueing a whole layer in memory.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from blobstore import BlobStore, blob_key
from blobstore.envelope import encode


@dataclass
class UploadStats:
    chunks: int = 0  # chunk references seen (with repeats)
    unique: int = 0  # distinct blobs in this run
    uploaded: int = 0  # blobs the store lacked
    raw_bytes: int = 0  # uncompressed bytes of uploaded blobs
    stored_bytes: int = 0  # bytes written to the store (after compression)
    present: int = 0  # blobs the store already had (dedup across images)


class BlobUploader:
    def __init__(self, store: BlobStore, workers: int = 16, budget: int = 256 << 20,
                 compress: bool = True, keep_small: int = 0, keep_budget: int = 512 << 20
                 ) -> None:
        self.store = store
        self.compress = compress
        self.stats = UploadStats()
        self._seen: set[str] = set()
        # Blobs up to `keep_small` bytes are kept (up to `keep_budget` in all) for the
        # image's neighbour pack (indexer/neighbours.py), uploaded or not.
        self.small: dict[str, bytes] = {}
        self._keep_small = keep_small
        self._keep_left = keep_budget
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        self._budget = threading.BoundedSemaphore(max(1, budget >> 20))
        self._lock = threading.Lock()
        self._futures: list[Future[None]] = []
        self._error: BaseException | None = None

    def add(self, digest: str, data: bytes) -> None:
        self.stats.chunks += 1
        if self._error is not None:
            raise self._error
        if digest in self._seen:
            return
        self._seen.add(digest)
        self.stats.unique += 1
        if len(data) <= self._keep_small and len(data) <= self._keep_left:
            self.small[digest] = bytes(data)
            self._keep_left -= len(data)
        units = max(1, len(data) >> 20)
        for _ in range(units):
            self._budget.acquire()
        fut = self._pool.submit(self._upload, digest, data, units)
        self._futures.append(fut)

    def _upload(self, digest: str, data: bytes, units: int) -> None:
        try:
            key = blob_key(digest)
            if self.store.exists(key):
                with self._lock:
                    self.stats.present += 1
                return
            envelope = encode(data, self.compress)
            self.store.put(key, envelope)
            with self._lock:
                self.stats.uploaded += 1
                self.stats.raw_bytes += len(data)
                self.stats.stored_bytes += len(envelope)
        except BaseException as exc:
            self._error = self._error or exc
            raise
        finally:
            for _ in range(units):
                self._budget.release()

    def finish(self) -> UploadStats:
        """Wait for every upload; re-raise the first failure."""
        try:
            for fut in self._futures:
                fut.result()
        finally:
            self._futures.clear()
            self._pool.shutdown(wait=True)
        return self.stats

    def digests(self) -> list[str]:
        """Every distinct blob this run referenced, uploaded or found present."""
        return list(self._seen)

    def abort(self) -> None:
        for fut in self._futures:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
