"""The import table: a module's first read brings the modules its import loads."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import S3Server
from faultproxy import FaultProxy
from test_profile import mounted

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs.daemon.neighbours import GAP_MAX
from cafs.mounts import mount
from indexer import imports, neighbours
from indexer.build import IndexOptions, index_image
from indexer.catalog import load_index
from indexer.format import Index
from indexer.imports import ImportTable, ImportTableError
from indexer.sources import open_source

STD = "usr/lib/python3.11"
PKG = "usr/lib/python3/dist-packages/pkg"
EXT = "cpython-311-x86_64-linux-gnu.so"
FILES = {
    f"{STD}/os.py": b"import stat\n",  # run frozen by 3.11: never read
    f"{STD}/stat.py": b"# stat\n",
    f"{STD}/json/__init__.py": b"from .decoder import JSONDecoder\n",
    f"{STD}/json/decoder.py": (b"import re\ntry:\n    from _json import scanstring\n"
                               b"except ImportError:\n    scanstring = None\n"),
    f"{STD}/re.py": b"import enum\n",
    f"{STD}/enum.py": b"import types  # not in this image: left out\n",
    f"{STD}/lib-dynload/_json.{EXT}": b"\x7fELF not really\n",
    f"{STD}/pickle.py": b"try:\n    import pickle5\nexcept ImportError:\n    import copyreg\n",
    f"{STD}/copyreg.py": b"# copyreg\n",
    f"{STD}/fast.py": b"try:\n    import json\nexcept ImportError:\n    import slow\n",
    f"{STD}/slow.py": b"# slow\n",
    f"{STD}/importlib/__init__.py": (b"from ._bootstrap import __import__\n"
                                     b"from . import util, abc\n"),
    f"{STD}/importlib/_bootstrap.py": b"# frozen as _frozen_importlib\n",
    f"{STD}/importlib/util.py": b"# frozen\n",
    f"{STD}/importlib/abc.py": b"# not frozen (the top-level abc is)\n",
    f"{PKG}/__init__.py": (b"import os\nimport json\nfrom . import a\n"
                           b"from .sub import b, not_a_module\nimport pkg.c\n"
                           b"def later():\n    import pickle\n"),
    f"{PKG}/a.py": b"from .sub import b\n",
    f"{PKG}/sub/__init__.py": b"# sub\n",
    f"{PKG}/sub/b.py": b"import pkg._ext\n",
    f"{PKG}/_ext.{EXT}": b"\x7fELF an extension\n",
    f"{PKG}/c.py": b"import copyreg\n",
    f"{PKG}/__pycache__/c.cpython-311.pyc": b"compiled c\n",
    # never imported; beyond the gap a segment bridges (GAP_MAX), wherever the pack has it
    f"{PKG}/unrelated.py": random.Random(7).randbytes(GAP_MAX + 4096),
    "app/main.py": b"import helper\nimport json\n",
    "app/helper.py": b"# helper\n",
}
TREE = [f"{PKG}/__init__.py", f"{STD}/json/__init__.py", f"{STD}/json/decoder.py",
        f"{STD}/re.py", f"{STD}/enum.py", f"{STD}/lib-dynload/_json.{EXT}", f"{PKG}/a.py",
        f"{PKG}/sub/__init__.py", f"{PKG}/sub/b.py", f"{PKG}/_ext.{EXT}",
        f"{PKG}/__pycache__/c.cpython-311.pyc", f"{STD}/copyreg.py"]


def _index(tmp_path: Path, url: str) -> tuple[str, Index]:
    build_layout(tmp_path / "l", "t", [[Entry(p, data=d) for p, d in FILES.items()]],
                 compression="none")
    store = open_store(url)
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions()).record
    return rec.ref, load_index(store, rec.index)


def _table(index: Index) -> tuple[ImportTable, dict[str, list[str]]]:
    table = imports.load(index)
    assert table is not None
    path = {node.ino: p.decode() for p, node in index.walk()}
    return table, {path[ino]: [path[d] for d in deps] for ino, deps in table.deps.items()}


def test_imports_are_resolved_as_python_finds_them(tmp_path: Path) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    _, deps = _table(index)
    assert deps[f"{PKG}/__init__.py"] == [  # os: frozen; pickle: in a function
        f"{STD}/json/__init__.py", f"{PKG}/a.py", f"{PKG}/sub/__init__.py", f"{PKG}/sub/b.py",
        f"{PKG}/__pycache__/c.cpython-311.pyc"]  # the compiled file is what is read
    assert deps[f"{STD}/json/__init__.py"] == [f"{STD}/json/decoder.py"]
    assert deps[f"{STD}/json/decoder.py"] == [f"{STD}/re.py", f"{STD}/lib-dynload/_json.{EXT}"]
    assert deps[f"{PKG}/sub/b.py"] == [f"{PKG}/__init__.py", f"{PKG}/_ext.{EXT}"]
    assert deps["app/main.py"] == ["app/helper.py", f"{STD}/json/__init__.py"]
    assert deps[f"{STD}/os.py"] == []  # stat is run frozen too
    assert deps[f"{STD}/importlib/__init__.py"] == [f"{STD}/importlib/abc.py"]


def test_a_fallback_import_counts_only_where_its_try_block_fails(tmp_path: Path) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    _, deps = _table(index)
    assert deps[f"{STD}/pickle.py"] == [f"{STD}/copyreg.py"]  # no pickle5 in the image
    assert deps[f"{STD}/fast.py"] == [f"{STD}/json/__init__.py"]  # json is: slow never runs


def test_a_compiled_file_has_its_source_s_entry(tmp_path: Path) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    _, deps = _table(index)
    assert deps[f"{PKG}/__pycache__/c.cpython-311.pyc"] == deps[f"{PKG}/c.py"] == [
        f"{STD}/copyreg.py"]


def test_a_bad_record_is_refused_whole(tmp_path: Path) -> None:
    _, index = _index(tmp_path, f"file://{tmp_path}/store")
    good = index.meta[imports.META_KEY]
    for bad in ({**good, "version": 2}, {**good, "table": "not base64!"},
                {**good, "table": "AAAA"}, "a string", {"version": 1}):
        with pytest.raises(ImportTableError):
            ImportTable(index, bad)
    beyond = {**good, "table": "//////////8="}  # inode 2^32-1, count 2^32-1
    with pytest.raises(ImportTableError):
        ImportTable(index, beyond)


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def _gets(proxy: FaultProxy) -> int:
    return sum(1 for method, path, _ in proxy.requests
               if method == "GET" and ("/blobs/" in path or "/packs/" in path))


def _settled(mnt: Path, proxy: FaultProxy) -> int:
    """The GETs so far, once the mount has stopped making them."""
    deadline, last, quiet = time.monotonic() + 10, -1, 0
    while quiet < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _gets(proxy)
        quiet, last = (quiet + 1, now) if now == last else (0, now)
    return last


@pytest.mark.root
def test_a_module_s_first_read_brings_its_import_tree_and_not_its_directory(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    ref, index = _index(tmp_path, s3_server.url)
    pack = neighbours.load(index)
    assert pack is not None
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        assert (mnt / TREE[0]).read_bytes() == FILES[TREE[0]]
        first = _settled(mnt, proxy)
        stats = mount.query(mnt)
        assert stats["import_files"] == len(TREE) - 1, stats
        for path in TREE:
            assert (mnt / path).read_bytes() == FILES[path]
        assert _gets(proxy) == first, "the import tree came with the first read"
        before = mount.query(mnt)["neighbour_bytes"]
        assert (mnt / f"{PKG}/unrelated.py").read_bytes() == FILES[f"{PKG}/unrelated.py"]
        assert _gets(proxy) == first + 1, "pkg/'s other files did not come along"
        ino = index.resolve(f"{PKG}/unrelated.py".encode())
        own = pack.members[pack.position[ino]].length
        assert mount.query(mnt)["neighbour_bytes"] - before == own, \
            "a miss in a directory the table speaks for fetches its own file alone"
        assert mount.query(mnt)["corrupt_blobs"] == 0


@pytest.mark.root
def test_without_the_table_a_module_s_miss_brings_its_directory(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`imports_ahead` 0: the neighbour pack's guesses, as before the table."""
    ref, _ = _index(tmp_path, s3_server.url)
    monkeypatch.setenv("CAFS_IMPORTS_AHEAD", "0")
    with mounted(ref, tmp_path / "mnt", s3_server.url, tmp_path / "cache",
                 profile=None) as mnt:
        proxy.requests.clear()
        assert (mnt / TREE[0]).read_bytes() == FILES[TREE[0]]
        first = _settled(mnt, proxy)
        assert mount.query(mnt)["import_files"] == 0
        assert (mnt / f"{PKG}/unrelated.py").read_bytes() == FILES[f"{PKG}/unrelated.py"]
        assert _gets(proxy) == first, "its directory came with the first miss"


@pytest.mark.root
def test_what_the_node_cache_holds_is_not_fetched_again(
        proxy: FaultProxy, s3_server: S3Server, tmp_path: Path) -> None:
    """A second mount on the node (the same image here; another image sharing the stdlib
    alike) reads the tree from the node cache: its first read brings nothing."""
    ref, _ = _index(tmp_path, s3_server.url)
    for n in range(2):
        with mounted(ref, tmp_path / f"mnt{n}", s3_server.url, tmp_path / "cache",
                     profile=None) as mnt:
            proxy.requests.clear()
            for path in TREE:
                assert (mnt / path).read_bytes() == FILES[path]
            gets = _settled(mnt, proxy)
            assert (gets > 0) if n == 0 else (gets == 0), gets
