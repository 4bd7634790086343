"""The EROFS metadata image: checked by erofs-utils' fsck, mounted by the kernel on its own
and compared with the index it came from, and refused where overlayfs would misread it."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cafs.daemon import kernelmeta
from indexer import erofs
from indexer.format import Index, encode_index
from indexer.tree import Node, new_dir

BIG = 1 << 44  # more than one chunk even at EROFS's largest chunk size (8 TiB)


def _tree() -> Node:
    root = new_dir(0o755, mtime_ns=-1_500_000_001)
    assert root.children is not None
    etc = new_dir(0o700, uid=70_000, gid=80_000, mtime_ns=123)
    assert etc.children is not None
    root.children[b"etc"] = etc
    f = Node(stat.S_IFREG | 0o4755, uid=1, gid=2, mtime_ns=1_700_000_000_123_456_789, size=9,
             chunks=["aa" * 32], xattrs={b"security.capability": b"\x01\x00\x00\x02" + bytes(16),
                                         b"user.note": b"x" * 300})
    etc.children[b"file"] = f
    etc.children[b"hard"] = f
    etc.children[b"empty"] = Node(stat.S_IFREG | 0o644)
    etc.children[b"huge"] = Node(stat.S_IFREG | 0o644, size=BIG, chunks=["bb" * 32])
    root.children[b"sym"] = Node(stat.S_IFLNK | 0o777, target=b"/etc/file")
    root.children[b"longsym"] = Node(stat.S_IFLNK | 0o777, target=b"d/" * 2000)
    root.children[b"\xff\xfename"] = Node(stat.S_IFCHR | 0o600, rdev=os.makedev(300, 70_000))
    root.children[b"blk"] = Node(stat.S_IFBLK | 0o600, rdev=os.makedev(8, 1))
    root.children[b"fifo"] = Node(stat.S_IFIFO | 0o644)
    big = new_dir(0o755)  # many blocks of dirents
    assert big.children is not None
    for n in range(3000):
        big.children[b"entry-%05d-" % n + b"n" * (n % 200)] = Node(stat.S_IFREG | 0o644)
    root.children[b"big"] = big
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, Path]:
    index = Index(encode_index(_tree(), {"chain": "sha256:" + "c" * 64}, 4 << 20))
    path = tmp_path_factory.mktemp("erofs") / "meta.erofs"
    path.write_bytes(erofs.build(index))
    return index, path


def test_the_build_is_deterministic(image: tuple[Index, Path]) -> None:
    index, path = image
    assert erofs.build(index) == path.read_bytes()


def test_erofs_utils_fsck_accepts_the_image(image: tuple[Index, Path]) -> None:
    res = subprocess.run(["fsck.erofs", str(image[1])], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _erofs_in_kernel() -> bool:
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == "erofs" for line in f if line.strip())


@pytest.fixture(scope="module")
def mounted_image(image: tuple[Index, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not _erofs_in_kernel():  # a kernel feature, not root or FUSE: cafs then uses FUSE alone
        pytest.skip("this kernel has no erofs")
    mnt = tmp_path_factory.mktemp("erofs-mnt")
    subprocess.run(["mount", "-t", "erofs", "-o", "ro", str(image[1]), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.root
def test_the_kernel_serves_the_index_exactly(image: tuple[Index, Path],
                                             mounted_image: Path) -> None:
    index, _ = image
    seen = 0
    names: dict[int, set[bytes]] = {}
    for rel, node in index.walk():
        names.setdefault(node.ino, set()).add(b"/" + rel)
    for rel, node in index.walk():
        path = os.path.join(os.fsencode(mounted_image), rel)
        st = os.lstat(path)
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_nlink) == (
            node.mode, node.uid, node.gid, node.nlink), rel
        assert st.st_mtime_ns == node.mtime_ns, rel
        assert node.is_dir or st.st_size == node.size, rel
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert st.st_rdev == node.rdev
        if stat.S_ISLNK(node.mode):
            assert os.readlink(path) == index.readlink(node.ino)
        expected = dict(index.xattrs(node.ino))
        got = {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False)
               for n in os.listxattr(path, follow_symlinks=False)}
        if node.is_reg and node.size:  # contents: at one of its names in the data layer
            expected[b"trusted.overlay.metacopy"] = b""
            assert got.get(b"trusted.overlay.redirect") in names[node.ino]
            expected[b"trusted.overlay.redirect"] = got[b"trusted.overlay.redirect"]
        assert got == expected, rel
        if node.is_dir:
            assert sorted(os.listdir(path)) == sorted(n for _, n, _ in index.entries(node.ino))
        seen += 1
    assert seen == index.inode_count + 1  # the hard link is walked twice
    hard = os.lstat(mounted_image / "etc/hard")
    assert hard.st_ino == os.lstat(mounted_image / "etc/file").st_ino


@pytest.mark.root
def test_huge_files_are_holes(mounted_image: Path) -> None:
    with open(mounted_image / "etc/huge", "rb") as f:
        f.seek(BIG - 4096)
        assert f.read() == bytes(4096)


@pytest.mark.parametrize("node, why", [
    (Node(stat.S_IFCHR | 0o600, rdev=0), "whiteout"),
    (Node(stat.S_IFREG | 0o644, xattrs={b"trusted.overlay.opaque": b"y"}), "overlayfs xattr"),
    (Node(stat.S_IFREG | 0o644, xattrs={b"system.nfs4_acl": b"y"}), "no EROFS name prefix"),
])
def test_what_overlayfs_would_misread_is_refused(node: Node, why: str) -> None:
    root = new_dir()
    assert root.children is not None
    root.children[b"odd"] = node
    with pytest.raises(erofs.Unrepresentable, match=why):
        erofs.build(Index(encode_index(root, {}, 4 << 20)))


def test_kernel_metadata_says_why_it_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="must be auto or off, not 'of'"):
        kernelmeta.unsupported("of")
    assert "turned off" in (kernelmeta.unsupported("off") or "")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in (kernelmeta.unsupported() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(kernelmeta, "_kernel", lambda: (6, 1))
    assert "6.5" in (kernelmeta.unsupported() or "") or "user namespace" in (
        kernelmeta.unsupported() or "")
