"""Brings blobs from the store into the node cache: verified, single-flight, retried.

Every blocking step runs in a worker thread under a limiter (network for store round
trips, CPU for decompression, hashing and cache writes), so no trio task ever blocks the
filesystem. Concurrent requests for one blob share one fetch. A store that is unavailable is
retried with backoff until a deadline, a refusal (denied, no such bucket) is not; a blob whose
bytes do not match its key is never served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from blobstore import (
    BlobCorrupt,
    BlobNotFound,
    BlobStore,
    StoreError,
    StoreUnavailable,
    blob_key,
)
from blobstore.cache import NodeCache
from blobstore.envelope import CODEC_RAW, decode, digest, envelope_limit, header, open_stream
from cafs.config import DaemonConfig
from cafs.cpus import usable_cpus
from cafs.daemon import pagecache
from cafs.daemon.fdlimit import EXHAUSTED, FD_CACHE_MAX, FD_CACHE_MIN, exhausted
from cafs.daemon.fetchpool import FetchPool, PoolFailed
from cafs.daemon.stats import MountStats

log = logging.getLogger(__name__)
ADVISE_AGAIN_AFTER = 1.0  # seconds before a cache file is read ahead again
STREAM_MIN = 1 << 20  # prefetched blobs this large go from the store to the cache in pieces
T = TypeVar("T")
# Where a blob comes from when not from the store in this process: its bytes, or None when
# someone else (a worker process) already put it in the node cache.
Source = Callable[[], Awaitable[bytes | memoryview | None]]


class FetchFailed(Exception):
    """The blob could not be brought in: the read gets EIO. Only what may succeed later (the
    store unavailable, a blob corrupted in transit) is retried, until the deadline; a denied
    read, a missing bucket or key fails at once with the store's own message."""


@dataclass
class FetchPolicy:
    """How a mount fetches. The fetcher is the one retry layer of a mount's store reads (its
    store client tries each request once): a blob is asked for again after 0.1 s, doubling
    to 5 s, each wait jittered so that many readers of a recovering store spread out, until
    the read's deadline (EIO; the next read starts afresh). Retried: the store unavailable
    (5xx, SlowDown, timeouts, a broken connection) and a blob failing verification (up to
    `corrupt_attempts`); not retried: denied, no such bucket, no such key."""

    net_parallel: int = 32
    cpu_parallel: int = field(default_factory=lambda: max(2, usable_cpus()))
    disk_parallel: int = 8  # reads of cache files the page cache lacks, at once
    # give up on one read after this long (EIO), retry on the next; the default is the
    # daemon configuration's (cafs/config.py)
    deadline: float = DaemonConfig.fetch_deadline
    backoff_start: float = 0.1
    backoff_max: float = 5.0
    corrupt_attempts: int = 3  # fetches of a blob that fails verification before EIO
    max_open: int = FD_CACHE_MAX  # cache fds kept open (the daemon sizes it: cafs.daemon.fdlimit)
    verify_cache: bool = True  # hash cache files once per process before trusting them
    memory_fallback: int = 256 << 20  # bytes served from memory when the cache disk is full
    # The largest blob of the mount's index (its chunk size): a store object larger than
    # that can hold none of its blobs and is refused unread (ObjectTooLarge), so what the
    # store holds cannot choose how much a daemon allocates. None: no bound (tests).
    max_blob: int | None = None


def _read_rest(fd: int, out: memoryview, pos: int, size: int) -> int:
    """Read what the page cache lacked, having the kernel read the rest of the blob ahead
    first, so the reads that follow are served inline instead of through a thread."""
    pagecache.willneed(fd, pos, size)
    return os.preadv(fd, [out], pos)


class _Uncached(Exception):
    """The blob was fetched but the cache could not keep it (disk full): here it is."""

    def __init__(self, data: bytes) -> None:
        super().__init__("blob not cached")
        self.data = data


