"""A small client for containerd's own gRPC services, as `cafs pull` needs them.

Every call names its namespace in the `containerd-namespace` metadata; calls made while a
lease is held also carry `containerd-lease`, which keeps what they create (content, snapshots)
from containerd's garbage collector until the image record and GC labels reference it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from snapshotter import CONTAINERD_ADDRESS
from snapshotter.api import containerd_content_pb2 as content_pb
from snapshotter.api import containerd_content_pb2_grpc as content_grpc
from snapshotter.api import containerd_images_pb2 as images_pb
from snapshotter.api import containerd_images_pb2_grpc as images_grpc
from snapshotter.api import containerd_leases_pb2 as leases_pb
from snapshotter.api import containerd_leases_pb2_grpc as leases_grpc
from snapshotter.api import containerd_snapshots_pb2 as snapshots_pb
from snapshotter.api import containerd_snapshots_pb2_grpc as snapshots_grpc
from snapshotter.api import containerd_types_pb2 as types_pb

DEFAULT_ADDRESS = CONTAINERD_ADDRESS
LEASE_EXPIRY = datetime.timedelta(hours=1)  # a crashed pull's lease must not pin content forever
CALL_TIMEOUT_S = 60.0
# containerd answers UNAVAILABLE until it has redialled a restarted snapshotter, and it redials
# with backoff capped at 3 s (+20% jitter) for proxy plugins: retried this long, then reported.
UNAVAILABLE_RETRY_S = 5.0
T = TypeVar("T")


class ContainerdError(Exception):
    """containerd refused or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    data: bytes


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.Call) else None


def _explain(exc: grpc.RpcError, doing: str, address: str) -> ContainerdError:
    code = _code(exc)
    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ContainerdError(
            f"{doing}: containerd at {address} is unavailable "
            f"(still after {UNAVAILABLE_RETRY_S:.0f} s): {detail}"
        )
    return ContainerdError(f"{doing}: {detail} ({code.name if code else 'error'})")


class Containerd:
    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = "default") -> None:
        if not os.path.exists(address):
            raise ContainerdError(f"no containerd socket at {address}")
        self.address = address
        self.namespace = namespace
        self.lease: str | None = None
        self._channel = grpc.insecure_channel(
            f"unix://{os.path.abspath(address)}",
            options=[("grpc.max_send_message_length", 16 << 20)],
        )
        self.content = content_grpc.ContentStub(self._channel)
        self.images = images_grpc.ImagesStub(self._channel)
        self.leases = leases_grpc.LeasesStub(self._channel)
        self.snapshots = snapshots_grpc.SnapshotsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    def _retrying(self, call: Callable[[], T]) -> T:
        """`call()`, again while containerd answers UNAVAILABLE, for UNAVAILABLE_RETRY_S at
        most; then (or on any other error) its grpc.RpcError. An UNAVAILABLE call did not
        happen, so every call here is safe to repeat."""
        deadline = time.monotonic() + UNAVAILABLE_RETRY_S
        delay = 0.1
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if _code(exc) != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                    raise
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    def _rpc(self, doing: str, call: Callable[..., Any], request: Any) -> Any:
        try:
            return self._retrying(
                lambda: call(request, metadata=self.metadata(), timeout=CALL_TIMEOUT_S)
            )
        except grpc.RpcError as exc:
            raise _explain(exc, doing, self.address) from exc

    @contextlib.contextmanager
    def leased(self) -> Iterator[str]:
        """Hold a lease for the block; it expires by itself if this process dies."""
        expire = datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY
        lease_id = f"cafs-pull-{secrets.token_hex(8)}"
        request = leases_pb.CreateRequest(
            id=lease_id, labels={"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
        self._rpc("creating a lease", self.leases.Create, request)
        self.lease = lease_id
        try:
            yield lease_id
        finally:
            self.lease = None
            with contextlib.suppress(ContainerdError):
                self._rpc(
                    "deleting the lease", self.leases.Delete, leases_pb.DeleteRequest(id=lease_id)
                )

    # -- content ----------------------------------------------------------------------------

    def write_blob(self, blob: Blob) -> None:
        """One COMMIT message carries the whole (small) blob; already present is fine."""
        request = content_pb.WriteContentRequest(
            action=content_pb.COMMIT,
            ref=f"cafs-pull-{blob.digest}",
            total=len(blob.data),
            expected=blob.digest,
            offset=0,
            data=blob.data,
        )
        try:
            self._retrying(
                lambda: list(
                    self.content.Write(
                        iter([request]), metadata=self.metadata(), timeout=CALL_TIMEOUT_S
                    )
                )
            )
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.ALREADY_EXISTS:
                return
            raise _explain(exc, f"writing {blob.digest}", self.address) from exc

    def label_blob(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set just these labels (a field path per label), leaving the blob's others alone."""
        if not labels:
            return
        request = content_pb.UpdateRequest(
            info=content_pb.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        self._rpc(f"labelling {digest}", self.content.Update, request)

    # -- images -----------------------------------------------------------------------------

    def put_image(self, name: str, target: Blob, labels: Mapping[str, str]) -> None:
        """Create the image record, or point an existing one at this target."""
        image = images_pb.Image(
            name=name,
            labels=dict(labels),
            target=types_pb.Descriptor(
                media_type=target.media_type, digest=target.digest, size=len(target.data)
            ),
        )
        try:
            self._retrying(
                lambda: self.images.Create(
                    images_pb.CreateImageRequest(image=image),
                    metadata=self.metadata(),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            return
        except grpc.RpcError as exc:
            if _code(exc) != grpc.StatusCode.ALREADY_EXISTS:
                raise _explain(exc, f"creating image {name}", self.address) from exc
        paths = ["target", *(f"labels.{k}" for k in labels)]
        request = images_pb.UpdateImageRequest(
            image=image, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        self._rpc(f"updating image {name}", self.images.Update, request)

    # -- snapshots --------------------------------------------------------------------------

    def stat_snapshot(self, snapshotter: str, key: str) -> snapshots_pb.Info | None:
        request = snapshots_pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            response = self._retrying(
                lambda: self.snapshots.Stat(
                    request, metadata=self.metadata(), timeout=CALL_TIMEOUT_S
                )
            )
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.NOT_FOUND:
                return None
            raise _explain(exc, f"stat of snapshot {key}", self.address) from exc
        info: snapshots_pb.Info = response.info
        return info

    def prepare_remote(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> bool:
        """Prepare as containerd's unpacker does; True if the snapshotter answered that the
        layer already exists (served remotely), False if it made an ordinary active snapshot
        (which is removed again: nothing would ever fill it)."""
        request = snapshots_pb.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        try:
            self._retrying(
                lambda: self.snapshots.Prepare(
                    request, metadata=self.metadata(), timeout=CALL_TIMEOUT_S
                )
            )
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.ALREADY_EXISTS:
                return True
            raise _explain(exc, f"preparing snapshot {key}", self.address) from exc
        remove = snapshots_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        with contextlib.suppress(ContainerdError):
            self._rpc(f"removing snapshot {key}", self.snapshots.Remove, remove)
        return False
