"""What is mounted where, from /proc/self/mountinfo (never by stat-ing a mountpoint, which
would hang on a FUSE daemon that is not serving)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ESC = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESC.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    major: int
    minor: int


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            major, minor = fields[2].split(":")
            out.append(MountEntry(_unescape(fields[4]), rfields[0],
                                  _unescape(rfields[1]) if len(rfields) > 1 else "",
                                  int(major), int(minor)))
    return out


def find(mountpoint: str | Path) -> MountEntry | None:
    """The topmost mount at this path, if any."""
    p = os.path.abspath(mountpoint)
    target = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def is_cafs_entry(entry: MountEntry) -> bool:
    """A cafs FUSE mount, or the overlay that serves a cafs mount's metadata from the
    kernel (cafs/daemon/kernelmeta.py), whose source is "cafs"."""
    return entry.fstype == "fuse.cafs" or (entry.fstype == "overlay" and entry.source == "cafs")


def cafs_mountpoints() -> list[str]:
    return [entry.mountpoint for entry in mounts() if is_cafs_entry(entry)]


def is_cafs(mountpoint: str | Path) -> bool:
    entry = find(mountpoint)
    return entry is not None and is_cafs_entry(entry)
