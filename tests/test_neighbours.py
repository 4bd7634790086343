"""Neighbour packs: a cold read of a small file brings its directory's siblings in one GET."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Server
from faultproxy import FaultProxy
from hypothesis import given, settings
from hypothesis import strategies as st
from test_profile import mounted

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from blobstore.envelope import HEADER_SIZE, decode
from cafs.mounts import mount
from indexer import neighbours
from indexer.build import IndexOptions, index_image
from indexer.catalog import find_image, load_index
from indexer.format import Index
from indexer.neighbours import NeighbourTable, NeighbourTableError
from indexer.sources import open_source

KiB = 1 << 10


def _make_files() -> list[Entry]:
    """A package `lib` of two subpackages of small files (a `__pycache__` each) and a file
    too big for the pack."""
    rnd = random.Random(20)
    files = [Entry("lib/__init__.py", data=b"from . import alpha\n")]
    for pkg in ("alpha", "beta"):
        files += [Entry(f"lib/{pkg}/mod{n:02d}.py", data=rnd.randbytes(3 * KiB + n))
                  for n in range(12)]
        files += [Entry(f"lib/{pkg}/__pycache__/mod{n:02d}.pyc",
                        data=rnd.randbytes(5 * KiB + n)) for n in range(12)]
    files += [Entry("lib/big.bin", data=rnd.randbytes(600 * KiB)),
              Entry("lib/alpha/same.py", data=b"identical\n"),
              Entry("lib/beta/same.py", data=b"identical\n")]
    return files


FILES = _make_files()


def _files() -> list[Entry]:
    return FILES


def _index(tmp_path: Path, url: str, **opts: Any) -> tuple[str, Index]:
    build_layout(tmp_path / "l", "t", [_files()], compression="none")
    store = open_store(url)
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions(**opts)).record
    return rec.ref, load_index(store, rec.index)


def _path_of(index: Index) -> dict[int, str]:
    return {node.ino: path.decode() for path, node in index.walk()}


def _local_table(tmp_path: Path) -> tuple[Index, NeighbourTable, dict[int, str]]:
    """The test image indexed into a file store: its index, neighbour table and paths."""
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    table = neighbours.load(index)
    assert table is not None
    return index, table, _path_of(index)


def _ino(index: Index, path: str) -> int:
    ino = index.resolve(path.encode())
    assert ino is not None
    return ino


# ------------------------------------------------------------------------ format


def test_pack_holds_each_small_blob_once_grouped_by_directory(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    _, index = _index(tmp_path, url)
    table = neighbours.load(index)
    assert table is not None
    paths = _path_of(index)
    packed = [paths[m.ino] for m in table.members]
    assert "lib/big.bin" not in packed  # over MAX_BLOB: fetched alone
    assert packed.count("lib/alpha/same.py") + packed.count("lib/beta/same.py") == 1
    assert len(packed) == 1 + 2 * 24 + 1  # lib/__init__.py, the modules, same.py once
    # each directory's files are one run, in name order
    runs: list[str] = []
    for path in packed:
        parent = path.rsplit("/", 1)[0]
        if not runs or runs[-1] != parent:
            assert parent not in runs, f"{parent} split in the pack"
            runs.append(parent)
    assert [p for p in packed if p.startswith("lib/alpha/__pycache__/")] == sorted(
        p for p in packed if p.startswith("lib/alpha/__pycache__/"))
    # every envelope in the stored pack decodes to its file's blob
    data = open_store(url).get(table.key)
    assert len(data) == table.size
    for m in table.members:
        (key,) = index.chunks(m.ino)
        blob = decode(data[m.offset : m.offset + m.length], key)
        assert len(blob) == index.inode(m.ino).size


def test_segment_stays_in_its_directory_within_the_cap(tmp_path: Path) -> None:
    index, table, paths = _local_table(tmp_path)
    ino = _ino(index, "lib/alpha/__pycache__/mod05.pyc")
    whole = table.segment(ino, 1 << 20, lambda _: True)
    assert sorted(paths[m.ino] for m in whole) == [
        f"lib/alpha/__pycache__/mod{n:02d}.pyc" for n in range(12)]
    capped = table.segment(ino, 11_000, lambda _: True)  # room for two ~5.1 KiB envelopes
    assert [m.ino for m in capped] == [ino, ino + 1]  # forward first
    last = index.resolve(b"lib/alpha/__pycache__/mod11.pyc")
    assert [m.ino for m in table.segment(last or 0, 11_000, lambda _: True)] == [
        (last or 0) - 1, last]  # then backward, within its directory
    # members not wanted (cached already) are trimmed from the ends, never the miss itself
    assert [m.ino for m in table.segment(ino, 1 << 20, lambda i: i == ino)] == [ino]
    assert table.segment(index.resolve(b"lib/big.bin") or 0, 1 << 20, lambda _: True) == []


def test_ahead_is_the_rest_of_the_directory_in_contiguous_segments(tmp_path: Path) -> None:
    index, table, paths = _local_table(tmp_path)
    ino = _ino(index, "lib/alpha/__pycache__/mod05.pyc")
    segments = table.ahead(ino, 1 << 20, 11_000, lambda _: True)
    members = [m for seg in segments for m in seg]
    assert sorted(paths[m.ino] for m in members) == [
        f"lib/alpha/__pycache__/mod{n:02d}.pyc" for n in range(12) if n != 5]
    for seg in segments:  # each one ranged GET: contiguous in the pack, within the cap
        assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(seg))
        assert seg[-1].offset + seg[-1].length - seg[0].offset <= 11_000
    capped = table.ahead(ino, 11_000, 11_000, lambda _: True)  # forward first
    assert [m.ino for seg in capped for m in seg] == [ino + 1, ino + 2]
    gaps = table.ahead(ino, 1 << 20, 1 << 20, lambda i: i != ino + 3)  # cached: a gap
    assert ino + 3 not in {m.ino for seg in gaps for m in seg}
    assert len(gaps) == 3  # before the miss, between it and the gap, after the gap
    assert table.ahead(ino, 0, 11_000, lambda _: True) == []
    assert table.ahead(index.resolve(b"lib/big.bin") or 0, 1 << 20, 11_000,
                       lambda _: True) == []


def test_ahead_goes_on_to_the_sibling_directories(tmp_path: Path) -> None:
    """An importer goes on from a package's module to its sibling packages (numpy.core, then
    numpy.lib): after the rest of its own directory, a first miss fetches the runs of the
    directories beside it, within the same byte cap; never their subdirectories."""
    index, table, paths = _local_table(tmp_path)
    ino = _ino(index, "lib/alpha/mod05.py")
    packed = {paths[m.ino] for m in table.members}
    own = {p for p in packed if p.startswith("lib/alpha/") and p.count("/") == 2
           and p != "lib/alpha/mod05.py"}
    beta = {p for p in packed if p.startswith("lib/beta/mod")}
    segments = table.ahead(ino, 1 << 20, 1 << 20, lambda _: True)
    fetched = {paths[m.ino] for seg in segments for m in seg}
    assert own <= fetched and beta <= fetched
    assert not any("__pycache__" in p for p in fetched)
    # the two runs are adjacent in the pack: the rest of alpha and beta share one GET
    assert len(segments) == 2
    own_bytes = sum(m.length for seg in table.ahead(ino, 1 << 20, 1 << 20,
                                                    lambda i: paths[i] in own) for m in seg)
    capped = table.ahead(ino, own_bytes, 1 << 20, lambda _: True)  # its own directory first
    assert {paths[m.ino] for seg in capped for m in seg} == own
    top = index.resolve(b"lib/alpha/__pycache__/mod00.pyc")
    assert top is not None  # the only directory of its parent: no siblings
    assert {paths[m.ino].rsplit("/", 1)[0] for seg in table.ahead(top, 1 << 20, 1 << 20,
                                                                  lambda _: True)
            for m in seg} == {"lib/alpha/__pycache__"}


def test_siblings_are_fetched_ahead_only_beside_a_package_of_the_same_kind(
        tmp_path: Path) -> None:
    """`usr/lib/python3.11`'s subpackages are read with its modules; its own siblings
    (`usr/lib/x86_64-linux-gnu`, `usr/lib/valgrind`) belong to other programs: their parent
    holds no module (`os-release` is not one), so a module's first miss leaves them."""
    def small(path: str) -> Entry:
        return Entry(path, data=path.encode() * 40)

    tree = ["usr/lib/os-release", "usr/lib/valgrind/default.supp",
            "usr/lib/x86_64-linux-gnu/libfoo.so.1", "usr/lib/x86_64-linux-gnu/libbar.so.1",
            *(f"usr/lib/python3.11/{m}.py" for m in ("abc", "os", "warnings")),
            "usr/lib/python3.11/json/__init__.py", "usr/lib/python3.11/json/decoder.py",
            "usr/lib/python3.11/json/tables.txt",
            "usr/lib/python3.11/email/__init__.py", "usr/lib/python3.11/email/parser.py"]
    build_layout(tmp_path / "l", "t", [[small(p) for p in tree]], compression="none")
    url = f"file://{tmp_path}/store"
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                      IndexOptions()).record
    index = load_index(open_store(url), rec.index)
    table = neighbours.load(index)
    assert table is not None
    paths = _path_of(index)

    def fetched(path: str) -> set[str]:
        segments = table.ahead(_ino(index, path), 1 << 20, 1 << 20, lambda _: True)
        return {paths[m.ino] for seg in segments for m in seg}

    py = "usr/lib/python3.11"
    assert fetched(f"{py}/os.py") == {f"{py}/abc.py", f"{py}/warnings.py"}
    assert fetched(f"{py}/json/__init__.py") == {
        f"{py}/json/decoder.py", f"{py}/json/tables.txt",
        f"{py}/email/__init__.py", f"{py}/email/parser.py"}
    assert fetched(f"{py}/json/tables.txt") == {  # no text file beside the subpackages
        f"{py}/json/__init__.py", f"{py}/json/decoder.py"}
    assert fetched("usr/lib/x86_64-linux-gnu/libfoo.so.1") == {
        "usr/lib/x86_64-linux-gnu/libbar.so.1"}


