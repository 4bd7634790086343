"""The modules each Python source file of an image imports, resolved in the image's own tree.

An interpreter importing a package reads one module, runs it, and only then reads the
modules it imports: on a lazily loaded image, a round trip per module, one after another
(#20's `import numpy`: 150 modules). indexer/pysource.py finds what a source file imports
when it is imported; this module finds, in the flattened tree, the file the interpreter
would load for each (a package's `__init__.py`, a module's `.py`, an extension module's
`.so`), and writes the result into the image's top index as the `imports` record
(docs/FORMAT.md), in the `libraries` record's table format: every source file scanned, by
inode, with the inodes its imports load directly. A mount (cafs/daemon/imports.py) then
fetches a module's whole import tree at its first read, in a few ranged reads of the
neighbour pack, instead of one round trip per module.

The search follows CPython's path-based finder closely enough for the images people run:
an absolute import is looked up first beside the importing file's top-level package (a
script's directory, a package's parent), then in the image's Python directories, in
sys.path's order (`lib/python3.N`, its `lib-dynload`, then `site-packages` and
`dist-packages`); in each, a package directory, then an extension module, then a source file.
Stdlib modules CPython 3.11 and later run frozen (`os`, `codecs`, ...) are left out: the
interpreter never reads them. Only the sources the neighbour pack holds are scanned (the
indexer has their bytes at hand), and the whole resolution is bounded in lookups
(`STEP_BUDGET`). A wrong answer costs bytes fetched for nothing, never a wrong byte served.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from indexer import deptable
from indexer.format import ROOT_INO, Index
from indexer.pysource import Imported, imports

VERSION = 1
META_KEY = "imports"
MAX_DEPS = 128  # direct imports recorded per source file
ROOTS_MAX = 16  # the image's Python directories searched
STEP_BUDGET = 2_000_000  # directory lookups for a whole image's resolution
# `_imp.is_frozen` on CPython 3.11 - 3.13: modules it runs from its own binary; and the two
# that `importlib/__init__.py` takes from the frozen `_frozen_importlib*` (it puts them in
# `sys.modules` under these names before its `from ._bootstrap import ...`).
FROZEN = frozenset({"zipimport", "abc", "codecs", "io", "_collections_abc", "_sitebuiltins",
                    "genericpath", "ntpath", "posixpath", "os", "site", "stat", "importlib.util",
                    "importlib.machinery", "runpy", "__hello__", "importlib._bootstrap",
                    "importlib._bootstrap_external"})
# Modules every CPython 3 has built in, never a file: an import of one in a `try` block
# does not fail.
BUILTIN = frozenset({"sys", "builtins", "_imp", "_io", "_thread", "_warnings", "_weakref",
                     "marshal", "posix", "_frozen_importlib", "_frozen_importlib_external",
                     "time", "errno", "itertools", "_abc", "_codecs", "_collections",
                     "_functools", "_operator", "_signal", "_sre", "_stat", "_string", "gc",
                     "atexit", "_tokenize", "_typing", "_tracemalloc", "faulthandler", "pwd",
                     "_locale", "_symtable"})
_STDLIB = re.compile(rb"python3(?:\.(\d+))?")
_ROOT_KIDS = (b"lib-dynload", b"site-packages", b"dist-packages")
_INIT = b"__init__.py"


class ImportTableError(deptable.DepTableError):
    """An index's `imports` record is malformed: the mount goes on without it."""


