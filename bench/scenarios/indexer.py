"""`cafs index` beside `umoci unpack` of the same OCI layout; index size; dedup across versions.

Both read the same gzip layers from the same layout (in the page cache for both: it was
just built), so the comparison is of what each does with them: umoci writes a tree to disk,
cafs hashes, chunks, compresses and uploads blobs into a fresh file:// store. Throughput is
MB of uncompressed layer tar per second. The order alternates between repeats.

Dedup: the image is indexed, then a second version that changes a few files of its package
layer is indexed into the same store. The bytes the second run uploads, as a share of the
image, are set beside what an OCI registry stores for the same change: the new layer blobs.
"""

from __future__ import annotations

import functools
import shutil

from bench import images
from bench.context import Context
from bench.core import ScenarioResult, register
from blobstore import open_store
from blobstore.base import INDEX_PREFIX
from indexer.build import IndexResult

THROUGHPUT = "throughput"
UMOCI = "umoci unpack"
CAFS = "cafs index"
RATIO = "cafs index / umoci unpack"


def _index_bytes(store_url: str) -> int:
    store = open_store(store_url)
    return sum(info.size for info in store.list_info(INDEX_PREFIX))


def _rm_store(store_url: str) -> None:
    if store_url.startswith("file://"):
        shutil.rmtree(store_url.removeprefix("file://"), ignore_errors=True)


@register("indexer", "cafs index vs umoci unpack; index size; dedup", tools=("umoci",))
def run(ctx: Context, res: ScenarioResult) -> None:
    built = ctx.built("realistic")
    mb = built.image_bytes / 1e6
    res.params.update(
        image_bytes=built.image_bytes,
        compressed_bytes=built.compressed_bytes,
        files=built.files,
        layers=len(built.layer_digests),
        store="file",
    )
    kept: tuple[str, IndexResult] | None = None  # the last store, for the dedup run
    for i in range(ctx.repeat):
        order = ("umoci", "cafs") if i % 2 == 0 else ("cafs", "umoci")
        for who in order:
            ctx.step(f"{who} {i + 1}/{ctx.repeat}")
            if who == "umoci":
                dest = ctx.ws.dir("umoci")
                seconds = ctx.timed(functools.partial(images.umoci_unpack, built, dest))
                shutil.rmtree(dest)
                res.add(THROUGHPUT, UMOCI, mb / seconds, "MB/s", baseline=True, seconds=seconds)
            else:
                if kept is not None:
                    _rm_store(kept[0])
                kept = _index_once(ctx, res, built, mb)
        ctx.log(f"indexer repeat {i + 1}: " + _last(res))
    res.compare(RATIO, f"{THROUGHPUT}: {CAFS}", f"{THROUGHPUT}: {UMOCI}")
    res.goal("cafs index at least as fast as umoci unpack", RATIO, ">=", 1.0)
    res.goal("index ≤ 1% of the image", "index size: top index, uncompressed", "<=", 1.0)
    assert kept is not None
    _dedup(ctx, res, *kept)
    _rm_store(kept[0])


def _index_once(
    ctx: Context, res: ScenarioResult, built: images.Built, mb: float
) -> tuple[str, IndexResult]:
    """Index into a new store; returns the store and the result."""
    url = ctx.store_url("indexer", "file")
    result = images.index_into(built, url, "bench/realistic:latest")
    up = result.uploads
    res.add(
        THROUGHPUT,
        CAFS,
        mb / result.seconds,
        "MB/s",
        seconds=result.seconds,
        blobs=up.unique,
        stored_bytes=up.stored_bytes,
    )
    all_indexes = _index_bytes(url)
    share = 100 * result.index_bytes / built.image_bytes
    res.add(
        "index size",
        "top index, uncompressed",
        share,
        "% of image",
        "lower",
        bytes=result.index_bytes,
    )
    res.add(
        "index size",
        "all chain-prefix indexes, as stored",
        100 * all_indexes / built.image_bytes,
        "% of image",
        "lower",
        bytes=all_indexes,
    )
    return url, result


def _last(res: ScenarioResult) -> str:
    parts = [f"{s.contender} {s.samples[-1]:.1f} {s.unit}" for s in res.series if s.samples]
    return ", ".join(parts)


def _dedup(ctx: Context, res: ScenarioResult, url: str, first: IndexResult) -> None:
    """Index v2 into the store that holds v1."""
    v1, v2 = ctx.built("realistic"), ctx.built("realistic-v2")
    ctx.step("dedup: index v2 beside v1")
    second = images.index_into(v2, url, "bench/realistic:v2")
    new_layers = sum(
        size
        for digest, size in zip(v2.layer_digests, v2.layer_sizes, strict=True)
        if digest not in v1.layer_digests
    )
    group, unit = "bytes stored for a new version", "% of image"
    share_cafs = 100 * second.uploads.stored_bytes / v2.image_bytes
    share_oci = 100 * new_layers / v2.image_bytes
    res.add(
        group,
        "OCI registry: new layers (gzip)",
        share_oci,
        unit,
        "lower",
        True,
        bytes=new_layers,
    )
    res.add(
        group,
        "cafs: new blobs",
        share_cafs,
        unit,
        "lower",
        bytes=second.uploads.stored_bytes,
        blobs=second.uploads.uploaded,
        present=second.uploads.present,
    )
    res.add(
        "store size of the first version",
        "cafs blobs (zstd)",
        100 * first.uploads.stored_bytes / v1.image_bytes,
        unit,
        "lower",
        bytes=first.uploads.stored_bytes,
    )
    res.add(
        "store size of the first version",
        "OCI layers (gzip)",
        100 * v1.compressed_bytes / v1.image_bytes,
        unit,
        "lower",
        True,
        bytes=v1.compressed_bytes,
    )
    res.params.update(
        v2_changed_files=images.CHANGED_FILES,
        v2_added_files=1,
        v2_uploaded_blobs=second.uploads.uploaded,
        v2_present_blobs=second.uploads.present,
        v2_seconds=second.seconds,
    )
    ctx.log(
        f"dedup: v2 uploads {second.uploads.stored_bytes / 1e3:.0f} kB "
        f"({share_cafs:.3f}% of the image); OCI new layers {share_oci:.1f}%"
    )
