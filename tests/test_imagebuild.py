"""The image-building and reference tools that every other test trusts, checked against
umoci, skopeo, the real registry and moto."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import botocore.config
import botocore.exceptions
import pytest
import requests
from conftest import s3_server_kind
from images import (
    CAP_NET_RAW,
    DEEP_LEAF,
    LONG_NAME,
    NINE_MIB,
    SIMPLE_CONFIG,
    MiB,
    simple_layers,
)
from reference import Tree, compare_trees, snapshot_tree, umoci_unpack

from bench.hostimage import host_rootfs_layers, python_config
from bench.imagebuild import (
    MEDIA_INDEX,
    MEDIA_LAYER,
    Compression,
    Entry,
    ImageInfo,
    add_index,
    build_layout,
    chain_ids,
    image_manifest,
    open_layer,
    write_docker_archive,
    write_layer,
    write_oci_archive,
)
from bench.registrypush import push_index, push_layout

if TYPE_CHECKING:
    from conftest import Registry, S3Server

MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json, " + MEDIA_INDEX


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def layer_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8") as tar:
        return tar.getmembers()


def read_layer(layout: Path, descriptor: dict[str, str]) -> bytes:
    with open_layer(layout, descriptor) as stream:
        return stream.read()


# --- layers and layouts --------------------------------------------------------------------


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = (sha256(x) for x in (b"a", b"b", b"c"))
    ab = sha256(f"{a} {b}".encode())
    assert chain_ids([a, b, c]) == [a, ab, sha256(f"{ab} {c}".encode())]


def test_layer_round_trips_names_and_binary_xattrs() -> None:
    out = io.BytesIO()
    write_layer(
        [
            Entry(b"caf\xe9", data=b"x"),
            Entry("d/" + "n" * 255, xattrs={"security.capability": CAP_NET_RAW}),
            Entry("d", "whiteout"),
            Entry("o", "opaque"),
            Entry("t", data=b"t", mtime=1_600_000_000.5),
        ],
        out,
    )
    members = layer_members(out.getvalue())
    names = [os.fsencode(m.name) for m in members]
    assert names == [b"caf\xe9", b"d/" + b"n" * 255, b".wh.d", b"o/.wh..wh..opq", b"t"]
    cap = members[1].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape") == CAP_NET_RAW
    assert members[4].mtime == 1_600_000_000.5


def test_huge_sparse_file_streams_without_memory() -> None:
    class Counter:
        size = 0

        def write(self, data: bytes, /) -> None:
            self.size += len(data)

    size = 3 * (1 << 30) + 1
    counter = Counter()
    write_layer([Entry.sparse_zero("huge", size)], counter)
    assert counter.size == 512 + size + 511 + 1024  # header, data, padding, end blocks


def test_random_entries_are_reproducible_and_seeded() -> None:
    def content(entry: Entry) -> bytes:
        return b"".join(entry.chunks())

    a = content(Entry.random("a", 5 * MiB + 3))
    assert content(Entry.random("a", 5 * MiB + 3)) == a
    assert content(Entry.random("b", 5 * MiB + 3, seed="a")) == a
    assert content(Entry.random("a", MiB)) == a[:MiB]
    assert content(Entry.random("b", MiB)) != a[:MiB]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layout_is_valid_oci(tmp_path: Path, compression: Compression) -> None:
    layout = tmp_path / "layout"
    info = build_layout(layout, "v1", simple_layers(), SIMPLE_CONFIG, compression)
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    [desc] = index["manifests"]
    assert desc["annotations"] == {"org.opencontainers.image.ref.name": "v1"}
    assert desc["digest"] == info.manifest_digest
    for path in (layout / "blobs" / "sha256").iterdir():
        assert sha256(path.read_bytes()) == "sha256:" + path.name
    manifest = json.loads(blob(layout, info.manifest_digest))
    assert [layer["mediaType"] for layer in manifest["layers"]] == [MEDIA_LAYER[compression]] * 2
    assert [layer["digest"] for layer in manifest["layers"]] == list(info.layer_digests)
    config = json.loads(blob(layout, info.config_digest))
    assert config["config"] == SIMPLE_CONFIG
    assert config["rootfs"]["diff_ids"] == list(info.diff_ids)
    raw = [read_layer(layout, layer) for layer in manifest["layers"]]
    assert [sha256(r) for r in raw] == list(info.diff_ids)
    assert sum(map(len, raw)) == info.uncompressed_size
    assert info.chain_ids == tuple(chain_ids(info.diff_ids))
    if compression == "gzip":
        assert gzip.decompress(blob(layout, info.layer_digests[0])) == raw[0]
    assert [m.name for m in layer_members(raw[1])][:2] == ["etc/hostname", "data/.wh.a.txt"]


def test_layout_holds_several_tags_sharing_layers(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    base, update = simple_layers()
    one = build_layout(layout, "one", [base])
    two = build_layout(layout, "two", [base, update], annotations={"x": "y"})
    again = build_layout(layout, "one", [base, [Entry("z")]])
    assert one.layer_digests[0] == two.layer_digests[0] == again.layer_digests[0]
    index = json.loads((layout / "index.json").read_text())
    tags = {
        d["annotations"]["org.opencontainers.image.ref.name"]: d["digest"]
        for d in index["manifests"]
    }
    assert tags == {"one": again.manifest_digest, "two": two.manifest_digest}
    assert image_manifest(layout, "two")["annotations"] == {"x": "y"}


@pytest.mark.root
def test_umoci_unpacks_simple_image(
    tmp_path: Path, simple_layout: tuple[Path, str, ImageInfo]
) -> None:
    layout, tag, _ = simple_layout
    tree = snapshot_tree(umoci_unpack(layout, tag, tmp_path / "bundle"))
    assert sorted(tree.entries) == [
        b".",
        b"bin",
        b"bin/hello",
        b"data",
        b"data/b.txt",
        b"data/link",
        b"etc",
        b"etc/hostname",
    ]
    assert tree["bin/hello"].mode == 0o755
    assert tree["data/b.txt"].size == 2000 and tree["data/b.txt"].uid == 1000
    assert tree["data/link"].target == b"b.txt"
    assert tree["etc/hostname"].mtime_ns == 1_700_000_000 * 10**9


@pytest.mark.root
def test_zstd_image_unpacks_like_gzip(tmp_path: Path) -> None:
    trees = []
    for compression in ("zstd", "gzip"):
        build_layout(tmp_path / compression, "t", simple_layers(), compression=compression)
        trees.append(
            snapshot_tree(umoci_unpack(tmp_path / compression, "t", tmp_path / f"b-{compression}"))
        )
    assert compare_trees(trees[1], trees[0]) == []


@pytest.mark.root
def test_awkward_image_unpacks_as_designed(awkward_reference: Tree) -> None:
    tree = awkward_reference
    gone = [
        "wh/file",
        "wh/dir",
        "opq/old",
        "opq/sub",
        "opq/new",
        "opq2/old",
        "dev/null",
        "links/hard_a",
        "sizes/exact_4m",
        "swap/d2f/child",
    ]
    assert not [p for p in gone if p in tree]
    assert tree["wh/recreate"].size == 4 and tree["wh/same_layer"].type == "reg"
    assert "opq/newer" in tree and "opq2/new" in tree and tree["opq"].mode == 0o750
    assert (tree["swap/d2f"].type, tree["swap/f2d"].type, tree["swap/d2l"].type) == (
        "dir",
        "dir",
        "lnk",
    )
    assert tree["swap/l2d"].type == "dir" and "srv/data/through_link" in tree
    assert tree["redecl"].mode == 0o700 and tree["redecl"].xattrs == () and "redecl/kid" in tree
    assert tree["implicit/a"].mode == 0o755 and tree["implicit/a"].uid == 0
    assert (
        frozenset({b"modes/setuid", b"links/setuid_link", b"links/lower_link"}) in tree.link_groups
    )
    assert frozenset({b"links/hard_b", b"links/hard_c"}) in tree.link_groups
    assert tree["links/lower_link"].mode == 0o4755
    assert tree["dev/sda"].type == "blk" and tree["dev/sda"].rdev == os.makedev(8, 0)
    assert tree["dev/fifo"].type == "fifo" and tree["dev/fifo"].mode == 0o620
    assert tree["xattrs/setuid_cap"].mode == 0o4755
    assert tree["xattrs/setuid_cap"].xattrs == (("security.capability", CAP_NET_RAW),)
    assert tree["xattrs/forbidden"].xattrs == (("user.kept", b"kept"),)
    assert tree["xattrs/dir"].xattrs == (("user.dir", b"on a directory"),)
    assert tree["xattrs/user"].xattrs == ()
    assert tree["modes/sticky"].mode == 0o1777 and tree["modes/all_bits"].mode == 0o7777
    assert tree["owners/huge"].uid == 3_000_000
    assert (
        tree["times/epoch"].mtime_ns == 0 and tree["times/link"].mtime_ns == 1_500_000_000 * 10**9
    )
    assert tree["times/fraction"].mtime_ns == 1_600_000_000_500_000_000
    assert tree["links/dangling"].target == b"does/not/exist"
    assert tree[b"names/latin1_caf\xe9"].size == 10 and LONG_NAME in tree and DEEP_LEAF in tree
    assert tree["sizes/9m"].size == NINE_MIB and tree["sizes/4m_plus_1"].size == 4 * MiB + 1
    assert tree["sizes/9m"].digest == tree["dup/9m_copy"].digest
    assert tree["sizes/empty"].size == 0


# --- archives ------------------------------------------------------------------------------


def skopeo_inspect(ref: str, *extra: str) -> dict[str, object]:
    out = subprocess.run(["skopeo", "inspect", *extra, ref], check=True, capture_output=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_archives_are_readable_by_skopeo(
    tmp_path: Path, simple_layout: tuple[Path, str, ImageInfo]
) -> None:
    layout, tag, info = simple_layout
    write_oci_archive(layout, tmp_path / "oci.tar")
    write_docker_archive(layout, tag, tmp_path / "docker.tar", repo_tag="example/simple:1")
    oci = skopeo_inspect(f"oci-archive:{tmp_path / 'oci.tar'}:{tag}")
    assert oci["Digest"] == info.manifest_digest and oci["Layers"] == list(info.layer_digests)
    config = skopeo_inspect(f"docker-archive:{tmp_path / 'docker.tar'}", "--config")
    assert config["rootfs"] == {"type": "layers", "diff_ids": list(info.diff_ids)}
    with tarfile.open(tmp_path / "docker.tar") as tar:
        [entry] = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert entry["RepoTags"] == ["example/simple:1"]
        first = tar.extractfile(entry["Layers"][0])
        assert first is not None and sha256(first.read()) == info.diff_ids[0]


# --- registry ------------------------------------------------------------------------------


def fetch_manifest(registry: Registry, repo: str, ref: str) -> requests.Response:
    resp = requests.get(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": MANIFEST_ACCEPT},
        auth=registry.auth,
        timeout=10,
    )
    resp.raise_for_status()
    return resp


def test_push_layout_to_registry(
    registry: Registry, simple_layout: tuple[Path, str, ImageInfo]
) -> None:
    layout, tag, info = simple_layout
    for _ in range(2):  # the second push finds every blob present
        assert push_layout(layout, tag, registry.host, "test/simple", "v1") == info.manifest_digest
    resp = fetch_manifest(registry, "test/simple", "v1")
    assert sha256(resp.content) == info.manifest_digest == resp.headers["Docker-Content-Digest"]
    layer = requests.get(f"{registry.url}/v2/test/simple/blobs/{info.layer_digests[1]}", timeout=10)
    assert sha256(layer.content) == info.layer_digests[1]


def test_push_index_lists_platforms(tmp_path: Path, registry: Registry) -> None:
    layout = tmp_path / "layout"
    amd = build_layout(layout, "amd", simple_layers(), platform="linux/amd64")
    arm = build_layout(layout, "arm", [[Entry("arch", data=b"arm64\n")]], platform="linux/arm64/v8")
    assert json.loads(blob(layout, arm.config_digest))["variant"] == "v8"
    platforms = {"linux/amd64": "amd", "linux/arm64/v8": "arm"}
    digest = push_index(layout, platforms, registry.host, "test/multi", "latest")
    resp = fetch_manifest(registry, "test/multi", "latest")
    assert sha256(resp.content) == digest and resp.json()["mediaType"] == MEDIA_INDEX
    listed = {m["digest"]: m["platform"] for m in resp.json()["manifests"]}
    assert listed[amd.manifest_digest] == {"os": "linux", "architecture": "amd64"}
    assert listed[arm.manifest_digest]["variant"] == "v8"
    assert (
        sha256(fetch_manifest(registry, "test/multi", arm.manifest_digest).content)
        == arm.manifest_digest
    )
    # The same index kept in the layout and pushed by tag gives the same digest.
    assert add_index(layout, "multi", platforms) == digest
    assert push_layout(layout, "multi", registry.host, "test/multi2") == digest


def test_push_to_auth_registry_needs_credentials(
    registry_auth: Registry, simple_layout: tuple[Path, str, ImageInfo]
) -> None:
    layout, tag, info = simple_layout
    with pytest.raises(requests.HTTPError) as err:
        push_layout(layout, tag, registry_auth.host, "test/private")
    assert err.value.response is not None and err.value.response.status_code == 401
    with pytest.raises(requests.HTTPError):
        push_layout(layout, tag, registry_auth.host, "test/private", auth=("cafs", "wrong"))
    digest = push_layout(layout, tag, registry_auth.host, "test/private", auth=registry_auth.auth)
    assert digest == info.manifest_digest
    assert sha256(fetch_manifest(registry_auth, "test/private", tag).content) == digest


# --- S3 server -----------------------------------------------------------------------------


def test_s3_server_restarts_with_its_state(s3_server: S3Server) -> None:
    s3 = boto3.client("s3")  # configured by the fixture's environment alone
    s3.put_object(Bucket=s3_server.bucket, Key="k", Body=b"kept")
    s3_server.stop()
    no_retry = botocore.config.Config(retries={"max_attempts": 1})
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        boto3.client("s3", config=no_retry).get_object(Bucket=s3_server.bucket, Key="k")
    s3_server.start()
    assert s3.get_object(Bucket=s3_server.bucket, Key="k")["Body"].read() == b"kept"


def test_s3_server_is_the_one_asked_for(s3_server: S3Server) -> None:
    """CAFS_TEST_S3 chooses the server: SeaweedFS says so in its Server header, moto not."""
    answer = boto3.client("s3").list_buckets()["ResponseMetadata"]["HTTPHeaders"]
    assert ("SeaweedFS" in answer.get("server", "")) == (s3_server_kind() == "seaweedfs")


def test_store_url_kinds(store_url: str) -> None:
    assert store_url.startswith(("file:///", "s3://cafs-test-"))


# --- reference comparison ------------------------------------------------------------------


def test_compare_trees_reports_each_difference(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    os.chmod(root / "d", 0o755)
    (root / "d" / "f").write_bytes(b"content")
    (root / "gone").write_bytes(b"x")
    os.link(root / "d" / "f", root / "d" / "g")
    os.symlink("f", root / "d" / "l")
    os.setxattr(root / "d" / "f", "user.a", b"1")
    os.utime(root / "d" / "f", ns=(0, 1_000_000_000))
    before = snapshot_tree(root)
    assert compare_trees(before, snapshot_tree(root)) == []
    assert before.link_groups == {frozenset({b"d/f", b"d/g"})}

    (root / "gone").unlink()
    (root / "new").write_bytes(b"")
    os.chmod(root / "d", 0o700)
    os.unlink(root / "d" / "g")
    (root / "d" / "g").write_bytes(b"content")
    os.setxattr(root / "d" / "f", "user.a", b"2")
    os.utime(root / "d" / "f", ns=(0, 2_000_000_000))
    os.unlink(root / "d" / "l")
    os.symlink("g", root / "d" / "l")
    after = snapshot_tree(root)
    expected = [
        "d: mode: expected 0o755, got 0o700",
        'd/f: xattrs: expected {"user.a": "1"}, got {"user.a": "2"}',
        "d/f: mtime_ns: expected 1000000000, got 2000000000",
        'd/g: xattrs: expected {"user.a": "1"}, got {}',
        "d/l: target: expected b'f', got b'g'",
        "missing: gone (reg)",
        "extra: new (reg)",
        "hard links missing: ['d/f', 'd/g']",
    ]
    diffs = compare_trees(before, after)
    # d/g and d/l were recreated, so their mtimes may differ too
    assert [d for d in diffs if not d.startswith(("d/g: mtime_ns", "d/l: mtime_ns"))] == expected
    fewer = compare_trees(before, after, ignore_fields={"mtime_ns", "target"})
    assert fewer == [d for d in expected if "mtime_ns" not in d and "target" not in d]

    os.chmod(root, 0o700)
    after = snapshot_tree(root)
    assert compare_trees(before, after)[0] == ".: mode: expected 0o755, got 0o700"
    assert compare_trees(before, after, ignore_root=True) == diffs


# --- the host Debian rootfs ----------------------------------------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_host_rootfs_runs_python(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_layout(layout, "py", host_rootfs_layers(), python_config(), compression="none")
    rootfs = umoci_unpack(layout, "py", tmp_path / "bundle")
    assert (rootfs / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    out = subprocess.run(
        ["chroot", str(rootfs), "/usr/bin/python3", "-c", "import json; print(json.dumps(1))"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=True,
    )
    assert out.stdout == "1\n"
    shell = subprocess.run(
        ["/usr/sbin/chroot", str(rootfs), "/bin/sh", "-c", "echo ok"], capture_output=True
    )
    assert shell.stdout == b"ok\n"
    shutil.rmtree(tmp_path / "bundle")
