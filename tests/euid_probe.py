"""A subject for setuid tests: a tiny static program that exits with its effective uid.

`busybox` drops a setuid bit's privileges for every applet that does not need them, and a
setuid script is run without them, so neither shows whether the kernel honoured the bit.
This program makes two syscalls, geteuid() and exit_group(euid), so its exit status is the
low byte of its effective uid: 0 when a setuid-root copy really ran as root. Hand-assembled
(no compiler, no libc), it runs on the host and in any image alike.
"""

from __future__ import annotations

import platform
import struct

BASE = 0x400000
HEADERS = 64 + 56  # the ELF header and one program header; the code follows them

# (ELF e_machine, code): geteuid(), then exit_group() with its result.
CODE = {
    "x86_64": (62, bytes.fromhex(
        "b86b000000"  # mov eax, 107 (geteuid)
        "0f05"  # syscall
        "89c7"  # mov edi, eax
        "b8e7000000"  # mov eax, 231 (exit_group)
        "0f05")),  # syscall
    "aarch64": (183, struct.pack(
        "<4I",
        0xD28015E8,  # mov x8, #175 (geteuid)
        0xD4000001,  # svc #0 (the result is in x0, exit_group's argument)
        0xD2800BC8,  # mov x8, #94 (exit_group)
        0xD4000001)),  # svc #0
}


def euid_probe(machine: str | None = None) -> bytes:
    """The program for this machine's architecture (uname -m)."""
    e_machine, code = CODE[machine or platform.machine()]
    size = HEADERS + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, e_machine, 1, BASE + HEADERS, 64, 0, 0,
                                 64, 56, 1, 0, 0, 0)  # executable, one program header
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE, BASE, size, size, 0x1000)  # PT_LOAD r-x
    return header + load + code


def status_of(uid: int) -> int:
    """The probe's exit status when its effective uid is `uid`."""
    return uid & 0xFF
