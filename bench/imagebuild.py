"""Build OCI images from plain Python descriptions, without Docker and without internet.

Tests, the benchmark suite and the demo need images whose every byte is known: the indexer
is checked against exact expectations (whiteouts, hard links, odd names) and benchmarks
must be reproducible. So layers are written here deterministically (fixed mtimes, gzip
without a timestamp), which also makes "same layer content, same blob" hold when images
share layers. Large contents stream from callables or host files, so a multi-GiB image
never has to fit in memory.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import platform as _platform
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import blake3
import zstandard

from indexer.source import chain_ids

EntryKind = Literal[
    "file", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout", "opaque"
]
Compression = Literal["gzip", "zstd", "none"]
ChunkSource = Callable[[], Iterable[bytes]]
StrPath = str | os.PathLike[str]

DEFAULT_MTIME = 1_700_000_000.0
DEFAULT_CREATED = "2023-11-14T22:13:20Z"  # DEFAULT_MTIME in RFC 3339
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REF_NAME = "org.opencontainers.image.ref.name"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER: dict[Compression, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
WHITEOUT_PREFIX = b".wh."
OPAQUE_NAME = b".wh..wh..opq"
_IO_CHUNK = 1 << 20
_TAR_BLOCK = 512
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}
_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "whiteout": tarfile.REGTYPE,
    "opaque": tarfile.REGTYPE,
}


class BinaryWriter(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else os.fsencode(value)


def _tar_str(value: bytes) -> str:
    # tarfile wants str; surrogateescape lets any bytes (non-UTF-8 names, binary xattr
    # values) through, because tarfile re-encodes with the same error handler and then
    # marks the header hdrcharset=BINARY.
    return value.decode("utf-8", "surrogateescape")


@dataclass
class Entry:
    """One tar member of a layer.

    `mode` defaults by kind: 0o755 dirs, 0o777 symlinks, 0o644 everything else. Content is
    `data`, or `size` bytes produced by `data_source` (called again on every write, so one
    entry can go into several layers or images).
    """

    path: str | bytes
    kind: EntryKind = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = DEFAULT_MTIME
    linkname: str | bytes = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    size: int | None = None
    data_source: ChunkSource | None = None

    def __post_init__(self) -> None:
        if self.mode is None:
            self.mode = _DEFAULT_MODES.get(self.kind, 0o644)
        if self.data_source is None:
            if self.size is not None and self.size != len(self.data):
                raise ValueError(f"{self.path!r}: size {self.size} != len(data)")
            self.size = len(self.data)
        elif self.size is None or self.data:
            raise ValueError(f"{self.path!r}: data_source needs a size and no data")
        if self.size and self.kind != "file":
            raise ValueError(f"{self.path!r}: only files have content")

    @classmethod
    def sparse_zero(cls, path: str | bytes, size: int, **kwargs: Any) -> Entry:
        """`size` zero bytes that cost no memory, for multi-GiB files in tests."""
        return cls(path, "file", size=size, data_source=lambda: _zeros(size), **kwargs)

    @classmethod
    def random(
        cls, path: str | bytes, size: int, seed: str | bytes | None = None, **kwargs: Any
    ) -> Entry:
        """`size` incompressible, reproducible bytes, like model weights. Content depends
        only on `seed` (default: the path): equal seeds make duplicate files, and a shorter
        size gives a prefix of a longer one."""
        key = hashlib.sha256(_as_bytes(path if seed is None else seed)).digest()
        return cls(path, "file", size=size, data_source=lambda: _xof(key, size), **kwargs)

    @classmethod
    def from_host(cls, path: str | bytes, host_path: str | bytes, **kwargs: Any) -> Entry:
        """A host file's content (read when the layer is written) and metadata."""
        st = os.lstat(host_path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{host_path!r} is not a regular file")
        meta: dict[str, Any] = {
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": int(st.st_mtime),
            **kwargs,
        }
        return cls(path, "file", size=st.st_size, data_source=lambda: _read_file(host_path), **meta)

    def chunks(self) -> Iterator[bytes]:
        if self.data_source is None:
            if self.data:
                yield self.data
        else:
            yield from self.data_source()

    def tar_name(self) -> bytes:
        """The member name: whiteouts and opaque markers sit beside what they hide."""
        path = _as_bytes(self.path).strip(b"/")
        while path.startswith(b"./"):
            path = path[2:]
        if self.kind == "opaque":
            return path + b"/" + OPAQUE_NAME if path not in (b"", b".") else OPAQUE_NAME
        if self.kind == "whiteout":
            parent, _, name = path.rpartition(b"/")
            return (parent + b"/" if parent else b"") + WHITEOUT_PREFIX + name
        return path or b"."

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(_tar_str(self.tar_name()))
        info.type = _TAR_TYPES[self.kind]
        info.mode = self.mode if self.mode is not None else 0o644
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        # A float makes tarfile add a PAX mtime record; keep whole seconds in ustar only.
        info.mtime = self.mtime if self.mtime != int(self.mtime) else int(self.mtime)
        info.size = self.size or 0
        info.linkname = _tar_str(_as_bytes(self.linkname))
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.pax_headers = {
            f"SCHILY.xattr.{name}": _tar_str(value) for name, value in sorted(self.xattrs.items())
        }
        return info


def _zeros(size: int) -> Iterator[bytes]:
    block = bytes(min(size, _IO_CHUNK))
    for offset in range(0, size, _IO_CHUNK):
        yield block if size - offset >= _IO_CHUNK else block[: size - offset]


def _xof(key: bytes, size: int) -> Iterator[bytes]:
    hasher = blake3.blake3(key)
    for offset in range(0, size, _IO_CHUNK):
        yield hasher.digest(length=min(_IO_CHUNK, size - offset), seek=offset)


def _read_file(path: str | bytes) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(_IO_CHUNK):
            yield block


def write_layer(entries: Iterable[Entry], fileobj: BinaryWriter) -> None:
    """Write `entries`, in order, as an uncompressed PAX tar.

    Headers come from tarfile; content is streamed here, so a wrong `size` is caught and
    nothing large is buffered.
    """
    for entry in entries:
        fileobj.write(entry.tarinfo().tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        written = 0
        for chunk in entry.chunks():
            written += len(chunk)
            fileobj.write(chunk)
        if written != entry.size:
            raise ValueError(f"{entry.path!r}: wrote {written} bytes, declared {entry.size}")
        if written % _TAR_BLOCK:
            fileobj.write(bytes(_TAR_BLOCK - written % _TAR_BLOCK))
    fileobj.write(bytes(2 * _TAR_BLOCK))


# --- OCI image layouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What a test needs to know about a built image to check what was made of it."""

    layout_dir: Path
    tag: str
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]
    chain_ids: tuple[str, ...]
    uncompressed_size: int  # all layer tars together
    layer_media_type: str
    platform: str

    @property
    def ref(self) -> str:
        """`LAYOUT:TAG`, as umoci and skopeo's `oci:` transport spell it."""
        return f"{self.layout_dir}:{self.tag}"


def host_platform() -> str:
    machine = _platform.machine().lower()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _platform_obj(text: str) -> dict[str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"bad platform {text!r}: expected OS/ARCH[/VARIANT]")
    keys = ("os", "architecture", "variant")
    return dict(zip(keys, parts, strict=False))


class _HashingWriter:
    """Counts and sha256-hashes what passes through: one pass yields digest and size."""

    def __init__(self, inner: BinaryWriter) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


@dataclass(frozen=True)
class _LayerBlob:
    digest: str
    size: int
    diff_id: str
    raw_size: int


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algo / hexdigest


def _store_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest, len(data)


def _json_blob(layout: Path, digest: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(blob_path(layout, digest).read_bytes())
    return obj


def _write_layer_blob(
    layout: Path, write_tar: Callable[[BinaryWriter], None], compression: Compression
) -> _LayerBlob:
    """Compress and store one layer in a single pass, hashing both sides on the way."""
    fd, tmp_name = tempfile.mkstemp(prefix=".layer-", suffix=".tmp", dir=layout / "blobs")
    with open(fd, "wb") as raw:
        blob = _HashingWriter(raw)
        if compression == "gzip":
            with gzip.GzipFile(
                fileobj=blob, mode="wb", compresslevel=6, mtime=0, filename=""
            ) as gz:
                tar = _HashingWriter(gz)
                write_tar(tar)
        elif compression == "zstd":
            cctx = zstandard.ZstdCompressor(level=3)
            with cctx.stream_writer(blob, closefd=False) as zw:  # type: ignore[arg-type]
                tar = _HashingWriter(zw)
                write_tar(tar)
        else:
            tar = blob
            write_tar(tar)
    final = blob_path(layout, blob.digest)
    if final.exists():
        os.unlink(tmp_name)
    else:
        os.replace(tmp_name, final)
    return _LayerBlob(blob.digest, blob.size, tar.digest, tar.size)


def _read_index(layout: Path) -> dict[str, Any]:
    path = layout / "index.json"
    if path.exists():
        index: dict[str, Any] = json.loads(path.read_text())
        return index
    return {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}


def _write_index(layout: Path, index: Mapping[str, Any]) -> None:
    tmp = layout / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(layout / "index.json")


def _tag_descriptor(layout: Path, descriptor: Mapping[str, Any], tag: str) -> None:
    """Point `tag` at `descriptor` in index.json, replacing what the tag named before."""
    index = _read_index(layout)
    index["manifests"] = [
        m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != tag
    ]
    annotations = {**descriptor.get("annotations", {}), REF_NAME: tag}
    index["manifests"].append({**descriptor, "annotations": annotations})
    _write_index(layout, index)


def tagged_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    for desc in _read_index(layout)["manifests"]:
        if (desc.get("annotations") or {}).get(REF_NAME) == tag:
            return dict(desc)
    raise KeyError(f"{layout}: no image tagged {tag!r}")


def init_layout(layout_dir: StrPath) -> Path:
    """Create an empty OCI image layout, or keep an existing one with its tags."""
    layout = Path(layout_dir)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if not (layout / "index.json").exists():
        _write_index(layout, _read_index(layout))
    return layout


def _finish_image(
    layout: Path,
    tag: str,
    blobs: Sequence[_LayerBlob],
    compression: Compression,
    config_bytes: bytes,
    annotations: Mapping[str, str] | None,
) -> ImageInfo:
    """Store config and manifest, tag the manifest, and describe the result."""
    config = json.loads(config_bytes)
    platform = "/".join(config[k] for k in ("os", "architecture", "variant") if config.get(k))
    config_digest, config_size = _store_blob(layout, config_bytes)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": MEDIA_LAYER[compression], "digest": b.digest, "size": b.size}
            for b in blobs
        ],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    digest, size = _store_blob(layout, _canonical_json(manifest))
    descriptor = {
        "mediaType": MEDIA_MANIFEST,
        "digest": digest,
        "size": size,
        "platform": _platform_obj(platform),
    }
    _tag_descriptor(layout, descriptor, tag)
    diff_ids = tuple(config["rootfs"]["diff_ids"])
    return ImageInfo(
        layout_dir=layout,
        tag=tag,
        manifest_digest=digest,
        manifest_size=size,
        config_digest=config_digest,
        layer_digests=tuple(b.digest for b in blobs),
        layer_sizes=tuple(b.size for b in blobs),
        diff_ids=diff_ids,
        chain_ids=tuple(chain_ids(diff_ids)),
        uncompressed_size=sum(b.raw_size for b in blobs),
        layer_media_type=MEDIA_LAYER[compression],
        platform=platform,
    )


def build_layout(
    layout_dir: StrPath,
    tag: str,
    layers: Sequence[Iterable[Entry]],
    config: Mapping[str, Any] | None = None,
    compression: Compression = "gzip",
    annotations: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> ImageInfo:
    """Write an image into an OCI layout (created if missing) under `tag`.

    `config` becomes the image config's `config` object (Env, Cmd, Entrypoint, WorkingDir,
    User, Labels...) as given. Other tags in the layout stay; identical layers share a
    blob. `platform` ("os/arch[/variant]") defaults to the host's.
    """
    layout = init_layout(layout_dir)
    blobs = [
        _write_layer_blob(layout, functools.partial(write_layer, entries), compression)
        for entries in layers
    ]
    image_config = {
        "created": DEFAULT_CREATED,
        **_platform_obj(platform or host_platform()),
        "config": dict(config or {}),
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
        "history": [
            {"created": DEFAULT_CREATED, "created_by": f"imagebuild layer {i}"}
            for i in range(len(blobs))
        ],
    }
    return _finish_image(
        layout, tag, blobs, compression, _canonical_json(image_config), annotations
    )


def recompress_layout(
    src_layout: StrPath,
    tag: str,
    dest_layout: StrPath,
    compression: Compression,
    dest_tag: str | None = None,
) -> ImageInfo:
    """Copy an image with its layers recompressed. The config, diff_ids and so the
    unpacked tree stay the same: umoci 0.4.7 cannot read zstd layers, so references unpack
    a gzip twin, and benchmarks can compare compressions on identical content."""
    src = Path(src_layout)
    desc = tagged_descriptor(src, tag)
    manifest = _json_blob(src, desc["digest"])
    dest = init_layout(dest_layout)

    def copier(layer: Mapping[str, Any]) -> Callable[[BinaryWriter], None]:
        def copy(out: BinaryWriter) -> None:
            with open_layer(src, layer) as stream:
                while block := stream.read(_IO_CHUNK):
                    out.write(block)

        return copy

    blobs = [_write_layer_blob(dest, copier(layer), compression) for layer in manifest["layers"]]
    config_bytes = blob_path(src, manifest["config"]["digest"]).read_bytes()
    return _finish_image(
        dest, dest_tag or tag, blobs, compression, config_bytes, manifest.get("annotations")
    )


def open_layer(layout_dir: StrPath, descriptor: Mapping[str, Any]) -> IO[bytes]:
    """The uncompressed tar stream of a layer blob, whatever its compression."""
    raw = open(blob_path(Path(layout_dir), descriptor["digest"]), "rb")  # noqa: SIM115 (returned)
    media_type = descriptor["mediaType"]
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def image_manifest(layout_dir: StrPath, tag: str) -> dict[str, Any]:
    """The parsed manifest (or index) `tag` names in the layout."""
    layout = Path(layout_dir)
    return _json_blob(layout, tagged_descriptor(layout, tag)["digest"])


def index_document(layout: Path, platforms: Mapping[str, str]) -> bytes:
    manifests = []
    for platform, tag in platforms.items():
        desc = tagged_descriptor(layout, tag)
        desc.pop("annotations", None)
        desc["platform"] = _platform_obj(platform)
        manifests.append(desc)
    return _canonical_json({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests})


def add_index(layout_dir: StrPath, tag: str, platforms: Mapping[str, str]) -> str:
    """Tag a multi-platform image index over images already in the layout, so platform
    selection can be tested on `oci:` sources too. `platforms` maps "os/arch[/variant]"
    to an image tag. Returns the index digest."""
    layout = Path(layout_dir)
    digest, size = _store_blob(layout, index_document(layout, platforms))
    _tag_descriptor(layout, {"mediaType": MEDIA_INDEX, "digest": digest, "size": size}, tag)
    return digest


# --- archives ------------------------------------------------------------------------------


def write_oci_archive(layout_dir: StrPath, tar_path: StrPath) -> None:
    """The layout as one tar, as `oci-archive:` references (skopeo, ctr import) read it."""
    layout = Path(layout_dir)
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("oci-layout", "index.json", "blobs", "blobs/sha256"):
            tar.add(layout / name, arcname=name, recursive=False)
        for blob in sorted((layout / "blobs" / "sha256").iterdir()):
            if not blob.name.endswith(".tmp"):
                tar.add(blob, arcname=f"blobs/sha256/{blob.name}")


def write_docker_archive(
    layout_dir: StrPath, tag: str, tar_path: StrPath, repo_tag: str | None = None
) -> None:
    """A `docker save` style tar of one image: manifest.json, the config, and each layer
    uncompressed as `<diff_id hex>/layer.tar`.

    Each layer is decompressed twice (to learn the size its tar header needs, then to copy)
    rather than spooled, so a multi-GiB layer needs no scratch space.
    """
    layout = Path(layout_dir)
    manifest = image_manifest(layout, tag)
    config_name = manifest["config"]["digest"].split(":", 1)[1] + ".json"
    config_bytes = blob_path(layout, manifest["config"]["digest"]).read_bytes()
    diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
    repo_tag = repo_tag or f"cafs-test:{tag}"
    layer_names = [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids]
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, config_name, config_bytes)
        written: set[str] = set()
        for name, desc in zip(layer_names, manifest["layers"], strict=True):
            if name in written:
                continue
            written.add(name)
            info = tarfile.TarInfo(name)
            info.size = _stream_size(open_layer(layout, desc))
            info.mtime = int(DEFAULT_MTIME)
            with open_layer(layout, desc) as stream:
                tar.addfile(info, stream)
        doc = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
        _add_bytes(tar, "manifest.json", json.dumps(doc).encode())
        repo, _, short_tag = repo_tag.rpartition(":")
        top = layer_names[-1].split("/")[0] if layer_names else ""
        _add_bytes(tar, "repositories", json.dumps({repo: {short_tag: top}}).encode())


def _stream_size(stream: IO[bytes]) -> int:
    size = 0
    with stream:
        while block := stream.read(_IO_CHUNK):
            size += len(block)
    return size


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(DEFAULT_MTIME)
    tar.addfile(info, io.BytesIO(data))


# --- registry push -------------------------------------------------------------------------
