"""The snapshotter's own Prometheus figures: gRPC calls by method and code, FUSE mounts made,
failed and remounted, snapshots by kind and live remote mounts.

First over gRPC in-process with the fake mounter (every code path, no root), then a real
`cafs snapshotter --metrics-address` whose FUSE daemon is killed under a container snapshot
until the watchdog remounts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from conftest import free_port
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_snapshotter_grpc import CHAIN_A, CHAIN_B, Env, FakeMounter

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source
from snapshotter import remote
from snapshotter.api import containerd_snapshots_pb2 as pb
from snapshotter.api import containerd_snapshots_pb2_grpc as pb_grpc
from snapshotter.metrics import SnapshotterMetrics
from snapshotter.service import Server
from snapshotter.snapshotter import REF_LABEL, Snapshotter

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[Env, CollectorRegistry]]:
    """A snapshotter over gRPC with its metrics in a registry of the test's own."""
    mounter = FakeMounter()
    sn = Snapshotter(tmp_path / "root", mounter)
    metrics = SnapshotterMetrics(sn)
    registry = CollectorRegistry()
    registry.register(metrics)
    sock = tmp_path / "s.sock"
    server = Server(sn, sock, workers=4, interceptors=[metrics.interceptor()])
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    yield Env(pb_grpc.SnapshotsStub(channel), sn, mounter, tmp_path / "root", sock), registry
    channel.close()
    server.stop(grace=0)


def test_calls_mounts_and_state_are_counted(counted: tuple[Env, CollectorRegistry]) -> None:
    env, registry = counted
    env.handshake(CHAIN_A)
    env.prepare("c", CHAIN_A)  # mounts A
    with pytest.raises(grpc.RpcError):
        env.stat("missing")
    assert [i.name for i in env.list()] == [CHAIN_A, "c"]
    env.mounter.die(env.fs(CHAIN_A))
    assert env.sn.heal() == 1
    env.handshake(CHAIN_B)
    env.mounter.fail = True
    with pytest.raises(grpc.RpcError):
        env.prepare("c2", CHAIN_B)
    m = parse(generate_latest(registry).decode())
    calls = "cafs_snapshotter_grpc_requests_total"
    assert value(m, calls, method="Prepare", code="ALREADY_EXISTS") == 2
    assert value(m, calls, method="Prepare", code="OK") == 1
    assert value(m, calls, method="Prepare", code="UNAVAILABLE") == 1
    assert value(m, calls, method="Stat", code="NOT_FOUND") == 1
    assert value(m, calls, method="List", code="OK") == 1
    assert value(m, "cafs_snapshotter_grpc_request_seconds_count", method="Prepare") == 4
    assert value(m, "cafs_snapshotter_fuse_mount_seconds_count") == 2  # first, then remount
    assert value(m, "cafs_snapshotter_fuse_mount_failures_total") == 1
    assert value(m, "cafs_snapshotter_fuse_remounts_total", reason="watchdog") == 1
    assert ("cafs_snapshotter_fuse_remounts_total",
            frozenset({("reason", "restart")})) in m  # at 0, but there
    assert value(m, "cafs_snapshotter_snapshots", kind="committed", remote="true") == 2
    assert value(m, "cafs_snapshotter_snapshots", kind="active", remote="false") == 1
    assert value(m, "cafs_snapshotter_remote_mounts_live") == 1  # A; B never mounted


# -- a real snapshotter and FUSE daemon (root) ---------------------------------------------------


def _scrape(port: int) -> Samples:
    return parse(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not seen after {timeout}s"
        time.sleep(0.2)


@pytest.mark.root
@pytest.mark.slow
def test_a_real_snapshotter_reports_a_killed_daemon_and_its_remount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = build_layout(tmp_path / "l", "t", [[Entry("hello", data=b"hi\n")]])
    store = f"file://{tmp_path / 'store'}"
    index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(store), IndexOptions())
    chain = info.chain_ids[0]
    monkeypatch.setenv("CAFS_RUN_DIR", str(tmp_path / "run"))  # ours and the daemons'
    monkeypatch.setenv("CAFS_CACHE_DIR", str(tmp_path / "cache"))
    port, sock, root = free_port(), tmp_path / "sn.sock", tmp_path / "root"
    cmd = [sys.executable, "-m", "cafs", "snapshotter", "--root", str(root), "--address",
           str(sock), "--store", store, "--metrics-address", f"127.0.0.1:{port}"]
    log = open(tmp_path / "sn.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        _wait(lambda: sock.exists() and proc.poll() is None, 30, "snapshotter socket")
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            with pytest.raises(grpc.RpcError):  # the remote handshake: ALREADY_EXISTS
                stub.Prepare(pb.PrepareSnapshotRequest(key="extract", labels={REF_LABEL: chain}))
            (overlay,) = stub.Prepare(pb.PrepareSnapshotRequest(key="c1", parent=chain)).mounts
        fs = Path(next(o for o in overlay.options if o.startswith("lowerdir="))[9:])
        assert (fs / "hello").read_bytes() == b"hi\n"
        _wait(lambda: value(_scrape(port), "cafs_snapshotter_remote_mounts_live") == 1, 10,
              "a live remote mount")
        before = _scrape(port)
        assert value(before, "cafs_snapshotter_grpc_requests_total", method="Prepare",
                     code="ALREADY_EXISTS") == 1
        assert value(before, "cafs_snapshotter_grpc_requests_total", method="Prepare",
                     code="OK") == 1
        assert value(before, "cafs_snapshotter_fuse_mount_seconds_count") == 1
        assert value(before, "cafs_snapshotter_snapshots", kind="active", remote="false") == 1
        assert value(before, "cafs_mounts") == 1  # the per-mount figures are still served
        pid = mount.daemon_pid(fs)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: value(_scrape(port), "cafs_snapshotter_fuse_remounts_total",
                            reason="watchdog") == 1, 30, "a watchdog remount")
        after = _scrape(port)
        assert value(after, "cafs_snapshotter_fuse_mount_seconds_count") == 2
        assert value(after, "cafs_snapshotter_remote_mounts_live") == 1
        assert value(after, "cafs_snapshotter_fuse_mount_failures_total") == 0
        assert mount.daemon_pid(fs) not in (None, pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        proc.kill()
        log.close()
        for mnt in sorted(remote.mounts_under(tmp_path), key=lambda p: len(p.parts),
                          reverse=True):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
