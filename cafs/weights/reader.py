"""Where the weight loader's bytes come from: plain files, or a cafs mount's node cache.

Through FUSE every 128 KiB read is a round trip into the mount daemon; the node-cache
files behind a path hold the same bytes. When the path is on a cafs mount whose control
socket answers `locate`, whole chunks are read straight from the cache files (pinned
against eviction with a shared flock, as the daemon does, and verified against their
BLAKE3 key); anything not cached yet, or not matching, is read through the mount, which
fetches it. The mount is also asked to prefetch the files, so that what the loader reads
next is already on its way at the mount's full parallelism.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import blake3

from blobstore.cache import blob_path, open_pinned, verified_since_boot
from blobstore.envelope import digest
from cafs.mounts import mount, mountinfo

log = logging.getLogger(__name__)
REFRESH_SECONDS = 0.05  # at most this often, ask the daemon again which chunks it verified
IOV_MAX = 1024  # buffers one preadv may take (Linux's UIO_MAXIOV)


class Reader(Protocol):
    direct_bytes: int

    def align(self, window: int) -> int: ...

    def has(self, offset: int, length: int) -> bool:
        """Whether these bytes can be read now without waiting on the store."""
        ...

    def wait(self, offset: int, length: int) -> None:
        """Return once these bytes are here, as far as waiting can tell."""
        ...

    def readinto(self, bufs: Sequence[memoryview], offset: int) -> None: ...

    def close(self) -> None: ...


class FileReader:
    """Positional reads of one file, from any number of threads."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.direct_bytes = 0

    def align(self, window: int) -> int:
        return window

    def has(self, offset: int, length: int) -> bool:
        return True

    def wait(self, offset: int, length: int) -> None:
        return None

    def readinto(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill `bufs`, in order, with the bytes from `offset` on."""
        if not fill(self.fd, bufs, offset):
            raise ValueError(f"{self.path} ends before {offset + total(bufs)}, before its "
                             "tensors do")

    def close(self) -> None:
        os.close(self.fd)


class CachedReader(FileReader):
    """Whole chunks from node-cache files when they are there and verify; else the mount.

    With `wait` (the mount is prefetching the file), a chunk not cached yet is first asked
    of the mount with a one-byte read, which returns once the daemon has it (fetched now, or
    by the prefetch already on it); the chunk is then read from its cache file too, rather
    than through FUSE, a round trip into the daemon's Python per request (1 MiB here).
    """

    def __init__(self, path: Path, size: int, located: dict[str, Any], *,
                 where: tuple[Path, str] | None = None, wait: bool = False) -> None:
        super().__init__(path, size)
        self.chunk = int(located["chunk_size"])
        self.blobs: list[str] = located["blobs"]
        # Chunks the daemon has checked against their key: it serves those files as they
        # are, so hashing them again here would only repeat its work.
        self.trusted: set[str] = set()
        self._trust(located)
        self.cache = Path(located["cache"])
        self.where = where
        self._lock = threading.Lock()
        self._asked = time.monotonic()
        self.touch_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if wait else None
        if self.touch_fd is not None:  # no readahead: a touch must not pull 4 MiB via FUSE
            os.posix_fadvise(self.touch_fd, 0, 0, os.POSIX_FADV_RANDOM)

    def _trust(self, located: dict[str, Any]) -> None:
        if located.get("blobs") == self.blobs:
            self.trusted |= {k for k, ok in zip(self.blobs, located.get("verified", []),
                                                strict=False) if ok}

    def align(self, window: int) -> int:
        return max(self.chunk, window // self.chunk * self.chunk)

    def has(self, offset: int, length: int) -> bool:
        """Every whole chunk of these bytes has its cache file (where the mount prefetches
        the file; else reads do not wait on it and are done at once)."""
        if self.touch_fd is None:
            return True
        return all(os.path.exists(blob_path(self.cache, self.blobs[ci]))
                   for ci in self._whole_chunks(offset, length))

    def wait(self, offset: int, length: int) -> None:
        for ci in self._whole_chunks(offset, length):
            if not os.path.exists(blob_path(self.cache, self.blobs[ci])):
                self._touch(ci * self.chunk)

    def _whole_chunks(self, offset: int, length: int) -> list[int]:
        """The chunks lying whole within these bytes (the ones read from cache files)."""
        end = offset + length
        return [ci for ci in range(offset // self.chunk, -(-end // self.chunk))
                if ci * self.chunk >= offset and min((ci + 1) * self.chunk, self.size) <= end]

    def readinto(self, bufs: Sequence[memoryview], offset: int) -> None:
        rest, at, end = list(bufs), offset, offset + total(bufs)
        while at < end:
            ci = at // self.chunk
            start = ci * self.chunk
            clen = min(self.chunk, self.size - start)
            take = min(end - at, start + clen - at)
            piece, rest = split(rest, take)
            if not (at == start and take == clen and self._whole_chunk(ci, piece)):
                super().readinto(piece, at)
            at += take

    def _whole_chunk(self, ci: int, piece: list[memoryview]) -> bool:
        key = self.blobs[ci]
        if self._from_cache(key, piece):
            return True
        return self._touch(ci * self.chunk) and self._from_cache(key, piece)

    def _touch(self, offset: int) -> bool:
        """Have the mount bring the chunk at `offset` into the node cache (False: it could
        not, or we do not wait): one byte read through a descriptor without readahead."""
        if self.touch_fd is None:
            return False
        try:
            return len(os.pread(self.touch_fd, 1, offset)) == 1
        except OSError:
            return False  # the read through the mount says why

    def _from_cache(self, key: str, piece: list[memoryview]) -> bool:
        try:
            pinned = open_pinned(blob_path(self.cache, key))
        except OSError:
            return False
        if pinned is None:
            return False
        fd, st = pinned
        size = total(piece)
        try:
            if st.st_size != size or not fill(fd, piece, 0):
                return False
            # After the read: a change to the file since its record moves its ctime.
            recorded = verified_since_boot(self.cache, key, fd)
        finally:
            os.close(fd)
        if not recorded and not self._trusted(key) and digest_of(piece) != key:
            log.warning("node-cache file of blob %s does not match its key: read via the "
                        "mount instead", key)
            return False
        with self._lock:
            self.direct_bytes += size
        return True

    def _trusted(self, key: str) -> bool:
        """Verified by the daemon: asked again (at most every REFRESH_SECONDS, the answer
        lists every chunk of the file) when a chunk arrived after the last answer."""
        if key in self.trusted or self.where is None:
            return key in self.trusted
        with self._lock:
            if time.monotonic() - self._asked < REFRESH_SECONDS:
                return False
            self._asked = time.monotonic()
        located = _ask(self.where[0], "locate", path=self.where[1])
        if located is not None:
            with self._lock:
                self._trust(located)
        return key in self.trusted

    def close(self) -> None:
        super().close()
        if self.touch_fd is not None:
            os.close(self.touch_fd)


def total(bufs: Sequence[memoryview]) -> int:
    return sum(len(b) for b in bufs)


def split(bufs: Sequence[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first `n` bytes of a list of buffers, and the rest, as two lists of views."""
    head: list[memoryview] = []
    for i, b in enumerate(bufs):
        if n <= 0:
            return head, list(bufs[i:])
        if len(b) > n:
            return [*head, b[:n]], [b[n:], *bufs[i + 1:]]
        head.append(b)
        n -= len(b)
    return head, []


def fill(fd: int, bufs: Sequence[memoryview], offset: int) -> bool:
    """Read into `bufs`, in order, from `offset` on: one scattered read per IOV_MAX buffers
    (each straight into its destination, a tensor's memory, with no copy between); False
    if the file ends first."""
    rest = [b for b in bufs if len(b)]
    while rest:
        n = os.preadv(fd, rest[:IOV_MAX], offset)
        if n == 0:
            return False
        offset += n
        _, rest = split(rest, n)
    return True


def digest_of(bufs: Sequence[memoryview]) -> str:
    """BLAKE3 hex digest of the buffers' bytes in order, as `digest` of them joined."""
    if len(bufs) == 1:
        return digest(bufs[0])
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if total(bufs) >= 1 << 20 else 1)
    for b in bufs:
        hasher.update(b)
    return hasher.hexdigest()


