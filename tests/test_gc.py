"""`cafs gc` and `cafs rm`: unreferenced objects go, referenced ones never do."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from blobstore.base import blob_key
from blobstore.envelope import digest
from blobstore.local import LocalStore
from cafs.cli.app import main as cafs
from indexer import lease
from indexer.build import IndexOptions, IndexResult, Unpublished, index_image
from indexer.catalog import erofs_key, find_image, load_erofs, load_index
from indexer.gc import collect, remove_ref
from indexer.lease import LeaseConflict, hold
from indexer.sources import open_source


def _two_images(tmp_path: Path, store_url: str) -> tuple[str, str]:
    base = [Entry("shared", data=b"S" * 5000)]
    build_layout(tmp_path / "l", "a", [base, [Entry("only-a", data=b"A" * 3000)]])
    build_layout(tmp_path / "l", "b", [base, [Entry("only-b", data=b"B" * 3000)]])
    store = open_store(store_url)
    refs = []
    for tag in ("a", "b"):
        res = index_image(open_source(f"oci:{tmp_path / 'l'}:{tag}"), store, IndexOptions())
        refs.append(res.record.ref)
    return refs[0], refs[1]


def _all_blobs_present(store_url: str, ref: str) -> bool:
    store = open_store(store_url)
    index = load_index(store, find_image(store, ref).index)
    return all(store.exists(blob_key(k)) for k in index.all_chunks())


def test_gc_after_rm_frees_only_what_the_removed_image_alone_used(store_url: str,
                                                                   tmp_path: Path) -> None:
    ref_a, ref_b = _two_images(tmp_path, store_url)
    store = open_store(store_url)
    assert collect(store, grace=0).deleted == []  # everything is referenced
    top_a = find_image(store, ref_a).index
    remove_ref(store, ref_a)
    dry = collect(store, grace=0, dry_run=True)
    assert dry.deleted and all(store.exists(k) for k in dry.deleted)
    report = collect(store, grace=0)
    assert sorted(report.deleted) == sorted(dry.deleted)
    assert any(k.startswith("blobs/") for k in report.deleted)
    assert erofs_key(top_a) in report.deleted  # the removed image's EROFS image goes...
    assert load_erofs(store, find_image(store, ref_b).index) is not None  # ...the other stays
    assert _all_blobs_present(store_url, ref_b)
    assert not any(k.startswith("refs/") for k in report.deleted)
    assert collect(store, grace=0).deleted == []  # nothing left to collect


def test_young_unreferenced_objects_survive_the_grace_period(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    ref_a, _ = _two_images(tmp_path, url)
    store = open_store(url)
    remove_ref(store, ref_a)
    report = collect(store)  # default grace: an hour
    assert report.deleted == [] and report.kept_young > 0


def test_gc_and_index_exclude_each_other(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    store = open_store(url)
    with hold(store, "index", against="gc"), pytest.raises(LeaseConflict, match="cafs index"):
        collect(store, grace=0)
    build_layout(tmp_path / "l", "t", [[Entry("f", data=b"x")]])
    with hold(store, "gc", against="index"), pytest.raises(LeaseConflict, match="cafs gc"):
        index_image(open_source(f"oci:{tmp_path / 'l'}:t"), store, IndexOptions())
    assert list(store.list("leases/")) == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"file://{tmp_path}/store"
    ref_a, _ = _two_images(tmp_path, url)
    assert cafs(["rm", ref_a, "--store", url]) == 0
    assert cafs(["rm", ref_a, "--store", url]) == 1
    assert "no indexed image" in capsys.readouterr().err
    assert cafs(["gc", "--store", url, "--grace", "0", "--dry-run"]) == 0
    assert "would delete" in capsys.readouterr().out
    assert cafs(["cache", "status", "--cache-dir", str(tmp_path / "c")]) == 0
    assert cafs(["cache", "prune", "--all", "--cache-dir", str(tmp_path / "c")]) == 0


class _Clock:
    """The wall clock leases see, moved by the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _reusable_blob(tmp_path: Path, store: LocalStore) -> bytes:
    """A blob left unreferenced by a removed image: what a new index may decide to reuse."""
    data = os.urandom(5000)
    build_layout(tmp_path / "l", "old", [[Entry("reused", data=data)]])
    old = index_image(open_source(f"oci:{tmp_path / 'l'}:old"), store, IndexOptions())
    remove_ref(store, old.record.ref)
    build_layout(tmp_path / "l", "new", [[Entry("reused", data=data), Entry("new", data=b"n")]])
    return data


