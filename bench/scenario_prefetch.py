"""Measurements for prefetch: startup pack vs blob-by-blob replay, and model cold start.

Standalone functions (the bench suite can wrap them as scenarios):

- `measure_pack`: an image of many small files (a Python startup's shape), profiled once;
  then, each repeat on a fresh node cache, the time a cold mount needs to bring the whole
  profile in, replayed from the startup pack (range GETs) and blob by blob (one GET each),
  beside reading the same files on demand with no profile.
- `measure_model`: N MiB of safetensors shards; time until every tensor is in CPU memory,
  for "download the files from S3 (boto3's transfer manager, as `aws s3 cp` does), then
  `safetensors.numpy.load_file`" and for "cafs mount with weight prefetch, then
  `cafs.weights.load_safetensors`" (and lazily, without weight prefetch).

Both run against moto's S3 server, on loopback or behind a shaped link (`bench.netshape`:
"1gbit:10ms"). `python -m bench.scenario_prefetch pack|model [--link L] [--mib N]` prints
JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.imagebuild import Entry, build_layout
from bench.netshape import delay_proxy, namespace, parse_link
from bench.services import S3, environment, free_port, start_s3
from blobstore import open_store
from cafs import mount
from cafs.profile import build_pack, load_profile, save_profile
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

MiB = 1 << 20
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@contextlib.contextmanager
def s3_server(workdir: Path, link: str) -> Iterator[S3]:
    """moto on loopback, or inside a namespace behind a shaped link, with the environment
    pointing boto3 (here and in mount daemons) at it."""
    shaped = parse_link(link)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if shaped is None:
            s3 = stack.enter_context(start_s3(workdir))
        else:
            ns = stack.enter_context(namespace(shaped))
            inner = stack.enter_context(start_s3(workdir, ns.ns_ip, ns.wrap))
            port = free_port()
            target = int(inner.endpoint.rsplit(":", 1)[1])
            stack.enter_context(delay_proxy(port, ns.ns_ip, target, shaped.delay_ms))
            s3 = replace(inner, endpoint=f"http://127.0.0.1:{port}")
        stack.enter_context(environment(s3.environ(workdir), unset=AWS_UNSET))
        yield s3


@contextlib.contextmanager
def _mounted(ref: str, mnt: Path, url: str, cache: Path, **options: Any) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    mount.mount_detached(ref, mnt, store_url=url, cache_dir=cache,
                         log_file=mnt.parent / f"{mnt.name}.log", **options)
    try:
        yield mnt
    finally:
        mount.unmount(mnt)


def _wait_prefetch(mnt: Path, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = mount.query(mnt, "prefetch")
        if state["state"] == "done":
            return state
        time.sleep(0.005)
    raise TimeoutError(f"prefetch of {mnt} not done after {timeout}s")


def _index(layers: list[list[Entry]], work: Path, url: str) -> tuple[str, str]:
    build_layout(work / "layout", "t", layers, compression="gzip")
    rec = index_image(open_source(f"oci:{work / 'layout'}:t"), open_store(url),
                      IndexOptions()).record
    return rec.ref, rec.index


# ---------------------------------------------------------------------------- the pack


def _read_all(root: Path, paths: list[str]) -> None:
    for p in paths:
        (root / p).read_bytes()


def measure_pack(link: str = "loopback", files: int = 2000, repeats: int = 3,
                 workdir: Path | None = None) -> dict[str, Any]:
    """Cold replay time of a profile of `files` small files: pack vs blob by blob."""
    rng = np.random.default_rng(1)
    sizes = [int(s) for s in rng.integers(2_000, 40_000, files)]
    paths = [f"usr/lib/python3/site-packages/pkg{n // 50}/mod{n}.py" for n in range(files)]
    layers = [[Entry(p, data=rng.bytes(s)) for p, s in zip(paths, sizes, strict=True)]]
    with _workdir(workdir) as work, s3_server(work / "s3", link) as s3:
        url = s3.store_url("pack")
        ref, index = _index(layers, work, url)
        with _mounted(ref, work / "rec", url, work / "cache-rec", record="default") as mnt:
            _read_all(mnt, paths)
        store = open_store(url)
        profile = load_profile(store, index)
        assert profile is not None
        save_profile(store, build_pack(store, profile))
        out: dict[str, Any] = {"link": link, "files": files, "bytes": sum(sizes),
                               "pack": [], "blobs": [], "on_demand": []}
        for n in range(repeats):
            for mode, args in (("pack", []), ("blobs", ["--no-pack"])):
                with _mounted(ref, work / f"m-{mode}-{n}", url, work / f"c-{mode}-{n}",
                              daemon_args=args) as mnt:
                    started = time.perf_counter()
                    state = _wait_prefetch(mnt)
                    out[mode].append(round(time.perf_counter() - started, 3))
                    out[f"{mode}_gets"] = state["plans"][0]["pack_gets"] or len(sizes)
            with _mounted(ref, work / f"m-lazy-{n}", url, work / f"c-lazy-{n}",
                          profile=None) as mnt:
                started = time.perf_counter()
                _read_all(mnt, paths)
                out["on_demand"].append(round(time.perf_counter() - started, 3))
        return out


# ---------------------------------------------------------------------------- the model


def _model_files(root: Path, total: int, shards: int) -> list[Path]:
    """Shards of float32 tensors (incompressible, like real weights) and an index JSON."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    weight_map, out = {}, []
    per_shard = total // shards
    for i in range(1, shards + 1):
        name = f"model-{i:05}-of-{shards:05}.safetensors"
        tensors = {f"layers.{i}.{k}.weight": rng.standard_normal(
            per_shard // 16 // 4, dtype=np.float32).reshape(-1, 256) for k in range(16)}
        save_file(tensors, str(root / name))
        weight_map.update({k: name for k in tensors})
        out.append(root / name)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def _download(s3: S3, key: str, dest: Path, ranged: bool) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    if ranged:  # boto3's transfer manager: 8 MiB ranges, 10 threads (as `aws s3 cp`)
        client.download_file(s3.bucket, key, str(dest), Config=TransferConfig())
        return
    body = client.get_object(Bucket=s3.bucket, Key=key)["Body"]
    with open(dest, "wb") as f:
        while data := body.read(MiB):
            f.write(data)


def _download_then_load(s3: S3, bucket_prefix: str, names: list[str], dest: Path,
                        ranged: bool) -> float:
    """The usual path: copy the files down (all files at once), then safetensors."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.numpy import load_file

    started = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(names)) as pool:
        for fut in [pool.submit(_download, s3, f"{bucket_prefix}/{n}", dest / n, ranged)
                    for n in names]:
            fut.result()
    tensors: dict[str, Any] = {}
    for name in names:
        if name.endswith(".safetensors"):
            tensors.update({k: np.array(v) for k, v in load_file(dest / name).items()})
    return time.perf_counter() - started


def measure_model(link: str = "loopback", mib: int = 1024, shards: int = 4,
                  repeats: int = 2, workdir: Path | None = None) -> dict[str, Any]:
    """Seconds until `mib` MiB of safetensors weights are in CPU memory."""
    from cafs.weights import Loader

    with _workdir(workdir) as work, s3_server(work / "s3", link) as s3:
        src = work / "src" / "model"
        files = [*_model_files(src, mib * MiB, shards), src / "model.safetensors.index.json"]
        import boto3

        client = boto3.client("s3", endpoint_url=s3.endpoint)
        for f in files:
            client.upload_file(str(f), s3.bucket, f"plain/model/{f.name}")
        url = s3.store_url("cafs")
        entries = [Entry(f"models/m/{f.name}", size=f.stat().st_size,
                         data_source=functools.partial(_chunks, f)) for f in files]
        ref, _ = _index([entries], work, url)
        shutil.rmtree(work / "src")
        out: dict[str, Any] = {"link": link, "mib": mib, "shards": shards,
                               "download_then_safetensors": [],
                               "get_whole_files_then_safetensors": [], "cafs_prefetch_load": [],
                               "cafs_lazy_load": [], "cafs_direct_mib": []}
        for n in range(repeats):
            for key, ranged in (("download_then_safetensors", True),
                                ("get_whole_files_then_safetensors", False)):
                out[key].append(round(_download_then_load(
                    s3, "plain/model", [f.name for f in files], work / f"dl-{n}", ranged), 3))
                shutil.rmtree(work / f"dl-{n}")
            for key, weights in (("cafs_prefetch_load", "on"), ("cafs_lazy_load", "off")):
                started = time.perf_counter()
                with _mounted(ref, work / f"m-{key}-{n}", url, work / f"c-{key}-{n}",
                              prefetch_weights=weights) as mnt:
                    loader = Loader(mnt / "models/m", prefetch=weights == "on")
                    loader.load()
                    out[key].append(round(time.perf_counter() - started, 3))
                    if weights == "on":
                        out["cafs_direct_mib"].append(loader.report.direct_bytes // MiB)
                shutil.rmtree(work / f"c-{key}-{n}")
        return out


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(MiB):
            yield data


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    path = Path(tempfile.mkdtemp(prefix="cafs-prefetch-bench-"))
    env = {"CAFS_RUN_DIR": str(path / "run"), "CAFS_LOG_DIR": str(path / "log")}
    try:
        with environment(env):
            yield path
    finally:
        for m in reversed(mount.mountinfo.mounts()):
            if m.mountpoint.startswith(str(path)):
                os.system(f"umount -l {m.mountpoint}")
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scenario_prefetch")
    p.add_argument("what", choices=("pack", "model"))
    p.add_argument("--link", default="loopback", help="loopback or RATE:RTT, e.g. 1gbit:10ms")
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.what == "pack":
        result = measure_pack(args.link, args.files, args.repeats)
    else:
        result = measure_model(args.link, args.mib, repeats=args.repeats)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
