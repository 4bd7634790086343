"""ELF objects, recognised while indexing: which interpreter and libraries each one loads.

A dynamically linked program starts with a chain of reads the filesystem cannot see coming:
the kernel reads the program's header, then its interpreter's; the interpreter reads each
library its `DT_NEEDED` entries name, then theirs. On a lazily loaded image each of those
first reads is a round trip to the store, one after another (#20's `import numpy`: python,
ld.so, libm, libc; then BLAS, LAPACK, gfortran, quadmath, each waiting for the one before).
The index can carry that chain (indexer/libraries.py), so that the first read of a program
brings its libraries with it; this module finds what each file asks for.

The probe sees a file's chunks as they stream past `LayerApplier._content`, so indexing
reads nothing twice. It keeps the file's first `HEAD_MAX` bytes (the ELF and program
headers, and, in every linker's layout, the dynamic string table) and the bytes of the
`PT_DYNAMIC` segment wherever they lie. The bytes come from an image nobody vetted: every
offset and count is checked against what was kept and against fixed bounds, and anything
odd makes the file "not an ELF object the index describes" (`ElfError` inside, `None` out),
never an indexing failure: what this finds is a hint for fetching ahead, never a reason to
serve or refuse a byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"\x7fELF"
HEAD_MAX = 4 << 20  # bytes kept from a file's start: headers and the dynamic string table
DYNAMIC_MAX = 64 << 10  # a PT_DYNAMIC segment larger than this is not believed
INTERP_MAX = 4096  # PATH_MAX: the kernel's bound on PT_INTERP
PHNUM_MAX = 256  # program headers looked at (real objects have about 10)
NEEDED_MAX = 128  # DT_NEEDED entries kept
SEARCH_MAX = 32  # DT_RUNPATH / DT_RPATH entries kept
NAME_MAX = 255  # a DT_NEEDED name longer than a file name is no library's
SEARCH_LEN_MAX = 4096  # bytes of one DT_RUNPATH / DT_RPATH string
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29


class ElfError(ValueError):
    """The bytes are not an ELF object this module can describe."""


@dataclass(frozen=True)
class ElfInfo:
    """What the dynamic loader would ask for on this object's behalf."""

    wordsize: int  # 32 or 64 (EI_CLASS): ld.so loads only libraries of its own class
    machine: int  # e_machine: and of its own machine
    interp: bytes | None  # PT_INTERP: the program's loader (absolute path), if any
    needed: tuple[bytes, ...]  # DT_NEEDED names, in order
    search: tuple[bytes, ...]  # DT_RUNPATH entries, or DT_RPATH's where there is no RUNPATH

    def compatible(self, other: ElfInfo) -> bool:
        return self.wordsize == other.wordsize and self.machine == other.machine


@dataclass(frozen=True)
class _Layout:
    """From the headers: how to read the rest."""

    wordsize: int
    machine: int
    order: str  # struct byte order
    loads: tuple[tuple[int, int, int], ...]  # (vaddr, filesz, offset) of each PT_LOAD
    interp: tuple[int, int] | None  # (offset, size)
    dynamic: tuple[int, int] | None  # (offset, size)


class _Head:
    """A file's first `HEAD_MAX` bytes as the chunks that brought them, kept by reference:
    most of an object's head is code nobody reads here, so only what is read is copied."""

    def __init__(self, size: int) -> None:
        self.limit = min(size, HEAD_MAX)
        self.parts: list[tuple[int, bytes]] = []
        self.have = 0  # bytes from the start kept so far (at most `limit`)

    def add(self, start: int, data: bytes) -> None:
        if start < self.limit:
            self.parts.append((start, data))
            self.have = min(start + len(data), self.limit)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length); ElfError past the head, _NeedMore past what
        has arrived of it."""
        if length == 0:
            return b""
        if offset + length > self.limit:
            raise ElfError("a structure lies past the kept bytes")
        if offset + length > self.have:
            raise _NeedMore
        out = []
        for start, data in self.parts:
            lo, hi = max(offset, start), min(offset + length, start + len(data))
            if lo < hi:
                out.append(memoryview(data)[lo - start : hi - start])
        return b"".join(out)


class ElfProbe:
    """Fed a file's bytes in order, chunk by chunk, while `wants_more`; then `result()`."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.wants_more = size >= 64
        self._head = _Head(size)
        self._pos = 0
        self._layout: _Layout | None = None
        self._dynamic = bytearray()  # the part of PT_DYNAMIC past the head
        self._failed = not self.wants_more

    def feed(self, data: bytes) -> None:
        if not self.wants_more:
            return
        start, self._pos = self._pos, self._pos + len(data)
        if start == 0 and data[:4] != MAGIC[: len(data)]:  # most files: one look
            self._failed = True
            self.wants_more = False
            return
        self._head.add(start, data)
        if self._layout is None:
            try:
                self._layout = _layout(self._head, self.size)
            except ElfError:
                self._failed = True
                self.wants_more = False
                return
            except _NeedMore:
                return
        dyn = self._layout.dynamic
        if dyn is not None:
            lo, hi = max(dyn[0], start, self._head.limit), min(dyn[0] + dyn[1], self._pos)
            if lo < hi:
                self._dynamic += memoryview(data)[lo - start : hi - start]
        self.wants_more = self._pos < self._head.limit or (
            dyn is not None and self._pos < dyn[0] + dyn[1])

    def result(self) -> ElfInfo | None:
        """The object's description, or None if it is not one this module can describe."""
        if self._failed or self._layout is None or self.wants_more:
            return None
        dyn = self._layout.dynamic
        try:
            dynamic = b""
            if dyn is not None:
                inside = max(0, min(dyn[0] + dyn[1], self._head.limit) - dyn[0])
                dynamic = self._head.read(dyn[0], inside) + self._dynamic
            return _describe(self._layout, self._head, dynamic)
        except (ElfError, _NeedMore):
            return None


