"""`cafs pull`'s store lookups, answered by the running snapshotter.

Measured in the cold-start benchmark: `cafs pull` took 1.55 s of a 2.76 s cold start, and
most of it was not containerd: a fresh interpreter importing boto3 and building an S3
client (~0.4 s on a cold page cache) to read a handful of small objects. The snapshotter
has that client warm, and it is the store that matters anyway (it is the one that serves the
layers), so the client asks it for the pull plan on the snapshotter's own socket, as one
extra gRPC method beside containerd's snapshots API: JSON in, JSON out, no generated stubs.
A snapshotter that does not answer (older, elsewhere) leaves the client to plan itself.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from blobstore import StoreError
from snapshotter.catalog import Catalog, CatalogError
from snapshotter.containerd import Blob
from snapshotter.pull import PullError, PullPlan, plan

log = logging.getLogger(__name__)
SERVICE = "cafs.v1.Pull"
METHOD = f"/{SERVICE}/Plan"


def _blob(b: Blob | None) -> dict[str, str] | None:
    if b is None:
        return None
    return {"media_type": b.media_type, "digest": b.digest,
            "data": base64.b64encode(b.data).decode()}


def _unblob(d: dict[str, str] | None) -> Blob | None:
    if d is None:
        return None
    return Blob(d["media_type"], d["digest"], base64.b64decode(d["data"]))


def encode(p: PullPlan) -> bytes:
    return json.dumps({
        "name": p.name, "manifest": _blob(p.manifest), "config": _blob(p.config),
        "index": _blob(p.index), "chains": p.chains, "layer_digests": p.layer_digests,
    }).encode()


def decode(data: bytes) -> PullPlan:
    d: dict[str, Any] = json.loads(data)
    manifest, config = _unblob(d["manifest"]), _unblob(d["config"])
    if manifest is None or config is None:
        raise ValueError("a plan without manifest or config")
    return PullPlan(name=d["name"], manifest=manifest, config=config, index=_unblob(d["index"]),
                    chains=[str(c) for c in d["chains"]],
                    layer_digests=[str(x) for x in d["layer_digests"]])


def handler(catalog: Catalog,
            warm: Callable[[str], None] | None = None) -> grpc.GenericRpcHandler:
    """`warm(top chain)` runs in the background after each plan: a pull announces a run."""

    def plan_rpc(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            asked = json.loads(request)
            p = plan(str(asked["ref"]), catalog, asked.get("name"))
            if warm is not None:
                threading.Thread(target=warm, args=(p.chains[-1],), name="warm",
                                 daemon=True).start()
            return encode(p)
        except (ValueError, KeyError, TypeError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad plan request: {exc}")
        except (PullError, CatalogError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except StoreError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"store: {exc}")
        raise AssertionError("unreachable")  # abort raises

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Plan": grpc.unary_unary_rpc_method_handler(plan_rpc)})


def remote_plan(address: str, ref: str, name: str | None,
                timeout: float = 30.0) -> PullPlan | None:
    """The plan from the snapshotter at `address`; None where it cannot give one (not
    running, an older one without this method), PullError where it says the image cannot
    be pulled."""
    request = json.dumps({"ref": ref, "name": name}).encode()
    with grpc.insecure_channel(f"unix://{address}") as channel:
        call = channel.unary_unary(METHOD)
        try:
            return decode(call(request, timeout=timeout))
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise PullError(exc.details() if isinstance(exc, grpc.Call) else str(exc)) \
                    from None
            log.info("snapshotter at %s gave no plan (%s): planning here", address, code)
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("snapshotter at %s gave a bad plan (%s): planning here", address, exc)
            return None
