"""The mount's readahead: after a read, which of the file's next chunks to bring in, and how.

- **When**: once a read reaches into the second half of a chunk.
- **How far**: `STREAM_CHUNKS` (8) when the file is being read through, each read starting
  within `STREAM_SLACK` (8 MiB) of where the last one ended (the kernel's readahead
  requests arrive out of order by that much); `CHUNKS` (2) after a random read, so that
  random reads fetch no more than they need. A new mount's warm 1 GiB read (cache files not
  yet open, their pages dropped), interleaved, 6 rounds: 701 / 716 / 805 MB/s with 2 / 4 / 8
  chunks ahead; a mount that had them open 925 - 978 with any; 16 gave nothing more. The
  disk's own read swung 398 - 965 MB/s meanwhile, so the order is what holds, not the
  figures (docs/ARCHITECTURE.md, "Readahead").
- **Fetch or advise**: a chunk not here is fetched (as a reader would, so it competes with
  demand reads); one whose cache file is open here gets `posix_fadvise(WILLNEED)`
  (cafs/daemon/pagecache.py), in a thread, at most once every `ADVISE_AGAIN_AFTER` (1 s) per
  file (its pages may have been evicted since). Without the advice each chunk's first read
  waits on the disk. A chunk fetched ahead whose cache file was trusted without being hashed
  (so never read) is advised right after, for the same reason.

Readahead runs in the daemon's nursery as contained background work (cafs/daemon/background.py):
a failure is logged and counted, never a failed read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from cafs.daemon.background import contained
from cafs.daemon.fetcher import Fetcher, FetchFailed, FileBlob
from cafs.daemon.stats import MountStats
from indexer.format import Inode

log = logging.getLogger(__name__)
CHUNKS = 2  # chunks fetched or read ahead when a read reaches a chunk's second half
STREAM_CHUNKS = 8  # the same for a file being read sequentially
STREAM_SLACK = 8 << 20  # the kernel's readahead requests arrive out of order by this much
ADVISE_AGAIN_AFTER = 1.0  # seconds before a cache file is read ahead again
# A file brought in ahead of its first read (a library, an imported module) up to this size
# comes whole; a larger one, its first chunk (a loader's headers): the rest as it is read.
WHOLE_MAX = 16 << 20


@dataclass(slots=True)
class Cursor:
    """Where a file's last read ended: whether the next read follows it."""

    end: int = -1

    def streaming(self, off: int, end: int) -> bool:
        """This read follows the last one (give or take the kernel's reordering): the file
        is being read through. Records where this one ends."""
        following = self.end >= 0 and abs(off - self.end) <= STREAM_SLACK
        self.end = end
        return following

    def ahead(self, off: int, end: int) -> int:
        """How many chunks to bring in ahead of the read [off, end)."""
        return STREAM_CHUNKS if self.streaming(off, end) else CHUNKS


def ahead_chunks(node: Inode, keys: list[str]) -> list[tuple[str, int]]:
    """The chunks (key, length) of file `node` to bring in ahead of its first read."""
    size, chunk = node.size, node.chunk_size
    return [(key, min(chunk, size - ci * chunk))
            for ci, key in enumerate(keys if size <= WHOLE_MAX else keys[:1])]


def advice_due(blob: FileBlob) -> bool:
    """The kernel was not asked to read the blob's cache file ahead within the last
    `ADVISE_AGAIN_AFTER` seconds. Marks it asked: the caller then has it read ahead."""
    now = time.monotonic()
    if now - blob.advised < ADVISE_AGAIN_AFTER:
        return False
    blob.advised = now
    return True


class Readahead:
    """Brings in the chunks after a read, as background tasks in the daemon's nursery."""

    def __init__(self, fetcher: Fetcher, stats: MountStats) -> None:
        self.fetcher = fetcher
        self.stats = stats
        self.background: trio.Nursery | None = None  # set by the daemon: none, no readahead

    def after(self, chunks: list[str], node: Inode, end: int, ahead: int) -> None:
        """A read of file `node` in `chunks` ended at `end`: start bringing in up to `ahead`
        chunks after the one it ended in, once it reached its second half. Never waits:
        each chunk's work is a task of its own."""
        chunk, size = node.chunk_size, node.size
        last = (end - 1) // chunk
        if self.background is None or len(chunks) <= 1 or end - last * chunk < chunk // 2:
            return
        for ci in range(last + 1, min(len(chunks), last + 1 + ahead)):
            self.bring(chunks[ci], min(chunk, size - ci * chunk))

    def bring(self, key: str, size: int) -> bool:
        """Start bringing one blob in (fetched, or its open cache file read ahead by the
        kernel), as a task of its own. False when there was nothing to do: no nursery, or
        the blob is being fetched or was read ahead within the last second."""
        if self.background is None:
            return False
        blob = self.fetcher.cached(key)
        if blob is not None:
            if not advice_due(blob):
                return False
            self.background.start_soon(contained, self.stats, "readahead advice",
                                       self._advise, key)
        elif self.fetcher.known(key):  # being fetched
            return False
        else:
            self.background.start_soon(contained, self.stats, "readahead", self._fetch, key,
                                       size)
        return True

    async def _advise(self, key: str) -> None:
        blob = self.fetcher.cached(key)  # looked up again: it may have been closed since
        if blob is not None:
            async with blob:
                await blob.willneed()

    async def _fetch(self, key: str, size: int) -> None:
        try:
            await self.fetcher.prefetch(key, size)
        except FetchFailed as exc:  # expected (a store down): no background error
            log.warning("readahead of blob %s failed: %s", key, exc)
            return
        # A cache file trusted without a hash was not read: have the kernel read it now.
        blob = self.fetcher.cached(key)
        if blob is not None and advice_due(blob):
            async with blob:
                await blob.willneed()
