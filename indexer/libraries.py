"""The libraries each ELF object of an image loads, resolved in the image's own tree.

indexer/elf.py finds the names an object asks for (`PT_INTERP`, `DT_NEEDED`, its run
path); this module finds, in the flattened tree, the file the dynamic loader would open for
each, and writes the result into the image's top index as the `libraries` record
(docs/FORMAT.md): every ELF object, by inode, with the inodes it loads directly. A mount
(cafs/daemon/libraries.py) then fetches a program's whole load chain on its first read,
in parallel, instead of one round trip per library as the loader asks.

The search follows glibc's ld.so (ld.so(8)) closely enough to be right on the images people
run: a name with a `/` is a path; otherwise `DT_RUNPATH` (else `DT_RPATH`) with `$ORIGIN`,
then the directories of `/etc/ld.so.conf` and `/etc/ld.so.conf.d/*.conf` (as ldconfig reads
them, includes of other patterns aside), then the multiarch and default directories. A
candidate must be an ELF object of the asking object's class and machine, as ld.so checks.
Symlinks are followed inside the image (an absolute target from its root), never outside.
A wrong answer costs bytes fetched for nothing, never a wrong byte served; a name not found
is left out. The whole resolution is bounded in lookups (`STEP_BUDGET`): an image built to
make it slow gets fewer hints, not a slow index.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from indexer import deptable
from indexer.elf import ElfInfo
from indexer.format import ROOT_INO, Index
from indexer.tree import Node, walk

VERSION = 1
META_KEY = "libraries"
MAX_DEPS = 64  # direct dependencies recorded per object
SYMLINK_HOPS = 40  # as the kernel's path walk
STEP_BUDGET = 2_000_000  # directory lookups for a whole image's resolution
LDCONF = b"etc/ld.so.conf"
LDCONF_DIR = b"etc/ld.so.conf.d"
LDCONF_MAX = 64 << 10  # bytes of one ld.so.conf file read
LDCONF_DIRS_MAX = 64  # directories taken from them
MULTIARCH = {  # e_machine, class -> Debian's multiarch tuple
    (62, 64): b"x86_64-linux-gnu", (3, 32): b"i386-linux-gnu",
    (183, 64): b"aarch64-linux-gnu", (40, 32): b"arm-linux-gnueabihf",
    (21, 64): b"powerpc64le-linux-gnu", (22, 64): b"s390x-linux-gnu",
    (243, 64): b"riscv64-linux-gnu",
}


class LibraryTableError(deptable.DepTableError):
    """An index's `libraries` record is malformed: the mount goes on without it."""


def is_ldconf(parts: list[bytes]) -> bool:
    """A path (components) whose content the resolution reads: ld.so.conf and its
    directory's `*.conf` files."""
    path = b"/".join(parts)
    return path == LDCONF or (b"/".join(parts[:-1]) == LDCONF_DIR
                              and parts[-1].endswith(b".conf"))


def ldconf_dirs(files: Mapping[bytes, bytes]) -> list[bytes]:
    """The library directories the image's ld.so.conf files list (path -> content), in
    ldconfig's order: ld.so.conf's own lines, with its `include` of ld.so.conf.d (any
    pattern there) expanded in name order where it stands."""
    out: list[bytes] = []
    for line in _lines(files.get(LDCONF, b"")):
        if line.startswith(b"include"):
            for name in sorted(p for p in files if p.startswith(LDCONF_DIR + b"/")):
                out.extend(_lines(files[name]))
        else:
            out.append(line)
    return list(dict.fromkeys(d for d in out if d.startswith(b"/")))[:LDCONF_DIRS_MAX]


def _lines(content: bytes) -> Iterable[bytes]:
    for raw in content[:LDCONF_MAX].splitlines():
        line = raw.split(b"#", 1)[0].strip()
        if line and not line.startswith(b"hwcap"):
            yield line.split(b"=", 1)[0].strip()  # "dir=TYPE" (libc5 era)


