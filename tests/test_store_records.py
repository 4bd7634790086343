"""Records read from a store (image records, chain pointers, leases) and the index meta's
weights: damaged, they give their reader's declared error (a damaged lease: ignored, logged),
within bounded memory, and a damaged record never lets `cafs gc` delete what it referenced."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import PROPERTY, decodes_within, mutated_json
from hypothesis import given

from bench.imagebuild import Entry, build_layout
from blobstore import BlobNotFound, open_store
from blobstore.base import CHAIN_PREFIX, REF_PREFIX, blob_key
from blobstore.local import LocalStore
from cafs.cli.app import main as cafs
from indexer.build import IndexOptions, index_image
from indexer.catalog import CatalogError, ImageRecord, chain_index, find_image, load_index
from indexer.gc import collect
from indexer.lease import hold, live_leases
from indexer.sources import open_source
from indexer.weights import BadWeightsMeta, listed, parse_safetensors_header

DIGEST = "sha256:" + "1" * 64
RECORD: dict[str, Any] = {
    "schema": 1, "ref": "127.0.0.1:5000/app:1", "index": "a" * 64,
    "manifest_digest": DIGEST, "manifest_media_type": "application/vnd.oci.image.manifest.v1+json",
    "config_digest": "sha256:" + "2" * 64, "index_digest": None, "platform": "linux/amd64",
    "files": 3, "total_bytes": 100, "created": 1763846400.0,
    "layers": [{"digest": "sha256:" + "3" * 64, "size": 123, "media_type": "x",
                "diff_id": "sha256:" + "4" * 64, "chain_id": "sha256:" + "5" * 64,
                "index": "b" * 64}]}
WEIGHTS: dict[str, Any] = {"weights": {"schema": 1, "files": [
    {"path": "m/model.safetensors", "format": "safetensors", "size": 1000, "header_len": 100,
     "metadata": {"format": "pt"},
     "tensors": [{"name": "w", "dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}]},
    {"path": "m/x.gguf", "format": "gguf", "size": 50, "version": 3}]}}


# -- image records and chain pointers ---------------------------------------------------------


@pytest.mark.parametrize("record", [
    b"[]", b'{"schema": 1, "layers": 5}', b"[" * 100_000 + b"]" * 100_000,
    json.dumps({**RECORD, "index": "../../x"}).encode(),
    json.dumps({**RECORD, "files": "3"}).encode(),
    json.dumps({**RECORD, "layers": [{**RECORD["layers"][0], "chain_id": "a/../b"}]}).encode(),
])
def test_a_malformed_image_record_is_a_one_line_catalog_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], record: bytes) -> None:
    """`[]` once raised AttributeError, deep nesting RecursionError: tracebacks."""
    url = f"file://{tmp_path}/store"
    open_store(url).put(REF_PREFIX + "app:1", record)
    with pytest.raises(CatalogError):
        find_image(open_store(url), "app:1")
    assert cafs(["inspect", "app:1", "--store", url]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


@PROPERTY
@given(mutated_json(RECORD))
def test_any_damaged_image_record_is_a_catalog_error(data: bytes) -> None:
    rec = decodes_within(lambda: ImageRecord.from_json(data), (CatalogError,), 1 << 20)
    if rec is not None:  # what the record gives its readers is what the format says
        assert isinstance(rec.index, str) and len(rec.index) == 64
        assert all(isinstance(layer.size, int) for layer in rec.layers)


@pytest.mark.parametrize("pointer", [b"[]", b"{}", b'{"index": 5}', b'{"index": "../x"}',
                                     b"\xff"])
def test_a_malformed_chain_pointer_is_a_catalog_error(tmp_path: Path, pointer: bytes) -> None:
    store = LocalStore(tmp_path / "store")
    store.put(CHAIN_PREFIX + DIGEST, pointer)
    with pytest.raises(CatalogError, match="unreadable chain pointer"):
        chain_index(store, DIGEST)


@PROPERTY
@given(mutated_json({"schema": 1, "chain_id": DIGEST, "index": "a" * 64,
                     "image_manifest": DIGEST}))
def test_any_damaged_chain_pointer_is_a_catalog_error(data: bytes) -> None:
    store = MemoryStore({CHAIN_PREFIX + DIGEST: data})
    index = decodes_within(lambda: chain_index(store, DIGEST), (CatalogError,), 1 << 20)
    assert index is None or (isinstance(index, str) and len(index) == 64)


class MemoryStore(LocalStore):
    """Just enough of a store for records read by key (no disk in a property's loop)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.url = objects, "memory://"

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key not in self.objects:
            raise BlobNotFound(key)
        return self.objects[key][offset : offset + length]

    def list(self, prefix: str) -> Iterator[str]:
        return iter([k for k in self.objects if k.startswith(prefix)])


def test_gc_deletes_nothing_while_an_image_record_is_unreadable(tmp_path: Path) -> None:
    """It once logged the record as 'kept' and swept every blob only that image used."""
    url = f"file://{tmp_path}/store"
    build_layout(tmp_path / "l", "t", [[Entry("f", data=b"only this image" * 100)]])
    store = open_store(url)
    ref = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions()).record.ref
    chunks = load_index(store, find_image(store, ref).index).all_chunks()
    for key in list(store.list(REF_PREFIX)) + list(store.list("manifests/")):
        data = bytearray(store.get(key))
        data[data.index(b'"index"') + 5] ^= 0x20  # one flipped bit: "indeX"
        store.put(key, bytes(data))
    with pytest.raises(CatalogError, match="gc stopped, nothing deleted"):
        collect(store, grace=0)
    assert all(store.exists(blob_key(c)) for c in chunks)


