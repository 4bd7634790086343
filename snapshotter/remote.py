"""Remote snapshots' filesystems: the mounter interface and the kernel mount table.

A remote snapshot's `fs` directory is the mountpoint of a cafs FUSE daemon serving the chain's
flattened tree. The daemons are separate, detached processes so that restarting the
snapshotter never breaks a running container; the snapshotter only ever needs to ask "is it
live?", "mount it" and "unmount it".

Unmounting is always a plain umount(2), never a kill: overlayfs holds its own private clone
of each lower mount, so unmounting the visible mountpoint of a lower still used by a running
container succeeds while the container keeps reading through its overlay, and the FUSE
daemon exits by itself once the last user of its superblock is gone. Only a direct user (an
open file or a cwd on the mountpoint itself) makes umount fail with EBUSY, and then the mount
is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from blobstore import BlobStore, open_store
from cafs.config import Config
from cafs.config import load as load_config
from cafs.mounts import mountinfo
from cafs.mounts.mount import process_exited
from cafs.paths import canonical
from snapshotter.errors import MountBusy

log = logging.getLogger(__name__)

MNT_DETACH = 2
WARM_FOR = 600.0  # seconds a pull's resolution of a chain's index is used for its mounts
# Not ctypes.util.find_library: it forks ldconfig, at import, in every cafs command.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class RemoteMounter(Protocol):
    """What the snapshotter needs from the FUSE side; faked in unit tests."""

    def can_serve(self, chain_id: str) -> bool:
        """True if the store holds an index for this chain (so no layer need be fetched)."""
        ...

    def mount(self, chain_id: str, mountpoint: Path, labels: Mapping[str, str]) -> int:
        """Mount the chain's flattened tree on `mountpoint`; return the daemon's pid."""
        ...

    def is_mounted(self, mountpoint: Path) -> bool:
        """True only if a live filesystem answers at `mountpoint`."""
        ...

    def unmount(self, mountpoint: Path) -> None:
        """Unmount, or raise MountBusy and leave the mount as it is."""
        ...


def mountpoints() -> list[Path]:
    """Mountpoints of this mount namespace, from /proc/self/mountinfo."""
    return [Path(entry.mountpoint) for entry in mountinfo.mounts()]


def is_mountpoint(path: Path) -> bool:
    return canonical(path) in mountpoints()


def mounts_under(path: Path) -> list[Path]:
    """Mountpoints at or below `path`; deleting a tree with one inside would delete into it."""
    base = canonical(path)
    return [m for m in mountpoints() if m == base or base in m.parents]


def umount(path: Path, *, lazy: bool = False) -> None:
    """umount2(2); a path that is not mounted is fine; EBUSY raises MountBusy."""
    flags = MNT_DETACH if lazy else 0
    if _libc.umount2(os.fsencode(path), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if err == errno.EBUSY:
        raise MountBusy(f"{path} is in use")
    raise OSError(err, f"umount {path}: {os.strerror(err)}")


def is_live(path: Path) -> bool:
    """Mounted and answering: a FUSE mount whose daemon died fails statfs with ENOTCONN."""
    if not is_mountpoint(path):
        return False
    try:
        os.statvfs(path)
    except OSError as exc:
        log.warning("mount at %s is dead: %s", path, exc.strerror)
        return False
    return True


class ChainLookup(Protocol):
    def has_chain(self, chain_id: str) -> bool: ...


def daemon_alive(pid: int, mountpoint: Path) -> bool:
    """The process exists, is not a zombie, and is the one serving `mountpoint` (a reused
    pid is not). A daemon whose parent died is reparented to an init that may never reap
    it, so a zombie must count as dead; our own exited children are reaped on the way."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    if process_exited(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = b" " + f.read().replace(b"\0", b" ").rstrip(b" ") + b" "
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A daemon forked by a mount server shows its arguments as one title, spaces between.
    return b" %s " % os.fsencode(canonical(mountpoint)) in cmdline


