"""Ground truth for image trees: unpack with umoci, snapshot a tree, compare two snapshots.

What umoci 0.4.7 (Debian bookworm's umoci 0.4.7+ds-3, running as root) does when it
unpacks layers, found by experiment here. The indexer must produce the same tree.

- Implicit parent directories (`a/b/c/f` with no `a/` entry) are made with
  MkdirAll(0777), so their mode is 0777 & ~umask of the umoci process, owner is umoci's
  (root), mtime is the time of unpacking. `umoci_unpack` runs umoci under umask 022, so the
  reference says 0755 root:root: use that for implicit parents. The rootfs directory itself
  follows the same rule unless a layer has a `./` entry, whose metadata is then applied.
- A parent directory's metadata (mode, owner, mtime, xattrs) is restored after each child
  is added or removed, so explicit directories keep the mtime of their tar header.
- A tar entry replaces what is at its path unless both are directories: a file replaces a
  whole directory tree, a directory replaces a file, and a directory entry over a symlink
  to a directory replaces the symlink with an empty directory (no --keep-dirlinks). A
  directory entry over an existing directory keeps its children but takes the new
  header's mode, owner, mtime and xattrs: xattrs the new header lacks are removed.
- Parent paths resolve through symlinks, scoped to the rootfs (securejoin): `link/f`, with
  `link -> x` or `link -> /x`, creates `x/f`. Same for whiteouts and for hard link targets
  (except the last component, so a hard link to a symlink links the symlink itself).
- Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) never remove anything the same
  layer has already created, in any order: a whiteout after a file of the same layer leaves
  the file; an opaque marker keeps the layer's own entries wherever it sits; a whiteout of
  a directory after a child was added in the same layer acts as an opaque marker. A
  whiteout placed before a same-layer entry removes the lower path and the entry is then
  created fresh. Whiteouts and opaque markers of paths that do not exist are no-ops (an
  opaque marker does not create its directory). The markers never appear in the tree.
- Hard links: linkat() to the target (which may be in a lower layer); the link header's
  own metadata (mode, owner, mtime, xattrs) is ignored, so a hard link to a setuid file
  shows the target's setuid mode. A hard link to a target that comes later in the layer
  fails the unpack.
- Metadata order: lchown, chmod (not on symlinks), clear xattrs, set xattrs, lutimes.
  So setuid/setgid bits survive (chmod after chown), security.capability survives (set
  after chown), symlink mtimes are set (including sub-second PAX mtimes, to the ns), and
  an mtime of 0 stays 0 (the epoch; only a missing mtime would mean "now").
- xattrs come from PAX `SCHILY.xattr.*` records, values byte-exact (binary, NULs: fine).
  Ignored (logged "ignoring forbidden xattr"): security.selinux, system.nfs4_acl,
  trusted.overlay.{opaque,redirect,origin,impure,nlink,upper,metacopy}. Any other
  trusted.*, security.* (capability, ima) and user.* are applied. A record with an empty
  value is dropped (Go's archive/tar treats an empty PAX value as "unset"), although
  Python's tarfile reports it as ''. user.* on a symlink fails the unpack with EPERM, so
  test images must not have that.
- Large uid/gid (PAX), devices, fifos, sticky/setgid directories: applied as given.
- umoci 0.4.7 refuses `application/vnd.oci.image.layer.v1.tar+zstd` layers
  ("blob is not correct mediatype"); `umoci_unpack` unpacks a gzip copy instead.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import subprocess
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import blake3

from bench.imagebuild import image_manifest, recompress_layout

EntryType = str  # 'reg', 'dir', 'lnk', 'chr', 'blk', 'fifo', 'sock'
_TYPES = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


def umoci_unpack(
    layout_dir: str | os.PathLike[str], tag: str, dest: str | os.PathLike[str]
) -> Path:
    """Unpack `LAYOUT:TAG` with umoci (as root) into the new directory `dest`; returns
    `dest/rootfs`. zstd images are unpacked through a gzip copy (umoci cannot read zstd)."""
    layout, dest = Path(layout_dir), Path(dest)
    manifest = image_manifest(layout, tag)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".umoci-") as scratch:
        if any(layer["mediaType"].endswith("+zstd") for layer in manifest["layers"]):
            layout = recompress_layout(layout, tag, Path(scratch) / "gzip", "gzip").layout_dir
        script = 'umask 022 && exec umoci --log error unpack --image "$1" "$2"'
        proc = subprocess.run(
            ["sh", "-c", script, "sh", f"{layout}:{tag}", str(dest)],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"umoci unpack {layout}:{tag} failed: {proc.stderr.strip()}")
    return dest / "rootfs"


@dataclass(frozen=True)
class EntryInfo:
    """Everything about one path that an image unpack defines."""

    type: EntryType
    mode: int  # stat.S_IMODE: permissions plus setuid, setgid, sticky
    uid: int
    gid: int
    size: int  # regular files only, else 0
    digest: str | None  # BLAKE3 hex of a regular file's content
    target: bytes | None  # symlink target
    rdev: int  # devices only, else 0
    xattrs: tuple[tuple[str, bytes], ...]
    mtime_ns: int | None  # None for directories: adding children changes it


@dataclass
class Tree:
    entries: dict[bytes, EntryInfo] = field(default_factory=dict)
    link_groups: set[frozenset[bytes]] = field(default_factory=set)

    def __getitem__(self, path: str | bytes) -> EntryInfo:
        return self.entries[os.fsencode(path)]

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str | bytes) and os.fsencode(path) in self.entries


def _xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
            return ()
        raise


def _file_digest(path: bytes, size: int) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if size:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            hasher.update(mm)
    return hasher.hexdigest()


def entry_info(path: bytes) -> EntryInfo:
    """Describe one path without following it if it is a symlink."""
    st = os.lstat(path)
    kind = _TYPES[stat.S_IFMT(st.st_mode)]
    is_reg = kind == "reg"
    return EntryInfo(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if is_reg else 0,
        digest=_file_digest(path, st.st_size) if is_reg else None,
        target=os.readlink(path) if kind == "lnk" else None,
        rdev=st.st_rdev if kind in ("chr", "blk") else 0,
        xattrs=_xattrs(path),
        mtime_ns=None if kind == "dir" else st.st_mtime_ns,
    )


def _walk(root: bytes) -> Iterator[bytes]:
    """Relative paths under root (root itself as b"."), never following symlinks."""
    yield b"."
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for dirent in it:
                child = os.path.join(rel, dirent.name) if rel else dirent.name
                yield child
                if dirent.is_dir(follow_symlinks=False):
                    stack.append(child)


def snapshot_tree(root: str | bytes | os.PathLike[str]) -> Tree:
    """Every path under `root` with its metadata and content digest, plus which regular
    files share an inode."""
    root_b = os.fsencode(root)
    tree = Tree()
    inodes: dict[tuple[int, int], list[bytes]] = {}
    for rel in _walk(root_b):
        full = root_b if rel == b"." else os.path.join(root_b, rel)
        info = entry_info(full)
        tree.entries[rel] = info
        if info.type == "reg":
            st = os.lstat(full)
            if st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    tree.link_groups = {frozenset(paths) for paths in inodes.values() if len(paths) > 1}
    return tree


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def _show_value(name: str, value: object) -> str:
    if name == "mode" and isinstance(value, int):
        return oct(value)
    if name == "xattrs" and isinstance(value, tuple):
        return json.dumps({k: v.decode("latin-1") for k, v in value})
    return repr(value)


def compare_trees(
    expected: Tree,
    actual: Tree,
    *,
    ignore_root: bool = False,
    ignore_fields: Collection[str] = (),
) -> list[str]:
    """Human-readable differences, one line each; [] means the trees are the same.

    `ignore_root` skips the root directory's own metadata (the mount point or unpack
    directory, not part of the image); `ignore_fields` names EntryInfo fields to skip
    everywhere (e.g. "mtime_ns").
    """
    diffs: list[str] = []
    names = [f.name for f in fields(EntryInfo) if f.name not in ignore_fields]
    for path in sorted(expected.entries.keys() | actual.entries.keys()):
        want, got = expected.entries.get(path), actual.entries.get(path)
        if got is None:
            diffs.append(f"missing: {_show(path)} ({want.type if want else '?'})")
        elif want is None:
            diffs.append(f"extra: {_show(path)} ({got.type})")
        elif want != got and not (ignore_root and path == b"."):
            for name in names:
                a, b = getattr(want, name), getattr(got, name)
                if a != b:
                    shown = f"expected {_show_value(name, a)}, got {_show_value(name, b)}"
                    diffs.append(f"{_show(path)}: {name}: {shown}")
    for group in sorted(expected.link_groups - actual.link_groups, key=sorted):
        diffs.append(f"hard links missing: {sorted(_show(p) for p in group)}")
    for group in sorted(actual.link_groups - expected.link_groups, key=sorted):
        diffs.append(f"hard links extra: {sorted(_show(p) for p in group)}")
    return diffs
