"""The ELF probe: what a program asks the dynamic loader for, read from untrusted bytes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from elfcraft import I386, build
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer import elf
from indexer.elf import HEAD_MAX, ElfProbe, describe


def _fed(data: bytes, piece: int) -> elf.ElfInfo | None:
    probe = ElfProbe(len(data))
    for start in range(0, len(data), piece):
        if not probe.wants_more:
            break
        probe.feed(data[start : start + piece])
    return probe.result()


def test_the_hosts_python_asks_for_its_loader_and_libc() -> None:
    info = describe(Path(os.path.realpath(sys.executable)).read_bytes())
    assert info is not None and info.wordsize == 64
    assert info.interp is not None and info.interp.startswith(b"/")
    assert b"libc.so.6" in info.needed


def test_interpreter_needed_and_runpath_are_read() -> None:
    data = build(needed=(b"libz.so.1", b"libc.so.6"), interp=b"/lib64/ld-linux-x86-64.so.2",
                 runpath=b"$ORIGIN/../lib:/opt/x", rpath=b"/ignored")
    info = describe(data)
    assert info == elf.ElfInfo(64, 62, b"/lib64/ld-linux-x86-64.so.2",
                               (b"libz.so.1", b"libc.so.6"), (b"$ORIGIN/../lib", b"/opt/x"))
    only_rpath = describe(build(needed=(b"liba.so",), rpath=b"/r1:/r2"))
    assert only_rpath is not None and only_rpath.search == (b"/r1", b"/r2")  # no RUNPATH
    small = describe(build(needed=(b"libc.so.6",), wordsize=32, machine=I386))
    assert small is not None and (small.wordsize, small.machine) == (32, I386)
    assert not small.compatible(only_rpath)


def test_a_dynamic_section_far_out_is_found_in_any_chunking() -> None:
    data = build(needed=(b"libfar.so",), dynamic_at=HEAD_MAX + 12345)
    whole = describe(data)
    assert whole is not None and whole.needed == (b"libfar.so",)
    for piece in (100, 4096, 1 << 20, 4 << 20, 16 << 20):
        assert _fed(data, piece) == whole


@pytest.mark.parametrize("data", [
    b"", b"#!/bin/sh\necho hi\n" * 10, b"\x7fELF" + bytes(100),
    build(needed=(b"libc.so.6",), e_type=1),  # a relocatable object: nothing to load
    build(needed=(b"libc.so.6",))[:-8],  # the dynamic section cut short
])
def test_what_is_not_a_loadable_object_is_none(data: bytes) -> None:
    assert describe(data) is None
    assert _fed(data, 7) is None


def test_a_file_that_is_not_elf_stops_the_probe_at_once() -> None:
    probe = ElfProbe(1 << 30)
    probe.feed(b"PK\x03\x04" + bytes(1000))
    assert not probe.wants_more and probe.result() is None


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_damaged_objects_give_an_answer_or_none(data: st.DataObject) -> None:
    """Any byte changed, any length: a description or None, never another error."""
    raw = bytearray(build(needed=(b"libz.so.1", b"libc.so.6"), interp=b"/lib/ld.so",
                          runpath=b"$ORIGIN"))
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    info = describe(bytes(raw))
    assert info is None or isinstance(info, elf.ElfInfo)
    assert _fed(bytes(raw), data.draw(st.integers(1, 64))) == info
