"""Libraries: the load chain of every ELF object, resolved at index time inside the image,
and brought in at once by a mount on the object's first read."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Server
from elfcraft import I386, build
from faultproxy import FaultProxy
from hypothesis import given, settings
from hypothesis import strategies as st
from test_profile import mounted

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs.mounts import mount
from indexer import libraries
from indexer.build import IndexOptions, index_image
from indexer.catalog import load_index
from indexer.deptable import DepTable
from indexer.elf import ElfInfo
from indexer.format import Index
from indexer.imports import ImportTable, ImportTableError
from indexer.libraries import LibraryTable, LibraryTableError
from indexer.sources import open_source

MiB = 1 << 20
PAD = 300 << 10  # past the neighbour pack's limit: each library is a blob of its own
ARCH = "usr/lib/x86_64-linux-gnu"
LD = b"/lib64/ld-linux-x86-64.so.2"


def _files() -> list[Entry]:
    """A merged-/usr tree as Debian lays it out, with the corners the loader's search has:
    a RUNPATH with $ORIGIN, ld.so.conf with an include, a 32-bit library of the same name
    first in the search order, a versioned symlink, a name found nowhere."""
    return [
        Entry("lib", "symlink", linkname="usr/lib"),
        Entry("lib64", "symlink", linkname="usr/lib64"),
        Entry("usr/lib64/ld-linux-x86-64.so.2", "symlink",
              linkname="../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        Entry(f"{ARCH}/ld-linux-x86-64.so.2", data=build(dynamic_at=PAD)),
        Entry(f"{ARCH}/libc.so.6", data=build((b"ld-linux-x86-64.so.2",), LD, dynamic_at=PAD)),
        Entry(f"{ARCH}/libz.so.1", "symlink", linkname="libz.so.1.2.13"),
        Entry(f"{ARCH}/libz.so.1.2.13", data=build((b"libc.so.6",), dynamic_at=PAD)),
        Entry("usr/lib/prog/libplugin.so", data=build((b"libc.so.6",), rpath=b"/plugin",
                                                      dynamic_at=PAD)),
        Entry("opt/lib32/libextra.so", data=build((b"libc.so.6",), wordsize=32,
                                                  machine=I386, dynamic_at=PAD)),
        Entry("opt/lib/libextra.so", data=build((b"libc.so.6",), rpath=b"/extra",
                                                dynamic_at=PAD)),
        Entry("etc/ld.so.conf", data=b"# comment\ninclude /etc/ld.so.conf.d/*.conf\n"),
        Entry("etc/ld.so.conf.d/a.conf", data=b"/opt/lib32\n"),
        Entry("etc/ld.so.conf.d/b.conf", data=b"/opt/lib  # the 64-bit one\n"),
        Entry("usr/bin/prog", data=build(
            (b"libz.so.1", b"libplugin.so", b"libextra.so", b"libmissing.so"), LD,
            runpath=b"$ORIGIN/../lib/prog", dynamic_at=PAD)),
        Entry("usr/bin/big", data=build((b"libc.so.6",), dynamic_at=9 * MiB)),
        Entry("usr/bin/script", data=b"#!/bin/sh\necho not an object\n" * 20000),
    ]


FILES = _files()


def _index(tmp_path: Path, url: str) -> tuple[str, Index]:
    build_layout(tmp_path / "l", "t", [FILES], compression="none")
    store = open_store(url)
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions()).record
    return rec.ref, load_index(store, rec.index)


def _ino(index: Index, path: str) -> int:
    ino = index.resolve(path.encode())
    assert ino is not None
    return ino


def _table(index: Index) -> LibraryTable:
    table = libraries.load(index)
    assert table is not None
    return table


# ------------------------------------------------------------------------ index time


def test_each_object_lists_what_the_loader_would_open(tmp_path: Path) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    table = _table(index)
    ino = {p: _ino(index, p) for p in (
        f"{ARCH}/ld-linux-x86-64.so.2", f"{ARCH}/libc.so.6", f"{ARCH}/libz.so.1.2.13",
        "usr/lib/prog/libplugin.so", "opt/lib/libextra.so", "opt/lib32/libextra.so",
        "usr/bin/prog", "usr/bin/big")}
    ld, libc = ino[f"{ARCH}/ld-linux-x86-64.so.2"], ino[f"{ARCH}/libc.so.6"]
    assert table.deps[ino["usr/bin/prog"]] == (  # interpreter first, the missing one left out
        ld, ino[f"{ARCH}/libz.so.1.2.13"], ino["usr/lib/prog/libplugin.so"],
        ino["opt/lib/libextra.so"])  # not the 32-bit one listed before it
    assert table.deps[libc] == (ld,)
    assert table.deps[ino["usr/bin/big"]] == (libc,)  # its dynamic section lies at 9 MiB
    assert table.deps[ld] == ()
    assert ino["opt/lib32/libextra.so"] in table.deps  # described, though nothing loads it
    assert _ino(index, "usr/bin/script") not in table.deps
    assert table.closure(ino["usr/bin/prog"], 64) == [
        ino["usr/bin/prog"], ld, ino[f"{ARCH}/libz.so.1.2.13"], ino["usr/lib/prog/libplugin.so"],
        ino["opt/lib/libextra.so"], libc]
    assert table.closure(ino["usr/bin/prog"], 3) == [ino["usr/bin/prog"], ld,
                                                     ino[f"{ARCH}/libz.so.1.2.13"]]


def test_reindexing_writes_the_same_record(tmp_path: Path) -> None:
    _, first = _index(tmp_path / "a", f"file://{tmp_path}/store")
    _, second = _index(tmp_path / "b", f"file://{tmp_path}/store")
    assert first.meta[libraries.META_KEY] == second.meta[libraries.META_KEY]


def test_a_symlink_loop_or_an_escape_resolves_to_nothing(tmp_path: Path) -> None:
    files = [Entry("loop", "symlink", linkname="loop/x"),
             Entry("usr/lib/libup.so", "symlink", linkname="../../../../etc/x"),
             Entry("etc/x", data=build()),
             Entry("usr/bin/p", data=build((b"libup.so", b"libloop.so"),
                                           runpath=b"/loop:/usr/lib"))]
    build_layout(tmp_path / "l", "t", [files], compression="none")
    store = open_store(f"file://{tmp_path}/store")
    index = load_index(store, index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store,
                                          IndexOptions()).record.index)
    # ".." stops at the image's root, as in a chroot: the link names the image's /etc/x
    assert _table(index).deps[_ino(index, "usr/bin/p")] == (_ino(index, "etc/x"),)


def test_the_resolution_stays_within_its_step_budget(tmp_path: Path) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    info = ElfInfo(64, 62, LD, (b"libz.so.1",) * 50, ())
    resolver = libraries.Resolver(index, {}, [], budget=10)
    assert resolver.dependencies(b"/usr/bin", info) == []
    assert resolver.steps < 0


# ------------------------------------------------------------------------ the record


def _words(*words: int) -> str:
    return base64.b64encode(struct.pack(f"<{len(words)}I", *words)).decode()


@pytest.mark.parametrize("change", [
    "not a dict", "version", "no table", "not base64", "odd length", "cut record",
    "count too big", "out of order", "not a file", "out of range"])
def test_a_bad_record_is_a_declared_error(tmp_path: Path, change: str) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    low, high = sorted((_ino(index, "usr/bin/prog"), _ino(index, f"{ARCH}/libc.so.6")))
    record: Any = {"version": 1, "table": _words(low, 0, high, 1, low)}
    LibraryTable(index, record)  # the good one loads
    record = {
        "not a dict": [1], "version": {**record, "version": 2}, "no table": {"version": 1},
        "not base64": {"version": 1, "table": "%%%"},
        "odd length": {"version": 1, "table": base64.b64encode(b"abcde").decode()},
        "cut record": {"version": 1, "table": _words(low)},
        "count too big": {"version": 1, "table": _words(low, 65, *[high] * 65)},
        "out of order": {"version": 1, "table": _words(high, 0, low, 0)},
        "not a file": {"version": 1, "table": _words(1, 0)},
        "out of range": {"version": 1, "table": _words(low, 1, index.inode_count + 1)},
    }[change]
    with pytest.raises(LibraryTableError):
        LibraryTable(index, record)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    tmp = tmp_path_factory.mktemp("libs")
    return _index(tmp, f"file://{tmp}/store")[1]


@pytest.mark.parametrize(("kind", "error"), [(LibraryTable, LibraryTableError),
                                              (ImportTable, ImportTableError)])
@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=400))
def test_any_table_bytes_load_or_fail_declared(small_index: Index,
                                               kind: Callable[[Index, Any], DepTable],
                                               error: type[Exception], raw: bytes) -> None:
    """Both dependency records share indexer/deptable.py's decoder."""
    record = {"version": 1, "table": base64.b64encode(raw).decode()}
    try:
        table = kind(small_index, record)
    except error:
        return
    for ino in table.deps:
        assert len(table.closure(ino, 64)) <= 64


