"""The cafs index: one immutable binary object holding an image's config and flattened tree.

Designed to load without parsing: the header locates fixed-size record tables, and records
are decoded on demand with `struct.unpack_from`, so opening a 100k-entry index costs one
zstd decompression and no per-entry work. Inode N is record N-1 (O(1) getattr); a
directory's entries are contiguous and sorted by name, and a per-directory dict is built on
first lookup (O(1) lookups after that). The byte layout is specified in docs/FORMAT.md.
"""

from __future__ import annotations

import array
import json
import stat
import struct
import sys
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from indexer.tree import FileKind, Node

MAGIC = b"CAFSINDX"
VERSION = 2  # written; 1 (no per-file chunk size: the field was padding, 0) is still read
READABLE = (1, 2)
SECTIONS = ("meta", "inodes", "dirents", "chunks", "xattrs", "heap")
HEADER = struct.Struct("<8sHHI" + "QQ" * len(SECTIONS))
INODE = struct.Struct("<IIIIQqQQIIII")  # 64 bytes; the last: chunk size, 0 = the header's
CHUNK_FIELD = 60  # the chunk size's offset within an inode record
DIRENT = struct.Struct("<QII")  # name offset, name length, inode
XATTR = struct.Struct("<QIQI")  # name offset, name length, value offset, value length
DIGEST_SIZE = 32
ROOT_INO = 1
MAX_U32 = 0xFFFFFFFF


MIN_CHUNK_SIZE = 4096  # a page: what the indexer's smallest --chunk-size is


class IndexFormatError(ValueError):
    """The bytes are not a cafs index this version can read."""


_NOT_NAMES = (b"", b".", b"..")


def check_name(name: bytes) -> bytes:
    """A directory entry's name, refused unless it is one a kernel could hand back: no
    '/' or NUL (a kernel ends a name at NUL, so a listing would show a name whose lookup
    finds another entry), not empty, '.' or '..', at most 255 bytes."""
    if b"/" in name or b"\0" in name or name in _NOT_NAMES or len(name) > 255:
        raise IndexFormatError(f"invalid entry name {name[:255]!r} in the index")
    return name


@dataclass(frozen=True, slots=True)
class Inode(FileKind):
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: int
    start: int  # dir: first dirent; reg: first chunk; symlink: heap offset of the target
    count: int  # dir: entries; reg: chunks; symlink: target bytes
    xattr_start: int
    xattr_count: int
    chunk_size: int  # regular: the size of each chunk but the last (the index's default or
    # the file's own, e.g. larger for model weights, which are read whole)


# ---------------------------------------------------------------------------- writing


