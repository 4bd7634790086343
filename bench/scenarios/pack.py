"""Startup pack vs blob-by-blob replay of a startup profile (issue #5).

A Python start-up reads hundreds of small files; fetched one GET each, a cold start pays a
store round trip per file. `cafs profile` records them and concatenates their blobs into
one store object, the startup pack, which a replay fetches with a few large range GETs. The
issue asks to measure whether that beats per-blob GETs and to keep the faster default.

The image is N small files (2,000, 2-40 KB each, 41 MiB; `--quick` 300) in one layer,
indexed into the run's S3 server (SeaweedFS, or moto; behind the shaped link with `--link`).
A mount with `record` reads every file once, which saves the profile; the pack is built
from it. Then
each repeat, each from an empty node cache, measures the time from "mounted" until:

- the profile's replay is done, from the pack (the default);
- the profile's replay is done, blob by blob (`--no-pack`: one GET each, 16 in flight);
- a reader has read every file, without a profile (on demand, one file after the other).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.context import Context
from bench.core import ScenarioResult, register
from bench.imagebuild import Entry, build_layout
from bench.workspace import query
from blobstore import open_store
from cafs.profile import build_pack, load_profile, save_profile
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

REF = "bench/pack:latest"
TIME = "time to bring the profile into the node cache"
PACK = "profile replayed from the startup pack (range GETs)"
BLOBS = "profile replayed blob by blob (one GET each)"
DEMAND = "no profile: every file read on demand"


def profile_layers(files: int) -> tuple[list[list[Entry]], list[str], int]:
    """One layer of `files` small files of random bytes (a site-packages' shape): the
    layers, the paths in read order and their total size."""
    rng = np.random.default_rng(1)
    sizes = [int(s) for s in rng.integers(2_000, 40_000, files)]
    paths = [f"usr/lib/python3/site-packages/pkg{n // 50}/mod{n}.py" for n in range(files)]
    layer = [Entry(p, data=rng.bytes(s)) for p, s in zip(paths, sizes, strict=True)]
    return [layer], paths, sum(sizes)


def read_all(root: Path, paths: list[str]) -> None:
    for p in paths:
        (root / p).read_bytes()


def wait_prefetch(mnt: Path, timeout: float = 600) -> dict[str, Any]:
    """The mount's prefetch state once every plan is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = query(mnt, "prefetch")
        if state["state"] == "done":
            return state
        time.sleep(0.005)
    raise TimeoutError(f"prefetch of {mnt} not done after {timeout}s")


def prepare(ctx: Context, files: int) -> tuple[str, list[str], int]:
    """Index the image, record its profile on a mount and build the pack: (store, paths,
    bytes)."""
    layers, paths, size = profile_layers(files)
    layout = ctx.ws.dir("pack-layout")
    build_layout(layout, "pack", layers)
    url = ctx.store_url("pack", "s3")
    store = open_store(url)
    ctx.step(f"cafs index of {files} small files")
    rec = index_image(open_source(f"oci:{layout}:pack"), store, IndexOptions(name=REF)).record
    ctx.step("recording the profile")
    with ctx.ws.mounted(REF, url, ctx.cache_dir("pack-record"), record="default") as mnt:
        read_all(mnt, paths)
    profile = load_profile(store, rec.index)
    if profile is None:
        raise RuntimeError("the recording mount saved no profile")
    save_profile(store, build_pack(store, profile))
    return url, paths, size


def _replay(ctx: Context, res: ScenarioResult, url: str, mode: str, args: list[str]) -> None:
    cache = ctx.cache_dir("pack")
    with ctx.ws.mounted(REF, url, cache, daemon_args=args) as mnt:
        started = time.perf_counter()
        state = wait_prefetch(mnt)
        seconds = time.perf_counter() - started
    plan = state["plans"][0]
    gets = plan["pack_gets"] if mode == PACK else plan["done_blobs"]
    res.add(TIME, mode, seconds, "s", "lower", mode != PACK, gets=gets, plan=plan)
    shutil.rmtree(cache)


def _on_demand(ctx: Context, res: ScenarioResult, url: str, paths: list[str]) -> None:
    cache = ctx.cache_dir("pack")
    with ctx.ws.mounted(REF, url, cache, profile=None) as mnt:
        started = time.perf_counter()
        read_all(mnt, paths)
        seconds = time.perf_counter() - started
        stats = query(mnt)
    res.add(TIME, DEMAND, seconds, "s", "lower", True, blobs=stats["demand_blobs"])
    shutil.rmtree(cache)


@register(
    "pack",
    "startup profile replay: startup pack vs blob by blob vs on demand",
    always_s3=True,
)
def run(ctx: Context, res: ScenarioResult) -> None:
    files = ctx.sizes.profile_files
    url, paths, size = prepare(ctx, files)
    res.params.update(files=files, bytes=size, link=ctx.opts.link, store=ctx.store_label(url))
    for i in range(ctx.repeat):
        ctx.step(f"replays {i + 1}/{ctx.repeat}")
        _replay(ctx, res, url, PACK, [])
        _replay(ctx, res, url, BLOBS, ["--no-pack"])
        _on_demand(ctx, res, url, paths)
    res.compare("pack / blob by blob", f"{TIME}: {PACK}", f"{TIME}: {BLOBS}")
    res.compare("pack / on demand", f"{TIME}: {PACK}", f"{TIME}: {DEMAND}")
    res.goal(
        "startup pack faster than blob by blob (the default is the faster)",
        "pack / blob by blob",
        "<",
        1.0,
    )
