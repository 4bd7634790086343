"""`cafs index`: turn one image into blobs, one index per layer-chain prefix, and pointers.

Order matters for consistency: blobs and indexes are uploaded first (invisible on their
own), and pointers are published only after every upload succeeded and every digest was
verified, so a failed or interrupted run never leaves a visible, incomplete image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from blobstore import BlobStore
from blobstore.base import blob_key, index_key, oci_key
from blobstore.envelope import MAX_SIZE
from blobstore.envelope import digest as blake3_digest
from indexer import erofs, imports, libraries, neighbours
from indexer.budgets import Budgets, Meter
from indexer.catalog import (
    ImageRecord,
    LayerRecord,
    publish,
    put_erofs,
    put_index,
    put_original,
)
from indexer.compression import open_layer
from indexer.format import MIN_CHUNK_SIZE, Index, encode_index, inode_count, with_meta
from indexer.layer import LayerApplier, LayerError
from indexer.lease import hold
from indexer.source import (
    MANIFEST_MEDIA_TYPES,
    ImageSource,
    Platform,
    ResolvedImage,
    SourceError,
    VerifiedReader,
    chain_ids,
)
from indexer.tree import Node, new_dir
from indexer.uploader import BlobUploader, UploadStats
from indexer.weights import describe as describe_weights

DEFAULT_CHUNK_SIZE = 4 << 20
# Model weights (files the weight prefetcher knows by name): fewer, larger requests and
# blobs. 16 MiB against 4 cut the weight path's CPU per GiB from 2.27x to 1.44x a plain
# download's (docs/BENCHMARKS.md, #21); a blob in flight is held whole in memory, which
# bounds it.
DEFAULT_WEIGHTS_CHUNK_SIZE = 16 << 20
LAYER_MEDIA_SUFFIXES = ("tar", "tar+gzip", "tar+zstd", "tar.gzip", "tar.zstd")
ProgressFn = Callable[[str, int, int], None]  # (what, done, total)

log = logging.getLogger(__name__)


@dataclass
class IndexOptions:
    platform: Platform = field(default_factory=Platform.host)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    weights_chunk_size: int = DEFAULT_WEIGHTS_CHUNK_SIZE
    budgets: Budgets = field(default_factory=Budgets)  # for hostile images
    workers: int = 16
    compress: bool = True
    name: str | None = None  # record the image under this ref instead of the source's
    neighbours: bool = True  # write the top index's neighbour pack (indexer/neighbours.py)

    def __post_init__(self) -> None:
        for size in (self.chunk_size, self.weights_chunk_size):
            if not MIN_CHUNK_SIZE <= size <= MAX_SIZE:  # readers refuse the index
                raise ValueError(f"chunk size {size} is outside {MIN_CHUNK_SIZE} to "
                                 f"{MAX_SIZE} bytes")


@dataclass
class IndexResult:
    record: ImageRecord
    uploads: UploadStats
    image_bytes: int  # uncompressed size of all layers
    index_bytes: int  # size of the image's (top) index
    seconds: float


class _Hashing:
    """sha256 of the uncompressed layer: the diff_id the image config promises."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def _check(image: ResolvedImage, budgets: Budgets) -> tuple[dict[str, Any], list[str]]:
    if image.manifest_media_type not in MANIFEST_MEDIA_TYPES:
        raise SourceError(f"unsupported manifest media type {image.manifest_media_type!r}")
    try:
        config = json.loads(image.config)
        diff_ids = [str(d) for d in config["rootfs"]["diff_ids"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"image config is malformed: {exc}") from exc
    if len(diff_ids) != len(image.layers):
        raise SourceError(
            f"image has {len(image.layers)} layers but its config lists {len(diff_ids)}")
    Meter(budgets, "max_layers").spend(len(image.layers))
    for layer in image.layers:
        if not layer.media_type.endswith(LAYER_MEDIA_SUFFIXES):
            raise SourceError(f"unsupported layer media type {layer.media_type!r}")
    return config, diff_ids


def _tree_stats(root: Node) -> tuple[int, int]:
    seen: set[int] = set()
    files = size = 0
    stack = [root]
    while stack:
        node = stack.pop()
        assert node.children is not None
        for child in node.children.values():
            if child.is_dir:
                stack.append(child)
            elif id(child) not in seen:
                seen.add(id(child))
                files += 1
                size += child.size
    return files, size


class Unpublished(RuntimeError):
    """Objects the image needs vanished from the store while it was indexed: not published."""


def index_image(source: ImageSource, store: BlobStore, opts: IndexOptions,
                progress: ProgressFn | None = None) -> IndexResult:
    with hold(store, "index", against="gc"):  # no sweep may run while we reuse blobs
        return _index_image(source, store, opts, progress)


def prove_present(store: BlobStore, keys: Iterable[str], workers: int) -> None:
    """Raise Unpublished unless every key exists in the store now.

    The index lease keeps `cafs gc` away while it is renewed, but a lease can lapse (a store
    that refused renewals for a TTL, a process stopped that long, clocks that disagree by a
    TTL), and a sweep then deletes what this run decided to reuse. Publishing a record whose
    objects are gone would break the image on every node, so the record is published only
    after every object it reaches was seen again, after the last upload. One existence check
    per object, in parallel (its cost: docs/ARCHITECTURE.md, "Operating it").
    """
    keys = list(dict.fromkeys(keys))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prove") as pool:
        missing = [k for k, ok in zip(keys, pool.map(store.exists, keys), strict=True) if not ok]
    if missing:
        raise Unpublished(
            f"{len(missing)} of {len(keys)} objects this image needs are gone from "
            f"{store.url} (first: {missing[0]}), deleted while it was indexed (a `cafs gc` "
            "while the index lease had lapsed?); the image was not published: index it again")


def _index_image(source: ImageSource, store: BlobStore, opts: IndexOptions,
                 progress: ProgressFn | None) -> IndexResult:
    start = time.monotonic()
    image = source.resolve(opts.platform)
    config, diff_ids = _check(image, opts.budgets)
    chains = chain_ids(diff_ids)
    root = new_dir()
    uploader = BlobUploader(store, workers=opts.workers, compress=opts.compress,
                            keep_small=neighbours.MAX_BLOB if opts.neighbours else 0)
    applier = LayerApplier(root, uploader, blake3_digest, opts.chunk_size, opts.budgets,
                           opts.weights_chunk_size)
    image_bytes_left = Meter(opts.budgets, "max_image_bytes")
    index_entries = Meter(opts.budgets, "max_index_entries")
    layers: list[LayerRecord] = []
    packs: list[str] = []  # the neighbour pack written (the record reaches it)
    image_bytes = index_bytes = 0
    try:
        for i, desc in enumerate(image.layers):
            image_bytes += _apply_layer(source, desc, diff_ids[i], applier, opts,
                                        image_bytes_left, progress)
            last = i == len(image.layers) - 1
            meta = _meta(image, config if last else None, chains[i], i + 1)
            if applier.saw_weights:
                _add_weights(meta, root)
            data = encode_index(root, meta, opts.chunk_size)
            index_entries.spend(inode_count(data))
            key, index_bytes = (_put_top(store, data, uploader, opts, packs,
                                         libraries.record(Index(data), root, applier.ldconf))
                                if last else (put_index(store, data), len(data)))
            layers.append(LayerRecord(desc.digest, desc.size, desc.media_type, diff_ids[i],
                                      chains[i], key))
        if not image.layers:
            data = encode_index(root, _meta(image, config, "", 0), opts.chunk_size)
            top, index_bytes = _put_top(store, data, uploader, opts, packs, None)
        else:
            top = layers[-1].index
        stats = uploader.finish()
    except BaseException:
        uploader.abort()
        raise
    reached = [blob_key(d) for d in uploader.digests()]
    reached += [index_key(layer.index) for layer in layers] + [index_key(top)]
    reached += [neighbours.pack_key(p) for p in packs]
    for dig, data_ in ((image.manifest_digest, image.manifest),
                       (image.config_digest, image.config),
                       (image.index_digest, image.index)):
        if dig and data_ is not None:
            put_original(store, dig, data_)
            reached.append(oci_key(dig))
    prove_present(store, reached, opts.workers)
    files, size = _tree_stats(root)
    record = ImageRecord(
        ref=opts.name or image.name, index=top, manifest_digest=image.manifest_digest,
        manifest_media_type=image.manifest_media_type, config_digest=image.config_digest,
        platform=image.platform, layers=layers, index_digest=image.index_digest,
        files=files, total_bytes=size)
    publish(store, record)
    return IndexResult(record, stats, image_bytes, index_bytes, time.monotonic() - start)


def _put_top(store: BlobStore, data: bytes, uploader: BlobUploader, opts: IndexOptions,
             packs: list[str], libs: dict[str, Any] | None) -> tuple[str, int]:
    """The image's top index, recording the digest of its tree's EROFS image and its
    neighbour pack, with both, and its `libraries` record (indexer/libraries.py). The EROFS
    image is for mounts whose kernel serves the metadata: built once here, not by every
    node's first mount (1-2 s per 100k files in Python). A node mounts the stored image only
    because the index it verified names its digest (cafs/daemon/kernelmeta.py). The
    neighbour pack lets a cold read bring its directory's small files in one ranged GET; the
    libraries record, a program's first read its libraries; the imports record (made from
    the same small files' bytes, so only with the pack), a module's first read the modules
    it imports. Lower chains get none of them: their mounts build their own image and fetch
    blob by blob. Returns the index key and size."""
    index = Index(data)
    extra: dict[str, Any] = dict(libs or {})
    image: bytes | None = None
    try:
        image = erofs.build(index)
        extra.update(erofs.record(image))
    except erofs.Unrepresentable as exc:
        log.info("no EROFS image for this image (its mounts serve metadata via FUSE): %s",
                 exc)
    if opts.neighbours:
        extra.update(imports.record(index, uploader.small) or {})
        built = neighbours.build(index, uploader.small, opts.compress)
        if built is not None:
            pack, record = built
            packed = record[neighbours.META_KEY]["pack"]
            if not store.exists(neighbours.pack_key(packed)):
                store.put(neighbours.pack_key(packed), pack)
            packs.append(packed)
            extra.update(record)
        uploader.small.clear()
    if extra:
        data = with_meta(data, {**index.meta, **extra})
    key = put_index(store, data)
    if image is not None:
        put_erofs(store, key, image)
    return key, len(data)


def _meta(image: ResolvedImage, config: dict[str, Any] | None, chain: str,
          depth: int) -> dict[str, Any]:
    """Deterministic: the same image indexed twice gives byte-identical indexes."""
    meta: dict[str, Any] = {"schema": 1, "chain_id": chain, "layers": depth}
    if config is not None:
        meta["config"] = config
        meta["manifest_digest"] = image.manifest_digest
        meta["platform"] = image.platform
    return meta


def _add_weights(meta: dict[str, Any], root: Node) -> None:
    """Only when there are weights: indexes of other images stay byte-identical."""
    described = describe_weights(root)
    if described is not None:
        meta["weights"] = described


def _apply_layer(source: ImageSource, desc: Any, diff_id: str, applier: LayerApplier,
                 opts: IndexOptions, image_bytes: Meter, progress: ProgressFn | None) -> int:
    raw = source.open_blob(desc)
    try:
        verified = VerifiedReader(raw, desc.digest, desc.size)
        stream = open_layer(verified, opts.budgets.max_layer_bytes,  # type: ignore[arg-type]
                            image_bytes)
        tar = _Hashing(stream)  # type: ignore[arg-type]
        applier.apply(tar)  # type: ignore[arg-type]
        while tar.read(1 << 20):  # trailing padding counts towards the diff_id
            pass
        verified.drain()
    except LayerError as exc:
        raise LayerError(f"layer {desc.digest}: {exc}") from exc
    finally:
        raw.close()
    if "sha256:" + tar.sha.hexdigest() != diff_id:
        raise SourceError(f"layer {desc.digest} does not match its diff_id {diff_id}")
    if progress:
        progress("layer", desc.size, desc.size)
    return tar.count
