"""Having the kernel read a whole cache file into the page cache ahead of its readers.

posix_fadvise(WILLNEED) reads at most max(the disk's read_ahead_kb, its max_sectors_kb) per
call (mm/readahead.c, force_page_cache_ra, caps the request) and silently drops the rest.
This machine's disk allows 8 MiB, so one call covered a 4 MiB chunk; on a disk left at the
kernel's default 128 KiB readahead a call brought in only a chunk's first 128 KiB (measured
on a loop device: 32 of 1,024 pages), and every readahead the mount gave was mostly lost.
So the advice is given window by window, each no larger than that cap.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 128 << 10  # the kernel's default readahead, for files on no block device
SYSFS_BLOCK = Path("/sys/dev/block")
_windows: dict[int, int] = {}  # st_dev -> bytes one WILLNEED call reads at most


def device_window(dev: int, sysfs: Path = SYSFS_BLOCK) -> int:
    """The most one WILLNEED call reads on this device. A partition has no queue of its
    own: its disk's (the directory above, through the sysfs link) is the one that counts.
    Filesystems on no single block device (btrfs, overlay, tmpfs) get the kernel default."""
    node = sysfs / f"{os.major(dev)}:{os.minor(dev)}"
    for queue in (node / "queue", node / ".." / "queue"):
        try:
            kib = max(int((queue / name).read_text())
                      for name in ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        return max(kib << 10, 4096)
    return DEFAULT_WINDOW


def window(fd: int) -> int:
    return _window(os.fstat(fd).st_dev)


def _window(dev: int) -> int:
    size = _windows.get(dev)
    if size is None:
        size = _windows[dev] = device_window(dev)
    return size


def willneed(fd: int, pos: int = 0, end: int | None = None) -> None:
    """Ask the kernel to read [pos, end) of the file (to its end by default) into the page
    cache. Blocks while the disk's request queue is full: call it from a thread. Advice
    only: where the filesystem refuses it, the reads that follow read the disk themselves,
    so a refusal is no reason to fail a read."""
    try:
        st = os.fstat(fd)
        end = st.st_size if end is None else end
        step = _window(st.st_dev)
        while pos < end:
            length = min(step, end - pos)
            os.posix_fadvise(fd, pos, length, os.POSIX_FADV_WILLNEED)
            pos += length
    except OSError as exc:
        log.debug("readahead advice refused: %s", exc)
