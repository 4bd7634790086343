"""Are two root filesystems the same? A benchmark that lets a faster contender serve a
different tree measures nothing, so after each contender the bench compares its tree with the
one overlayfs unpacked: every path's type, mode, owner, size, content (SHA-256), symlink
target, device number, xattrs and mtime (directories included, the root's own metadata not:
it is the mount point), and which paths are hard links of one another.

Two differences are known and counted rather than failed, both seen with stargz-snapshotter:
an mtime rounded down to a whole second (its eStargz TOC keeps whole seconds), and a
symlink's mode bits (it shows the tar header's, 0644, where overlayfs shows 0777; Linux never
reads a symlink's permission bits). `compare` counts entries per kind in `known`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

SECOND_NS = 1_000_000_000


@dataclass(frozen=True)
class Entry:
    kind: str  # "reg", "dir", "lnk", "chr", "blk", "fifo", "sock"
    mode: int  # permission bits with setuid, setgid, sticky
    uid: int
    gid: int
    size: int  # regular files only, else 0
    sha256: str | None  # regular files only
    target: str | None  # symlinks only
    rdev: int  # devices only
    xattrs: tuple[tuple[str, bytes], ...]
    mtime_ns: int


@dataclass
class Tree:
    entries: dict[str, Entry] = field(default_factory=dict)
    link_groups: set[frozenset[str]] = field(default_factory=set)

    @property
    def file_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())


MTIME_ROUNDED = "mtimes rounded down to whole seconds"
SYMLINK_MODE = "symlink mode bits (never read by Linux)"


@dataclass
class Comparison:
    diffs: list[str]  # one line per difference; none: the trees are the same
    known: dict[str, int]  # entries that differ only in a known way, per kind

    @property
    def same(self) -> bool:
        return not self.diffs


_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))
    except OSError:  # not supported on this file system or this file type: none
        return ()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _walk(root: str) -> Iterator[str]:
    """Relative paths below `root` ("." for itself), never following symlinks."""
    yield "."
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel)) as it:
            for dirent in it:
                child = os.path.join(rel, dirent.name)
                yield child
                if dirent.is_dir(follow_symlinks=False):
                    stack.append(child)


def snapshot(root: Path) -> Tree:
    """Every path below `root`, with its metadata and content digest."""
    tree = Tree()
    inodes: dict[tuple[int, int], list[str]] = {}
    for rel in _walk(str(root)):
        path = os.path.join(root, rel)
        st = os.lstat(path)
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        tree.entries[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "reg" else 0,
            sha256=_sha256(path) if kind == "reg" else None,
            target=os.readlink(path) if kind == "lnk" else None,
            rdev=st.st_rdev if kind in ("chr", "blk") else 0,
            xattrs=_xattrs(path),
            mtime_ns=st.st_mtime_ns,
        )
        if kind == "reg" and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    tree.link_groups = {frozenset(group) for group in inodes.values() if len(group) > 1}
    return tree


def _known(want: Entry, got: Entry) -> list[str] | None:
    """The known differences between two entries, or None if any other field differs."""
    known = []
    if got.mtime_ns != want.mtime_ns:
        if got.mtime_ns != want.mtime_ns // SECOND_NS * SECOND_NS:
            return None
        known.append(MTIME_ROUNDED)
    if got.mode != want.mode:
        if want.kind != "lnk":
            return None
        known.append(SYMLINK_MODE)
    same = want == replace(got, mtime_ns=want.mtime_ns, mode=want.mode)
    return known if same else None


def compare(expected: Tree, actual: Tree) -> Comparison:
    """What differs between two trees (the root's own metadata aside)."""
    diffs: list[str] = []
    known: dict[str, int] = {}
    names = [f.name for f in fields(Entry)]
    for path in sorted(expected.entries.keys() | actual.entries.keys()):
        want, got = expected.entries.get(path), actual.entries.get(path)
        if want is None or got is None:
            present = want or got
            assert present is not None
            diffs.append(f"{'extra' if want is None else 'missing'}: {path} ({present.kind})")
        elif path != "." and want != got:
            kinds = _known(want, got)
            for kind in kinds or []:
                known[kind] = known.get(kind, 0) + 1
            if kinds is not None:
                continue
            for name in names:
                a, b = getattr(want, name), getattr(got, name)
                if a != b:
                    diffs.append(f"{path}: {name}: expected {a!r}, got {b!r}")
    for group in sorted(expected.link_groups ^ actual.link_groups, key=sorted):
        side = "missing" if group in expected.link_groups else "extra"
        diffs.append(f"hard links {side}: {sorted(group)}")
    return Comparison(diffs, known)