class Resolver:
    """Paths and library names to inodes in one index, memoized, within `STEP_BUDGET`."""

    def __init__(self, index: Index, objects: Mapping[int, ElfInfo],
                 conf_dirs: list[bytes], budget: int = STEP_BUDGET) -> None:
        self.index = index
        self.objects = objects
        self.conf_dirs = conf_dirs
        self.steps = budget
        self._paths: dict[bytes, int | None] = {}

    def path(self, path: bytes) -> int | None:
        """The inode `path` (from the image root) names, symlinks followed within it."""
        if path not in self._paths:
            self._paths[path] = self._walk(path)
        return self._paths[path]

    def _walk(self, path: bytes) -> int | None:
        chain = [ROOT_INO]  # the directories walked, for ".."
        parts = deque(p for p in path.split(b"/") if p not in (b"", b"."))
        hops = SYMLINK_HOPS
        while parts:
            part = parts.popleft()
            if part == b"..":
                if len(chain) > 1:
                    chain.pop()
                continue
            self.steps -= 1
            if self.steps < 0:
                return None
            child = self.index.lookup(chain[-1], part)
            if child is None:
                return None
            if self.index.inode(child).is_symlink:
                hops -= 1
                if hops < 0:
                    return None
                target = self.index.readlink(child)
                if target.startswith(b"/"):
                    chain = [ROOT_INO]
                parts.extendleft(reversed([p for p in target.split(b"/")
                                           if p not in (b"", b".")]))
            else:
                chain.append(child)
        return chain[-1]

    def dependencies(self, origin: bytes, info: ElfInfo) -> list[int]:
        """The inodes of what `info` (the object at directory `origin`) loads directly:
        its interpreter, then each DT_NEEDED found, each once."""
        found: list[int] = []
        if info.interp is not None:
            ino = self._object(info.interp, info)
            if ino is not None:
                found.append(ino)
        dirs = self._search_dirs(origin, info)
        for name in info.needed:
            if b"/" in name:
                ino = self._object(name if name.startswith(b"/") else origin + b"/" + name,
                                   info)
            else:
                ino = next((i for d in dirs if (i := self._object(d + b"/" + name, info))
                            is not None), None)
            if ino is not None:
                found.append(ino)
            if self.steps < 0:
                break
        return list(dict.fromkeys(found))[:MAX_DEPS]

    def _object(self, path: bytes, asker: ElfInfo) -> int | None:
        ino = self.path(path)
        if ino is None:
            return None
        info = self.objects.get(ino)
        return ino if info is not None and info.compatible(asker) else None

    def _search_dirs(self, origin: bytes, info: ElfInfo) -> list[bytes]:
        dirs: list[bytes] = []
        for entry in info.search:
            entry = entry.replace(b"${ORIGIN}", origin).replace(b"$ORIGIN", origin)
            if entry.startswith(b"/") and b"$" not in entry:
                dirs.append(entry)
        dirs += self.conf_dirs
        arch = MULTIARCH.get((info.machine, info.wordsize))
        if arch is not None:
            dirs += [b"/lib/" + arch, b"/usr/lib/" + arch]
        dirs += ([b"/lib64", b"/usr/lib64"] if info.wordsize == 64 else []) + [b"/lib",
                                                                              b"/usr/lib"]
        return list(dict.fromkeys(dirs))


def record(index: Index, root: Node, blobs: Mapping[str, bytes]) -> dict[str, Any] | None:
    """The `libraries` record of the tree `root` that `index` encodes, with `blobs` the
    contents of ld.so.conf files seen while indexing (by blob key)."""
    found: list[tuple[bytes, ElfInfo]] = []
    conf: dict[bytes, bytes] = {}
    for path, node in walk(root):
        if node.elf is not None:
            found.append((path, node.elf))
        elif node.is_reg and len(node.chunks) == 1 and is_ldconf(path.split(b"/")):
            content = blobs.get(node.chunks[0])
            if content is not None:
                conf[path] = content
    return table(index, found, conf)


def table(index: Index, found: Iterable[tuple[bytes, ElfInfo]],
          conf: Mapping[bytes, bytes]) -> dict[str, Any] | None:
    """The `libraries` record for the objects `found` ((path, description) in the tree
    `index` encodes), None when there are none. Deterministic."""
    by_ino: dict[int, tuple[bytes, ElfInfo]] = {}
    for path, info in found:
        ino = index.resolve(path)
        if ino is not None and ino not in by_ino:
            by_ino[ino] = (path, info)
    if not by_ino:
        return None
    resolver = Resolver(index, {i: info for i, (_, info) in by_ino.items()}, ldconf_dirs(conf))
    deps: dict[int, list[int]] = {}
    for ino in sorted(by_ino):
        path, info = by_ino[ino]
        origin = b"/" + path.rpartition(b"/")[0] if b"/" in path else b""
        deps[ino] = [d for d in resolver.dependencies(origin, info) if d != ino]
    return {META_KEY: {"version": VERSION, "table": deptable.encode(deps)}}


class LibraryTable(deptable.DepTable):
    """A decoded, checked `libraries` record: each ELF object's direct dependencies;
    `closure` goes breadth first, as the loader does."""

    def __init__(self, index: Index, record: Any) -> None:
        super().__init__(index, record, VERSION, MAX_DEPS, "libraries", LibraryTableError)


def load(index: Index) -> LibraryTable | None:
    """The index's library table; None if it has none (older indexes, lower chains);
    LibraryTableError if it has a record this version cannot use."""
    record = index.meta.get(META_KEY)
    if record is None:
        return None
    return LibraryTable(index, record)
