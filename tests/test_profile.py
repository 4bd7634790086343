"""Startup profiles: recorded on a real mount, replayed on the next cold start, packed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fuzzing import PROPERTY, decodes_within, mutated_json
from hypothesis import given
from mounts import unmount_quietly

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from blobstore.base import blob_key
from blobstore.cache import NodeCache
from blobstore.envelope import decode, digest, encode
from blobstore.local import LocalStore
from cafs.daemon.fetcher import Fetcher, FetchPolicy
from cafs.daemon.prefetch import Plan, Prefetcher, PrefetchPolicy, _jobs, _Segment, profile_plan
from cafs.daemon.stats import MountStats
from cafs.mounts import mount
from cafs.profile import (
    PackTable,
    Profile,
    ProfileEntry,
    ProfileError,
    build_pack,
    list_profiles,
    load_profile,
    profile_key,
    save_profile,
)
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

MiB = 1 << 20


# ------------------------------------------------------------------------ pure parts


def _profile(blobs: list[tuple[str, int]]) -> Profile:
    entries = [ProfileEntry(k, s, float(n), f"f{n}", 0) for n, (k, s) in enumerate(blobs)]
    return Profile("ab" * 32, "default", 4 * MiB, entries, 12.5)


def test_profile_json_round_trip_and_names() -> None:
    p = _profile([("a" * 64, 10), ("b" * 64, 20), ("a" * 64, 10)])
    p.pack = PackTable("packs/" + "c" * 64, 99, [["a" * 64, 0, 26], ["b" * 64, 26, 36]])
    again = Profile.from_json(p.to_json())
    assert again == p
    assert again.blobs() == [("a" * 64, 10), ("b" * 64, 20)]  # first reads, no repeats
    assert again.total_bytes == 30
    assert profile_key("ab" * 32, "warm-1.x") == f"profiles/{'ab' * 32}/warm-1.x"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ProfileError):
            profile_key("ab" * 32, bad)
    with pytest.raises(ProfileError, match="schema"):
        Profile.from_json(b'{"schema": 2}')
    with pytest.raises(ProfileError):
        Profile.from_json(b"not json")



# ------------------------------------------------------------------ damaged stored profiles


def _valid_profile() -> dict[str, Any]:
    p = _profile([("a" * 64, 10), ("b" * 64, 20), ("c" * 64, 30)])
    p.pack = PackTable("packs/" + "d" * 64, 200, [["a" * 64, 0, 26], ["b" * 64, 26, 36],
                                                  ["c" * 64, 62, 46]])
    obj: dict[str, Any] = json.loads(p.to_json())
    return obj


def _replay_jobs(profile: Profile) -> list[Any]:
    """What a replay would fetch: every range inside the pack, none longer than a segment
    or one envelope."""
    policy = PrefetchPolicy(segment=64)
    plan = profile_plan(profile, policy)
    jobs = _jobs(plan.blobs, plan.pack, policy.segment)
    for job in jobs:
        if isinstance(job, _Segment):
            assert plan.pack is not None
            assert job.offset >= 0 and job.length > 0
            assert job.offset + job.length <= plan.pack.size
        else:
            assert isinstance(job[0], str) and isinstance(job[1], int)
    return jobs


@pytest.mark.parametrize(("path", "value"), [
    (("entries", 0, "size"), "20480"),  # once ended the mount's start-up, two seconds in
    (("entries", 0, "size"), 1 << 63), (("entries", 0, "size"), -1),
    (("entries", 0, "blob"), "../../etc/passwd"), (("entries", 0, "t_ms"), None),
    (("pack", "blobs", 1, 2), 1 << 62),  # a range no store call can allocate
    (("pack", "blobs", 1, 1), 0),  # overlapping the run before it
    (("pack", "size"), 1 << 40), (("pack", "key"), "packs/../refs/x"),
    (("chunk_size", ), 0), (("entries", ), {}), ((), []),
])
def test_a_stored_profile_off_its_format_is_a_profile_error(path: tuple[Any, ...],
                                                             value: Any) -> None:
    obj = _valid_profile()
    target = obj
    for step in path[:-1]:
        target = target[step]
    if path:
        target[path[-1]] = value
    else:
        obj = value
    with pytest.raises(ProfileError, match="unreadable profile"):
        Profile.from_json(json.dumps(obj).encode())


@PROPERTY
@given(mutated_json(_valid_profile()))
def test_any_damaged_profile_is_a_profile_error_or_replays_safely(data: bytes) -> None:
    profile = decodes_within(lambda: Profile.from_json(data), (ProfileError,), 1 << 20)
    if profile is not None:
        _replay_jobs(profile)


def test_load_profile_reads_no_further_than_its_bound(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    profile = Profile.from_json(json.dumps(_valid_profile()).encode())
    save_profile(store, profile)
    assert load_profile(store, profile.index) == profile
    monkeypatch.setattr("cafs.profile.MAX_PROFILE_BYTES", 100)
    with pytest.raises(ProfileError, match="over 100 bytes"):
        load_profile(store, profile.index)
    monkeypatch.undo()
    store.put(profile_key("ef" * 32, "default"), profile.to_json())  # another index's
    with pytest.raises(ProfileError, match="holds the profile"):
        load_profile(store, "ef" * 32)


def test_pack_jobs_split_runs_at_cached_blobs_and_segment_size() -> None:
    table: list[list[object]] = [[f"k{n}", n * 100, 100] for n in range(10)]
    pack = PackTable("packs/p", 1000, table)
    missing = [(f"k{n}", 90) for n in range(10) if n != 4] + [("extra", 5)]
    jobs = _jobs(missing, pack, segment=300)
    segments = [j for j in jobs if isinstance(j, _Segment)]
    assert [(s.offset, s.length) for s in segments] == [(0, 300), (300, 100), (500, 300),
                                                       (800, 200)]
    assert [b[0] for b in segments[0].blobs] == ["k0", "k1", "k2"]
    assert segments[0].blobs[1] == ("k1", 90, 100, 100)  # offset inside the segment
    assert jobs[-1] == ("extra", 5)  # not in the pack: fetched alone


def test_build_pack_holds_the_stored_envelopes_in_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    datas = [os.urandom(1000), b"z" * 5000, os.urandom(10)]
    keys = []
    for data in datas:
        keys.append(digest(data))
        store.put(blob_key(keys[-1]), encode(data))
    profile = build_pack(store, _profile([(k, len(d)) for k, d in zip(keys, datas,
                                                                       strict=True)]))
    assert profile.pack is not None
    pack = store.get(profile.pack.key)
    assert profile.pack.key == "packs/" + digest(pack) and profile.pack.size == len(pack)
    for (key, off, length), data in zip(profile.pack.blobs, datas, strict=True):
        assert pack[off : off + length] == store.get(blob_key(key))
        assert decode(pack[off : off + length], key) == data
    again = build_pack(store, _profile([(k, len(d)) for k, d in zip(keys, datas,
                                                                     strict=True)]))
    assert again.pack == profile.pack  # content-addressed: same profile, same pack


class SlowStore(LocalStore):
    """A store whose every GET takes a while, like a distant S3."""

    delay = 0.05

    def get(self, key: str, limit: int | None = None) -> bytes:
        time.sleep(self.delay)
        return super().get(key, limit)


def test_demand_reads_do_not_queue_behind_a_prefetch(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "store")
    blobs = []
    for n in range(60):
        data = os.urandom(1000) + bytes([n])
        blobs.append((digest(data), len(data)))
        store.put(blob_key(blobs[-1][0]), encode(data))
    wanted = os.urandom(777)
    store.put(blob_key(digest(wanted)), encode(wanted))
    stats = MountStats()
    fetcher = Fetcher(store, NodeCache(tmp_path / "cache", fsync=False), stats,
                      FetchPolicy(net_parallel=4))
    prefetcher = Prefetcher(fetcher, store, PrefetchPolicy())
    waited: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            prefetcher.submit(Plan("profile:slow", blobs, parallel=2))
            nursery.start_soon(prefetcher.run)
            await trio.sleep(0.1)
            started = trio.current_time()
            out = memoryview(bytearray(777))
            async with fetcher.open(digest(wanted), len(wanted)) as blob:
                assert await blob.read_into(0, out) == 777 and out == wanted
            waited.append(trio.current_time() - started)
            assert prefetcher.status()["state"] == "running"  # 60 x 50 ms over 2 slots
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert waited[0] < 0.5, waited  # one GET, not the prefetch queue
    assert stats.demand_blobs == 1 and stats.prefetch_blobs >= 2
    assert prefetcher.status()["plans"][0]["state"] == "cancelled"


class SlowPackStore(LocalStore):
    """Range GETs of a pack take a while, like a distant S3's; GETs of blobs are counted."""

    delay = 0.3

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.blob_gets: list[str] = []

    def get(self, key: str, limit: int | None = None) -> bytes:
        self.blob_gets.append(key)
        return super().get(key, limit)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        time.sleep(self.delay)
        return super().get_range(key, offset, length)


