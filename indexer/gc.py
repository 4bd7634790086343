"""`cafs gc`: mark everything reachable from image records, sweep the rest.

Roots are the image records (`refs/`, `manifests/`); from them: their indexes (one per
chain prefix) and EROFS images, every blob those indexes name, the original OCI bytes, and
the chain pointers of their layers. Profiles, their packs and the neighbour pack of a live
index stay. Anything else
older than the grace period is deleted. A collector holds a `gc` lease and refuses to run while a
`cafs index` holds an `index` lease (see lease.py), so no blob is swept from under an
indexer that decided to reuse it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from blobstore import BlobNotFound, BlobStore
from blobstore.base import (
    BLOB_PREFIX,
    CHAIN_PREFIX,
    EROFS_PREFIX,
    INDEX_PREFIX,
    MANIFEST_PREFIX,
    OCI_PREFIX,
    PROFILE_PREFIX,
    REF_PREFIX,
    blob_key,
    index_key,
    oci_key,
)
from indexer.catalog import (
    CatalogError,
    ImageRecord,
    erofs_key,
    list_images,
    load_index,
    read_record,
)
from indexer.lease import hold
from indexer.neighbours import stored_pack

log = logging.getLogger(__name__)
GRACE = 3600.0
SWEPT_PREFIXES = (BLOB_PREFIX, INDEX_PREFIX, OCI_PREFIX, CHAIN_PREFIX, MANIFEST_PREFIX,
                  PROFILE_PREFIX, "packs/", EROFS_PREFIX)


@dataclass
class GcReport:
    images: int = 0
    live_indexes: int = 0
    live_blobs: int = 0
    deleted: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    kept_young: int = 0  # unreferenced, but within the grace period
    dry_run: bool = False


def _records(store: BlobStore) -> list[ImageRecord]:
    out = []
    for prefix in (REF_PREFIX, MANIFEST_PREFIX):
        for key in store.list(prefix):
            try:
                out.append(read_record(store, key))
            except BlobNotFound:
                continue
            except CatalogError as exc:
                # What it references cannot be told from garbage: sweeping would delete it.
                raise CatalogError(f"image record {key} is unreadable ({exc}); gc stopped, "
                                   "nothing deleted: restore or remove it first") from None
    return out


def mark(store: BlobStore) -> tuple[set[str], int, int, int]:
    """Keys that must stay; plus counts of images, indexes and blobs."""
    records = _records(store)
    live: set[str] = set()
    indexes: set[str] = set()
    for rec in records:
        live.add(MANIFEST_PREFIX + rec.manifest_digest)
        indexes.add(rec.index)
        for dig in (rec.manifest_digest, rec.config_digest, rec.index_digest):
            if dig:
                live.add(oci_key(dig))
        for layer in rec.layers:
            indexes.add(layer.index)
            live.add(CHAIN_PREFIX + layer.chain_id)
    blobs = 0
    for key in indexes:
        live.add(index_key(key))
        live.add(erofs_key(key))
        try:
            index = load_index(store, key)
        except CatalogError:
            log.error("image record names index %s, which is missing", key)
            continue
        chunks = index.all_chunks()
        pack = stored_pack(index)
        if pack is not None:
            live.add(pack)
        blobs += len(chunks)
        live.update(blob_key(c) for c in chunks)
        live.update(_profile_keys(store, key))
    return live, len({r.manifest_digest for r in records}), len(indexes), blobs


def _profile_keys(store: BlobStore, index: str) -> set[str]:
    keys = set()
    for key in store.list(f"{PROFILE_PREFIX}{index}/"):
        keys.add(key)
        try:
            profile = json.loads(store.get(key))
        except (BlobNotFound, ValueError, RecursionError):
            continue
        pack = profile.get("pack") if isinstance(profile, dict) else None
        if isinstance(pack, dict) and isinstance(pack.get("key"), str):
            keys.add(pack["key"])
    return keys


def collect(store: BlobStore, grace: float = GRACE, dry_run: bool = False) -> GcReport:
    with hold(store, "gc", against="index"):
        live, images, n_indexes, n_blobs = mark(store)
        report = GcReport(images, n_indexes, n_blobs, dry_run=dry_run)
        cutoff = time.time() - grace
        for prefix in SWEPT_PREFIXES:
            for info in store.list_info(prefix):
                if info.key in live:
                    continue
                if info.mtime > cutoff:
                    report.kept_young += 1
                    continue
                report.deleted.append(info.key)
                report.deleted_bytes += info.size
                if not dry_run:
                    store.delete(info.key)
    return report


def remove_ref(store: BlobStore, ref: str) -> ImageRecord:
    """Drop a name. Its manifest record goes too unless another name points at it."""
    key = REF_PREFIX + ref
    try:
        rec = read_record(store, key)
    except BlobNotFound:
        raise CatalogError(f"no indexed image named {ref!r} in {store.url}") from None
    store.delete(key)
    others = [r for r in list_images(store) if r.manifest_digest == rec.manifest_digest]
    if not others:
        store.delete(MANIFEST_PREFIX + rec.manifest_digest)
    return rec
