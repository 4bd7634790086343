"""Blob stores: where cafs keeps blobs, indexes and pointers (file://, s3://) and the node cache."""

from blobstore.base import BlobStore, blob_key
from blobstore.errors import BlobCorrupt, BlobNotFound, StoreError, StoreUnavailable
from blobstore.url import default_store_url, open_store

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
