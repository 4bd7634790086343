"""Leases: mutual exclusion between `cafs index` and `cafs gc` through the store itself.

An indexer may reuse a blob that is, at that moment, referenced by nothing (it was left by
an earlier run or an image since removed); a concurrent sweep would delete it under the
indexer. So each side writes a lease object, then looks for the other side's live leases,
and backs off if it finds one. Both sides writing before looking means at least one of them
sees the other.

A lease is live while it was renewed within its TTL. The holder renews it from a thread every
quarter TTL for as long as it runs, so an index of a very large image stays protected for
hours, while the lease of a crashed process stops counting minutes after the crash. A holder
can also tell whether its own lease ever lapsed (a store that refused renewals for a TTL, a
process stopped for that long): the indexer then cannot rely on the lease, and proves its
objects still exist before it publishes (indexer/build.py does that in every case; see there).

The wall clock is `now`, a module attribute, so tests can move time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from blobstore import BlobNotFound, BlobStore
from blobstore.base import LEASE_PREFIX

log = logging.getLogger(__name__)
LEASE_TTL = 600.0  # seconds without a renewal after which a lease is a crashed holder's
RENEW_FRACTION = 0.25  # renew every quarter TTL: three renewals may fail before it lapses
MAX_LEASE_BYTES = 4096
now = time.time  # the wall clock leases are stamped with (tests replace it)


class LeaseConflict(RuntimeError):
    """The other side (an indexer or a collector) is running."""


@dataclass(frozen=True)
class Lease:
    key: str
    kind: str  # "index" or "gc"
    created: float
    holder: str
    renewed: float  # the holder's last renewal; the lease is live for a TTL after it


def decode_lease(key: str, kind: str, data: bytes) -> Lease:
    """A stored lease; ValueError for anything else (a lease is store data: untrusted)."""
    if len(data) > MAX_LEASE_BYTES:
        raise ValueError(f"lease {key}: {len(data)} bytes")
    try:
        obj = json.loads(data)
    except RecursionError:  # 4 KiB of '[' nest past the parser's stack
        raise ValueError(f"lease {key}: nested too deep") from None
    if not isinstance(obj, dict):
        raise ValueError(f"lease {key}: not an object")
    created, renewed = obj.get("created"), obj.get("renewed", obj.get("created"))
    for value in (created, renewed):
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ValueError(f"lease {key}: bad time {value!r}")
    return Lease(key, kind, float(created), str(obj.get("holder", "?"))[:200],  # type: ignore[arg-type]
                 float(renewed))  # type: ignore[arg-type]


def live_leases(store: BlobStore, kind: str, ttl: float = LEASE_TTL) -> list[Lease]:
    """Leases of `kind` renewed within `ttl`. An unreadable lease counts as none (logged)."""
    out = []
    t = now()
    for key in store.list(f"{LEASE_PREFIX}{kind}-"):
        try:  # read no further than a lease can be (+1 to tell it is longer)
            lease = decode_lease(key, kind, store.get_range(key, 0, MAX_LEASE_BYTES + 1))
            if lease.renewed > t + ttl:  # would count as live for ever
                raise ValueError(f"lease {key}: renewed in the future")
        except BlobNotFound:
            continue
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
            log.warning("ignoring an unreadable lease: %s", exc)
            continue
        if t - lease.renewed < ttl:
            out.append(lease)
    return out


class HeldLease:
    """A lease this process holds, renewed from a daemon thread until released."""

    def __init__(self, store: BlobStore, kind: str, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        t = now()
        self.lease = Lease(f"{LEASE_PREFIX}{kind}-{secrets.token_hex(8)}", kind, t,
                           f"{socket.gethostname()}:{os.getpid()}", t)
        self._last_renewal = t
        self._lapsed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease-{kind}")

    def _write(self, renewed: float) -> None:
        lease = self.lease
        self.store.put(lease.key, json.dumps({"created": lease.created, "holder": lease.holder,
                                              "renewed": renewed}).encode())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl * RENEW_FRACTION):
            self.renew()

    def renew(self) -> None:
        """Stamp the lease with the time now; a failure is logged, and a gap of a TTL or more
        since the last success marks the lease lapsed for good."""
        t = now()
        try:
            self._write(t)
        except Exception as exc:  # any store failure: the next renewal may succeed
            log.warning("could not renew lease %s: %s", self.lease.key, exc)
            t = self._last_renewal
        if now() - self._last_renewal >= self.ttl:
            self._lapsed = True
        self._last_renewal = t

    def lapsed(self) -> bool:
        """Whether the lease went unrenewed for a TTL at some point (others may have acted)."""
        return self._lapsed or now() - self._last_renewal >= self.ttl

    def start(self) -> None:
        self._write(self.lease.created)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self.store.delete(self.lease.key)


@contextlib.contextmanager
def hold(store: BlobStore, kind: str, against: str,
         ttl: float = LEASE_TTL) -> Iterator[HeldLease]:
    """Hold a `kind` lease, renewed, for the duration; refuse if an `against` lease is live."""
    held = HeldLease(store, kind, ttl)
    held.start()
    try:
        others = live_leases(store, against, ttl)
        if others:
            first = min(others, key=lambda o: o.created)
            raise LeaseConflict(
                f"a `cafs {against}` holds the store {store.url} (since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first.created))}, "
                f"{first.holder}); try again when it has finished")
        yield held
    finally:
        held.release()
