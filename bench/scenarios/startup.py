"""Start a program in the image: how much of the image it fetches, and how long it takes.

`python3 -c 'import json'` in the realistic image, each repeat with everything cold:

- chroot into `umoci unpack`'s tree with its files dropped from the page cache (baseline),
  and again, warm;
- chroot into a fresh cafs mount (empty node cache, store files dropped from the page cache),
  and again, warm; the mount's own statistics say how many bytes it fetched;
- `cafs run --rm` (mount, overlay, runc, unmount) with an empty node cache: the whole
  user-visible path, for scale.

- `runc run` of the same command on the plain unpack, page cache dropped: the baseline of
  `cafs run`.

The baseline for bytes is what a conventional pull moves: every layer, compressed. Python
runs with -B, so it writes no bytecode into the plain unpack (it cannot on the read-only
mount): both sides compile the same modules on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import images
from bench.context import Context
from bench.core import ScenarioResult, register
from bench.workspace import evict, query
from cafs.run.spec import RunOptions, build_spec

COMMAND = ("/usr/bin/python3", "-B", "-c", "import json")
TIME = "python3 -c 'import json'"
NATIVE_COLD = "chroot, plain unpack, page cache dropped"
NATIVE_HOT = "chroot, plain unpack, warm"
CAFS_COLD = "chroot, cafs mount, cold"
CAFS_HOT = "chroot, cafs mount, warm"
CAFS_RUN = "cafs run --rm, cold (CLI + mount + overlay + runc)"
RUNC = "runc run, plain unpack, page cache dropped"
BYTES = "bytes fetched"
FETCHED = "cafs, fetched on demand"
PULL = "OCI pull: all layers, gzip"


def _chroot(root: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(["chroot", str(root), *COMMAND], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"chroot {root} {' '.join(COMMAND)} failed: {proc.stderr.strip()}")
    return seconds


@register(
    "startup", "bytes fetched and time to run python3 -c 'import json'", tools=("chroot", "runc")
)
def run(ctx: Context, res: ScenarioResult) -> None:
    built = ctx.built("realistic")
    rootfs = ctx.unpacked("realistic")
    indexed = ctx.indexed("realistic")
    res.params.update(
        command=" ".join(COMMAND),
        image_bytes=built.image_bytes,
        store=ctx.store_label(indexed.store_url),
    )
    for i in range(ctx.repeat):
        ctx.step(f"plain unpack {i + 1}/{ctx.repeat}")
        evict(rootfs)
        res.add(TIME, NATIVE_COLD, _chroot(rootfs) * 1e3, "ms", "lower", True)
        res.add(TIME, NATIVE_HOT, _chroot(rootfs) * 1e3, "ms", "lower", True)
        ctx.step(f"cafs mount {i + 1}/{ctx.repeat}")
        _cafs_chroot(ctx, res, indexed.ref, indexed.store_url, built.compressed_bytes)
        ctx.step(f"cafs run {i + 1}/{ctx.repeat}")
        _cafs_run(ctx, res, indexed.ref, indexed.store_url)
        evict(rootfs)
        res.add(TIME, RUNC, _runc(ctx, rootfs) * 1e3, "ms", "lower", True)
        ctx.log(
            f"startup repeat {i + 1}: "
            + ", ".join(f"{s.contender} {s.samples[-1]:.1f} {s.unit}" for s in res.series)
        )
    res.compare("cafs cold / unpack cold", f"{TIME}: {CAFS_COLD}", f"{TIME}: {NATIVE_COLD}")
    res.compare("cafs warm / unpack warm", f"{TIME}: {CAFS_HOT}", f"{TIME}: {NATIVE_HOT}")
    res.compare("cafs run / runc run", f"{TIME}: {CAFS_RUN}", f"{TIME}: {RUNC}")
    res.goal("bytes fetched ≤ 10% of the image", f"{BYTES}: {FETCHED}", "<=", 10.0)


def _cafs_chroot(
    ctx: Context, res: ScenarioResult, ref: str, store_url: str, compressed: int
) -> None:
    cache = ctx.cache_dir("startup")
    if store_url.startswith("file://"):
        evict(Path(store_url.removeprefix("file://")))
    with ctx.ws.mounted(ref, store_url, cache) as mnt:
        cold = _chroot(mnt)
        stats = query(mnt)
        hot = _chroot(mnt)
    fetched = stats["demand_bytes"] + stats["prefetch_bytes"]
    res.add(TIME, CAFS_COLD, cold * 1e3, "ms", "lower")
    res.add(TIME, CAFS_HOT, hot * 1e3, "ms", "lower")
    res.add(
        BYTES,
        FETCHED,
        stats["fetched_percent"],
        "% of image",
        "lower",
        bytes=fetched,
        image_bytes=stats["image_bytes"],
        blobs=stats["demand_blobs"] + stats["prefetch_blobs"],
        stats=stats,
    )
    res.add(
        BYTES,
        PULL,
        100 * compressed / stats["image_bytes"],
        "% of image",
        "lower",
        True,
        bytes=compressed,
    )
    shutil.rmtree(cache)


def _cafs_run(ctx: Context, res: ScenarioResult, ref: str, store_url: str) -> None:
    cache = ctx.cache_dir("cafs-run")
    cmd = [
        sys.executable,
        "-m",
        "cafs",
        "run",
        "--rm",
        "--store",
        store_url,
        "--cache-dir",
        str(cache),
        ref,
        "--",
        *COMMAND,
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"cafs run failed ({proc.returncode}): {proc.stderr.strip()}")
    res.add(TIME, CAFS_RUN, seconds * 1e3, "ms", "lower")
    shutil.rmtree(cache)


def _runc(ctx: Context, rootfs: Path) -> float:
    """`runc run` of the command on the plain unpack: what `cafs run` adds a lazy mount to."""
    bundle = ctx.ws.dir("runc-bundle")
    spec = build_spec(images.config_for("realistic"), rootfs, RunOptions(command=[*COMMAND]))
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"cafs-bench-{bundle.name}-{os.getpid()}"
    started = time.perf_counter()
    proc = subprocess.run(
        ["runc", "run", "--bundle", str(bundle), cid],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
    shutil.rmtree(bundle)
    if proc.returncode != 0:
        raise RuntimeError(f"runc run failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds
