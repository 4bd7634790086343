"""`cafs index` end to end: real images, real stores, checked against umoci's unpack."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from images import AWKWARD_CONFIG, awkward_layers
from indexview import index_tree
from reference import Tree, compare_trees, snapshot_tree, umoci_unpack
from tarcraft import end, member, raw_layout, record_of_size, special

from bench.imagebuild import Entry, ImageInfo, build_layout
from bench.registrypush import push_layout
from blobstore import open_store
from blobstore.base import REF_PREFIX
from cafs.cli.app import main as cafs
from indexer.build import IndexOptions, index_image
from indexer.catalog import chain_index, find_image, get_original, list_images, load_index
from indexer.layout import OCILayoutSource
from indexer.sources import open_source
from indexer.tarheaders import MAX_SPECIAL_HEADER

Layout = tuple[Path, str, ImageInfo]


def _index(spec: str, store_url: str, **kw: object) -> tuple[str, dict[str, object]]:
    store = open_store(store_url)
    result = index_image(open_source(spec, plain_http=True), store, IndexOptions(**kw))  # type: ignore[arg-type]
    return result.record.index, {
        "uploaded": result.uploads.uploaded,
        "present": result.uploads.present,
        "result": result,
    }


@pytest.mark.root
def test_index_matches_umoci_entry_by_entry(
    awkward_layout: Layout, awkward_reference: Tree, tmp_path: Path
) -> None:
    layout, tag, _ = awkward_layout
    url = f"file://{tmp_path}/store"
    key, _ = _index(f"oci:{layout}:{tag}", url)
    store = open_store(url)
    diffs = compare_trees(
        awkward_reference, index_tree(load_index(store, key), store), ignore_root=True
    )
    assert diffs == []


@pytest.mark.root
def test_registry_image_into_s3_matches_umoci(
    awkward_layout: Layout, awkward_reference: Tree, registry: object, s3_server: object
) -> None:
    layout, tag, info = awkward_layout
    host = registry.host  # type: ignore[attr-defined]
    push_layout(layout, tag, host, "test/awkward", dest_tag="v1")
    url = s3_server.url  # type: ignore[attr-defined]
    key, _ = _index(f"{host}/test/awkward:v1", url)
    store = open_store(url)
    assert (
        compare_trees(
            awkward_reference, index_tree(load_index(store, key), store), ignore_root=True
        )
        == []
    )
    record = find_image(store, f"{host}/test/awkward:v1")
    assert record.manifest_digest == info.manifest_digest
    # The original bytes are kept, so containerd can later see the original digests.
    manifest = get_original(store, info.manifest_digest)
    assert json.loads(manifest)["config"]["digest"] == info.config_digest
    assert [layer.chain_id for layer in record.layers] == list(info.chain_ids)
    for layer in record.layers:
        assert chain_index(store, layer.chain_id) == layer.index


def test_every_chain_prefix_has_its_own_tree(tmp_path: Path) -> None:
    layers = [
        [Entry("a", "file", data=b"1"), Entry("b", "file", data=b"2")],
        [Entry("a", "whiteout"), Entry("c", "file", data=b"3")],
    ]
    info = build_layout(tmp_path / "l", "t", layers)
    url = f"file://{tmp_path}/store"
    _index(f"oci:{tmp_path / 'l'}:t", url)
    store = open_store(url)
    first = load_index(store, chain_index(store, info.chain_ids[0]) or "")
    top = load_index(store, chain_index(store, info.chain_ids[1]) or "")
    assert [p for p, _ in first.walk()] == [b".", b"a", b"b"]
    assert [p for p, _ in top.walk()] == [b".", b"b", b"c"]
    assert "config" not in first.meta and top.config.get("config") is not None


def test_reindex_uploads_nothing_and_is_deterministic(
    simple_layout: Layout, store_url: str
) -> None:
    layout, tag, _ = simple_layout
    key1, first = _index(f"oci:{layout}:{tag}", store_url)
    key2, second = _index(f"oci:{layout}:{tag}", store_url)
    assert key1 == key2
    assert first["uploaded"] and second["uploaded"] == 0 and second["present"]


def test_images_sharing_a_base_store_it_once(tmp_path: Path) -> None:
    base = [
        Entry("usr/lib/big", "file", data=bytes(range(256)) * 4096),
        Entry("etc/os", "file", data=b"debian"),
    ]
    info_a = build_layout(tmp_path / "l", "a", [base, [Entry("app/a", "file", data=b"A")]])
    build_layout(tmp_path / "l", "b", [base, [Entry("app/b", "file", data=b"B" * 100)]])
    url = f"file://{tmp_path}/store"
    _, a = _index(f"oci:{tmp_path / 'l'}:a", url)
    _, b = _index(f"oci:{tmp_path / 'l'}:b", url)
    assert b["uploaded"] == 1  # only app/b is new
    assert len(list_images(open_store(url))) == 2
    assert info_a.chain_ids[0] == a["result"].record.layers[0].chain_id  # type: ignore[attr-defined]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_zstd_and_uncompressed_layers(tmp_path: Path, compression: str) -> None:
    build_layout(
        tmp_path / "l", "t", awkward_layers()[:2], config=AWKWARD_CONFIG, compression=compression
    )  # type: ignore[arg-type]
    ref_layout = tmp_path / "g"
    build_layout(ref_layout, "t", awkward_layers()[:2], config=AWKWARD_CONFIG)
    url = f"file://{tmp_path}/store"
    k1, _ = _index(f"oci:{tmp_path / 'l'}:t", url)
    k2, _ = _index(f"oci:{ref_layout}:t", url)
    store = open_store(url)
    assert (
        compare_trees(
            index_tree(load_index(store, k2), store), index_tree(load_index(store, k1), store)
        )
        == []
    )


def test_huge_sparse_file_is_chunked_and_deduplicated(tmp_path: Path) -> None:
    size = (1 << 30) + 5
    build_layout(tmp_path / "l", "t", [[Entry.sparse_zero("huge", size)]], compression="none")
    url = f"file://{tmp_path}/store"
    key, stats = _index(f"oci:{tmp_path / 'l'}:t", url)
    index = load_index(open_store(url), key)
    ino = index.resolve(b"huge")
    assert ino is not None and index.inode(ino).size == size
    chunks = index.chunks(ino)
    assert len(chunks) == 257 and len(set(chunks)) == 2  # zero chunks dedup to one blob
    assert stats["uploaded"] == 2


def _corrupt_blob(layout: Path, digest: str) -> None:
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_layer_fails_and_publishes_nothing(
    simple_layout: Layout, tmp_path: Path, damage: str
) -> None:
    src, tag, info = simple_layout
    layout = tmp_path / "copy"
    shutil.copytree(src, layout)
    path = layout / "blobs" / "sha256" / info.layer_digests[-1].split(":")[1]
    if damage == "corrupt":
        _corrupt_blob(layout, info.layer_digests[-1])
    else:
        path.write_bytes(path.read_bytes()[:-20])
    url = f"file://{tmp_path}/store"
    with pytest.raises(Exception, match=r"digest|truncated|corrupt|larger"):
        _index(f"oci:{layout}:{tag}", url)
    store = open_store(url)
    assert list(store.list(REF_PREFIX)) == [] and list(store.list("chains/")) == []


def test_cli_errors_are_clear_and_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], simple_layout: Layout
) -> None:
    store = f"file://{tmp_path}/store"
    assert cafs(["index", f"oci:{tmp_path}/nope:x", "--store", store, "-q"]) == 1
    assert "nope" in capsys.readouterr().err
    assert cafs(["index", "ftp:x", "--store", store, "-q"]) == 1
    assert cafs(["inspect", "never/indexed:1", "--store", store]) == 1
    assert "no indexed image" in capsys.readouterr().err
    assert cafs(["index", "x", "--store", "gopher://y"]) == 1
    layout, tag, _ = simple_layout
    assert cafs(["index", f"oci:{layout}:{tag}", "--store", store, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] > 0 and summary["blobs_uploaded"] > 0
    assert cafs(["inspect", summary["ref"], "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["index"] == summary["index"]


def test_layout_source_by_class(simple_layout: Layout, tmp_path: Path) -> None:
    layout, tag, info = simple_layout
    store = open_store(f"file://{tmp_path}/store")
    result = index_image(OCILayoutSource(layout, tag), store, IndexOptions())
    assert result.record.manifest_digest == info.manifest_digest


def test_a_gigantic_pax_header_fails_cafs_index_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small gzip layer declaring a PAX header just over 1 MiB: refused, one line, exit 1,
    no pointer published; the same image with a 64 KiB xattr indexes."""
    big = record_of_size("SCHILY.xattr.user.big", MAX_SPECIAL_HEADER + 1)
    raw_layout(tmp_path / "bad", "t", [special(b"x", big) + member(b"f", b"x") + end()])
    store = f"file://{tmp_path}/store"
    assert cafs(["index", f"oci:{tmp_path / 'bad'}:t", "--store", store, "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PAX extended header of 1048577 bytes" in err
    assert list(open_store(store).list(REF_PREFIX)) == []
    assert list(open_store(store).list("chains/")) == []
    ok = record_of_size("SCHILY.xattr.user.big", 64 << 10)
    raw_layout(tmp_path / "ok", "t", [special(b"x", ok) + member(b"f", b"x") + end()])
    assert cafs(["index", f"oci:{tmp_path / 'ok'}:t", "--store", store, "-q"]) == 0
    assert len(list(open_store(store).list(REF_PREFIX))) == 1


def test_error_text_from_the_image_is_printed_not_rendered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rich markup in a hostile tar name once crashed the error printer (MarkupError)."""
    raw_layout(tmp_path / "l", "t", [member(b"../[/bold]x", b"x") + end()])
    store = f"file://{tmp_path}/store"
    assert cafs(["index", f"oci:{tmp_path / 'l'}:t", "--store", store, "-q"]) == 1
    err = capsys.readouterr().err
    assert "escapes the root" in err and "[/bold]x" in err


def _pax_tar(*entries: tuple[str, dict[str, str]]) -> bytes:
    """A PAX tar of one-byte files (empty for whiteouts), each with its own PAX records."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, pax in entries:
            info = tarfile.TarInfo(name)
            info.size = 0 if name.rpartition("/")[2].startswith(".wh.") else 1
            info.mtime, info.pax_headers = 1_700_000_000, pax
            tf.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.mark.root
def test_whiteouts_of_255_byte_names_match_umoci(tmp_path: Path) -> None:
    """A whiteout's own name is 4 bytes longer than the name it removes: it once refused
    the layer as 'name component over 255 bytes', while umoci applies it."""
    names = ["w" * 252, "x" * 255, "d/" + "y" * 255]
    raw_layout(tmp_path / "l", "t", [
        _pax_tar(*((n, {}) for n in [*names, "keep"])),
        _pax_tar(*((f"{n.rpartition('/')[0]}/.wh.{n.rpartition('/')[2]}".lstrip("/"), {})
                   for n in names))])
    reference = snapshot_tree(umoci_unpack(tmp_path / "l", "t", tmp_path / "ref"))
    assert "keep" in reference and not any(n in reference for n in names)
    url = f"file://{tmp_path}/store"
    key, _ = _index(f"oci:{tmp_path / 'l'}:t", url)
    store = open_store(url)
    assert compare_trees(reference, index_tree(load_index(store, key), store),
                         ignore_root=True) == []


@pytest.mark.root
@pytest.mark.parametrize("mtime", ["1e30", "-1e30", "inf"])
def test_a_pax_mtime_umoci_refuses_fails_cafs_index_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mtime: str
) -> None:
    """umoci (Go's archive/tar) refuses the layer; `cafs index` once died in a traceback."""
    raw_layout(tmp_path / "l", "t", [_pax_tar(("f", {"mtime": mtime}))])
    with pytest.raises(RuntimeError, match="invalid tar header"):
        umoci_unpack(tmp_path / "l", "t", tmp_path / "ref")
    store = f"file://{tmp_path}/store"
    assert cafs(["index", f"oci:{tmp_path / 'l'}:t", "--store", store, "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad PAX mtime" in err, err
    assert list(open_store(store).list(REF_PREFIX)) == []
