"""Image archives: `oci-archive:` (a tarred OCI layout) and `docker-archive:` (`docker save`).

Members are read in place, by offset, with `os.pread` on one descriptor: nothing is
extracted, and parallel layer readers share no file position. An archive compressed as a
whole (`docker save | gzip`) is first decompressed once into an anonymous temporary file,
which the kernel removes however the process ends.

`docker save` has no registry manifest, so one is synthesized: layer digests are the
config's `diff_ids` for uncompressed layers (the caller's `VerifiedReader` checks them as
it reads, so the archive is not hashed twice) and computed from the member otherwise.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from indexer.layout import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    LayoutReader,
    local_name,
    parse_json,
    platform_text,
)
from indexer.reference import Reference
from indexer.source import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Platform,
    ResolvedImage,
    SourceError,
    sha256_digest,
)

MAX_LINK_HOPS = 8
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DECOMPRESSORS: dict[bytes, Any] = {GZIP_MAGIC: gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}
DOCKER_LAYER_TYPES = {
    "": "application/vnd.docker.image.rootfs.diff.tar",
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
OCI_LAYER_TYPES = {
    "": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def compression_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return ""


class TarMembers:
    """The regular files of a tar, by normalized name, each openable as its own stream."""

    def __init__(self, path: Path, what: str) -> None:
        self._what = what
        self._members: dict[str, tuple[int, int]] = {}  # name -> (data offset, size)
        self._fd = self._open_plain(path)
        try:
            self._scan()
        except (tarfile.TarError, OSError, EOFError) as exc:
            os.close(self._fd)
            raise SourceError(f"{what} is not a readable tar ({exc.__class__.__name__})") \
                from None

    def _open_plain(self, path: Path) -> int:
        try:
            with open(path, "rb") as fp:
                head = fp.read(6)
                opener = next((o for m, o in _DECOMPRESSORS.items() if head.startswith(m)), None)
                if head.startswith(ZSTD_MAGIC):
                    raise SourceError(f"{self._what} is zstd-compressed; decompress it first")
                if opener is None:
                    return os.dup(fp.fileno())
        except OSError as exc:
            raise SourceError(f"cannot open {self._what}: {exc.strerror}") from None
        try:
            with tempfile.TemporaryFile(prefix="cafs-archive-") as tmp, opener(path, "rb") as src:
                while chunk := src.read(1 << 20):
                    tmp.write(chunk)
                tmp.flush()
                return os.dup(tmp.fileno())
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise SourceError(f"{self._what} is corrupt ({exc.__class__.__name__})") from None

    def _scan(self) -> None:
        links: dict[str, str] = {}
        with os.fdopen(os.dup(self._fd), "rb") as fp:
            fp.seek(0)  # a dup shares its offset with the descriptor it was made from
            self._scan_tar(fp, links)
        self._resolve_links(links)

    def _scan_tar(self, fp: IO[bytes], links: dict[str, str]) -> None:
        with tarfile.open(fileobj=fp, mode="r:") as tar:
            for info in tar:
                name = _normalize(info.name)
                if info.isreg() and not info.issparse():
                    self._members[name] = (info.offset_data, info.size)
                elif info.issym():
                    links[name] = _normalize(posixpath.join(posixpath.dirname(name),
                                                            info.linkname))
                elif info.islnk():
                    links[name] = _normalize(info.linkname)

    def _resolve_links(self, links: dict[str, str]) -> None:
        """`docker save` stores a layer shared by two images once and symlinks the other."""
        for name, target in links.items():
            for _ in range(MAX_LINK_HOPS):
                if target not in links:
                    break
                target = links[target]
            if target in self._members:
                self._members[name] = self._members[target]

    def size(self, name: str) -> int:
        return self._lookup(name)[1]

    def open(self, name: str) -> IO[bytes]:
        offset, size = self._lookup(name)
        return io.BufferedReader(_Section(self._fd, offset, size), buffer_size=1 << 20)

    def read(self, name: str, limit: int) -> bytes:
        offset, size = self._lookup(name)
        if size > limit:
            raise SourceError(f"{name} in {self._what} is larger than {limit} bytes")
        return os.pread(self._fd, size, offset)

    def _lookup(self, name: str) -> tuple[int, int]:
        try:
            return self._members[_normalize(name)]
        except KeyError:
            raise FileNotFoundError(name) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _normalize(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


class _Section(io.RawIOBase):
    """A byte range of the archive; `pread` keeps concurrent readers independent."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._offset, self._size, self._pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        want = min(len(buf), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._offset + self._pos)
        if not data:
            raise SourceError("archive ended inside a member")
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _ArchiveBase:
    def __init__(self, tar_path: Path, what: str) -> None:
        if not tar_path.is_file():
            raise SourceError(f"{what} does not exist or is not a file")
        self._tar_path = tar_path
        self._what = what
        self._tar: TarMembers | None = None
        self._lock = threading.Lock()

    @property
    def members(self) -> TarMembers:
        with self._lock:
            if self._tar is None:
                self._tar = TarMembers(self._tar_path, self._what)
            return self._tar

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


class OCIArchiveSource(_ArchiveBase, LayoutReader):
    """An `oci-archive:` tar, as `skopeo copy ... oci-archive:` and `buildah push` write."""

    def __init__(self, tar_path: Path, tag: str | None = None) -> None:
        _ArchiveBase.__init__(self, tar_path, f"OCI archive {tar_path}")
        LayoutReader.__init__(self, f"OCI archive {tar_path}", tar_path, tag)

    def _open(self, relpath: str) -> IO[bytes]:
        return self.members.open(relpath)


