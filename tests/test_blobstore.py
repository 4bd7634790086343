"""The store contract, run against every backend (file:// and an S3 server over HTTP)."""

from __future__ import annotations

import os
import threading

import pytest

from blobstore import BlobNotFound, open_store
from blobstore.base import check_key
from blobstore.errors import BlobCorrupt, ObjectTooLarge, StoreError


def test_put_get_exists_delete(store_url: str) -> None:
    store = open_store(store_url)
    assert not store.exists("blobs/ab/abc")
    with pytest.raises(BlobNotFound):
        store.get("blobs/ab/abc")
    store.put("blobs/ab/abc", b"hello")
    assert store.exists("blobs/ab/abc")
    assert store.get("blobs/ab/abc") == b"hello"
    store.put("blobs/ab/abc", b"hello again")  # overwrite is atomic, last writer wins
    assert store.get("blobs/ab/abc") == b"hello again"
    store.delete("blobs/ab/abc")
    store.delete("blobs/ab/abc")  # deleting a missing key is fine
    assert not store.exists("blobs/ab/abc")


def test_range_reads(store_url: str) -> None:
    store = open_store(store_url)
    store.put("x/data", bytes(range(256)))
    assert store.get_range("x/data", 10, 5) == bytes(range(10, 15))
    assert store.get_range("x/data", 250, 100) == bytes(range(250, 256))
    assert store.get_range("x/data", 0, 0) == b""


def compressible(size: int) -> bytes:
    """Text-like bytes: what SeaweedFS gzips on its volumes (and must inflate on reads)."""
    lines = b"".join(b"line %06d: /usr/lib/python3/dist-packages/module_%d.py\n" % (i, i % 97)
                     for i in range(size // 40 + 1))
    return lines[:size]


def test_compressible_objects_read_back_byte_exact(store_url: str) -> None:
    """Ranged GETs of a pack-sized object of text return exactly the stored bytes, also
    across the server's 4 MiB chunk boundaries and past the end (SeaweedFS gzips such
    chunks transparently)."""
    store = open_store(store_url)
    data = compressible(9 << 20)
    store.put("packs/text", data)
    assert store.get("packs/text") == data
    for offset, length in ((0, 1), (100, 5000), ((4 << 20) - 7, 20), ((8 << 20) - 3, 1 << 20),
                           (len(data) - 10, 10), (len(data) - 10, 100), (1, len(data))):
        assert store.get_range("packs/text", offset, length) == data[offset:offset + length]


def test_an_object_over_the_callers_limit_is_refused(store_url: str) -> None:
    store = open_store(store_url)
    store.put("blobs/ab/big", b"x" * 1000)
    with pytest.raises(ObjectTooLarge, match="1000 bytes, over the 999"):
        store.get("blobs/ab/big", 999)
    assert store.get("blobs/ab/big", 1000) == b"x" * 1000
    assert isinstance(ObjectTooLarge("x"), BlobCorrupt)  # never served, like a corrupt blob


def test_list_by_prefix(store_url: str) -> None:
    store = open_store(store_url)
    for key in ("refs/a/b:1", "refs/a/c:2", "refs/z", "chains/sha256:1"):
        store.put(key, b"{}")
    assert sorted(store.list("refs/")) == ["refs/a/b:1", "refs/a/c:2", "refs/z"]
    assert sorted(store.list("refs/a/")) == ["refs/a/b:1", "refs/a/c:2"]
    assert list(store.list("nothing/")) == []


def test_large_object_multipart(store_url: str) -> None:
    store = open_store(store_url)
    data = os.urandom(70 << 20)  # above the multipart threshold
    store.put("big/object", data)
    assert store.get("big/object") == data


def test_parallel_puts(store_url: str) -> None:
    store = open_store(store_url)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for k in range(10):
                store.put(f"p/{n}/{k}", str(k).encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list(store.list("p/"))) == 80


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/.tmp-x", "./a"])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_bad_store_urls_are_explained(tmp_path: object) -> None:
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store("ftp://x/y")
    with pytest.raises(StoreError, match="bucket"):
        open_store("s3:///prefix")
    with pytest.raises(StoreError, match="file:///"):
        open_store("file://host/path")
