"""A reader's miss on a small file brings its directory's neighbours in the same ranged GET.

Without a profile, an interpreter importing a package reads its files one after another,
each miss paying the store's round trip. The image's neighbour pack (indexer/neighbours.py)
holds its small files' envelopes in tree order, so on a miss the mount fetches the segment
of the pack around the file (its directory's run, at most `SEGMENT_MAX` bytes) with one
ranged GET, and the rest of that run, then the runs of its sibling directories where
their parent is a package of the same kind (`NeighbourTable.ahead`; at most `AHEAD_MAX`
bytes in all) in parallel segments at the same time, on the directory's first miss only:
the importer's next files, and its next package's, are then one round trip away at most,
not one each. Where the image's import table speaks for a directory
(cafs/daemon/imports.py), there is no guessing: the modules an import will load are
brought as they are named (`bring`), and a miss there fetches its own file alone
(`quiet`). What is fetched ahead skips blobs the node cache already holds (the pack is the
image's, the cache the node's). The missed blob's envelope is decoded and verified against
its key and served; the others are held, as fetched, in memory (at most `HELD_MAX` bytes,
oldest dropped first), and a later miss on one of them (or a miss while their GET is in
flight) is answered from there: decoded, verified against its own key and cached exactly as
if fetched alone, only then. Decoding on demand, not the whole segment at once, keeps the
CPU for the workload: on two cores, verifying and caching every neighbour ahead of use cost
more than the round trips it saved. Anything that goes wrong (the GET fails, bytes do not
match a key) leaves the blob to the ordinary per-blob fetch: a pack is a shortcut, never a
source of truth; a pack the store refuses for good (missing, access denied: a policy may
allow `blobs/` only) is not asked for again by this mount.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from blobstore import BlobCorrupt, BlobStore, StoreError, StoreUnavailable
from blobstore.envelope import decode
from cafs.daemon.fetcher import Fetcher
from cafs.daemon.stats import MountStats
from indexer.format import Index
from indexer.neighbours import Member, NeighbourTable, NeighbourTableError, load

log = logging.getLogger(__name__)
SEGMENT_MAX = 512 << 10  # bytes one miss fetches at most (docs/ARCHITECTURE.md: measured)
AHEAD_MAX = 4 << 20  # bytes of a directory's run fetched ahead on its first miss
HELD_MAX = 64 << 20  # envelopes fetched with a neighbour and not asked for yet
# Members this close in the pack share a ranged GET when brought together (`bring`): #20's
# `import numpy` brings 127 packed files in 103 runs, 28 GETs at 16 KiB (173 KB between).
GAP_MAX = 16 << 10


class Neighbours:
    """The mount's neighbour pack: `on_miss` is the fetcher's first answer to a miss."""

    def __init__(self, index: Index, store: BlobStore, fetcher: Fetcher, stats: MountStats,
                 segment_max: int = SEGMENT_MAX, held_max: int = HELD_MAX,
                 ahead_max: int = AHEAD_MAX) -> None:
        self.index = index
        self.store = store
        self.fetcher = fetcher
        self.stats = stats
        self.segment_max = segment_max
        self.held_max = held_max
        self.ahead_max = ahead_max
        self._ahead_done: set[int] = set()  # directories whose run was fetched ahead
        self._nursery: trio.Nursery | None = None
        self.table: NeighbourTable | None = None
        self._inos: dict[str, int] = {}
        self._ready = trio.Event()
        self._held: OrderedDict[str, memoryview] = OrderedDict()
        self._held_bytes = 0
        self._coming: dict[str, trio.Event] = {}  # in a segment GET in flight
        self._given: set[str] = set()  # envelopes handed to the fetcher by `held`
        self.disabled = False  # no usable table, or the store refused the pack for good
        # Directories where a miss fetches only its own file: the image's import table
        # names what is read there (cafs/daemon/imports.py), guessing would only add bytes.
        self.quiet: set[int] = set()
        self.gate: trio.Event | None = None  # misses wait for it too (the import table's)

    async def run(self) -> None:
        """Decode the index's table and map the pack's blobs to their inodes, once per mount,
        in a thread after the mount is up (a few µs per file: ~0.3 s for 100k small files,
        which the mount's ready time must not pay). A table this cafs cannot use is logged
        and the mount goes on blob by blob. Then serves as the home of the fetches ahead
        until the mount ends."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._start()
            await trio.sleep_forever()

    async def _start(self) -> None:
        try:
            table, self._inos = await trio.to_thread.run_sync(self._load)
            log.info("neighbour pack %s: %d small files, %d bytes", table.key,
                     len(table.members), table.size)
            self.table = table
        except Exception as exc:  # NeighbourTableError, or anything a bad record causes
            self.disabled = True
            log.error("neighbour pack not used, fetching blob by blob: %s", exc)
        finally:
            self._ready.set()

    def _load(self) -> tuple[NeighbourTable, dict[str, int]]:
        table = load(self.index)
        if table is None:
            raise NeighbourTableError("the index names no neighbour pack")
        return table, table.inodes

    def _key(self, ino: int) -> str:
        key = self.index.single_chunk(ino)  # asked for every member a segment looks at
        assert key is not None  # the table checked that each member is a one-chunk file
        return key

    async def on_miss(self, key: str, start: bool = True) -> bytes | memoryview | None:
        """The missed blob's verified bytes, fetched with its neighbours (only if `start`:
        a reader's miss, not a blob brought ahead) or earlier with another's; None when the
        pack does not have it or could not deliver it (the caller then fetches it alone)."""
        await self._ready.wait()
        if self.gate is not None:
            await self.gate.wait()
        if self.table is None or key in self._given:
            return None
        coming = self._coming.get(key)
        if coming is not None:
            await coming.wait()
        envelope = self._take(key)
        if envelope is None and coming is None and start and not self.disabled:
            ino = self._inos.get(key)
            if ino is None:
                return None
            envelope = await self._fetch_segment(self.table, ino, key)
        if envelope is None:
            return None
        try:
            return await trio.to_thread.run_sync(
                functools.partial(decode, bytes(envelope), key,
                                  most=self.fetcher.policy.max_blob),
                limiter=self.fetcher.cpu)
        except BlobCorrupt as exc:
            self.stats.corrupt_blobs += 1
            log.error("blob %s in the neighbour pack failed verification (%s): fetching it "
                      "alone", key, exc)
            return None

    def held(self, key: str) -> memoryview | None:
        """The blob's envelope, as fetched, if a segment brought it and nobody asked for it
        yet; handed over once. The fetcher checks, caches and opens it in one worker-thread
        hop, where `on_miss` and the cache write took three (on two cores, #20's first reads
        of held files took 2 ms each). A later miss of the same blob (its envelope was bad,
        or the cache refused it) is fetched alone, not from the pack again."""
        envelope = self._take(key)
        if envelope is not None:
            self._given.add(key)
        return envelope

    def _wanted(self, ino: int) -> bool:
        key = self._key(ino)
        return not (key in self._held or key in self._coming or self.fetcher.known(key)
                    or self.fetcher.planned(key))

    async def _fetch_segment(self, table: NeighbourTable, ino: int, key: str
                             ) -> memoryview | None:
        """Fetch the segment around `ino` (in a `quiet` directory, `ino` alone); hold the
        others' envelopes, return its own."""
        member = table.members[table.position[ino]]
        quiet = member.group in self.quiet
        segment = [member] if quiet else table.segment(ino, self.segment_max, self._wanted)
        keys = [self._key(m.ino) for m in segment]
        arrived = trio.Event()
        for other in keys:
            if other != key:
                self._coming[other] = arrived
        if not quiet:
            self._fetch_ahead(table, ino)
        try:
            data = await self._get(table.key, segment)
        finally:
            for other in keys:
                if self._coming.get(other) is arrived:
                    del self._coming[other]
        own = None
        if data is not None:
            base = segment[0].offset
            for other, member in zip(keys, segment, strict=True):
                view = memoryview(data)[member.offset - base : member.offset - base
                                        + member.length]
                if other == key:
                    own = view
                elif not self.fetcher.here(other):
                    self._hold(other, view)
        arrived.set()
        return own

    async def wait_ready(self) -> None:
        """Until the table is decoded (or found unusable)."""
        await self._ready.wait()

    def directory(self, ino: int) -> int | None:
        """The directory of a file the pack holds; None for any other."""
        table = self.table
        pos = table.position.get(ino) if table is not None else None
        return table.members[pos].group if table is not None and pos is not None else None

    def bring(self, inos: Sequence[int], gap: int = GAP_MAX) -> set[int]:
        """Start fetching these files' envelopes ahead (those the node cache lacks), as few
        ranged GETs as the pack's order allows: members that lie within `gap` bytes of each
        other share one segment (at most `segment_max` bytes; the members between them come
        along and are held too), and the segments start in the order of their first file in
        `inos`, which is the order their reader will want them. A reader's miss on one of
        them waits for its segment (`_coming`) instead of fetching around it. Returns the
        files the pack has (whether or not they were here already): the caller brings the
        others."""
        table = self.table
        if table is None or self.disabled or self._nursery is None:
            return set()
        have = [i for i in dict.fromkeys(inos) if i in table.position]
        self._nursery.start_soon(self._background, "brought", self._bring, table, have, gap)
        return set(have)

    async def _bring(self, table: NeighbourTable, inos: list[int], gap: int) -> None:
        absent = await self._absent(inos)
        rank = {ino: n for n, ino in enumerate(absent)}
        segments = table.spans(sorted(table.position[i] for i in rank), gap, self.segment_max)
        segments.sort(key=lambda seg: min(rank.get(m.ino, len(rank)) for m in seg))
        self._fetch_all(table, segments)

    def _fetch_ahead(self, table: NeighbourTable, ino: int) -> None:
        """On a directory's first miss, the rest of its run and then its sibling
        directories' runs (`NeighbourTable.ahead`, up to `ahead_max` bytes) in parallel
        segments, alongside the miss's own: an importer reading a package's files one after
        another, then the package's other subpackages, waits at most one round trip per
        family of directories, not one per file or per directory. A later miss on one of
        them waits for its segment (`_coming`)."""
        group = table.members[table.position[ino]].group
        if self._nursery is None or self.ahead_max <= 0 or group in self._ahead_done:
            return
        self._ahead_done.add(group)
        self._nursery.start_soon(self._background, "fetched ahead", self._ahead, table, ino)

    async def _ahead(self, table: NeighbourTable, ino: int) -> None:
        guess = table.ahead(ino, self.ahead_max, self.segment_max, self._wanted)
        absent = set(await self._absent([m.ino for segment in guess for m in segment]))
        self._fetch_all(table, table.ahead(ino, self.ahead_max, self.segment_max,
                                       lambda i: i in absent and self._wanted(i)))

    async def _absent(self, inos: list[int]) -> list[int]:
        """Those of `inos` still wanted whose blob the node cache lacks: the pack is the
        image's, the cache the node's (another image's mount may have brought the stdlib).
        Their files are looked up in a thread, off the loop."""
        keys = {ino: self._key(ino) for ino in inos if self._wanted(ino)}
        cached = await trio.to_thread.run_sync(self.fetcher.cache.present, keys.values())
        return [ino for ino, key in keys.items() if key not in cached and self._wanted(ino)]

    def _fetch_all(self, table: NeighbourTable, segments: list[list[Member]]) -> None:
        """Fetch segments ahead, their envelopes held, each key `_coming` until it lands."""
        assert self._nursery is not None
        for segment in segments:
            keys = [self._key(m.ino) for m in segment]
            arrived = trio.Event()
            for key in keys:
                self._coming.setdefault(key, arrived)
            self._nursery.start_soon(self._fetch_held, table, segment, keys, arrived)

    async def _background(self, what: str, fn: Callable[..., Awaitable[None]],
                          *args: Any) -> None:
        """A task of the pack's own nursery: what fails is logged and counted, and never
        ends the mount."""
        try:
            await fn(*args)
        except Exception as exc:
            self.stats.background_errors += 1
            log.error("neighbour segments %s: %s", what, exc)

    async def _fetch_held(self, table: NeighbourTable, segment: list[Member], keys: list[str],
                          arrived: trio.Event) -> None:
        """One segment fetched ahead, its envelopes held. Whatever happens, its waiters are
        released (they then fetch alone) and nothing escapes: a task in the background
        must never end the mount."""
        try:
            data = await self._get(table.key, segment)
            if data is not None:
                base = segment[0].offset
                for key, member in zip(keys, segment, strict=True):
                    if not self.fetcher.here(key):
                        start = member.offset - base
                        self._hold(key, memoryview(data)[start : start + member.length])
        except Exception as exc:  # _get reports the store's failures itself; this is a bug
            self.stats.background_errors += 1
            log.error("neighbour segment fetched ahead: %s", exc)
        finally:
            for key in keys:
                if self._coming.get(key) is arrived:
                    del self._coming[key]
            arrived.set()

    def _hold(self, key: str, envelope: memoryview) -> None:
        old = self._held.pop(key, None)
        self._held_bytes += len(envelope) - (len(old) if old is not None else 0)
        self._held[key] = envelope
        while self._held_bytes > self.held_max and self._held:
            _, dropped = self._held.popitem(last=False)
            self._held_bytes -= len(dropped)

    def _take(self, key: str) -> memoryview | None:
        envelope = self._held.pop(key, None)
        if envelope is not None:
            self._held_bytes -= len(envelope)
        return envelope

    async def _get(self, pack: str, segment: Sequence[Member]) -> bytes | None:
        """The segment's bytes with one ranged GET; None (logged) if the store fails."""
        offset = segment[0].offset
        length = segment[-1].offset + segment[-1].length - offset
        self.stats.store_gets += 1
        try:
            with trio.fail_after(self.fetcher.policy.deadline):
                data: bytes = await trio.to_thread.run_sync(
                    self.store.get_range, pack, offset, length,
                    limiter=self.fetcher.net, abandon_on_cancel=True)
        except (StoreUnavailable, OSError, trio.TooSlowError) as exc:
            self.stats.store_errors += 1
            log.warning("neighbour pack %s: range %d+%d failed (%s): fetching blob by blob",
                        pack, offset, length, exc)
            return None
        except StoreError as exc:  # gone, denied: asking again would only double requests
            self.stats.store_errors += 1
            self.disabled = True
            log.error("neighbour pack %s unusable (%s): fetching blob by blob from now on",
                      pack, exc)
            return None
        if len(data) != length:
            self.stats.store_errors += 1
            log.warning("neighbour pack %s: range %d+%d returned %d bytes: fetching blob by "
                        "blob", pack, offset, length, len(data))
            return None
        self.stats.neighbour_gets += 1
        self.stats.neighbour_bytes += length
        self.stats.store_bytes += length
        return data
