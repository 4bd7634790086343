"""Model cold start: seconds until N GB of safetensors weights are in memory, from S3.

The model is float32 safetensors shards of 256 MiB (at least four) plus their
`model.safetensors.index.json` (2 GiB in eight shards; `--quick` 96 MiB in four), stored
twice on the run's S3 server (SeaweedFS, or moto; behind the shaped link with `--link`): as
plain objects, and indexed by cafs into a store of its own. Each repeat then measures, side
by side and in a rotating order, from nothing on the node:

- wire only: one GET per file, all files at once, bytes discarded: what a Python client gets
  through this server and link, the measured "link bandwidth";
- wire only, cafs's objects: one GET per blob of the cafs store, as many at once as the
  weight prefetcher runs, bytes discarded: what this server gives cafs's object layout;
- download-then-load, the usual path, with two downloaders: boto3's transfer manager
  (s3transfer, as `aws s3 cp --recursive` uses it: 8 MiB range GETs, 10 in flight across all
  files) and one whole-object GET per file, all files at once; the files go to local disk,
  then `safetensors` loads them (`safetensors.numpy.load_file`, or `safetensors.torch` to the
  GPU). moto reads the whole object for every range GET, which slows the transfer manager
  down with the shard size (an artifact of moto, not of S3 or SeaweedFS): 256 MiB shards
  keep that small;
- cafs: `cafs mount` with weight prefetch, then `cafs.weights.loader.load_safetensors` on the model
  directory (the loader reads node-cache files directly where it can);
- cafs lazy: the same mount without weight prefetch: the loader's own reads fetch on demand;
- cafs, daemon alone: weight prefetch with `--prefetch-processes 0`, to show what the
  worker processes (`cafs.daemon.fetchpool`, used by default on nodes with 4 cores or more) add;
- cafs as a new daemon process: the first contender, but the daemon a new interpreter.

The cafs mounts but the last go through a mount server (bench/mountserver.py), as on a node,
where the snapshotter runs one: each daemon is a fork of a process that has already imported
its code, so a mount does not pay an interpreter's start (~0.65 CPU-s here, a constant per
mount: 0.3 CPU-s per GiB of a 2 GiB model, 0.04 of a 16 GiB one). The last is `cafs mount`
where no server runs; its figure stays beside the others.

Tensors go to GPU memory when torch sees a CUDA device (the loaders then copy to `cuda:0`),
else to CPU memory as numpy arrays; the result says which. cafs times include the mount (its
daemon's start) and begin with an empty node cache; the baselines' boto3 clients are made
before their clock starts. Every time is also shown as weight bytes per second and as a
fraction of the link's bandwidth: the configured `tbf` rate with `--link`, else the measured
wire rate. Each contender's client CPU time is shown per GiB of weights: this process's for
the baselines (download threads and safetensors); for cafs, every process it runs for the
mount (the daemon and all it started: worker processes, their forkserver, live or reaped,
`tree_cpu_seconds`), what the mount server spent meanwhile (the fork), plus the loader
(this process); the raw results also have the daemon's live threads' time by name
(`daemon_threads_cpu_seconds`: its event loop against the worker threads that fetch, hash
and write). Memory is touched and freed
before each contender (`touch_memory`), the same for all.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.context import Context
from bench.core import ScenarioResult, register
from bench.imagebuild import Entry, build_layout
from bench.mountserver import mount_server
from bench.netshape import parse_link
from bench.services import S3
from bench.workspace import (
    cpu_seconds,
    parent_of,
    query,
    thread_cpu_seconds,
    tree_cpu_seconds,
)
from blobstore import open_store
from blobstore.base import BLOB_PREFIX
from blobstore.envelope import MIN_SAVING
from cafs.weights import gpu
from cafs.weights.loader import Loader, read_header
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

MiB = 1 << 20
SHARD_BYTES = 256 * MiB  # moto reads a whole object for every range GET: bigger shards
MIN_SHARDS = 4  # would make the transfer manager's time grow with their square
TENSORS_PER_SHARD = 16
PLAIN = "plain/model"  # key prefix of the plain copy in the bucket
MODEL_DIR = "models/m"  # where the model lies in the cafs image
REF = "bench/model:latest"

TIME = "time until every tensor is in memory"
RATE = "weight bytes / time"
CPU = "client CPU-seconds per GiB of weights (cafs: the daemon and its processes + loader)"
GiB = 1 << 30
TOUCH_BYTES = 3 * GiB  # memory touched and freed before each contender (see `touch_memory`)
WIRE = "wire only: one GET per file, all at once, bytes discarded"
BLOB_WIRE = "wire only, cafs's objects: one GET per blob, as many at once as the prefetcher"
TM = "download (boto3 transfer manager, as aws s3 cp), then safetensors"
GETS = "download (one GET per file, all at once), then safetensors"
CAFS = "cafs mount + weight prefetch + load_safetensors"
LAZY = "cafs mount + load_safetensors, lazy (no weight prefetch)"
ONE = "cafs mount + weight prefetch in the daemon alone (no worker processes) + load"
SPAWNED = "cafs mount as a new daemon process (no mount server) + weight prefetch + load"


@dataclass(frozen=True)
class Model:
    names: list[str]  # files in the model directory: the shards, then the index JSON
    tensors: int
    weight_bytes: int  # tensor bytes a load brings into memory
    file_bytes: int
    store_url: str  # the cafs store
    stored_bytes: int  # cafs blob bytes in the store (zstd where it saves enough)


@dataclass(frozen=True)
class Target:
    """Where tensors go: "cuda:0" with torch and a CUDA device, else "cpu" (numpy)."""

    device: str
    what: str

    def sync(self) -> None:
        """Wait for queued GPU copies: a tensor is in memory only once they ran."""
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize()


def target() -> Target:
    """The GPU path where torch sees CUDA, else CPU memory, saying why."""
    try:
        import torch
    except ImportError:
        return Target("cpu", "CPU memory (numpy arrays): torch is not installed")
    if not torch.cuda.is_available():
        return Target("cpu", "CPU memory (numpy arrays): torch sees no CUDA device")
    name = torch.cuda.get_device_name(0)
    return Target("cuda:0", f"GPU memory, cuda:0 ({name}), torch {torch.__version__}")


# --- the model, stored twice -------------------------------------------------------------------


def write_shards(root: Path, total: int) -> list[Path]:
    """Shards of float32 tensors (random normal: as incompressible as real weights, zstd
    saves ~7%) and the index JSON that names them, as Hugging Face lays a model out."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    shards = max(MIN_SHARDS, total // SHARD_BYTES)
    weight_map: dict[str, str] = {}
    out = []
    floats = total // shards // TENSORS_PER_SHARD // 4
    for i in range(1, shards + 1):
        name = f"model-{i:05}-of-{shards:05}.safetensors"
        tensors = {
            f"layers.{i}.{k}.weight": rng.standard_normal(floats, np.float32).reshape(-1, 256)
            for k in range(TENSORS_PER_SHARD)
        }
        save_file(tensors, str(root / name))
        weight_map.update(dict.fromkeys(tensors, name))
        out.append(root / name)
        del tensors
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return [*out, index]


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(MiB):
            yield data


