"""Test images: a small one for quick checks and an awkward one that tries every corner
of layer application (see the umoci facts in reference.py for how each must come out)."""

from __future__ import annotations

from typing import Any

from bench.imagebuild import Entry

E = Entry
MiB = 1 << 20

# security.capability, VFS_CAP_REVISION_2 with the effective flag: cap_net_raw=ep.
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
DEEP_DIRS = [f"d{i:02}" for i in range(60)]
DEEP_LEAF = "deep/" + "/".join(DEEP_DIRS) + "/leaf"
LONG_NAME = "names/" + "n" * 255
BIG_SEED = "awkward-big"  # shared by the large files: 4 MiB is a prefix of the others
NINE_MIB = 9 * MiB + 12345

SIMPLE_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
    "Cmd": ["/bin/hello"],
    "WorkingDir": "/data",
}
AWKWARD_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo awkward"],
    "WorkingDir": "/srv/data",
    "User": "1000:1000",
    "Labels": {"org.example.test": "awkward"},
}


def simple_layers() -> list[list[Entry]]:
    """Two layers: a few files, then a change, a whiteout, a new file, a moved symlink."""
    base = [
        E("etc", "dir"),
        E("etc/hostname", data=b"simple\n"),
        E("bin", "dir"),
        E("bin/hello", data=b"#!/bin/sh\necho hello\n", mode=0o755),
        E("data", "dir"),
        E("data/a.txt", data=b"a" * 1000),
        E("data/link", "symlink", linkname="a.txt"),
    ]
    update = [
        E("etc/hostname", data=b"simple v2\n"),
        E("data/a.txt", "whiteout"),
        E("data/b.txt", data=b"b" * 2000, uid=1000, gid=1000),
        E("data/link", "symlink", linkname="b.txt"),
    ]
    return [base, update]


