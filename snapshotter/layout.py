"""The snapshotter root on disk, and the mounts containerd is told to make from it.

    ROOT/metadata.db              sqlite state (metastore.py)
    ROOT/snapshots/<id>/fs        upper dir, or a remote snapshot's FUSE mountpoint
    ROOT/snapshots/<id>/work      overlayfs workdir (active snapshots only)
    ROOT/snapshots/<id>/mount.log a remote snapshot's FUSE daemon log

Every layer lives under one root because containerd shortens long `lowerdir=` lists by
their common prefix. The mount rules are those of containerd's overlayfs snapshotter, with
one cafs rule on top: a remote snapshot is a flattened tree of its whole chain, so a lower
list ends at the nearest remote ancestor (stacking an older flattened tree beneath it would
bring back files a later layer deleted).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blobstore import privatedir
from snapshotter.metastore import Kind
from snapshotter.remote import mounts_under

log = logging.getLogger(__name__)

OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))  # as the kernel mount table spells it
        self.db_path = self.root / "metadata.db"
        self.snapshots_dir = self.root / "snapshots"

    def create(self) -> None:
        """The root is private, as containerd keeps its own (blobstore/privatedir.py): a
        snapshot's upper dir is a container's root, setuid binaries and all."""
        privatedir.ensure(self.root)
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)

    def dir(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id)

    def fs(self, snapshot_id: int) -> Path:
        return self.dir(snapshot_id) / "fs"

    def work(self, snapshot_id: int) -> Path:
        return self.dir(snapshot_id) / "work"

    def create_dirs(self, snapshot_id: int, *, work: bool) -> None:
        """Modes as containerd's overlayfs: the fs dir becomes the container's root dir."""
        self.dir(snapshot_id).mkdir(mode=0o700, exist_ok=True)
        self.fs(snapshot_id).mkdir(mode=0o755, exist_ok=True)
        if work:
            self.work(snapshot_id).mkdir(mode=0o711, exist_ok=True)

    def snapshot_ids_on_disk(self) -> list[int]:
        """Ids of the directories under snapshots/; names that are not ids are not ours."""
        try:
            names = os.listdir(self.snapshots_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if n.isdigit())


def overlay_index_off() -> bool:
    """containerd passes index=off whenever the kernel knows the option: with the index on,
    overlayfs refuses to remount an upper dir against a different set of lowers."""
    return OVERLAY_INDEX_PARAM.exists()


def mounts_for(
    kind: Kind, fs: Path, work: Path, lowers: Sequence[Path], *, index_off: bool
) -> list[Mount]:
    """containerd overlayfs's mount rules; `lowers` is nearest first."""
    if not lowers:
        flag = "ro" if kind == Kind.VIEW else "rw"
        return [Mount("bind", str(fs), (flag, "rbind"))]
    options = ["index=off"] if index_off else []
    if kind == Kind.ACTIVE:
        options += [f"workdir={work}", f"upperdir={fs}"]
    elif len(lowers) == 1:
        return [Mount("bind", str(lowers[0]), ("ro", "rbind"))]
    options.append("lowerdir=" + ":".join(str(p) for p in lowers))
    return [Mount("overlay", "overlay", tuple(options))]


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) as containerd's fs.DiskUsage: allocated blocks, hard links once.

    Stays on the starting filesystem: a mount inside an upper dir is not the snapshot's.
    """
    try:
        root = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    seen = {(root.st_dev, root.st_ino)}
    size = root.st_blocks * 512
    stack = [os.fspath(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode) and st.st_dev == root.st_dev:
                stack.append(entry.path)
    return size, len(seen)


def remove_tree(path: Path) -> bool:
    """Delete a snapshot directory unless anything is still mounted inside it.

    shutil.rmtree descends into mountpoints, so deleting a directory with a live mount in it
    would delete the mounted filesystem's files. Returns False when the tree was kept.
    """
    if not path.exists():
        return True
    inside = mounts_under(path)
    if inside:
        log.warning("keeping %s: still mounted inside: %s", path, ", ".join(map(str, inside)))
        return False
    errors: list[str] = []

    def record(_func: object, failed: str, exc_info: tuple[type, BaseException, object]) -> None:
        errors.append(f"{failed}: {exc_info[1]}")

    shutil.rmtree(path, onerror=record)
    if errors:
        log.warning("could not fully remove %s: %s", path, "; ".join(errors[:3]))
        return False
    return True