def _index(ctx: Context, files: list[Path], url: str) -> int:
    """The model as a one-layer image (uncompressed: gzip of 2 GiB would only cost set-up
    time) indexed into the cafs store; returns the bytes stored."""
    parts = MODEL_DIR.split("/")
    entries = [Entry("/".join(parts[: i + 1]), "dir") for i in range(len(parts))]
    entries += [
        Entry(
            f"{MODEL_DIR}/{f.name}",
            size=f.stat().st_size,
            data_source=functools.partial(_chunks, f),
        )
        for f in files
    ]
    layout = ctx.ws.dir("model-layout")
    build_layout(layout, "model", [entries], compression="none")
    result = index_image(
        open_source(f"oci:{layout}:model"),
        open_store(url),
        IndexOptions(name=REF, weights_chunk_size=ctx.opts.weights_chunk_size),
    )
    shutil.rmtree(layout)
    return result.uploads.stored_bytes


def prepare(ctx: Context, s3: S3, total: int) -> Model:
    """Write the shards, upload them as plain objects, index them into cafs, delete them."""
    src = ctx.ws.dir("model-src")
    ctx.step(f"writing {total // MiB} MiB of safetensors shards")
    files = write_shards(src, total)
    ctx.step("uploading the plain copy")
    client = _client(s3)
    for f in files:
        client.upload_file(str(f), s3.bucket, f"{PLAIN}/{f.name}")
    ctx.step("cafs index of the model")
    url = ctx.store_url("model", "s3")
    stored = _index(ctx, files, url)
    headers = [read_header(f) for f in files if f.suffix == ".safetensors"]
    model = Model(
        [f.name for f in files],
        sum(len(h.tensors) for h in headers),
        sum(h.data_bytes for h in headers),
        sum(f.stat().st_size for f in files),
        url,
        stored,
    )
    shutil.rmtree(src)
    return model