def test_old_indexes_and_indexes_without_packs_have_no_table(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    _, index = _index(tmp_path, url, neighbours=False)
    assert neighbours.META_KEY not in index.meta and neighbours.load(index) is None
    assert not list(open_store(url).list("packs/"))


def test_reindexing_writes_the_same_pack_and_index(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    build_layout(tmp_path / "l", "t", [_files()], compression="none")
    store = open_store(url)
    first = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions()).record
    packs = sorted(store.list("packs/"))
    again = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions()).record
    assert again.index == first.index and sorted(store.list("packs/")) == packs


def _record(index: Index) -> dict[str, Any]:
    record = index.meta[neighbours.META_KEY]
    assert isinstance(record, dict)
    return dict(record)


def _table(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("change", [
    "not a dict", "version", "pack", "size", "table type", "base64", "partial record",
    "inode 0", "inode past the end", "a directory", "repeated inode", "short envelope",
    "size mismatch",
])
def test_a_bad_table_is_a_declared_error(tmp_path: Path, change: str) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    record = _record(index)
    raw = base64.b64decode(record["table"])
    ino, group, length = struct.unpack_from("<III", raw)
    bad: Any = {
        "not a dict": [record],
        "version": {**record, "version": 2},
        "pack": {**record, "pack": "../../etc/passwd"},
        "size": {**record, "size": -1},
        "table type": {**record, "table": 12},
        "base64": {**record, "table": "!!!"},
        "partial record": {**record, "table": _table(raw[:-1])},
        "inode 0": {**record, "table": _table(struct.pack("<III", 0, group, length) + raw[12:])},
        "inode past the end": {**record, "table": _table(
            struct.pack("<III", index.inode_count + 1, group, length) + raw[12:])},
        "a directory": {**record, "table": _table(struct.pack("<III", 1, group, length)
                                                  + raw[12:])},
        "repeated inode": {**record, "table": _table(raw[:12] + raw)},
        "short envelope": {**record, "table": _table(
            struct.pack("<III", ino, group, HEADER_SIZE) + raw[12:])},
        "size mismatch": {**record, "size": record["size"] + 1},
    }[change]
    with pytest.raises(NeighbourTableError):
        NeighbourTable(index, bad)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    tmp = tmp_path_factory.mktemp("fuzz")
    return _index(tmp, f"file://{tmp}/store")[1]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=-5, max_value=1 << 40))
