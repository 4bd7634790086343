"""`make demo`: build a real image, index it into the local store, run a container from it.

Everything is local and offline: the image is a Debian rootfs with python3 made from this
host's own packages, the store is the embedded default (a directory), and the container is
started by `cafs run` (runc over an overlay on the lazy FUSE mount).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from bench.hostimage import host_rootfs_layers, python_config
from bench.imagebuild import build_layout
from cafs.cli.mounts import STATS_HEADING

console = Console(soft_wrap=True)
KiB, MiB = 1 << 10, 1 << 20
PROGRAM = ("import json, platform; "
           "print(json.dumps({'hello': 'from a lazily loaded image', "
           "'python': platform.python_version()}))")


CAFS = [sys.executable, "-m", "cafs"]  # how the demo calls cafs (`--cafs` changes it)


def _cafs(*args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    # Run from the scratch directory, so an installed cafs is what runs, not this checkout's.
    return subprocess.run([*CAFS, *args], text=True, capture_output=capture, check=False,
                          cwd=tempfile.gettempdir())


def _check(res: subprocess.CompletedProcess[str], what: str) -> None:
    if res.returncode != 0:
        console.print(f"[red]{what} failed[/]:\n{res.stderr}")
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__)
    parser.add_argument("--cafs", metavar="CMD",
                        help="the cafs command to demonstrate, e.g. a pip-installed "
                             "`venv/bin/cafs` (default: this Python's `-m cafs`)")
    args = parser.parse_args(argv)
    if args.cafs:
        CAFS[:] = args.cafs.split()
    if os.geteuid() != 0:
        console.print("[red]make demo needs root[/] (FUSE mount, overlay and runc)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="cafs-demo-"))
    try:
        return _demo(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path) -> int:
    console.rule("[bold]1. build an image (Debian + python3, from this host's packages)")
    info = build_layout(work / "layout", "demo", host_rootfs_layers(), config=python_config())
    console.print(f"{len(info.layer_digests)} layers, "
                  f"{info.uncompressed_size / MiB:.1f} MiB of layer tars, manifest "
                  f"{info.manifest_digest[:19]}…")
    spec = f"oci:{work / 'layout'}:demo"
    ref = "localhost/cafs-demo:latest"

    console.rule("[bold]2. cafs index, into the local store")
    for attempt in ("first", "second"):
        res = _cafs("index", spec, "--name", ref, "--json")
        _check(res, "cafs index")
        s = json.loads(res.stdout)
        console.print(f"{attempt} time: {s['blobs']} blobs in the image, "
                      f"{s['blobs_uploaded']} uploaded ({s['uploaded_bytes'] / MiB:.1f} MiB), "
                      f"{s['blobs_present']} already stored; index {s['index_bytes'] / KiB:.0f}"
                      f" KiB for {s['files']} files; {s['seconds']:.2f}s → {s['store']}")
    _check(_cafs("images"), "cafs images")
    console.print(_cafs("images").stdout)

    console.rule("[bold]3. cafs run: a container on the lazy mount (fresh node cache)")
    console.print(f"$ cafs run --rm {ref} -- python3 -c \"{PROGRAM}\"")
    res = _cafs("run", "--rm", "--stats", "--cache-dir", str(work / "cache"), ref, "--",
                "/usr/bin/python3", "-c", PROGRAM)
    print(res.stdout, end="")
    errors, _, stats = res.stderr.partition(STATS_HEADING)
    if res.returncode != 0:  # the error alone: the mount's figures would read like a result
        console.print(f"[red]cafs run failed (exit {res.returncode})[/]:\n{errors.strip()}")
        return 1
    console.rule("[bold]4. what was fetched")
    console.print(stats.partition("\n")[2].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
