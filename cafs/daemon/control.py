"""The daemon's control socket: what `cafs stats`, `cafs mount`'s clients, the weight loader
and the snapshotter ask a running mount (stats, info, prefetch state, profile, paths).

A tiny line protocol on a unix socket in the mount's private state directory: one request
line, one JSON line back. `Control` is handed the index, fetcher and cache it answers
about, not the FUSE adapter: it answers questions about the mount's data, not about FUSE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from blobstore import BlobStore, StoreError
from blobstore.cache import LOW_WATER, NodeCache
from cafs.config import DaemonConfig
from cafs.daemon.fetcher import Fetcher
from cafs.daemon.prefetch import Prefetcher, path_plan
from cafs.daemon.stats import MountStats
from cafs.profile import Recorder, save_profile
from cafs.weights import gpu
from indexer.format import Index

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[dict[str, Any]]]


async def serve_control(sock_path: Path, handle_request: Handler,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer each connection's one request line with one JSON line.

    Listening before "ready", so whoever mounted can ask at once."""
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                data = b""
                while b"\n" not in data and len(data) < 16384:
                    part = await stream.receive_some(16384)
                    if not part:
                        break
                    data += part
                request = data.decode(errors="surrogateescape").strip()
                try:
                    body = await handle_request(request)
                except (OSError, ValueError, StoreError) as exc:
                    body = {"error": str(exc)}
                except Exception as exc:  # a bug answers this request; the mount goes on
                    log.exception("control request %r failed", request[:200])
                    body = {"error": f"internal error: {exc}"}
                await stream.send_all(json.dumps(body).encode() + b"\n")

    await trio.serve_listeners(handle, [listener])


def cache_room(cache: NodeCache) -> int:
    """What a prefetch plan may fill of the node cache: up to where eviction stops."""
    return int(cache.budget * LOW_WATER)


class Control:
    """What the control socket answers: stats, info, prefetch state, profile and paths."""

    def __init__(self, index: Index, fetcher: Fetcher, cache: NodeCache, stats: MountStats,
                 store: BlobStore, info: dict[str, Any], prefetcher: Prefetcher,
                 recorder: Recorder | None, cfg: DaemonConfig) -> None:
        self.index, self.fetcher, self.cache, self.stats = index, fetcher, cache, stats
        self.store, self.info, self.cfg = store, info, cfg
        self.prefetcher, self.recorder = prefetcher, recorder

    async def __call__(self, request: str) -> dict[str, Any]:
        verb, _, arg = request.partition(" ")
        if verb == "stats":
            return {**self.stats.snapshot(), "prefetch": self.prefetcher.status(),
                    "metadata": self.info["metadata"]}
        if verb == "info":
            return self.info
        if verb == "prefetch":
            return self.prefetcher.status()
        if verb == "save-profile":
            return await trio.to_thread.run_sync(self.save_profile)
        if verb == "locate":
            return self.locate(arg)
        if verb == "prefetch-path":
            return self.prefetch_path(arg)
        return {"error": f"unknown request {request!r}"}

    def save_profile(self) -> dict[str, Any]:
        """Save what was recorded so far and stop recording: a profile of the start."""
        if self.recorder is None:
            return {"error": "this mount is not recording a profile"}
        self.recorder.active = False
        profile = self.recorder.profile()
        key = save_profile(self.store, profile)
        log.info("saved profile %s: %d reads, %d blobs", key, len(profile.entries),
                 len(profile.blobs()))
        return {"saved": key, "entries": len(profile.entries), "bytes": profile.total_bytes}

    def _ino(self, relpath: str) -> int:
        ino = self.index.resolve(relpath.encode("utf-8", "surrogateescape"))
        if ino is None:
            raise FileNotFoundError(f"{relpath}: not in this image")
        return ino

    def locate(self, relpath: str) -> dict[str, Any]:
        """The blobs behind a file and where the node cache keeps them, so a loader can
        read verified cache files directly instead of through FUSE."""
        node = self.index.inode(self._ino(relpath))
        if not node.is_reg:
            raise IsADirectoryError(f"{relpath}: not a regular file")
        blobs = self.index.chunks(node.ino)
        return {"path": relpath, "size": node.size, "chunk_size": self.index.chunk_size,
                "blobs": blobs, "cache": str(self.cache.blobs),
                "verified": [self.fetcher.verified(k) for k in blobs]}

    def prefetch_path(self, relpath: str) -> dict[str, Any]:
        self._ino(relpath)
        report = gpu.probe()
        parallel = gpu.prefetch_parallel(report, self.prefetcher.policy.weights_parallel)
        plan = path_plan(self.index, relpath, parallel, cache_room(self.cache))
        if plan is None:
            return {"plan": None, "blobs": 0, "bytes": 0}
        status = self.prefetcher.submit(plan)
        return {"plan": plan.name, "blobs": status.blobs, "bytes": status.bytes}