def test_any_table_bytes_load_or_fail_declared(small_index: Index, raw: bytes,
                                               size: int) -> None:
    record = {**_record(small_index), "table": _table(raw), "size": size}
    try:
        table = NeighbourTable(small_index, record)
    except NeighbourTableError:
        return
    for member in table.members:  # whatever loads gives segments inside the pack
        for m in table.segment(member.ino, 1 << 20, lambda _: True):
            assert m.offset >= 0 and m.offset + m.length <= table.size


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_spans_cover_what_is_asked_in_contiguous_bounded_segments(small_index: Index,
                                                                 data: st.DataObject) -> None:
    """`NeighbourTable.spans`, what an import tree is fetched in: every member asked for,
    each once, in pack order; a segment is contiguous, starts and ends with members asked
    for, bridges at most `gap` bytes between them and stays within `cap` (or is one member)."""
    table = neighbours.load(small_index)
    assert table is not None
    asked = sorted(data.draw(st.sets(st.integers(0, len(table.members) - 1))))
    gap, cap = data.draw(st.integers(0, 64 * KiB)), data.draw(st.integers(1, 1 << 20))
    segments = table.spans(asked, gap, cap)
    covered = [table.position[m.ino] for segment in segments for m in segment]
    assert covered == sorted(set(covered)) and set(asked) <= set(covered)
    for segment in segments:
        places = [table.position[m.ino] for m in segment]
        assert places == list(range(places[0], places[-1] + 1))
        assert places[0] in asked and places[-1] in asked
        end = segment[-1].offset + segment[-1].length
        assert len(segment) == 1 or end - segment[0].offset <= cap
        inside = [table.members[p] for p in places if p in asked]
        for before, after in itertools.pairwise(inside):
            assert after.offset - (before.offset + before.length) <= gap


