"""The gRPC face of the snapshotter: containerd.services.snapshots.v1.Snapshots on a unix socket.

Each RPC is a thin translation of snapshotter.Snapshotter; named errors become the status
codes containerd maps back to its errdefs. The `snapshotter` field every request carries is
ignored (containerd sets it to the proxy plugin's name).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from snapshotter.api import containerd_snapshots_pb2 as pb
from snapshotter.api import containerd_snapshots_pb2_grpc as pb_grpc
from snapshotter.api import containerd_types_pb2 as types_pb
from snapshotter.errors import SnapshotError
from snapshotter.layout import Mount
from snapshotter.metastore import Snapshot
from snapshotter.snapshotter import Snapshotter

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 << 20  # containerd dials proxy plugins with 16 MiB message limits
LIST_BATCH = 100
SOCKET_MODE = 0o660
T = TypeVar("T")


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_message(snap: Snapshot) -> pb.Info:
    return pb.Info(
        name=snap.key,
        parent=snap.parent,
        kind=pb.Kind.Name(int(snap.kind)),
        created_at=_timestamp(snap.created_ns),
        updated_at=_timestamp(snap.updated_ns),
        labels=snap.labels,
    )


def mount_messages(mounts: list[Mount]) -> list[types_pb.Mount]:
    return [types_pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    def _call(self, context: grpc.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SnapshotError as exc:
            log.debug("%s: %s: %s", rpc, exc.code.name, exc)
            context.abort(exc.code, str(exc))
        except Exception as exc:
            log.exception("%s failed", rpc)
            context.abort(grpc.StatusCode.UNKNOWN, f"{rpc}: {exc}")
        raise AssertionError("unreachable: abort raises")

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._call(
            context,
            "Prepare",
            lambda: self.sn.prepare(request.key, request.parent, dict(request.labels)),
        )
        return pb.PrepareSnapshotResponse(mounts=mount_messages(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._call(
            context, "View", lambda: self.sn.view(request.key, request.parent, dict(request.labels))
        )
        return pb.ViewSnapshotResponse(mounts=mount_messages(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> pb.MountsResponse:
        mounts = self._call(context, "Mounts", lambda: self.sn.mounts(request.key))
        return pb.MountsResponse(mounts=mount_messages(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(
            context,
            "Commit",
            lambda: self.sn.commit(request.name, request.key, dict(request.labels)),
        )
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._call(context, "Remove", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        snap = self._call(context, "Stat", lambda: self.sn.stat(request.key))
        return pb.StatSnapshotResponse(info=info_message(snap))

    def Update(self, request: Any, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        snap = self._call(
            context,
            "Update",
            lambda: self.sn.update(request.info.name, dict(request.info.labels), paths),
        )
        return pb.UpdateSnapshotResponse(info=info_message(snap))

    def List(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        snaps = self._call(context, "List", lambda: self.sn.walk(list(request.filters)))
        for start in range(0, len(snaps), LIST_BATCH):
            batch = snaps[start : start + LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[info_message(s) for s in batch])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> pb.UsageResponse:
        size, inodes = self._call(context, "Usage", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> empty_pb2.Empty:
        removed = self._call(context, "Cleanup", self.sn.cleanup)
        if removed:
            log.info("cleanup removed %d orphaned snapshot directories", len(removed))
        return empty_pb2.Empty()


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


def prepare_socket(path: Path) -> None:
    """Create the parent dir and remove a stale socket left by a crash, but refuse to steal
    the socket of a snapshotter that is still answering on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket")
    if _socket_in_use(path):
        raise RuntimeError(f"another process is already serving on {path}")
    path.unlink()


class Server:
    """A started gRPC server; `stop()` drains in-flight calls and closes the database.

    FUSE daemons are never touched here: they belong to running containers.
    """

    def __init__(self, snapshotter: Snapshotter, address: Path, workers: int = 16,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 handlers: Sequence[grpc.GenericRpcHandler] = ()) -> None:
        self.snapshotter = snapshotter
        self.address = Path(os.path.abspath(address))
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"),
            interceptors=list(interceptors),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), self._grpc)
        self._grpc.add_generic_rpc_handlers(tuple(handlers))
        self._stopped = threading.Event()

    def start(self) -> None:
        prepare_socket(self.address)
        old = os.umask(0o117)  # the socket is born 0660: no window with wider permissions
        try:
            if self._grpc.add_insecure_port(f"unix://{self.address}") == 0:
                raise RuntimeError(f"cannot listen on {self.address}")
            self._grpc.start()
        finally:
            os.umask(old)
        os.chmod(self.address, SOCKET_MODE)
        log.info("serving containerd snapshots on %s", self.address)

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._grpc.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            self.address.unlink()
        self.snapshotter.close()
        log.info("snapshotter stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
