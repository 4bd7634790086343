"""Brings blobs from the store into the node cache: verified, single-flight, retried.

Every blocking step runs in a worker thread under a limiter (network for store round
trips, CPU for decompression, hashing and cache writes), so no trio task ever blocks the
filesystem. Concurrent requests for one blob share one fetch. A store that is unavailable is
retried with backoff until a deadline, a refusal (denied, no such bucket) is not; a blob whose
bytes do not match its key is never served.

A reader holds a blob through a handle, and the handle's context is the pin:

    async with fetcher.open(key, size) as blob:
        got = await blob.read_into(offset, out)      # or: span = blob.span(offset, length)

Inside the context the blob's cache file stays open (the fd cache closes only unpinned
files); outside it the handle must not be used. A blob the cache disk could not take is
held in memory and comes as a handle of another kind, with the same two methods.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
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
STREAM_MIN = 1 << 20  # prefetched blobs this large go from the store to the cache in pieces
# A reader's blob is served from its verified bytes at once and written to the cache behind
# the reply (`Fetcher.settle`); this much may wait to be written, more goes the slow way.
SETTLE_MAX = 16 << 20  # the largest chunk an index cuts (weights)
SETTLE_PENDING = 64 << 20
DECODE_INLINE = 64 << 10  # held envelopes up to this raw size are decoded on the loop
# Smaller blobs get no trust record: another process hashes one again (~10 µs for 16 KiB)
# for less than the record costs to write (a new inode: 10-20 µs on a fast disk, 170 µs
# on the benchmark VM's ext4).
TRUST_MIN = 64 << 10
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


_PROBE = bytearray(1)  # a one-byte read's target: used on the event loop's thread only


class Blob:
    """A blob being read: `async with` it (the pin), then `read_into` or `span`.

    `span` is the subtle one. It hands back the cache file's fd for libfuse to reply from,
    and the read handler leaves the context (unpinning the file) before pyfuse3 makes that
    reply. That is safe because cache fds are closed only by the fd cache, on the event
    loop's thread, when a task adds a blob to it or runs out of fds, and pyfuse3 replies as
    soon as the handler returns, in the same step of the same task, before trio runs any
    other: no task can add a blob in between. So the handler must not await (nor open
    another blob) between leaving the context and returning the span; the reply itself,
    in C with the GIL released, cannot race a close, as no worker thread closes cache fds.
    """

    __slots__ = ()

    async def __aenter__(self) -> Blob:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def read_into(self, offset: int, out: memoryview) -> int:
        """Copy the blob's bytes from `offset` into `out`; returns how many (fewer than
        asked only at the blob's end)."""
        raise NotImplementedError

    def span(self, offset: int, length: int) -> tuple[int, int, int] | None:
        """The bytes as (fd, offset, length) of a file for libfuse to reply from (spliced
        or copied in C, no Python buffer), or None where there is no such file or the bytes
        are not all in its page cache: a reply that read the disk would stall every request
        behind it on the event loop's thread."""
        return None


class FileBlob(Blob):
    """A blob in its verified, open cache file: the fd cache's entry, shared by all its
    readers, each of whom pins it for as long as its context lasts."""

    __slots__ = ("_disk", "advised", "fd", "pins", "size")

    def __init__(self, fd: int, size: int, disk: trio.CapacityLimiter) -> None:
        self.fd = fd
        self.size = size
        self.pins = 0  # readers inside the context: the fd cache does not close it meanwhile
        self.advised = float("-inf")  # when the kernel was last asked to read it ahead
        self._disk = disk

    async def __aenter__(self) -> FileBlob:
        self.pins += 1
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.pins -= 1

    async def read_into(self, offset: int, out: memoryview) -> int:
        """Inline what the page cache has (RWF_NOWAIT), the rest in a thread under the
        disk limiter."""
        length = len(out)
        try:
            got = os.preadv(self.fd, [out], offset, os.RWF_NOWAIT)
        except OSError:  # not in the page cache, or a filesystem without RWF_NOWAIT
            got = 0
        if got == length or offset + got >= self.size:
            return got
        rest: int = await trio.to_thread.run_sync(
            _read_rest, self.fd, out[got:], offset + got, self.size, limiter=self._disk)
        return got + rest

    def span(self, offset: int, length: int) -> tuple[int, int, int] | None:
        """Probed by reading its first and last byte with RWF_NOWAIT."""
        length = min(length, self.size - offset)
        if length <= 0 or not (self._resident(offset) and self._resident(offset + length - 1)):
            return None
        return self.fd, offset, length

    async def willneed(self) -> None:
        """Have the kernel read the whole file into the page cache; call it pinned. In a
        thread: the call waits while the disk's request queue is full, 20 to 55 ms measured
        during a cold sequential read, which on the event loop stalled every request
        behind it."""
        await trio.to_thread.run_sync(pagecache.willneed, self.fd, limiter=self._disk)

    def _resident(self, pos: int) -> bool:
        try:
            return os.preadv(self.fd, [_PROBE], pos, os.RWF_NOWAIT) == 1
        except OSError:  # not in the page cache, or a filesystem without RWF_NOWAIT
            return False


