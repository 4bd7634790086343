"""Kernel-served metadata: an EROFS image of the tree under an overlayfs whose file contents
come from the FUSE mount (see indexer/erofs.py for why).

    target   overlay  ro, metacopy=on, lowerdir=META::DATA     what users see
    META     erofs    the image, from the node cache            every stat, lookup, readdir
    DATA     fuse     the cafs daemon                           only opens and reads

META and DATA are private mountpoints in the mount's state dir, detached as soon as the
overlay holds them: the overlay's references keep both alive, so unmounting the target is
all it takes to end the FUSE session (the daemon then exits as it would after
`fusermount -u`), and nothing else on the node can reach the layers. `stack` and `bind`
return the identity of the mount they put at the target (cafs/daemon/mountid.py): at exit the
daemon detaches the target only while that mount is still the one there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import TypeAlias

import blake3

from blobstore import BlobStore, StoreError, privatedir
from blobstore.cache import touch
from cafs.daemon import mountid
from indexer import erofs
from indexer.catalog import load_erofs
from indexer.format import Index

log = logging.getLogger(__name__)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MNT_DETACH = 2
SOURCE = "cafs"  # the overlay's source in the mount table, which is how we recognise it
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class KernelMetaError(OSError):
    """The kernel would not mount the stack; the caller serves through FUSE alone."""


def unsupported(setting: str = "auto") -> str | None:
    """Why this process cannot serve metadata from the kernel, or None if it can.
    `setting`: the daemon configuration's kernel_metadata (cafs/config.py)."""
    if setting not in ("auto", "off"):
        raise ValueError(f"kernel metadata must be auto or off, not {setting!r}")
    if setting == "off":
        return "turned off (kernel_metadata = off, CAFS_KERNEL_METADATA=off)"
    if os.geteuid() != 0:
        return "needs root (erofs and overlayfs mounts)"
    if not _initial_user_namespace():
        return "in a user namespace (overlayfs would not read trusted.* xattrs)"
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            known = {line.split()[-1] for line in f if line.strip()}
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    missing = {"erofs", "overlay"} - known
    if missing:
        return f"the kernel lacks {', '.join(sorted(missing))}"
    if _kernel() < (6, 5):
        return "overlayfs data-only layers need Linux 6.5 or later"
    return None


def _initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _kernel() -> tuple[int, int]:
    release = os.uname().release
    try:
        major, minor = release.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


# What `fetch` found: an image this node verified or built before (in its cache), the
# store's copy with its BLAKE3 (not yet checked against the index, which may still be
# loading), or nothing.
Fetched: TypeAlias = Path | tuple[str, bytes] | None


def image(index: Index, key: str, cache_dir: Path, store: BlobStore) -> Path:
    """The tree's EROFS image in the node cache: from the cache, the store, or built."""
    return accept(index, key, cache_dir, fetch(key, cache_dir, store))


def fetch(key: str, cache_dir: Path, store: BlobStore) -> Fetched:
    """The image from the node cache, else the store's copy where `cafs index` put one (it
    does for each image's top index). Needs no index, so a daemon runs it while the index
    loads; `accept` then decides, with the index, what is mounted."""
    path = _cached(key, cache_dir)
    if _verified(path, key):
        touch(path)  # in use: last in line for eviction
        return path
    try:
        return load_erofs(store, key)
    except StoreError as exc:
        log.warning("stored EROFS image of index %s unusable, building one: %s", key, exc)
        return None


def accept(index: Index, key: str, cache_dir: Path, fetched: Fetched) -> Path:
    """The image to mount. The kernel parses it with root's authority and serves its
    names, modes and owners to every user, so the store's copy, which anyone who can write
    the store could have replaced, is taken only if the verified index records its digest;
    else the image is built here from the index itself (deterministic)."""
    if isinstance(fetched, Path):
        return fetched
    if fetched is not None:
        found, data = fetched
        expected = erofs.recorded(index)
        if found == expected:
            path = _cached(key, cache_dir)
            _save(path, data, key)
            return path
        if expected is None:
            log.info("index %s records no EROFS image digest (indexed by an older cafs): "
                     "not using the stored image", key)
        else:
            log.warning("stored EROFS image of index %s is not the one its index records "
                        "(%s, not %s): not using it", key, found, expected)
    return build(index, key, cache_dir)


