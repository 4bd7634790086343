"""`cafs pull`: make an indexed image appear in containerd, unpacked, without its layers.

containerd 1.6/1.7's `ctr images pull` downloads every layer and unpacks without the labels
that let a snapshotter serve a layer remotely, so cafs does the unpack handshake itself:

1. take a lease, so nothing written below is garbage-collected half way;
2. put the image's original index/manifest/config bytes into containerd's content store
   (no layers), with the GC labels a real pull would set;
3. for each layer, bottom to top, `Snapshots/Prepare` through containerd (so its metadata
   records the snapshot) with the labels containerd's unpacker sends; the cafs snapshotter
   answers ALREADY_EXISTS and the chain exists;
4. label the config `containerd.io/gc.ref.snapshot.<snapshotter>=<top chain>` so the chain
   lives as long as the image, create the image record, and drop the lease.

Then `ctr run --snapshotter cafs REF` finds the image unpacked (its top chain exists).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from blobstore import open_store
from snapshotter.catalog import Catalog, CatalogError, ImageRecord, chain_ids, normalize_ref
from snapshotter.containerd import Blob, Containerd, ContainerdError
from snapshotter.pullprotocol import PullResult

log = logging.getLogger(__name__)

REF_LABEL = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER = "containerd.io/snapshot/cri.layer-digest"
CRI_LAYERS = "containerd.io/snapshot/cri.image-layers"
MAX_LABEL_SIZE = 4096
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPES = {
    "application/vnd.docker.distribution.manifest.v2+json": (
        "application/vnd.docker.container.image.v1+json"
    ),
}
CONFIG_DEFAULT = "application/vnd.oci.image.config.v1+json"
PLAN_READS = 16  # store reads at once while planning (an image has up to ~127 layers)


class PullError(Exception):
    pass


@dataclass
class PullPlan:
    """Everything containerd will be given, read and checked before it is touched."""

    name: str
    manifest: Blob
    config: Blob
    index: Blob | None
    chains: list[str]
    layer_digests: list[str]

    @property
    def target(self) -> Blob:
        return self.index or self.manifest


def _layer_list_label(digests: list[str]) -> str:
    """As CRI: the digests from this layer up, as many as fit in one label."""
    budget = MAX_LABEL_SIZE - len(CRI_LAYERS)
    kept: list[str] = []
    for digest in digests:
        if len(",".join([*kept, digest])) > budget:
            break
        kept.append(digest)
    return ",".join(kept)


def _unique_key(chain_id: str) -> str:
    """containerd's unpacker key shape: 'extract-<nanos>-<random> <chainID>'."""
    rand = base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{rand} {chain_id}"


@dataclass(frozen=True)
class _Documents:
    manifest: Blob
    config: Blob
    diff_ids: list[str]
    layer_digests: list[str]


