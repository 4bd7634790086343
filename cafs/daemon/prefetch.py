"""Background prefetch: bring a planned list of blobs into the node cache before anyone reads.

Two kinds of plans feed it: a startup profile (what the workload read last time, in order)
and model weights (whole files, in the order a loader reads them). Plans run one after the
other, each with its own pool of workers and its own network limiter, sized so that a
worker's store call always finds a free slot: demand reads keep the fetcher's limiters to
themselves and never queue behind a prefetch. Memory in flight is bounded by a byte budget,
bandwidth optionally by a rate; everything stops when the mount's nursery is cancelled.

A profile with a startup pack is fetched as large range GETs of the pack, each blob in a
range handed to `Fetcher.adopt`, which verifies it by its key like any other fetch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from blobstore import BlobStore, StoreError
from cafs.config import DaemonConfig
from cafs.daemon.background import contained
from cafs.daemon.fetcher import Fetcher, FetchFailed
from cafs.daemon.fetchpool import MIN_PLAN_BYTES, FetchPool, auto_workers, open_pool
from cafs.profile import PackTable, Profile
from indexer import weights
from indexer.format import Index

log = logging.getLogger(__name__)
MiB = 1 << 20
ADOPT_THREADS = 4  # worker threads decoding and caching one pack segment


@dataclass
class PrefetchPolicy:
    # The daemon's tuning defaults live in its configuration schema (cafs/config.py).
    parallel: int = DaemonConfig.prefetch_parallel  # store calls in flight for a profile replay
    weights_parallel: int = 32  # ... for weight files (raised on GPU nodes, see cafs.weights.gpu)
    memory: int = 256 * MiB  # bytes of prefetched data in flight
    rate: int = DaemonConfig.prefetch_rate  # bytes per second, 0 = unlimited
    segment: int = 8 * MiB  # size of one range GET of a startup pack
    use_pack: bool = DaemonConfig.use_pack  # fetch a profile's pack when it has one (see docs)
    processes: int | None = DaemonConfig.prefetch_processes  # worker processes (None: by
    # the cores, large plans)


@dataclass
class Plan:
    """Blobs to bring in, in order; `pack` covers some of them."""

    name: str
    blobs: list[tuple[str, int]]
    parallel: int
    pack: PackTable | None = None


@dataclass
class PlanStatus:
    name: str
    blobs: int
    bytes: int
    parallel: int
    mode: str = "blobs"  # or "pack"
    state: str = "queued"  # running, done, failed, cancelled
    done_blobs: int = 0
    done_bytes: int = 0
    cached_blobs: int = 0  # already in the node cache: nothing to do
    failed_blobs: int = 0
    pack_gets: int = 0
    processes: int = 0  # worker processes that fetched for it (0: this process)
    started: float = 0.0
    seconds: float = 0.0


class ByteBudget:
    """Waits until `n` more bytes fit; a single request larger than the budget fits alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        while self.used + n > self.limit:
            await self._lot.park()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._lot.unpark_all()


