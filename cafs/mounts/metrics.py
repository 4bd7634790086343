"""Prometheus metrics for every cafs mount on the node.

Each scrape asks every mount daemon's control socket for its figures, so the endpoint needs
no state of its own and sees mounts started by anyone (the snapshotter, `cafs mount`,
`cafs run`). A daemon that does not answer is counted, not fatal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cafs import paths
from cafs.mounts import mount

log = logging.getLogger(__name__)

COUNTERS = {
    "demand_bytes": "Bytes fetched from the store because a read needed them",
    "prefetch_bytes": "Bytes fetched ahead of reads (profiles, weights, readahead)",
    "demand_blobs": "Blobs fetched on demand",
    "prefetch_blobs": "Blobs prefetched",
    "cache_hits": "Blob lookups answered by the node cache",
    "cache_misses": "Blob lookups that went to the store",
    "store_errors": "Failed store requests",
    "corrupt_blobs": "Blobs that failed verification (store or cache)",
    "eio": "Reads answered with EIO",
    "reads": "FUSE reads served",
    "read_bytes": "Bytes returned by FUSE reads",
    "opens": "FUSE open and opendir requests",
    "listings": "FUSE readdir requests (the kernel answers repeats from its cache)",
    "spliced_reads": "FUSE reads libfuse answered from a cache file (no copy in Python)",
    "background_errors": "Background tasks (readahead, prefetch) that failed; the mount goes on",
    "fd_pressure": "Cache file opens that hit the fd limit, retried after closing idle fds",
    "store_gets": "GET requests to the store (blobs, pack ranges)",
    "store_bytes": "Bytes those GETs returned, as stored (compressed)",
    "neighbour_gets": "Neighbour pack segments fetched on a miss, with their siblings",
    "neighbour_bytes": "Bytes of neighbour pack segments fetched",
    "library_blobs": "Blobs of libraries brought in ahead with a program's first read",
    "import_files": "Files of imported modules brought in ahead with a module's first read",
}
GAUGES = {
    "fetched_percent": "Share of the image's bytes fetched so far",
    "cache_hit_ratio": "Cache hits over lookups",
    "read_latency_p50_ms": "Median FUSE read latency (recent reads)",
    "read_latency_p99_ms": "99th percentile FUSE read latency (recent reads)",
    "stuck_reads": "Reads in flight for longer than 10 s",
    "reads_in_flight": "Reads in flight",
    "image_bytes": "Size of the mounted image's files",
}


def _mounts() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    root = paths.run_dir() / "mounts"
    if not root.is_dir():
        return
    for state in sorted(root.iterdir()):
        try:
            info = json.loads((state / "info.json").read_text())
            stats = mount.query(Path(info["mountpoint"]), "stats", timeout=2.0)
        except (OSError, ValueError, KeyError, mount.MountError) as exc:
            log.debug("mount state %s unreadable: %s", state, exc)
            continue
        yield info, stats


class MountCollector(Collector):
    def collect(self) -> Iterator[Any]:
        labels = ["mountpoint", "source"]
        counters = {k: CounterMetricFamily(f"cafs_mount_{k}", h, labels=labels)
                    for k, h in COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(f"cafs_mount_{k}", h, labels=labels)
                  for k, h in GAUGES.items()}
        mounts = GaugeMetricFamily("cafs_mounts", "cafs mounts answering on this node")
        count = 0
        for info, stats in _mounts():
            count += 1
            values = [str(info.get("mountpoint", "")), str(info.get("source", ""))]
            for key, fam in counters.items():
                fam.add_metric(values, float(stats.get(key, 0)))
            for key, gfam in gauges.items():
                gfam.add_metric(values, float(stats.get(key, 0)))
        mounts.add_metric([], count)
        yield mounts
        yield from counters.values()
        yield from gauges.values()


_registered = False


def serve_metrics(address: str) -> None:
    """Start the HTTP endpoint (a daemon thread) on HOST:PORT."""
    global _registered
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")
    if not _registered:
        REGISTRY.register(MountCollector())
        _registered = True
    start_http_server(int(port), addr=host or "0.0.0.0")
