"""Leases: mutual exclusion between `cafs index` and `cafs gc` through the store itself.

An indexer may reuse a blob that is, at that moment, referenced by nothing (it was left by
an earlier run or an image since removed); a concurrent sweep would delete it under the
indexer. So each side writes a lease object, then looks for the other side's live leases,
and backs off if it finds one. Leases older than their TTL belong to crashed processes and
are ignored. Both sides writing before looking means at least one of them sees the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from blobstore import BlobNotFound, BlobStore
from blobstore.base import LEASE_PREFIX

LEASE_TTL = 6 * 3600.0


class LeaseConflict(RuntimeError):
    """The other side (an indexer or a collector) is running."""


@dataclass(frozen=True)
class Lease:
    key: str
    kind: str  # "index" or "gc"
    created: float
    holder: str


def live_leases(store: BlobStore, kind: str, ttl: float = LEASE_TTL) -> list[Lease]:
    out = []
    now = time.time()
    for key in store.list(f"{LEASE_PREFIX}{kind}-"):
        try:
            obj = json.loads(store.get(key))
        except (BlobNotFound, ValueError):
            continue
        if now - float(obj.get("created", 0)) < ttl:
            out.append(Lease(key, kind, float(obj["created"]), str(obj.get("holder", "?"))))
    return out


@contextlib.contextmanager
def hold(store: BlobStore, kind: str, against: str) -> Iterator[Lease]:
    """Hold a `kind` lease for the duration; refuse if an `against` lease is live."""
    key = f"{LEASE_PREFIX}{kind}-{secrets.token_hex(8)}"
    lease = Lease(key, kind, time.time(), f"{socket.gethostname()}:{os.getpid()}")
    store.put(key, json.dumps({"created": lease.created, "holder": lease.holder}).encode())
    try:
        others = live_leases(store, against)
        if others:
            first = min(others, key=lambda o: o.created)
            raise LeaseConflict(
                f"a `cafs {against}` holds the store {store.url} (since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first.created))}, "
                f"{first.holder}); try again when it has finished")
        yield lease
    finally:
        with contextlib.suppress(Exception):
            store.delete(key)