def _packed(tmp_path: Path, n: int) -> tuple[SlowPackStore, Profile, dict[str, bytes]]:
    store = SlowPackStore(tmp_path / "store")
    datas = {}
    for i in range(n):
        data = os.urandom(3000) + bytes([i])
        datas[digest(data)] = data
        store.put(blob_key(digest(data)), encode(data))
    profile = build_pack(store, _profile([(k, len(d)) for k, d in datas.items()]))
    store.blob_gets.clear()
    return store, profile, datas


def _read_during_replay(store: SlowPackStore, profile: Profile, key: str, size: int,
                        tmp_path: Path) -> tuple[bytes, MountStats]:
    """Replay the profile's pack and, while its range GET is in flight, read `key`."""
    stats = MountStats()
    fetcher = Fetcher(store, NodeCache(tmp_path / "cache", fsync=False), stats)
    prefetcher = Prefetcher(fetcher, store, PrefetchPolicy())
    got: list[bytes] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            prefetcher.submit(profile_plan(profile, PrefetchPolicy()))
            nursery.start_soon(prefetcher.run)
            await trio.sleep(0.1)  # the pack's range GET is on its way
            out = memoryview(bytearray(size))
            async with fetcher.open(key, size) as blob:
                got.append(bytes(out[: await blob.read_into(0, out)]))
            nursery.cancel_scope.cancel()

    trio.run(main)
    return got[0], stats


