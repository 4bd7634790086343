"""The pyfuse3 adapter: a thin read-only layer over an `Index`, a `Fetcher` and `Readahead`.

Metadata comes straight from the index (no I/O). Content never changes, so attributes and
entries get long timeouts and files open with `keep_cache`: after the first read, the
kernel page cache answers and Python is off the path. A read maps to the chunks it covers,
reads each through the fetcher's blob handle (cafs/daemon/fetcher.py) and tells the
readahead policy where it ended (cafs/daemon/readahead.py). A read that cannot be served
fails with EIO for that file only.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pyfuse3

from cafs.daemon.fetcher import Fetcher, FetchFailed
from cafs.daemon.readahead import Cursor, Readahead
from cafs.daemon.stats import MountStats
from indexer.format import Index, Inode

log = logging.getLogger(__name__)
TIMEOUT = 86400.0  # content is immutable: let the kernel cache metadata for a day
OPEN_FILES_CACHED = 4096
# With pyfuse3 patched so that read and readdir get the inode when there is no file handle
# (contrib/pyfuse3), open and opendir answer ENOSYS: the kernel then sends neither, nor
# release, again, and caches directory listings itself (FOPEN_CACHE_DIR), which pyfuse3
# offers no other way to ask for. Measured: a repeated tree walk makes no requests at all.
NO_OPEN = bool(getattr(pyfuse3, "FH_FALLS_BACK_TO_INODE", False))
# With pyfuse3 patched to reply to a read from (fd, offset, length), a read whose bytes are
# in the page cache of a cache file is answered by libfuse from that file, without the GIL:
# spliced (one kernel copy) where its pipe may grow past 1 MiB, else its own pread + writev.
# Python never touches the bytes. CAFS_READ_SPLICE=0 turns it off (for comparisons); read
# per mount, not at import, as a mount server imports this long before it forks a daemon.
CAN_REPLY_FROM_FD = bool(getattr(pyfuse3, "READ_REPLY_FROM_FD", False))


@dataclass
class _OpenFile:
    """A file being read: its record, its chunks, and where its last read ended."""

    node: Inode
    chunks: list[str]
    cursor: Cursor


class ReplyBuffers:
    """Reusable read buffers, so a 1 MiB read costs no allocation, zero-fill or extra copy.

    A read returns a view of its buffer; pyfuse3 copies it into the kernel's reply as soon as
    the handler returns, before trio runs any other task. So a buffer handed back by a read
    that returned is free again by the time any later read starts; buffers of reads still
    waiting (on a fetch) are never in the pool.
    """

    SIZE = 1 << 20  # the largest FUSE read the kernel sends (256 pages)
    KEEP = 16

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._replied: list[bytearray] = []

    def take(self, length: int) -> memoryview:
        if self._replied:
            self._free.extend(self._replied[: self.KEEP - len(self._free)])
            self._replied.clear()
        for i, buf in enumerate(self._free):
            if len(buf) >= length:
                return memoryview(self._free.pop(i))[:length]
        return memoryview(bytearray(max(length, self.SIZE)))[:length]

    def replied(self, view: memoryview) -> None:
        buf = view.obj
        assert isinstance(buf, bytearray)
        self._replied.append(buf)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _contained(handler: F) -> F:
    """A bug met by one request fails that request with EIO, logged; left to pyfuse3 it would
    end the session loop and take the mount, and every container on it, down."""

    @functools.wraps(handler)
    async def contained(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, contained)


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class CafsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, index: Index, fetcher: Fetcher, stats: MountStats,
                 splice: bool = True) -> None:
        super().__init__()
        self.index = index
        self.fetcher = fetcher
        self.stats = stats
        self._attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self._files: OrderedDict[int, _OpenFile] = OrderedDict()
        self._buffers = ReplyBuffers()
        self._splice = CAN_REPLY_FROM_FD and splice  # DaemonConfig.read_splice
        self.readahead = Readahead(fetcher, stats)
        self.on_read: Callable[[int, int, int], None] | None = None  # profile hook
        # Told of an inode's first read in a while and the chunk it reads, before it waits
        # (cafs/daemon/libraries.py, imports.py), in order
        self.on_first_read: list[Callable[[int, int], None]] = []

    # -- metadata ------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        try:
            return self.index.inode(ino)
        except KeyError:
            raise _err(errno.ENOENT) from None

    def _attr_of(self, ino: int) -> pyfuse3.EntryAttributes:
        """Attributes never change, so each inode's are built once (walks repeat them)."""
        attr = self._attrs.get(ino)
        if attr is None:
            attr = self._attrs[ino] = self._attr(self._inode(ino))
        return attr

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = cast(pyfuse3.InodeT, node.ino)
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = cast(pyfuse3.ModeT, node.mode)
        attr.st_nlink = node.nlink
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_rdev = node.rdev
        attr.st_size = node.size if not node.is_dir else 4096
        attr.st_blksize = 1 << 17
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    @_contained
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr_of(inode)

    @_contained
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        child = self.index.lookup(parent_inode, bytes(name))
        if child is None:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = cast(pyfuse3.InodeT, 0)  # negative entry, cached by the kernel
            attr.entry_timeout = TIMEOUT
            return attr
        return self._attr_of(child)

    @_contained
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
                       ) -> pyfuse3.FileNameT:
        try:
            return cast(pyfuse3.FileNameT, self.index.readlink(inode))
        except ValueError:
            raise _err(errno.EINVAL) from None

    @_contained
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.FileHandleT:
        self.stats.opens += 1
        if NO_OPEN:
            raise _err(errno.ENOSYS)
        if not self._inode(inode).is_dir:
            raise _err(errno.ENOTDIR)
        return cast(pyfuse3.FileHandleT, inode)

    @_contained
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        self.stats.listings += 1
        for pos, name, child in self.index.entries(fh, start_id):
            attr = self._attr_of(child)
            if not pyfuse3.readdir_reply(token, cast(pyfuse3.FileNameT, name), attr, pos + 1):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_contained
    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        for key, value in self.index.xattrs(inode):
            if key == name:
                return value
        raise _err(pyfuse3.ENOATTR)

    @_contained
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
                        ) -> list[pyfuse3.XAttrNameT]:
        return [cast(pyfuse3.XAttrNameT, k) for k, _ in self.index.xattrs(inode)]

    @_contained
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lower layer whose statfs fails, so this must answer.
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = (self.stats.image_bytes + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = self.index.inode_count
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inodes are the index's records: nothing to free

    # -- content -------------------------------------------------------------------------

    @_contained
    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        self.stats.opens += 1
        if NO_OPEN:
            raise _err(errno.ENOSYS)
        node = self._inode(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise _err(errno.EROFS)
        if not stat.S_ISREG(node.mode):
            raise _err(errno.EINVAL)
        return pyfuse3.FileInfo(fh=cast(pyfuse3.FileHandleT, inode), keep_cache=True)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    def _file(self, ino: int) -> _OpenFile:
        """An open file's inode and chunk list, decoded once, not on every 128 KiB read."""
        entry = self._files.get(ino)
        if entry is None:
            entry = self._files[ino] = _OpenFile(self.index.inode(ino), self.index.chunks(ino),
                                                 Cursor())
            if len(self._files) > OPEN_FILES_CACHED:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(ino)
        return entry

    @_contained
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        first = fh not in self._files
        file = self._file(fh)
        end = min(off + size, file.node.size)
        if off >= end:
            return b""
        ahead = file.cursor.ahead(off, end)  # before any wait: the next read may come first
        if first:
            for hook in self.on_first_read:
                hook(fh, off // file.node.chunk_size)
        token = self.stats.read_started()
        done = 0
        try:
            if (end - 1) // file.node.chunk_size == off // file.node.chunk_size:
                reply = await self._within(fh, file, off, end)
            else:
                reply = await self._across(fh, file, off, end)
            if isinstance(reply, tuple):
                self.stats.spliced_reads += 1
                done = reply[2]
            else:
                done = len(reply)
            self.readahead.after(file.chunks, file.node, end, ahead)
        except FetchFailed as exc:
            self.stats.eio += 1
            log.error("read of inode %d at %d failed: %s", fh, off, exc)
            raise _err(errno.EIO) from None
        finally:
            self.stats.read_done(token, done)
        # pyfuse3 replies with any buffer, or from (fd, offset, length) of a file, as soon
        # as this returns, before it runs another task (see fetcher.Blob)
        return cast(bytes, reply)

    async def _within(self, fh: int, file: _OpenFile, off: int, end: int
                      ) -> tuple[int, int, int] | memoryview:
        """A read within one chunk: from its cache file's page cache where it has the bytes
        (a span, no Python buffer), else copied into a reply buffer."""
        chunk = file.node.chunk_size
        ci = off // chunk
        base = ci * chunk
        clen = min(chunk, file.node.size - base)
        reply: tuple[int, int, int] | memoryview | None
        async with self.fetcher.open(file.chunks[ci], clen) as blob:
            reply = blob.span(off - base, end - off) if self._splice else None
            if reply is None:
                out = self._buffers.take(end - off)
                try:
                    reply = out[: await blob.read_into(off - base, out)]
                finally:
                    self._buffers.replied(out)
        if self.on_read is not None:
            self.on_read(fh, ci, clen)
        return reply

    async def _across(self, fh: int, file: _OpenFile, off: int, end: int) -> memoryview:
        """A read across chunks, copied into a reply buffer chunk by chunk."""
        chunk = file.node.chunk_size
        out = self._buffers.take(end - off)
        done = 0
        try:
            for ci in range(off // chunk, (end - 1) // chunk + 1):
                base = ci * chunk
                clen = min(chunk, file.node.size - base)
                lo, hi = max(off, base) - base, min(end, base + clen) - base
                async with self.fetcher.open(file.chunks[ci], clen) as blob:
                    done += await blob.read_into(lo, out[done : done + hi - lo])
                if self.on_read is not None:
                    self.on_read(fh, ci, clen)
        finally:
            self._buffers.replied(out)
        return out[:done]