class RateLimit:
    """Paces starts so that bytes started per second stay under `rate` (0: no limit)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._next = 0.0

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(self._next, now)
        self._next = start + n / self.rate
        await trio.sleep_until(start)


@dataclass
class _Segment:
    pack: str
    offset: int
    length: int
    blobs: list[tuple[str, int, int, int]] = field(default_factory=list)  # key, size, off, len


Job = _Segment | tuple[str, int]


class Prefetcher:
    def __init__(self, fetcher: Fetcher, store: BlobStore,
                 policy: PrefetchPolicy | None = None) -> None:
        self.fetcher = fetcher
        self.store = store
        self.policy = policy or PrefetchPolicy()
        self.budget = ByteBudget(self.policy.memory)
        self.rate = RateLimit(self.policy.rate)
        self.plans: list[PlanStatus] = []
        self.starting = False  # the mount's own plans are still being decided
        self._send, self._receive = trio.open_memory_channel[tuple[Plan, PlanStatus]](math.inf)
        self._pool: FetchPool | None = None
        self._pool_tried = False

    async def _pool_for(self, plan: Plan, nbytes: int) -> FetchPool | None:
        """Worker processes for a plan of single blobs: by default only for one large enough
        to be bound by one process's GIL, for any when the processes were asked for. Started
        with the first such plan, stopped when no plan is left."""
        asked = self.policy.processes
        if plan.pack is not None or (asked is None and nbytes < MIN_PLAN_BYTES):
            return None
        if not self._pool_tried:
            self._pool_tried = True
            workers = auto_workers() if asked is None else asked
            # In a thread: starting the forkserver and its workers blocks for a while, and
            # this trio loop also serves the mount's reads.
            self._pool = await trio.to_thread.run_sync(
                open_pool, self.store, self.fetcher.cache, min(workers, plan.parallel),
                asked is not None)
            if self._pool is not None:
                log.info("prefetch: %d worker processes for large plans", self._pool.workers)
        return self._pool if self._pool is not None and self._pool.usable else None

    def submit(self, plan: Plan) -> PlanStatus:
        """Queue a plan (from any trio task); it runs after the plans before it."""
        status = PlanStatus(plan.name, len(plan.blobs), sum(s for _, s in plan.blobs),
                            plan.parallel, "pack" if plan.pack else "blobs")
        self.plans.append(status)
        self.fetcher.plan(key for key, _ in plan.blobs)
        self._send.send_nowait((plan, status))
        return status

    def status(self) -> dict[str, Any]:
        busy = self.starting or any(p.state in ("queued", "running") for p in self.plans)
        return {"state": "running" if busy else ("done" if self.plans else "idle"),
                "plans": [vars(p).copy() for p in self.plans],
                "processes": self._pool.status() if self._pool is not None else None}

    async def run(self) -> None:
        """Run plans as they come, until cancelled (the mount going away)."""
        try:
            async for plan, status in self._receive:
                try:
                    await contained(self.fetcher.stats, f"prefetch plan {plan.name}",
                                    self._run_plan, plan, status)
                finally:
                    self.fetcher.plan((key for key, _ in plan.blobs), ending=True)
                if status.state == "running":  # it failed: the next plan still runs
                    status.state = "failed"
                if self._pool is not None and not self._receive.statistics().current_buffer_used:
                    self._pool.close()  # idle workers would only hold memory (~40 MB each)
                    self._pool_tried = False
        finally:
            for p in self.plans:
                if p.state in ("queued", "running"):
                    p.state = "cancelled"
            if self._pool is not None:
                self._pool.close()

    async def _run_plan(self, plan: Plan, status: PlanStatus) -> None:
        status.state, status.started = "running", time.time()
        missing = await trio.to_thread.run_sync(self._missing, plan.blobs)
        status.cached_blobs = len(plan.blobs) - len(missing)
        jobs = _jobs(missing, plan.pack, self.policy.segment)
        pool = await self._pool_for(plan, sum(size for _, size in missing)) if missing else None
        status.processes = pool.workers if pool is not None else 0
        net = trio.CapacityLimiter(plan.parallel)
        queue = iter(jobs)
        async with trio.open_nursery() as nursery:
            for _ in range(min(plan.parallel, len(jobs))):
                nursery.start_soon(self._worker, queue, net, status, pool)
        status.state, status.seconds = "done", round(time.time() - status.started, 3)
        log.info("prefetch %s: %d blobs (%d MiB) in %.2fs, %d cached, %d failed", plan.name,
                 status.done_blobs, status.done_bytes // MiB, status.seconds,
                 status.cached_blobs, status.failed_blobs)

    def _missing(self, blobs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Blobs neither open in this mount nor in the node cache, first occurrence only."""
        seen: set[str] = set()
        out = []
        for key, size in blobs:
            if key in seen or self.fetcher.known(key):
                continue
            seen.add(key)
            if not os.path.exists(self.fetcher.cache.path(key)):
                out.append((key, size))
        return out

    async def _worker(self, queue: Any, net: trio.CapacityLimiter, status: PlanStatus,
                      pool: FetchPool | None) -> None:
        for job in queue:
            if isinstance(job, _Segment):
                await self._segment(job, net, status)
            else:
                await self._blob(job[0], job[1], net, status, pool)

    async def _blob(self, key: str, size: int, net: trio.CapacityLimiter,
                    status: PlanStatus, pool: FetchPool | None = None) -> None:
        await self.rate.take(size)
        held = await self.budget.acquire(2 * size)  # the envelope and the decoded bytes
        try:
            await self.fetcher.prefetch(key, size, net, pool)
            status.done_blobs += 1
            status.done_bytes += size
        except (FetchFailed, StoreError, OSError) as exc:
            status.failed_blobs += 1
            log.warning("prefetch of blob %s failed: %s", key, exc)
        finally:
            self.budget.release(held)

    async def _segment(self, seg: _Segment, net: trio.CapacityLimiter,
                       status: PlanStatus) -> None:
        await self.rate.take(seg.length)
        held = await self.budget.acquire(2 * seg.length)
        try:
            # Readers of the segment's blobs wait for it, rather than fetch them alone.
            promised = self.fetcher.promise(key for key, _, _, _ in seg.blobs)
            fate: dict[str, str] = {}
            try:
                data = await self._get_range(seg, net, status)
                if data is not None:
                    async with trio.open_nursery() as nursery:  # cache writes wait on the disk
                        for part in _split(seg.blobs, ADOPT_THREADS):
                            nursery.start_soon(self._adopt, data, part, fate, promised)
            finally:
                self.fetcher.release(promised)
            for key, size, _, _ in seg.blobs:
                what = fate.get(key, "failed")
                if what == "cached":
                    status.done_blobs += 1
                    status.done_bytes += size
                elif what == "hit":
                    status.cached_blobs += 1
                elif what in ("corrupt", "failed") and not self.fetcher.known(key):
                    await self._blob(key, size, net, status)
        finally:
            self.budget.release(held)

    async def _adopt(self, data: memoryview, blobs: list[tuple[str, int, int, int]],
                     fate: dict[str, str], promised: Mapping[str, Any]) -> None:
        fate.update(await self.fetcher.adopt(
            [(key, size, data[off : off + length]) for key, size, off, length in blobs],
            promised))

    async def _get_range(self, seg: _Segment, net: trio.CapacityLimiter,
                         status: PlanStatus) -> memoryview | None:
        pack = seg.pack
        self.fetcher.stats.store_gets += 1
        try:
            data = await trio.to_thread.run_sync(
                self.store.get_range, pack, seg.offset, seg.length, limiter=net,
                abandon_on_cancel=True)
        except StoreError as exc:
            log.warning("startup pack %s unreadable (%s): fetching its blobs one by one",
                        pack, exc)
            return None
        status.pack_gets += 1
        self.fetcher.stats.store_bytes += len(data)
        if len(data) != seg.length:
            log.warning("startup pack %s is short: fetching its blobs one by one", pack)
            return None
        return memoryview(data)