def _client(s3: S3, connections: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=s3.endpoint, config=Config(max_pool_connections=connections)
    )


# --- the contenders ----------------------------------------------------------------------------


def _get(client: Any, bucket: str, key: str, dest: Path | None) -> int:
    """One whole-object GET, streamed to `dest` (or discarded); returns bytes received."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    got = 0
    with open(dest, "wb") if dest is not None else contextlib.nullcontext() as f:
        while data := body.read(MiB):
            got += len(data)
            if f is not None:
                f.write(data)
    return got


def wire(s3: S3, model: Model) -> tuple[float, dict[str, Any]]:
    """Seconds to GET every file at once, bytes discarded: the link as a client sees it."""
    client = _client(s3)
    cpu, own = cpu_seconds(s3.pid), time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(model.names)) as pool:
        got = sum(pool.map(lambda n: _get(client, s3.bucket, f"{PLAIN}/{n}", None), model.names))
    seconds = time.perf_counter() - started
    if got != model.file_bytes:
        raise RuntimeError(f"wire GETs returned {got} bytes, not {model.file_bytes}")
    return seconds, {"server_cpu_seconds": cpu_seconds(s3.pid) - cpu,
                     "client_cpu_seconds": time.process_time() - own}


def wire_blobs(s3: S3, model: Model) -> tuple[float, dict[str, Any]]:
    """Seconds to GET every blob of the cafs store, bytes discarded, with the weight
    prefetcher's parallelism: what this server delivers for cafs's object layout (its
    per-request cost shows here, not in the few large GETs of `wire`)."""
    parallel = gpu.prefetch_parallel(gpu.probe())
    client = _client(s3, parallel)
    prefix = model.store_url.removeprefix(f"s3://{s3.bucket}/").rstrip("/") + "/"
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=s3.bucket, Prefix=prefix + BLOB_PREFIX
        )
        for o in page.get("Contents", [])
    ]
    cpu, own = cpu_seconds(s3.pid), time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        got = sum(pool.map(lambda k: _get(client, s3.bucket, k, None), keys))
    seconds = time.perf_counter() - started
    if got != model.stored_bytes:
        raise RuntimeError(f"blob GETs returned {got} bytes, not {model.stored_bytes}")
    return seconds, {
        "objects": len(keys),
        "parallel": parallel,
        "server_cpu_seconds": cpu_seconds(s3.pid) - cpu,
        "client_cpu_seconds": time.process_time() - own,
    }


def download_gets(client: Any, s3: S3, names: list[str], dest: Path) -> None:
    """One whole-object GET per file, all files at once, each streamed to disk."""
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda n: _get(client, s3.bucket, f"{PLAIN}/{n}", dest / n), names))


def download_tm(client: Any, s3: S3, names: list[str], dest: Path) -> None:
    """boto3's transfer manager with its defaults, one manager for all files: what
    `aws s3 cp --recursive` does (8 MiB range GETs, 10 requests in flight)."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    with create_transfer_manager(client, TransferConfig()) as manager:
        futures = [manager.download(s3.bucket, f"{PLAIN}/{n}", str(dest / n)) for n in names]
        for fut in futures:
            fut.result()


Downloader = Callable[[Any, S3, list[str], Path], None]


def load_files(paths: list[Path], tgt: Target) -> dict[str, Any]:
    """What a model server does after a download: safetensors' own loader, file by file."""
    tensors: dict[str, Any] = {}
    for path in paths:
        if tgt.device == "cpu":
            from safetensors.numpy import load_file

            tensors.update(load_file(path))
        else:
            from safetensors.torch import load_file as load_torch

            tensors.update(load_torch(path, device=tgt.device))
    tgt.sync()
    return tensors


