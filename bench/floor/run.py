"""The FUSE protocol's floor for a fresh tree walk, beside cafs and a plain directory.

Builds a synthetic tree (DIRS directories of FILES files each) three ways: on the local disk,
as an image indexed into a `file://` store, and served by `fuse_floor.c`, a minimal
single-threaded libfuse filesystem in C that answers as cafs does (opendir → ENOSYS,
READDIRPLUS, day-long timeouts) and does no other work. Each round walks (os.walk + lstat,
`bench.probe`) the plain tree with the dentry cache dropped, a fresh C mount and a fresh
cafs mount. As root: `python -m bench.floor.run [ROUNDS]`. Needs gcc and libfuse3-dev (both
installed by `make deps`).
"""

from __future__ import annotations

import json
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

DIRS, FILES = 2100, 6  # the C filesystem's tree: keep in step with fuse_floor.c
HERE = Path(__file__).parent


def _walk_ms(path: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.probe", "walk", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return round(json.loads(out)["seconds"] * 1000, 1)


def _trees(work: Path) -> str:
    entries = []
    for i in range(DIRS):
        (work / "plain" / f"d{i:05d}").mkdir(parents=True)
        entries.append(Entry(f"d{i:05d}", "dir"))
        for j in range(FILES):
            (work / "plain" / f"d{i:05d}" / f"f{j}").write_bytes(b"x" * 100)
            entries.append(Entry(f"d{i:05d}/f{j}", data=b"x" * 100))
    build_layout(work / "layout", "floor", [entries])
    source = open_source(f"oci:{work / 'layout'}:floor")
    return index_image(source, open_store(f"file://{work}/store"), IndexOptions()).record.ref


def main(rounds: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="cafs-floor-"))
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                               capture_output=True, text=True).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", str(work / "floor"), str(HERE / "fuse_floor.c"),
                        *flags], check=True)
        ref = _trees(work)
        for _ in range(rounds):
            drop_dentries()
            plain = _walk_ms(work / "plain")
            (work / "c").mkdir(exist_ok=True)
            subprocess.run([str(work / "floor"), str(work / "c"), "-o", "ro"], check=True)
            try:
                floor = _walk_ms(work / "c")
            finally:
                subprocess.run(["fusermount3", "-u", str(work / "c")], check=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            (work / "m").mkdir(exist_ok=True)
            subprocess.run([sys.executable, "-m", "cafs", "mount", ref, str(work / "m"),
                            "--store", f"file://{work}/store", "--cache-dir",
                            str(work / "cache")], check=True, stdout=subprocess.DEVNULL)
            try:
                cafs = _walk_ms(work / "m")
            finally:
                subprocess.run([sys.executable, "-m", "cafs", "umount", str(work / "m")],
                               check=True)
            print(json.dumps({"plain_cold_ms": plain, "c_fuse_ms": floor, "cafs_ms": cafs,
                              "entries": DIRS * (FILES + 1)}), flush=True)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
