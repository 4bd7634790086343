"""Weights from local files into device memory: the cafs loader vs safetensors vs the link.

The `model` scenario measures a cold start end to end, where the network is the limit. This
one takes the store and the network away, to show what the loader's own path (large
windows read in parallel into reused pinned buffers, asynchronous host-to-device copies
behind them) costs once the bytes are on the node: the model scenario's shards lie on local
disk, and each repeat measures, side by side in a rotating order:

- link: the weight bytes copied host to device from one pinned buffer in 64 MiB copies on
  one stream (torch): the PCIe rate no loader can beat; without CUDA, a copy of the same
  bytes within CPU memory (numpy), the memory bandwidth a CPU load is bound by;
- safetensors: `safetensors.torch.load_file(path, device=...)` file by file (`safetensors.numpy`
  without CUDA), what a model server usually calls;
- cafs loader: `cafs.weights.loader.Loader` on the model directory (plain files: no mount to ask).

The two loaders run twice: with the files page-cached, and with their page cache dropped
(posix_fadvise DONTNEED, checked with fincore where it is installed), which adds the disk.
"""

from __future__ import annotations

import functools
import gc
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.context import Context
from bench.core import ScenarioResult, register
from bench.scenarios.coldstart import read_all
from bench.scenarios.model import Target, load_files, target, write_shards
from bench.workspace import evict, resident_bytes
from cafs.weights.loader import Loader, read_header

MiB = 1 << 20
COPY = 64 * MiB
RATE = "weight bytes / time"
LINK = "link: one pinned buffer to the device, 64 MiB copies"
LINK_CPU = "memory: one buffer copied within CPU memory"
ST = "safetensors load_file"
CAFS = "cafs loader"
HOT, COLD = "page cached", "page cache dropped"


def link_seconds(tgt: Target, nbytes: int) -> float:
    """Seconds to move `nbytes` to where tensors go, with nothing else in the way."""
    if tgt.device == "cpu":
        src = np.ones(nbytes, np.uint8)
        dst = np.zeros_like(src)
        dst.fill(2)  # faulted in: the rate of the copy, not of first touching fresh pages
        started = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - started
    import torch

    src = torch.ones(COPY, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=tgt.device)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for off in range(0, nbytes, COPY):
        n = min(COPY, nbytes - off)
        dst[off : off + n].copy_(src[:n], non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def timed(fn: Callable[[], dict[str, Any]], tgt: Target, tensors: int) -> float:
    started = time.perf_counter()
    got = fn()
    tgt.sync()
    seconds = time.perf_counter() - started
    if len(got) != tensors:
        raise RuntimeError(f"loaded {len(got)} tensors, not {tensors}")
    del got
    gc.collect()
    return seconds


@register(
    "gpuload",
    "weights from local files to device memory: cafs loader vs safetensors",
    needs_root=False,
)
def run(ctx: Context, res: ScenarioResult) -> None:
    tgt = target()
    src = ctx.ws.dir("gpuload-model")
    ctx.step(f"writing {ctx.sizes.model // MiB} MiB of safetensors shards")
    files = write_shards(src, ctx.sizes.model)
    shards = [f for f in files if f.suffix == ".safetensors"]
    headers = [read_header(f) for f in shards]
    nbytes = sum(h.data_bytes for h in headers)
    tensors = sum(len(h.tensors) for h in headers)
    res.params.update(device=tgt.what, weight_bytes=nbytes, shards=len(shards))
    link = LINK if tgt.device != "cpu" else LINK_CPU

    def load(name: str, fn: Callable[[], dict[str, Any]], cached: bool) -> None:
        if cached:
            read_all(src)  # every byte in the page cache
        else:
            evict(src)
            if resident_bytes(*shards) > nbytes // 100:  # -1: no fincore to ask
                raise RuntimeError("the shards stayed in the page cache after DONTNEED")
        seconds = timed(fn, tgt, tensors)
        res.add(
            RATE,
            f"{name}, {HOT if cached else COLD}",
            nbytes / seconds / 1e6,
            "MB/s",
            "higher",
            name == ST,
        )

    def to_link() -> None:
        res.add(RATE, link, nbytes / link_seconds(tgt, nbytes) / 1e6, "MB/s", "higher", True)

    def by_safetensors() -> dict[str, Any]:
        return load_files(shards, tgt)

    def by_cafs() -> dict[str, Any]:
        return Loader(src, tgt.device, direct=False, prefetch=False).load()

    steps: list[tuple[str, Callable[[], None]]] = [(link, to_link)]
    for cached in (True, False):
        steps += [
            (
                f"{ST}, {HOT if cached else COLD}",
                functools.partial(load, ST, by_safetensors, cached),
            ),
            (f"{CAFS}, {HOT if cached else COLD}", functools.partial(load, CAFS, by_cafs, cached)),
        ]
    for i in range(ctx.repeat):
        k = i % len(steps)
        for name, step in steps[k:] + steps[:k]:
            ctx.step(f"{i + 1}/{ctx.repeat}: {name}")
            step()
    for state in (HOT, COLD):
        res.compare(
            f"cafs loader / safetensors, {state}",
            f"{RATE}: {CAFS}, {state}",
            f"{RATE}: {ST}, {state}",
        )
        res.compare(
            f"cafs loader, {state}: fraction of the link",
            f"{RATE}: {CAFS}, {state}",
            f"{RATE}: {link}",
        )
        res.goal(
            f"cafs loader at least as fast as safetensors, {state}",
            f"cafs loader / safetensors, {state}",
            ">=",
            1.0,
        )
    res.notes += [
        f"Tensors loaded into {tgt.what}; {len(shards)} shards, {nbytes / MiB:.0f} MiB.",
        "Rates are weight bytes per second; ratios above 1 mean the cafs loader is faster.",
    ]
    shutil.rmtree(src)


__all__ = ["link_seconds", "run"]
