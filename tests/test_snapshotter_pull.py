"""`cafs pull`'s planning from store pointers, and the small pure parts it and List rest on:
reference normalisation, chain ids, label budgets, and containerd's filter syntax."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from blobstore.base import oci_key
from blobstore.local import LocalStore
from snapshotter.catalog import Catalog, CatalogError, chain_ids, normalize_ref
from snapshotter.filters import Adaptor, FilterSyntaxError, compile_filters, parse
from snapshotter.pull import (
    CRI_LAYERS,
    MAX_LABEL_SIZE,
    PullError,
    _content_labels,
    _layer_list_label,
    plan,
)

REF = "example.com/team/app:1"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def publish(
    store: LocalStore, ref: str = REF, layers: int = 2, index: bool = False
) -> dict[str, str]:
    """Pointers as the indexer writes them, for an image whose layers are never stored."""
    diff_ids = [_sha(f"layer {i}".encode()) for i in range(layers)]
    chains = chain_ids(diff_ids)
    config = json.dumps(
        {"os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha(config),
            },
            "layers": [{"digest": _sha(f"blob {i}".encode())} for i in range(layers)],
        }
    ).encode()
    record = {
        "schema": 1,
        "ref": ref,
        "index": "0" * 64,
        "manifest_digest": _sha(manifest),
        "manifest_media_type": "application/vnd.oci.image.manifest.v1+json",
        "config_digest": _sha(config),
        "index_digest": None,
        "platform": "linux/amd64",
        "layers": [
            {
                "digest": _sha(f"blob {i}".encode()),
                "size": 1,
                "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
                "diff_id": diff_ids[i],
                "chain_id": chains[i],
                "index": f"{i}" * 64,
            }
            for i in range(layers)
        ],
    }
    for data in (config, manifest):
        store.put(oci_key(_sha(data)), data)
    if index:
        other = {
            "digest": "sha256:" + "9" * 64,
            "platform": {"os": "linux", "architecture": "arm64"},
        }
        doc = json.dumps(
            {"schemaVersion": 2, "manifests": [other, {"digest": _sha(manifest)}]}
        ).encode()
        store.put(oci_key(_sha(doc)), doc)
        record["index_digest"] = _sha(doc)
    for chain in chains:
        store.put(
            f"chains/{chain}",
            json.dumps({"schema": 1, "chain_id": chain, "index": "0" * 64}).encode(),
        )
    data = json.dumps(record).encode()
    store.put(f"refs/{ref}", data)
    store.put(f"manifests/{record['manifest_digest']}", data)
    return {"top": chains[-1], "manifest": _sha(manifest), "config": _sha(config)}


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


def test_plan_reads_and_checks_everything(store: LocalStore) -> None:
    ids = publish(store)
    p = plan(REF, Catalog(store))
    assert p.name == REF and p.chains[-1] == ids["top"] and p.index is None
    assert p.target.digest == ids["manifest"]
    assert p.config.media_type == "application/vnd.oci.image.config.v1+json"
    labels = _content_labels(p, "cafs")
    assert labels[ids["config"]] == {"containerd.io/gc.ref.snapshot.cafs": ids["top"]}
    assert labels[ids["manifest"]] == {"containerd.io/gc.ref.content.config": ids["config"]}
    assert plan(ids["manifest"], Catalog(store)).name == REF  # by manifest digest


def test_plan_targets_the_image_index_when_there_is_one(store: LocalStore) -> None:
    ids = publish(store, index=True)
    p = plan(REF, Catalog(store))
    assert p.index is not None and p.target is p.index
    assert p.target.media_type == "application/vnd.oci.image.index.v1+json"
    assert _content_labels(p, "cafs")[p.index.digest] == {
        "containerd.io/gc.ref.content.m.1": ids["manifest"]
    }


def test_plan_refuses_what_cannot_be_served(store: LocalStore) -> None:
    with pytest.raises(CatalogError, match="no indexed image"):
        plan("example.com/nothing:1", Catalog(store))
    ids = publish(store)
    store.delete(f"chains/{ids['top']}")
    with pytest.raises(PullError, match="without an index"):
        plan(REF, Catalog(store))


def test_familiar_names_are_found(store: LocalStore) -> None:
    publish(store, ref="docker.io/library/busybox:latest")
    assert plan("busybox", Catalog(store)).name == "docker.io/library/busybox:latest"


@pytest.mark.parametrize(
    ("ref", "full"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("user/app:2", "docker.io/user/app:2"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("registry.local/a/b:c", "registry.local/a/b:c"),
        ("python@sha256:" + "a" * 64, "docker.io/library/python@sha256:" + "a" * 64),
    ],
)
def test_normalize_ref(ref: str, full: str) -> None:
    assert normalize_ref(ref) == full


def test_chain_ids_match_containerd() -> None:
    a, b = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert chain_ids([a, b]) == [a, _sha(f"{a} {b}".encode())]


def test_layer_list_label_fits_containerds_limit() -> None:
    digests = ["sha256:" + f"{i:064x}" for i in range(100)]
    value = _layer_list_label(digests)
    assert len(CRI_LAYERS) + len(value) <= MAX_LABEL_SIZE
    assert value.split(",") == digests[: len(value.split(","))] and len(value.split(",")) > 10


def _adaptor(fields: dict[str, str]) -> Adaptor:
    def field(path: list[str]) -> tuple[str, bool]:
        key = ".".join(path)
        return fields.get(key, ""), key in fields

    return field


def test_filters() -> None:
    snap = _adaptor({"name": "n1", "parent": "", "kind": "committed", "labels.a.b": "x:y"})
    handshake = 'labels."a.b"==x:y,parent==""'
    assert compile_filters([handshake])(snap)
    assert not compile_filters(['labels."a.b"==x:z'])(snap)
    assert compile_filters(["labels.a.b"])(snap)  # presence; bare dotted key
    assert compile_filters(["kind!=active", "name==zz"])(snap)  # OR across filters
    assert not compile_filters(["kind!=committed"])(snap)
    assert compile_filters(["name~=^n[0-9]$"])(snap)
    assert compile_filters(["name~=/^n[0-9]$/", "name~=|^n1|"])(snap)  # regexp quotes
    assert compile_filters(['name=="n1"', "name == n1"])(snap)
    assert not compile_filters(["name==n1|kind==committed"])(snap)  # '|' is no OR: a value
    assert compile_filters([])(snap) and compile_filters([""])(snap)
    assert compile_filters(["name==zz", ""])(snap)  # an empty filter is containerd's Always
    conj = parse('labels."containerd.io/snapshot.ref"==sha256:ab,parent=="default/1/x"')
    assert [s.fieldpath for s in conj] == [("labels", "containerd.io/snapshot.ref"), ("parent",)]
    assert [s.value for s in conj] == ["sha256:ab", "default/1/x"]


@pytest.mark.parametrize(
    "malformed",
    [
        "== broken",  # no field
        "name==",  # no value
        "name==a b",  # a bare value ends at a space
        "name==a,",  # a selector must follow ','
        "name=a",  # not an operator
        "name<>a",
        'labels."unterminated',
        "labels.containerd.io/snapshot.ref==x",  # '/' only in quoted fields
        "name~=/unterminated",
        "labels . a",  # no spaces in a field path
    ],
)
def test_malformed_filters_are_refused_like_containerd(malformed: str) -> None:
    """containerd 1.6's filters.Parse refuses each of these (checked against it); so does
    cafs, and its Walk answers INVALID_ARGUMENT as overlayfs's does."""
    with pytest.raises(FilterSyntaxError):
        compile_filters(["name==x", malformed])
