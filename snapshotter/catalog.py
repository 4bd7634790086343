"""What the snapshotter and `cafs pull` need from the store, over indexer.catalog.

The snapshotter asks "can cafs serve this layer chain?" once per layer of every unpack;
positive answers are cached, because a chain pointer, once written, stays while an image
uses it. `cafs pull` needs the image record and the original OCI bytes.
"""

from __future__ import annotations

import threading

from blobstore import BlobStore
from indexer.catalog import CatalogError, ImageRecord, find_image, get_original
from indexer.reference import Reference
from indexer.source import SourceError, chain_ids

__all__ = ["Catalog", "CatalogError", "ImageRecord", "chain_ids", "normalize_ref"]


def normalize_ref(ref: str) -> str:
    """Docker's familiar-name expansion: 'busybox' -> 'docker.io/library/busybox:latest'."""
    try:
        return str(Reference.parse(ref))
    except SourceError as exc:
        raise CatalogError(str(exc)) from exc


class Catalog:
    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def has_chain(self, chain_id: str) -> bool:
        with self._lock:
            if chain_id in self._known:
                return True
        if not chain_id.startswith("sha256:") or "/" in chain_id:
            return False
        found = self.store.exists(f"chains/{chain_id}")
        if found:
            with self._lock:
                self._known.add(chain_id)
        return found

    def image(self, ref: str) -> ImageRecord:
        """The record for 'name:tag', 'name@sha256:…' or a manifest digest."""
        try:
            return find_image(self.store, ref)
        except ValueError as exc:  # a name no indexer could have written as a key
            raise CatalogError(f"invalid image reference {ref!r}: {exc}") from exc

    def oci_blob(self, digest: str) -> bytes:
        """Original OCI bytes (manifest, config, image index), verified against the digest."""
        return get_original(self.store, digest)