def _documents(record: ImageRecord, manifest_bytes: bytes, config_bytes: bytes) -> _Documents:
    """The original manifest and config, parsed enough to check them; PullError if bad."""
    try:
        manifest = json.loads(manifest_bytes)
        diff_ids = [str(d) for d in json.loads(config_bytes)["rootfs"]["diff_ids"]]
        layer_digests = [str(layer["digest"]) for layer in manifest["layers"]]
        config_type = manifest["config"].get("mediaType") or CONFIG_TYPES.get(
            record.manifest_media_type, CONFIG_DEFAULT
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PullError(f"{record.ref}: malformed manifest or config in the store: {exc}") from exc
    if not diff_ids or len(diff_ids) != len(layer_digests):
        raise PullError(
            f"{record.ref}: config lists {len(diff_ids)} diff ids, "
            f"manifest {len(layer_digests)} layers"
        )
    return _Documents(
        Blob(record.manifest_media_type, record.manifest_digest, manifest_bytes),
        Blob(config_type, record.config_digest, config_bytes),
        diff_ids,
        layer_digests,
    )


def _index_blob(record: ImageRecord, catalog: Catalog) -> Blob | None:
    """The image index the ref pointed at, if the store kept it; without it the platform
    manifest alone is still a complete image."""
    if not record.index_digest:
        return None
    try:
        data = catalog.oci_blob(record.index_digest)
        media_type = json.loads(data).get("mediaType") or OCI_INDEX
    except (CatalogError, ValueError, AttributeError) as exc:
        log.warning("image index %s unusable (%s); using the manifest", record.index_digest, exc)
        return None
    return Blob(media_type, record.index_digest, data)


def plan(ref: str, catalog: Catalog, name: str | None = None) -> PullPlan:
    """Read and check everything containerd will be given, before touching containerd.

    Once the image record is read, what it names (manifest, config, image index, the
    chains it records) is read at once: each is a round trip to the store, on the path of
    every cold start (one round trip instead of four behind a 10 ms link)."""
    record = catalog.image(ref)
    recorded = [layer.chain_id for layer in record.layers]
    with ThreadPoolExecutor(min(PLAN_READS, 3 + len(recorded))) as pool:
        manifest = pool.submit(catalog.oci_blob, record.manifest_digest)
        config = pool.submit(catalog.oci_blob, record.config_digest)
        index = pool.submit(_index_blob, record, catalog)
        found = dict(zip(recorded, pool.map(catalog.has_chain, recorded), strict=True))
        docs = _documents(record, manifest.result(), config.result())
        index_blob = index.result()
    chains = chain_ids(docs.diff_ids)
    if recorded and recorded != chains:
        raise PullError(f"{ref}: the store's layer chain ids disagree with the image config")
    missing = [c for c in chains if not (found[c] if c in found else catalog.has_chain(c))]
    if missing:
        raise PullError(f"{ref}: chains without an index in the store: {', '.join(missing)}")
    return PullPlan(
        name=name or normalize_ref(record.ref or ref),
        manifest=docs.manifest,
        config=docs.config,
        index=index_blob,
        chains=chains,
        layer_digests=docs.layer_digests,
    )


def _content_labels(p: PullPlan, snapshotter: str) -> dict[str, dict[str, str]]:
    """The GC references a real pull leaves: index -> manifest -> config -> snapshot."""
    labels = {
        p.manifest.digest: {"containerd.io/gc.ref.content.config": p.config.digest},
        p.config.digest: {f"containerd.io/gc.ref.snapshot.{snapshotter}": p.chains[-1]},
    }
    if p.index is not None:
        entries = json.loads(p.index.data).get("manifests", [])
        labels[p.index.digest] = {
            f"containerd.io/gc.ref.content.m.{i}": e["digest"]
            for i, e in enumerate(entries)
            if e.get("digest") == p.manifest.digest
        }
    return labels


def _prepare_chain(ctd: Containerd, p: PullPlan, snapshotter: str, result: PullResult) -> None:
    parent = ""
    for i, chain in enumerate(p.chains):
        if ctd.stat_snapshot(snapshotter, chain) is not None:
            result.present.append(chain)
            parent = chain
            continue
        labels = {
            REF_LABEL: chain,
            CRI_IMAGE_REF: p.name,
            CRI_MANIFEST: p.manifest.digest,
            CRI_LAYER: p.layer_digests[i],
            CRI_LAYERS: _layer_list_label(p.layer_digests[i:]),
        }
        if not ctd.prepare_remote(snapshotter, _unique_key(chain), parent, labels):
            raise PullError(
                f"snapshotter {snapshotter!r} did not serve layer {i} (chain {chain}) remotely: "
                "is it the cafs snapshotter, and does it use the same store?"
            )
        if ctd.stat_snapshot(snapshotter, chain) is None:
            raise PullError(f"chain {chain} was accepted but containerd does not list it")
        result.prepared.append(chain)
        parent = chain


def pull(
    ref: str,
    *,
    address: str,
    namespace: str = "default",
    store_url: str | None = None,
    snapshotter: str = "cafs",
    name: str | None = None,
) -> PullResult:
    """The whole pull in this process, planned from `store_url`: what `cafs pull` does
    where no snapshotter answers on its pull socket (snapshotter.pullservice)."""
    p = plan(ref, Catalog(open_store(store_url)), name)
    return apply(p, address=address, namespace=namespace, snapshotter=snapshotter)


def apply(p: PullPlan, *, address: str, namespace: str, snapshotter: str) -> PullResult:
    """containerd's side of a pull: documents, layers prepared bottom to top, GC labels,
    the image record, all under one lease. Tried and not kept: writing the documents while
    the layers are prepared and labelling them at once (containerd's part stayed 60 ms:
    its metadata store takes one write at a time)."""
    result = PullResult(name=p.name, top_chain=p.chains[-1])
    try:
        ctd = Containerd(address, namespace)
    except ContainerdError as exc:
        raise PullError(str(exc)) from exc
    try:
        with ctd.leased():
            blobs = [b for b in (p.index, p.manifest, p.config) if b is not None]
            for blob in blobs:
                ctd.write_blob(blob)
            _prepare_chain(ctd, p, snapshotter, result)
            for digest, labels in _content_labels(p, snapshotter).items():
                ctd.label_blob(digest, labels)
            image_labels = {"io.cri-containerd.image": "managed"} if namespace == "k8s.io" else {}
            ctd.put_image(p.name, p.target, image_labels)
    except ContainerdError as exc:
        raise PullError(str(exc)) from exc
    finally:
        ctd.close()
    return result
