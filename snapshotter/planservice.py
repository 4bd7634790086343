"""`cafs pull`'s store lookups, answered by the running snapshotter.

Measured in the cold-start benchmark: `cafs pull` took 1.55 s of a 2.76 s cold start, and
most of it was not containerd: a fresh interpreter importing boto3 and building an S3
client (~0.4 s on a cold page cache) to read a handful of small objects. The snapshotter
has that client warm, and it is the store that matters anyway (it is the one that serves the
layers), so the client asks it for the pull plan on the snapshotter's own socket, as one
extra gRPC method beside containerd's snapshots API: `cafs.v1.Pull/Plan`, defined in
snapshotter/proto/cafs_pull.proto with generated stubs like containerd's own services.
A snapshotter that does not answer (older, elsewhere) leaves the client to plan itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from blobstore import StoreError
from snapshotter.api import cafs_pull_pb2 as pb
from snapshotter.api import cafs_pull_pb2_grpc as pb_grpc
from snapshotter.catalog import Catalog, CatalogError
from snapshotter.containerd import Blob
from snapshotter.pull import PullError, PullPlan, plan

log = logging.getLogger(__name__)
SERVICE = "cafs.v1.Pull"


def _blob(b: Blob) -> pb.Blob:
    return pb.Blob(media_type=b.media_type, digest=b.digest, data=b.data)


def _unblob(b: pb.Blob) -> Blob:
    return Blob(b.media_type, b.digest, b.data)


def encode(p: PullPlan) -> pb.PlanReply:
    reply = pb.PlanReply(name=p.name, manifest=_blob(p.manifest), config=_blob(p.config),
                         chains=p.chains, layer_digests=p.layer_digests)
    if p.index is not None:
        reply.index.CopyFrom(_blob(p.index))
    return reply


def decode(reply: pb.PlanReply) -> PullPlan:
    if not (reply.HasField("manifest") and reply.HasField("config") and reply.chains):
        raise ValueError("a plan without manifest, config or layers")
    return PullPlan(name=reply.name, manifest=_unblob(reply.manifest),
                    config=_unblob(reply.config),
                    index=_unblob(reply.index) if reply.HasField("index") else None,
                    chains=list(reply.chains), layer_digests=list(reply.layer_digests))


def handler(catalog: Catalog,
            warm: Callable[[str], None] | None = None) -> grpc.GenericRpcHandler:
    """`warm(top chain)` runs in the background after each plan: a pull announces a run."""

    def plan_rpc(request: pb.PlanRequest, context: grpc.ServicerContext) -> pb.PlanReply:
        try:
            if not request.ref:
                raise ValueError("no ref")
            p = plan(request.ref, catalog, request.name if request.HasField("name") else None)
            if warm is not None:
                threading.Thread(target=warm, args=(p.chains[-1],), name="warm",
                                 daemon=True).start()
            return encode(p)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad plan request: {exc}")
        except (PullError, CatalogError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {exc}")
        raise AssertionError("unreachable")  # abort raises

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Plan": grpc.unary_unary_rpc_method_handler(
            plan_rpc, request_deserializer=pb.PlanRequest.FromString,
            response_serializer=pb.PlanReply.SerializeToString)})


def remote_plan(address: str, ref: str, name: str | None,
                timeout: float = 30.0) -> PullPlan | None:
    """The plan from the snapshotter at `address`; None where it cannot give one (not
    running, an older one without this method), PullError where it says the image cannot
    be pulled."""
    with grpc.insecure_channel(f"unix://{address}") as channel:
        try:
            reply = pb_grpc.PullStub(channel).Plan(pb.PlanRequest(ref=ref, name=name),
                                                   timeout=timeout)
            return decode(reply)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise PullError(exc.details() if isinstance(exc, grpc.Call) else str(exc)) \
                    from None
            log.info("snapshotter at %s gave no plan (%s): planning here", address, code)
            return None
        except ValueError as exc:
            log.warning("snapshotter at %s gave a bad plan (%s): planning here", address, exc)
            return None
