"""Prometheus figures of the snapshotter itself, served beside every mount's (cafs.mounts.metrics).

containerd's calls are counted by a gRPC server interceptor as they complete (by method and
status code, with latency); FUSE mounts made, failed and remounted are reported by the
Snapshotter through its MountEvents hooks; snapshots by kind and the remote mounts still
served are read from the metastore and the mount table at scrape time, so they are never
stale and cost nothing between scrapes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snapshotter.snapshotter import Snapshotter

log = logging.getLogger(__name__)

PREFIX = "cafs_snapshotter"
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
MOUNT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REMOUNT_REASONS = ("watchdog", "restart")


class SnapshotterMetrics(Collector):
    """The snapshotter's counters (it reports into them) and its scrape-time gauges."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter
        self.requests = Counter(f"{PREFIX}_grpc_requests", "Snapshots API calls answered",
                                ["method", "code"], registry=None)
        self.latency = Histogram(f"{PREFIX}_grpc_request_seconds", "Snapshots API call time",
                                 ["method"], buckets=RPC_BUCKETS, registry=None)
        self.mount_seconds = Histogram(f"{PREFIX}_fuse_mount_seconds",
                                       "Time to mount a remote snapshot's FUSE daemon",
                                       buckets=MOUNT_BUCKETS, registry=None)
        self.mount_failures = Counter(f"{PREFIX}_fuse_mount_failures",
                                      "Remote snapshots that could not be mounted",
                                      registry=None)
        self.remounts = Counter(f"{PREFIX}_fuse_remounts",
                                "Dead FUSE daemons' mounts replaced, by who noticed",
                                ["reason"], registry=None)
        for reason in REMOUNT_REASONS:  # present at 0, so an alert can watch the rate
            self.remounts.labels(reason)
        snapshotter.events = self

    # -- MountEvents ------------------------------------------------------------------------

    def mounted(self, seconds: float) -> None:
        self.mount_seconds.observe(seconds)

    def mount_failed(self) -> None:
        self.mount_failures.inc()

    def remounted(self, reason: str) -> None:
        self.remounts.labels(reason).inc()

    # -- gRPC -------------------------------------------------------------------------------

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def interceptor(self) -> grpc.ServerInterceptor:
        return _Interceptor(self)

    # -- Collector --------------------------------------------------------------------------

    def _owned(self) -> tuple[Counter | Histogram, ...]:
        return (self.requests, self.latency, self.mount_seconds, self.mount_failures,
                self.remounts)

    def describe(self) -> Iterator[Metric]:
        """Names only: registering must not touch the database."""
        for metric in self._owned():
            yield from metric.describe()
        yield from _state_families()

    def collect(self) -> Iterator[Metric]:
        for metric in self._owned():
            yield from metric.collect()
        try:
            census, live = self.sn.census(), self.sn.live_remote_mounts()
        except (sqlite3.Error, OSError) as exc:  # closing down: skip, never fail the scrape
            log.debug("snapshotter state unreadable for metrics: %s", exc)
            return
        snapshots, mounts = _state_families()
        for (kind, remote), count in sorted(census.items()):
            snapshots.add_metric([kind.name.lower(), str(remote).lower()], count)
        mounts.add_metric([], live)
        yield from (snapshots, mounts)


def _state_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    return (GaugeMetricFamily(f"{PREFIX}_snapshots", "Snapshots in the metastore",
                              labels=["kind", "remote"]),
            GaugeMetricFamily(f"{PREFIX}_remote_mounts_live",
                              "Remote snapshots whose FUSE daemon is serving"))


def _code(context: grpc.ServicerContext, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


class _Interceptor(grpc.ServerInterceptor):
    """Times every call of a known method and counts it with the status it ended with."""

    def __init__(self, metrics: SnapshotterMetrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(method, handler.unary_stream))
        return handler

    def _unary(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start, code = time.perf_counter(), "UNKNOWN"
            try:
                response = behavior(request, context)
                code = _code(context, "OK")
                return response
            except Exception:
                code = _code(context, "UNKNOWN")  # abort() set it before raising
                raise
            finally:
                self.metrics.rpc_done(method, code, time.perf_counter() - start)

        return call

    def _stream(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, code = time.perf_counter(), "UNKNOWN"
            try:
                yield from behavior(request, context)
                code = _code(context, "OK")
            except GeneratorExit:
                code = "CANCELLED"  # the client went away mid-stream
                raise
            except Exception:
                code = _code(context, "UNKNOWN")
                raise
            finally:
                self.metrics.rpc_done(method, code, time.perf_counter() - start)

        return call


def serve(address: str, metrics: SnapshotterMetrics,
          registry: CollectorRegistry = REGISTRY) -> None:
    """The endpoint of cafs.mounts.metrics (every mount's figures) with the snapshotter's added."""
    from cafs.mounts.metrics import serve_metrics

    registry.register(metrics)
    try:
        serve_metrics(address)
    except BaseException:
        registry.unregister(metrics)
        raise
