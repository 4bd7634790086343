"""The FUSE protocol's floor for a fresh tree walk, beside cafs and a plain directory.

Builds a synthetic tree (DIRS directories of FILES files each) three ways: on the local disk,
as an image indexed into a `file://` store, and served by `fuse_floor.c`, a minimal
single-threaded libfuse filesystem in C that answers as cafs does (opendir → ENOSYS,
READDIRPLUS, day-long timeouts) and does no other work. Each round walks (os.walk + lstat,
`bench.probe`) the plain tree with the dentry cache dropped, a fresh C mount and a fresh
cafs mount. As root: `python -m bench.floor.run [ROUNDS] [--dirs N] [--files N]`. Needs gcc
and libfuse3-dev (both installed by `make deps`).
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

from bench.imagebuild import Entry, build_layout
from bench.workspace import drop_dentries
from blobstore import open_store
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

DIRS, FILES = 2100, 6  # about the realistic image's 2,100 directories and 15k entries
HERE = Path(__file__).parent


def _walk_ms(path: Path, entries: int) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.probe", "walk", str(path)],
                         check=True, capture_output=True, text=True).stdout
    walk = json.loads(out)
    if walk["entries"] != entries:
        raise RuntimeError(f"{path}: walked {walk['entries']} entries, expected {entries}")
    return round(walk["seconds"] * 1000, 1)


def _trees(work: Path, dirs: int, files: int) -> str:
    entries = []
    for i in range(dirs):
        (work / "plain" / f"d{i:05d}").mkdir(parents=True)
        entries.append(Entry(f"d{i:05d}", "dir"))
        for j in range(files):
            (work / "plain" / f"d{i:05d}" / f"f{j}").write_bytes(b"x" * 100)
            entries.append(Entry(f"d{i:05d}/f{j}", data=b"x" * 100))
    build_layout(work / "layout", "floor", [entries])
    source = open_source(f"oci:{work / 'layout'}:floor")
    return index_image(source, open_store(f"file://{work}/store"), IndexOptions()).record.ref


def main(rounds: int, dirs: int = DIRS, files: int = FILES) -> list[dict[str, float]]:
    """One result per round; the tree is the same for the plain, C and cafs walks."""
    work = Path(tempfile.mkdtemp(prefix="cafs-floor-"))
    results = []
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", str(work / "floor"), str(HERE / "fuse_floor.c"),
                        *flags], check=True)
        ref = _trees(work, dirs, files)
        env = {**os.environ, "FLOOR_DIRS": str(dirs), "FLOOR_FILES": str(files)}
        entries = dirs * (files + 1)
        for _ in range(rounds):
            drop_dentries()
            plain = _walk_ms(work / "plain", entries)
            (work / "c").mkdir(exist_ok=True)
            subprocess.run([str(work / "floor"), str(work / "c"), "-o", "ro"], check=True,
                           env=env)
            try:
                floor = _walk_ms(work / "c", entries)
            finally:
                subprocess.run(["fusermount3", "-u", str(work / "c")], check=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            (work / "m").mkdir(exist_ok=True)
            subprocess.run([sys.executable, "-m", "cafs", "mount", ref, str(work / "m"),
                            "--store", f"file://{work}/store", "--cache-dir",
                            str(work / "cache")], check=True, stdout=subprocess.DEVNULL)
            try:
                cafs = _walk_ms(work / "m", entries)
            finally:
                subprocess.run([sys.executable, "-m", "cafs", "umount", str(work / "m")],
                               check=True)
            results.append({"plain_cold_ms": plain, "c_fuse_ms": floor, "cafs_ms": cafs,
                            "entries": entries})
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("rounds", nargs="?", type=int, default=5, help="walks of each (5)")
    parser.add_argument("--dirs", type=int, default=DIRS, help=f"directories ({DIRS})")
    parser.add_argument("--files", type=int, default=FILES, help=f"files per directory ({FILES})")
    args = parser.parse_args()
    if min(args.rounds, args.dirs, args.files) < 1:
        parser.error("rounds, --dirs and --files must be at least 1")
    if os.geteuid() != 0:
        parser.error("needs root (FUSE mounts, dropping the dentry cache)")
    try:
        main(args.rounds, args.dirs, args.files)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"bench.floor: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
