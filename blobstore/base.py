"""The one small interface every store implements, and the key layout shared by all of them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

BLOB_PREFIX = "blobs/"
INDEX_PREFIX = "indexes/"
REF_PREFIX = "refs/"
MANIFEST_PREFIX = "manifests/"
CHAIN_PREFIX = "chains/"
OCI_PREFIX = "oci/"
PROFILE_PREFIX = "profiles/"
EROFS_PREFIX = "erofs/"
LEASE_PREFIX = "leases/"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch: what garbage collection's grace period reads


class BlobStore(Protocol):
    """Keys are '/'-separated relative paths without '..'; values are immutable once put.

    Implementations must make `put` atomic (a reader sees the whole value or nothing) and
    raise BlobNotFound for a missing key, StoreUnavailable for a temporary failure.
    """

    url: str

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The whole object. With `limit`, an object larger than that raises ObjectTooLarge
        before its bytes are read: what the store holds cannot choose how much a reader
        allocates."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


def blob_key(digest: str) -> str:
    """Blobs are spread over 256 prefixes by their hash (S3 partitions by key prefix)."""
    return f"{BLOB_PREFIX}{digest[:2]}/{digest}"


def index_key(digest: str) -> str:
    return f"{INDEX_PREFIX}{digest}"


def oci_key(digest: str) -> str:
    """Original manifest/config bytes, by their OCI digest ('sha256:hex')."""
    algo, _, hexpart = digest.partition(":")
    return f"{OCI_PREFIX}{algo}/{hexpart}"


def check_key(key: str) -> str:
    """Refuse keys that could escape a directory store or collide with temp files."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid store key: {key!r}")
    if any(p.startswith(".tmp") for p in parts) or "\0" in key:
        raise ValueError(f"invalid store key: {key!r}")
    return key
