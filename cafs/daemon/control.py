"""The daemon's control socket: what `cafs stats`, `cafs mount`'s clients, the weight loader
and the snapshotter ask a running mount (stats, info, prefetch state, profile, paths).

A unix socket in the mount's private state directory, framed as cafs/ipc.py says: one JSON
request line (`{"op": "stats"}`, `{"op": "locate", "path": P}`), one JSON reply line.
`Control` is handed the index, fetcher and cache it answers about, not the FUSE adapter:
it answers questions about the mount's data, not about FUSE.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from blobstore import BlobStore, StoreError
from blobstore.cache import LOW_WATER, NodeCache
from cafs import ipc
from cafs.config import DaemonConfig
from cafs.daemon.fetcher import Fetcher
from cafs.daemon.prefetch import Prefetcher, path_plan
from cafs.daemon.stats import MountStats
from cafs.profile import Recorder, save_profile
from cafs.weights import gpu
from indexer.format import Index

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def serve_control(sock_path: Path, handle_request: Handler,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer each connection's one request with one reply (cafs/ipc.py's framing).

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
            try:
                request = await _receive(stream)
            except ipc.ProtocolError as exc:
                reply = ipc.encode(ipc.error(f"bad request: {exc}"))
            else:
                reply = await _answer(handle_request, request)
            with trio.move_on_after(ipc.TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(reply)

    await trio.serve_listeners(handle, [listener])


async def _receive(stream: trio.SocketStream) -> dict[str, Any]:
    """One request line, whole within ipc.TIMEOUT: a slow or silent client is cut off."""
    buffer = ipc.LineBuffer(ipc.MAX_REQUEST)
    with trio.move_on_after(ipc.TIMEOUT):
        while (line := buffer.line()) is None:
            try:
                part = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:
                part = b""
            if not part:
                raise ipc.ProtocolError("connection closed before a whole line")
            buffer.feed(part)
        return ipc.decode(line)
    raise ipc.TimedOut(f"no whole line within {ipc.TIMEOUT:g}s")


async def _answer(handle_request: Handler, request: dict[str, Any]) -> bytes:
    """The reply line; encoded here, so a result JSON cannot hold is an error reply too."""
    try:
        return ipc.encode(ipc.ok(await handle_request(request)))
    except (OSError, ValueError, StoreError) as exc:  # ProtocolError is a ValueError
        return ipc.encode(ipc.error(str(exc)))
    except Exception as exc:  # a bug answers this request; the mount goes on
        log.exception("control request %r failed", str(request)[:200])
        return ipc.encode(ipc.error(f"internal error: {exc}"))


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

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        """The result for one request; an error is raised (ProtocolError: not understood)."""
        op = ipc.op_of(request)
        if op == "stats":
            return {**self.stats.snapshot(), "prefetch": self.prefetcher.status(),
                    "metadata": self.info["metadata"]}
        if op == "info":
            return self.info
        if op == "prefetch":
            return self.prefetcher.status()
        if op == "save-profile":
            return await trio.to_thread.run_sync(self.save_profile)
        if op == "locate":
            return self.locate(ipc.text_arg(request, "path"))
        if op == "prefetch-path":
            return self.prefetch_path(ipc.text_arg(request, "path"))
        raise ipc.ProtocolError(f"unknown op {op!r}")

    def save_profile(self) -> dict[str, Any]:
        """Save what was recorded so far and stop recording: a profile of the start."""
        if self.recorder is None:
            raise ValueError("this mount is not recording a profile")
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
        return {"path": relpath, "size": node.size, "chunk_size": node.chunk_size,
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