# ------------------------------------------------------------------------ real mounts


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """Every S3 request of this test (and of the daemons it starts) through a recorder."""
    with FaultProxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def _gets(proxy: FaultProxy) -> list[str]:
    return [path for method, path, _ in proxy.requests
            if method == "GET" and ("/blobs/" in path or "/packs/" in path)]


def _expected(tmp_path: Path) -> dict[str, bytes]:
    return {str(e.path): e.data for e in _files()}


@pytest.mark.root
def test_a_cold_read_brings_its_siblings_in_one_request(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    ref, _ = _index(tmp_path, s3_server.url)
    want = _expected(tmp_path)
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        assert (mnt / "lib/alpha/__pycache__/mod03.pyc").read_bytes() == want[
            "lib/alpha/__pycache__/mod03.pyc"]
        first = _gets(proxy)
        assert len(first) == 1 and "/packs/" in first[0], first
        for n in range(12):  # the importer goes on in the same directory: no more requests
            path = f"lib/alpha/__pycache__/mod{n:02d}.pyc"
            assert (mnt / path).read_bytes() == want[path]
        assert _gets(proxy) == first
        stats = mount.query(mnt)
        assert stats["neighbour_gets"] == 1 and stats["store_gets"] == 1, stats
        assert stats["demand_blobs"] == 12 and stats["corrupt_blobs"] == 0, stats
        assert (mnt / "lib/big.bin").read_bytes() == want["lib/big.bin"]  # not packed: alone
        assert len(_gets(proxy)) == 2 and "/blobs/" in _gets(proxy)[1]


@pytest.mark.root
@pytest.mark.parametrize("ahead", [True, False])
def test_a_directorys_first_miss_fetches_the_rest_of_it_at_once(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, ahead: bool) -> None:
    """Segments of two envelopes: reading a directory's twelve files one after another
    took six GETs, each waited for; with the rest of the directory fetched ahead on the
    first miss, all six are asked for at once and the later reads ask for nothing."""
    ref, _ = _index(tmp_path, s3_server.url)
    want = _expected(tmp_path)
    monkeypatch.setenv("CAFS_NEIGHBOUR_SEGMENT", "11000")
    monkeypatch.setenv("CAFS_NEIGHBOUR_AHEAD", "4M" if ahead else "0")
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        first = "lib/beta/__pycache__/mod00.pyc"
        assert (mnt / first).read_bytes() == want[first]
        deadline = time.monotonic() + (10 if ahead else 0.5)  # no other read meanwhile
        while len(_gets(proxy)) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_gets(proxy)) == (6 if ahead else 1)
        for n in range(12):
            path = f"lib/beta/__pycache__/mod{n:02d}.pyc"
            assert (mnt / path).read_bytes() == want[path]
        gets = _gets(proxy)
        assert all("/packs/" in p for p in gets), gets
        assert len(gets) == 6, gets
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 12 and stats["corrupt_blobs"] == 0, stats