def mount_of(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(cafs mountpoint, path inside the image) for a path on a cafs FUSE mount."""
    real = os.path.realpath(path)
    best = ""
    for entry in mountinfo.mounts():
        mp = entry.mountpoint.rstrip("/") or "/"
        if mountinfo.is_cafs_entry(entry) and (real == mp or real.startswith(mp + "/")):
            best = mp if len(mp) > len(best) else best
    if not best:
        return None
    return Path(best), os.path.relpath(real, best)


def _ask(mnt: Path, op: str, **args: Any) -> dict[str, Any] | None:
    """The mount's answer; None where it gives none (the caller reads through FUSE)."""
    try:
        answer = mount.query(mnt, op, **args)
    except (mount.MountError, ValueError) as exc:
        log.debug("cafs mount %s did not answer %r: %s", mnt, op, exc)
        return None
    return answer if isinstance(answer, dict) else None


def open_reader(path: Path, size: int, direct: bool, wait: bool = False) -> Reader:
    """Cache files behind a cafs mount's path where `direct`, else the path itself; `wait`:
    the mount prefetches this file, so a chunk not cached yet is waited for, not read
    through FUSE."""
    where = mount_of(path) if direct else None
    located = _ask(where[0], "locate", path=where[1]) if where else None
    if located is not None and int(located["size"]) == size:
        return CachedReader(path, size, located, where=where, wait=wait)
    return FileReader(path, size)


def request_prefetch(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """Ask the mounts holding these paths to fetch them now; (mountpoint, plan) queued."""
    queued = []
    for path in paths:
        where = mount_of(path)
        if where is None:
            continue
        answer = _ask(where[0], "prefetch-path", path=where[1])
        if answer is not None and answer.get("plan"):
            queued.append((where[0], str(answer["plan"])))
    return queued


def plan_progress(queued: list[tuple[Path, str]]) -> tuple[int, int, bool]:
    """(bytes done, bytes planned, all finished) of plans queued by `request_prefetch`."""
    done = total = 0
    finished = True
    for mnt in {m for m, _ in queued}:
        names = {n for m, n in queued if m == mnt}
        state = _ask(mnt, "prefetch") or {"plans": []}
        for plan in state["plans"]:
            if plan["name"] in names:
                total += plan["bytes"]
                done += plan["done_bytes"] + _cached_bytes(plan)
                finished = finished and plan["state"] not in ("queued", "running")
    return done, total, finished


def _cached_bytes(plan: dict[str, Any]) -> int:
    """Plans count cached blobs, not bytes: when a plan is over, everything is in."""
    if plan["state"] == "done":
        return max(0, plan["bytes"] - plan["done_bytes"])
    return 0

