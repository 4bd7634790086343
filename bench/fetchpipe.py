"""Where bulk prefetch spends its time: one process's threads vs worker processes.

A diagnostic, not a scenario: it decided that large prefetch plans run in worker processes
(`cafs.daemon.fetchpool`). Against an S3 server on loopback (SeaweedFS, or moto with `--s3-server
moto`) it moves the same blobs five ways, each into an empty node cache, and prints MiB/s
and this process's CPU seconds per GiB: GETs alone from 16 and 64 threads; GET + verify +
cache write from 64 threads; the same from N worker processes; and the daemon's
`Prefetcher` with and without its worker pool.

    python -m bench.fetchpipe [--workers N] [--rounds R] [--s3-server seaweedfs|moto]
                              MIB:COUNT ...   (e.g. 4:256 16:64)
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import trio

from bench.services import S3_SERVERS, environment, start_s3
from blobstore import BlobStore, open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import decode, digest, encode
from cafs.daemon.fetcher import Fetcher
from cafs.daemon.fetchpool import worker_fill, worker_start
from cafs.daemon.prefetch import Plan, Prefetcher, PrefetchPolicy
from cafs.daemon.stats import MountStats


def _put(store: BlobStore, mib: int, count: int) -> list[str]:
    keys = []
    for _ in range(count):
        data = os.urandom(mib << 20)
        keys.append(digest(data))
        store.put(blob_key(keys[-1]), encode(data, compress=False))
    return keys


def _timed(label: str, nbytes: int, fn: Callable[[], object]) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    gib = nbytes / 2**30
    print(f"{label:44s} {gib * 1024 / wall:7.0f} MiB/s   cpu here {cpu / gib:5.2f} s/GiB",
          flush=True)


def _prefetch(store: BlobStore, fresh: Callable[[], NodeCache], keys: list[str], size: int,
              processes: int) -> None:
    cache = fresh()

    async def main() -> None:
        fetcher = Fetcher(store, cache, MountStats())
        prefetcher = Prefetcher(fetcher, store, PrefetchPolicy(processes=processes))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetcher.run)
            status = prefetcher.submit(Plan("bulk", [(k, size) for k in keys], 64))
            while status.state != "done":
                await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
        fetcher.close()
        if status.failed_blobs:
            raise RuntimeError(f"{status.failed_blobs} blobs failed")

    trio.run(main)


def _one_size(store: BlobStore, procs: ProcessPoolExecutor, cache_dir: Path, mib: int,
              count: int, workers: int, rounds: int) -> None:
    keys = _put(store, mib, count)
    nbytes, size, what = count * (mib << 20), mib << 20, f"{mib} MiB x{count}:"

    def fresh() -> NodeCache:
        shutil.rmtree(cache_dir, ignore_errors=True)
        return NodeCache(cache_dir, fsync=False)

    def get(threads: int) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(store.get, map(blob_key, keys)))

    def fill(threads: int) -> None:
        cache = fresh()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda k: cache.insert(k, decode(store.get(blob_key(k)), k)), keys))

    for _ in range(rounds):
        for threads in (16, 64):
            _timed(f"{what} GET only, {threads} threads", nbytes, functools.partial(get, threads))
        _timed(f"{what} GET+verify+write, 64 threads", nbytes, lambda: fill(64))
        fresh()
        _timed(f"{what} GET+verify+write, {workers} processes", nbytes,
               lambda: list(procs.map(worker_fill, keys)))
        for n in (0, workers):
            _timed(f"{what} Prefetcher, {n} processes", nbytes,
                   functools.partial(_prefetch, store, fresh, keys, size, n))


def run(sizes: list[tuple[int, int]], workers: int, rounds: int, work: Path,
        server: str = S3_SERVERS[0]) -> None:
    with start_s3(work, server=server) as s3, environment(s3.environ(work)):
        print(f"S3 server: {s3.server} at {s3.endpoint}")
        store = open_store(s3.store_url("fetchpipe"))
        cache_dir = work / "cache"
        with ProcessPoolExecutor(workers, initializer=worker_start,
                                 initargs=(store.url, str(cache_dir))) as procs:
            list(procs.map(abs, range(4 * workers)))  # every worker started
            for mib, count in sizes:
                _one_size(store, procs, cache_dir, mib, count, workers, rounds)


def _size(text: str) -> tuple[int, int]:
    mib, _, count = text.partition(":")
    try:
        pair = int(mib), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIB:COUNT: {text!r}") from None
    if not (1 <= pair[0] <= 256 and 1 <= pair[1] <= 4096):
        raise argparse.ArgumentTypeError(f"MIB 1-256 and COUNT 1-4096, not {text!r}")
    return pair


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fetchpipe",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("sizes", nargs="*", type=_size, default=[(4, 256), (16, 64)])
    p.add_argument("--workers", type=int, default=16, choices=range(1, 65), metavar="1-64")
    p.add_argument("--rounds", type=int, default=2, choices=range(1, 11), metavar="1-10")
    p.add_argument("--s3-server", choices=S3_SERVERS, default=S3_SERVERS[0])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cafs-fetchpipe-") as work:
        run(args.sizes, args.workers, args.rounds, Path(work), args.s3_server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