# -- leases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lease", [
    b"[" * 2000 + b"]" * 2000,  # 4 KiB nested past json's stack: RecursionError, a traceback
    b'{"created": 1, "renewed": 1e300}',  # "live" for ever: no gc again
    b'{"created": 1, "holder": "' + b"x" * (8 << 20) + b'"}',  # read whole, then refused
])
def test_an_unreadable_lease_is_ignored_within_bounded_memory(tmp_path: Path,
                                                               lease: bytes) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("leases/index-0123456789abcdef", lease)
    assert decodes_within(lambda: live_leases(store, "index"), (), 1 << 20) == []
    assert collect(store, grace=0).deleted == []  # gc runs (the store is empty)


@PROPERTY
@given(mutated_json({"created": 1763846400.0, "holder": "host:123", "renewed": 1763846400.0}))
def test_any_damaged_lease_is_a_lease_or_ignored(data: bytes) -> None:
    store = MemoryStore({"leases/gc-0": data})
    leases = decodes_within(lambda: live_leases(store, "gc", ttl=1e12), (), 1 << 20)
    for lease in leases:
        assert isinstance(lease.renewed, float) and isinstance(lease.holder, str)


def test_a_valid_lease_still_reads_and_expires(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with hold(store, "gc", against="index"):
        [lease] = live_leases(store, "gc")
        assert ":" in lease.holder
    store.put("leases/gc-00", json.dumps({"created": time.time() - 7 * 3600}).encode())
    assert live_leases(store, "gc") == []


# -- the index meta's weights, safetensors headers --------------------------------------------


@PROPERTY
@given(mutated_json(WEIGHTS))
def test_any_damaged_weights_meta_is_bad_weights_meta(data: bytes) -> None:
    try:
        meta = json.loads(data)
    except ValueError:
        return  # the index format's own decoder refuses it first
    if not isinstance(meta, dict):
        return
    files = decodes_within(lambda: listed(meta), (BadWeightsMeta,), 1 << 20)
    for f in files or []:  # what a mount's weights plan and `cafs weights list` read
        assert isinstance(f["path"], str) and isinstance(f["size"], int)
        assert isinstance(f.get("tensors", []), list)


@PROPERTY
@given(mutated_json({"__metadata__": {"format": "pt"},
                     "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                     "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}))
def test_any_damaged_safetensors_header_is_a_value_error(header: bytes) -> None:
    tensors = decodes_within(lambda: parse_safetensors_header(header, 32), (ValueError,),
                             1 << 20)
    for t in tensors or []:
        assert 0 <= t["data_offsets"][0] <= t["data_offsets"][1] <= 32


@pytest.mark.parametrize("header", [
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [1e999, 4]}}',  # OverflowError
    b'{"w": 5}', b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}',
    b'{"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [' + b"4294967296," * 5000 + b'1], "data_offsets": [0, 4]}}',
    b"[" * 100_000 + b"]" * 100_000,
])
def test_a_hostile_safetensors_header_is_a_value_error(header: bytes) -> None:
    with pytest.raises(ValueError):
        decodes_within(lambda: parse_safetensors_header(header, 4), (), 8 << 20)
