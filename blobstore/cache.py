"""The node-wide blob cache shared by every mount and process on the node.

Verified, decompressed blobs live as plain files `blobs/<h[:2]>/<h>`, written to `tmp/` and
renamed into place, so a half-written file is never visible. Readers hold a shared `flock`
on every cache file they have open; eviction takes an exclusive, non-blocking lock before
unlinking, so a blob being read is never removed (CernVM-FS's model: LRU by mtime, evict to
a low-water mark when the budget is exceeded).

Cache files are written without fsync, so a reader hashes one before trusting it. A file
hashed (or written from verified bytes) since the machine booted, and not changed since,
needs no second hash in another process: `trust` records its inode, size and ctime under
`trusted/<boot id>/`, `trusted` compares them (any write, truncate or attribute change
moves the ctime; a crash means a new boot id). A record is a symlink whose target is the
stamp: the filesystem keeps so short a target in the inode, so checking one reads no data
block (a record in a file did: one small read per blob, queued behind the reads of a cold
sequential read, which held a new mount's warm read to three quarters of an old mount's).

The cache is private (blobstore/privatedir.py): its blobs include files an image keeps
from other users, and its `indexes/` say which blob is which file. A cache directory
others can write to is refused: a process trusts a file it has verified for as long as
the file's stamp holds, and only its owner (or root) must be able to change it in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from blobstore import privatedir
from blobstore.errors import BlobCorrupt

log = logging.getLogger(__name__)
LOW_WATER = 0.8  # evict down to this share of the budget
TMP_MAX_AGE = 3600.0  # temp files older than this are leftovers of a crashed writer


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _stamp(st: os.stat_result) -> str:
    """What identifies a cache file as it was when verified (see the module's docstring)."""
    return f"{st.st_ino} {st.st_size} {st.st_ctime_ns}"


@functools.cache
def _this_boot() -> str | None:
    return _boot_id()


def _recorded(ledger: Path, digest: str, st: os.stat_result) -> bool:
    """The ledger's trust record of `digest` names exactly this file as it is now."""
    try:
        return os.readlink(ledger / digest[:2] / digest) == _stamp(st)
    except OSError:  # none, or a record of the older format (a regular file)
        return False


def verified_since_boot(blobs: Path, digest: str, fd: int) -> bool:
    """Whether the open cache file `fd` of blob `digest`, in the cache whose `blobs/`
    directory is `blobs`, was verified by some process since boot and is unchanged since
    (its `trust` record, see the module's docstring). For a process reading cache files
    without a NodeCache of its own (the weight loader): the fetching process's hash, not a
    second one."""
    boot = _this_boot()
    return boot is not None and _recorded(blobs.parent / "trusted" / boot, digest,
                                          os.fstat(fd))


def default_budget(root: Path) -> int:
    """A quarter of the cache's filesystem, at least 1 GiB."""
    privatedir.ensure(root)
    return max(1 << 30, shutil.disk_usage(root).total // 4)


# Node-wide copies of store objects a mount needs before any blob (written by cafs's
# resolve and kernelmeta, flat `<dir>/<key>[.vN]`): counted in the budget and evicted by
# age with the blobs. Removing one in use is harmless: an index is read into memory at
# mount, an EROFS image stays mounted through its open inode; the next mount fetches again.
METADATA_DIRS = ("indexes", "erofs")
LRU_TOUCH_AFTER = 60.0  # seconds: the LRU clock of a file in use moves at most this often


def touch(path: Path) -> None:
    """Mark a metadata file used (its mtime is the LRU clock), at most once a minute."""
    with contextlib.suppress(OSError):
        if time.time() - path.stat().st_mtime > LRU_TOUCH_AFTER:
            os.utime(path)


@dataclass
class CacheUsage:
    blobs: int
    bytes: int  # blobs and metadata files
    budget: int
    metadata: int = 0  # index and EROFS image files


class CacheFull(OSError):
    """The cache's disk is full even after eviction."""


def blob_path(blobs: Path, digest: str) -> Path:
    """Where a node cache keeps a blob below its `blobs/` directory; how a reader outside
    the daemon (the weight loader) finds a cache file too."""
    return blobs / digest[:2] / digest


def open_pinned(path: Path) -> tuple[int, os.stat_result] | None:
    """An fd of a cache file, pinned against eviction, and its status; None where absent
    or evicted between open and lock. The pin is a shared `flock`, held as long as the fd
    is open: eviction unlinks only files it can lock exclusively."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if st.st_nlink == 0:
        os.close(fd)
        return None
    return fd, st


class NodeCache:
    def __init__(self, root: str | Path, budget: int | None = None, fsync: bool = True) -> None:
        self.root = privatedir.ensure(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(mode=privatedir.DIR_MODE, exist_ok=True)
        self.tmp.mkdir(mode=privatedir.DIR_MODE, exist_ok=True)
        self.budget = budget if budget is not None else default_budget(self.root)
        self.fsync = fsync
        boot = _boot_id()
        self.ledger = self.root / "trusted" / boot if boot else None  # None: trust nothing
        self._forget_other_boots()
        self._lock = threading.Lock()
        self._used: int | None = None  # estimate; exact figure is recomputed when evicting

    def path(self, digest: str) -> Path:
        return blob_path(self.blobs, digest)

    def present(self, digests: Iterable[str]) -> set[str]:
        """Those of `digests` with a file here (not opened, not verified: for a guess of
        what to fetch ahead, never for what to serve)."""
        return {d for d in digests if os.path.lexists(self.path(d))}

    def open(self, digest: str, size: int) -> int | None:
        """An fd of the cached blob, pinned against eviction, or None if absent or damaged."""
        pinned = open_pinned(self.path(digest))
        if pinned is None:
            return None
        fd, st = pinned
        try:
            if st.st_size != size:
                log.warning("cache file %s has size %d, expected %d: dropped",
                            digest, st.st_size, size)
                os.close(fd)
                self.discard(digest)
                return None
            if time.time() - st.st_mtime > LRU_TOUCH_AFTER:  # the LRU clock
                was_trusted = self._matches(digest, st)
                with contextlib.suppress(OSError):
                    os.utime(fd)
                    if was_trusted:  # our own touch moved the ctime, nothing else did
                        self._record(digest, os.fstat(fd))
            return fd
        except BaseException:
            os.close(fd)
            raise

    def insert(self, digest: str, data: bytes | memoryview, account: bool = True) -> None:
        """Atomically add a verified blob (callers verify: the cache trusts its inputs).
        Without `account`, the budget is left to a process that is told with `added`."""
        dest = self.path(digest)
        tmp = self.tmp / f"{digest}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            with os.fdopen(privatedir.create(tmp), "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fdatasync(f.fileno())
            dest.parent.mkdir(mode=privatedir.DIR_MODE, exist_ok=True)
            os.rename(tmp, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno == 28:  # ENOSPC: make room once, then give up
                self.evict(len(data))
                raise CacheFull(28, f"cache disk full at {self.root}") from exc
            raise
        if account:
            self._account(len(data))

    def insert_pieces(self, digest: str, size: int, pieces: Iterable[bytes],
                      account: bool = True) -> None:
        """Add a blob arriving in pieces, each written once and hashed as it is written.
        Only bytes that match `digest` and `size` are renamed into place: anything else
        (BlobCorrupt, or the source's own error) removes the temp file and raises."""
        tmp = self.tmp / f"{digest}.{os.getpid()}.{secrets.token_hex(4)}"
        hasher, got = blake3.blake3(), 0
        try:
            with os.fdopen(privatedir.create(tmp), "wb", buffering=0) as f:
                for piece in pieces:
                    got += len(piece)
                    if got > size:
                        raise BlobCorrupt(f"blob longer than its {size} bytes")
                    hasher.update(piece)
                    f.write(piece)
                if self.fsync:
                    os.fdatasync(f.fileno())
            if got != size:
                raise BlobCorrupt(f"blob of {got} bytes, not {size}")
            if hasher.hexdigest() != digest:
                raise BlobCorrupt(f"blob content does not match its key {digest}")
            dest = self.path(digest)
            dest.parent.mkdir(mode=privatedir.DIR_MODE, exist_ok=True)
            os.rename(tmp, dest)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC, as in `insert`
                self.evict(size)
                raise CacheFull(28, f"cache disk full at {self.root}") from exc
            raise
        if account:
            self._account(size)

    def added(self, nbytes: int) -> None:
        """Count a blob another process inserted (evicting if that passes the budget)."""
        self._account(nbytes)

    def discard(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
        self._forget(digest)

    def trusted(self, digest: str, fd: int) -> bool:
        """Verified by some process since boot, and unchanged since."""
        return self._matches(digest, os.fstat(fd))

    def trust(self, digest: str, fd: int) -> None:
        """Record that this open cache file holds exactly the blob (the caller verified it)."""
        with contextlib.suppress(OSError):
            self._record(digest, os.fstat(fd))

    def _entry(self, digest: str) -> Path | None:
        return self.ledger / digest[:2] / digest if self.ledger is not None else None

    def _matches(self, digest: str, st: os.stat_result) -> bool:
        return self.ledger is not None and _recorded(self.ledger, digest, st)

    def _record(self, digest: str, st: os.stat_result) -> None:
        entry = self._entry(digest)
        if entry is None:
            return
        entry.parent.mkdir(mode=privatedir.DIR_MODE, parents=True, exist_ok=True)
        tmp = entry.with_name(f".{digest}.{secrets.token_hex(4)}")
        os.symlink(_stamp(st), tmp)
        os.replace(tmp, entry)

    def _forget(self, digest: str) -> None:
        entry = self._entry(digest)
        if entry is not None:
            with contextlib.suppress(OSError):
                entry.unlink()

    def _forget_other_boots(self) -> None:
        keep = self.ledger.name if self.ledger is not None else None
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root / "trusted"):
                if entry.name != keep:
                    shutil.rmtree(entry.path, ignore_errors=True)

    def _account(self, added: int) -> None:
        with self._lock:
            if self._used is None:
                self._used = self.usage().bytes
            else:
                self._used += added
            over = self._used > self.budget
        if over:
            self.evict()

    def _files(self) -> Iterator[os.DirEntry[str]]:
        """Every file the budget covers: blobs, then metadata (not their temp files)."""
        for sub in os.scandir(self.blobs):
            if sub.is_dir(follow_symlinks=False):
                yield from os.scandir(sub.path)
        for name in METADATA_DIRS:
            with contextlib.suppress(FileNotFoundError):
                yield from (e for e in os.scandir(self.root / name)
                            if not e.name.startswith(".") and e.is_file(follow_symlinks=False))

    def usage(self) -> CacheUsage:
        blobs = metadata = total = 0
        for entry in self._files():
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat(follow_symlinks=False).st_size
                if os.path.basename(os.path.dirname(entry.path)) in METADATA_DIRS:
                    metadata += 1
                else:
                    blobs += 1
        return CacheUsage(blobs, total, self.budget, metadata)

    def evict(self, need: int = 0, target: int | None = None) -> int:
        """Remove least recently used, unpinned blobs and metadata files until usage <=
        target. Returns bytes freed."""
        target = int(self.budget * LOW_WATER) - need if target is None else target
        lock_fd = os.open(self.root / ".evict.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        freed = 0
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            files = []
            for entry in self._files():
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    files.append((st.st_mtime, st.st_size, entry.path))
            used = sum(f[1] for f in files)
            for _, size, path in sorted(files):
                if used <= target:
                    break
                if self._remove_unpinned(path):
                    used -= size
                    freed += size
            self._clean_tmp()
            with self._lock:
                self._used = used
        finally:
            os.close(lock_fd)
        if freed:
            log.info("cache eviction freed %d bytes; %d in use", freed, used)
        return freed

    def _remove_unpinned(self, path: str) -> bool:
        if self._unlink_unpinned(path):
            self._forget(os.path.basename(path))
            return True
        return False

    @staticmethod
    def _unlink_unpinned(path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # someone is reading it
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def _clean_tmp(self) -> None:
        """Temp files of writers that crashed: `tmp/*`, and `.<key>.<rand>` beside metadata."""
        now = time.time()
        dirs = [self.tmp] + [self.root / name for name in METADATA_DIRS]
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(d):
                    if d != self.tmp and not entry.name.startswith("."):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        if now - entry.stat().st_mtime > TMP_MAX_AGE:
                            os.unlink(entry.path)
