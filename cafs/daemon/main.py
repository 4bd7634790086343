"""The mount daemon's start and life: arguments, mounting, serving until unmounted.

Started by `cafs mount` (detached, reporting readiness through a pipe) or in the
foreground. One nursery holds the FUSE workers (cafs/daemon/fs.py), the control socket
(cafs/daemon/control.py) and the signal watcher; when the kernel unmounts (`cafs umount`,
`fusermount -u`) or a signal arrives, everything is cancelled and the mount is closed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from blobstore import BlobStore, StoreError, open_store, privatedir
from blobstore.cache import NodeCache
from cafs import ipc, logs
from cafs.config import ConfigError, DaemonConfig
from cafs.daemon import fdlimit, kernelmeta, mountid
from cafs.daemon.background import contained
from cafs.daemon.control import Control, cache_room, serve_control
from cafs.daemon.fetcher import Fetcher, FetchPolicy
from cafs.daemon.fs import CafsOperations
from cafs.daemon.imports import Imports
from cafs.daemon.libraries import Libraries
from cafs.daemon.neighbours import Neighbours
from cafs.daemon.prefetch import (
    Plan,
    Prefetcher,
    PrefetchPolicy,
    profile_plan,
    weights_plan,
)
from cafs.daemon.stats import MountStats
from cafs.mounts import mountinfo
from cafs.profile import DEFAULT_NAME, ProfileError, Recorder, load_profile, save_profile
from cafs.resolve import index_key_for, load_index_cached
from cafs.weights import gpu
from indexer import erofs
from indexer.format import Index
from indexer.imports import META_KEY as IMPORTS_KEY
from indexer.libraries import META_KEY as LIBRARIES_KEY
from indexer.neighbours import META_KEY as NEIGHBOURS_KEY

log = logging.getLogger(__name__)
READ_AHEAD_KB = 4096


def _readahead_knob(mountpoint: Path) -> Path | None:
    entry = mountinfo.find(mountpoint)
    if entry is None:
        return None
    return Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")


async def _raise_readahead(path: Path | None, kb: int) -> None:
    """Large kernel readahead turns many 128 KiB FUSE reads into fewer, larger ones.

    The kernel sets the mount's readahead when it processes the reply to FUSE's INIT, which
    happens only once the session loop runs, so setting it right after mounting is undone:
    set it, then check until it holds (measured: 128 KiB -> 4 MiB requests' worth)."""
    if path is None:
        return
    for _ in range(100):
        await trio.sleep(0.02)
        try:
            if path.read_text().strip() == str(kb):
                return
            path.write_text(str(kb))
        except OSError as exc:
            log.info("cannot raise readahead (%s): %s", path, exc)
            return


async def _replayed_profile(cfg: DaemonConfig, store: BlobStore, key: str,
                            policy: PrefetchPolicy) -> Plan | None:
    """The profile to replay, asked for after "ready": a slow or hanging store must delay
    only the prefetch, never the mount."""
    if not cfg.profile or cfg.record:
        return None
    profile = None
    with trio.move_on_after(cfg.fetch_deadline):
        try:
            profile = await trio.to_thread.run_sync(
                load_profile, store, key, cfg.profile, abandon_on_cancel=True)
        except (StoreError, ProfileError) as exc:
            log.warning("profile %s of index %s unreadable, not replayed: %s",
                        cfg.profile, key, exc)
    if profile is None:
        if cfg.profile != DEFAULT_NAME:
            log.warning("image has no profile named %s: nothing to replay", cfg.profile)
        return None
    plan = profile_plan(profile, policy)
    log.info("replaying profile %s: %d blobs, %d bytes%s", cfg.profile, len(plan.blobs),
             profile.total_bytes, " from its startup pack" if plan.pack else "")
    return plan


def _weights_plan(cfg: DaemonConfig, index: Index, room: int,
                  policy: PrefetchPolicy) -> Plan | None:
    if cfg.prefetch_weights == "off" or not index.meta.get("weights"):
        return None
    report = gpu.probe()
    if cfg.prefetch_weights != "on" and not report.available:
        log.info("weights not prefetched: %s (ask with --prefetch-weights)", report.describe())
        return None
    parallel = gpu.prefetch_parallel(report, policy.weights_parallel)
    plan = weights_plan(index, parallel, room)
    if plan is not None:
        log.info("prefetching %d weight blobs, %d in parallel (%s)", len(plan.blobs),
                 parallel, report.describe())
    return plan


async def _start_prefetch(control: Control, key: str) -> None:
    """Profile first (the workload's start), then weights (what it loads next)."""
    cfg, policy = control.cfg, control.prefetcher.policy
    try:
        # The blob reads' store client (one try per request), not the index's: a daemon
        # whose index came from the node cache then builds one S3 client, not two, in the
        # moments after ready when the workload's first reads wait on it (measured: two
        # clients built at once held the first read 79 ms). A profile the store fails to
        # give at once is not replayed: the workload reads on demand.
        for plan in (await _replayed_profile(cfg, control.fetcher.store, key, policy),
                     _weights_plan(cfg, control.index, cache_room(control.cache), policy)):
            if plan is not None:
                control.prefetcher.submit(plan)
    finally:
        control.prefetcher.starting = False


async def _signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        task_status.started()
        async for signum in sigs:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


async def _serve(ops: CafsOperations, cfg: DaemonConfig, control: Control,
                 ready: Any, layers: Layers,
                 tables: tuple[Neighbours | None, Libraries | None, Imports | None]) -> None:
    async with trio.open_nursery() as nursery:
        ops.readahead.background = nursery
        nursery.start_soon(contained, control.stats, "cache writes", control.fetcher.settle)
        for table in tables:  # decoded once the mount is up, then serving its misses
            if table is not None:
                nursery.start_soon(table.run)
        await nursery.start(_signals)  # a SIGTERM right after "ready" must unmount cleanly
        nursery.start_soon(_raise_readahead, _readahead_knob(layers.fuse_at), READ_AHEAD_KB)
        await nursery.start(serve_control, cfg.state_dir / "control.sock", control)
        nursery.start_soon(control.prefetcher.run)
        control.prefetcher.starting = True
        nursery.start_soon(_ready, layers, cfg, control, ready)
        await pyfuse3.main(min_tasks=4, max_tasks=cfg.max_tasks)
        nursery.cancel_scope.cancel()


@dataclass
class Layers:
    """Where FUSE is mounted: the mountpoint itself, or, with kernel-served metadata, a
    private directory that becomes the overlay's data layer (cafs/daemon/kernelmeta.py); and the
    identity of each mount this daemon made, so that it unmounts those and nothing else."""

    fuse_at: Path
    image: Path | None = None  # the EROFS image of the tree, when the kernel serves it
    fuse_id: mountid.MountId | None = None  # the FUSE mount, taken once mounted
    top_id: mountid.MountId | None = None  # the overlay (or bind) at the mountpoint

    def unmount_own(self, mountpoint: Path) -> None:
        """Detach what this daemon mounted where it still is; a path now showing another
        mount (ours detached with `umount -l`, a new one mounted there since) is left as
        it is (cafs/daemon/mountid.py)."""
        if self.image is not None:
            mountid.unmount_own(mountpoint, self.top_id)
        mountid.unmount_own(self.fuse_at, self.fuse_id)


async def _ready(layers: Layers, cfg: DaemonConfig, control: Control, ready: Any) -> None:
    """Stack the kernel's layers (they need the FUSE loop running: the overlay asks its
    data layer's root at mount time), then report the mount ready."""
    if layers.image is not None:
        started = time.monotonic()
        try:
            layers.top_id = await trio.to_thread.run_sync(
                kernelmeta.stack, layers.image, layers.fuse_at, cfg.state_dir / "meta",
                cfg.mountpoint, cfg.suid_dev)
            control.info["metadata"] = "kernel"
            log.info("EROFS and overlay stacked in %.0f ms", 1000 * (time.monotonic() - started))
        except OSError as exc:
            log.warning("kernel metadata not mounted, serving it through FUSE: %s", exc)
            layers.top_id = await trio.to_thread.run_sync(kernelmeta.bind, layers.fuse_at,
                                                          cfg.mountpoint)
        control.info["ready_ms"] = round(control.info["ready_ms"]
                                         + 1000 * (time.monotonic() - started), 1)
        _write_info(cfg, control.info)
    log.info("mounted %s (index %s) at %s in %.0f ms, metadata served by %s", cfg.source,
             control.info["index"], cfg.mountpoint, control.info["ready_ms"],
             control.info["metadata"])
    if ready is not None:
        ready(None)
    _connect_early(control.fetcher.store)
    await contained(control.stats, "prefetch start", _start_prefetch, control,
                    control.info["index"])


def _write_info(cfg: DaemonConfig, info: dict[str, Any]) -> None:
    privatedir.write_file(cfg.state_dir / "info.json", json.dumps(info).encode())


def _for_this_user(options: set[str]) -> set[str]:
    """A mount by root is for every user (containers run as any uid); a user's mount is
    theirs alone, as sshfs's or rclone's: fusermount3 refuses allow_other to users unless
    /etc/fuse.conf says user_allow_other, and the kernel keeps everyone else out."""
    return options if os.geteuid() == 0 else options - {"allow_other"}


def _layers(cfg: DaemonConfig, index: Index, key: str,
            fetched: concurrent.futures.Future[kernelmeta.Fetched] | None,
            why: str | None) -> Layers:
    """Kernel-served metadata where this node and image allow it, else FUSE alone.
    `fetched`: the image from the node cache or the store; None where `why` says it is
    not used."""
    if fetched is not None:
        started = time.monotonic()
        try:
            image = kernelmeta.accept(index, key, cfg.cache_dir, fetched.result())
            log.info("EROFS image ready %.0f ms after the index", 1000 * (time.monotonic()
                                                                           - started))
            data = cfg.state_dir / "data"
            data.mkdir(parents=True, exist_ok=True)
            return Layers(data, image)
        except (erofs.Unrepresentable, OSError) as exc:
            why = str(exc)
    log.info("metadata served through FUSE: %s", why)
    return Layers(cfg.mountpoint)


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
    for name in ("data", "meta"):  # kernel metadata's layer mountpoints, detached by now
        with contextlib.suppress(OSError):
            (state_dir / name).rmdir()
    with contextlib.suppress(OSError):
        state_dir.rmdir()


def run(cfg: DaemonConfig, ready: Any = None) -> int:
    """Mount and serve until unmounted. `ready(error)` is called once mounted (None) or failed."""
    started = time.monotonic()
    fd_limit = fdlimit.raise_to_hard()  # cache fds are sized from it, below
    fdlimit.grow_table(2 * fdlimit.cache_size(fd_limit))  # before any thread starts
    privatedir.ensure(cfg.state_dir)  # pid, info and control socket: nobody else's to swap
    store = open_store(cfg.store_url)  # index, profiles: each request retried by botocore
    # Blob reads try each request once: the fetcher is their one retry layer, bounded by the
    # fetch deadline, so a read never waits out botocore's schedule inside each of its own.
    reads = open_store(cfg.store_url, retries=False)
    # No fdatasync per blob: a process hashes a cache file before trusting it unless a
    # record from this boot vouches for it (blobstore/cache.py), so one torn by a crash is
    # refetched, and syncing cost 1-5x the write time on the weight path.
    cache = NodeCache(cfg.cache_dir, cfg.cache_size, fsync=False)
    index_key = index_key_for(store, cfg.source)
    why = kernelmeta.unsupported(cfg.kernel_metadata)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        image = (pool.submit(kernelmeta.fetch, index_key, cfg.cache_dir, store)
                 if why is None else None)  # while the index loads
        index = load_index_cached(store, index_key, cfg.cache_dir)
        layers = _layers(cfg, index, index_key, image, why)
    stats = MountStats(image_bytes=int(index.meta.get("bytes", 0)))
    fetch_policy = FetchPolicy(deadline=cfg.fetch_deadline, max_open=fdlimit.cache_size(fd_limit),
                               max_blob=index.max_chunk_size)
    fetcher = Fetcher(reads, cache, stats, fetch_policy)
    near = _neighbours(cfg, index, reads, fetcher, stats)
    ops = CafsOperations(index, fetcher, stats, splice=cfg.read_splice)
    libs = _libraries(cfg, index, ops, stats)
    imports = _imports(cfg, index, ops, stats, near, libs)
    recorder = Recorder(index, index_key, cfg.record) if cfg.record else None
    if recorder is not None:
        ops.on_read = recorder.on_read
    policy = PrefetchPolicy(parallel=cfg.prefetch_parallel, rate=cfg.prefetch_rate,
                            use_pack=cfg.use_pack, processes=cfg.prefetch_processes)
    # nosuid,nodev: any user who reaches the mount could run the image's setuid-root
    # binaries as root and open its device nodes. A container's overlay above it still
    # honours setuid: the kernel checks the mount a binary is executed from.
    options = set(pyfuse3.default_options) | {
        "fsname=cafs", "subtype=cafs", "ro", "allow_other", "default_permissions",
        *(("suid", "dev") if cfg.suid_dev else ("nosuid", "nodev"))}
    pyfuse3.init(ops, str(layers.fuse_at), _for_this_user(options))
    layers.fuse_id = mountid.of(layers.fuse_at)
    try:
        info = {"source": cfg.source, "index": index_key, "mountpoint": str(cfg.mountpoint),
                "store": store.url, "cache": str(cfg.cache_dir), "pid": os.getpid(),
                "metadata": "fuse", "ready_ms": round(1000 * (time.monotonic() - started), 1),
                # what it runs with, as received, and as the cache and fetcher took it
                "config": cfg.as_dict(), "cache_budget": cache.budget,
                "fetch_deadline": fetcher.policy.deadline}
        _write_info(cfg, info)
        privatedir.write_file(cfg.state_dir / "pid", str(os.getpid()).encode())
        control = Control(index, fetcher, cache, stats, store, info,
                          Prefetcher(fetcher, reads, policy), recorder, cfg)
        trio.run(_serve, ops, cfg, control, ready, layers, (near, libs, imports))
    finally:
        # Not pyfuse3's unmount: it unmounts whatever is at the path by then.
        layers.unmount_own(cfg.mountpoint)
        pyfuse3.close(unmount=False)
        fetcher.close()
        if recorder is not None and recorder.active:
            _save_quietly(store, recorder)
        _clean_state(cfg.state_dir)
        log.info("unmounted %s", cfg.mountpoint)
    return 0


def _connect_early(store: BlobStore) -> None:
    """The blob store's client built in a thread as soon as the mount is ready: a fresh
    daemon's first read paid botocore's set-up (~40 ms of CPU) inside its first GET,
    ~20 ms after ready. Built while the index loaded instead, it held the GIL against the
    load and delayed ready by as much (ready_ms 62 → 100, coldstart)."""
    connect = getattr(store, "connect", None)
    if connect is not None:
        threading.Thread(target=connect, name="store-connect", daemon=True).start()


def _libraries(cfg: DaemonConfig, index: Index, ops: CafsOperations, stats: MountStats
               ) -> Libraries | None:
    """The image's library table, told of every first read; None without one (an index
    from before it, a lower chain, `libraries_ahead` 0)."""
    if cfg.libraries_ahead <= 0 or LIBRARIES_KEY not in index.meta:
        return None
    libs = Libraries(index, ops.readahead, stats, cfg.libraries_ahead)
    ops.on_first_read.append(libs.first_read)
    return libs


def _imports(cfg: DaemonConfig, index: Index, ops: CafsOperations, stats: MountStats,
             near: Neighbours | None, libs: Libraries | None) -> Imports | None:
    """The image's import table, told of every first read (after the library table, which
    it asks for extension modules); None without one (an index from before it, a lower
    chain, `imports_ahead` 0)."""
    if cfg.imports_ahead <= 0 or IMPORTS_KEY not in index.meta:
        return None
    imports = Imports(index, ops.readahead, stats, near, libs, cfg.imports_ahead)
    ops.on_first_read.append(imports.first_read)
    if near is not None:
        near.gate = imports.ready
    return imports


def _neighbours(cfg: DaemonConfig, index: Index, store: BlobStore, fetcher: Fetcher,
                stats: MountStats) -> Neighbours | None:
    """The image's neighbour pack, answering the fetcher's misses once its table is read
    (in the background, `Neighbours.run`); None without one (an index from before them, a
    lower chain, turned off)."""
    if not cfg.neighbours or NEIGHBOURS_KEY not in index.meta:
        return None
    near = Neighbours(index, store, fetcher, stats, cfg.neighbour_segment,
                      ahead_max=cfg.neighbour_ahead)
    fetcher.on_miss = near.on_miss
    fetcher.held = near.held
    return near


def _save_quietly(store: BlobStore, recorder: Recorder) -> None:
    try:
        profile = recorder.profile()
        key = save_profile(store, profile)
        log.info("saved profile %s: %d reads", key, len(profile.entries))
    except (StoreError, OSError) as exc:
        log.error("profile %s not saved: %s", recorder.name, exc)


def serve(cfg: DaemonConfig) -> int:
    """Serve in this process (`cafs mount --foreground`) until unmounted."""
    logs.setup(logging.DEBUG if cfg.debug else logging.INFO)
    return run(cfg)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the detached daemon (`python -m cafs.daemon SOURCE MOUNTPOINT --config
    JSON`). The configuration arrives whole, resolved once by whoever started the daemon
    (cafs.config.daemon_config); the daemon reads no setting of its own. SOURCE and
    MOUNTPOINT repeat it for `ps` and the snapshotter's liveness check."""
    p = argparse.ArgumentParser(prog="cafs-mountd")
    p.add_argument("source")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--config", required=True, metavar="JSON", help="a cafs.config.DaemonConfig")
    p.add_argument("--ready-fd", type=int, default=None)
    args = p.parse_args(argv)
    pipe = os.fdopen(args.ready_fd, "wb") if args.ready_fd is not None else None

    def ready(error: str | None) -> None:
        """One cafs/ipc.py reply to whoever started us: {"ok": "mounted"} or the error."""
        if pipe is not None:
            pipe.write(ipc.encode(ipc.ok("mounted") if error is None else ipc.error(error)))
            pipe.close()

    try:
        cfg = DaemonConfig.from_json(args.config)
        if (cfg.source, cfg.mountpoint) != (args.source, Path(os.path.realpath(args.mountpoint))):
            raise ConfigError("the arguments and --config name different mounts")
        logs.setup(logging.DEBUG if cfg.debug else logging.INFO)
        return run(cfg, ready)
    except Exception as exc:
        log.exception("mount failed")
        if pipe is not None and not pipe.closed:
            ready(str(exc))
        return 1

