"""The binary index: round trips, O(1) access, and refusal of foreign or damaged bytes."""

from __future__ import annotations

import stat
import time

import pytest

from blobstore import envelope
from indexer.format import ROOT_INO, Index, IndexFormatError, encode_index
from indexer.tree import Node, new_dir


def _tree() -> Node:
    root = new_dir(0o755)
    etc = new_dir(0o700, uid=5, gid=6, mtime_ns=123)
    assert root.children is not None and etc.children is not None
    root.children[b"etc"] = etc
    f = Node(stat.S_IFREG | 0o4755, uid=1, gid=2, mtime_ns=1_700_000_000_123_456_789, size=9,
             chunks=["aa" * 32, "bb" * 32], xattrs={b"security.capability": b"\x01\x00\xff"})
    etc.children[b"file"] = f
    etc.children[b"link"] = f
    root.children[b"sym"] = Node(stat.S_IFLNK | 0o777, target=b"/etc/file")
    root.children[b"\xff\xfename"] = Node(stat.S_IFCHR | 0o600, rdev=0x0501)
    return root


def test_round_trip_preserves_everything() -> None:
    idx = Index(encode_index(_tree(), {"config": {"Cmd": ["sh"]}}, 4 << 20))
    assert idx.chunk_size == 4 << 20
    assert idx.config == {"Cmd": ["sh"]}
    assert idx.meta["files"] == 1 and idx.meta["bytes"] == 9
    f = idx.resolve(b"etc/file")
    assert f is not None and f == idx.resolve(b"/etc/link")
    node = idx.inode(f)
    assert (node.mode, node.uid, node.gid, node.nlink, node.size) == (
        stat.S_IFREG | 0o4755, 1, 2, 2, 9)
    assert node.mtime_ns == 1_700_000_000_123_456_789
    assert idx.chunks(f) == ["aa" * 32, "bb" * 32]
    assert idx.xattrs(f) == [(b"security.capability", b"\x01\x00\xff")]
    sym = idx.resolve(b"sym")
    assert sym is not None and idx.readlink(sym) == b"/etc/file"
    dev = idx.resolve(b"\xff\xfename")
    assert dev is not None and idx.inode(dev).rdev == 0x0501
    etc = idx.inode(idx.resolve(b"etc") or 0)
    assert etc.nlink == 2 and stat.S_IMODE(etc.mode) == 0o700
    assert idx.inode(ROOT_INO).nlink == 3  # '.', '..' and etc's '..'
    assert [p for p, _ in idx.walk()] == [b".", b"etc", b"sym", b"\xff\xfename",
                                          b"etc/file", b"etc/link"]
    assert idx.all_chunks() == {"aa" * 32, "bb" * 32}
    assert idx.resolve(b"etc/missing") is None and idx.resolve(b"sym/x") is None


def test_directories_give_the_tree_shape_without_names() -> None:
    idx = Index(encode_index(_tree(), {}, 4 << 20))
    assert dict(idx.directories()) == {
        ino: [child for _, _, child in idx.entries(ino)]
        for ino in range(ROOT_INO, idx.inode_count + 1) if idx.inode(ino).is_dir}
    etc = idx.resolve(b"etc")
    assert etc is not None and dict(idx.directories())[etc] == [idx.resolve(b"etc/file")] * 2
    idx._dirents = idx._dirents[:-1]  # the last entry cut short: its directory runs past
    with pytest.raises(IndexFormatError):
        list(idx.directories())


def test_encoding_is_deterministic() -> None:
    assert encode_index(_tree(), {"a": 1}, 1 << 20) == encode_index(_tree(), {"a": 1}, 1 << 20)


def test_large_directory_lookup_and_load_are_fast() -> None:
    root = new_dir()
    big = new_dir()
    assert root.children is not None and big.children is not None
    root.children[b"d"] = big
    for k in range(100_000):
        big.children[b"f%06d" % k] = Node(stat.S_IFREG | 0o644, size=k, chunks=[f"{k:064x}"])
    packed = envelope.encode(encode_index(root, {}, 4 << 20))
    t0 = time.perf_counter()
    idx = Index(envelope.decode(packed))
    load = time.perf_counter() - t0
    assert load < 0.3, f"loading a 100k-entry index took {load:.3f}s"
    d = idx.resolve(b"d")
    assert d is not None
    assert idx.lookup(d, b"f099999") is not None and idx.lookup(d, b"nope") is None
    assert [name for _, name, _ in idx.entries(d, 99_998)] == [b"f099998", b"f099999"]


