"""Blob stores: where cafs keeps blobs, indexes and pointers (file://, s3://) and the node cache.

The names below are loaded on first use, not with the package: a process that needs only
a submodule (`cafs pull` and every local socket client need `blobstore.privatedir`) must not
pay for the stores' imports on its start-up path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blobstore.base import BlobStore, blob_key
    from blobstore.errors import BlobCorrupt, BlobNotFound, StoreError, StoreUnavailable
    from blobstore.url import default_store_url, open_store

_HOME = {
    "BlobStore": "blobstore.base",
    "blob_key": "blobstore.base",
    "BlobCorrupt": "blobstore.errors",
    "BlobNotFound": "blobstore.errors",
    "StoreError": "blobstore.errors",
    "StoreUnavailable": "blobstore.errors",
    "default_store_url": "blobstore.url",
    "open_store": "blobstore.url",
}

__all__ = [
    "BlobCorrupt",
    "BlobNotFound",
    "BlobStore",
    "StoreError",
    "StoreUnavailable",
    "blob_key",
    "default_store_url",
    "open_store",
]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'blobstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
