"""Choose a store by URL: file:///path (or a bare path) and s3://bucket/prefix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from blobstore.errors import StoreError

if TYPE_CHECKING:
    from blobstore.base import BlobStore


def default_store_url() -> str:
    """CAFS_STORE, else /var/lib/cafs/store as root, else ~/.local/share/cafs/store."""
    env = os.environ.get("CAFS_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "file:///var/lib/cafs/store"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return f"file://{data}/cafs/store"


def open_store(url: str | None = None, *, retries: bool = True) -> BlobStore:
    """The store at `url`. `retries=False`: each request is tried once (an S3 store's client
    does not retry), for a caller that retries by its own budget; a local store has none."""
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else url
        if parsed.netloc and parsed.netloc != "localhost":
            raise StoreError(f"file store URL must be file:///absolute/path, got {url!r}")
        if not path:
            raise StoreError(f"file store URL has no path: {url!r}")
        from blobstore.local import LocalStore  # not on the path of config.load (every CLI run)

        return LocalStore(os.path.abspath(path))
    if parsed.scheme == "s3":
        from blobstore.s3 import S3Store  # boto3 costs 0.2 s to import: only when needed

        return S3Store(parsed.netloc, parsed.path, retries=retries)
    raise StoreError(f"unsupported store URL {url!r}: use file:///PATH or s3://BUCKET/PREFIX")