def test_a_miss_on_a_blob_a_pack_replay_is_bringing_waits_for_it(tmp_path: Path) -> None:
    """#20: a reader that outran the profile's replay fetched its blob alone (and the
    neighbours of it): 44 GETs and 6.6 MB more in 2 of 5 profiled cold starts."""
    store, profile, datas = _packed(tmp_path, 20)
    key = list(datas)[7]
    data, stats = _read_during_replay(store, profile, key, len(datas[key]), tmp_path)
    assert data == datas[key]
    assert store.blob_gets == [] and stats.demand_blobs == 0, (store.blob_gets, stats)
    assert stats.cache_hits >= 1  # found adopted, once the segment came


def test_a_reader_waiting_on_a_pack_that_fails_fetches_its_blob_itself(tmp_path: Path) -> None:
    store, profile, datas = _packed(tmp_path, 20)
    assert profile.pack is not None
    (tmp_path / "store" / profile.pack.key).unlink()  # the range GET fails: promises end
    key = list(datas)[3]
    data, _ = _read_during_replay(store, profile, key, len(datas[key]), tmp_path)
    assert data == datas[key]
    assert blob_key(key) in store.blob_gets


# ------------------------------------------------------------------------ real mounts

@contextlib.contextmanager
def mounted(source: str, mnt: Path, store_url: str, cache_dir: Path,
            **options: Any) -> Iterator[Path]:
    """tests/mounts.py's helper, with the prefetch options of `mount_detached`."""
    mnt.mkdir(parents=True, exist_ok=True)
    mount.mount_detached(source, mnt, store_url=store_url, cache_dir=cache_dir,
                         log_file=mnt.parent / f"{mnt.name}.log", **options)
    try:
        yield mnt
    finally:
        unmount_quietly(mnt)


