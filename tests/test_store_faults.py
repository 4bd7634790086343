"""An S3 store answering 503 SlowDown and 500 InternalError, through a fault-injecting proxy
in front of the S3 server: botocore backs off and retries for the indexer and the CLI; a
mount's reads have one retry layer, the fetcher's, and fail only the reads they cannot serve,
then recover; `cafs index` publishes a correct image or nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import S3Server
from faultproxy import FaultProxy
from indexview import index_tree
from mounts import mounted
from reference import compare_trees

from bench.imagebuild import ImageInfo
from blobstore import StoreUnavailable, open_store
from blobstore.base import REF_PREFIX
from blobstore.s3 import MULTIPART_THRESHOLD, RETRIES
from cafs.cli.app import main as cafs
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.catalog import load_index
from indexer.sources import open_source

Layout = tuple[Path, str, ImageInfo]
MAX_ATTEMPTS = 1 + RETRIES


@pytest.fixture
def proxy(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The proxy, with every S3 client of this test (and the daemons it starts) behind it."""
    with FaultProxy(s3_server.endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def _statuses(proxy: FaultProxy, method: str, needle: str) -> list[int]:
    return [s for m, p, s in proxy.requests if m == method and needle in p]


def test_a_few_503s_and_500s_are_retried(proxy: FaultProxy, s3_server: S3Server) -> None:
    store = open_store(s3_server.url)
    proxy.fail(503, count=2)
    store.put("blobs/ab/x", b"payload")
    assert _statuses(proxy, "PUT", "blobs/ab/x") == [503, 503, 200]
    proxy.fail(503, count=3)
    assert store.get("blobs/ab/x") == b"payload"
    assert _statuses(proxy, "GET", "blobs/ab/x") == [503, 503, 503, 200]
    proxy.fail(500, count=2)
    assert store.get_range("blobs/ab/x", 2, 3) == b"ylo"
    proxy.fail(503, count=1)
    assert store.exists("blobs/ab/x") and not store.exists("blobs/ab/y")
    proxy.fail(500, count=1)
    assert list(store.list("blobs/")) == ["blobs/ab/x"]
    assert proxy.answered == {503: 6, 500: 3}


def test_persistent_503_exhausts_the_retries(proxy: FaultProxy, s3_server: S3Server) -> None:
    store = open_store(s3_server.url)
    store.put("k/x", b"1")
    proxy.fail(503)
    with pytest.raises(StoreUnavailable, match=r"SlowDown \(HTTP 503\)"):
        store.get("k/x")
    assert proxy.answered[503] == MAX_ATTEMPTS
    proxy.heal()
    assert store.get("k/x") == b"1"


def test_a_store_opened_without_retries_tries_each_request_once(
    proxy: FaultProxy, s3_server: S3Server
) -> None:
    store = open_store(s3_server.url, retries=False)
    store.put("k/x", b"1")
    proxy.fail(503, count=1)
    with pytest.raises(StoreUnavailable, match=r"SlowDown \(HTTP 503\)"):
        store.get("k/x")
    assert _statuses(proxy, "GET", "k/x") == [503]
    assert store.get("k/x") == b"1"


def test_multipart_upload_survives_a_failed_part(proxy: FaultProxy, s3_server: S3Server) -> None:
    store = open_store(s3_server.url)
    data = os.urandom(MULTIPART_THRESHOLD + (5 << 20))
    proxy.fail(503, count=1, match=lambda method, path: method == "PUT" and "partNumber=" in path)
    store.put("big/object", data)
    assert proxy.answered[503] == 1
    assert store.get("big/object") == data
    assert len(_statuses(proxy, "PUT", "partNumber=")) >= 3  # the parts went through us


def _indexed(layout: Layout, url: str) -> str:
    """The simple image indexed into `url`; its ref."""
    path, tag, _ = layout
    return index_image(open_source(f"oci:{path}:{tag}"), open_store(url),
                       IndexOptions()).record.ref


@pytest.mark.root
def test_a_store_answering_503_fails_uncached_reads_then_recovers(
    simple_layout: Layout, proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # etc/'s first miss would bring data/ (a sibling) ahead: data/b.txt must stay uncached
    monkeypatch.setenv("CAFS_NEIGHBOUR_AHEAD", "0")
    url = s3_server.url
    ref = _indexed(simple_layout, url)
    deadline = 3.0
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache", fetch_deadline=deadline) as mnt:
        assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"
        proxy.fail(503)
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            (mnt / "data/b.txt").read_bytes()
        took = time.monotonic() - started
        assert exc.value.errno == errno.EIO
        assert deadline - 0.5 < took < deadline + 5, took
        failed = _statuses(proxy, "GET", "/blobs/")
        stats = mount.query(mnt)
        # One retry layer: every 503 the store answered reached the fetcher, which retried
        # with backoff (several tries within the deadline), none hidden inside botocore. A
        # try still in flight when the deadline cut the read short is not counted by it.
        assert len(failed) >= 4 and set(failed) == {503}, failed
        packs = len(_statuses(proxy, "GET", "/packs/"))
        assert len(failed) + packs - 2 <= stats["store_errors"] <= len(failed) + packs, (
            failed, packs, stats)
        assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"  # cached: still served
        assert sorted(os.listdir(mnt / "data")) == ["b.txt", "link"]  # metadata: local
        assert (mnt / "data/b.txt").stat().st_size == 2000
        proxy.heal()
        assert (mnt / "data/b.txt").read_bytes() == b"b" * 2000
        assert mount.query(mnt)["eio"] >= 1


@pytest.mark.root
def test_a_denied_read_fails_at_once_with_the_stores_message(
    simple_layout: Layout, proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """403 AccessDenied cannot succeed later: one request, EIO at once, not at the deadline."""
    # one pack segment per miss (the segments a first miss asks for ahead, at the same
    # time, are tests/test_neighbours.py's missing-pack case)
    monkeypatch.setenv("CAFS_NEIGHBOUR_AHEAD", "0")
    url = s3_server.url
    ref = _indexed(simple_layout, url)
    deadline = 20.0
    log = tmp_path / "mnt.log"
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache", fetch_deadline=deadline) as mnt:
        proxy.fail(403)
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            (mnt / "data/b.txt").read_bytes()
        took = time.monotonic() - started
        assert exc.value.errno == errno.EIO
        assert took < 3, took
        denied = [p for _, p, status in proxy.requests if status == 403 and "/blobs/" in p]
        packs = [p for _, p, status in proxy.requests if status == 403 and "/packs/" in p]
        stats = mount.query(mnt)
        # One store request per read the daemon answered EIO (the kernel itself tries a
        # failed page read again): no retry, neither ours nor botocore's. The neighbour
        # pack is asked once, then given up for the mount.
        assert 1 <= len(denied) == stats["eio"], (denied, stats)
        assert len(packs) == 1 and stats["store_errors"] == len(denied) + 1, (packs, stats)
        proxy.heal()
        assert (mnt / "data/b.txt").read_bytes() == b"b" * 2000  # the next read tries again
    assert "AccessDenied" in log.read_text()


def _published(url: str) -> list[str]:
    store = open_store(url)
    return [k for prefix in (REF_PREFIX, "chains/", "manifests/") for k in store.list(prefix)]


def test_index_through_intermittent_500s_is_correct(
    simple_layout: Layout, proxy: FaultProxy, s3_server: S3Server, tmp_path: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    layout, tag, _ = simple_layout
    local = open_store(f"file://{tmp_path}/store")
    expected = index_image(open_source(f"oci:{layout}:{tag}"), local, IndexOptions()).record
    proxy.fail(500, every=3)
    assert cafs(["index", f"oci:{layout}:{tag}", "--store", s3_server.url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert proxy.answered[500] >= 5
    proxy.heal()
    assert summary["index"] == expected.index  # indexes are deterministic
    store = open_store(s3_server.url)
    got = index_tree(load_index(store, summary["index"]), store)  # reads every blob back
    assert compare_trees(index_tree(load_index(local, expected.index), local), got) == []
    assert len(_published(s3_server.url)) >= 3


def test_index_with_retries_exhausted_fails_and_publishes_nothing(
    simple_layout: Layout, proxy: FaultProxy, s3_server: S3Server
) -> None:
    layout, tag, _ = simple_layout
    url = f"s3://{s3_server.bucket}/exhausted"
    proxy.fail(500, match=lambda method, path: method == "PUT" and "/indexes/" in path)
    res = subprocess.run([sys.executable, "-m", "cafs", "index", f"oci:{layout}:{tag}",
                          "--store", url, "-q"], capture_output=True, text=True, timeout=120)
    err = res.stderr.strip()
    assert res.returncode == 1 and len(err.splitlines()) == 1, err
    assert "InternalError (HTTP 500)" in err, err
    assert proxy.answered[500] == MAX_ATTEMPTS
    proxy.heal()
    assert _published(url) == []
    assert any(_statuses(proxy, "PUT", "/exhausted/blobs/"))  # blobs went up first
