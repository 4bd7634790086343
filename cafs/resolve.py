"""What a mount serves: a ref, a manifest digest, a layer chain or an index, to an Index.

Indexes are kept in the node cache directory after the first load, verified by their key on
every load, so remounting an image costs no store round trip.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from blobstore import BlobStore, privatedir
from blobstore.cache import touch
from blobstore.envelope import digest
from indexer.catalog import CatalogError, chain_index, find_image, load_index
from indexer.format import Index


def index_key_for(store: BlobStore, source: str) -> str:
    if source.startswith("index:"):
        return source[len("index:") :]
    if source.startswith("chain:"):
        key = chain_index(store, source[len("chain:") :])
        if key is None:
            raise CatalogError(f"no index serves layer chain {source[6:]} in {store.url}")
        return key
    return find_image(store, source).index


def load_mount_index(store: BlobStore, source: str, cache_dir: Path) -> tuple[Index, str]:
    key = index_key_for(store, source)
    return load_index_cached(store, key, cache_dir), key


def load_index_cached(store: BlobStore, key: str, cache_dir: Path) -> Index:
    local = cache_dir / "indexes" / key
    try:
        data = local.read_bytes()
        if digest(data) == key:
            touch(local)  # in use: last in line for eviction
            return Index(data)
    except FileNotFoundError:
        pass
    index = load_index(store, key)
    privatedir.ensure(cache_dir)  # which blob is which file is nobody else's business
    with contextlib.suppress(OSError):
        local.parent.mkdir(mode=privatedir.DIR_MODE, exist_ok=True)
        privatedir.write_file(local, index.to_bytes())
    return index
