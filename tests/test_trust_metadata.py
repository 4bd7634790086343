"""Metadata is content too: the tree a mount serves is the verified index's, whoever could
write the store or the node cache before, and names from an image never reach a terminal
as control characters.

The EROFS image a kernel-metadata mount hands to the kernel is stored beside the index
under the index's key, so anyone who can write the store can replace it; these tests
replace it with the image of a forged tree (a 0600 file made world-readable and served
under another name, a binary made setuid) and check that mounts serve the true tree.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
import tarcraft
from mounts import log_of, mounted
from users import User, reachable_dir

from bench.imagebuild import Entry, build_layout
from blobstore import BlobStore, open_store
from blobstore.envelope import digest, encode
from cafs.daemon import kernelmeta
from cafs.mounts import mount
from cafs.terminal import shown
from indexer import erofs
from indexer.build import IndexOptions, index_image
from indexer.catalog import erofs_key, find_image, load_index, publish, put_index
from indexer.format import Index, encode_index, with_meta
from indexer.sources import open_source
from indexer.tree import Node, new_dir

SECRET = b"top secret\n"
PUBLIC = b"public\n"
TOOL = b"#!/bin/sh\necho tool\n"


def _image(tmp_path: Path) -> tuple[str, str]:
    """An image with a 0600 secret, a public file and a plain 0755 tool: (store, ref)."""
    build_layout(tmp_path / "layout", "t", [[
        Entry("a-secret", data=SECRET, mode=0o600),
        Entry("bin", "dir"),
        Entry("bin/tool", data=TOOL, mode=0o755),
        Entry("public", data=PUBLIC, mode=0o644),
    ]])
    url = f"file://{tmp_path}/store"
    result = index_image(open_source(f"oci:{tmp_path / 'layout'}:t"), open_store(url),
                         IndexOptions())
    return url, result.record.ref


def _forged_image() -> bytes:
    """The EROFS image of a forged tree with the same names: the secret world-readable and
    also served as `public` (a hard link, so overlayfs redirects both to the secret's
    bytes), the tool setuid root."""
    root = new_dir(0o755)
    binary = new_dir(0o755)
    assert root.children is not None and binary.children is not None
    secret = Node(stat.S_IFREG | 0o644, size=len(SECRET), chunks=["00" * 32])
    root.children[b"a-secret"] = secret
    root.children[b"public"] = secret
    root.children[b"bin"] = binary
    binary.children[b"tool"] = Node(stat.S_IFREG | 0o4755, size=len(TOOL), chunks=["11" * 32])
    return erofs.build(Index(encode_index(root, {}, 4 << 20)))


def _plant_in_store(store: BlobStore, index_key: str, image: bytes) -> None:
    """What `cafs index` would write for `image`: its own BLAKE3, then its envelope."""
    store.put(erofs_key(index_key), bytes.fromhex(digest(image)) + encode(image))


def _needs_kernel_metadata() -> None:
    why = kernelmeta.unsupported()
    if why is not None:
        pytest.skip(f"kernel metadata unavailable here: {why}")


def _assert_true_tree(mnt: Path) -> None:
    assert mount.query(mnt, "info")["metadata"] == "kernel"
    assert stat.S_IMODE((mnt / "a-secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((mnt / "bin/tool").stat().st_mode) == 0o755
    assert (mnt / "public").read_bytes() == PUBLIC
    assert (mnt / "a-secret").read_bytes() == SECRET
    assert (mnt / "bin/tool").read_bytes() == TOOL
    assert (mnt / "public").stat().st_ino != (mnt / "a-secret").stat().st_ino


@pytest.mark.root
def test_a_forged_erofs_image_in_the_store_is_not_served(tmp_path: Path) -> None:
    """The store's image is not the one the verified index records: the mount builds the
    image from the index and serves the true names, modes and contents."""
    _needs_kernel_metadata()
    url, ref = _image(tmp_path)
    store = open_store(url)
    top = find_image(store, ref).index
    _plant_in_store(store, top, _forged_image())
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        _assert_true_tree(mnt)
    log = log_of(tmp_path / "mnt")
    assert "is not the one its index records" in log and "built the EROFS image" in log


@pytest.mark.root
def test_another_user_sees_the_true_modes_despite_a_forged_image(tmp_path: Path,
                                                                 attacker: User) -> None:
    """The attack as the user it is aimed at: another local user reading the mount finds
    no setuid binary, cannot read the 0600 file, and reads `public` as itself."""
    _needs_kernel_metadata()
    url, ref = _image(tmp_path)
    store = open_store(url)
    _plant_in_store(store, find_image(store, ref).index, _forged_image())
    mnt = reachable_dir(tmp_path / "shared") / "mnt"
    with mounted(ref, mnt, url, tmp_path / "cache"):
        res = attacker.python(f"""
