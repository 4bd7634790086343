"""Background work (readahead, prefetch plans) fails alone: logged and counted, never
propagated into the daemon's nursery, where it would cancel the FUSE loop and detach the
mount. Here with an error no handler expects (a bug, a store raising what it should not)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from bench.imagebuild import Entry, build_layout
from blobstore.cache import NodeCache
from blobstore.envelope import digest, encode
from blobstore.local import LocalStore
from cafs.daemon.fetcher import Fetcher, FetchPolicy
from cafs.daemon.fs import CafsOperations
from cafs.daemon.prefetch import Plan, Prefetcher, PrefetchPolicy
from cafs.daemon.stats import MountStats
from indexer.build import IndexOptions, index_image
from indexer.catalog import load_index
from indexer.sources import open_source

CHUNK = 64 << 10


class BuggyStore(LocalStore):
    """Raises what no store should for the keys in `bad` (a bug, not a StoreError)."""

    bad: set[str] = set()

    def get(self, key: str, limit: int | None = None) -> bytes:
        if key.rsplit("/", 1)[-1] in self.bad:
            raise RuntimeError(f"bug while reading {key}")
        return super().get(key, limit)


def _blobs(store: LocalStore, n: int, tag: bytes) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        data = tag * 100 + bytes([i])
        store.put(f"blobs/{digest(data)[:2]}/{digest(data)}", encode(data))
        out.append((digest(data), len(data)))
    return out


def test_a_failing_plan_is_counted_and_the_next_plan_runs(tmp_path: Path) -> None:
    store = BuggyStore(tmp_path / "store")
    first, second = _blobs(store, 3, b"a"), _blobs(store, 3, b"b")
    BuggyStore.bad = {first[1][0]}
    stats = MountStats()
    fetcher = Fetcher(store, NodeCache(tmp_path / "cache", fsync=False), stats)
    prefetcher = Prefetcher(fetcher, store, PrefetchPolicy())

    async def main() -> None:
        async with trio.open_nursery() as nursery:  # stands for the daemon's
            nursery.start_soon(prefetcher.run)
            prefetcher.submit(Plan("first", first, parallel=1))
            prefetcher.submit(Plan("second", second, parallel=1))
            with trio.fail_after(10):
                while prefetcher.status()["state"] != "done":
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    states = {p["name"]: p["state"] for p in prefetcher.status()["plans"]}
    assert states == {"first": "failed", "second": "done"}
    assert stats.background_errors == 1 and stats.prefetch_blobs >= 3


def test_a_failing_readahead_is_counted_and_the_mount_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"".join(bytes([n]) * CHUNK for n in range(4))  # four distinct chunks
    build_layout(tmp_path / "l", "t", [[Entry("f", data=data)]], compression="none")
    store = BuggyStore(tmp_path / "store")
    key = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store,
                      IndexOptions(chunk_size=CHUNK)).record.index
    index = load_index(store, key)
    ino = index.resolve(b"f")
    assert ino is not None
    chunks = index.chunks(ino)
    BuggyStore.bad = {chunks[1]}
    stats = MountStats()
    ops = CafsOperations(index, Fetcher(store, NodeCache(tmp_path / "cache", fsync=False),
                                        stats, FetchPolicy(deadline=5)), stats,
                         splice=False)  # reads reply with bytes, not a file span
    reads: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:  # stands for the daemon's
            ops.readahead.background = nursery
            reads.append(bytes(await ops.read(ino, 0, CHUNK)))  # reads ahead chunks 1, 2
            with trio.fail_after(10):  # chunk 1's readahead failed, chunk 2's is done
                while ops.fetcher.known(chunks[1]) or not ops.fetcher.known(chunks[2]):
                    await trio.sleep(0.01)
            reads.append(bytes(await ops.read(ino, 3 * CHUNK, CHUNK)))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert reads == [data[:CHUNK], data[3 * CHUNK :]]
    assert stats.background_errors == 1
