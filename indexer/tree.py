"""The flattened file tree an image's layers build up, in plain Python.

A `Node` is an inode: a hard link is the same Node object under two names, so link groups
need no bookkeeping. Names are bytes (images may hold non-UTF-8 names).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from indexer.elf import ElfInfo


class FileKind:
    """What kind of file a `mode` names: one answer for the tree an indexer builds and
    the index a mount reads back."""

    __slots__ = ()
    mode: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(eq=False)
class Node(FileKind):
    mode: int  # full st_mode: type bits and permission bits (incl. setuid/setgid/sticky)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: bytes = b""  # symlink target
    chunks: list[str] = field(default_factory=list)  # BLAKE3 hex per chunk (regular files)
    chunk_size: int = 0  # regular: the size its chunks were cut at; 0 = the index's default
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Node] | None = None  # directories only
    weights: dict[str, Any] | None = None  # model weight file: what a loader needs
    elf: ElfInfo | None = None  # ELF object: what the dynamic loader asks for (indexer/elf.py)


def new_dir(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> Node:
    return Node(stat.S_IFDIR | (mode & 0o7777), uid, gid, mtime_ns, children={})


def walk(root: Node, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """Depth-first (path, node) pairs, root first as b'.', children in name order."""
    yield (prefix or b"."), root
    stack: list[tuple[bytes, Node]] = [(prefix, root)]
    while stack:
        path, node = stack.pop()
        assert node.children is not None
        for name in sorted(node.children, reverse=True):
            child = node.children[name]
            child_path = path + b"/" + name if path else name
            yield child_path, child
            if child.is_dir:
                stack.append((child_path, child))