class _FdCache:
    """Open cache files by digest, least recently used closed first, never while in use."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.busy: dict[int, int] = {}  # fd -> readers currently using it

    def pin(self, fd: int) -> None:
        self.busy[fd] = self.busy.get(fd, 0) + 1

    def unpin(self, fd: int) -> None:
        left = self.busy[fd] - 1
        if left:
            self.busy[fd] = left
        else:
            del self.busy[fd]

    def get(self, key: str) -> int | None:
        fd = self.fds.get(key)
        if fd is not None:
            self.fds.move_to_end(key)
        return fd

    def put(self, key: str, fd: int) -> int:
        old = self.fds.get(key)
        if old is not None:  # lost a race: keep the fd others may be using
            os.close(fd)
            return old
        self.fds[key] = fd
        if len(self.fds) > self.limit:
            for victim_key in [k for k, v in self.fds.items() if v not in self.busy]:
                os.close(self.fds.pop(victim_key))
                if len(self.fds) <= self.limit:
                    break
        return fd

    def shed(self) -> int:
        """Out of fds: close idle ones, least recently used first, down to half of what is
        open, and keep the cache that much smaller from then on. Returns how many closed."""
        target = max(FD_CACHE_MIN, len(self.fds) // 2)
        self.limit = min(self.limit, target)
        closed = 0
        for key in [k for k, v in self.fds.items() if v not in self.busy]:
            if len(self.fds) <= target:
                break
            os.close(self.fds.pop(key))
            closed += 1
        return closed

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Fetcher:
    def __init__(self, store: BlobStore, cache: NodeCache, stats: MountStats,
                 policy: FetchPolicy | None = None) -> None:
        self.store = store
        self.cache = cache
        self.stats = stats
        self.policy = policy or FetchPolicy()
        self.net = trio.CapacityLimiter(self.policy.net_parallel)
        self.cpu = trio.CapacityLimiter(self.policy.cpu_parallel)
        # Reads that wait on the disk get slots of their own: opening the next chunks'
        # cache files (to read them ahead) must not queue behind them.
        self.disk = trio.CapacityLimiter(self.policy.disk_parallel)
        # Background prefetch gets its own slots for decoding and cache writes, so a demand
        # read never queues behind a replay; more than the cores, as much of it waits on
        # the disk (fdatasync), not the CPU.
        self.bg_cpu = trio.CapacityLimiter(2 * self.policy.cpu_parallel)
        self._fds = _FdCache(self.policy.max_open)
        self._inflight: dict[str, trio.Event] = {}
        self._background: set[str] = set()  # in flight for a prefetch, not for a reader
        self._verified: set[str] = set()
        self._advised: OrderedDict[str, float] = OrderedDict()  # blob -> when read ahead
        self._memory: OrderedDict[str, bytes] = OrderedDict()  # blobs the cache could not take
        self._memory_bytes = 0
        self.on_fetch: Callable[[str, int], None] | None = None  # profile recorder hook
        # Asked first on a reader's miss: the blob's verified bytes from a pack segment
        # fetched with its neighbours (cafs/daemon/neighbours.py), or None to fetch it alone.
        self.on_miss: Callable[[str], Awaitable[bytes | memoryview | None]] | None = None
        self._probe = bytearray(1)
        self._envelope_limit = (None if self.policy.max_blob is None
                                else envelope_limit(self.policy.max_blob))

    async def read_into(self, key: str, size: int, offset: int, out: memoryview) -> int:
        """Copy bytes of a blob into `out`: inline when the page cache has them, else in a
        thread. Returns how many (fewer than asked only at the blob's end)."""
        length = len(out)
        held = self._memory.get(key)
        if held is not None:
            part = held[offset : offset + length]
            out[: len(part)] = part
            return len(part)
        try:
            fd = await self.fd(key, size)
        except _Uncached as exc:
            part = exc.data[offset : offset + length]
            out[: len(part)] = part
            return len(part)
        try:
            try:
                got = os.preadv(fd, [out], offset, os.RWF_NOWAIT)
            except OSError:  # not in the page cache, or a filesystem without RWF_NOWAIT
                got = 0
            if got == length or offset + got >= size:
                return got
            rest: int = await trio.to_thread.run_sync(
                _read_rest, fd, out[got:], offset + got, size, limiter=self.disk)
            return got + rest
        finally:
            self._fds.unpin(fd)

    async def span(self, key: str, size: int, offset: int, length: int
                   ) -> tuple[int, int, int] | None:
        """The bytes as (fd, offset, length) of the blob's cache file, for a reply libfuse
        makes from the file (spliced or copied in C, no Python buffer). None where they are
        not in the page cache, as a reply that reads the disk would stall every request
        behind it on the event loop's thread, or where the blob is held in memory. The fd is
        not pinned: reply before yielding."""
        if key in self._memory:
            return None
        try:
            fd = await self.fd(key, size)
        except _Uncached:
            return None
        self._fds.unpin(fd)
        length = min(length, size - offset)
        if length <= 0 or not (self._resident(fd, offset)
                               and self._resident(fd, offset + length - 1)):
            return None
        return fd, offset, length

    def advice_due(self, key: str) -> bool:
        """The blob's cache file is open here and the kernel was not asked to read it ahead
        in the last second (then it is asked again: its pages may have been evicted since).
        Marks it asked: the caller then awaits `willneed`."""
        if key not in self._fds.fds:
            return False
        now = time.monotonic()
        last = self._advised.get(key)
        if last is not None and now - last < ADVISE_AGAIN_AFTER:
            return False
        self._advised[key] = now
        self._advised.move_to_end(key)
        if len(self._advised) > self.policy.max_open:
            self._advised.popitem(last=False)
        return True

    async def willneed(self, key: str) -> None:
        """Have the kernel read an open cache file into the page cache. In a thread: the
        call waits while the disk's request queue is full, 20 to 55 ms measured during a
        cold sequential read, which on the event loop stalled every request behind it."""
        fd = self._fds.get(key)
        if fd is None:
            return
        self._fds.pin(fd)
        try:
            await trio.to_thread.run_sync(pagecache.willneed, fd, limiter=self.disk)
        finally:
            self._fds.unpin(fd)

    def _resident(self, fd: int, pos: int) -> bool:
        try:
            return os.preadv(fd, [self._probe], pos, os.RWF_NOWAIT) == 1
        except OSError:  # not in the page cache, or a filesystem without RWF_NOWAIT
            return False

    async def read(self, key: str, size: int, offset: int, length: int) -> bytes:
        """Bytes of a blob (callers that do not keep a buffer of their own)."""
        buf = bytearray(length)
        got = await self.read_into(key, size, offset, memoryview(buf))
        return bytes(buf[:got])

    async def prefetch(self, key: str, size: int, net: trio.CapacityLimiter | None = None,
                       pool: FetchPool | None = None) -> None:
        """Bring a blob into the cache without reading it (profiles, weights, readahead).

        With `net`, a background prefetch: its store calls take that limiter's slots and
        its CPU work the background ones, leaving the demand limiters free; without, a
        readahead that competes as a demand read would. With a `pool`, a worker process
        does the fetch, the check and the cache write (this process fetches the blob itself
        if the worker cannot).
        """
        if net is None:
            source = None
        else:
            async def source() -> bytes | memoryview | None:
                if pool is not None and pool.ready:
                    try:
                        async with net:
                            await pool.fill(key, size)
                        return None
                    except PoolFailed as exc:
                        log.info("blob %s: worker process failed (%s), fetching here", key, exc)
                return await self._fetch(key, net, self.bg_cpu, size)
        with contextlib.suppress(_Uncached):
            await self._fd(key, size, True, source)

    async def adopt(self, blobs: Sequence[tuple[str, int, memoryview]]) -> dict[str, str]:
        """Take blobs someone else downloaded (a run of a startup pack), each verified
        against its key and cached exactly as if fetched alone.

        One worker thread does the whole run: a pack replay is thousands of small blobs, for
        which four thread hops each would cost more than the work. Returns each key's fate:
        "cached", "hit" (the node cache had it), "present" (open or in flight here: left
        alone), "corrupt" or "failed" (the caller fetches those alone).
        """
        fate: dict[str, str] = {}
        mine = []
        for key, size, envelope in blobs:
            if self.known(key) or key in self._memory or key in fate:
                fate[key] = "present"
                continue
            self._inflight[key] = trio.Event()
            self._background.add(key)
            mine.append((key, size, envelope))
        try:
            done = await trio.to_thread.run_sync(self._adopt_all, mine, limiter=self.bg_cpu)
            for key, size, fd, what in done:
                fate[key] = what
                if fd is not None:
                    self._fds.put(key, fd)
                if what == "cached":
                    self.stats.cache_misses += 1
                    self.stats.fetched(size, True)
                elif what == "hit":
                    self.stats.cache_hits += 1
                elif what == "corrupt":
                    self.stats.corrupt_blobs += 1
        finally:
            for key, _, _ in mine:
                self._inflight.pop(key).set()
                self._background.discard(key)
        return fate

    def _adopt_all(self, blobs: list[tuple[str, int, memoryview]]
                   ) -> list[tuple[str, int, int | None, str]]:
        return [(key, size, *self._adopt_one(key, size, envelope))
                for key, size, envelope in blobs]

    def _adopt_one(self, key: str, size: int, envelope: memoryview) -> tuple[int | None, str]:
        try:
            return self._adopt_verified(key, size, envelope)
        except OSError as exc:
            if exc.errno not in EXHAUSTED:
                raise
            log.warning("blob %s from a startup pack not cached: %s", key, exc)
            return None, "failed"  # fetched alone, where running out of fds is retried

    def _adopt_verified(self, key: str, size: int, envelope: memoryview
                        ) -> tuple[int | None, str]:
        fd = self._open_cached(key, size)
        if fd is not None:
            return fd, "hit"
        try:
            data = decode(bytes(envelope), key)
        except BlobCorrupt as exc:
            log.error("blob %s in a startup pack failed verification: %s", key, exc)
            return None, "corrupt"
        try:
            self.cache.insert(key, data)
        except OSError as exc:
            log.warning("blob %s from a startup pack not cached: %s", key, exc)
            return None, "failed"
        self._verified.add(key)
        fd = self._open_inserted(key, size)
        return fd, "cached" if fd is not None else "failed"

    async def fd(self, key: str, size: int, prefetch: bool = False) -> int:
        """An open fd of the blob's cache file, pinned: the caller must `unpin` it."""
        fd = await self._fd(key, size, prefetch, None)
        self._fds.pin(fd)
        return fd

    def unpin(self, fd: int) -> None:
        self._fds.unpin(fd)

    def verified(self, key: str) -> bool:
        """Its cache file was checked against the key by this process (and is trusted by
        it from then on)."""
        return key in self._verified

    def known(self, key: str) -> bool:
        """Open in this process or being fetched: no need to ask again."""
        return key in self._fds.fds or key in self._inflight

    async def _fd(self, key: str, size: int, prefetch: bool,
                  source: Source | None) -> int:
        """An open fd of the blob's cache file, fetching it first if needed."""
        while True:
            fd = self._fds.get(key)
            if fd is not None:
                self.stats.cache_hits += 1
                return fd
            event = self._inflight.get(key)
            if event is None:
                break
            background = key in self._background
            await event.wait()
            if key in self._memory:
                raise _Uncached(self._memory[key])
            if self._fds.get(key) is None and not background:
                raise FetchFailed(f"blob {key} could not be fetched")
            # A failed prefetch is no verdict: a reader tries again itself.
        event = self._inflight[key] = trio.Event()
        if source is not None:
            self._background.add(key)
        try:
            fd = await self._open_or_fetch(key, size, prefetch, source)
            return self._fds.put(key, fd)
        finally:
            del self._inflight[key]
            self._background.discard(key)
            event.set()

    async def _open_or_fetch(self, key: str, size: int, prefetch: bool,
                             source: Source | None) -> int:
        cpu = self.cpu if source is None else self.bg_cpu
        fd = await self._opening(cpu, self._open_cached, key, size)
        if fd is not None:
            self.stats.cache_hits += 1
            return fd
        self.stats.cache_misses += 1
        data = await (source() if source is not None else self._demand(key))
        if data is None:  # a worker process fetched, verified, cached and trusted it
            return await self._open_filled(key, size, cpu)
        self.stats.fetched(len(data), prefetch)
        if self.on_fetch is not None:
            self.on_fetch(key, len(data))
        try:
            await self._opening(cpu, self.cache.insert, key, data)
        except OSError as exc:
            self.stats.cache_errors += 1
            log.error("cannot write blob %s to the cache (%s): serving it from memory", key, exc)
            kept = bytes(data)
            self._remember(key, kept)
            raise _Uncached(kept) from None
        self._verified.add(key)
        fd = await self._opening(cpu, self._open_inserted, key, size)
        if fd is None:
            raise FetchFailed(f"blob {key} vanished from the cache right after insertion")
        return fd

    async def _open_filled(self, key: str, size: int, cpu: trio.CapacityLimiter) -> int:
        fd = await self._opening(cpu, self._open_cached, key, size)
        if fd is None:
            raise FetchFailed(f"blob {key} from a worker process is not in the cache")
        self.stats.fetched(size, True)
        if self.on_fetch is not None:
            self.on_fetch(key, size)
        self.cache.added(size)
        return fd

    async def _opening(self, limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: Any
                       ) -> T:
        """Run a step that opens files in a worker thread. Out of fds (EMFILE, ENFILE), it
        closes idle cache fds and tries again until the fetch deadline: running short of
        fds is pressure on the fd cache, never a failed read."""
        delay = self.policy.backoff_start
        give_up = trio.current_time() + self.policy.deadline
        while True:
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
            except OSError as exc:
                if exc.errno not in EXHAUSTED or trio.current_time() > give_up:
                    raise
            if not self._shed():  # nothing idle to close: wait for readers to finish
                await trio.sleep(delay)
                delay = min(delay * 2, self.policy.backoff_max)

    def _shed(self) -> int:
        self.stats.fd_pressure += 1
        closed = self._fds.shed()
        log.warning("out of file descriptors: closed %d idle cache files, keeping at most "
                    "%d open", closed, self._fds.limit)
        return closed

    def _open_inserted(self, key: str, size: int) -> int | None:
        """Open a cache file just written from verified bytes, recording that other
        processes need not hash it again."""
        fd = self.cache.open(key, size)
        if fd is not None:
            self.cache.trust(key, fd)
        return fd

    def _open_cached(self, key: str, size: int) -> int | None:
        fd = self.cache.open(key, size)
        if fd is None or not self.policy.verify_cache or key in self._verified:
            return fd
        if self.cache.trusted(key, fd):  # hashed by another process since boot, unchanged
            self._verified.add(key)
            return fd
        data = os.pread(fd, size, 0) if size else b""
        if len(data) == size and digest(data) == key:
            self._verified.add(key)
            self.cache.trust(key, fd)
            return fd
        os.close(fd)
        self.stats.corrupt_blobs += 1
        log.error("cache file for blob %s is corrupt: discarded, refetching", key)
        self.cache.discard(key)
        return None

    async def _demand(self, key: str) -> bytes | memoryview:
        """A reader's miss: with its neighbours where a pack has them, else alone, within
        one deadline for both (a store that is down must not cost a reader two)."""
        started = trio.current_time()
        if self.on_miss is not None:
            data = await self.on_miss(key)
            if data is not None:
                return data
        left = self.policy.deadline - (trio.current_time() - started)
        fetched = await self._fetch(key, self.net, self.cpu, deadline=max(0.0, left))
        assert fetched is not None  # only a prefetch given a size streams into the cache
        return fetched

    def _streams(self, size: int | None) -> bool:
        return size is not None and size >= STREAM_MIN and hasattr(self.store, "get_pieces")

    def _stream_in(self, key: str, size: int) -> bytes | memoryview | None:
        """GET a blob straight into its cache file, each piece hashed as it is written and
        the file renamed into place only once it matches its key (None: cached, verified
        and trusted, like a worker process's). A compressed blob is decoded whole, as
        `_fetch` would: its bytes come back."""
        pieces = self.store.get_pieces(blob_key(key))  # type: ignore[attr-defined]
        codec, raw_size, payload = open_stream(pieces)
        if codec != CODEC_RAW:
            envelope = b"".join(payload)
            return decode(header(codec, raw_size) + envelope, key)
        if raw_size != size:
            raise BlobCorrupt(f"blob envelope declares {raw_size} bytes, the index {size}")
        self.cache.insert_pieces(key, size, payload, account=False)
        fd = self._open_inserted(key, size)
        if fd is not None:
            os.close(fd)
        self._verified.add(key)
        return None

    async def _fetch(self, key: str, net: trio.CapacityLimiter,
                     cpu: trio.CapacityLimiter, size: int | None = None,
                     deadline: float | None = None) -> bytes | memoryview | None:
        """The blob's decoded, verified bytes, within `deadline` (the policy's by default);
        with `size`, a background prefetch of a large blob from a store that streams: None
        once it is in the cache (`_stream_in`)."""
        delay = self.policy.backoff_start
        deadline = self.policy.deadline if deadline is None else deadline
        with trio.move_on_after(deadline) as scope:
            attempt = 0
            while True:
                attempt += 1
                self.stats.store_gets += 1
                try:
                    # Abandoned on the deadline: a store call stuck in its own retries must
                    # not hold the reader past it.
                    if size is not None and self._streams(size):
                        return await trio.to_thread.run_sync(
                            self._stream_in, key, size, limiter=net, abandon_on_cancel=True)
                    envelope = await trio.to_thread.run_sync(
                        self.store.get, blob_key(key), self._envelope_limit, limiter=net,
                        abandon_on_cancel=True)
                    self.stats.store_bytes += len(envelope)
                    return await trio.to_thread.run_sync(decode, envelope, key, limiter=cpu)
                except BlobNotFound as exc:
                    self.stats.store_errors += 1
                    raise FetchFailed(f"blob {key} is missing from {self.store.url}") from exc
                except BlobCorrupt as exc:  # in transit, a refetch may do; stored, it never will
                    self.stats.corrupt_blobs += 1
                    log.error("blob %s from the store failed verification (%s), attempt %d",
                              key, exc, attempt)
                    if attempt >= self.policy.corrupt_attempts:
                        raise FetchFailed(f"blob {key} from {self.store.url} failed "
                                          f"verification {attempt} times: {exc}") from exc
                except StoreUnavailable as exc:
                    self.stats.store_errors += 1
                    if exhausted(exc):
                        self._shed()
                    level = logging.WARNING if attempt < 3 else logging.ERROR
                    log.log(level, "fetching blob %s failed (attempt %d): %s", key, attempt, exc)
                except StoreError as exc:  # denied, no such bucket, no credentials: permanent
                    self.stats.store_errors += 1
                    log.error("fetching blob %s failed, not retried: %s", key, exc)
                    raise FetchFailed(str(exc)) from exc
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.policy.backoff_max)
        assert scope.cancelled_caught
        raise FetchFailed(f"blob {key} not fetched within {self.policy.deadline:.0f}s")

    def _remember(self, key: str, data: bytes) -> None:
        self._memory[key] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > self.policy.memory_fallback and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fds.close()