class DockerArchiveSource(_ArchiveBase):
    """A `docker save` tar (legacy and 25+ layouts alike): `manifest.json` leads the way."""

    def __init__(self, tar_path: Path, ref: str | None = None) -> None:
        super().__init__(tar_path, f"docker archive {tar_path}")
        self._ref = ref or None
        self._blobs: dict[str, str] = {}  # digest -> member name

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        name = self._blobs.get(desc.digest)
        if name is None:
            raise SourceError(f"blob {desc.digest} is not part of the image resolved from "
                              f"{self._what}")
        return self.members.open(name)

    def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        entry, matched = self._pick(self._manifest_json())
        config_name = _string(entry.get("Config"), "Config", self._what)
        config = self._read(config_name, MAX_CONFIG_BYTES)
        config_obj = parse_json(config, f"config in {self._what}")
        diff_ids = (config_obj.get("rootfs") or {}).get("diff_ids") or []
        layer_names = entry.get("Layers")
        if not isinstance(layer_names, list) or len(layer_names) != len(diff_ids):
            raise SourceError(f"{self._what}: {len(diff_ids)} diff_ids in the config but "
                              f"Layers lists {layer_names!r}")
        layers = [self._layer(_string(n, "Layers", self._what), str(d))
                  for n, d in zip(layer_names, diff_ids, strict=True)]
        config_digest = sha256_digest(config)
        self._blobs[config_digest] = config_name
        media_type, manifest, descriptors = _synthesize(config, config_digest, layers)
        return ResolvedImage(
            name=matched or self._name(entry), manifest=manifest,
            manifest_digest=sha256_digest(manifest), manifest_media_type=media_type,
            config=config, config_digest=config_digest, layers=descriptors,
            platform=platform_text(config_obj),
        )

    def _read(self, name: str, limit: int) -> bytes:
        try:
            return self.members.read(name, limit)
        except FileNotFoundError:
            raise SourceError(f"{name} not found in {self._what}") from None

    def _manifest_json(self) -> list[dict[str, Any]]:
        try:
            entries = json.loads(self._read("manifest.json", MAX_MANIFEST_BYTES))
        except ValueError:
            raise SourceError(f"manifest.json in {self._what} is not valid JSON") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SourceError(f"manifest.json in {self._what} is not a list of images")
        if not entries:
            raise SourceError(f"{self._what} holds no images")
        return entries

    def _pick(self, entries: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
        """The image `ref` names: a RepoTag (normalized like docker), `@N`, or the only one.

        Returns the entry and, when a tag matched, that tag's canonical form.
        """
        ref = self._ref
        if ref is None and len(entries) == 1:
            return entries[0], None
        if ref is not None and ref.startswith("@") and ref[1:].isdigit():
            if int(ref[1:]) < len(entries):
                return entries[int(ref[1:])], None
            raise SourceError(f"{self._what} holds {len(entries)} images; no image {ref}")
        tags = [str(t) for e in entries for t in (e.get("RepoTags") or [])]
        if ref is None:
            raise SourceError(f"{self._what} holds {len(entries)} images; name one with :REF "
                              f"or :@N (tags: {', '.join(tags) or 'none'})")
        wanted = _canonical(ref)
        for entry in entries:
            if wanted and any(_canonical(str(t)) == wanted for t in entry.get("RepoTags") or []):
                return entry, wanted
        raise SourceError(f"{ref!r} not found in {self._what}; tags: {', '.join(tags) or 'none'}")

    def _name(self, entry: dict[str, Any]) -> str:
        for tag in entry.get("RepoTags") or []:
            if _canonical(str(tag)):
                return _canonical(str(tag))
        return local_name(self._tar_path, None, {})

    def _layer(self, name: str, diff_id: str) -> tuple[str, str, int]:
        """(compression, digest, size) of one layer member."""
        size = self._size(name)
        with self.members.open(name) as fp:
            head = fp.read(8)
            compression = compression_of(head)
            digest = _hash_rest(fp, head) if compression else diff_id
        self._blobs[digest] = name
        return compression, digest, size

    def _size(self, name: str) -> int:
        try:
            return self.members.size(name)
        except FileNotFoundError:
            raise SourceError(f"layer {name} not found in {self._what}") from None


def _hash_rest(fp: IO[bytes], head: bytes) -> str:
    hasher = hashlib.sha256(head)
    while chunk := fp.read(1 << 20):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _string(value: Any, field: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise SourceError(f"manifest.json in {what} has a bad {field} entry {value!r}")
    return value


def _canonical(text: str) -> str:
    try:
        return str(Reference.parse(text))
    except SourceError:
        return ""


def _synthesize(
    config: bytes, config_digest: str, layers: list[tuple[str, str, int]]
) -> tuple[str, bytes, list[Descriptor]]:
    """A registry manifest for the archive's image: Docker v2 unless a layer needs OCI (zstd).

    The JSON is deterministic, so indexing one archive twice yields one manifest digest.
    """
    oci = any(compression == "zstd" for compression, _, _ in layers)
    types = OCI_LAYER_TYPES if oci else DOCKER_LAYER_TYPES
    descriptors = [Descriptor(types[c], digest, size) for c, digest, size in layers]
    media_type = MEDIA_OCI_MANIFEST if oci else MEDIA_DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": MEDIA_OCI_CONFIG if oci else MEDIA_DOCKER_CONFIG,
                   "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": d.media_type, "size": d.size, "digest": d.digest}
                   for d in descriptors],
    }
    return media_type, json.dumps(manifest, indent=3).encode(), descriptors
