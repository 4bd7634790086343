"""CLI subcommands for startup profiles and model weights: profile, profiles, weights."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from blobstore import open_store
from cafs.cli.mounts import security_options
from cafs.cli.units import mib
from cafs.profile import (
    DEFAULT_NAME,
    build_pack,
    delete_profile,
    list_profiles,
    load_profile,
    save_profile,
)
from cafs.terminal import shown
from indexer.catalog import find_image, load_index
from indexer.weights import listed

# Measured by the pack benchmark (bench/scenarios/pack.py, docs/BENCHMARKS.md): a pack's few
# large range GETs beat one GET per blob for the small files a startup reads.
PACK_BY_DEFAULT = True
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)




def cmd_profile(args: argparse.Namespace) -> int:
    """Run the workload once on a fresh, recording mount, then store (and pack) its profile."""
    from cafs.run.container import run
    from cafs.run.spec import RunOptions, Security

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    opts = RunOptions(command=command, env=args.env or [], workdir=args.workdir,
                      user=args.user, host_network=args.net_host, tty=False,
                      security=Security.parse(args.security_opt or []))
    status = run(args.image, opts, store_url=args.store, remove=True, cache_dir=args.cache_dir,
                 record=args.name, profile=None, prefetch_weights="off",
                 daemon={"settings": getattr(args, "settings", None)})
    store = open_store(args.store)
    index = find_image(store, args.image).index
    profile = load_profile(store, index, args.name)
    if profile is None:
        raise RuntimeError(f"the mount saved no profile {args.name!r} (see its log)")
    if args.pack:
        profile = build_pack(store, profile)
        save_profile(store, profile)
    _summary(profile.to_json(), args.json)
    if status != 0:
        err.print(f"[yellow]note:[/] the workload exited with status {status}; "
                  "the profile records what it read until then")
    return status


def _summary(data: bytes, as_json: bool) -> None:
    obj = json.loads(data)
    blobs = {e["blob"]: e["size"] for e in obj["entries"]}
    summary = {"name": obj["name"], "index": obj["index"], "reads": len(obj["entries"]),
               "blobs": len(blobs), "bytes": sum(blobs.values()),
               "files": len({e["path"] for e in obj["entries"]}),
               "duration_ms": obj["duration_ms"],
               "pack": None if obj["pack"] is None else {
                   "key": obj["pack"]["key"], "bytes": obj["pack"]["size"],
                   "blobs": len(obj["pack"]["blobs"])}}
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    pack = summary["pack"]
    out.print(f"profile [bold]{summary['name']}[/] of index {obj['index'][:16]}…: "
              f"{summary['files']} files, {summary['blobs']} blobs, {mib(summary['bytes'])}"
              f" read in {summary['duration_ms'] / 1000:.2f}s"
              + (f"; pack {pack['key'][:22]}… ({mib(pack['bytes'])})" if pack else ""))


def cmd_profiles(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    index = find_image(store, args.image).index
    if args.delete:
        delete_profile(store, index, args.delete)
        return 0
    if args.pack:
        profile = load_profile(store, index, args.pack)
        if profile is None:
            raise RuntimeError(f"no profile {args.pack!r} for {args.image}")
        save_profile(store, build_pack(store, profile))
        names = [args.pack]
    else:
        names = list_profiles(store, index)
    for name in names:
        profile = load_profile(store, index, name)
        if profile is not None:
            _summary(profile.to_json(), args.json)
    if not names and not args.json:
        out.print(f"{escape(shown(args.image))} has no profiles (record one with cafs profile)")
    return 0


# ------------------------------------------------------------------------------- weights


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                    transient=False)


def cmd_weights_prefetch(args: argparse.Namespace) -> int:
    """Ask the mount to fetch the weights under PATH and follow its progress; off a cafs
    mount, read the files once (which warms the page cache)."""
    from cafs.weights.loader import model_files
    from cafs.weights.reader import mount_of, plan_progress, request_prefetch

    path = Path(args.path)
    if mount_of(path) is None:
        return _read_through(model_files(path))
    queued = request_prefetch([path])
    if not queued:
        out.print(f"{escape(shown(str(path)))}: nothing to prefetch (already cached, or no "
                  "files)")
        return 0
    with _progress() as bar:
        task = bar.add_task(f"prefetch {path.name}", total=None)
        while True:
            done, total, finished = plan_progress(queued)
            bar.update(task, completed=done, total=total or None)
            if finished:
                break
            time.sleep(0.2)
    return 0


def _read_through(files: list[Path]) -> int:
    total = sum(f.stat().st_size for f in files)
    with _progress() as bar:
        task = bar.add_task("read", total=total)
        buf = bytearray(16 << 20)
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    bar.advance(task, n)
    return 0


def cmd_weights_load(args: argparse.Namespace) -> int:
    from cafs.weights.loader import Loader

    with _progress() as bar:
        task = bar.add_task(f"load {Path(args.path).name}", total=None)
        loader = Loader(args.path, args.device, framework=args.framework,
                        direct=not args.no_direct, prefetch=not args.no_prefetch,
                        progress=lambda done, total: bar.update(task, completed=done,
                                                               total=total))
        tensors = loader.load()
    rep = loader.report
    if rep.note:
        err.print(f"[yellow]note:[/] {escape(shown(rep.note))}")
    summary = {"files": rep.files, "tensors": len(tensors), "bytes": rep.bytes,
               "seconds": round(rep.seconds, 3), "bytes_per_s": round(rep.rate),
               "device": rep.device, "direct_bytes": rep.direct_bytes, "note": rep.note}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        direct = f", {mib(rep.direct_bytes)} from the node cache" if rep.direct_bytes else ""
        out.print(f"loaded {len(tensors)} tensors, {mib(rep.bytes)} from {rep.files} files "
                  f"to {rep.device} in {rep.seconds:.2f}s ({mib(rep.rate)}/s{direct})")
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    index = load_index(store, find_image(store, args.image).index)
    files = listed(index.meta)
    if args.json:
        print(json.dumps(files, indent=1))
        return 0
    for f in files:
        tensors = f.get("tensors")  # a count; a list in indexes of weights schema 1
        count = len(tensors) if isinstance(tensors, list) else tensors
        extra = f", {count} tensors" if isinstance(count, int) else ""
        out.print(f"{escape(shown(f['format'])):>12}  {mib(f['size']):>12}  "
                  f"{escape(shown(f['path']))}{extra}")
    if not files:
        out.print(f"{escape(shown(args.image))}: no weight files recognised")
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    from cafs.weights import gpu

    report = gpu.probe_nvml()
    if args.json:
        print(json.dumps({"gpus": [vars(g) for g in report.gpus], "driver": report.driver,
                          "reason": report.reason,
                          "prefetch_parallel": gpu.prefetch_parallel(report)}, indent=1))
    else:
        out.print(report.describe())
    return 0


# ------------------------------------------------------------------------------ parsers


def _store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="blob store URL (default $CAFS_STORE)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("profile", help="record a startup profile: run CMD once on a fresh "
                       "mount, store what it read (and a startup pack)")
    p.add_argument("image")
    p.add_argument("--name", default=DEFAULT_NAME, help="profile name (default: default)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=PACK_BY_DEFAULT,
                   help="also store a startup pack of the profiled blobs")
    p.add_argument("-e", "--env", action="append", help="KEY=VALUE")
    p.add_argument("-w", "--workdir")
    p.add_argument("-u", "--user")
    p.add_argument("--net-host", action="store_true")
    security_options(p)
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--json", action="store_true")
    _store(p)
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("profiles", help="list, pack or delete an image's startup profiles")
    p.add_argument("image")
    p.add_argument("--pack", metavar="NAME", help="(re)build the startup pack of NAME")
    p.add_argument("--delete", metavar="NAME")
    p.add_argument("--json", action="store_true")
    _store(p)
    p.set_defaults(func=cmd_profiles)

    w = sub.add_parser("weights", help="model weights: prefetch, load, list").add_subparsers(
        dest="weights_command", required=True)
    p = w.add_parser("prefetch", help="fetch weight files ahead of a load (progress bar)")
    p.add_argument("path", type=Path, help="a file or model directory, on a cafs mount")
    p.set_defaults(func=cmd_weights_prefetch)
    p = w.add_parser("load", help="load safetensors weights, report time and throughput")
    p.add_argument("path", type=Path, help="a .safetensors file, index JSON or directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--framework", choices=("numpy", "torch"), default=None)
    p.add_argument("--no-direct", action="store_true", help="never read node-cache files")
    p.add_argument("--no-prefetch", action="store_true", help="do not ask the mount first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_weights_load)
    p = w.add_parser("list", help="weight files recognised in an indexed image")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    _store(p)
    p.set_defaults(func=cmd_weights_list)
    p = w.add_parser("gpus", help="what NVML says about this node's GPUs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gpus)