class CafsMounter:
    """The real mounter: one detached `cafs.mounts.mount` daemon per remote snapshot.

    `cafs.mounts.mount` is imported on first use so the snapshotter (and its tests) load without the
    FUSE stack. A daemon's log goes beside its mountpoint, so it is deleted with the snapshot.
    Liveness is judged by the kernel mount table and the daemon's pid, not by a stat of the
    mountpoint, which would hang on a daemon that is stopped rather than dead.
    """

    def __init__(self, catalog: ChainLookup, store_url: str, cache_dir: Path | None = None,
                 settings: Config | None = None):
        self.catalog = catalog
        self.store_url = store_url
        self.cache_dir = cache_dir
        # The file and CAFS_* as the snapshotter started with them: every daemon it starts
        # resolves its configuration from these (cache size, fetch deadline ...) and the
        # snapshotter's own flags (store, cache dir), not from defaults of its own.
        self.settings = settings if settings is not None else load_config()
        self._children: set[int] = set()
        self._store: BlobStore | None = None
        self._warmed: dict[str, tuple[str, float]] = {}  # chain id -> (index key, when)
        self._warm_lock = threading.Lock()

    def can_serve(self, chain_id: str) -> bool:
        try:
            return self.catalog.has_chain(chain_id)
        except Exception as exc:  # a store outage must fall back to a normal unpack
            log.warning("cannot ask the store about %s: %s; not serving it remotely", chain_id, exc)
            return False

    def mount(self, chain_id: str, mountpoint: Path, labels: Mapping[str, str]) -> int:
        cafs_mount = importlib.import_module("cafs.mounts.mount")
        if is_mountpoint(mountpoint):
            # A dead daemon's mount: detach it (users keep their reference) and mount anew.
            umount(mountpoint, lazy=True)
        pid: int = cafs_mount.mount_detached(
            self._source(chain_id),
            mountpoint,
            store_url=self.store_url,
            cache_dir=self.cache_dir,
            log_file=mountpoint.parent / "mount.log",
            settings=self.settings,
            # Under the snapshotter's root, which only root can reach (Layout.create), as
            # containerd's own snapshots are: setuid binaries and devices behave as they do
            # with overlayfs, also where a read-only view is this mount itself, not an overlay.
            suid_dev=True,
        )
        self._children.add(pid)
        return pid

    def _source(self, chain_id: str) -> str:
        """What the daemon mounts: the index a pull just resolved for the chain (verified
        against its key wherever it is read), so that a daemon whose index and EROFS image
        are in the node cache touches the store only once it is ready; else the chain,
        resolved by the daemon. Measured: resolving the chain cost a fresh daemon its S3
        client (~35 ms of CPU) and a GET before ready."""
        warmed = self._warmed.get(chain_id)
        if warmed is not None and time.monotonic() - warmed[1] < WARM_FOR:
            return f"index:{warmed[0]}"
        return f"chain:{chain_id}"

    def _store_client(self) -> BlobStore:
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    def warm(self, chain_id: str) -> None:
        """Bring the chain's index (and EROFS image) into the node cache now (a pull
        announces a run), so the daemon that mounts it later reads them from disk instead of
        the store."""
        try:
            resolve = importlib.import_module("cafs.resolve")
            paths = importlib.import_module("cafs.paths")
            store = self._store_client()
            cache_dir = self.cache_dir or paths.cache_dir()
            index, key = resolve.load_mount_index(store, f"chain:{chain_id}", cache_dir)
            now = time.monotonic()
            with self._warm_lock:  # pulls warm in threads of their own
                for old in [c for c, (_, t) in self._warmed.items() if now - t >= WARM_FOR]:
                    del self._warmed[old]
                self._warmed[chain_id] = (key, now)
            kernelmeta = importlib.import_module("cafs.daemon.kernelmeta")
            # and its EROFS image, where one is used
            if kernelmeta.unsupported(self.settings.get("mount.kernel_metadata")) is None:
                kernelmeta.image(index, key, cache_dir, store)
        except Exception as exc:  # only an optimisation: the mount fetches it anyway
            log.info("index of chain %s not cached ahead: %s", chain_id, exc)

    def reap(self) -> None:
        """Collect daemons we started that have exited (after their last user unmounted),
        so a long-lived snapshotter does not pile up zombies. Only our own children, by pid."""
        for pid in list(self._children):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True
            if done:
                self._children.discard(pid)

    def is_mounted(self, mountpoint: Path) -> bool:
        cafs_mount = importlib.import_module("cafs.mounts.mount")
        if not cafs_mount.is_mounted(mountpoint):
            return False
        pid = cafs_mount.daemon_pid(mountpoint)
        if pid is None:  # no pid file: fall back to asking the filesystem itself
            return is_live(mountpoint)
        if not daemon_alive(pid, mountpoint):
            log.warning("cafs daemon %d serving %s is gone", pid, mountpoint)
            return False
        return True

    def unmount(self, mountpoint: Path) -> None:
        """A plain umount, not cafs.mounts.mount.unmount: that waits for the daemon to exit, which
        it rightly does not while an overlay above still reads through it."""
        for _ in range(8):  # a dead mount may have been covered by a fresh one
            if not is_mountpoint(mountpoint):
                return
            umount(mountpoint)
