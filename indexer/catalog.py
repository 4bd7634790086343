"""Pointers from names to indexes: refs/, manifests/ and chains/, plus index objects.

Indexes and blobs are immutable and content-addressed; pointers are the only mutable keys
and are written last, so a reader that finds a pointer finds everything it points to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field

from blobstore import BlobNotFound, BlobStore, records
from blobstore.base import (
    CHAIN_PREFIX,
    EROFS_PREFIX,
    MANIFEST_PREFIX,
    REF_PREFIX,
    index_key,
    oci_key,
)
from blobstore.envelope import decode, digest, encode, envelope_limit
from blobstore.errors import BlobCorrupt
from indexer import erofs
from indexer.format import Index
from indexer.reference import Reference
from indexer.source import SourceError

SCHEMA = 1
# Bounds a stored record must keep (docs/FORMAT.md); it is read no further than this.
MAX_RECORD_BYTES = 4 << 20
# The largest index or EROFS image read from a store: an index within the entry budget
# (indexer/budgets.py, 4M entries of at most a 64-byte inode, a dirent and a 255-byte name,
# plus chunk keys) stays under 2 GiB. A larger object is refused before it is read.
MAX_TREE_BYTES = 2 << 30
MAX_ORIGINAL_BYTES = 64 << 20  # an OCI manifest, index or config kept verbatim
MAX_LAYERS = 4096
MAX_TEXT = 4096  # a reference, media type or platform
INT64 = (1 << 63) - 1
# An OCI digest (algorithm:encoded): what keys are built from, so never a '/' or '..'.
DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,256}")


class CatalogError(LookupError):
    """No such image, chain or index in the store."""


@dataclass
class LayerRecord:
    digest: str
    size: int
    media_type: str
    diff_id: str
    chain_id: str
    index: str  # BLAKE3 of the index of the tree up to and including this layer


@dataclass
class ImageRecord:
    """What refs/<name> and manifests/<digest> hold."""

    ref: str
    index: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    platform: str
    layers: list[LayerRecord]
    index_digest: str | None = None
    files: int = 0
    total_bytes: int = 0
    created: float = field(default_factory=time.time)
    schema: int = SCHEMA

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        """The record in `data`, every field checked against its type and bounds;
        CatalogError, and nothing else, if any is off."""
        try:
            f = records.parse(data)
            if f.obj.get("schema") != SCHEMA:
                raise CatalogError("unsupported image record schema "
                                   f"{records.short(f.obj.get('schema'))}")
            layers = [_layer(records.Fields(layer, "layer"))
                      for layer in f.items("layers", MAX_LAYERS)]
            return cls(f.text("ref", MAX_TEXT), f.text("index", 64, records.HEX64),
                       f.text("manifest_digest", MAX_TEXT, DIGEST),
                       f.text("manifest_media_type", MAX_TEXT),
                       f.text("config_digest", MAX_TEXT, DIGEST), f.text("platform", MAX_TEXT),
                       layers, f.opt_text("index_digest", MAX_TEXT, DIGEST),
                       f.integer("files", 0, INT64, 0), f.integer("total_bytes", 0, INT64, 0),
                       f.number("created", 0.0))
        except records.RecordError as exc:
            raise CatalogError(f"malformed image record: {exc}") from None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()


def _layer(f: records.Fields) -> LayerRecord:
    return LayerRecord(f.text("digest", MAX_TEXT, DIGEST), f.integer("size", 0, INT64),
                       f.text("media_type", MAX_TEXT), f.text("diff_id", MAX_TEXT, DIGEST),
                       f.text("chain_id", MAX_TEXT, DIGEST), f.text("index", 64, records.HEX64))


def read_record(store: BlobStore, key: str) -> ImageRecord:
    """The image record under `key`: BlobNotFound if there is none, CatalogError if it is
    not one (over its size bound, or any field off)."""
    try:
        return ImageRecord.from_json(records.read(store, key, MAX_RECORD_BYTES))
    except BlobCorrupt as exc:
        raise CatalogError(str(exc)) from None


def put_index(store: BlobStore, data: bytes) -> str:
    key = digest(data)
    if not store.exists(index_key(key)):
        store.put(index_key(key), encode(data))
    return key


def load_index(store: BlobStore, key: str) -> Index:
    try:
        envelope = store.get(index_key(key), envelope_limit(MAX_TREE_BYTES))
        # `most`: a few kB of zstd must not make a reader inflate more than a tree can be
        return Index(bytes(decode(envelope, key, most=MAX_TREE_BYTES)))
    except BlobNotFound:
        raise CatalogError(f"index {key} is not in {store.url}") from None


def erofs_key(index: str) -> str:
    return f"{EROFS_PREFIX}{index}.v{erofs.VERSION}"


def put_erofs(store: BlobStore, index: str, image: bytes) -> None:
    """The EROFS image of index `index`'s tree: its BLAKE3 (32 bytes), then the image in a
    blob envelope, which is verified against it on load (the key names the index, not the
    image, so the digest travels with it)."""
    key = erofs_key(index)
    if not store.exists(key):
        store.put(key, bytes.fromhex(digest(image)) + encode(image))


def load_erofs(store: BlobStore, index: str) -> tuple[str, bytes] | None:
    """The stored EROFS image of an index and its BLAKE3, which the bytes are verified
    against; None if there is none. The object vouches only for itself: whether it is
    the image of that index is for the index's own record to say (erofs.recorded)."""
    try:
        data = store.get(erofs_key(index), 32 + envelope_limit(MAX_TREE_BYTES))
    except BlobNotFound:
        return None
    if len(data) < 32:
        raise BlobCorrupt(f"{erofs_key(index)} is truncated")
    return data[:32].hex(), bytes(decode(data[32:], data[:32].hex(), most=MAX_TREE_BYTES))


