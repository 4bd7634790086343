"""`cafs gc` and `cafs rm`: unreferenced objects go, referenced ones never do."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from blobstore.base import blob_key
from cafs.cli import main as cafs
from indexer.build import IndexOptions, index_image
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
