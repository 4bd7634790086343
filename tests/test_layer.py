"""Layer application semantics, and hostile layers, on in-memory tars."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile

import pytest
from tarcraft import Endless, end, header, member, pad, pax_record, record_of_size, special

from blobstore.envelope import digest
from indexer.compression import open_layer
from indexer.layer import LayerApplier, LayerError
from indexer.tarheaders import MAX_SPECIAL_HEADER
from indexer.tree import Node, new_dir


class Sink:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, key: str, data: bytes) -> None:
        self.blobs[key] = bytes(data)


def tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def f(name: str, data: bytes = b"x", mode: int = 0o644, **pax: str) -> tuple[tarfile.TarInfo,
                                                                          bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
    info.pax_headers = dict(pax)
    return info, data


def d(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def apply(*layers: io.BytesIO, chunk: int = 4) -> tuple[Node, Sink]:
    root, sink = new_dir(), Sink()
    applier = LayerApplier(root, sink, digest, chunk)
    for layer in layers:
        applier.apply(layer)
    return root, sink


def get(root: Node, path: str) -> Node | None:
    node: Node | None = root
    for part in path.encode().split(b"/"):
        if node is None or node.children is None:
            return None
        node = node.children.get(part)
    return node


def test_whiteouts_apply_to_lower_layers_only() -> None:
    root, _ = apply(
        tar(f("a/old"), f("a/keep"), d("gone"), f("gone/x")),
        tar(f("a/.wh.old"), f("a/new"), f("a/.wh.new"), f(".wh.gone")),
    )
    assert get(root, "a/old") is None and get(root, "gone") is None
    assert get(root, "a/keep") is not None
    assert get(root, "a/new") is not None  # created in the same layer as its whiteout


def test_opaque_directory_hides_lower_entries_but_not_its_own_layer() -> None:
    root, _ = apply(
        tar(f("d/lower1"), d("d/sub"), f("d/sub/y")),
        tar(d("d"), f("d/.wh..wh..opq"), f("d/upper")),
    )
    d_node = get(root, "d")
    assert d_node is not None and d_node.children is not None
    assert sorted(d_node.children) == [b"upper"]


def test_file_replaces_directory_and_directory_replaces_file() -> None:
    root, _ = apply(tar(d("x"), f("x/inner"), f("y")), tar(f("x", b"now a file"), d("y")))
    x, y = get(root, "x"), get(root, "y")
    assert x is not None and x.is_reg and x.size == 10
    assert y is not None and y.is_dir and y.children == {}


def test_directory_over_directory_keeps_children_and_takes_new_metadata() -> None:
    root, _ = apply(tar(d("x", 0o755), f("x/inner")), tar(d("x", 0o700)))
    x = get(root, "x")
    assert x is not None and stat.S_IMODE(x.mode) == 0o700 and get(root, "x/inner") is not None


def test_hard_links_share_one_node_and_chunks_are_content_addressed() -> None:
    root, sink = apply(tar(f("bin/su", b"0123456789", 0o4755),
                           link("bin/su2", "bin/su", tarfile.LNKTYPE)))
    a, b = get(root, "bin/su"), get(root, "bin/su2")
    assert a is b and a is not None and stat.S_IMODE(a.mode) == 0o4755
    assert a.chunks == [digest(b"0123"), digest(b"4567"), digest(b"89")]
    assert sink.blobs[digest(b"89")] == b"89"


@pytest.mark.parametrize("target", ["missing", "dir"])
def test_bad_hard_links_are_refused(target: str) -> None:
    with pytest.raises(LayerError, match="hard link"):
        apply(tar(d("dir"), link("l", target, tarfile.LNKTYPE)))


def test_parents_resolve_through_symlinks_inside_the_image() -> None:
    root, _ = apply(tar(d("usr/lib"), link("lib", "usr/lib"), link("abs", "/usr/lib/../lib")),
                    tar(f("lib/libc.so"), f("abs/libm.so")))
    assert get(root, "usr/lib/libc.so") is not None
    assert get(root, "usr/lib/libm.so") is not None
    lib = get(root, "lib")
    assert lib is not None and lib.is_symlink


def test_symlinks_climbing_above_root_stay_inside() -> None:
    root, _ = apply(tar(d("etc"), link("up", "../../../../etc")), tar(f("up/passwd")))
    assert get(root, "etc/passwd") is not None


def test_implicit_parents_are_created() -> None:
    root, _ = apply(tar(f("a/b/c/file")))
    for path in ("a", "a/b", "a/b/c"):
        node = get(root, path)
        assert node is not None and node.is_dir and stat.S_IMODE(node.mode) == 0o755


def test_pax_mtime_is_exact_to_the_nanosecond_and_xattrs_are_binary() -> None:
    cap = b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    root, _ = apply(tar(f("ping", mtime="1700000000.123456789",
                          **{"SCHILY.xattr.security.capability":
                             cap.decode("utf-8", "surrogateescape")})))
    node = get(root, "ping")
    assert node is not None and node.mtime_ns == 1_700_000_000_123_456_789
    assert node.xattrs == {b"security.capability": cap}


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape", "a/../../b"])
def test_escaping_paths_are_refused(name: str) -> None:
    with pytest.raises(LayerError):
        apply(tar(f(name)))


def _pax_entry(records: bytes, name: bytes = b"placeholder", kind: bytes = tarfile.REGTYPE,
               data: bytes = b"x") -> io.BytesIO:
    """One entry behind a PAX header of `records` (tarfile would not write a NUL there)."""
    size = len(data) if kind == tarfile.REGTYPE else 0
    body = header(name, size, kind) + (pad(data) if size else b"")
    return io.BytesIO(special(b"x", records) + body + end())


@pytest.mark.parametrize(("records", "kind"), [
    (pax_record("path", b"bin/sh\0"), tarfile.REGTYPE),
    (pax_record("path", b"zz\0hidden"), tarfile.REGTYPE),
    (pax_record("linkpath", b"/bin/sh\0x"), tarfile.SYMTYPE),
    (pax_record("linkpath", b"a\0"), tarfile.LNKTYPE),
    (pax_record("SCHILY.xattr.user.a\0b", b"v"), tarfile.REGTYPE),
])
def test_nul_in_names_is_refused_as_umoci_does(records: bytes, kind: bytes) -> None:
    """A PAX record may carry a NUL that a ustar field cannot; the kernel would end the
    name there, so the image would show a name it does not hold."""
    layers = [_pax_entry(b"", b"a")] if kind == tarfile.LNKTYPE else []
    with pytest.raises(LayerError, match=r"invalid tar header: .* has a NUL byte"):
        apply(*layers, _pax_entry(records, kind=kind))


def test_corrupt_and_truncated_tars_are_refused() -> None:
    data = tar(f("a", b"y" * 5000)).getvalue()
    with pytest.raises(LayerError):
        apply(io.BytesIO(data[:3000]))
    bad = bytearray(data)
    bad[100:140] = b"\xff" * 40  # header checksum no longer matches
    with pytest.raises(LayerError):
        apply(io.BytesIO(bytes(bad)))


def test_decompression_bomb_is_stopped() -> None:
    bomb = gzip.compress(tar(f("zeros", bytes(8 << 20))).getvalue())
    assert len(bomb) < 64 << 10
    stream = open_layer(io.BytesIO(bomb), limit=1 << 20)
    with pytest.raises(LayerError, match="decompression bomb"):
        apply(stream)  # type: ignore[arg-type]


def test_corrupt_gzip_is_a_layer_error() -> None:
    packed = bytearray(gzip.compress(tar(f("a", bytes(range(256)) * 100)).getvalue()))
    packed[len(packed) // 2] ^= 0xFF
    with pytest.raises(LayerError):
        apply(open_layer(io.BytesIO(bytes(packed)), limit=1 << 30))  # type: ignore[arg-type]


def test_whiteout_of_a_directory_the_layer_added_to_acts_as_opaque() -> None:
    root, _ = apply(tar(f("d/lower"), f("d/sub/lower2")),
                    tar(f("d/sub/new"), f("d/new"), f(".wh.d")))
    assert get(root, "d/new") is not None and get(root, "d/sub/new") is not None
    assert get(root, "d/lower") is None and get(root, "d/sub/lower2") is None


def test_forbidden_and_empty_xattrs_are_dropped() -> None:
    root, _ = apply(tar(f("x", **{"SCHILY.xattr.security.selinux": "label",
                                  "SCHILY.xattr.trusted.overlay.opaque": "y",
                                  "SCHILY.xattr.user.empty": "",
                                  "SCHILY.xattr.user.kept": "v"})))
    node = get(root, "x")
    assert node is not None and node.xattrs == {b"user.kept": b"v"}


def test_hard_link_cannot_escape_and_duplicates_take_the_last_entry() -> None:
    with pytest.raises(LayerError, match=r"\.\."):
        apply(tar(f("a"), link("b", "../../etc/shadow", tarfile.LNKTYPE)))
    root, _ = apply(tar(f("dup", b"first"), f("dup", b"second!")))
    node = get(root, "dup")
    assert node is not None and node.size == 7


def test_overlong_names_are_refused() -> None:
    with pytest.raises(LayerError, match="255 bytes"):
        apply(tar(f("d/" + "n" * 256)))
    root, _ = apply(tar(f("d/" + "n" * 255)))
    assert get(root, "d/" + "n" * 255) is not None


# -- gigantic special headers (bounded as Go's archive/tar bounds them) ------------------------


def _with_pax(record: bytes, kind: bytes = tarfile.XHDTYPE) -> io.BytesIO:
    return io.BytesIO(special(kind, record) + member(b"f", b"data") + end())


def test_pax_header_over_the_bound_is_refused() -> None:
    """Without the bound this layer is accepted: one file with a 1 MiB xattr."""
    record = record_of_size("SCHILY.xattr.user.big", MAX_SPECIAL_HEADER + 1)
    with pytest.raises(LayerError, match=r"PAX extended header of 1048577 bytes is over"):
        apply(_with_pax(record))


def test_pax_header_at_the_bound_and_a_64k_xattr_still_work() -> None:
    record = record_of_size("SCHILY.xattr.user.big", MAX_SPECIAL_HEADER)
    root, _ = apply(_with_pax(record))
    node = get(root, "f")
    assert node is not None and len(node.xattrs[b"user.big"]) > MAX_SPECIAL_HEADER - 64
    value = "x" * (64 << 10)
    long_name = "/".join(["d" * 200] * 19) + "/file"  # 3.8 KiB through a PAX path record
    root, _ = apply(tar(f(long_name, b"ok", **{"SCHILY.xattr.user.v": value})))
    node = get(root, long_name)
    assert node is not None and node.xattrs == {b"user.v": value.encode()}


def test_a_2gib_pax_header_is_refused_without_reading_it() -> None:
    stream = Endless(header(b"././@PaxHeader", 2 << 30, tarfile.XHDTYPE))
    with pytest.raises(LayerError, match="over the limit"):
        apply(stream)  # type: ignore[arg-type]
    assert stream.count < 64 << 10


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
def test_gnu_long_names_over_the_bound_are_refused(kind: bytes) -> None:
    body = b"n" * MAX_SPECIAL_HEADER + b"\0"
    layer = special(kind, body, b"././@LongLink") + member(b"f", b"x") + end()
    with pytest.raises(LayerError, match=r"GNU long (link )?name of 1048577 bytes"):
        apply(io.BytesIO(layer))
    buf = io.BytesIO()  # tarfile writes a legal GNU long name itself
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("a/" + "n" * 200 + "/b" * 40)
        tf.addfile(info, io.BytesIO(b""))
    root, _ = apply(io.BytesIO(buf.getvalue()))
    assert get(root, "a/" + "n" * 200 + "/b" * 40) is not None


def test_global_pax_headers_share_one_bound() -> None:
    half = MAX_SPECIAL_HEADER // 2 + 100
    layer = (special(tarfile.XGLTYPE, record_of_size("comment.a", half)) + member(b"a", b"1")
             + special(tarfile.XGLTYPE, record_of_size("comment.b", half)) + member(b"b", b"2")
             + end())
    with pytest.raises(LayerError, match="PAX global header"):
        apply(io.BytesIO(layer))


def test_a_chain_of_special_headers_is_cut_short() -> None:
    chain = b"".join(special(tarfile.XHDTYPE, pax_record("comment", b"c")) for _ in range(40))
    with pytest.raises(LayerError, match="special tar headers before one entry"):
        apply(io.BytesIO(chain + member(b"f", b"x") + end()))
    few = b"".join(special(tarfile.XHDTYPE, pax_record("comment", b"c")) for _ in range(3))
    root, _ = apply(io.BytesIO(few + member(b"f", b"x") + end()))
    assert get(root, "f") is not None


def _struct(offset: int, size: int) -> bytes:
    return b"%011o\0" % offset + b"%011o\0" % size


def test_endless_gnu_sparse_maps_are_refused() -> None:
    """Old GNU sparse: extension blocks for ever; PAX 1.0: a map claiming 10^12 entries."""
    old = header(b"sparse", 0, tarfile.GNUTYPE_SPARSE,
                 {386: _struct(1, 1), 482: b"\x01", 483: b"%011o\0" % 4096})
    ext = bytearray(_struct(1, 1) * 21 + bytes(8))
    ext[504] = 1
    stream = Endless(old, bytes(ext))
    with pytest.raises(LayerError, match="GNU sparse map is over the limit"):
        apply(stream)  # type: ignore[arg-type]
    assert stream.count < 4 * MAX_SPECIAL_HEADER
    pax = b"".join(pax_record(k, v) for k, v in (("GNU.sparse.major", b"1"),
                                                  ("GNU.sparse.minor", b"0"),
                                                  ("GNU.sparse.name", b"sparse"),
                                                  ("GNU.sparse.realsize", b"4096")))
    head = special(tarfile.XHDTYPE, pax) + header(b"sparse", 1 << 30, tarfile.REGTYPE)
    stream = Endless(head + b"1000000000000\n", b"1\n")
    with pytest.raises(LayerError, match="GNU sparse map is over the limit"):
        apply(stream)  # type: ignore[arg-type]
    assert stream.count < 4 * MAX_SPECIAL_HEADER


def test_whiteout_over_very_deep_directories_is_applied_not_a_recursion_error() -> None:
    deep = "/".join(["d"] * 1500)  # 3000 bytes: within MAX_PATH, beyond Python's recursion
    root, _ = apply(tar(f(deep + "/lower")), tar(f(deep + "/upper"), f(".wh.d")))
    assert get(root, deep + "/upper") is not None and get(root, deep + "/lower") is None


@pytest.mark.parametrize("length", [251, 252, 255])
def test_whiteout_of_a_name_up_to_255_bytes_is_applied(length: int) -> None:
    """Its own name is 4 bytes longer than the name it removes; umoci applies it."""
    name = "n" * length
    root, _ = apply(tar(f(name), f(f"d/{name}"), f("keep")),
                    tar(f(f".wh.{name}", b""), f(f"d/.wh.{name}", b"")))
    assert get(root, name) is None and get(root, f"d/{name}") is None
    assert get(root, "keep") is not None


def test_names_and_whiteouts_of_names_over_255_bytes_are_refused() -> None:
    for bad in ("n" * 256, ".wh." + "n" * 256, "n" * 256 + "/f", ".wh." + "n" * 252 + "/f"):
        with pytest.raises(LayerError, match="over 255 bytes"):
            apply(tar(f(bad, b"")))


@pytest.mark.parametrize("mtime", ["1e30", "-1e30", "inf", "-inf", "nan", "1_000", " 5",
                                   "5 ", "0x10", "9223372036854775808", "", ".5", "1.2.3"])
def test_a_pax_mtime_go_refuses_is_a_one_line_layer_error(mtime: str) -> None:
    """Go's archive/tar (so umoci) refuses these headers; they once ended `cafs index` in
    a traceback (Decimal('inf') cannot be an int, 1e30 ns overflowed the index)."""
    with pytest.raises(LayerError, match="bad PAX mtime") as exc:
        apply(tar(f("a", mtime=mtime)))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("mtime", "ns"), [
    ("+5", 5_000_000_000), ("5.", 5_000_000_000), ("-1.5", -1_500_000_000),
    ("1.1234567899", 1_123_456_789),  # digits past the nanosecond are cut, as Go does
    ("99999999999", (1 << 63) - 1),  # past 2262: clamped to the index's i64 nanoseconds
    ("-9223372036854775808", -(1 << 63)),
])
def test_pax_mtimes_go_accepts_are_applied_within_the_index_range(mtime: str, ns: int) -> None:
    root, _ = apply(tar(f("a", mtime=mtime)))
    node = get(root, "a")
    assert node is not None and node.mtime_ns == ns