def _base_layer() -> list[Entry]:
    deep = [E("deep", "dir")] + [
        E("deep/" + "/".join(DEEP_DIRS[: i + 1]), "dir") for i in range(len(DEEP_DIRS))
    ]
    return [
        E("./", "dir", mode=0o755, mtime=1_600_000_000),
        E("etc", "dir"),
        E("etc/hostname", data=b"awkward\n"),
        E("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        E("implicit/a/b/c/file", data=b"no entries for my parents\n"),
        # sizes around the 4 MiB chunk size; all from one seed, so chunks repeat
        E("sizes/empty"),
        E.random("sizes/exact_4m", 4 * MiB, seed=BIG_SEED),
        E.random("sizes/4m_plus_1", 4 * MiB + 1, seed=BIG_SEED),
        E.random("sizes/9m", NINE_MIB, seed=BIG_SEED),
        E("dup/one", data=b"same content\n"),
        E("dup/two", data=b"same content\n", mode=0o600, uid=5),
        E.random("dup/9m_copy", NINE_MIB, seed=BIG_SEED),
        E("modes", "dir"),
        E("modes/setuid", data=b"#!/bin/sh\necho root\n", mode=0o4755),
        E("modes/setgid", data=b"setgid\n", mode=0o2755, gid=50),
        E("modes/all_bits", data=b"7777\n", mode=0o7777),
        E("modes/no_bits", data=b"0000\n", mode=0o000),
        E("modes/sticky", "dir", mode=0o1777),
        E("modes/setgid_dir", "dir", mode=0o2775, gid=50),
        E("owners/dir", "dir", mode=0o750, uid=1000, gid=100),
        E("owners/dir/file", data=b"user\n", uid=1000, gid=1000),
        E("owners/nobody", data=b"nobody\n", uid=65534, gid=65534),
        E("owners/huge", data=b"pax ids\n", uid=3_000_000, gid=2_000_000),
        E("times/epoch", data=b"0\n", mtime=0),
        E("times/fraction", data=b"0.5\n", mtime=1_600_000_000.5),
        E("times/future", data=b"2100\n", mtime=4_102_444_800),
        E("times/link", "symlink", linkname="epoch", mtime=1_500_000_000),
        E("links/hard_a", data=b"three names, one inode\n"),
        E("links/hard_b", "hardlink", linkname="links/hard_a"),
        E("links/hard_c", "hardlink", linkname="links/hard_a", mode=0o600, uid=7),
        E("links/setuid_link", "hardlink", linkname="modes/setuid"),
        E("links/abs", "symlink", linkname="/etc/hostname"),
        E("links/rel", "symlink", linkname="../etc/hostname"),
        E("links/dangling", "symlink", linkname="does/not/exist"),
        E("links/loop", "symlink", linkname="loop"),
        E("srv/data", "dir", uid=1000, gid=1000),
        E("srv/data/in_dir", data=b"in the real directory\n"),
        E("links/dir", "symlink", linkname="../srv/data"),
        E("dev", "dir"),
        E("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        E("dev/sda", "block", mode=0o660, gid=6, devmajor=8, devminor=0),
        E("dev/fifo", "fifo", mode=0o620),
        E("xattrs/user", data=b"x\n", xattrs={"user.comment": b"hi", "user.bin": b"\0\1\xff"}),
        E("xattrs/ping", data=b"\x7fELF", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
        E("xattrs/setuid_cap", data=b"s", mode=0o4755, xattrs={"security.capability": CAP_NET_RAW}),
        E("xattrs/trusted", data=b"t\n", xattrs={"trusted.cafs": b"trusted value"}),
        E("xattrs/dir", "dir", xattrs={"user.dir": b"on a directory"}),
        E(
            "xattrs/forbidden",
            data=b"umoci drops some\n",
            xattrs={
                "security.selinux": b"system_u:object_r:etc_t:s0\0",
                "trusted.overlay.opaque": b"y",
                "user.empty": b"",
                "user.kept": b"kept",
            },
        ),
        E(b"names/latin1_caf\xe9", data=b"not UTF-8\n"),
        E(b"names/\xff\xfe\xfd", data=b"not UTF-8 at all\n"),
        E("names/ünïcødé 日本", data=b"UTF-8\n"),
        E("names/with space", data=b"space\n"),
        E("names/new\nline", data=b"newline\n"),
        E(LONG_NAME, data=b"255 bytes\n"),
        *deep,
        E(DEEP_LEAF, data=b"60 levels down\n"),
        # changed by the next layers
        E("wh/file", data=b"deleted later\n"),
        E("wh/dir/sub/x", data=b"deleted with its directory\n"),
        E("wh/recreate", data=b"old\n"),
        E("wh/keep", data=b"kept\n"),
        E("opq", "dir", mode=0o750),
        E("opq/old", data=b"hidden by the opaque marker\n"),
        E("opq/sub/old", data=b"hidden too\n"),
        E("opq2/old", data=b"hidden by the opaque marker\n"),
        E("swap/d2f/child", data=b"the directory becomes a file\n"),
        E("swap/f2d", data=b"the file becomes a directory\n"),
        E("swap/d2l/child", data=b"the directory becomes a symlink\n"),
        E("swap/l2d", "symlink", linkname="../srv/data"),
        E("redecl", "dir", uid=1, xattrs={"user.old": b"dropped when redeclared"}),
        E("redecl/kid", data=b"survives the redeclaration\n"),
    ]


def _change_layer() -> list[Entry]:
    return [
        E("wh/file", "whiteout"),
        E("wh/dir", "whiteout"),
        E("wh/recreate", "whiteout"),
        E("wh/recreate", data=b"new\n"),
        E("wh/same_layer", data=b"a whiteout after me in my own layer is a no-op\n"),
        E("wh/same_layer", "whiteout"),
        E("wh/never_existed", "whiteout"),
        E("opq", "opaque"),
        E("opq/new", data=b"added with the marker\n"),
        E("opq2/new", data=b"added before the marker\n"),
        E("opq2", "opaque"),
        E("swap/d2f", data=b"was a directory\n"),
        E("swap/f2d", "dir", mode=0o700),
        E("swap/f2d/inner", data=b"inside\n"),
        E("swap/d2l", "symlink", linkname="f2d"),
        E("swap/l2d", "dir", mode=0o711),
        E("redecl", "dir", mode=0o700, uid=2),
        E("links/lower_link", "hardlink", linkname="modes/setuid"),
        E("links/dir/through_link", data=b"written through a symlinked parent\n"),
        E("etc/hostname", data=b"changed\n", mtime=1_700_000_100),
        E("implicit2/x/y", data=b"implicit parents in an upper layer\n"),
    ]


def _more_layer() -> list[Entry]:
    return [
        E("links/hard_a", "whiteout"),
        E("sizes/exact_4m", "whiteout"),
        E("opq", "opaque"),
        E("opq/newer", data=b"only me\n"),
        E("xattrs/user", data=b"replaced, xattrs gone\n"),
        E("dev/null", "whiteout"),
    ]


def _top_layer() -> list[Entry]:
    return [
        E("./", "dir", mode=0o755, mtime=1_700_000_000),
        E("final", data=b"top layer\n", uid=33, gid=33),
        E("swap/d2f", "whiteout"),
        E("swap/d2f", "dir", mode=0o755),
    ]


def awkward_layers() -> list[list[Entry]]:
    """Four layers exercising whiteouts, opaque dirs, type changes, hard and symbolic
    links, devices, xattrs, odd modes, owners, times and names, deep and implicit paths,
    and files around the 4 MiB chunk size (about 26 MiB of data)."""
    return [_base_layer(), _change_layer(), _more_layer(), _top_layer()]