@pytest.mark.root
def test_a_first_miss_brings_the_sibling_package_too(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    """Reading `lib/alpha`'s modules and then `lib/beta`'s costs the GETs of alpha's first
    miss only: beta's run came with them."""
    ref, _ = _index(tmp_path, s3_server.url)
    want = _expected(tmp_path)
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        assert (mnt / "lib/alpha/mod00.py").read_bytes() == want["lib/alpha/mod00.py"]
        deadline = time.monotonic() + 10
        settled = 0
        while settled < 5 and time.monotonic() < deadline:  # the segments fetched ahead land
            time.sleep(0.1)
            done = mount.query(mnt)["neighbour_gets"] == len(_gets(proxy))
            settled = settled + 1 if done else 0
        first = len(_gets(proxy))
        for pkg in ("alpha", "beta"):
            for n in range(12):
                path = f"lib/{pkg}/mod{n:02d}.py"
                assert (mnt / path).read_bytes() == want[path]
        gets = _gets(proxy)
        assert len(gets) == first and all("/packs/" in p for p in gets), gets
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 24 and stats["corrupt_blobs"] == 0, stats


@pytest.mark.root
def test_without_neighbour_packs_each_cold_read_is_a_request(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _ = _index(tmp_path, s3_server.url)
    want = _expected(tmp_path)
    monkeypatch.setenv("CAFS_NEIGHBOUR_PACKS", "off")  # reaches the daemon in its config
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        for n in range(4):
            path = f"lib/beta/__pycache__/mod{n:02d}.pyc"
            assert (mnt / path).read_bytes() == want[path]
        assert len(_gets(proxy)) == 4 and all("/blobs/" in p for p in _gets(proxy))


@pytest.mark.root
def test_a_corrupt_pack_segment_falls_back_to_blob_by_blob(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    ref, index = _index(tmp_path, s3_server.url)
    store = open_store(s3_server.url)
    table = neighbours.load(index)
    assert table is not None
    pack = bytearray(store.get(table.key))
    for m in table.members:  # damage every envelope's last byte: each fails its key
        pack[m.offset + m.length - 1] ^= 0xFF
    store.put(table.key, bytes(pack))
    want = _expected(tmp_path)
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        for n in range(12):
            path = f"lib/beta/__pycache__/mod{n:02d}.pyc"
            assert (mnt / path).read_bytes() == want[path]
        stats = mount.query(mnt)
        assert stats["eio"] == 0 and stats["corrupt_blobs"] >= 12, stats
        gets = _gets(proxy)
        assert sum("/blobs/" in p for p in gets) == 12, gets  # each fetched alone, verified
    # nothing damaged reached the cache
    for path, data in want.items():
        if path.startswith("lib/beta/__pycache__/"):
            from blobstore.envelope import digest

            cached = tmp_path / "cache" / "blobs" / digest(data)[:2] / digest(data)
            assert cached.read_bytes() == data


@pytest.mark.root
def test_a_bad_table_mounts_and_serves_blob_by_blob(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    """An index whose record this cafs cannot read (here: a newer version) still mounts."""
    ref, index = _index(tmp_path, s3_server.url)
    store = open_store(s3_server.url)
    from indexer.catalog import publish, put_index
    from indexer.format import with_meta

    meta = {**index.meta, neighbours.META_KEY: {**_record(index), "version": 99}}
    key = put_index(store, with_meta(index.to_bytes(), meta))
    record = find_image(store, ref)
    top = dataclasses.replace(record.layers[-1], index=key)
    publish(store, dataclasses.replace(record, index=key, layers=[*record.layers[:-1], top]))
    want = _expected(tmp_path)
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        for n in range(3):
            path = f"lib/alpha/mod{n:02d}.py"
            assert (mnt / path).read_bytes() == want[path]
        assert len(_gets(proxy)) == 3 and all("/blobs/" in p for p in _gets(proxy))
    assert "neighbour pack not used" in (tmp_path / "mnt.log").read_text()


@pytest.mark.root
def test_a_missing_pack_is_asked_for_once_then_blob_by_blob(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    """A pack the store no longer has (deleted by hand, or a policy that allows `blobs/`
    only) costs the first miss's requests per mount (its own segment, and the one it asked
    for ahead at the same time), not one per miss."""
    ref, index = _index(tmp_path, s3_server.url)
    table = neighbours.load(index)
    assert table is not None
    open_store(s3_server.url).delete(table.key)
    want = _expected(tmp_path)
    paths = ["lib/alpha/mod00.py", "lib/beta/mod05.py", "lib/beta/__pycache__/mod01.pyc",
             "lib/alpha/__pycache__/mod07.pyc"]
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        assert (mnt / paths[0]).read_bytes() == want[paths[0]]
        deadline = time.monotonic() + 10
        while mount.query(mnt)["store_errors"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the segment asked for ahead fails too
        first = sum("/packs/" in p for p in _gets(proxy))
        assert first == 2, _gets(proxy)  # alpha's own segment, beta's run ahead
        for path in paths[1:]:
            assert (mnt / path).read_bytes() == want[path]
        gets = _gets(proxy)
        assert sum("/packs/" in p for p in gets) == first, gets
        assert sum("/blobs/" in p for p in gets) == len(paths), gets
        assert mount.query(mnt)["eio"] == 0
    assert "unusable" in (tmp_path / "mnt.log").read_text()
