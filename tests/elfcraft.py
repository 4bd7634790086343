"""Small ELF objects made to order: headers, an interpreter, a dynamic section, nothing to
run. What indexer/elf.py reads of a real object, laid out the way linkers lay it out (one
PT_LOAD mapping the whole file; the string table before the dynamic section, which may sit
far out, past padding)."""

from __future__ import annotations

import struct

BASE = 0x10000  # where the one PT_LOAD maps the file
X86_64, I386 = 62, 3


def build(needed: tuple[bytes, ...] = (), interp: bytes | None = None,
          runpath: bytes | None = None, rpath: bytes | None = None, wordsize: int = 64,
          machine: int = X86_64, dynamic_at: int = 0, e_type: int = 3) -> bytes:
    """An ELF object asking for `interp` and `needed`, its dynamic section at
    `dynamic_at` (or right after the strings)."""
    o = "<"
    ehdr_size, ph_size = (64, 56) if wordsize == 64 else (52, 32)
    phnum = 2 + (interp is not None)
    strings = bytearray(b"\0")
    offsets = []
    for name in (*needed, runpath or b"", rpath or b""):
        offsets.append(len(strings))
        strings += name + b"\0"
    interp_off = ehdr_size + phnum * ph_size
    blob_interp = (interp + b"\0") if interp is not None else b""
    str_off = interp_off + len(blob_interp)
    dyn_off = max(dynamic_at, str_off + len(strings))
    entries = [(1, offsets[i]) for i in range(len(needed))]
    if runpath is not None:
        entries.append((29, offsets[len(needed)]))
    if rpath is not None:
        entries.append((15, offsets[len(needed) + 1]))
    entries += [(5, BASE + str_off), (10, len(strings)), (0, 0)]
    dyn = b"".join(struct.pack(o + ("qQ" if wordsize == 64 else "iI"), t, v)
                   for t, v in entries)
    total = dyn_off + len(dyn)
    phdrs = []
    if interp is not None:
        phdrs.append(_phdr(o, wordsize, 3, interp_off, BASE + interp_off, len(blob_interp)))
    phdrs.append(_phdr(o, wordsize, 1, 0, BASE, total))
    phdrs.append(_phdr(o, wordsize, 2, dyn_off, BASE + dyn_off, len(dyn)))
    ident = b"\x7fELF" + bytes([1 if wordsize == 32 else 2, 1, 1]) + bytes(9)
    if wordsize == 64:
        ehdr = ident + struct.pack(o + "HHIQQQIHHHHHH", e_type, machine, 1, 0, ehdr_size, 0, 0,
                                   ehdr_size, ph_size, phnum, 0, 0, 0)
    else:
        ehdr = ident + struct.pack(o + "HHIIIIIHHHHHH", e_type, machine, 1, 0, ehdr_size, 0, 0,
                                   ehdr_size, ph_size, phnum, 0, 0, 0)
    head = ehdr + b"".join(phdrs) + blob_interp + bytes(strings)
    return head + bytes(dyn_off - len(head)) + dyn


def _phdr(o: str, wordsize: int, p_type: int, offset: int, vaddr: int, size: int) -> bytes:
    if wordsize == 64:
        return struct.pack(o + "IIQQQQQQ", p_type, 4, offset, vaddr, vaddr, size, size, 8)
    return struct.pack(o + "IIIIIIII", p_type, offset, vaddr, vaddr, size, size, 4, 4)
