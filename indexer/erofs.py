"""An image's metadata as an EROFS filesystem image, for the kernel to serve.

A fresh walk of a FUSE mount costs two daemon round trips per directory; on the machines we
measured even a do-nothing C daemon made a walk 3-5x slower than a plain unpack (see
docs/ARCHITECTURE.md). So, as composefs does, the tree's metadata goes into a small EROFS
image the kernel mounts itself, stacked under an overlayfs whose regular files are
"metacopy" entries redirecting, on first open, to the same path in the FUSE mount, which
then only ever serves file contents (a data-only lower layer, Linux 6.5+).

The writer is deterministic: the same index always gives the same bytes, so an image is
stored and cached under its index's key (`cafs index` stores one; cafs/daemon/kernelmeta.py). The
kernel parses the image with root's authority, so a node mounts a stored one only if the
verified index records its digest (`record`): the image depends on the tree alone, never
on that record, so the digest can live in the index it describes.
The layout follows the kernel's `fs/erofs/erofs_fs.h`: 4 KiB blocks, one 64-byte
("extended") inode per index inode (full 32-bit ids and per-file mtimes), inline xattrs,
directories and symlinks packed after their inode when they fit in its block, regular
files chunk-based with nothing but holes.
The format is specified in docs/FORMAT.md.
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from blobstore.envelope import digest
from indexer.format import ROOT_INO, Index, Inode

VERSION = 1  # of what this module writes; part of the node-cache file name
RECORD = "erofs"  # the index meta key that records the image's digest
BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
INCOMPAT_CHUNKED_FILE = 0x4
FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED = 0, 2, 4
NULL_ADDR = 0xFFFFFFFF
MAX_CHUNK_BITS = 31  # chunk blkbits field: 5 bits

SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB3xIQ8x")
INODE = struct.Struct("<HHHHQIIIIqII16x")  # erofs_inode_extended, 64 bytes
XATTR_HEADER = struct.Struct("<IB7x")  # erofs_xattr_ibody_header, 12 bytes
XATTR_ENTRY = struct.Struct("<BBH")
DIRENT = struct.Struct("<QHBx")
assert SUPER.size == 128 and INODE.size == 64 and DIRENT.size == 12

# Longest prefixes first: "system.posix_acl_access" names have an empty suffix.
PREFIXES = (
    (b"system.posix_acl_default", 3),
    (b"system.posix_acl_access", 2),
    (b"security.", 6),
    (b"trusted.", 4),
    (b"user.", 1),
)
FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
              stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}


class Unrepresentable(ValueError):
    """The image holds something this representation cannot carry faithfully (the mount
    then serves its metadata through FUSE instead)."""


@dataclass(slots=True)
class _Inode:
    ino: int
    mode: int
    layout: int = FLAT_PLAIN
    xattrs: bytes = b""  # the whole inline xattr body, header included
    tail: bytes = b""  # a symlink's target
    blocks: int = 0  # data blocks outside the metadata area
    chunk_bits: int = 0
    chunks: int = 0
    nid: int = 0
    start_block: int = 0
    size: int = 0
    entries: list[tuple[bytes, int]] = field(default_factory=list)  # dirs: (name, ino)
    splits: list[int] = field(default_factory=list)  # dirs: where blocks begin, and the end


def build(index: Index) -> bytes:
    """The EROFS image of `index`'s tree; raises Unrepresentable."""
    recs = [index.inode(ino) for ino in range(1, index.inode_count + 1)]
    nodes = _plan(index, recs)
    meta_end = _place(nodes)
    data_start = -(-meta_end // BLOCK)
    total = data_start
    for node in nodes:
        if node.blocks:
            node.start_block, total = total, total + node.blocks
    out = bytearray(total * BLOCK)
    nids = [0] + [n.nid for n in nodes]
    ftypes = [0] + [FILE_TYPES.get(stat.S_IFMT(r.mode), 0) for r in recs]
    for node, rec in zip(nodes, recs, strict=True):
        _write(out, rec, node, nids, ftypes)
    uuid = (index.meta.get("chain") or "").encode()[:16].ljust(16, b"\0")
    out[_METACOPY_AT:_METACOPY_AT + len(_METACOPY)] = _METACOPY
    out[SUPER_OFFSET:SUPER_OFFSET + SUPER.size] = SUPER.pack(
        MAGIC, 0, 0, BLOCK_BITS, 0, nids[ROOT_INO], len(nodes), 0, 0, total, 0, 0,
        uuid, b"cafs", INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    return bytes(out)


def record(image: bytes) -> dict[str, Any]:
    """What a top index's meta says of its EROFS image (docs/FORMAT.md): which writer made
    it and its BLAKE3, so that a node mounts a stored image only if it is this one."""
    return {RECORD: {"version": VERSION, "blake3": digest(image)}}


def recorded(index: Index) -> str | None:
    """The BLAKE3 `index` records for the image this writer makes of it; None where it
    records none (indexed before the record existed, a lower chain, another version)."""
    entry = index.meta.get(RECORD)
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        return None
    value = entry.get("blake3")
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        return None
    return value


# Every regular file's `trusted.overlay.metacopy` (empty) is one shared xattr, right after
# the superblock (the shared area starts at block 0; an id counts 4-byte words).
_METACOPY = XATTR_ENTRY.pack(len(b"overlay.metacopy"), 4, 0) + b"overlay.metacopy"
_METACOPY_AT = SUPER_OFFSET + SUPER.size
_METACOPY_ID = _METACOPY_AT // 4
_SHARED_HEADER = XATTR_HEADER.pack(0, 1) + struct.pack("<I", _METACOPY_ID)
_INODES_AT = -(-(_METACOPY_AT + len(_METACOPY)) // 32) * 32
_REDIRECT = b"overlay.redirect"


def _plan(index: Index, recs: list[Inode]) -> list[_Inode]:
    """Every inode with its layout and sizes. A regular file's contents are at the first
    path it is reached by (breadth first) in the FUSE mount."""
    nodes: list[_Inode] = []
    paths: dict[int, bytes] = {ROOT_INO: b""}
    parents: dict[int, int] = {ROOT_INO: ROOT_INO}
    for rec in recs:
        ino = rec.ino
        node = _Inode(ino, rec.mode, size=rec.size)
        xattrs = index.xattrs(ino) if rec.xattr_count else []
        _check(ino, rec.mode, rec.rdev, xattrs)
        if rec.is_dir:
            base = paths[ino]
            children = [(name, child) for _, name, child in index.entries(ino)]
            for name, child in children:
                if child not in paths:
                    paths[child] = base + b"/" + name
                    parents[child] = ino
            node.entries = sorted([(b".", ino), (b"..", parents[ino]), *children])
            ends = _dir_splits([len(name) for name, _ in node.entries])
            node.size = (len(ends) - 2) * BLOCK + _dir_used(node.entries, ends[-2:])
            if len(ends) > 2:
                node.blocks = len(ends) - 1
            node.splits = ends
        elif stat.S_ISLNK(rec.mode):
            node.tail = index.readlink(ino)
            node.size = len(node.tail)
        elif rec.is_reg and rec.size:
            node.layout = CHUNK_BASED
            node.chunk_bits = min(MAX_CHUNK_BITS, max(0, (rec.size - 1).bit_length() - BLOCK_BITS))
            node.chunks = -(-rec.size // (BLOCK << node.chunk_bits))
            node.xattrs = _file_xattrs(xattrs, paths[ino])
            nodes.append(node)
            continue
        node.xattrs = _xattr_body(xattrs) if xattrs else b""
        nodes.append(node)
    return nodes


def _file_xattrs(xattrs: list[tuple[bytes, bytes]], redirect: bytes) -> bytes:
    """The shared metacopy xattr, the redirect, then the file's own xattrs."""
    if len(redirect) > 0xFFFF:
        raise Unrepresentable("a path is too long for an overlayfs redirect")
    entry = XATTR_ENTRY.pack(len(_REDIRECT), 4, len(redirect)) + _REDIRECT + redirect
    body = _SHARED_HEADER + entry + bytes(-len(entry) % 4)
    return body + _xattr_body(xattrs)[XATTR_HEADER.size:] if xattrs else body


def _check(ino: int, mode: int, rdev: int, xattrs: list[tuple[bytes, bytes]]) -> None:
    if stat.S_ISCHR(mode) and rdev == 0:
        raise Unrepresentable(f"inode {ino} is a 0/0 character device, which overlayfs "
                              "would take for a whiteout")
    for name, _ in xattrs:
        if name.startswith(b"trusted.overlay."):
            raise Unrepresentable(f"inode {ino} has an overlayfs xattr of its own ({name!r})")


def _xattr_body(xattrs: list[tuple[bytes, bytes]]) -> bytes:
    body = bytearray(XATTR_HEADER.pack(0, 0))
    for name, value in xattrs:
        number, suffix = _split(name)
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise Unrepresentable(f"xattr {name!r} is too long for EROFS")
        entry = XATTR_ENTRY.pack(len(suffix), number, len(value)) + suffix + value
        body += entry + bytes(-len(entry) % 4)
    if (len(body) - XATTR_HEADER.size) // 4 + 1 > 0xFFFF:
        raise Unrepresentable("an inode's xattrs are too large for EROFS")
    return bytes(body)


def _split(name: bytes) -> tuple[int, bytes]:
    """An xattr name as EROFS stores it: its prefix's number and the rest."""
    for prefix, number in PREFIXES:
        if name.startswith(prefix):
            return number, name[len(prefix):]
    raise Unrepresentable(f"xattr {name!r} has no EROFS name prefix")


def _dir_splits(lengths: list[int]) -> list[int]:
    """Where a directory's sorted entries are cut into blocks: [0, end1, end2, ...]. A
    block holds its dirents first, then their names."""
    ends = [0]
    used = 0
    for k, length in enumerate(lengths):
        if length > 255:
            raise Unrepresentable("a name is longer than 255 bytes")
        if used + DIRENT.size + length > BLOCK:
            ends.append(k)
            used = 0
        used += DIRENT.size + length
    ends.append(len(lengths))
    return ends


def _dir_used(entries: list[tuple[bytes, int]], span: list[int]) -> int:
    start, end = span
    return sum(DIRENT.size + len(name) for name, _ in entries[start:end])


def _dir_block(entries: list[tuple[bytes, int]], nids: list[int], ftypes: list[int]) -> bytes:
    """One block's dirents, then its names; a name ends where the next begins (or at the
    block's zero padding)."""
    heads, names = bytearray(), bytearray()
    nameoff = len(entries) * DIRENT.size
    for name, child in entries:
        heads += DIRENT.pack(nids[child], nameoff + len(names), ftypes[child])
        names += name
    return bytes(heads + names)


def _place(nodes: list[_Inode]) -> int:
    """Give every inode its nid (its offset / 32) in the metadata area, which starts right
    after the superblock; returns where the area ends. Inline data must not cross a block
    boundary; where it cannot fit in its inode's block at all, it becomes a data block."""
    pos = _INODES_AT
    for node in nodes:
        head = INODE.size + len(node.xattrs)
        tail = len(node.tail) if node.tail else (node.size if node.entries and not node.blocks
                                                 else 0)
        if tail:
            if head + tail > BLOCK:
                node.blocks = 1  # a long symlink or a full directory block: its own block
            else:
                node.layout = FLAT_INLINE
                if pos % BLOCK + head + tail > BLOCK:
                    pos = -(-pos // BLOCK) * BLOCK
        node.nid = pos // 32
        length = head + (tail if node.layout == FLAT_INLINE else 0) + 4 * node.chunks
        pos += -(-length // 32) * 32
    return pos


def _write(out: bytearray, rec: Inode, node: _Inode, nids: list[int],
           ftypes: list[int]) -> None:
    pos = node.nid * 32
    if node.layout == CHUNK_BASED:
        i_u = node.chunk_bits
    elif stat.S_ISCHR(rec.mode) or stat.S_ISBLK(rec.mode):
        major, minor = os.major(rec.rdev), os.minor(rec.rdev)
        i_u = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    else:
        i_u = node.start_block if node.blocks else 0
    sec, nsec = divmod(rec.mtime_ns, 1_000_000_000)
    icount = (len(node.xattrs) - XATTR_HEADER.size) // 4 + 1 if node.xattrs else 0
    out[pos:pos + INODE.size] = INODE.pack(
        1 | node.layout << 1, icount, rec.mode & 0xFFFF, 0, node.size, i_u & 0xFFFFFFFF,
        node.ino & 0xFFFFFFFF, rec.uid, rec.gid, sec, nsec, rec.nlink)
    pos += INODE.size
    out[pos:pos + len(node.xattrs)] = node.xattrs
    pos += len(node.xattrs)
    data = node.tail
    if node.entries:
        cuts = node.splits
        data = b"".join(_dir_block(node.entries[a:b], nids, ftypes).ljust(BLOCK, b"\0")
                        for a, b in itertools.pairwise(cuts))[:node.size]
    if node.layout == FLAT_INLINE:
        out[pos:pos + len(data)] = data
    elif node.blocks:
        at = node.start_block * BLOCK
        out[at:at + len(data)] = data
    elif node.layout == CHUNK_BASED:
        out[pos:pos + 4 * node.chunks] = b"\xff" * (4 * node.chunks)