def put_original(store: BlobStore, oci_digest: str, data: bytes) -> None:
    if not store.exists(oci_key(oci_digest)):
        store.put(oci_key(oci_digest), data)


def get_original(store: BlobStore, oci_digest: str) -> bytes:
    """Original OCI bytes, verified: their digest is the image's identity in containerd."""
    algo, _, hexpart = oci_digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise CatalogError(f"unsupported digest {oci_digest!r}")
    try:
        data = store.get(oci_key(oci_digest), MAX_ORIGINAL_BYTES)
    except BlobNotFound:
        raise CatalogError(f"{oci_digest} is missing from {store.url}") from None
    if hashlib.sha256(data).hexdigest() != hexpart:
        raise CatalogError(f"{oci_key(oci_digest)} does not match its digest")
    return data


def publish(store: BlobStore, record: ImageRecord) -> None:
    """Chains first, then the manifest, then the name: each pointer's targets exist."""
    for layer in record.layers:
        chain = {"schema": SCHEMA, "chain_id": layer.chain_id, "index": layer.index,
                 "image_manifest": record.manifest_digest}
        store.put(CHAIN_PREFIX + layer.chain_id, json.dumps(chain, sort_keys=True).encode())
    data = record.to_json()
    store.put(MANIFEST_PREFIX + record.manifest_digest, data)
    store.put(REF_PREFIX + record.ref, data)


def _candidate_keys(name: str) -> list[str]:
    if name.startswith("sha256:"):
        return [MANIFEST_PREFIX + name]
    keys = []
    _, at, dig = name.partition("@")
    if at:
        keys.append(MANIFEST_PREFIX + dig)
    keys.append(REF_PREFIX + name)
    with contextlib.suppress(SourceError):  # 'busybox' is 'docker.io/library/busybox:latest'
        keys.append(REF_PREFIX + str(Reference.parse(name)))
    return list(dict.fromkeys(keys))


def find_image(store: BlobStore, name: str) -> ImageRecord:
    """An image by ref (as recorded, or its canonical form), `name@digest` or digest."""
    for key in _candidate_keys(name):
        try:
            return read_record(store, key)
        except BlobNotFound:
            continue
        except CatalogError as exc:
            raise CatalogError(f"unreadable record {key} for {name!r}: {exc}") from None
    raise CatalogError(f"no indexed image named {name!r} in {store.url}; run `cafs index`")


def chain_index(store: BlobStore, chain_id: str) -> str | None:
    """The index serving a layer chain, or None if no indexed image has that chain."""
    key = CHAIN_PREFIX + chain_id
    try:
        f = records.parse(records.read(store, key, MAX_RECORD_BYTES))
        if f.obj.get("schema", SCHEMA) != SCHEMA:
            raise CatalogError(f"{key}: unsupported schema {records.short(f.obj['schema'])}")
        return f.text("index", 64, records.HEX64)
    except BlobNotFound:
        return None
    except (BlobCorrupt, records.RecordError) as exc:
        raise CatalogError(f"unreadable chain pointer {key}: {exc}") from None


def list_images(store: BlobStore) -> list[ImageRecord]:
    out = []
    for key in store.list(REF_PREFIX):
        try:
            out.append(read_record(store, key))
        except (BlobNotFound, CatalogError):
            continue
    return sorted(out, key=lambda r: r.ref)