def test_a_long_index_keeps_gc_away_past_the_lease_ttl(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Seven hours into an index (clock moved), its renewed lease still stops `cafs gc`, so
    the blob it decided to reuse survives and the published image is whole."""
    clock = _Clock()
    monkeypatch.setattr(lease, "now", clock)
    monkeypatch.setattr(lease, "RENEW_FRACTION", 0.0005)  # renew every 0.3 s of real time
    store = LocalStore(tmp_path / "store")
    _reusable_blob(tmp_path, store)
    paused, resume = threading.Event(), threading.Event()

    def progress(kind: str, done: int, total: int) -> None:
        paused.set()
        assert resume.wait(30)

    result: list[IndexResult] = []
    indexer = threading.Thread(target=lambda: result.append(index_image(
        open_source(f"oci:{tmp_path / 'l'}:new"), store, IndexOptions(), progress)))
    indexer.start()
    try:
        assert paused.wait(30)
        clock.offset += 7 * 3600
        time.sleep(1.0)  # a few renewals at the new time
        with pytest.raises(LeaseConflict, match="cafs index"):
            collect(store, grace=0)
    finally:
        resume.set()
        indexer.join(30)
    assert result and _all_blobs_present(store.url, result[0].record.ref)
    clock.offset += lease.LEASE_TTL + 1  # released: gc runs now, and keeps the new image
    assert collect(store, grace=0).deleted
    assert _all_blobs_present(store.url, result[0].record.ref)


def test_a_crashed_holders_lease_stops_counting_after_its_ttl(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(lease, "now", clock)
    store = LocalStore(tmp_path / "store")
    store.put("leases/index-dead", json.dumps({"created": clock(), "holder": "x:1"}).encode())
    store.put("leases/index-junk", b'{"created": "yesterday"}')  # unreadable: not a lease
    assert [x.key for x in lease.live_leases(store, "index")] == ["leases/index-dead"]
    clock.offset += lease.LEASE_TTL + 1
    assert lease.live_leases(store, "index") == []


def test_a_lease_unrenewed_for_a_ttl_knows_it_lapsed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(lease, "now", clock)
    store = LocalStore(tmp_path / "store")
    held = lease.HeldLease(store, "index", ttl=60)
    held.start()
    held.renew()
    assert not held.lapsed()
    (store.root / held.lease.key).unlink()  # renewals fail: the object is now a directory
    (store.root / held.lease.key).mkdir()
    clock.offset += 61
    held.renew()  # fails, and a TTL has passed since the last success
    assert held.lapsed()
    held.release()


class _ForgetfulStore(LocalStore):
    """Deletes the reused blob right after the indexer decided to reuse it: what a sweep does
    when the indexer's lease has lapsed or the clocks disagree."""

    victim = ""

    def exists(self, key: str) -> bool:
        found = super().exists(key)
        if found and key == self.victim:
            self.delete(key)
            self.victim = ""
        return found


def test_an_index_whose_reused_blob_vanished_is_not_published(tmp_path: Path) -> None:
    store = _ForgetfulStore(tmp_path / "store")
    data = _reusable_blob(tmp_path, store)
    store.victim = blob_key(digest(data))
    with pytest.raises(Unpublished, match=r"1 of \d+ objects this image needs are gone"):
        index_image(open_source(f"oci:{tmp_path / 'l'}:new"), store, IndexOptions())
    assert list(store.list("refs/")) == [] and list(store.list("manifests/")) == []
    assert index_image(open_source(f"oci:{tmp_path / 'l'}:new"), store, IndexOptions())
