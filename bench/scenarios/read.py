"""Sequential read of one large file: through a cafs mount, and natively from local disk.

Each repeat reads the same bytes six ways, each in a child process with 4 MiB buffers:

- native, page cache dropped: the file on the benchmark's disk after posix_fadvise(DONTNEED);
- native, page cached: the same file read again;
- cafs cold: a fresh mount with an empty node cache, the store's files dropped from the page
  cache too: every chunk comes from the store (`--store s3`: the S3 server over HTTP, its
  objects warm), is verified and written to the cache;
- cafs warm, same mount: the same mount read again after dropping the page cache of both the
  mounted file and the node cache's files (the daemon has verified those blobs already);
- cafs warm, new mount: a new mount over the now full node cache, its files dropped from the
  page cache (a new daemon trusts the cache files the first one verified: the node cache's
  `trusted/` records);
- cafs hot: the same mount read again, served by the kernel's page cache.

fincore checks how much of a file really was resident before each "dropped" read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench import images
from bench.context import Context
from bench.core import ScenarioResult, register
from bench.netshape import parse_link
from bench.probe import run_probe
from bench.workspace import evict, query, resident_bytes

GROUP = "sequential read"
NATIVE_COLD = "native, page cache dropped"
NATIVE_HOT = "native, page cached"
CAFS_COLD = "cafs cold (store → cache)"
CAFS_SAME = "cafs warm, same mount (node cache, page caches dropped)"
CAFS_WARM = "cafs warm, new mount (node cache, page caches dropped)"
CAFS_HOT = "cafs hot (page cached)"
FILE = "data/big.bin"


def _write_native(ctx: Context, size: int) -> Path:
    path = ctx.ws.dir("native") / "big.bin"
    entry = images.bigfile_layers(size)[0][1]
    with open(path, "wb") as f:
        for chunk in entry.chunks():
            f.write(chunk)
        os.fsync(f.fileno())
    return path


def _mbps(result: dict[str, float]) -> float:
    return result["bytes"] / result["seconds"] / 1e6


@register("read", "sequential read: cafs cold/warm/hot vs native", tools=("fincore",))
def run(ctx: Context, res: ScenarioResult) -> None:
    size = ctx.sizes.bigfile
    indexed = ctx.indexed("bigfile")
    ctx.step("writing the native copy")
    native = _write_native(ctx, size)
    res.params.update(
        file_bytes=size,
        store=ctx.store_label(indexed.store_url),
        buffer="4 MiB",
        link=ctx.opts.link,
    )
    for i in range(ctx.repeat):
        first_native = i % 2 == 0
        if first_native:
            _native(ctx, res, native, i)
        _cafs(ctx, res, indexed.ref, indexed.store_url, i)
        if not first_native:
            _native(ctx, res, native, i)
        ctx.log(
            f"read repeat {i + 1}: "
            + ", ".join(f"{s.contender} {s.samples[-1]:.0f} MB/s" for s in res.series)
        )
    link = parse_link(ctx.opts.link)
    if link is not None and ctx.opts.store == "s3":
        rate = link.bytes_per_second / 1e6
        for _ in range(ctx.repeat):
            res.add(GROUP, f"link bandwidth ({link.rate}, tbf)", rate, "MB/s", baseline=True)
        res.compare(
            "cafs cold / link bandwidth",
            f"{GROUP}: {CAFS_COLD}",
            f"{GROUP}: link bandwidth ({link.rate}, tbf)",
        )
    res.compare(
        "cafs warm, new mount / native dropped", f"{GROUP}: {CAFS_WARM}", f"{GROUP}: {NATIVE_COLD}"
    )
    res.compare(
        "cafs warm, same mount / native dropped", f"{GROUP}: {CAFS_SAME}", f"{GROUP}: {NATIVE_COLD}"
    )
    res.compare("cafs hot / native hot", f"{GROUP}: {CAFS_HOT}", f"{GROUP}: {NATIVE_HOT}")
    res.compare("cafs cold / native dropped", f"{GROUP}: {CAFS_COLD}", f"{GROUP}: {NATIVE_COLD}")
    for label, key in (("new mount", CAFS_WARM), ("same mount", CAFS_SAME)):
        res.goal(f"cafs warm, {label}, ≥ 1 GB/s", f"{GROUP}: {key}", ">=", 1000)
    for label in ("new mount", "same mount"):
        res.goal(
            f"cafs warm, {label}, ≥ 50% of native (page cache dropped)",
            f"cafs warm, {label} / native dropped",
            ">=",
            0.5,
        )
    res.goal("cafs hot ≈ native hot (≥ 90%)", "cafs hot / native hot", ">=", 0.9)


def _native(ctx: Context, res: ScenarioResult, path: Path, i: int) -> None:
    ctx.step(f"native read {i + 1}/{ctx.repeat}")
    evict(path)
    resident = resident_bytes(path)
    r = run_probe("read", path)
    res.add(GROUP, NATIVE_COLD, _mbps(r), "MB/s", baseline=True, resident_before=resident, **r)
    r = run_probe("read", path)
    res.add(GROUP, NATIVE_HOT, _mbps(r), "MB/s", baseline=True, **r)


def _cafs(ctx: Context, res: ScenarioResult, ref: str, store_url: str, i: int) -> None:
    cache = ctx.cache_dir("read")
    if store_url.startswith("file://"):
        evict(Path(store_url.removeprefix("file://")))
    ctx.step(f"cafs cold read {i + 1}/{ctx.repeat}")
    with ctx.ws.mounted(ref, store_url, cache) as mnt:
        r = run_probe("read", mnt / FILE)
        stats = query(mnt)
        res.add(GROUP, CAFS_COLD, _mbps(r), "MB/s", fetched=stats["demand_bytes"], **r)
        ctx.step(f"cafs warm read, same mount {i + 1}/{ctx.repeat}")
        evict(mnt / FILE, cache)
        resident = resident_bytes(mnt / FILE, cache / "blobs")
        r = run_probe("read", mnt / FILE)
        res.add(GROUP, CAFS_SAME, _mbps(r), "MB/s", resident_before=resident, **r)
    evict(cache)
    resident = resident_bytes(cache / "blobs")
    ctx.step(f"cafs warm read, new mount, and hot read {i + 1}/{ctx.repeat}")
    with ctx.ws.mounted(ref, store_url, cache) as mnt:
        r = run_probe("read", mnt / FILE)
        res.add(GROUP, CAFS_WARM, _mbps(r), "MB/s", resident_before=resident, **r)
        r = run_probe("read", mnt / FILE)
        res.add(GROUP, CAFS_HOT, _mbps(r), "MB/s", stats=query(mnt), **r)
    shutil.rmtree(cache)