def probe(size: int) -> ElfProbe:
    return ElfProbe(size)


def describe(data: bytes) -> ElfInfo | None:
    """`data` (a whole file) described, or None: the same answer the probe gives."""
    p = ElfProbe(len(data))
    p.feed(data)
    return p.result()


class _NeedMore(Exception):
    """The headers lie past the bytes seen so far."""


def _layout(head: _Head, size: int) -> _Layout:
    ident = head.read(0, 16)
    if ident[:4] != MAGIC:
        raise ElfError("no ELF magic")
    wordsize = {1: 32, 2: 64}.get(ident[4])
    order = {1: "<", 2: ">"}.get(ident[5])
    if wordsize is None or order is None:
        raise ElfError("unknown ELF class or byte order")
    ehdr = struct.Struct(order + ("HHIQQQIHHHHHH" if wordsize == 64 else "HHIIIIIHHHHHH"))
    e_type, machine, _, _, phoff, _, _, _, phentsize, phnum, *_ = ehdr.unpack(
        head.read(16, ehdr.size))
    if e_type not in (ET_EXEC, ET_DYN):
        raise ElfError("neither an executable nor a shared object")
    phdr = struct.Struct(order + ("IIQQQQQQ" if wordsize == 64 else "IIIIIIII"))
    if phentsize != phdr.size or not 0 < phnum <= PHNUM_MAX:
        raise ElfError("bad program header table")
    table = head.read(phoff, phnum * phentsize)
    loads: list[tuple[int, int, int]] = []
    interp = dynamic = None
    for fields in phdr.iter_unpack(table):
        if wordsize == 64:
            p_type, _, offset, vaddr, _, filesz, _, _ = fields
        else:
            p_type, offset, vaddr, _, filesz, _, _, _ = fields
        if offset + filesz > size:
            raise ElfError("a segment runs past the file's end")
        if p_type == PT_LOAD:
            loads.append((vaddr, filesz, offset))
        elif p_type == PT_INTERP and interp is None:
            interp = (offset, filesz)
        elif p_type == PT_DYNAMIC and dynamic is None:
            if filesz > DYNAMIC_MAX:
                raise ElfError("dynamic segment too large")
            dynamic = (offset, filesz)
    return _Layout(wordsize, machine, order, tuple(loads), interp, dynamic)


def _describe(layout: _Layout, head: _Head, dynamic: bytes) -> ElfInfo:
    interp = None
    if layout.interp is not None:
        offset, size = layout.interp
        if size > INTERP_MAX:
            raise ElfError("PT_INTERP out of bounds")
        interp = head.read(offset, size).rstrip(b"\0")
        if not interp.startswith(b"/") or b"\0" in interp:
            raise ElfError("PT_INTERP is not an absolute path")
    needed: list[bytes] = []
    search: tuple[bytes, ...] = ()
    if layout.dynamic is not None:
        needed, search = _dynamic(layout, head, dynamic)
    return ElfInfo(layout.wordsize, layout.machine, interp, tuple(needed), search)


def _dynamic(layout: _Layout, head: _Head, dynamic: bytes
             ) -> tuple[list[bytes], tuple[bytes, ...]]:
    entry = struct.Struct(layout.order + ("qQ" if layout.wordsize == 64 else "iI"))
    if len(dynamic) != layout.dynamic[1]:  # type: ignore[index]
        raise ElfError("dynamic segment not seen whole")
    needed: list[int] = []
    strtab = strsz = rpath = runpath = None
    for tag, value in entry.iter_unpack(dynamic[: len(dynamic) - len(dynamic) % entry.size]):
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED and len(needed) < NEEDED_MAX:
            needed.append(value)
        elif tag == DT_STRTAB:
            strtab = value
        elif tag == DT_STRSZ:
            strsz = value
        elif tag == DT_RPATH:
            rpath = value
        elif tag == DT_RUNPATH:
            runpath = value
    if strtab is None or strsz is None:
        if needed or rpath is not None or runpath is not None:
            raise ElfError("dynamic segment names strings but has no string table")
        return [], ()
    table = _strings(layout, head, strtab, strsz)
    names = [_string(table, off, NAME_MAX) for off in needed]
    chosen = runpath if runpath is not None else rpath
    search: tuple[bytes, ...] = ()
    if chosen is not None:
        search = tuple(p for p in _string(table, chosen, SEARCH_LEN_MAX).split(b":") if p)
        search = search[:SEARCH_MAX]
    return [n for n in names if n], search


def _strings(layout: _Layout, head: _Head, vaddr: int, size: int) -> bytes:
    """The dynamic string table's bytes, found through the PT_LOAD that maps its address."""
    for seg_vaddr, filesz, offset in layout.loads:
        if seg_vaddr <= vaddr and vaddr + size <= seg_vaddr + filesz:
            return head.read(offset + (vaddr - seg_vaddr), size)
    raise ElfError("dynamic string table outside every loaded segment")


def _string(table: bytes, offset: int, limit: int) -> bytes:
    end = table.find(b"\0", offset, offset + limit + 1)
    if offset >= len(table) or end < 0:
        raise ElfError("unterminated or overlong string")
    return table[offset:end]