# ------------------------------------------------------------------------ real mounts


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def _blob_gets(proxy: FaultProxy) -> list[str]:
    return [path for method, path, _ in proxy.requests if method == "GET" and "/blobs/" in path]


def _settle(mnt: Path, proxy: FaultProxy, blobs: int, gets: int) -> None:
    """Wait for the blobs asked for ahead to be fetched, and a little longer."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if mount.query(mnt)["library_blobs"] >= blobs and len(_blob_gets(proxy)) >= gets:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # nothing more should come


@pytest.mark.root
@pytest.mark.parametrize("ahead", [True, False])
def test_a_programs_first_read_brings_its_libraries(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ahead: bool) -> None:
    """Reading a program's header fetches, at once, its interpreter and every library it
    loads, directly or not (5 blobs); the loader's reads of them then ask for nothing. A
    large object comes whole. Without the feature each is a request when read."""
    ref, _ = _index(tmp_path, s3_server.url)
    want = {str(e.path): e.data for e in FILES}
    monkeypatch.setenv("CAFS_LIBRARIES_AHEAD", "32M" if ahead else "0")
    chain = [f"{ARCH}/ld-linux-x86-64.so.2", f"{ARCH}/libz.so.1.2.13",
             "usr/lib/prog/libplugin.so", "opt/lib/libextra.so", f"{ARCH}/libc.so.6"]
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        with open(mnt / "usr/bin/prog", "rb") as f:
            assert f.read(64) == want["usr/bin/prog"][:64]
        _settle(mnt, proxy, 5 if ahead else 0, 6 if ahead else 1)
        stats = mount.query(mnt)
        assert stats["library_blobs"] == (5 if ahead else 0), stats
        assert len(_blob_gets(proxy)) == (6 if ahead else 1), _blob_gets(proxy)
        for path in chain:
            assert (mnt / path).read_bytes() == want[path]
        assert len(_blob_gets(proxy)) == 6  # with: nothing more; without: one each
        proxy.requests.clear()
        with open(mnt / "usr/bin/big", "rb") as f:  # 3 chunks: the other two come ahead
            assert f.read(64) == want["usr/bin/big"][:64]
        _settle(mnt, proxy, 7 if ahead else 0, 3 if ahead else 1)
        assert len(_blob_gets(proxy)) == (3 if ahead else 1), _blob_gets(proxy)
        assert mount.query(mnt)["corrupt_blobs"] == 0
        assert (mnt / "usr/bin/big").read_bytes() == want["usr/bin/big"]
        assert (mnt / "usr/bin/prog").read_bytes() == want["usr/bin/prog"]


@pytest.mark.root
def test_small_libraries_come_alone_not_with_their_directory(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    """Libraries small enough for the neighbour pack are brought ahead as the table names
    them, each alone: not with the pack's segment around each and the rest of their
    directory, which holds other programs' libraries (#20: python3's brought 1.1 MB of
    `usr/lib/x86_64-linux-gnu` it never loads)."""
    others = [f"{ARCH}/libother{n:02d}.so" for n in range(20)]
    files = [Entry("lib64", "symlink", linkname="usr/lib64"),
             Entry("usr/lib64/ld-linux-x86-64.so.2", "symlink",
                   linkname="../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
             Entry(f"{ARCH}/ld-linux-x86-64.so.2", data=build()),
             Entry(f"{ARCH}/libc.so.6", data=build((b"ld-linux-x86-64.so.2",), LD)),
             *(Entry(p, data=build((b"libc.so.6",)) + p.encode() * 200) for p in others),
             Entry("usr/bin/prog", data=build((b"libc.so.6",), LD))]
    want = {str(e.path): e.data for e in files}
    build_layout(tmp_path / "l", "t", [files], compression="none")
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(s3_server.url),
                      IndexOptions()).record
    with mounted(rec.ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        with open(mnt / "usr/bin/prog", "rb") as f:
            assert f.read(64) == want["usr/bin/prog"][:64]
        _settle(mnt, proxy, 2, 2)
        assert mount.query(mnt)["library_blobs"] == 2
        assert len(_blob_gets(proxy)) == 2, proxy.requests  # the interpreter and libc
        for path in (f"{ARCH}/ld-linux-x86-64.so.2", f"{ARCH}/libc.so.6"):
            assert (mnt / path).read_bytes() == want[path]
        proxy.requests.clear()
        assert (mnt / others[7]).read_bytes() == want[others[7]]
        assert any(method == "GET" for method, _, _ in proxy.requests)  # not brought before
