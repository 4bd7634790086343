"""Named snapshot failures, each bound to the gRPC code containerd maps back to its errdefs.

containerd turns any other code into "unknown", which callers cannot act on, so the core
raises exactly these and the gRPC layer only translates.
"""

from __future__ import annotations

import grpc


class SnapshotError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class NotFound(SnapshotError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    """Also the answer that tells containerd a remote snapshot is ready (see handshake)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidArgument(SnapshotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(SnapshotError):
    """Temporary: e.g. the remote filesystem under a snapshot could not be mounted now."""

    code = grpc.StatusCode.UNAVAILABLE


class MountBusy(Exception):
    """A mount is still in use (EBUSY), so it must be left alone."""
