"""`cafs mount`: the mounted tree is the image, exactly; content is lazy, verified, cached."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from images import NINE_MIB
from mounts import log_of, mounted
from reference import Tree, compare_trees, snapshot_tree

from bench.imagebuild import Entry, ImageInfo, build_layout
from bench.workspace import evict
from blobstore import open_store
from blobstore.base import blob_key
from cafs.cli.app import main as cafs
from cafs.daemon import kernelmeta
from cafs.mounts import mount, mountinfo
from indexer.build import IndexOptions, index_image
from indexer.catalog import erofs_key, find_image, load_erofs, load_index
from indexer.sources import open_source

pytestmark = pytest.mark.root
Layout = tuple[Path, str, ImageInfo]


def _index(layout: Path, tag: str, store_url: str) -> str:
    result = index_image(open_source(f"oci:{layout}:{tag}"), open_store(store_url),
                         IndexOptions())
    return result.record.ref


@pytest.fixture
def awkward_store(awkward_layout: Layout, tmp_path: Path) -> tuple[str, str]:
    layout, tag, _ = awkward_layout
    url = f"file://{tmp_path}/store"
    return url, _index(layout, tag, url)


def test_mounted_tree_matches_umoci(awkward_store: tuple[str, str], awkward_reference: Tree,
                                    tmp_path: Path) -> None:
    url, ref = awkward_store
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        diffs = compare_trees(awkward_reference, snapshot_tree(mnt), ignore_root=True)
        assert diffs == []
        st = os.statvfs(mnt)
        kernel = mount.query(mnt, "info")["metadata"] == "kernel"
        assert kernel == (kernelmeta.unsupported() is None)
        # EROFS counts files as "unlimited, all but the image's inodes in use".
        assert st.f_namemax == 255 and (st.f_files == -1 if kernel else st.f_files > 100)
        with pytest.raises(OSError) as exc, open(mnt / "etc/new", "w"):
            pass
        assert exc.value.errno in (errno.EROFS, errno.EACCES)


def test_reads_are_lazy_and_stats_say_so(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    files = [Entry(f"f{n}", "file", data=bytes([n]) * 100_000) for n in range(20)]
    build_layout(tmp_path / "l", "t", [files])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        assert sorted(os.listdir(mnt)) == sorted(f"f{n}" for n in range(20))
        assert mount.query(mnt)["demand_blobs"] == 0  # metadata needs no fetch
        assert (mnt / "f3").read_bytes() == bytes([3]) * 100_000
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 1 and stats["demand_bytes"] == 100_000
        assert 4.9 < stats["fetched_percent"] < 5.1
        # written to the node cache right behind the reply (Fetcher.settle)
        deadline = time.monotonic() + 10
        while not (cached := [p for p in (tmp_path / "cache" / "blobs").rglob("*")
                              if p.is_file()]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cached) == 1
        assert cafs(["stats", str(mnt)]) == 0
        assert f"metadata served by: {stats['metadata']}" in capsys.readouterr().out


@pytest.mark.parametrize("kernel_metadata", ["auto", "off"])
def test_opens_and_repeated_listings_are_left_to_the_kernel(
        tmp_path: Path, kernel_metadata: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the patched pyfuse3 (`make deps` builds it), open and opendir are declined once
    and then never sent again, and a second walk is answered from the kernel's cache. With
    kernel-served metadata (as root on Linux 6.5+), no listing reaches the daemon at all."""
    import pyfuse3

    monkeypatch.setenv("CAFS_KERNEL_METADATA", kernel_metadata)
    assert getattr(pyfuse3, "FH_FALLS_BACK_TO_INODE", False), \
        "pyfuse3 lacks contrib/pyfuse3's patch: run `make deps`"
    entries = [Entry(f"d{d}", "dir") for d in range(30)] + [
        Entry(f"d{d}/f{n}", data=b"%d/%d\n" % (d, n)) for d in range(30) for n in range(5)]
    build_layout(tmp_path / "l", "t", [entries])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)

    def walk(mnt: Path) -> list[tuple[str, bytes]]:
        return sorted((str(p.relative_to(mnt)), p.read_bytes() if p.is_file() else b"")
                      for p in mnt.rglob("*"))

    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        first = walk(mnt)
        after_first = mount.query(mnt)
        # Anything on the machine may drop the kernel's caches (a benchmark's drop_caches,
        # memory pressure) between two walks; then the kernel lists again, as it should. What
        # must hold is that a walk whose directories are still cached lists nothing: of a few
        # walks in a row, one that the kernel answers alone.
        added = []
        for _ in range(4):
            before = mount.query(mnt)["listings"]
            assert walk(mnt) == first
            added.append(mount.query(mnt)["listings"] - before)
            if added[-1] == 0:
                break
        after = mount.query(mnt)
    assert len(first) == 180 and ("d7/f3", b"7/3\n") in first
    assert after["opens"] <= 2  # the first open and the first opendir: ENOSYS, never again
    if kernel_metadata == "auto" and kernelmeta.unsupported() is None:
        assert after["listings"] == 0  # the kernel serves the tree: no listing ever reaches us
        return
    assert after_first["listings"] >= 31  # each directory listed once...
    assert 0 in added, f"listings added by each later walk: {added}"  # ...then cached