def download_then_load(
    ctx: Context, s3: S3, model: Model, tgt: Target, download: Downloader
) -> tuple[float, float, float]:
    """(total seconds, of which downloading, CPU seconds of this process) for
    download-then-safetensors."""
    client = _client(s3)
    dest = ctx.ws.dir("model-download")
    own = time.process_time()
    started = time.perf_counter()
    download(client, s3, model.names, dest)
    fetched = time.perf_counter() - started
    tensors = load_files([dest / n for n in model.names if n.endswith(".safetensors")], tgt)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - own
    _check(tensors, model)
    del tensors
    shutil.rmtree(dest)
    gc.collect()
    return seconds, fetched, cpu


def cafs_load(
    ctx: Context, s3: S3, model: Model, tgt: Target, prefetch: bool, processes: bool = True,
    mount_server: int | None = None,
) -> dict[str, Any]:
    """Mount (empty node cache) and load every tensor with the cafs loader; the details,
    with the CPU time the daemon, the loader (this process) and the S3 server spent.
    `mount_server`: the pid of the mount server the daemon is forked from, as on a node
    (what it spends meanwhile is counted too); None: the daemon is a new process."""
    cache = ctx.cache_dir("model")
    weights = "on" if prefetch else "off"
    server_cpu, own_cpu = cpu_seconds(s3.pid), time.process_time()
    forker_cpu = tree_cpu_seconds(mount_server)
    started = time.perf_counter()
    args = [] if processes else ["--prefetch-processes", "0"]
    with _mount_server_use(mount_server is not None), ctx.ws.mounted(
        REF, model.store_url, cache, prefetch_weights=weights, daemon_args=args
    ) as mnt:
        mounted = time.perf_counter() - started
        daemon_pid = query(mnt, "info").get("pid")
        _check_started(daemon_pid, forked=mount_server is not None)
        start_cpu = tree_cpu_seconds(daemon_pid)  # the daemon's start: imports, the index
        loader = Loader(mnt / MODEL_DIR, tgt.device, prefetch=prefetch)
        tensors = loader.load()
        tgt.sync()
        seconds = time.perf_counter() - started
        stats = query(mnt)
        pool = query(mnt, "prefetch").get("processes") or {}
        cpu = {
            "worker_processes": pool.get("workers", 0),
            "worker_filled_blobs": pool.get("filled_blobs", 0),
            "daemon_cpu_seconds": tree_cpu_seconds(daemon_pid),
            "daemon_threads_cpu_seconds": thread_cpu_seconds(daemon_pid),
            "daemon_start_cpu_seconds": start_cpu,
            "mount_server_cpu_seconds": tree_cpu_seconds(mount_server) - forker_cpu,
            "loader_cpu_seconds": time.process_time() - own_cpu,
            "server_cpu_seconds": cpu_seconds(s3.pid) - server_cpu,
        }
    _check(tensors, model)
    del tensors
    shutil.rmtree(cache)
    gc.collect()
    return {
        "seconds": seconds,
        "mount_seconds": mounted,
        "direct_bytes": loader.report.direct_bytes,
        "loader_note": loader.report.note,
        "stats": stats,
        **cpu,
    }


@contextlib.contextmanager
def _mount_server_use(on: bool) -> Iterator[None]:
    """CAFS_MOUNT_SERVER for the mounts started inside (cafs.mounts.mount reads it)."""
    before = os.environ.get("CAFS_MOUNT_SERVER")
    os.environ["CAFS_MOUNT_SERVER"] = "on" if on else "off"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CAFS_MOUNT_SERVER", None)
        else:
            os.environ["CAFS_MOUNT_SERVER"] = before


def _check_started(daemon_pid: int | None, forked: bool) -> None:
    """The daemon started the way its contender says: one this process spawned is its
    child; one a mount server forked (twice, to detach it) is not."""
    parent = parent_of(daemon_pid) if daemon_pid is not None else None
    if parent is None:
        raise RuntimeError("the mount daemon's pid is unknown or it is gone")
    spawned_here = parent == os.getpid()
    if spawned_here == forked:
        how = "spawned by this process" if spawned_here else "not spawned by this process"
        raise RuntimeError(f"the mount daemon was {how}: not the contender's way to mount")


