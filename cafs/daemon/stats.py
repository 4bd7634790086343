"""Per-mount figures for `cafs stats` and the metrics endpoint.

Latencies go into a bounded ring so percentiles cost nothing on the read path; reads in
flight are tracked by start time so a read stuck behind a dead store shows up while stuck.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

STUCK_AFTER = 10.0  # seconds


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[k]


@dataclass
class MountStats:
    image_bytes: int = 0
    reads: int = 0
    read_bytes: int = 0
    demand_blobs: int = 0
    demand_bytes: int = 0
    prefetch_blobs: int = 0
    prefetch_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    store_errors: int = 0
    cache_errors: int = 0
    corrupt_blobs: int = 0
    eio: int = 0
    opens: int = 0  # open and opendir requests (none after the first, with patched pyfuse3)
    listings: int = 0  # readdir requests (the kernel caches listings, with patched pyfuse3)
    spliced_reads: int = 0  # reads libfuse answered from a cache file (fd, offset, length)
    background_errors: int = 0  # background tasks (readahead, prefetch) that failed
    fd_pressure: int = 0  # opens that hit the fd limit and were retried after closing some
    store_gets: int = 0  # GETs of blobs and ranged GETs of pack segments
    store_bytes: int = 0  # what they returned, as stored (compressed envelopes)
    neighbour_gets: int = 0  # neighbour pack segments fetched (cafs/daemon/neighbours.py)
    neighbour_bytes: int = 0  # their bytes, as stored
    library_blobs: int = 0  # blobs asked for ahead with a program's first read (libraries.py)
    import_files: int = 0  # files asked for ahead with a module's first read (imports.py)
    started: float = field(default_factory=time.time)
    _latency: deque[float] = field(default_factory=lambda: deque(maxlen=8192))
    _inflight: dict[int, float] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def read_started(self) -> int:
        token = next(self._ids)
        self._inflight[token] = time.monotonic()
        return token

    def read_done(self, token: int, nbytes: int) -> None:
        started = self._inflight.pop(token, None)
        if started is not None:
            self._latency.append(time.monotonic() - started)
        self.reads += 1
        self.read_bytes += nbytes

    def fetched(self, nbytes: int, prefetch: bool) -> None:
        if prefetch:
            self.prefetch_blobs += 1
            self.prefetch_bytes += nbytes
        else:
            self.demand_blobs += 1
            self.demand_bytes += nbytes

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self._latency)
        now = time.monotonic()
        fetched = self.demand_bytes + self.prefetch_bytes
        lookups = self.cache_hits + self.cache_misses
        return {
            "image_bytes": self.image_bytes,
            "reads": self.reads,
            "read_bytes": self.read_bytes,
            "demand_blobs": self.demand_blobs,
            "demand_bytes": self.demand_bytes,
            "prefetch_blobs": self.prefetch_blobs,
            "prefetch_bytes": self.prefetch_bytes,
            "fetched_percent": 100.0 * fetched / self.image_bytes if self.image_bytes else 0.0,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_hit_ratio": self.cache_hits / lookups if lookups else 1.0,
            "store_errors": self.store_errors,
            "cache_errors": self.cache_errors,
            "corrupt_blobs": self.corrupt_blobs,
            "eio": self.eio,
            "opens": self.opens,
            "listings": self.listings,
            "spliced_reads": self.spliced_reads,
            "background_errors": self.background_errors,
            "fd_pressure": self.fd_pressure,
            "store_gets": self.store_gets,
            "store_bytes": self.store_bytes,
            "neighbour_gets": self.neighbour_gets,
            "neighbour_bytes": self.neighbour_bytes,
            "library_blobs": self.library_blobs,
            "import_files": self.import_files,
            "read_latency_p50_ms": 1000 * _percentile(lat, 0.5),
            "read_latency_p99_ms": 1000 * _percentile(lat, 0.99),
            "reads_in_flight": len(self._inflight),
            "stuck_reads": sum(1 for t in self._inflight.values() if now - t > STUCK_AFTER),
            "uptime_s": round(time.time() - self.started, 1),
        }