def _image(tmp_path: Path, store_url: str) -> tuple[str, str]:
    files = [Entry(f"app/lib{n}.py", data=os.urandom(20_000 + n)) for n in range(40)]
    files += [Entry("app/big.bin", data=os.urandom(10 * MiB + 3)),
              Entry("app/unused", data=os.urandom(300_000))]
    build_layout(tmp_path / "l", "t", [files], compression="none")
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(store_url),
                      IndexOptions()).record
    return rec.ref, rec.index


def _workload(mnt: Path) -> None:
    for n in range(0, 40, 3):
        (mnt / f"app/lib{n}.py").read_bytes()
    with open(mnt / "app/big.bin", "rb") as f:
        f.seek(6 * MiB)
        f.read(4096)


def _wait_prefetched(mnt: Path, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = mount.query(mnt, "prefetch")
        if state["state"] == "done":
            return state
        time.sleep(0.05)
    raise AssertionError(f"prefetch not done: {state}")


def _record(ref: str, url: str, tmp_path: Path) -> Profile:
    with mounted(ref, tmp_path / "rec", url, tmp_path / "cache-rec", record="default") as mnt:
        _workload(mnt)
    store = open_store(url)
    from indexer.catalog import find_image

    profile = load_profile(store, find_image(store, ref).index)
    assert profile is not None
    return profile


@pytest.mark.root
@pytest.mark.parametrize("pack", [True, False], ids=["pack", "blobs"])
def test_replayed_profile_leaves_no_demand_fetches(store_url: str, pack: bool,
                                                  tmp_path: Path) -> None:
    ref, index = _image(tmp_path, store_url)
    store = open_store(store_url)
    indexes_before = sorted(store.list("indexes/"))
    profile = _record(ref, store_url, tmp_path)
    assert [e.path for e in profile.entries][:2] == ["app/lib0.py", "app/lib3.py"]
    recorded = [(e.path, e.chunk) for e in profile.entries]
    assert ("app/big.bin", 1) in recorded, f"{recorded}\n{(tmp_path / 'rec.log').read_text()}"
    assert "app/unused" not in {e.path for e in profile.entries}
    assert sorted(store.list("indexes/")) == indexes_before  # the index never changes
    if pack:
        save_profile(store, build_pack(store, profile))
    args = [] if pack else ["--no-pack"]
    with mounted(ref, tmp_path / "cold", store_url, tmp_path / "cache-cold",
                 daemon_args=args) as mnt:
        state = _wait_prefetched(mnt)
        (plan,) = state["plans"]
        assert plan["mode"] == ("pack" if pack else "blobs")
        assert plan["done_blobs"] == len(profile.blobs()) and plan["failed_blobs"] == 0
        assert plan["done_bytes"] == profile.total_bytes
        if pack:
            assert 1 <= plan["pack_gets"] <= 3
        _workload(mnt)
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 0, stats
        # The plan fetched exactly the profile (checked above); the workload's read in the
        # second half of a chunk may add a readahead of the next one, also a prefetch.
        assert stats["prefetch_blobs"] >= len(profile.blobs())
        assert stats["prefetch_bytes"] >= profile.total_bytes
    with mounted(ref, tmp_path / "none", store_url, tmp_path / "cache-none",
                 profile=None) as mnt:
        _workload(mnt)
        stats = mount.query(mnt)
        assert stats["prefetch"]["plans"] == [] and stats["demand_blobs"] > 0
    assert list_profiles(store, index) == ["default"]


@pytest.mark.root
def test_a_corrupt_pack_falls_back_to_blob_by_blob(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    ref, _ = _image(tmp_path, url)
    store = open_store(url)
    profile = build_pack(store, _record(ref, url, tmp_path))
    save_profile(store, profile)
    assert profile.pack is not None
    path = tmp_path / "store" / profile.pack.key
    raw = bytearray(path.read_bytes())
    raw[profile.pack.blobs[1][1] + 20] ^= 0xFF  # damage the second blob's payload
    path.write_bytes(bytes(raw))
    with mounted(ref, tmp_path / "cold", url, tmp_path / "cache-cold") as mnt:
        _wait_prefetched(mnt)
        _workload(mnt)
        stats = mount.query(mnt)
        assert stats["corrupt_blobs"] == 1 and stats["demand_blobs"] == 0, stats
        # Every profiled blob came in by prefetch (the damaged one refetched alone); the
        # workload's read late in a chunk may add a readahead of the next one, a prefetch too.
        assert stats["prefetch_blobs"] >= len(profile.blobs())


@pytest.mark.root
def test_save_profile_on_request_stops_recording(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    ref, index = _image(tmp_path, url)
    with mounted(ref, tmp_path / "rec", url, tmp_path / "cache", record="startup") as mnt:
        (mnt / "app/lib1.py").read_bytes()
        answer = mount.query(mnt, "save-profile")
        assert answer["saved"] == profile_key(index, "startup") and answer["entries"] == 1
        (mnt / "app/lib2.py").read_bytes()  # after the start: not in the profile
    profile = load_profile(open_store(url), index, "startup")
    assert profile is not None and [e.path for e in profile.entries] == ["app/lib1.py"]
    with (mounted(ref, tmp_path / "plain", url, tmp_path / "cache") as mnt,
          pytest.raises(mount.MountError, match="not recording a profile")):
        mount.query(mnt, "save-profile")


def _busybox(tmp_path: Path, url: str) -> str:
    layers = [[Entry.from_host("bin/busybox", "/bin/busybox", mode=0o755),
               Entry("bin/sh", "symlink", linkname="busybox"),
               Entry("data/a", data=os.urandom(100_000)), Entry("data/b", data=os.urandom(5000)),
               Entry("data/c", data=os.urandom(70_000))]]
    config = {"Cmd": ["/bin/sh", "-c", "cat /data/a >/dev/null"]}
    build_layout(tmp_path / "bb", "t", layers, config=config)
    return index_image(open_source(f"oci:{tmp_path / 'bb'}:t"), open_store(url),
                       IndexOptions()).record.ref


def _cafs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cafs", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.root
def test_cafs_profile_then_cafs_run_replays_it(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    ref = _busybox(tmp_path, url)
    res = _cafs("profile", "--store", url, "--cache-dir", str(tmp_path / "c1"), "--json", ref,
                "--", "/bin/sh", "-c", "cat /data/a /data/b > /dev/null")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["name"] == "default" and summary["pack"]["blobs"] == summary["blobs"]
    store = open_store(url)
    from indexer.catalog import find_image

    profile = load_profile(store, find_image(store, ref).index)
    assert profile is not None
    paths = {e.path for e in profile.entries}
    assert {"bin/busybox", "data/a", "data/b"} <= paths and "data/c" not in paths
    listed = _cafs("profiles", ref, "--store", url, "--json")
    assert json.loads(listed.stdout)["blobs"] == summary["blobs"]
    run = _cafs("run", "--rm", "--stats", "--store", url, "--cache-dir", str(tmp_path / "c2"),
                ref)
    assert run.returncode == 0, run.stderr
    assert "profile:default done" in run.stderr
    prefetched = run.stderr.split("prefetched:")[1].split("(")[1].split()[0]
    assert int(prefetched) >= 1  # the container may race the replay for the first blob
