"""A Python module's first read brings every module its import will load, all at once.

An interpreter importing a package reads a module, runs it, and reads each module it imports
only when the statement runs: on a lazily loaded image without a profile, a round trip per
module, one after another, unless they happen to sit in a directory fetched around an
earlier miss. Fetching whole directories around each miss brought #20's `import numpy`
3.5 MB it never read (the stdlib's top level, `lib-dynload`, `encodings`), and still waited
on each directory. The image's `imports` record (indexer/imports.py) says, for every source
file the indexer scanned, which files its module-level imports load, resolved in the image's
tree; so the first read of such a file here starts fetching, in parallel, the file and
everything it imports, directly or not (its import tree, in the order Python runs it), at
most `ahead_max` bytes (`DaemonConfig.imports_ahead`, 32 MiB) per first read:

- the files the neighbour pack holds, as a few ranged GETs of it (`Neighbours.bring`): the
  reader's own miss waits for its segment rather than fetching its directory around it;
- extension modules and their libraries as a program's first read brings them
  (`Libraries.bring`), other files chunk by chunk as readahead does.

Reading a source file without importing it (`grep`, a checksum) fetches its imports for
nothing: a cost in bytes, bounded as above, never a wrong byte, as every blob is verified
against its key as any other fetch. Modules imported by name at run time (`importlib`,
an extension module's own imports, `encodings.utf_8`) are not in the record: their first
read is an ordinary miss, and brings its own import tree.
"""

from __future__ import annotations

import logging

import trio

from cafs.daemon.libraries import Libraries
from cafs.daemon.neighbours import Neighbours
from cafs.daemon.readahead import WHOLE_MAX, Readahead, ahead_chunks
from cafs.daemon.stats import MountStats
from indexer.format import Index
from indexer.imports import ImportTable, ImportTableError, load

log = logging.getLogger(__name__)
AHEAD_MAX = 32 << 20  # bytes one first read brings in at most (DaemonConfig.imports_ahead)
FILES_MAX = 4096  # files of one import tree looked at
EARLY_MAX = 1024  # first reads kept while the table is being decoded


class Imports:
    """The mount's import table: `first_read` is the FUSE adapter's hook."""

    def __init__(self, index: Index, readahead: Readahead, stats: MountStats,
                 near: Neighbours | None, libs: Libraries | None,
                 ahead_max: int = AHEAD_MAX) -> None:
        self.index = index
        self.readahead = readahead
        self.stats = stats
        self.near = near
        self.libs = libs
        self.ahead_max = ahead_max
        self.table: ImportTable | None = None
        self._early: list[int] | None = []  # None once the table is decoded
        self._done: set[int] = set()  # files asked for
        self.ready = trio.Event()  # set once early first reads have been served

    async def run(self) -> None:
        """Decode the index's table in a thread (a table this cafs cannot use is logged and
        the mount goes on without it) and wait for the neighbour pack's, then serve the
        first reads that came meanwhile. The pack's misses wait for `ready` (its `gate`), so
        a miss that came early does not fetch its directory around it first."""
        try:
            try:
                self.table = await trio.to_thread.run_sync(load, self.index)
            except ImportTableError as exc:
                log.error("imports record not used: %s", exc)
            if self.near is not None:
                await self.near.wait_ready()
            early, self._early = self._early or [], None
            for ino in early:
                self.first_read(ino, 0)
        finally:
            self.ready.set()

    def first_read(self, ino: int, chunk: int) -> None:
        """Inode `ino` is read for the first time in a while: if it is a source file the
        index scanned, bring in its import tree."""
        del chunk  # a source file the table names is one chunk
        if self._early is not None:
            if len(self._early) < EARLY_MAX:
                self._early.append(ino)
            return
        if self.table is None or ino not in self.table.deps or ino in self._done:
            return
        tree = self._tree(self.table, ino)
        self._done.update(tree)
        self.stats.import_files += len(tree) - 1
        packed: set[int] = set()
        if self.near is not None:
            # The table speaks for a directory once it has named a file there to fetch:
            # a later miss there fetches that file alone (`Neighbours.quiet`), the first
            # one included. A miss in one it never has (a plugin directory scanned, a test
            # collector) stays an ordinary miss, its directory fetched around it.
            self.near.quiet.update(d for f in tree[1:]
                                   if (d := self.near.directory(f)) is not None)
            packed = self.near.bring(tree[1:])
        for file in tree[1:]:  # the reader's own read fetches the first
            if self.libs is not None and self.libs.bring(file, itself=file not in packed):
                continue
            if file not in packed:
                self._bring_chunks(file)

    def _tree(self, table: ImportTable, ino: int) -> list[int]:
        """`ino` and the files its import loads, directly or not, in the order Python runs
        the imports (depth first), within `ahead_max` bytes and `FILES_MAX` files; files
        asked for before are left out, and so is what they import."""
        order: list[int] = []
        seen: set[int] = set()
        stack = [ino]
        budget = self.ahead_max
        while stack and len(order) < FILES_MAX:
            file = stack.pop()
            if file in seen or file in self._done:
                continue
            seen.add(file)
            size = min(self.index.inode(file).size, WHOLE_MAX)
            if size > budget:
                continue
            budget -= size
            order.append(file)
            stack.extend(reversed(table.deps.get(file, ())))
        return order

    def _bring_chunks(self, ino: int) -> None:
        for key, length in ahead_chunks(self.index.inode(ino), self.index.chunks(ino)):
            self.readahead.bring(key, length)
