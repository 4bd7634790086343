"""A program's first read brings the libraries it will load, all at once.

Starting a dynamically linked program is a chain of first reads nobody can batch from the
reads alone: the kernel reads the program, then its interpreter; the interpreter reads each
library the program needs, then what those need; a library of several chunks is faulted in
chunk after chunk. Without a profile, each is a round trip to the store, one after another
(#20's `import numpy`: 12 of its 25 waits). The image's `libraries` record
(indexer/libraries.py) says, for every ELF object, which objects it loads, as resolved in
the image's tree when it was indexed; so the first read of an object here starts fetching,
in parallel and as readahead does, every chunk of the object and of everything it loads,
directly or not (an object over 16 MiB, readahead's `WHOLE_MAX`: its first chunk only, the
loader's headers; the rest comes as it is read), at most `libraries_ahead` bytes
(`DaemonConfig.libraries_ahead`, 32 MiB) per first read.

Reading an ELF file without running it (`file`, a checksum) fetches its libraries for
nothing: a cost in bytes, bounded as above, never a wrong byte, as every blob is verified
against its key as any other fetch. The table is decoded in a thread once the mount is up;
first reads that came before it was ready are served from the list they left.
"""

from __future__ import annotations

import logging

import trio

from cafs.daemon.readahead import Readahead, ahead_chunks
from cafs.daemon.stats import MountStats
from indexer.format import Index
from indexer.libraries import LibraryTable, LibraryTableError, load

log = logging.getLogger(__name__)
AHEAD_MAX = 32 << 20  # bytes one first read brings in at most (DaemonConfig.libraries_ahead)
OBJECTS_MAX = 64  # objects of one load chain looked at
EARLY_MAX = 1024  # first reads kept while the table is being decoded


class Libraries:
    """The mount's library table: `first_read` is the FUSE adapter's hook."""

    def __init__(self, index: Index, readahead: Readahead, stats: MountStats,
                 ahead_max: int = AHEAD_MAX) -> None:
        self.index = index
        self.readahead = readahead
        self.stats = stats
        self.ahead_max = ahead_max
        self.table: LibraryTable | None = None
        self._early: list[tuple[int, int]] | None = []  # None once the table is decoded
        self._done: set[int] = set()  # objects whose chunks were asked for

    async def run(self) -> None:
        """Decode the index's table in a thread (a table this cafs cannot use is logged and
        the mount goes on without it), then serve the first reads that came meanwhile."""
        try:
            self.table = await trio.to_thread.run_sync(load, self.index)
        except LibraryTableError as exc:
            log.error("libraries record not used: %s", exc)
        early, self._early = self._early or [], None
        for ino, chunk in early:
            self.first_read(ino, chunk)

    def first_read(self, ino: int, chunk: int) -> None:
        """Inode `ino` is read for the first time in a while, at chunk `chunk` (which the
        read itself fetches): if it is an ELF object, bring in its load chain."""
        if self._early is not None:
            if len(self._early) < EARLY_MAX:
                self._early.append((ino, chunk))
            return
        if self.table is None or ino not in self.table.deps or ino in self._done:
            return
        self._chain(ino, {self.index.chunks(ino)[chunk]})  # the read itself fetches that one

    def bring(self, ino: int, itself: bool = True) -> bool:
        """Bring in an object that is about to be loaded (an extension module an import
        will load, cafs/daemon/imports.py) with its load chain, as its first read would
        (not `itself`: only what it loads, the object is on its way); False if it is not an
        ELF object of the table (or the table is not decoded yet)."""
        if self.table is None or ino not in self.table.deps:
            return False
        if ino not in self._done:
            self._chain(ino, set() if itself else set(self.index.chunks(ino)))
        return True

    def _chain(self, ino: int, asked: set[str]) -> None:
        """Ask for `ino`'s load chain, the chunks in `asked` excepted."""
        assert self.table is not None
        budget = self.ahead_max
        for obj in self.table.closure(ino, OBJECTS_MAX):
            if obj in self._done:
                continue
            self._done.add(obj)
            budget = self._bring(obj, asked, budget)
            if budget <= 0:
                return

    def _bring(self, ino: int, asked: set[str], budget: int) -> int:
        """Ask for the chunks of one object (each blob once); the budget left."""
        for key, length in ahead_chunks(self.index.inode(ino), self.index.chunks(ino)):
            if key in asked:
                continue
            if length > budget:
                return 0
            asked.add(key)
            if self.readahead.bring(key, length):
                budget -= length
                self.stats.library_blobs += 1
        return budget