def _weights_tree() -> tuple[Node, Node, Node]:
    root = new_dir(0o755)
    assert root.children is not None
    weights = Node(stat.S_IFREG | 0o644, size=40 << 20, chunks=["aa" * 32, "bb" * 32, "cc" * 32],
                   chunk_size=16 << 20)
    plain = Node(stat.S_IFREG | 0o644, size=5 << 20, chunks=["dd" * 32, "ee" * 32],
                 chunk_size=4 << 20)  # the default: stored as 0
    root.children[b"w.safetensors"] = weights
    root.children[b"plain"] = plain
    return root, weights, plain


def test_a_file_may_have_its_own_chunk_size() -> None:
    idx = Index(encode_index(_weights_tree()[0], {}, 4 << 20))
    assert (idx.chunk_size, idx.max_chunk_size) == (4 << 20, 16 << 20)
    assert idx.inode(idx.resolve(b"w.safetensors") or 0).chunk_size == 16 << 20
    assert idx.inode(idx.resolve(b"plain") or 0).chunk_size == 4 << 20
    assert idx.inode(ROOT_INO).chunk_size == 4 << 20


def test_a_version_1_index_reads_with_the_headers_chunk_size_for_every_file() -> None:
    data = bytearray(encode_index(_tree(), {}, 1 << 20))
    data[8:10] = (1).to_bytes(2, "little")  # a version 1 writer left the field 0
    idx = Index(bytes(data))
    assert idx.max_chunk_size == 1 << 20
    assert {idx.inode(n).chunk_size for n in range(1, idx.inode_count + 1)} == {1 << 20}


def test_the_encoder_refuses_a_chunk_size_no_reader_accepts() -> None:
    root, weights, _ = _weights_tree()
    weights.chunk_size = 100
    with pytest.raises(IndexFormatError, match="chunk size 100"):
        encode_index(root, {}, 4 << 20)


@pytest.mark.parametrize("damage", ["magic", "version", "truncated", "chunk size 0",
                                    "a file's chunk size 1"])
def test_foreign_or_damaged_index_is_refused(damage: str) -> None:
    data = bytearray(encode_index(_tree(), {}, 4096))
    if damage == "magic":
        data[0:4] = b"JUNK"
    elif damage == "version":
        data[8] = 99
    elif damage == "chunk size 0":  # every read would divide by it
        data[12:16] = bytes(4)
    elif damage == "a file's chunk size 1":
        inodes = int.from_bytes(data[32:40], "little")  # the second section's offset
        data[inodes + 64 + 60] = 1  # inode 2's own chunk size
    else:
        data = data[: len(data) // 2]
    with pytest.raises(IndexFormatError):
        Index(bytes(data))


def _crafted(name: bytes, stand_in: bytes) -> bytes:
    """An index whose root holds `sh` and, beside it, the entry `name`: written with a
    stand-in of the same length, then patched in the heap as a hostile indexer could."""
    root = new_dir(0o755)
    assert root.children is not None
    root.children[b"sh"] = Node(stat.S_IFREG | 0o755, size=1, chunks=["aa" * 32])
    root.children[stand_in] = Node(stat.S_IFREG | 0o4755, size=1, chunks=["bb" * 32])
    data = encode_index(root, {}, 4 << 20)
    assert data.count(stand_in) == 1
    return data.replace(stand_in, name)


@pytest.mark.parametrize(("name", "stand_in"), [
    (b"sh\0", b"sh~"), (b"zz\0hidden", b"zz~hidden"), (b"a/b", b"a~b"), (b"..", b"~~"),
    (b".", b"~"),
])
def test_names_a_kernel_could_not_hand_back_are_refused_by_the_decoder(
        name: bytes, stand_in: bytes) -> None:
    """With NUL in a name, a FUSE listing showed `sh` with another entry's mode and
    contents; every name leaving the index is checked, so nothing reads as another."""
    idx = Index(_crafted(name, stand_in))  # no per-entry work at load: checked on use
    with pytest.raises(IndexFormatError, match="invalid entry name"):
        list(idx.entries(ROOT_INO))
    with pytest.raises(IndexFormatError, match="invalid entry name"):
        idx.lookup(ROOT_INO, b"sh")
    with pytest.raises(IndexFormatError, match="invalid entry name"):
        list(idx.walk())


@pytest.mark.parametrize("name", [b"sh\0", b"a/b", b"..", b"", b"n" * 256])
def test_the_encoder_refuses_such_names_too(name: bytes) -> None:
    root = new_dir(0o755)
    assert root.children is not None
    root.children[name] = Node(stat.S_IFREG | 0o644)
    with pytest.raises(IndexFormatError, match="invalid entry name"):
        encode_index(root, {}, 4 << 20)
