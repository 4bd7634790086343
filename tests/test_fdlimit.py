"""File descriptors: a daemon raises its limit, sizes its fd cache from it, and treats
running out (EMFILE) as pressure on that cache, never as EIO.

Under a login shell's usual `ulimit -n 1024` a daemon that kept up to 1,024 cache files open
answered a third of 1,500 small-file reads with EIO, and kept failing on retry."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounts import unmount_quietly

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs.daemon.fdlimit import cache_size, grow_table, table_size
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

FILES = 1500

# Reads 300 blobs through a Fetcher whose fd cache (1,024) is larger than the process may
# open (soft = hard = 96): every open past the limit must shed idle fds and succeed.
_READER = """
import json, os, sys, trio
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from blobstore.local import LocalStore
from cafs.daemon.fetcher import Fetcher, FetchPolicy
from cafs.daemon.stats import MountStats
root = sys.argv[1]
store = LocalStore(root + "/store")
blobs = []
for n in range(300):
    data = b"blob %d " % n * 50
    blobs.append((digest(data), data))
    store.put(f"blobs/{blobs[-1][0][:2]}/{blobs[-1][0]}", encode(data))
stats = MountStats()
fetcher = Fetcher(store, NodeCache(root + "/cache", fsync=False), stats,
                  FetchPolicy(max_open=1024, deadline=10))
async def main():
    bad = 0
    for key, data in blobs:
        try:
            out = memoryview(bytearray(len(data)))
            async with fetcher.open(key, len(data)) as blob:
                bad += out[: await blob.read_into(0, out)] != data
        except Exception as exc:
            print("read failed:", repr(exc), file=sys.stderr)
            bad += 1
    return bad
bad = trio.run(main)
fds = len(os.listdir("/proc/self/fd"))
print(json.dumps({"bad": bad, "pressure": stats.fd_pressure, "open": fds}))
"""


def _limit_fds(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_running_out_of_fds_sheds_cached_fds_instead_of_failing_reads(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _READER, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: _limit_fds(96, 96),
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bad"] == 0, proc.stderr[-2000:]
    assert result["pressure"] > 0 and result["open"] <= 96


def test_the_fd_cache_is_sized_from_the_limit() -> None:
    assert cache_size(1024) == 512 and cache_size(256) == 128
    assert cache_size(1 << 20) == 1024 and cache_size(8) == 16


# A fresh process grows its fd table to 2,048 (or its soft limit) and keeps every fd it had.
_GROWER = """
import json, os
from cafs.daemon.fdlimit import grow_table, table_size
before = table_size()
keep = os.open(os.devnull, os.O_RDONLY)
after = grow_table(2048)
print(json.dumps({"before": before, "after": after, "kept": os.fstat(keep).st_size == 0,
                  "open": len(os.listdir("/proc/self/fd"))}))
"""


@pytest.mark.parametrize("soft", [4096, 300])
def test_the_fd_table_is_grown_at_start_not_while_threads_open_files(soft: int) -> None:
    """Growing it later, with threads, waits out an RCU grace period per doubling while
    every opening thread sleeps (fdlimit.grow_table); the limit caps the growth."""
    proc = subprocess.run([sys.executable, "-c", _GROWER], capture_output=True, text=True,
                          timeout=60, preexec_fn=lambda: _limit_fds(soft, soft),
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before"] < 300 and result["kept"]
    assert min(2048, soft) <= result["after"] <= 2 * min(2048, soft)
    assert result["open"] < 10  # the probe and its duplicate are closed again
    assert grow_table(16) == table_size() >= 16  # nothing to grow: no error


@contextlib.contextmanager
def _mounted_under(soft: int, hard: int, source: str, mnt: Path, url: str,
                   cache: Path) -> Iterator[Path]:
    """`cafs mount` run under `prlimit --nofile=SOFT:HARD`: its daemon inherits that limit
    (as it would a login shell's `ulimit -n`)."""
    mnt.mkdir()
    cmd = ["prlimit", f"--nofile={soft}:{hard}", "--", sys.executable, "-m", "cafs", "mount",
           source, str(mnt), "--store", url, "--cache-dir", str(cache), "-q"]
    env = {**os.environ, "CAFS_MOUNT_SERVER": "off",  # the daemon is that command's child
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    subprocess.run(cmd, check=True, timeout=120, env=env)
    try:
        yield mnt
    finally:
        unmount_quietly(mnt)


@pytest.mark.root
@pytest.mark.parametrize("hard", [None, 256], ids=["soft-256", "soft-and-hard-256"])
def test_1500_small_files_all_read_under_a_low_fd_limit(tmp_path: Path,
                                                         hard: int | None) -> None:
    """Soft 256 with a higher hard limit: the daemon raises it. Both 256: the fd cache fits
    in half of it."""
    files = {f"d{n % 10}/f{n}": b"small file %d\n" % n * (1 + n % 7) for n in range(FILES)}
    build_layout(tmp_path / "l", "t", [[Entry(p, data=d) for p, d in files.items()]],
                 compression="none")
    url = f"file://{tmp_path}/store"
    key = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                      IndexOptions()).record.index
    top = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard
    with _mounted_under(256, top, f"index:{key}", tmp_path / "mnt", url,
                        tmp_path / "cache") as mnt:
        failed = []
        for path, data in files.items():
            try:
                if (mnt / path).read_bytes() != data:
                    failed.append(f"{path}: wrong bytes")
            except OSError as exc:
                failed.append(f"{path}: {exc}")
        assert failed == [], f"{len(failed)} of {FILES} reads failed: {failed[:3]}"
        assert mount.query(mnt)["eio"] == 0
        pid = mount.daemon_pid(mnt)
        assert pid is not None
        soft_now = int(Path(f"/proc/{pid}/limits").read_text().split("Max open files")[1]
                       .split()[0])
        assert soft_now == top  # raised to the hard limit
