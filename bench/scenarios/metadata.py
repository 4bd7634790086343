"""Metadata: a full tree walk of a mount vs a plain unpack, and the time to mount.

Walk: os.walk plus lstat of every entry of the realistic image (in a child process), on a
fresh cafs mount and again on the same mount, beside the same walk of `umoci unpack`'s tree
with the kernel's dentry and inode caches dropped, and again with them warm.

Mount ready: `cafs mount` of a synthetic image of many small files (100k; `--quick` 10k),
once as a new daemon process and once through a mount server (`cafs mount-server`),
timed as the wall time of the CLI command (it returns once mounted), together with the
daemon's own figure (`ready_ms`, from the start of its main function: interpreter start-up
and imports are not in it). First with an empty node cache (the index comes from the store),
then again with the index in the node cache. Beside it, for scale, the time `umoci unpack`
takes to make the same rootfs ready the conventional way.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import images
from bench.context import Context
from bench.core import ScenarioResult, register
from bench.mountserver import mount_server
from bench.probe import run_probe
from bench.workspace import drop_dentries, query

WALK = "tree walk"
NATIVE_COLD = "plain unpack, dentry cache dropped"
NATIVE_HOT = "plain unpack, dentry cache warm"
CAFS_COLD = "cafs, fresh mount"
CAFS_HOT = "cafs, walked before"
READY = "mount ready"
CLI_COLD = "cafs mount CLI, index from store"
CLI_WARM = "cafs mount CLI, index in node cache"
SERVED_COLD = "cafs mount CLI via a mount server, index from store"
SERVED_WARM = "cafs mount CLI via a mount server, index in node cache"
DAEMON_COLD = "daemon ready_ms, index from store"
DAEMON_WARM = "daemon ready_ms, index in node cache"
UNPACK = "umoci unpack"
PYTHON = "python -c pass (interpreter start-up, for scale)"


@register("metadata", "metadata walk vs a plain unpack; mount-ready time", tools=("umoci",))
def run(ctx: Context, res: ScenarioResult) -> None:
    _walks(ctx, res)
    _ready(ctx, res)


def _walks(ctx: Context, res: ScenarioResult) -> None:
    rootfs = ctx.unpacked("realistic")
    indexed = ctx.indexed("realistic")
    res.params["walk_image_files"] = ctx.built("realistic").files
    dropped = True
    for i in range(ctx.repeat):
        ctx.step(f"walks {i + 1}/{ctx.repeat}")
        dropped = drop_dentries() and dropped
        r = run_probe("walk", rootfs)
        res.add(WALK, NATIVE_COLD, r["seconds"] * 1e3, "ms", "lower", True, **r)
        r = run_probe("walk", rootfs)
        res.add(WALK, NATIVE_HOT, r["seconds"] * 1e3, "ms", "lower", True, **r)
        cache = ctx.cache_dir("walk")
        with ctx.ws.mounted(indexed.ref, indexed.store_url, cache) as mnt:
            r = run_probe("walk", mnt)
            res.add(WALK, CAFS_COLD, r["seconds"] * 1e3, "ms", "lower", **r)
            r = run_probe("walk", mnt)
            res.add(WALK, CAFS_HOT, r["seconds"] * 1e3, "ms", "lower", **r)
        shutil.rmtree(cache)
        ctx.log(
            f"walk repeat {i + 1}: "
            + ", ".join(
                f"{s.contender} {s.samples[-1]:.0f} ms" for s in res.series if s.group == WALK
            )
        )
    res.params["dentry_cache_dropped"] = dropped
    if not dropped:
        res.notes.append("could not drop the dentry cache: the 'dropped' walks are warm")
    res.compare("walk: cafs fresh / unpack cold", f"{WALK}: {CAFS_COLD}", f"{WALK}: {NATIVE_COLD}")
    res.compare("walk: cafs again / unpack warm", f"{WALK}: {CAFS_HOT}", f"{WALK}: {NATIVE_HOT}")
    res.goal(
        "walk of a fresh mount ≤ 2x a cold plain unpack",
        "walk: cafs fresh / unpack cold",
        "<=",
        2.0,
    )
    res.goal("walk again ≤ 2x a warm plain unpack", "walk: cafs again / unpack warm", "<=", 2.0)


def _cli_mount(ctx: Context, ref: str, store_url: str, cache: Path,
               served: bool = False) -> tuple[float, float]:
    """(wall seconds of `cafs mount`, the daemon's ready_ms); unmounted again after.
    `served`: through the running mount server, else a daemon spawned as a new process."""
    mnt = ctx.ws.dir("mnt-ready")
    cmd = [
        sys.executable,
        "-m",
        "cafs",
        "mount",
        "-q",
        "--store",
        store_url,
        "--cache-dir",
        str(cache),
        ref,
        str(mnt),
    ]
    env = {**os.environ, "CAFS_MOUNT_SERVER": "on" if served else "off"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"cafs mount failed: {proc.stderr.strip()}")
        doc = query(mnt, "info")
        ready_ms = float(doc.get("info", doc)["ready_ms"])  # the daemon answers the bare dict
    finally:
        ctx.ws.unmount(mnt)
    return seconds, ready_ms


def _ready(ctx: Context, res: ScenarioResult) -> None:
    built = ctx.built("many-files")
    indexed = ctx.indexed("many-files")
    res.params.update(ready_image_files=built.files, ready_index_bytes=indexed.result.index_bytes)
    with mount_server():
        for i in range(ctx.repeat):
            ctx.step(f"mount ready {i + 1}/{ctx.repeat}")
            _ready_repeat(ctx, res, indexed.ref, indexed.store_url, built, i)
    res.compare("mount (CLI) / umoci unpack", f"{READY}: {CLI_COLD}", f"{READY}: {UNPACK}")
    for key, how in ((CLI_COLD, "a new daemon process"), (SERVED_COLD, "a mount server")):
        res.goal(f"`cafs mount` of {built.files} files ready < 300 ms (CLI wall time, {how})",
                 f"{READY}: {key}", "<", 300)
    res.goal(
        f"daemon ready_ms for {built.files} files < 300 ms", f"{READY}: {DAEMON_COLD}", "<", 300
    )


def _ready_repeat(ctx: Context, res: ScenarioResult, ref: str, store_url: str,
                  built: images.Built, i: int) -> None:
    order = [False, True] if i % 2 == 0 else [True, False]
    for served in order:
        cache = ctx.cache_dir("ready")
        keys = ((SERVED_COLD, None), (SERVED_WARM, None)) if served else (
            (CLI_COLD, DAEMON_COLD), (CLI_WARM, DAEMON_WARM))
        for cli, daemon in keys:
            seconds, ready_ms = _cli_mount(ctx, ref, store_url, cache, served)
            res.add(READY, cli, seconds * 1e3, "ms", "lower")
            if daemon is not None:
                res.add(READY, daemon, ready_ms, "ms", "lower")
        shutil.rmtree(cache)
    dest = ctx.ws.dir("unpack-ready")
    seconds = ctx.timed(functools.partial(images.umoci_unpack, built, dest))
    res.add(READY, UNPACK, seconds * 1e3, "ms", "lower", True)
    shutil.rmtree(dest)
    seconds = ctx.timed(functools.partial(subprocess.run, [sys.executable, "-c", "pass"]))
    res.add(READY, PYTHON, seconds * 1e3, "ms", "lower", True)
    ctx.log(
        f"ready repeat {i + 1}: "
        + ", ".join(
            f"{s.contender} {s.samples[-1]:.0f} ms" for s in res.series if s.group == READY
        )
    )

