"""Which mount a path shows, by an identity the kernel does not hand to another mount, so a
daemon unmounts only what it mounted itself.

A path names whatever is mounted there now: a daemon whose mount was detached (`umount -l`
while a file stayed open) lives on until the last user closes, and by then another mount may
sit at the same path; unmounting "the mountpoint" at exit would take that one. So a daemon
records the identity of each mount it makes, and at exit unmounts a path only while the
topmost mount there still has it.

The identity is statx(2)'s unique mount id (STATX_MNT_ID_UNIQUE, Linux 6.8+), never reused
while the system runs. Older kernels give only the mount id of /proc/self/mountinfo, which
the kernel reuses as soon as the mount is freed, so it is paired with the filesystem's
device number (st_dev; for FUSE, its connection): both freed and handed to one new mount in
between is the remaining window there. statx is asked not to sync (AT_STATX_DONT_SYNC), so
the check never waits on a FUSE daemon, ours included, that is not serving.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_STATX_DONT_SYNC = 0x4000
STATX_MNT_ID = 0x1000
STATX_MNT_ID_UNIQUE = 0x4000
MNT_DETACH = 2
_STATX_SIZE = 256  # struct statx, spare fields included
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@dataclass(frozen=True)
class MountId:
    mnt_id: int
    unique: bool  # STATX_MNT_ID_UNIQUE: never reused; else paired with the device below
    dev: tuple[int, int]  # the filesystem's major:minor


def of(path: Path | str) -> MountId | None:
    """The identity of the topmost mount at `path` (or of the mount `path` lies in); None
    where it cannot be had (a kernel before 5.8 reports no mount id)."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC
    if _libc.statx(AT_FDCWD, os.fsencode(path), flags, STATX_MNT_ID | STATX_MNT_ID_UNIQUE,
                   buf) != 0:
        log.info("statx %s: %s", path, os.strerror(ctypes.get_errno()))
        return None
    raw = buf.raw
    mask = int.from_bytes(raw[0:4], "little")
    if not mask & (STATX_MNT_ID | STATX_MNT_ID_UNIQUE):
        return None
    dev = (int.from_bytes(raw[136:140], "little"), int.from_bytes(raw[140:144], "little"))
    return MountId(int.from_bytes(raw[144:152], "little"), bool(mask & STATX_MNT_ID_UNIQUE), dev)


def is_at(path: Path | str, ident: MountId) -> bool:
    """`ident` is the topmost mount at `path` (not covered, not detached, not replaced)."""
    return of(path) == ident


def unmount_own(path: Path, ident: MountId | None) -> bool:
    """Detach `path` only while the mount there is the one `ident` names; True if it did.

    Anything else there (another daemon's mount at the same path, or ours covered by
    another) is left alone: ours is then detached already, or out of reach by path, and
    the kernel ends it with its last user and our FUSE connection. Without an identity
    (the kernel gave none) nothing is unmounted either: a dead mount left behind is
    better than someone else's taken away."""
    if ident is None or not is_at(path, ident):
        log.info("%s no longer shows the mount this daemon made: leaving it", path)
        return False
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            log.warning("cannot unmount %s: %s", path, os.strerror(err))
            return False
        return True
    res = subprocess.run(["fusermount3", "-u", "-q", "-z", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        log.warning("cannot unmount %s: %s", path, res.stderr.strip())
    return res.returncode == 0