def build(index: Index, key: str, cache_dir: Path) -> Path:
    """Build the image here (deterministic, so any mount may) and keep it in the cache."""
    started = time.monotonic()
    data = erofs.build(index)
    log.info("built the EROFS image of index %s: %d inodes in %.0f ms", key,
             index.inode_count, 1000 * (time.monotonic() - started))
    path = _cached(key, cache_dir)
    _save(path, data, key)
    return path


def _cached(key: str, cache_dir: Path) -> Path:
    return cache_dir / "erofs" / f"{key}.v{erofs.VERSION}"


def _seal(data: bytes | memoryview, key: str) -> bytes:
    """The cached image's trailer: its BLAKE3 keyed with the index key. Only images this
    code accepted or built carry it; one cached by a cafs that mounted the store's copy
    unchecked has a plain BLAKE3 there, fails the check and is fetched or built anew."""
    return blake3.blake3(data, key=bytes.fromhex(key), max_threads=blake3.blake3.AUTO).digest()


def _verified(path: Path, key: str) -> bool:
    """The cached image ends with its seal, checked on every use: files are not synced
    when written (an fsync waited behind a busy disk's other writes), so one torn by a
    crash is refetched rather than mounted. The kernel ignores the trailer: the
    superblock gives the image's size."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if len(data) > 32 and _seal(memoryview(data)[:-32], key) == data[-32:]:
        return True
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def _save(path: Path, data: bytes, key: str) -> None:
    """Written under a temporary name and renamed, so it appears whole, with its seal."""
    privatedir.ensure(path.parent.parent)  # the node cache
    path.parent.mkdir(mode=privatedir.DIR_MODE, exist_ok=True)
    tmp = privatedir.temp_name(path)
    try:
        with os.fdopen(privatedir.create(tmp), "wb") as f:
            f.write(data)
            f.write(_seal(data, key))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _mount(source: str, target: Path, fstype: str, flags: int, options: str | None) -> None:
    data = options.encode() if options is not None else None
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data) != 0:
        err = ctypes.get_errno()
        raise KernelMetaError(err, f"mount -t {fstype} at {target}: {os.strerror(err)}")


def _flags(suid_dev: bool) -> int:
    """Read-only, and nosuid,nodev unless asked (see the FUSE mount's options in daemon.py)."""
    return MS_RDONLY if suid_dev else MS_RDONLY | MS_NOSUID | MS_NODEV


def _mount_erofs(img: Path, target: Path, suid_dev: bool) -> None:
    """File-backed (Linux 6.12+), else through a loop device as mount(8) sets one up."""
    try:
        _mount(str(img), target, "erofs", _flags(suid_dev), None)
    except KernelMetaError:
        opts = "ro" if suid_dev else "ro,nosuid,nodev"
        res = subprocess.run(["mount", "-t", "erofs", "-o", opts, str(img), str(target)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise KernelMetaError(f"cannot mount the EROFS image {img}: "
                                  f"{res.stderr.strip()}") from None


def _detach(path: Path) -> None:
    _libc.umount2(os.fsencode(path), MNT_DETACH)


def stack(img: Path, data_dir: Path, meta_dir: Path, target: Path,
          suid_dev: bool = False) -> mountid.MountId | None:
    """Mount the image at `meta_dir`, the overlay at `target`, then detach both layers;
    returns the overlay's identity. `suid_dev`: without nosuid,nodev."""
    for path in (data_dir, meta_dir):
        if any(c in str(path) for c in ",:\\"):
            raise KernelMetaError(f"{path}: overlayfs cannot take ',', ':' or '\\' here")
    meta_dir.mkdir(parents=True, exist_ok=True)
    _mount_erofs(img, meta_dir, suid_dev)
    try:
        _mount(SOURCE, target, "overlay", _flags(suid_dev),
               f"ro,metacopy=on,lowerdir={meta_dir}::{data_dir}")
        ident = mountid.of(target)
    finally:
        _detach(meta_dir)
    _detach(data_dir)
    return ident


def bind(data_dir: Path, target: Path) -> mountid.MountId | None:
    """The fallback where the kernel refused the stack: the FUSE mount itself, moved to the
    target by a bind mount (which works whatever the mount propagation); the bind keeps
    the FUSE mount's nosuid,nodev."""
    _mount(str(data_dir), target, "none", MS_BIND, None)
    ident = mountid.of(target)
    _detach(data_dir)
    return ident

