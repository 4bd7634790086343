"""The mount daemon: one process per mounted image, serving FUSE with pyfuse3 and trio.

Started by `cafs mount` (detached, reporting readiness through a pipe) or in the
foreground. One nursery holds the FUSE workers, the control socket and the signal watcher;
when the kernel unmounts (`cafs umount`, `fusermount -u`) or a signal arrives, everything
is cancelled and the mount is closed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from blobstore import open_store
from blobstore.cache import NodeCache
from cafs import logs, mountinfo, paths
from cafs.fetcher import Fetcher, FetchPolicy
from cafs.fs import CafsOperations
from cafs.resolve import load_mount_index
from cafs.stats import MountStats

log = logging.getLogger("cafs.daemon")
READ_AHEAD_KB = 4096


@dataclass
class DaemonConfig:
    source: str
    mountpoint: Path
    store_url: str | None
    cache_dir: Path
    cache_size: int | None
    state_dir: Path
    fetch_deadline: float = 60.0
    max_tasks: int = 64


def _set_readahead(mountpoint: Path, kb: int) -> None:
    """Large kernel readahead turns many 128 KiB FUSE reads into fewer, larger ones."""
    entry = mountinfo.find(mountpoint)
    if entry is None:
        return
    path = Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")
    try:
        path.write_text(str(kb))
    except OSError as exc:
        log.info("cannot raise readahead (%s): %s", path, exc)


async def _control(sock_path: Path, stats: MountStats, info: dict[str, Any]) -> None:
    """A tiny line protocol on a unix socket: `stats` or `info` -> one JSON line."""
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                request = (await stream.receive_some(256)).decode(errors="replace").strip()
                body: dict[str, Any] = {"stats": stats.snapshot(), "info": info}.get(
                    request, {"error": f"unknown request {request!r}"})
                await stream.send_all(json.dumps(body).encode() + b"\n")

    await trio.serve_listeners(handle, [listener])


async def _signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        task_status.started()
        async for signum in sigs:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


async def _serve(ops: CafsOperations, cfg: DaemonConfig, info: dict[str, Any],
                 ready: Any) -> None:
    async with trio.open_nursery() as nursery:
        ops.background = nursery
        await nursery.start(_signals)  # a SIGTERM right after "ready" must unmount cleanly
        nursery.start_soon(_control, cfg.state_dir / "control.sock", ops.stats, info)
        if ready is not None:
            ready("ok")
        await pyfuse3.main(min_tasks=4, max_tasks=cfg.max_tasks)
        nursery.cancel_scope.cancel()


def _clean_state(state_dir: Path) -> None:
    """Remove our state files, unless a newer daemon has taken this mountpoint since (an
    old daemon kept alive by an overlay above it may exit long after being unmounted)."""
    try:
        if int((state_dir / "pid").read_text()) != os.getpid():
            return
    except (OSError, ValueError):
        return
    for name in ("control.sock", "info.json", "pid"):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()


def run(cfg: DaemonConfig, ready: Any = None) -> int:
    """Mount and serve until unmounted. `ready(message)` is called once mounted or failed."""
    started = time.monotonic()
    store = open_store(cfg.store_url)
    cache = NodeCache(cfg.cache_dir, cfg.cache_size)
    index, index_key = load_mount_index(store, cfg.source, cfg.cache_dir)
    stats = MountStats(image_bytes=int(index.meta.get("bytes", 0)))
    fetcher = Fetcher(store, cache, stats, FetchPolicy(deadline=cfg.fetch_deadline))
    ops = CafsOperations(index, fetcher, stats)
    options = set(pyfuse3.default_options) | {
        "fsname=cafs", "subtype=cafs", "ro", "allow_other", "default_permissions"}
    pyfuse3.init(ops, str(cfg.mountpoint), options)
    try:
        _set_readahead(cfg.mountpoint, READ_AHEAD_KB)
        info = {"source": cfg.source, "index": index_key, "mountpoint": str(cfg.mountpoint),
                "store": store.url, "cache": str(cfg.cache_dir), "pid": os.getpid(),
                "ready_ms": round(1000 * (time.monotonic() - started), 1)}
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (cfg.state_dir / "info.json").write_text(json.dumps(info))
        (cfg.state_dir / "pid").write_text(str(os.getpid()))
        log.info("mounted %s (index %s) at %s in %.0f ms", cfg.source, index_key,
                 cfg.mountpoint, info["ready_ms"])
        trio.run(_serve, ops, cfg, info, ready)
    finally:
        pyfuse3.close(unmount=mountinfo.is_cafs(cfg.mountpoint))
        fetcher.close()
        _clean_state(cfg.state_dir)
        log.info("unmounted %s", cfg.mountpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the detached daemon (`python -m cafs.daemon`)."""
    p = argparse.ArgumentParser(prog="cafs-mountd")
    p.add_argument("source")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--store")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--cache-size", type=int, default=None)
    p.add_argument("--fetch-deadline", type=float, default=60.0)
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logs.setup(logging.DEBUG if args.debug else logging.INFO)
    mountpoint = Path(os.path.realpath(args.mountpoint))
    cfg = DaemonConfig(args.source, mountpoint, args.store,
                       args.cache_dir or paths.cache_dir(), args.cache_size,
                       paths.mount_state_dir(mountpoint), args.fetch_deadline)
    pipe = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None

    def ready(message: str) -> None:
        if pipe is not None:
            pipe.write(message + "\n")
            pipe.close()

    try:
        return run(cfg, ready)
    except Exception as exc:
        log.exception("mount failed")
        if pipe is not None and not pipe.closed:
            ready(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