def test_large_file_fetches_only_the_chunks_read(tmp_path: Path) -> None:
    data = os.urandom(3 * (4 << 20) + 17)
    build_layout(tmp_path / "l", "t", [[Entry("big", "file", data=data)]], compression="none")
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        with open(mnt / "big", "rb") as f:
            f.seek(5 << 20)
            assert f.read(1000) == data[5 << 20 : (5 << 20) + 1000]
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 1, stats
        assert (mnt / "big").read_bytes() == data


@pytest.mark.parametrize("splice", ["1", "0"])
def test_reads_of_cached_blobs_are_spliced_and_exact(tmp_path: Path, splice: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads whose bytes sit in a cache file's page cache are answered by libfuse from that
    file (patched pyfuse3); the others, reads across a chunk boundary, and every read with
    CAFS_READ_SPLICE=0, through a buffer. All exact."""
    import random

    import pyfuse3

    assert getattr(pyfuse3, "READ_REPLY_FROM_FD", False), \
        "pyfuse3 lacks contrib/pyfuse3's patches: run `make deps`"
    data = os.urandom(2 * (4 << 20) + 12345)
    build_layout(tmp_path / "l", "t", [[Entry("big", "file", data=data)]], compression="none")
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    rng = random.Random(7)
    monkeypatch.setenv("CAFS_READ_SPLICE", splice)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        assert (mnt / "big").read_bytes() == data
        for also_cache in (False, True, False):
            evict(mnt / "big", *([tmp_path / "cache"] if also_cache else []))
            fd = os.open(mnt / "big", os.O_RDONLY)
            try:
                for _ in range(40):
                    off = rng.randrange(len(data))
                    n = rng.choice((1, 4096, 70_000, 1 << 20, 3 << 20))
                    assert os.pread(fd, n, off) == data[off : off + n], (off, n)
            finally:
                os.close(fd)
        stats = mount.query(mnt)
    if splice == "1":
        assert stats["spliced_reads"] > 0 and stats["reads"] > stats["spliced_reads"], stats
    else:
        assert stats["spliced_reads"] == 0 and stats["reads"] > 0, stats
    assert stats["eio"] == 0 and stats["demand_blobs"] + stats["prefetch_blobs"] == 3


def test_concurrent_readers_share_fetches(awkward_store: tuple[str, str], tmp_path: Path) -> None:
    url, ref = awkward_store
    errors: list[BaseException] = []
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        big = mnt / "sizes" / "9m"
        expected_size = NINE_MIB

        def reader() -> None:
            try:
                assert len(big.read_bytes()) == expected_size
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        stats = mount.query(mnt)
        assert stats["demand_blobs"] + stats["prefetch_blobs"] <= 3, stats


def test_corrupt_blob_in_store_is_never_served(tmp_path: Path) -> None:
    build_layout(tmp_path / "l", "t", [[Entry("a", "file", data=b"good data" * 1000),
                                        Entry("b", "file", data=b"other" * 1000)]])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    store = open_store(url)
    index = load_index(store, __import__("indexer.catalog").catalog.find_image(store, ref).index)
    key = index.chunks(index.resolve(b"a") or 0)[0]
    path = tmp_path / "store" / blob_key(key)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    for pack in (tmp_path / "store" / "packs").iterdir():  # the neighbour pack's copies too
        pack.write_bytes(bytes(b ^ 0xFF for b in pack.read_bytes()))
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache", fetch_deadline=1) as mnt:
        with pytest.raises(OSError) as exc:
            (mnt / "a").read_bytes()
        assert exc.value.errno == errno.EIO
        assert (mnt / "b").read_bytes() == b"other" * 1000  # the mount keeps working
        assert mount.query(mnt)["corrupt_blobs"] >= 1
        assert "failed verification" in log_of(mnt)


def test_corrupt_cache_file_is_refetched(tmp_path: Path) -> None:
    build_layout(tmp_path / "l", "t", [[Entry("a", "file", data=b"payload" * 1000)]])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    cache = tmp_path / "cache"
    with mounted(ref, tmp_path / "mnt", url, cache) as mnt:
        (mnt / "a").read_bytes()
    (cached,) = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    cached.write_bytes(b"X" * cached.stat().st_size)
    with mounted(ref, tmp_path / "mnt", url, cache) as mnt:
        assert (mnt / "a").read_bytes() == b"payload" * 1000
        assert mount.query(mnt)["corrupt_blobs"] == 1


def test_store_outage_gives_eio_then_recovers(simple_layout: Layout, s3_server: object,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # etc/'s first miss would bring data/ (a sibling) ahead: data/b.txt must stay uncached
    monkeypatch.setenv("CAFS_NEIGHBOUR_AHEAD", "0")
    layout, tag, _ = simple_layout
    url = s3_server.url  # type: ignore[attr-defined]
    ref = _index(layout, tag, url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache", fetch_deadline=2) as mnt:
        assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"
        s3_server.stop()  # type: ignore[attr-defined]
        try:
            with pytest.raises(OSError) as exc:
                (mnt / "data/b.txt").read_bytes()
            assert exc.value.errno == errno.EIO
            assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"  # cached: still fine
        finally:
            s3_server.start()  # type: ignore[attr-defined]
        assert (mnt / "data/b.txt").read_bytes() == b"b" * 2000
        assert mount.query(mnt)["store_errors"] >= 1


def test_full_cache_disk_still_serves_reads(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    build_layout(tmp_path / "l", "t", [[Entry("a", "file", data=data)]], compression="none")
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    cache = tmp_path / "tinycache"
    cache.mkdir()
    # mode: a tmpfs is born 1777, and a cache others can write to is refused
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(cache)],
                   check=True)
    try:
        with mounted(ref, tmp_path / "mnt", url, cache) as mnt:
            assert (mnt / "a").read_bytes() == data
            # a chunk is served from its verified bytes and written behind the reply, so the
            # failed write is counted a moment after the read returns
            deadline = time.monotonic() + 10
            while mount.query(mnt)["cache_errors"] < 1:
                assert time.monotonic() < deadline, "the failed cache write was never counted"
                time.sleep(0.05)
            assert (mnt / "a").read_bytes() == data  # still served, from memory
    finally:
        subprocess.run(["umount", str(cache)], check=False)


def test_reader_killed_mid_read_leaves_the_mount_healthy(tmp_path: Path) -> None:
    data = os.urandom(12 << 20)
    build_layout(tmp_path / "l", "t", [[Entry("a", "file", data=data)]], compression="none")
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        proc = subprocess.Popen(["dd", f"if={mnt / 'a'}", "of=/dev/null", "bs=4k"])
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (mnt / "a").read_bytes() == data


def test_daemon_exits_on_sigterm_and_on_external_unmount(simple_layout: Layout,
                                                         tmp_path: Path) -> None:
    layout, tag, _ = simple_layout
    url = f"file://{tmp_path}/store"
    ref = _index(layout, tag, url)
    for how in ("sigterm", "umount"):
        mnt = tmp_path / f"mnt-{how}"
        with mounted(ref, mnt, url, tmp_path / "cache"):
            pid = mount.daemon_pid(mnt)
            assert pid is not None
            if how == "sigterm":
                os.kill(pid, signal.SIGTERM)
            else:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            for _ in range(200):
                if not mount.is_mounted(mnt) and not Path(f"/proc/{pid}").exists():
                    break
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.05)
            assert not mount.is_mounted(mnt)
            assert not Path(f"/proc/{pid}").exists()


def test_mount_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"file://{tmp_path}/store"
    (tmp_path / "mnt").mkdir()
    assert cafs(["mount", "no/such:image", str(tmp_path / "mnt"), "--store", url]) == 1
    assert "no indexed image" in capsys.readouterr().err
    assert cafs(["mount", "x", str(tmp_path / "missing"), "--store", url]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert cafs(["umount", str(tmp_path / "mnt")]) == 1
    assert "not a cafs mount" in capsys.readouterr().err
    assert cafs(["stats", str(tmp_path / "mnt")]) == 1


def test_corrupt_index_in_store_fails_the_mount_clearly(tmp_path: Path) -> None:
    build_layout(tmp_path / "l", "t", [[Entry("a", data=b"x")]])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    (idx,) = (tmp_path / "store" / "indexes").iterdir()
    raw = bytearray(idx.read_bytes())
    raw[-3] ^= 0xFF
    idx.write_bytes(bytes(raw))
    (tmp_path / "mnt").mkdir()
    with pytest.raises(mount.MountError, match=r"does not match|damaged|corrupt"):
        mount.mount_detached(ref, tmp_path / "mnt", store_url=url,
                             cache_dir=tmp_path / "cache", log_file=tmp_path / "log")
    assert not mount.is_mounted(tmp_path / "mnt")


def test_a_hanging_store_times_out_reads_not_the_mount(simple_layout: Layout, s3_server: object,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    layout, tag, _ = simple_layout
    url = s3_server.url  # type: ignore[attr-defined]
    ref = _index(layout, tag, url)
    cache = tmp_path / "cache"
    with mounted(ref, tmp_path / "m1", url, cache):
        pass  # leaves the index in the node cache
    top = _top_index(url, ref)
    with socket.socket() as blackhole:  # accepts connections, never answers
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{blackhole.getsockname()[1]}")
        with mounted(f"index:{top}", tmp_path / "m2", url, cache,
                     fetch_deadline=2) as mnt:
            started = time.monotonic()
            with pytest.raises(OSError) as exc:
                (mnt / "data/b.txt").read_bytes()
            assert exc.value.errno == errno.EIO
            assert time.monotonic() - started < 20
            assert sorted(os.listdir(mnt / "data")) == ["b.txt", "link"]  # metadata still served


def _top_index(url: str, ref: str) -> str:
    from indexer.catalog import find_image

    return find_image(open_store(url), ref).index


def test_a_run_dir_too_long_for_a_socket_is_explained(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFS_RUN_DIR", str(tmp_path / ("r" * 100)))
    (tmp_path / "mnt").mkdir()
    with pytest.raises(mount.MountError, match="too long for a unix socket"):
        mount.mount_detached("x", tmp_path / "mnt", store_url=f"file://{tmp_path}/s")


def test_a_bug_met_by_one_request_fails_it_with_eio_not_the_mount(tmp_path: Path) -> None:
    import pyfuse3
    import trio

    from cafs.daemon.fs import CafsOperations
    from cafs.daemon.stats import MountStats

    build_layout(tmp_path / "l", "t", [[Entry("f", data=b"data")]])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    store = open_store(url)
    from indexer.catalog import find_image

    index = load_index(store, find_image(store, ref).index)

    class Broken:
        def open(self, key: str, size: int) -> object:
            raise RuntimeError("a bug")

    ops = CafsOperations(index, Broken(), MountStats())  # type: ignore[arg-type]
    ino = index.resolve(b"f")
    assert ino is not None

    async def main() -> None:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.read(ino, 0, 4)  # type: ignore[arg-type]
        assert exc.value.errno == errno.EIO
        assert (await ops.getattr(ino)).st_size == 4  # type: ignore[arg-type]

    trio.run(main)


@pytest.mark.root
def test_an_image_overlayfs_would_misread_is_served_through_fuse(tmp_path: Path) -> None:
    """A 0/0 character device would be a whiteout to overlayfs: such an image keeps its
    metadata in FUSE, and the device is there."""
    entries = [Entry("dev", "dir"), Entry("dev/zero0", "char", mode=0o600),
               Entry("f", data=b"data\n")]
    build_layout(tmp_path / "l", "t", [entries])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        assert mount.query(mnt, "info")["metadata"] == "fuse"
        st = os.lstat(mnt / "dev/zero0")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert (mnt / "f").read_bytes() == b"data\n"
    assert "would take for a whiteout" in log_of(tmp_path / "mnt")


@pytest.mark.root
def test_a_stack_the_kernel_refuses_falls_back_to_fuse(simple_layout: Layout, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """overlayfs cannot take a layer path with a ':' in it: the daemon serves the FUSE mount
    at the mountpoint instead, and it unmounts as usual."""
    if kernelmeta.unsupported():
        pytest.skip(f"kernel metadata unavailable here: {kernelmeta.unsupported()}")
    run_dir = Path(tempfile.mkdtemp(prefix="cafs:"))  # short: a socket path lives in it
    monkeypatch.setenv("CAFS_RUN_DIR", str(run_dir))
    layout, tag, _ = simple_layout
    url = f"file://{tmp_path}/store"
    ref = _index(layout, tag, url)
    try:
        with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
            assert mount.query(mnt, "info")["metadata"] == "fuse"
            entry = mountinfo.find(mnt)
            assert entry is not None and entry.fstype == "fuse.cafs"
            assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not mount.is_mounted(tmp_path / "mnt")
    assert "kernel metadata not mounted" in log_of(tmp_path / "mnt")


@pytest.mark.root
def test_the_erofs_image_comes_from_the_store_else_is_built(simple_layout: Layout,
                                                            tmp_path: Path) -> None:
    """`cafs index` stores the top index's EROFS image; a lower chain's mount builds its
    own; a damaged image, in the node cache or the store, is never mounted."""
    if kernelmeta.unsupported():
        pytest.skip(f"kernel metadata unavailable here: {kernelmeta.unsupported()}")
    layout, tag, _ = simple_layout
    url = f"file://{tmp_path}/store"
    ref = _index(layout, tag, url)
    store = open_store(url)
    record = find_image(store, ref)
    lower = f"chain:{record.layers[0].chain_id}"
    assert load_erofs(store, record.index) is not None
    assert load_erofs(store, record.layers[0].index) is None
    damaged = bytearray(store.get(erofs_key(record.index)))
    damaged[-1] ^= 1
    for n, (source, built) in enumerate(((ref, False), (lower, True))):
        with mounted(source, tmp_path / f"mnt{n}", url, tmp_path / f"cache{n}") as mnt:
            assert mount.query(mnt, "info")["metadata"] == "kernel"
            assert (mnt / "etc/hostname").read_bytes().startswith(b"simple")
        assert ("built the EROFS image" in log_of(tmp_path / f"mnt{n}")) == built
    cached = next((tmp_path / "cache0" / "erofs").glob(f"{record.index}.v*"))
    good = cached.read_bytes()
    k = len(good) // 2
    cached.write_bytes(good[:k] + bytes([good[k] ^ 1]) + good[k + 1:])
    with mounted(ref, tmp_path / "mnt0", url, tmp_path / "cache0") as mnt:
        assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"
    assert cached.read_bytes() == good  # the damaged copy was refetched, not mounted
    store.put(erofs_key(record.index), bytes(damaged))
    with mounted(ref, tmp_path / "mnt-d", url, tmp_path / "cache-d") as mnt:
        assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"
    log = log_of(tmp_path / "mnt-d")
    assert "stored EROFS image" in log and "built the EROFS image" in log


def test_pruning_the_node_cache_takes_indexes_and_images_too(tmp_path: Path) -> None:
    """`cafs cache prune --all` empties the node cache of blobs, indexes and EROFS images
    alike; the next mount fetches what it needs again and serves the same bytes."""
    build_layout(tmp_path / "l", "t", [[Entry("f", data=b"hello\n")]])
    url = f"file://{tmp_path}/store"
    ref = _index(tmp_path / "l", "t", url)
    cache = tmp_path / "cache"
    for attempt in range(2):
        with mounted(ref, tmp_path / "mnt", url, cache) as mnt:
            assert (mnt / "f").read_bytes() == b"hello\n"
        assert list((cache / "indexes").iterdir())  # the mount kept its index
        assert cafs(["cache", "prune", "--all", "--cache-dir", str(cache)]) == 0
        assert not [p for d in ("indexes", "erofs", "blobs") for p in (cache / d).rglob("*")
                    if p.is_file()], attempt