class Finder:
    """Module names to inodes in one index, memoized, within `STEP_BUDGET` lookups."""

    def __init__(self, index: Index, roots: list[tuple[int, bool]],
                 parents: Mapping[int, int], budget: int = STEP_BUDGET) -> None:
        self.index = index
        self.roots = roots  # (directory, runs the stdlib frozen), in search order
        self._frozen = {ino for ino, frozen in roots if frozen}
        self.parents = parents
        self.steps = budget
        self._stems: dict[tuple[int, Callable[[bytes], bool]], dict[str, int]] = {}
        self._tops: dict[int, int] = {}
        self._names: dict[int, dict[int, str]] = {}  # directory -> its subdirectories' names

    def dependencies(self, directory: int, found: Iterable[Imported]) -> list[int]:
        """The inodes the imports `found` of a source file in `directory` load directly.
        The fallback imports of a `try` block count only if one of its imports is not in
        the image (`try: import pickle5 as pickle except ImportError: import pickle`)."""
        out: list[int] = []
        failed: set[int] = set()  # try blocks with an import not found
        fallbacks: list[Imported] = []
        for item in found:
            if self.steps < 0:
                break
            if item.fallback:
                fallbacks.append(item)
                continue
            files = self._imported(directory, item)
            if files is None and item.group:
                failed.add(item.group)
            out += files or []
        for item in fallbacks:
            if item.group in failed:
                out += self._imported(directory, item) or []
        return list(dict.fromkeys(out))[:MAX_DEPS]

    def _imported(self, directory: int, item: Imported) -> list[int] | None:
        """The files one import loads; None if the image does not have its module."""
        parts = item.module.split(".") if item.module else []
        top = self._top(directory)
        if item.level:
            base: int | None = directory
            for _ in range(item.level - 1):
                base = self.parents.get(base) if base is not None else None
            if base is None:
                return None
            bases = [(base, self._dotted(base, top) if top in self._frozen else None)]
        else:
            if parts[0] in BUILTIN:
                return []
            bases = [(top, "" if top in self._frozen else None),
                     *[(root, "" if frozen else None) for root, frozen in self.roots]]
        for base, prefix in bases:
            found = self._module(base, parts, prefix, relative=bool(item.level))
            if found is None:
                continue
            files, package, name = found
            for sub in item.names:
                more = (self._module(package, [sub], name, relative=True)
                        if package is not None else None)
                if more is not None:
                    files += more[0]
            return files
        return None

    def _module(self, base: int, parts: list[str], prefix: str | None, relative: bool
                ) -> tuple[list[int], int | None, str | None] | None:
        """The files importing `parts` from directory `base` loads, the package directory
        it ends in (None: a module) and that package's dotted name; None if `base` does not
        have its first part. `prefix` is `base`'s own dotted name in a Python directory
        whose stdlib runs frozen, None elsewhere: what is frozen is left out."""
        files: list[int] = []
        here: int | None = base
        name = prefix
        for depth, part in enumerate(parts):
            if here is None:
                return files, None, None
            kind, ino = self._find(here, part)
            if ino is None:
                return None if depth == 0 and not relative else (files, None, None)
            name = None if name is None else f"{name}.{part}" if name else part
            skip = name in FROZEN
            if kind == "package":
                init = self._lookup(ino, _INIT)
                if init is not None and not skip:
                    files.append(self.loaded(ino, b"__init__", init))
                here = ino
            else:
                if not skip:
                    files.append(self.loaded(here, part.encode(), ino) if kind == "source"
                                 else ino)
                here = None
        return files, here, name

    def _dotted(self, directory: int, top: int) -> str | None:
        """The dotted name of package `directory` below `top` ("" for `top` itself)."""
        names: list[str] = []
        while directory != top and len(names) < 64:
            parent = self.parents.get(directory)
            if parent is None:
                return None
            found = self._name_of(parent, directory)
            if found is None:
                return None
            names.append(found)
            directory = parent
        return ".".join(reversed(names)) if directory == top else None

    def _name_of(self, parent: int, child: int) -> str | None:
        names = self._names.get(parent)
        if names is None:
            names = self._names[parent] = {}
            self.steps -= self.index.inode(parent).count
            if self.steps >= 0:
                for _, entry, ino in self.index.entries(parent):
                    if self.index.inode(ino).is_dir:
                        names[ino] = entry.decode("ascii", "replace")
        return names.get(child)

    def _find(self, directory: int, name: str) -> tuple[str, int | None]:
        """What `name` is in `directory`, in the finder's order: a package (a directory;
        without `__init__.py`, a namespace package), an extension module, a source file."""
        raw = name.encode()
        sub = self._lookup(directory, raw)
        if sub is not None and self.index.inode(sub).is_dir:
            return "package", sub
        ext = self._extension(directory, name)
        if ext is not None:
            return "module", ext
        source = self._lookup(directory, raw + b".py")
        if source is not None and self.index.inode(source).is_reg:
            return "source", source
        return "", None

    def loaded(self, directory: int, stem: bytes, source: int) -> int:
        """The file the interpreter reads for the source `stem.py` in `directory`: its
        compiled `__pycache__/stem.cpython-3N.pyc` where the image has one (the source is
        then only stat'ed: Debian's packages compile theirs when installed), else the
        source."""
        cache = self._lookup(directory, b"__pycache__")
        if cache is None or not self.index.inode(cache).is_dir:
            return source
        return self._by_stem(cache, _compiled).get(stem.decode("ascii", "replace"), source)

    def _extension(self, directory: int, name: str) -> int | None:
        return self._by_stem(directory, _extension).get(name)

    def _by_stem(self, directory: int, kind: Callable[[bytes], bool]) -> dict[str, int]:
        """The regular files of `directory` that `kind` takes, by the name before their
        first dot (the first in name order of each), listed once per directory and kind."""
        table = self._stems.get((directory, kind))
        if table is None:
            table = self._stems[directory, kind] = {}
            self.steps -= self.index.inode(directory).count
            if self.steps >= 0:
                for _, entry, child in self.index.entries(directory):
                    if kind(entry) and self.index.inode(child).is_reg:
                        stem = entry.split(b".", 1)[0].decode("ascii", "replace")
                        table.setdefault(stem, child)
        return table

    def _lookup(self, directory: int, name: bytes) -> int | None:
        self.steps -= 1
        if self.steps < 0:
            return None
        return self.index.lookup(directory, name)

    def _top(self, directory: int) -> int:
        """The directory above the importing file's outermost package: where an absolute
        import of its own top-level package is found (a script's directory, site-packages)."""
        top = self._tops.get(directory)
        if top is None:
            top, hops = directory, 0
            while (self._lookup(top, _INIT) is not None and top in self.parents
                   and hops < 64):
                top, hops = self.parents[top], hops + 1
            self._tops[directory] = top
        return top