class HeldBlob(Blob):
    """A blob fetched and verified that the cache could not keep (its disk full): its bytes
    in memory, served from there (never spliced: there is no file)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_into(self, offset: int, out: memoryview) -> int:
        part = memoryview(self.data)[offset : offset + len(out)]  # one copy, not two
        out[: len(part)] = part
        return len(part)


class _Opening:
    """`Fetcher.open` of a blob not open yet: it is fetched or opened on entry."""

    __slots__ = ("_blob", "_fetcher", "_key", "_size")

    def __init__(self, fetcher: Fetcher, key: str, size: int) -> None:
        self._fetcher = fetcher
        self._key = key
        self._size = size
        self._blob: Blob | None = None

    async def __aenter__(self) -> Blob:
        blob = self._blob = await self._fetcher._open(self._key, self._size, False, None)
        return await blob.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._blob is not None:
            await self._blob.__aexit__(kind, exc, tb)


@dataclass
class _Flight:
    """A fetch in progress: readers of the blob wait for it instead of fetching again."""

    done: trio.Event = field(default_factory=trio.Event)
    background: bool = False  # a prefetch's: its failure is no verdict for a reader


class _FdCache:
    """Open cache files by digest, least recently used closed first, never while pinned."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.blobs: OrderedDict[str, FileBlob] = OrderedDict()

    def get(self, key: str) -> FileBlob | None:
        blob = self.blobs.get(key)
        if blob is not None:
            self.blobs.move_to_end(key)
        return blob

    def put(self, key: str, blob: FileBlob) -> FileBlob:
        old = self.blobs.get(key)
        if old is not None:  # lost a race: keep the file others may be using
            os.close(blob.fd)
            return old
        self.blobs[key] = blob
        if len(self.blobs) > self.limit:  # never the new one: its reader is about to pin it
            for victim_key in [k for k, b in self.blobs.items() if not b.pins and k != key]:
                os.close(self.blobs.pop(victim_key).fd)
                if len(self.blobs) <= self.limit:
                    break
        return blob

    def shed(self) -> int:
        """Out of fds: close idle ones, least recently used first, down to half of what is
        open, and keep the cache that much smaller from then on. Returns how many closed."""
        target = max(FD_CACHE_MIN, len(self.blobs) // 2)
        self.limit = min(self.limit, target)
        closed = 0
        for key in [k for k, b in self.blobs.items() if not b.pins]:
            if len(self.blobs) <= target:
                break
            os.close(self.blobs.pop(key).fd)
            closed += 1
        return closed

    def close(self) -> None:
        for blob in self.blobs.values():
            os.close(blob.fd)
        self.blobs.clear()


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
        self._inflight: dict[str, _Flight] = {}
        self._planned: Counter[str] = Counter()  # blobs of prefetch plans not yet ended
        self._verified: set[str] = set()
        self._memory: OrderedDict[str, HeldBlob] = OrderedDict()  # the cache could not take
        self._memory_bytes = 0
        # Served from memory until `settle` has written them to the cache, in arrival order:
        # each blob and its size in the index.
        self._settling: dict[str, tuple[HeldBlob, int]] = {}
        self._settle_bytes = 0
        self._settle_wake = trio.Event()
        self.settles = False  # a task runs `settle`: small blobs may be cached behind
        self.on_fetch: Callable[[str, int], None] | None = None  # profile recorder hook
        # Asked first on a miss: the blob's verified bytes from a pack segment fetched with
        # its neighbours (cafs/daemon/neighbours.py), or None to fetch it alone; the flag
        # says whether it may start a segment's GET (a reader's miss) or not (a prefetch).
        self.on_miss: Callable[[str, bool], Awaitable[bytes | memoryview | None]] | None = None
        # Asked before that, without waiting: the envelope a pack segment already brought.
        self.held: Callable[[str], memoryview | None] | None = None
        self._envelope_limit = (None if self.policy.max_blob is None
                                else envelope_limit(self.policy.max_blob))

    def open(self, key: str, size: int) -> AbstractAsyncContextManager[Blob]:
        """The blob as a handle to `async with` (the pin), fetched on entry if it is not
        here. An open cache file's handle is its fd cache entry itself, so a read of one
        costs no allocation beyond its coroutines."""
        blob = self._fds.get(key)
        if blob is not None:
            self.stats.cache_hits += 1
            return blob
        held = self._memory.get(key) or self._settling_blob(key)
        if held is not None:
            return held
        return _Opening(self, key, size)

    def cached(self, key: str) -> FileBlob | None:
        """The blob's handle where its cache file is open here (to `async with` before
        use), else None: nothing is fetched or opened."""
        return self._fds.get(key)

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
        await self._open(key, size, True, source)

    def promise(self, keys: Iterable[str]) -> dict[str, _Flight]:
        """Mark blobs that a range GET of a pack is bringing as in flight, so that a reader's
        miss on one waits for the GET (and then finds the blob `adopt`ed) instead of fetching
        it alone, with its neighbours: the round trips and bytes a profile replay is there
        to save. The caller passes the promises to `adopt`, then `release`s them, whatever
        happened: a reader still without its blob then fetches it itself."""
        promised: dict[str, _Flight] = {}
        for key in keys:
            if not (self.known(key) or key in self._memory or key in promised):
                promised[key] = self._inflight[key] = _Flight(background=True)
        return promised

    def release(self, promised: Mapping[str, _Flight]) -> None:
        """End the promises: their readers wake, and find the blob or fetch it."""
        for key, flight in promised.items():
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            flight.done.set()

    async def adopt(self, blobs: Sequence[tuple[str, int, memoryview]],
                    promised: Mapping[str, _Flight] | None = None) -> dict[str, str]:
        """Take blobs someone else downloaded (a run of a startup pack), each verified
        against its key and cached exactly as if fetched alone; those `promise`d by the
        caller are adopted under their promise, which the caller releases.

        One worker thread does the whole run: a pack replay is thousands of small blobs, for
        which four thread hops each would cost more than the work. Returns each key's fate:
        "cached", "hit" (the node cache had it), "present" (open or in flight here: left
        alone), "corrupt" or "failed" (the caller fetches those alone).
        """
        fate: dict[str, str] = {}
        promised = promised or {}
        mine, flights = [], []
        for key, size, envelope in blobs:
            ours = key in promised and self._inflight.get(key) is promised[key]
            elsewhere = not ours and (self.known(key) or key in self._memory)
            if elsewhere or key in fate:
                fate[key] = "present"
                continue
            fate[key] = "failed"  # until adopted; also marks a key seen twice
            if not ours:
                self._inflight[key] = _Flight(background=True)
                flights.append(key)
            mine.append((key, size, envelope))
        try:
            done = await trio.to_thread.run_sync(self._adopt_all, mine, limiter=self.bg_cpu)
            for key, size, fd, what in done:
                fate[key] = what
                if fd is not None:
                    self._fds.put(key, FileBlob(fd, size, self.disk))
                self._account(what, size, True)
        finally:
            for key in flights:
                self._inflight.pop(key).done.set()
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
            log.warning("blob %s from a pack not cached: %s", key, exc)
            return None, "failed"  # fetched alone, where running out of fds is retried

    def _adopt_verified(self, key: str, size: int, envelope: memoryview
                        ) -> tuple[int | None, str]:
        fd = self._open_cached(key, size)
        if fd is not None:
            return fd, "hit"
        try:
            data = decode(bytes(envelope), key, size=size)
        except BlobCorrupt as exc:
            log.error("blob %s in a pack failed verification: %s", key, exc)
            return None, "corrupt"
        try:
            self.cache.insert(key, data)
        except OSError as exc:
            log.warning("blob %s from a pack not cached: %s", key, exc)
            return None, "failed"
        self._verified.add(key)
        fd = self._open_inserted(key, size)
        return fd, "cached" if fd is not None else "failed"

    def verified(self, key: str) -> bool:
        """Its cache file was checked against the key by this process (and is trusted by
        it from then on)."""
        return key in self._verified

    def plan(self, keys: Iterable[str], ending: bool = False) -> None:
        """A prefetch plan of these blobs was queued, or has ended."""
        if ending:
            self._planned.subtract(keys)
            self._planned = +self._planned  # counts that reached 0 dropped
        else:
            self._planned.update(keys)

    def planned(self, key: str) -> bool:
        """A prefetch plan queued or running will bring it (a replayed profile): a guess
        ahead of a reader need not (cafs/daemon/neighbours.py)."""
        return key in self._planned

    def here(self, key: str) -> bool:
        """Open in this process or being written to the cache: its bytes need no envelope
        (a blob being fetched does: its reader may be waiting for one a pack brings)."""
        return key in self._fds.blobs or key in self._settling

    def known(self, key: str) -> bool:
        """Open in this process, being fetched, or being written to the cache: no need to
        ask again."""
        return key in self._fds.blobs or key in self._inflight or key in self._settling

    async def _open(self, key: str, size: int, prefetch: bool, source: Source | None
                    ) -> Blob:
        """The blob's handle, its cache file opened (and fetched) first if needed."""
        while True:
            blob = self._fds.get(key)
            if blob is not None:
                self.stats.cache_hits += 1
                return blob
            settling = self._settling_blob(key)
            if settling is not None:
                return settling
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            held = self._memory.get(key) or self._settling_blob(key)
            if held is not None:
                return held
            if key not in self._fds.blobs and not flight.background:
                raise FetchFailed(f"blob {key} could not be fetched")
            # A failed prefetch is no verdict: a reader tries again itself.
        flight = self._inflight[key] = _Flight(background=source is not None)
        try:
            got = await self._open_or_fetch(key, size, prefetch, source)
            if isinstance(got, HeldBlob):
                return got
            return self._fds.put(key, FileBlob(got, size, self.disk))
        finally:
            del self._inflight[key]
            flight.done.set()

    async def _open_or_fetch(self, key: str, size: int, prefetch: bool,
                             source: Source | None) -> int | HeldBlob:
        """The cache file's fd, or the blob in memory where the cache could not take it."""
        cpu = self.cpu if source is None else self.bg_cpu
        envelope = self.held(key) if self.held is not None and source is None else None
        if envelope is not None and self._may_settle(size):
            verified = await self._decode_held(key, size, envelope)
            if verified is not None:
                self._account("cached", size, prefetch)  # fetched, in a pack segment
                return self._serve_settling(key, size, verified)
        elif envelope is not None:
            fd, fate = await self._opening(cpu, self._adopt_verified, key, size, envelope)
            self._account(fate, size, prefetch)
            if fd is not None:
                return fd
        fd = await self._opening(cpu, self._open_cached, key, size)
        if fd is not None:
            self.stats.cache_hits += 1
            return fd
        self.stats.cache_misses += 1
        data = await (source() if source is not None else self._demand(key, prefetch))
        if data is None:  # a worker process fetched, verified, cached and trusted it
            return await self._open_filled(key, size, cpu)
        self.stats.fetched(len(data), prefetch)
        if self.on_fetch is not None:
            self.on_fetch(key, len(data))
        if source is None and self._may_settle(len(data)):
            return self._serve_settling(key, size, bytes(data))
        try:
            await self._opening(cpu, self.cache.insert, key, data)
        except OSError as exc:
            self.stats.cache_errors += 1
            log.error("cannot write blob %s to the cache (%s): serving it from memory", key, exc)
            return self._remember(key, bytes(data))
        self._verified.add(key)
        fd = await self._opening(cpu, self._open_inserted, key, size)
        if fd is None:
            raise FetchFailed(f"blob {key} vanished from the cache right after insertion")
        return fd

    # -- small blobs: served at once, cached behind --------------------------------------

    def _may_settle(self, size: int) -> bool:
        return (self.settles and size <= SETTLE_MAX
                and self._settle_bytes + size <= SETTLE_PENDING)

    async def _decode_held(self, key: str, size: int, envelope: memoryview) -> bytes | None:
        """A held envelope's verified bytes (None: corrupt, counted; fetched alone then).
        A small one is decoded on the loop: less work than the thread hop it would take.
        One that says it holds another size than the index's is refused unopened, so what
        a pack holds cannot make the loop decompress more than `DECODE_INLINE` bytes."""
        check = functools.partial(decode, bytes(envelope), key, size=size)
        try:
            if size <= DECODE_INLINE:
                return bytes(check())
            return bytes(await trio.to_thread.run_sync(check, limiter=self.cpu))
        except BlobCorrupt as exc:
            self.stats.corrupt_blobs += 1
            log.error("blob %s in a pack failed verification: %s", key, exc)
            return None

    def _serve_settling(self, key: str, size: int, data: bytes) -> HeldBlob:
        """Hand a reader the verified bytes now and queue their cache write. Why: writing
        a cache file (create, write, rename, open: 0.3-0.7 ms of system time on the
        benchmark VM) and the thread hop around it were most of a first read of a packed
        file, once per file, one after another as an interpreter imports. A chunk of a
        library or program (MiBs) waited two more hops behind the reads ahead of it for
        its write and open, with the loader faulting on it."""
        blob = HeldBlob(data)
        self._settling[key] = blob, size
        self._settle_bytes += size
        self._settle_wake.set()
        return blob

    def _settling_blob(self, key: str) -> HeldBlob | None:
        entry = self._settling.get(key)
        return entry[0] if entry is not None else None

    async def settle(self) -> None:
        """Write the blobs readers were served from memory into the cache, all that queued
        up in one worker-thread hop, and swap in their cache files; runs for the mount's
        life (the daemon's nursery). A blob the cache refuses stays in memory (the disk-full
        fallback), so its readers never notice. When the mount stops, what is still queued
        is written before the task ends: the next mount of the image finds it cached."""
        self.settles = True
        try:
            while True:
                await self._settle_wake.wait()
                self._settle_wake = trio.Event()
                # Each stays in `_settling` until written: a stop may come first.
                batch = list(self._settling.items())
                try:
                    fds = await trio.to_thread.run_sync(self._settle_all, batch,
                                                        limiter=self.bg_cpu)
                except Exception:
                    log.exception("cache writes of %d blobs failed: kept in memory", len(batch))
                    fds = [None] * len(batch)
                self._settled(batch, fds)
        finally:
            self.settles = False
            batch = list(self._settling.items())
            with contextlib.suppress(Exception):  # stopping: a failure only costs a refetch
                self._settled(batch, self._settle_all(batch))

    def _settled(self, batch: list[tuple[str, tuple[HeldBlob, int]]], fds: list[int | None]
                 ) -> None:
        for (key, (blob, size)), fd in zip(batch, fds, strict=True):
            self._settle_bytes -= size
            del self._settling[key]
            if fd is not None:
                self._fds.put(key, FileBlob(fd, size, self.disk))
            else:
                self.stats.cache_errors += 1
                self._remember(key, blob.data)

    def _settle_all(self, batch: list[tuple[str, tuple[HeldBlob, int]]]) -> list[int | None]:
        return [self._settle_one(key, size, blob.data) for key, (blob, size) in batch]

    def _settle_one(self, key: str, size: int, data: bytes) -> int | None:
        """The blob's open cache file, written unless another process already has."""
        try:
            fd = self._open_cached(key, size)
            if fd is None:
                self.cache.insert(key, data)
                self._verified.add(key)
                fd = self._open_inserted(key, size)
        except OSError as exc:
            log.warning("blob %s not cached (served from memory): %s", key, exc)
            return None
        return fd

    def _account(self, fate: str, size: int, prefetch: bool) -> None:
        """Count a blob taken from a pack by its fate (`_adopt_verified`)."""
        if fate == "cached":
            self.stats.cache_misses += 1
            self.stats.fetched(size, prefetch)
        elif fate == "hit":
            self.stats.cache_hits += 1
        elif fate == "corrupt":
            self.stats.corrupt_blobs += 1

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
        processes need not hash it again (where hashing costs more than the record)."""
        fd = self.cache.open(key, size)
        if fd is not None and size >= TRUST_MIN:
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
            if size >= TRUST_MIN:
                self.cache.trust(key, fd)
            return fd
        os.close(fd)
        self.stats.corrupt_blobs += 1
        log.error("cache file for blob %s is corrupt: discarded, refetching", key)
        self.cache.discard(key)
        return None

    async def _demand(self, key: str, ahead: bool = False) -> bytes | memoryview:
        """A reader's miss: with its neighbours where a pack has them, else alone, within
        one deadline for both (a store that is down must not cost a reader two). A blob
        brought `ahead` of its reader (readahead, a program's libraries) is taken from a
        pack segment already fetched or on its way, else comes alone: its asker knows
        exactly what it wants, and a segment around it and the rest of its directory are a
        guess (the libraries of `python3` brought in `usr/lib/x86_64-linux-gnu`'s other
        1.1 MB, #20)."""
        started = trio.current_time()
        if self.on_miss is not None:
            data = await self.on_miss(key, not ahead)
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
        if raw_size != size:  # refused before its body is read, whatever its codec
            raise BlobCorrupt(f"blob envelope declares {raw_size} bytes, the index {size}")
        if codec != CODEC_RAW:
            return decode(header(codec, raw_size) + b"".join(payload), key)
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
                    return await trio.to_thread.run_sync(
                        functools.partial(decode, envelope, key, most=self.policy.max_blob),
                        limiter=cpu)
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

    def _remember(self, key: str, data: bytes) -> HeldBlob:
        held = self._memory[key] = HeldBlob(data)
        self._memory_bytes += len(data)
        while self._memory_bytes > self.policy.memory_fallback and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old.data)
        return held

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fds.close()