import json, os
mnt = {str(mnt)!r}
out = {{"tool": os.stat(mnt + "/bin/tool").st_mode & 0o7777,
        "public": open(mnt + "/public").read()}}
try:
    out["secret"] = open(mnt + "/a-secret").read()
except PermissionError:
    out["secret"] = None
print(json.dumps(out))
""")
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    assert seen == {"tool": 0o755, "public": PUBLIC.decode(), "secret": None}


@pytest.mark.root
def test_an_index_without_the_record_never_mounts_the_stored_image(tmp_path: Path) -> None:
    """An index from before the record existed: whatever the store holds under its key,
    the node builds the image from the index itself."""
    _needs_kernel_metadata()
    url, ref = _image(tmp_path)
    store = open_store(url)
    record = find_image(store, ref)
    old = load_index(store, record.index)
    meta = {k: v for k, v in old.meta.items() if k != erofs.RECORD}
    assert meta != old.meta
    record.index = put_index(store, with_meta(old.to_bytes(), meta))
    record.ref = ref + "-old"
    publish(store, record)
    _plant_in_store(store, record.index, _forged_image())
    with mounted(record.ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        _assert_true_tree(mnt)
    log = log_of(tmp_path / "mnt")
    assert "records no EROFS image digest" in log and "built the EROFS image" in log


@pytest.mark.root
def test_an_image_an_older_cafs_cached_unchecked_is_not_mounted(tmp_path: Path) -> None:
    """A node cache written by a cafs that mounted the store's copy unchecked may hold a
    forged image, sealed with its plain BLAKE3: it is not trusted, but replaced."""
    _needs_kernel_metadata()
    url, ref = _image(tmp_path)
    top = find_image(open_store(url), ref).index
    forged = _forged_image()
    cached = tmp_path / "cache" / "erofs" / f"{top}.v{erofs.VERSION}"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(forged + blake3.blake3(forged).digest())
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        _assert_true_tree(mnt)
    assert not cached.read_bytes().startswith(forged)


def test_the_top_index_records_the_image_a_node_would_build(tmp_path: Path) -> None:
    """The digest `cafs index` records is that of the image any node builds from the
    index it verified (the image does not depend on the record), so the stored image
    is used; lower chains record none."""
    url, ref = _image(tmp_path)
    store = open_store(url)
    record = find_image(store, ref)
    top = load_index(store, record.index)
    assert erofs.recorded(top) == digest(erofs.build(top))
    assert kernelmeta.fetch(record.index, tmp_path / "cache", store) is not None
    path = kernelmeta.image(top, record.index, tmp_path / "cache", store)
    assert path.read_bytes()[:-32] == erofs.build(top)


# ------------------------------------------------------------------ NUL and '/' in names


def _cafs(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a process of its own, output as a terminal would get."""
    return subprocess.run([sys.executable, "-m", "cafs", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_cafs_index_refuses_a_nul_in_a_name_in_one_line(tmp_path: Path) -> None:
    """`bin/sh\\0` in a PAX path (umoci: "invalid tar header")."""
    layer = (tarcraft.special(b"x", tarcraft.pax_record("path", b"bin/sh\0"))
             + tarcraft.member(b"placeholder", b"evil\n") + tarcraft.end())
    tarcraft.raw_layout(tmp_path / "layout", "t", [layer])
    res = _cafs("index", f"oci:{tmp_path / 'layout'}:t", "--store", f"file://{tmp_path}/s")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "invalid tar header" in res.stderr, res.stderr
    assert "NUL" in res.stderr and "Traceback" not in res.stderr


def _crafted_index(tmp_path: Path) -> tuple[str, str]:
    """An image indexed as usual, whose top index is then rewritten as a hostile indexer
    could: `bin/sh\\0` (setuid) beside `bin/sh`, and `zz\\0hidden` (0600) in the root."""
    build_layout(tmp_path / "layout", "t", [[
        Entry("bin", "dir"),
        Entry("bin/sh", data=b"shell\n", mode=0o755),
        Entry("bin/sh~", data=b"evil\n", mode=0o4755),
        Entry("zz~hidden", data=SECRET, mode=0o600),
    ]])
    url = f"file://{tmp_path}/store"
    store = open_store(url)
    record = index_image(open_source(f"oci:{tmp_path / 'layout'}:t"), store,
                         IndexOptions()).record
    data = load_index(store, record.index).to_bytes()
    for stand_in, name in ((b"sh~", b"sh\0"), (b"zz~hidden", b"zz\0hidden")):
        assert data.count(stand_in) == 1
        data = data.replace(stand_in, name)
    record.index, record.ref = put_index(store, data), "crafted:1"
    publish(store, record)
    return url, record.ref


@pytest.mark.root
def test_a_crafted_index_with_nul_names_serves_nothing_under_a_false_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Served through FUSE, the listing that used to map `bin/sh` to the setuid entry
    (and made `zz` read the hidden file) fails; nothing is ever served under a truncated
    name. With kernel metadata, the mount itself is refused, clearly."""
    url, ref = _crafted_index(tmp_path)
    monkeypatch.setenv("CAFS_KERNEL_METADATA", "off")
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        for directory in (mnt, mnt / "bin"):
            with pytest.raises(OSError) as err:
                os.listdir(directory)
            assert err.value.errno == errno.EIO
        for path in (mnt / "zz", mnt / "bin/sh"):
            with pytest.raises(OSError):
                path.read_bytes()
    assert "invalid entry name" in log_of(tmp_path / "mnt")
    if kernelmeta.unsupported() is not None:
        return
    monkeypatch.setenv("CAFS_KERNEL_METADATA", "auto")
    (tmp_path / "mnt2").mkdir()
    with pytest.raises(mount.MountError, match="invalid entry name") as refused:
        mount.mount_detached(ref, tmp_path / "mnt2", store_url=url,
                             cache_dir=tmp_path / "cache", log_file=tmp_path / "mnt2.log")
    assert "\n" not in str(refused.value)
    assert not mount.is_mounted(tmp_path / "mnt2")


# ----------------------------------------------------------------- terminal injection


def test_shown_escapes_what_a_terminal_would_act_on() -> None:
    assert shown("bin/evil\rharmless\x1b[2J\x07\x9b\x7f") == (
        "bin/evil\\rharmless\\x1b[2J\\x07\\x9b\\x7f")
    assert shown("a\u202eb\u2028c\tn\n") == "a\\u202eb\\u2028c\\tn\\n"
    assert shown(b"caf\xc3\xa9 \xff") == "café \\xff"
    assert shown(b"\xff".decode("utf-8", "surrogateescape")) == "\\xff"
    assert shown("plain ascii, ünïcode, 日本 [bold]") == "plain ascii, ünïcode, 日本 [bold]"


CONTROL = ("\x1b", "\x07", "\r", "\x9b")


def test_inspect_tree_and_images_escape_control_characters(tmp_path: Path) -> None:
    """A name with CR makes a setuid entry's line display as a harmless one; ESC and BEL
    drive the terminal. Listings show them escaped, and the line keeps its true mode."""
    build_layout(tmp_path / "layout", "t", [[
        Entry("bin", "dir"),
        Entry(b"bin/evil\r100644     0     0            1 bin-harmless", data=b"x",
              mode=0o4755),
        Entry(b"bin/\x1b]0;pwned\x07title", data=b"y"),
        Entry(b"bin/\x1b[2Jclear", data=b"z"),
    ]])
    store = f"file://{tmp_path}/store"
    ref = "img\x1b[31m\r:1"
    indexed = _cafs("index", f"oci:{tmp_path / 'layout'}:t", "--store", store, "--name", ref)
    assert indexed.returncode == 0, indexed.stderr
    tree = _cafs("inspect", ref, "--store", store, "--tree")
    assert tree.returncode == 0, tree.stderr
    assert not any(c in tree.stdout for c in CONTROL), tree.stdout
    lines = tree.stdout.splitlines()
    evil = [line for line in lines if "bin/evil" in line]
    assert evil == ["104755     0     0            1 bin/evil\\r100644     0     0"
                    "            1 bin-harmless"]
    assert "bin/\\x1b]0;pwned\\x07title" in tree.stdout
    assert "bin/\\x1b[2Jclear" in tree.stdout
    for argv in (("images",), ("index", f"oci:{tmp_path / 'layout'}:t", "--store", store,
                               "--name", ref), ("inspect", ref)):
        res = _cafs(*argv, "--store", store) if argv[0] != "index" else _cafs(*argv)
        assert res.returncode == 0, res.stderr
        assert "img\\x1b[31m\\r:1" in res.stdout, (argv, res.stdout)
        assert not any(c in res.stdout + res.stderr for c in CONTROL), (argv, res.stdout)


def test_error_messages_naming_a_path_escape_control_characters(tmp_path: Path) -> None:
    res = _cafs("umount", str(tmp_path / "x\x1b[2J\x07\ry"))
    assert res.returncode == 1
    assert "x\\x1b[2J\\x07\\ry" in res.stderr
    assert not any(c in res.stderr for c in CONTROL) and res.stderr.count("\n") == 1
