"""Reads the indexer's pointers in the store: which chains cafs can serve, and what an image is.

The snapshotter only needs `chains/<chainID>` (does an index exist for this layer chain?);
`cafs pull` needs `refs/<ref>` or `manifests/<digest>` (the image record) and `oci/` (the
original manifest, config and image-index bytes, which containerd must hold verbatim because
their digests are the image's identity).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Any

from blobstore import BlobNotFound, BlobStore
from blobstore.base import CHAIN_PREFIX, MANIFEST_PREFIX, REF_PREFIX, oci_key

SCHEMA = 1
DEFAULT_DOMAIN = "docker.io"


class CatalogError(Exception):
    """The store lacks, or holds a malformed, pointer that the caller asked for."""


@dataclass(frozen=True)
class ChainPointer:
    chain_id: str
    index: str
    image_manifest: str


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str
    diff_id: str
    chain_id: str
    index: str


@dataclass(frozen=True)
class ImageRecord:
    ref: str
    index: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    index_digest: str | None
    platform: str
    layers: tuple[Layer, ...]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """containerd's identity.ChainIDs: chain[i] = sha256(f"{chain[i-1]} {diff_id[i]}")."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if chains:
            text = f"{chains[-1]} {diff_id}".encode()
            chains.append("sha256:" + hashlib.sha256(text).hexdigest())
        else:
            chains.append(diff_id)
    return chains


def normalize_ref(ref: str) -> str:
    """Docker's familiar-name expansion: 'busybox' -> 'docker.io/library/busybox:latest'."""
    name, at, digest = ref.partition("@")
    first, slash, _ = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        name = f"{DEFAULT_DOMAIN}/{name}"
        if "/" not in name[len(DEFAULT_DOMAIN) + 1 :]:
            name = f"{DEFAULT_DOMAIN}/library/{name[len(DEFAULT_DOMAIN) + 1 :]}"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not at:
        name += ":latest"
    return f"{name}@{digest}" if at else name


def _require(obj: dict[str, Any], key: str, what: str) -> Any:
    if key not in obj:
        raise CatalogError(f"{what}: missing field {key!r}")
    return obj[key]


def _load_json(store: BlobStore, key: str) -> dict[str, Any]:
    raw = store.get(key)  # BlobNotFound propagates: absence is an answer, not an error
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise CatalogError(f"{key}: not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CatalogError(f"{key}: expected a JSON object")
    if obj.get("schema") != SCHEMA:
        raise CatalogError(f"{key}: unsupported schema {obj.get('schema')!r} (want {SCHEMA})")
    return obj


def _image_record(obj: dict[str, Any], key: str) -> ImageRecord:
    layers = tuple(
        Layer(
            digest=_require(layer, "digest", key),
            size=int(_require(layer, "size", key)),
            media_type=_require(layer, "media_type", key),
            diff_id=_require(layer, "diff_id", key),
            chain_id=_require(layer, "chain_id", key),
            index=layer.get("index", ""),
        )
        for layer in _require(obj, "layers", key)
    )
    return ImageRecord(
        ref=obj.get("ref", ""),
        index=obj.get("index", ""),
        manifest_digest=_require(obj, "manifest_digest", key),
        manifest_media_type=_require(obj, "manifest_media_type", key),
        config_digest=_require(obj, "config_digest", key),
        index_digest=obj.get("index_digest") or None,
        platform=obj.get("platform", "linux/amd64"),
        layers=layers,
    )


class Catalog:
    """Positive chain answers are cached: a chain pointer, once written, never goes away
    while an image uses it, and containerd asks once per layer of every unpack."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def chain(self, chain_id: str) -> ChainPointer | None:
        key = f"{CHAIN_PREFIX}{chain_id}"
        try:
            obj = _load_json(self.store, key)
        except BlobNotFound:
            return None
        return ChainPointer(
            chain_id=obj.get("chain_id", chain_id),
            index=_require(obj, "index", key),
            image_manifest=obj.get("image_manifest", ""),
        )

    def has_chain(self, chain_id: str) -> bool:
        with self._lock:
            if chain_id in self._known:
                return True
        if not chain_id.startswith("sha256:") or "/" in chain_id:
            return False
        found = self.store.exists(f"{CHAIN_PREFIX}{chain_id}")
        if found:
            with self._lock:
                self._known.add(chain_id)
        return found

    def image(self, ref: str) -> ImageRecord:
        """The record for an image ref ('name:tag', 'name@sha256:...') or a manifest digest."""
        keys = []
        if ref.startswith("sha256:"):
            keys.append(f"{MANIFEST_PREFIX}{ref}")
        else:
            _, at, digest = ref.partition("@")
            if at:
                keys.append(f"{MANIFEST_PREFIX}{digest}")
            keys += [f"{REF_PREFIX}{ref}", f"{REF_PREFIX}{normalize_ref(ref)}"]
        for key in dict.fromkeys(keys):
            try:
                return _image_record(_load_json(self.store, key), key)
            except BlobNotFound:
                continue
            except ValueError as exc:  # an invalid key: not a name the indexer could write
                raise CatalogError(f"invalid image reference {ref!r}: {exc}") from exc
        tried = ", ".join(dict.fromkeys(keys))
        raise CatalogError(
            f"{ref!r} is not indexed in {self.store.url} (looked for {tried}); "
            "run `cafs index` first"
        )

    def oci_blob(self, digest: str) -> bytes:
        """Original OCI bytes (manifest, config, image index), verified against the digest."""
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64:
            raise CatalogError(f"unsupported digest {digest!r}")
        try:
            data = self.store.get(oci_key(digest))
        except BlobNotFound as exc:
            raise CatalogError(f"{digest} is missing from {self.store.url}") from exc
        if hashlib.sha256(data).hexdigest() != hexpart:
            raise CatalogError(f"{oci_key(digest)} does not match its digest")
        return data