def _check(tensors: dict[str, Any], model: Model) -> None:
    """Every tensor arrived, whole (bit-identity is tests/test_weights.py's job)."""
    got = sum(int(t.nbytes) for t in tensors.values())
    if len(tensors) != model.tensors or got != model.weight_bytes:
        raise RuntimeError(f"loaded {len(tensors)} tensors, {got} bytes: not the model")


# --- the scenario ------------------------------------------------------------------------------


def touch_memory(nbytes: int = TOUCH_BYTES) -> None:
    """Touch and free memory before a contender: this VM charges system time for the first
    touch of free memory, so without it whoever runs after a free swings 1.6 to 4.8
    CPU-s/GiB (issue #21); the same for every contender."""
    if nbytes > 0:
        block = np.ones(nbytes // 8)
        del block


def _add(
    res: ScenarioResult,
    model: Model,
    name: str,
    seconds: float,
    baseline: bool,
    cpu: float,
    **details: Any,
) -> None:
    res.add(TIME, name, seconds, "s", "lower", baseline, **details)
    res.add(RATE, name, model.weight_bytes / seconds / 1e6, "MB/s", "higher", baseline)
    res.add(CPU, name, cpu / (model.weight_bytes / GiB), "CPU-s/GiB", "lower", baseline)


def _repeat(ctx: Context, res: ScenarioResult, s3: S3, model: Model, tgt: Target, i: int,
            server: int) -> None:
    """One of each contender, in an order rotated by the repeat (no one is always first).
    cafs mounts through the mount server `server` (as a node's snapshotter does), but for
    SPAWNED."""

    def dl(name: str, fn: Downloader) -> Callable[[], None]:
        def go() -> None:
            seconds, fetched, cpu = download_then_load(ctx, s3, model, tgt, fn)
            _add(res, model, name, seconds, True, cpu, download_seconds=fetched)

        return go

    def mine(name: str, prefetch: bool, processes: bool = True) -> Callable[[], None]:
        def go() -> None:
            forker = None if name == SPAWNED else server
            details = cafs_load(ctx, s3, model, tgt, prefetch, processes, forker)
            cpu = sum(details[k] for k in ("daemon_cpu_seconds", "loader_cpu_seconds",
                                           "mount_server_cpu_seconds"))
            _add(res, model, name, details.pop("seconds"), False, cpu, **details)

        return go

    def wire_only() -> None:
        seconds, details = wire(s3, model)
        _add(res, model, WIRE, seconds, True, details["client_cpu_seconds"], **details)

    def wire_objects() -> None:
        seconds, details = wire_blobs(s3, model)
        _add(res, model, BLOB_WIRE, seconds, True, details["client_cpu_seconds"], **details)

    steps = [
        (WIRE, wire_only),
        (BLOB_WIRE, wire_objects),
        (TM, dl(TM, download_tm)),
        (GETS, dl(GETS, download_gets)),
        (CAFS, mine(CAFS, True)),
        (LAZY, mine(LAZY, False)),
        (ONE, mine(ONE, True, processes=False)),
        (SPAWNED, mine(SPAWNED, True)),
    ]
    k = i % len(steps)
    for name, fn in steps[k:] + steps[:k]:
        ctx.step(f"{i + 1}/{ctx.repeat}: {name}")
        touch_memory(min(TOUCH_BYTES, ctx.sizes.model))
        fn()
    ctx.log(
        f"model repeat {i + 1}: "
        + ", ".join(f"{s.contender} {s.samples[-1]:.1f} s" for s in res.series if s.group == TIME)
    )


def _link_rate(ctx: Context, res: ScenarioResult, model: Model) -> str:
    """The link's configured rate as series beside the contenders (shaped links only);
    returns the rate series' key the fractions are taken of."""
    link = parse_link(ctx.opts.link)
    if link is None:
        return f"{RATE}: {WIRE}"
    name = f"link: configured rate ({link.rate}, tbf)"
    for _ in range(ctx.repeat):
        res.add(
            TIME,
            f"{name}, file bytes at that rate",
            model.file_bytes / link.bytes_per_second,
            "s",
            "lower",
            True,
        )
        res.add(RATE, name, link.bytes_per_second / 1e6, "MB/s", "higher", True)
    return f"{RATE}: {name}"


def _judge(res: ScenarioResult, link_key: str, shaped: bool) -> None:
    """Fractions of the link, speed-ups over download-then-load, and the two goals."""
    of = "the link's configured rate" if shaped else "the measured wire rate"
    for short, name in (
        ("cafs, weight prefetch", CAFS),
        ("cafs lazy", LAZY),
        ("download (one GET per file) + load", GETS),
        ("download (transfer manager) + load", TM),
    ):
        res.compare(f"{short}: fraction of {of}", f"{RATE}: {name}", link_key)
    if shaped:
        res.compare(
            "cafs, weight prefetch: fraction of the measured wire rate",
            f"{RATE}: {CAFS}",
            f"{RATE}: {WIRE}",
        )
    res.compare(
        "cafs, weight prefetch: fraction of the wire rate for cafs's objects",
        f"{RATE}: {CAFS}",
        f"{RATE}: {BLOB_WIRE}",
    )
    for short, base in (("transfer manager", TM), ("one GET per file", GETS)):
        res.compare(
            f"time: cafs, weight prefetch / download ({short}) + load",
            f"{TIME}: {CAFS}",
            f"{TIME}: {base}",
        )
    res.compare(
        "time: cafs lazy / download (one GET per file) + load", f"{TIME}: {LAZY}", f"{TIME}: {GETS}"
    )
    res.compare(
        "CPU per GiB: cafs, weight prefetch / download (one GET per file) + load",
        f"{CPU}: {CAFS}",
        f"{CPU}: {GETS}",
    )
    res.compare(
        "CPU per GiB: cafs as a new daemon process / download (one GET per file) + load",
        f"{CPU}: {SPAWNED}",
        f"{CPU}: {GETS}",
    )
    res.compare(
        "time: cafs, weight prefetch / the same in the daemon alone (worker processes' effect)",
        f"{TIME}: {CAFS}",
        f"{TIME}: {ONE}",
    )
    res.goal(
        f"cafs (weight prefetch) ≥ 80% of {of}",
        f"cafs, weight prefetch: fraction of {of}",
        ">=",
        0.8,
    )
    res.goal(
        "cafs (weight prefetch) CPU per GiB ≤ 1.25x download (one GET per file) + load (#21)",
        "CPU per GiB: cafs, weight prefetch / download (one GET per file) + load",
        "<=",
        1.25,
    )
    for short in ("transfer manager", "one GET per file"):
        res.goal(
            f"cafs (weight prefetch) ≥ 2x faster than download ({short}) + load (time ratio ≤ 0.5)",
            f"time: cafs, weight prefetch / download ({short}) + load",
            "<=",
            0.5,
        )


@register(
    "model",
    "model cold start: download-then-load vs the cafs weight loader",
    always_s3=True,
)
def run(ctx: Context, res: ScenarioResult) -> None:
    s3 = ctx.s3()
    tgt = target()
    model = prepare(ctx, s3, ctx.sizes.model)
    res.params.update(
        device=tgt.what,
        link=ctx.opts.link,
        shards=len(model.names) - 1,
        weight_bytes=model.weight_bytes,
        file_bytes=model.file_bytes,
        cafs_stored_bytes=model.stored_bytes,
        store=ctx.store_label("s3:"),
        weights_chunk_mib=ctx.opts.weights_chunk_size >> 20,
    )
    with mount_server() as server:
        for i in range(ctx.repeat):
            _repeat(ctx, res, s3, model, tgt, i, server)
    link_key = _link_rate(ctx, res, model)
    _judge(res, link_key, parse_link(ctx.opts.link) is not None)
    res.notes += [
        f"Tensors loaded into {tgt.what}.",
        "Downloaders: boto3's transfer manager with its defaults, one manager for all files "
        "(8 MiB range GETs, 10 in flight: `aws s3 cp --recursive`); and one whole-object GET "
        "per file, all files at once. Both write to local disk, then safetensors loads.",
        f"cafs blobs in the store: {model.stored_bytes / model.file_bytes:.1%} of the files' "
        f"bytes (zstd where it saves ≥ {MIN_SAVING:.0%}); rates are weight bytes loaded per "
        "second.",
        "cafs times include the mount and start from an empty node cache. cafs mounts go "
        "through a mount server, as a node's snapshotter's do (its CPU time during the mount "
        "counted), but for the contender marked a new daemon process.",
    ]