def _extension(name: bytes) -> bool:
    """`m.cpython-311-x86_64-linux-gnu.so`, `m.abi3.so`, `m.so`."""
    return name.endswith(b".so")


def _compiled(name: bytes) -> bool:
    """`m.cpython-311.pyc`, not an optimized `m.cpython-311.opt-1.pyc`."""
    return name.endswith(b".pyc") and b".cpython-" in name and b".opt-" not in name


def python_roots(index: Index) -> tuple[list[tuple[int, bool]], dict[int, int]]:
    """The image's Python directories in sys.path's order, each with whether its stdlib runs
    frozen (3.11+), and every directory's parent."""
    parents: dict[int, int] = {}
    stdlib: list[tuple[bytes, int, bool]] = []
    for path, node in index.walk():
        if not node.is_dir:
            continue
        name = path.rpartition(b"/")[2]
        match = _STDLIB.fullmatch(name)
        if match and path.rpartition(b"/")[0].rpartition(b"/")[2] in (b"lib", b"lib64"):
            minor = int(match.group(1) or 0)
            stdlib.append((path, node.ino, minor >= 11))
    for parent, children in index.directories():
        for child in children:
            if child != ROOT_INO and index.inode(child).is_dir:
                parents.setdefault(child, parent)
    roots: list[tuple[int, int, bytes, int, bool]] = []
    for path, ino, frozen in stdlib:
        roots.append((0, 0 if path.startswith(b"usr/lib") else 1, path, ino, frozen))
        for rank, kid in enumerate(_ROOT_KIDS):
            sub = index.lookup(ino, kid)
            if sub is not None and index.inode(sub).is_dir:
                roots.append((1 + min(rank, 1), 0 if b"local" in path else 1, path, sub,
                              frozen and kid == b"lib-dynload"))
    roots.sort()
    return [(ino, frozen) for *_, ino, frozen in roots][:ROOTS_MAX], parents


def record(index: Index, sources: Mapping[str, bytes]) -> dict[str, Any] | None:
    """The `imports` record of the tree `index` encodes, scanning the `.py` files whose
    bytes `sources` holds (by blob key); a source's compiled file, where the image has one,
    gets the same entry. None when there are none. Deterministic."""
    roots, parents = python_roots(index)
    finder = Finder(index, roots, parents)
    deps: dict[int, list[int]] = {}
    for directory, _ in index.directories():
        for _, name, child in index.entries(directory):
            if not name.endswith(b".py") or child in deps:
                continue
            key = index.single_chunk(child)
            source = sources.get(key) if key is not None else None
            if source is not None:
                compiled = finder.loaded(directory, name[:-3], child)
                deps[child] = [d for d in finder.dependencies(directory, imports(source))
                               if d not in (child, compiled)]
                if compiled != child:
                    deps[compiled] = deps[child]
    if not deps:
        return None
    return {META_KEY: {"version": VERSION, "table": deptable.encode(deps)}}


class ImportTable(deptable.DepTable):
    """A decoded, checked `imports` record: each scanned source file's direct imports."""

    def __init__(self, index: Index, record: Any) -> None:
        super().__init__(index, record, VERSION, MAX_DEPS, "imports", ImportTableError)


def load(index: Index) -> ImportTable | None:
    """The index's import table; None if it has none (older indexes, lower chains);
    ImportTableError if it has a record this version cannot use."""
    record = index.meta.get(META_KEY)
    if record is None:
        return None
    return ImportTable(index, record)
