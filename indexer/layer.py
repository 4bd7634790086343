"""Apply OCI layer tarballs to a flattened tree, exactly as the OCI image spec says.

Nothing touches the host filesystem: symlinks are resolved inside the image tree only,
scoped to its root, so a hostile layer cannot reach outside it. Regular files' bytes are
handed to a `ContentSink` chunk by chunk and never held whole in memory.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import IO, Protocol

from indexer import elf, libraries, weights
from indexer.budgets import Budgets, Meter
from indexer.tarheaders import BoundedTarInfo, HeaderTooLarge
from indexer.tree import Node, new_dir

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
XATTR_PAX = "SCHILY.xattr."
# Never applied (as umoci): host-specific labels, and overlayfs' own bookkeeping, which
# would change how an overlay built on this tree behaves.
FORBIDDEN_XATTRS = {b"security.selinux", b"system.nfs4_acl"} | {
    b"trusted.overlay." + n
    for n in (b"opaque", b"redirect", b"origin", b"impure", b"nlink", b"upper", b"metacopy")
}
MAX_SYMLINK_HOPS = 40
MAX_PATH = 4096
NAME_MAX = 255
LDCONF_FILES = 256  # ld.so.conf files whose content is kept for indexer/libraries.py
# The index stores mtimes as i64 nanoseconds: later ones are clamped to its range.
MTIME_NS_MIN, MTIME_NS_MAX = -(1 << 63), (1 << 63) - 1
# A PAX mtime as Go's archive/tar (so umoci and containerd) reads it: optionally signed
# decimal seconds that fit an int64, then optionally '.' and decimal digits.
_PAX_TIME = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]*))?", re.ASCII)


class LayerError(ValueError):
    """The layer is malformed or hostile; the index must not be published."""


class ContentSink(Protocol):
    def add(self, digest: str, data: bytes) -> None:
        """Called once per chunk read; must not keep `data` past its own use."""
        ...


Hasher = Callable[[bytes], str]


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _no_nul(text: str, what: str) -> bytes:
    """`text` as bytes, refused if it holds a NUL: a PAX record can carry one, but the
    kernel ends every name there, so it would show as a name the image does not hold
    (umoci and Go's archive/tar refuse such headers too: "invalid tar header")."""
    raw = _raw(text)
    if b"\0" in raw:
        raise LayerError(f"invalid tar header: {what} has a NUL byte: {text!r}")
    return raw


def _split(name: str, what: str = "entry name") -> list[bytes]:
    """Path components of a tar entry name; refuses NUL, absolute paths and '..'."""
    raw = _no_nul(name, what)
    if raw.startswith(b"/"):
        raise LayerError(f"tar entry has an absolute path: {name!r}")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise LayerError(f"tar entry escapes the root with '..': {name!r}")
    if any(len(p) > NAME_MAX for p in parts[:-1]) or (parts and _too_long(parts[-1])):
        raise LayerError(f"tar entry has a name component over {NAME_MAX} bytes: "
                         f"{name[:80]!r}...")
    return parts


def _too_long(name: bytes) -> bool:
    """Over NAME_MAX, counting a whiteout by the name it removes (umoci applies the
    whiteout of a 255-byte name, whose own name is 259 bytes)."""
    if name.startswith(WHITEOUT):
        name = name[len(WHITEOUT) :]
    return len(name) > NAME_MAX


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """Exact nanoseconds: PAX mtimes are decimal strings, and a float would round them.

    A PAX mtime Go's archive/tar refuses (`1e30`, `inf`, seconds past int64) refuses the
    layer, as umoci does; one it accepts but past the index's i64 nanoseconds (after the
    year 2262) is clamped to that range, where umoci would store a wrapped-around time."""
    text = member.pax_headers.get("mtime")
    if text is None:
        ns = int(member.mtime) * 1_000_000_000  # ustar: octal or base-256 whole seconds
    else:
        match = _PAX_TIME.fullmatch(text)
        if match is None or not -(1 << 63) <= int(match[1] + match[2]) < 1 << 63:
            raise LayerError(f"bad PAX mtime {text[:40]!r} on {member.name[:80]!r}: "
                             "not seconds[.fraction] within 64 bits")
        ns = int(Decimal(text) * 1_000_000_000)
    return min(max(ns, MTIME_NS_MIN), MTIME_NS_MAX)


def _xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    """PAX xattrs; an empty value means "unset" (Go's archive/tar, hence every runtime)."""
    out = {}
    for key, value in member.pax_headers.items():
        if key.startswith(XATTR_PAX) and value:
            name = _no_nul(key[len(XATTR_PAX) :], f"an xattr name of {member.name!r}")
            if name not in FORBIDDEN_XATTRS:
                out[name] = _raw(value)
    return out


class LayerApplier:
    """Applies one layer after another to `root`; each `apply` call is one layer."""

    def __init__(self, root: Node, sink: ContentSink, hasher: Hasher, chunk_size: int,
                 budgets: Budgets | None = None, weights_chunk_size: int | None = None
                 ) -> None:
        self.root = root
        self.sink = sink
        self.hasher = hasher
        self.chunk_size = chunk_size
        # Model weights are read whole, so a lazy miss gains nothing from a small chunk,
        # while each chunk is a request, a blob and a verification of its own (#21).
        self.weights_chunk_size = weights_chunk_size or chunk_size
        self.budgets = budgets or Budgets()
        self._entries = Meter(self.budgets, "max_entries")  # over every layer applied
        self._link_steps = Meter(self.budgets, "max_link_steps")
        self._hops = 0  # symlinks followed in the current lookup
        self._fresh: set[int] = set()  # nodes created or touched by the current layer
        self._touched: set[int] = set()  # directories the current layer added entries to
        self.saw_weights = False  # some file was recognised as model weights
        # ld.so.conf files' contents by blob key, for resolving libraries (indexer/libraries.py)
        self.ldconf: dict[str, bytes] = {}

    def apply(self, stream: IO[bytes]) -> int:
        """Apply one uncompressed layer tar; returns the number of entries."""
        self._fresh = {id(self.root)}
        self._touched = set()
        count = 0
        try:
            with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8",
                              errors="surrogateescape", tarinfo=BoundedTarInfo) as tf:
                for member in tf:
                    count += 1
                    self._entries.spend()
                    self._entry(tf, member)
        except HeaderTooLarge as exc:
            raise LayerError(f"layer tar refused: {exc}") from exc
        except tarfile.TarError as exc:
            raise LayerError(f"corrupt or truncated layer tar: {exc}") from exc
        except EOFError as exc:
            raise LayerError("layer tar is truncated") from exc
        return count

    # -- path resolution inside the image ------------------------------------------------

    def _follow(self, node: Node, parents: list[Node]) -> tuple[Node, list[Node]]:
        """Resolve a symlink to a directory, scoped to the image root.

        As the kernel does, a lookup follows at most MAX_SYMLINK_HOPS symlinks in all,
        nested ones included: counted per hop, a target naming a symlink several times
        would cost exponentially many steps. Every step (and each copy of the path so
        far) is also charged to the image's max_link_steps budget, which bounds the work
        of all lookups together.
        """
        while node.is_symlink:
            self._hops += 1
            if self._hops > MAX_SYMLINK_HOPS:
                raise LayerError("too many levels of symbolic links in a layer path")
            target = node.target
            stack = [self.root] if target.startswith(b"/") else list(parents)
            self._link_steps.spend(len(stack))  # the copy costs as much
            for part in target.split(b"/"):
                self._link_steps.spend()
                if part in (b"", b"."):
                    continue
                if part == b"..":
                    if len(stack) > 1:
                        stack.pop()
                    continue
                cur = stack[-1]
                assert cur.children is not None
                nxt = cur.children.get(part)
                if nxt is None:
                    raise LayerError(f"path goes through a dangling symlink {target!r}")
                if nxt.is_symlink:
                    nxt, stack = self._follow(nxt, stack)
                if not nxt.is_dir:
                    raise LayerError(f"path goes through a non-directory {target!r}")
                stack.append(nxt)
            node, parents = stack[-1], stack[:-1]
        return node, parents

    def _parent(self, parts: list[bytes], create: bool, mtime_ns: int) -> Node | None:
        stack = [self.root]
        self._hops = 0
        for part in parts:
            cur = stack[-1]
            assert cur.children is not None
            if create:
                self._touched.add(id(cur))
            nxt = cur.children.get(part)
            if nxt is None:
                if not create:
                    return None
                self._entries.spend()  # an implicit parent: an inode like any entry
                nxt = cur.children[part] = new_dir(0o755, mtime_ns=mtime_ns)
                self._fresh.add(id(nxt))
            if nxt.is_symlink:
                nxt, stack = self._follow(nxt, stack)
            if not nxt.is_dir:
                if not create:
                    return None
                raise LayerError(f"a parent of {b'/'.join(parts)!r} is not a directory")
            stack.append(nxt)
        if create:
            self._touched.add(id(stack[-1]))
        return stack[-1]

    # -- entries ------------------------------------------------------------------------

    def _entry(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _split(member.name)
        if sum(len(p) + 1 for p in parts) > MAX_PATH:
            raise LayerError(f"tar entry path longer than {MAX_PATH} bytes")
        if not parts:  # the root directory itself
            if member.isdir():
                self._set_meta(self.root, member)
            return
        name = parts[-1]
        if name.startswith(WHITEOUT):
            self._whiteout(parts[:-1], name, _mtime_ns(member))
            return
        parent = self._parent(parts[:-1], True, _mtime_ns(member))
        assert parent is not None and parent.children is not None
        existing = parent.children.get(name)
        if member.isdir():
            if existing is not None and existing.is_dir:
                self._set_meta(existing, member)
                self._fresh.add(id(existing))
                return
            node = new_dir()
            self._set_meta(node, member)
        elif member.islnk():
            node = self._hardlink_target(member)
            if node is existing:
                return
        else:
            node = self._leaf(tf, member)
        parent.children[name] = node
        self._fresh.add(id(node))

    def _whiteout(self, dir_parts: list[bytes], name: bytes, mtime_ns: int) -> None:
        parent = self._parent(dir_parts, False, mtime_ns)
        if parent is None or parent.children is None:
            return
        if name == OPAQUE:
            self._prune(parent)
            return
        victim_name = name[len(WHITEOUT) :]
        victim = parent.children.get(victim_name)
        if victim is None or id(victim) in self._fresh:
            return
        if victim.is_dir and id(victim) in self._touched:
            self._prune(victim)  # keeps what this layer already put inside it
        else:
            del parent.children[victim_name]

    def _prune(self, directory: Node) -> None:
        """Remove everything lower layers put here, keeping this layer's own entries.

        A loop, not recursion: a layer may nest directories 2000 deep within MAX_PATH.
        """
        stack = [directory]
        while stack:
            node = stack.pop()
            assert node.children is not None
            for child_name, child in list(node.children.items()):
                if id(child) in self._fresh:
                    continue
                if child.is_dir and id(child) in self._touched:
                    stack.append(child)
                else:
                    del node.children[child_name]

    def _hardlink_target(self, member: tarfile.TarInfo) -> Node:
        parts = _split(member.linkname, f"the target of hard link {member.name!r}")
        parent = self._parent(parts[:-1], False, 0) if parts else None
        target = parent.children.get(parts[-1]) if parent and parent.children else None
        if target is None:
            raise LayerError(f"hard link {member.name!r} to missing {member.linkname!r}")
        if target.is_dir:
            raise LayerError(f"hard link {member.name!r} to a directory {member.linkname!r}")
        return target

    def _set_meta(self, node: Node, member: tarfile.TarInfo) -> None:
        node.mode = (node.mode & ~0o7777) | (member.mode & 0o7777)
        node.uid, node.gid = member.uid, member.gid
        node.mtime_ns = _mtime_ns(member)
        node.xattrs = _xattrs(member)

    def _leaf(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> Node:
        if member.isreg():
            kind = stat.S_IFREG
        elif member.issym():
            kind = stat.S_IFLNK
        elif member.ischr():
            kind = stat.S_IFCHR
        elif member.isblk():
            kind = stat.S_IFBLK
        elif member.isfifo():
            kind = stat.S_IFIFO
        else:
            raise LayerError(f"unsupported tar entry type {member.type!r} for {member.name!r}")
        node = Node(mode=kind)
        self._set_meta(node, member)
        if kind == stat.S_IFLNK:
            node.mode = stat.S_IFLNK | 0o777
            node.target = _no_nul(member.linkname, f"the target of symlink {member.name!r}")
            if len(node.target) >= MAX_PATH:  # the kernel's bound too: ENAMETOOLONG
                raise LayerError(f"symlink {member.name!r} has a target of {MAX_PATH} "
                                 "bytes or more")
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = os.makedev(member.devmajor, member.devminor)
        elif kind == stat.S_IFREG:
            self._content(tf, member, node)
        return node

    def _content(self, tf: tarfile.TarFile, member: tarfile.TarInfo, node: Node) -> None:
        node.size = member.size
        if member.size == 0:
            return
        f = tf.extractfile(member)
        assert f is not None
        probe = weights.probe(_raw(member.name), member.size,
                              self.budgets.max_weights_header)
        elf_probe = elf.probe(member.size)
        conf = (member.size <= libraries.LDCONF_MAX and "ld.so.conf" in member.name
                and len(self.ldconf) < LDCONF_FILES and libraries.is_ldconf(_split(member.name)))
        head = self._weights_head(f, member, probe)
        # Known from the head alone, it is final: a safetensors header is parsed once.
        described = probe.result() if probe is not None and head else None
        node.chunk_size = self.weights_chunk_size if described is not None else self.chunk_size
        at = 0
        for data in _cut(f, member, head, node.chunk_size):
            if probe is not None and probe.wants_more and at + len(data) > len(head):
                probe.feed(data[max(0, len(head) - at) :])  # what the head did not hold
            at += len(data)
            if elf_probe.wants_more:
                elf_probe.feed(data)
            digest = self.hasher(data)
            self.sink.add(digest, data)
            node.chunks.append(digest)
            if conf:
                self.ldconf[digest] = bytes(data)
        if described is None and probe is not None:
            described = probe.result()
        node.weights = described
        node.elf = elf_probe.result()
        self.saw_weights = self.saw_weights or node.weights is not None

    def _weights_head(self, f: IO[bytes], member: tarfile.TarInfo,
                      probe: weights.WeightProbe | None) -> bytes:
        """The first bytes of a file named like weights, read before it is cut so that
        its content, not only its name (a `.bin` may be firmware), decides whether it gets
        the weights' chunk size; b"" where that cannot matter."""
        if probe is None or self.weights_chunk_size == self.chunk_size:
            return b""
        head = f.read(min(self.weights_chunk_size, member.size))
        if len(head) < min(self.weights_chunk_size, member.size):
            raise LayerError(f"layer tar is truncated inside {member.name!r}")
        probe.feed(head)
        return head


def _cut(f: IO[bytes], member: tarfile.TarInfo, head: bytes, chunk: int) -> Iterator[bytes]:
    """The member's content in pieces of `chunk` bytes, the last one shorter: `head`, read
    already, then the rest of `f`. A piece read whole is yielded as read, not copied."""
    buf, remaining = head, member.size - len(head)
    while buf or remaining:
        if len(buf) < chunk and remaining:
            more = f.read(min(chunk - len(buf), remaining))
            if not more:
                raise LayerError(f"layer tar is truncated inside {member.name!r}")
            remaining -= len(more)
            buf = buf + more if buf else more
            continue
        yield buf[:chunk]
        buf = buf[chunk:]
