"""A reader's miss on a small file brings its directory's neighbours in the same ranged GET.

Without a profile, an interpreter importing a package reads its files one after another,
each miss paying the store's round trip. The image's neighbour pack (indexer/neighbours.py)
holds its small files' envelopes in tree order, so on a miss the mount fetches the segment
of the pack around the file (its directory's run, at most `SEGMENT_MAX` bytes) with one
ranged GET. The missed blob is decoded and verified against its key and served; the others
are claimed at once (readers asking for them meanwhile wait for this GET instead of
issuing their own) and each is verified against its own key and cached in the background,
exactly as if fetched alone. Anything that goes wrong (the GET fails, bytes do not match a
key) leaves the blob to the ordinary per-blob fetch: a pack is a shortcut, never a source
of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from blobstore import BlobCorrupt, BlobStore, StoreError
from blobstore.envelope import decode
from cafs.fetcher import Fetcher
from cafs.stats import MountStats
from indexer.format import Index
from indexer.neighbours import Member, NeighbourTable

log = logging.getLogger(__name__)
SEGMENT_MAX = 2 << 20  # bytes one miss fetches at most (~17 ms at 1 Gbit/s: under an RTT)
ADOPT_BATCH = 16  # blobs verified and cached per thread hop: the next read waits on its batch


class Neighbours:
    """The mount's neighbour pack: `on_miss` is the fetcher's first answer to a miss."""

    def __init__(self, index: Index, table: NeighbourTable, store: BlobStore,
                 fetcher: Fetcher, stats: MountStats, segment_max: int = SEGMENT_MAX) -> None:
        self.index = index
        self.table = table
        self.store = store
        self.fetcher = fetcher
        self.stats = stats
        self.segment_max = segment_max
        self.nursery: trio.Nursery | None = None  # set by the daemon: background adoption
        self._inos: dict[str, int] | None = None
        self._ready = trio.Event()

    async def run(self) -> None:
        """Map the pack's blobs to their inodes (in a thread: ~2 µs each), once per mount."""
        self._inos = await trio.to_thread.run_sync(self._map)
        self._ready.set()

    def _map(self) -> dict[str, int]:
        return {self._key(m.ino): m.ino for m in self.table.members}

    def _key(self, ino: int) -> str:
        return self.index.chunks(ino)[0]

    async def on_miss(self, key: str) -> bytes | memoryview | None:
        """The missed blob's verified bytes, fetched with its neighbours; None when the pack
        does not have it or could not deliver it (the caller fetches it alone)."""
        await self._ready.wait()
        assert self._inos is not None
        ino = self._inos.get(key)
        if ino is None:
            return None
        segment = self.table.segment(ino, self.segment_max,
                                     lambda other: not self.fetcher.known(self._key(other)))
        others = [(self._key(m.ino), m) for m in segment if m.ino != ino]
        present = self.fetcher.claim([k for k, _ in others])
        claimed = [(k, m) for k, m in others if k not in present]
        try:
            data = await self._get(segment)
        except BaseException:
            self.fetcher.release([k for k, _ in claimed])
            raise
        if data is None:
            self.fetcher.release([k for k, _ in claimed])
            return None
        base = segment[0].offset
        blobs = [(k, self.index.inode(m.ino).size, _view(data, m, base)) for k, m in claimed]
        self._adopt_later(blobs)
        own = next(m for m in segment if m.ino == ino)
        try:
            return await trio.to_thread.run_sync(decode, bytes(_view(data, own, base)), key,
                                                 limiter=self.fetcher.cpu)
        except BlobCorrupt as exc:
            self.stats.corrupt_blobs += 1
            log.error("blob %s in the neighbour pack failed verification (%s): fetching it "
                      "alone", key, exc)
            return None

    async def _get(self, segment: Sequence[Member]) -> bytes | None:
        """The segment's bytes with one ranged GET; None (logged) if the store fails."""
        offset = segment[0].offset
        length = segment[-1].offset + segment[-1].length - offset
        self.stats.store_gets += 1
        try:
            with trio.fail_after(self.fetcher.policy.deadline):
                data: bytes = await trio.to_thread.run_sync(
                    self.store.get_range, self.table.key, offset, length,
                    limiter=self.fetcher.net, abandon_on_cancel=True)
        except (StoreError, OSError, trio.TooSlowError) as exc:
            self.stats.store_errors += 1
            log.warning("neighbour pack %s: range %d+%d failed (%s): fetching blob by blob",
                        self.table.key, offset, length, exc)
            return None
        if len(data) != length:
            self.stats.store_errors += 1
            log.warning("neighbour pack %s: range %d+%d returned %d bytes: fetching blob by "
                        "blob", self.table.key, offset, length, len(data))
            return None
        self.stats.neighbour_gets += 1
        self.stats.neighbour_bytes += length
        return data

    def _adopt_later(self, blobs: list[tuple[str, int, memoryview]]) -> None:
        """Verify and cache the claimed neighbours in batches, in the background (in order:
        a reader waiting on one waits for its batch only)."""
        if not blobs:
            return

        async def adopt() -> None:
            done = 0
            try:
                while done < len(blobs):
                    batch = blobs[done : done + ADOPT_BATCH]
                    done += len(batch)
                    await self.fetcher.adopt_claimed(batch)
            except Exception:  # a bug here must not take the mount down: readers fetch alone
                log.exception("adopting a neighbour pack segment failed")
            finally:
                self.fetcher.release([key for key, _, _ in blobs[done:]])

        if self.nursery is None:  # pragma: no cover - the daemon always sets it
            raise RuntimeError("Neighbours.nursery is not set")
        self.nursery.start_soon(adopt)


def _view(data: bytes, member: Member, base: int) -> memoryview:
    start = member.offset - base
    return memoryview(data)[start : start + member.length]
