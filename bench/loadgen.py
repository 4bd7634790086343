"""Load: many mounts on one node and many concurrent readers, watching daemons' memory and
file descriptors. Used by the CI load test (seconds) and the benchmark suite (minutes)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cafs.mounts import mount


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_kib: dict[int, int]  # pid -> resident set
    fds: dict[int, int]  # pid -> open file descriptors


@dataclass
class LoadResult:
    mounts: int
    readers: int
    seconds: float
    reads: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def growth(self) -> tuple[float, int]:
        """(worst RSS growth ratio, worst fd growth) of any daemon, from half-time to the
        end: the first half is warm-up (each daemon opens a cache fd per blob it serves)."""
        first, last = self.samples[len(self.samples) // 2], self.samples[-1]
        rss = max(last.rss_kib[p] / first.rss_kib[p] for p in first.rss_kib if p in last.rss_kib)
        fds = max(last.fds[p] - first.fds[p] for p in first.fds if p in last.fds)
        return rss, fds


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(pids: list[int], start: float) -> Sample:
    return Sample(time.monotonic() - start, {p: _rss_kib(p) for p in pids},
                  {p: len(os.listdir(f"/proc/{p}/fd")) for p in pids})


@contextmanager
def many_mounts(source: str, base: Path, count: int, store_url: str,
                cache_dir: Path) -> Iterator[list[Path]]:
    with ExitStack() as stack:
        mnts = []
        for n in range(count):
            mnt = base / f"m{n:02}"
            mnt.mkdir(parents=True, exist_ok=True)
            mount.mount_detached(source, mnt, store_url=store_url, cache_dir=cache_dir,
                                 log_file=base / f"m{n:02}.log")
            stack.callback(mount.unmount, mnt)
            mnts.append(mnt)
        yield mnts


def run_load(mnts: list[Path], files: list[str], readers: int, seconds: float,
             sample_every: float = 1.0) -> LoadResult:
    pids = [p for p in (mount.daemon_pid(m) for m in mnts) if p is not None]
    result = LoadResult(len(mnts), readers, seconds)
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    start = time.monotonic()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        reads = nbytes = 0
        while time.monotonic() < stop:
            path = rng.choice(mnts) / rng.choice(files)
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek(rng.randrange(max(1, os.fstat(f.fileno()).st_size)))
                    nbytes += len(f.read(1 << 20))
                reads += 1
            except OSError as exc:
                with lock:
                    result.errors.append(f"{path}: {exc}")
        with lock:
            result.reads += reads
            result.bytes += nbytes

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(readers)]
    for t in threads:
        t.start()
    while time.monotonic() < stop:
        result.samples.append(sample(pids, start))
        time.sleep(sample_every)
    for t in threads:
        t.join()
    result.samples.append(sample(pids, start))
    return result