class _Heap:
    """Byte strings stored once each (file names repeat a lot across directories)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.seen: dict[bytes, int] = {}

    def add(self, data: bytes) -> int:
        off = self.seen.get(data)
        if off is None:
            off = self.seen[data] = len(self.buf)
            self.buf += data
        return off


def _clamp_u32(value: int, what: str) -> int:
    if not 0 <= value <= MAX_U32:
        raise IndexFormatError(f"{what} {value} does not fit in 32 bits")
    return value


def encode_index(root: Node, meta: dict[str, Any], chunk_size: int) -> bytes:
    """Serialise a tree. Inodes are numbered breadth-first from the root (inode 1);
    `chunk_size` is the default, written once in the header; a file chunked otherwise
    (Node.chunk_size) carries its own."""
    order: list[Node] = [root]
    ino_of: dict[int, int] = {id(root): ROOT_INO}
    nlink: dict[int, int] = {id(root): 2}
    dirents = bytearray()
    dir_span: dict[int, tuple[int, int]] = {}
    heap = _Heap()
    n_dirents = 0
    i = 0
    while i < len(order):
        node = order[i]
        i += 1
        if node.children is None:
            continue
        names = sorted(node.children)
        dir_span[id(node)] = (n_dirents, len(names))
        for name in names:
            child = node.children[name]
            key = id(child)
            if key not in ino_of:
                order.append(child)
                ino_of[key] = len(order)
                nlink[key] = 2 if child.is_dir else 0
            if child.is_dir:
                nlink[id(node)] += 1
            else:
                nlink[key] += 1
            dirents += DIRENT.pack(heap.add(check_name(name)), len(name), ino_of[key])
            n_dirents += 1
    inodes = bytearray()
    chunks = bytearray()
    xattrs = bytearray()
    n_chunks = n_xattrs = 0
    for node in order:
        a = b = 0
        if node.children is not None:
            a, b = dir_span[id(node)]
        elif node.is_reg:
            a, b = n_chunks, len(node.chunks)
            for digest in node.chunks:
                chunks += bytes.fromhex(digest)
            n_chunks += len(node.chunks)
        elif node.is_symlink:
            a, b = heap.add(node.target), len(node.target)
        x_start = n_xattrs
        for name in sorted(node.xattrs):
            value = node.xattrs[name]
            xattrs += XATTR.pack(heap.add(name), len(name), heap.add(value), len(value))
            n_xattrs += 1
        inodes += INODE.pack(
            node.mode,
            _clamp_u32(node.uid, "uid"),
            _clamp_u32(node.gid, "gid"),
            nlink[id(node)],
            node.size if not node.is_symlink else len(node.target),
            node.mtime_ns,
            node.rdev,
            a,
            b,
            x_start,
            n_xattrs - x_start,
            _own_chunk_size(node, chunk_size),
        )
    files = [n for n in order if n.is_reg]
    meta = {**meta, "files": len(files), "bytes": sum(n.size for n in files)}
    bodies = [bytes(inodes), bytes(dirents), bytes(chunks), bytes(xattrs), bytes(heap.buf)]
    return _assemble(chunk_size, [_meta_bytes(meta), *bodies])


def _own_chunk_size(node: Node, default: int) -> int:
    if not node.is_reg or node.chunk_size in (0, default):
        return 0
    if not MIN_CHUNK_SIZE <= node.chunk_size <= MAX_U32:
        raise IndexFormatError(f"chunk size {node.chunk_size} is outside {MIN_CHUNK_SIZE} to "
                               f"{MAX_U32}")
    return node.chunk_size


def inode_count(data: bytes) -> int:
    """How many inodes the index `data` (as encode_index made it) holds."""
    spans = HEADER.unpack_from(data)[4:]
    return int(spans[2 * SECTIONS.index("inodes") + 1]) // INODE.size


def with_meta(data: bytes, meta: dict[str, Any]) -> bytes:
    """The index `data` with `meta` as its meta and every other section kept byte for
    byte: what encoding the tree again would give, at the cost of a copy."""
    Index(data)  # a well-formed index, or IndexFormatError
    _, _, _, chunk_size, *spans = HEADER.unpack_from(data)
    bodies = [data[spans[2 * n]:spans[2 * n] + spans[2 * n + 1]]
              for n in range(1, len(SECTIONS))]
    return _assemble(chunk_size, [_meta_bytes(meta), *bodies])


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _assemble(chunk_size: int, bodies: list[bytes]) -> bytes:
    """The header, then the sections (in SECTIONS order) it locates."""
    offsets: list[int] = []
    pos = HEADER.size
    for body in bodies:
        offsets += [pos, len(body)]
        pos += len(body)
    header = HEADER.pack(MAGIC, VERSION, 0, chunk_size, *offsets)
    return header + b"".join(bodies)


# ---------------------------------------------------------------------------- reading


class Index:
    """A loaded index. Holds the bytes and decodes records on demand."""

    def __init__(self, data: bytes) -> None:
        if len(data) < HEADER.size:
            raise IndexFormatError("index is shorter than its header")
        magic, version, _flags, chunk_size, *spans = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise IndexFormatError("not a cafs index (bad magic)")
        if version not in READABLE:
            raise IndexFormatError(f"index format version {version}; this cafs reads "
                                   f"{' and '.join(map(str, READABLE))}")
        self._data = memoryview(data)
        if chunk_size < MIN_CHUNK_SIZE:  # every read of a file would divide by it
            raise IndexFormatError(f"index chunk size {chunk_size} is under {MIN_CHUNK_SIZE}")
        self.chunk_size: int = chunk_size  # the default; Inode.chunk_size is a file's own
        sec: dict[str, memoryview] = {}
        for n, name in enumerate(SECTIONS):
            off, length = spans[2 * n], spans[2 * n + 1]
            if off + length > len(data):
                raise IndexFormatError(f"index section {name} runs past the end")
            sec[name] = self._data[off : off + length]
        self._inodes, self._dirents = sec["inodes"], sec["dirents"]
        self._chunks, self._xattrs, self._heap = sec["chunks"], sec["xattrs"], sec["heap"]
        self.meta: dict[str, Any] = json.loads(bytes(sec["meta"]))
        self.inode_count = len(self._inodes) // INODE.size
        self.max_chunk_size = max(self.chunk_size, self._own_chunk_sizes())
        self._lookup_cache: dict[int, dict[bytes, int]] = {}

    def _own_chunk_sizes(self) -> int:
        """The largest chunk size a file carries (0: none does), every one checked at load,
        so that no read divides by 0 and the largest blob to expect is known. In C (an
        array and a set of its few distinct values), not one struct call per inode. A
        version 1 index wrote 0 there (padding), so it reads the same way."""
        sizes = array.array("I", bytes(self._inodes[: self.inode_count * INODE.size]))
        if sys.byteorder != "little":
            sizes.byteswap()
        own = set(sizes[CHUNK_FIELD // 4 :: INODE.size // 4]) - {0}
        if own and min(own) < MIN_CHUNK_SIZE:
            raise IndexFormatError(f"a file's chunk size {min(own)} is under {MIN_CHUNK_SIZE}")
        return max(own, default=0)

    def to_bytes(self) -> bytes:
        return bytes(self._data)

    @property
    def config(self) -> dict[str, Any]:
        """The OCI image config (env, cmd, entrypoint, user, workdir, ...)."""
        cfg: dict[str, Any] = self.meta.get("config", {})
        return cfg

    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= self.inode_count:
            raise KeyError(ino)
        (mode, uid, gid, nlink, size, mtime_ns, rdev, start, count, xattr_start, xattr_count,
         own) = INODE.unpack_from(self._inodes, (ino - 1) * INODE.size)
        return Inode(ino, mode, uid, gid, nlink, size, mtime_ns, rdev, start, count,
                     xattr_start, xattr_count, own or self.chunk_size)

    def single_chunk(self, ino: int) -> str | None:
        """The key of a regular file of exactly one chunk, else None; without building an
        Inode (a pass over every member of a per-file table at mount start, #20)."""
        if not 1 <= ino <= self.inode_count:
            raise KeyError(ino)
        fields = INODE.unpack_from(self._inodes, (ino - 1) * INODE.size)
        if not stat.S_ISREG(fields[0]) or fields[8] != 1:
            return None
        start = fields[7] * DIGEST_SIZE
        return bytes(self._chunks[start : start + DIGEST_SIZE]).hex()

    def _name(self, off: int, length: int) -> bytes:
        return bytes(self._heap[off : off + length])

    def dirent(self, index: int) -> tuple[bytes, int]:
        """Every name leaves the index through here, checked: IndexFormatError."""
        off, length, ino = DIRENT.unpack_from(self._dirents, index * DIRENT.size)
        return check_name(self._name(off, length)), ino

    def entries(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(position, name, inode) of a directory's entries from position `start`."""
        node = self.inode(ino)
        if not node.is_dir:
            raise NotADirectoryError(ino)
        for pos in range(start, node.count):
            name, child = self.dirent(node.start + pos)
            yield pos, name, child

    def directories(self) -> Iterator[tuple[int, list[int]]]:
        """(inode, its entries' inodes) of every directory, in inode order, names not
        decoded: for a pass over the tree's shape (neighbour families) that must stay cheap
        on a 100k-file image. IndexFormatError if a directory's entries lie outside the
        index."""
        total = len(self._dirents) // DIRENT.size
        for n, fields in enumerate(INODE.iter_unpack(self._inodes)):
            if stat.S_ISDIR(fields[0]):
                start, count = fields[7], fields[8]
                if start + count > total:
                    raise IndexFormatError(f"directory {n + 1}: entries past the index's end")
                raw = self._dirents[start * DIRENT.size : (start + count) * DIRENT.size]
                yield n + 1, [entry[2] for entry in DIRENT.iter_unpack(raw)]

    def lookup(self, parent: int, name: bytes) -> int | None:
        table = self._lookup_cache.get(parent)
        if table is None:
            node = self.inode(parent)
            if not node.is_dir:
                return None
            if node.count <= 16:  # small directories: a binary search beats building a dict
                return self._bisect(node, name)
            table = {n: i for _, n, i in self.entries(parent)}
            self._lookup_cache[parent] = table
        return table.get(name)

    def _bisect(self, node: Inode, name: bytes) -> int | None:
        names = [self.dirent(node.start + k)[0] for k in range(node.count)]
        pos = bisect_left(names, name)
        if pos < len(names) and names[pos] == name:
            return self.dirent(node.start + pos)[1]
        return None

    def resolve(self, path: bytes) -> int | None:
        """Inode of a '/'-separated path inside the image (symlinks not followed)."""
        ino: int | None = ROOT_INO
        for part in path.strip(b"/").split(b"/"):
            if part in (b"", b"."):
                continue
            assert ino is not None
            ino = self.lookup(ino, part)
            if ino is None:
                return None
        return ino

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode):
            raise ValueError(f"inode {ino} is not a symlink")
        return self._name(node.start, node.count)

    def chunks(self, ino: int) -> list[str]:
        node = self.inode(ino)
        if not node.is_reg:
            return []
        start = node.start * DIGEST_SIZE
        raw = self._chunks[start : start + node.count * DIGEST_SIZE]
        return [bytes(raw[k : k + DIGEST_SIZE]).hex() for k in range(0, len(raw), DIGEST_SIZE)]

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        node = self.inode(ino)
        out = []
        for k in range(node.xattr_start, node.xattr_start + node.xattr_count):
            noff, nlen, voff, vlen = XATTR.unpack_from(self._xattrs, k * XATTR.size)
            out.append((self._name(noff, nlen), self._name(voff, vlen)))
        return out

    def walk(self) -> Iterator[tuple[bytes, Inode]]:
        """Every path (root as b'.') with its inode, depth first, names in order."""
        yield b".", self.inode(ROOT_INO)
        stack: list[tuple[bytes, int]] = [(b"", ROOT_INO)]
        while stack:
            prefix, ino = stack.pop()
            children = list(self.entries(ino))
            for _, name, child in reversed(children):
                path = prefix + b"/" + name if prefix else name
                node = self.inode(child)
                if node.is_dir:
                    stack.append((path, child))
            for _, name, child in children:
                path = prefix + b"/" + name if prefix else name
                yield path, self.inode(child)

    def all_chunks(self) -> set[str]:
        """Every blob this index references (for GC, prefetch and stats)."""
        raw = self._chunks
        return {bytes(raw[k : k + DIGEST_SIZE]).hex() for k in range(0, len(raw), DIGEST_SIZE)}
