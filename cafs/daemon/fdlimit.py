"""The process's file-descriptor limit, raised at start, and how many cache fds fit in it.

A mount keeps cache files open (each pins its blob against eviction and saves an open per
read), up to a thousand of them. A login shell's usual soft limit is 1,024, so a daemon
that kept the soft limit ran out of fds and answered reads with EIO; the hard limit (often
524,288 or more) is there to be raised to, as systemd does for services.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource

log = logging.getLogger(__name__)
FD_CACHE_MAX = 1024  # cache fds kept open at most (each pins a blob against eviction)
FD_CACHE_MIN = 16
# What a daemon needs besides cached fds: FUSE, sockets, the store's connections, worker
# pipes, files being written or hashed. Half the limit is left to them.
EXHAUSTED = (errno.EMFILE, errno.ENFILE)


def raise_to_hard() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, exc)
    elif hard == resource.RLIM_INFINITY:
        log.info("fd limit: soft %d, hard unlimited: left as it is", soft)
    return soft


def grow_table(fds: int) -> int:
    """Size the process's fd table for `fds` descriptors now; returns the table's size.

    Why: the kernel grows a process's fd table as its fds pass 64, 128, 256 … and, when
    the process has threads, waits out an RCU grace period each time (`expand_files`),
    during which every thread opening a file sleeps. A mount opening cache files as an
    image starts took 14 ms stalls on two of its first reads that way (#20's `import
    numpy` on loopback, 2026-12-04, a scheduler trace). Done at start, before the daemon
    has threads, growing costs nothing; the table (8 bytes per fd) never shrinks.
    `F_DUPFD` takes the lowest free fd at or above its argument, so no open fd is touched.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(fds, soft) - 1
    try:  # never a reason not to mount: the kernel grows the table as it goes
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if want > probe:
                os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, want))
        finally:
            os.close(probe)
    except OSError as exc:
        log.info("fd table not grown to %d: %s", want + 1, exc)
    return table_size()


def table_size() -> int:
    """The fd table's size (`FDSize` in /proc/self/status), 0 where that is not shown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("FDSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cache_size(limit: int) -> int:
    """Cache fds for a process with `limit` fds: half of them, within bounds."""
    return max(FD_CACHE_MIN, min(FD_CACHE_MAX, limit // 2))


def exhausted(exc: BaseException | None) -> bool:
    """`exc`, or what caused it, is running out of fds (EMFILE, ENFILE)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