def _split(items: list[Any], parts: int) -> list[list[Any]]:
    step = max(1, -(-len(items) // parts))
    return [items[i : i + step] for i in range(0, len(items), step)]


def _jobs(missing: list[tuple[str, int]], pack: PackTable | None,
          segment: int) -> list[Job]:
    """Range GETs over runs of missing blobs in the pack, then single blobs for the rest."""
    if pack is None:
        return list[Job](missing)
    want = dict(missing)
    jobs: list[Job] = []
    seg: _Segment | None = None
    for key, off, length in pack.blobs:
        if key not in want:
            seg = None  # a cached blob ends the run: no bytes fetched for it
            continue
        if seg is None or seg.length + length > segment:
            seg = _Segment(pack.key, off, 0)
            jobs.append(seg)
        seg.blobs.append((key, want.pop(key), off - seg.offset, length))
        seg.length = off + length - seg.offset
    jobs.extend(want.items())
    return jobs


# ------------------------------------------------------------------------------ plans


def profile_plan(profile: Profile, policy: PrefetchPolicy) -> Plan:
    return Plan(f"profile:{profile.name}", profile.blobs(), policy.parallel,
                profile.pack if policy.use_pack else None)


def file_blobs(index: Index, ino: int) -> list[tuple[str, int]]:
    node = index.inode(ino)
    chunk = node.chunk_size
    return [(key, min(chunk, node.size - n * chunk))
            for n, key in enumerate(index.chunks(ino))]


def weight_paths(index: Index, under: str = "") -> list[str]:
    """Weight files the index meta lists (under a directory, if given), in loader order:
    sorted by path, which puts shards `-00001-of-000NN` first to last."""
    try:
        files = weights.listed(index.meta)
    except weights.BadWeightsMeta as exc:
        log.warning("weights not prefetched: %s", exc)
        return []
    prefix = under.strip("/") + "/" if under.strip("/") else ""
    return [f["path"] for f in files if f["path"].startswith(prefix)]


def sidecars(index: Index, paths: list[str]) -> list[str]:
    """The JSON files beside weight files (config.json, *.safetensors.index.json, tokenizer
    files): a loader reads them first, to learn which shards to open."""
    out = []
    for directory in dict.fromkeys(p.rpartition("/")[0] for p in paths):
        ino = index.resolve(directory.encode())
        if ino is None or not index.inode(ino).is_dir:
            continue
        for _, name, child in index.entries(ino):
            if name.endswith(b".json") and index.inode(child).is_reg:
                out.append(f"{directory}/{name.decode('utf-8', 'surrogateescape')}"
                           if directory else name.decode("utf-8", "surrogateescape"))
    return out


def weights_plan(index: Index, parallel: int, budget: int, under: str = "",
                 name: str = "weights") -> Plan | None:
    """Every weight file's chunks, in order, after the JSON files beside them; cut at
    `budget` bytes (the cache would evict the start of the plan to make room for its end)."""
    blobs: list[tuple[str, int]] = []
    total = 0
    paths = weight_paths(index, under)
    for path in sidecars(index, paths) + paths:
        ino = index.resolve(path.encode("utf-8", "surrogateescape"))
        if ino is None:
            continue
        for key, size in file_blobs(index, ino):
            if total + size > budget:
                log.warning("weights: %s past the cache budget of %d MiB are not prefetched",
                            path, budget // MiB)
                return Plan(name, blobs, parallel) if blobs else None
            blobs.append((key, size))
            total += size
    return Plan(name, blobs, parallel) if blobs else None


def path_plan(index: Index, relpath: str, parallel: int, budget: int) -> Plan | None:
    """A file, or a directory's weight files (or all its files if none is known as such)."""
    ino = index.resolve(relpath.encode("utf-8", "surrogateescape"))
    if ino is None:
        raise FileNotFoundError(relpath)
    if not index.inode(ino).is_dir:
        return Plan(f"path:{relpath}", file_blobs(index, ino), parallel)
    plan = weights_plan(index, parallel, budget, relpath, f"path:{relpath}")
    if plan is not None:
        return plan
    blobs: list[tuple[str, int]] = []
    for _, name, child in index.entries(ino):
        if index.inode(child).is_reg and not name.startswith(b"."):
            blobs += file_blobs(index, child)
    return Plan(f"path:{relpath}", blobs, parallel) if blobs else None
