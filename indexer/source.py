"""Where images come from: one small protocol over registries, OCI layouts and archives.

A source resolves a reference to one platform's manifest, config and layer descriptors,
keeping the original bytes (the store keeps them so containerd can later see the image with
its original digests), and opens layer blobs as streams. Digests are verified by the caller
through `VerifiedReader`, the same way for every source.
"""

from __future__ import annotations

import hashlib
import platform as _platform
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_MEDIA_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_MEDIA_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)


class SourceError(Exception):
    """The image cannot be read: unknown ref, auth failure, bad manifest, digest mismatch."""


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise SourceError(f"bad platform {text!r}: expected OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
        return cls("linux", arch, "v7" if arch == "arm" else "")

    def matches(self, desc_platform: dict[str, Any]) -> bool:
        if desc_platform.get("os") != self.os:
            return False
        if desc_platform.get("architecture") != self.architecture:
            return False
        return not self.variant or desc_platform.get("variant", "") in ("", self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Descriptor:
        try:
            return cls(
                str(obj["mediaType"]),
                str(obj["digest"]),
                int(obj["size"]),
                dict(obj.get("annotations") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"malformed descriptor {obj!r}") from exc


@dataclass
class ResolvedImage:
    """One platform's image, with the original bytes of everything above the layers."""

    name: str  # the reference recorded in the store, e.g. "127.0.0.1:5000/library/python:3.12"
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config: bytes
    config_digest: str
    layers: list[Descriptor]
    platform: str
    index: bytes | None = None  # the image index / manifest list the reference named, if any
    index_digest: str | None = None


class ImageSource(Protocol):
    def resolve(self, platform: Platform) -> ResolvedImage: ...

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        """A stream of the blob's stored (possibly compressed) bytes; caller closes it."""
        ...


def chain_ids(diff_ids: list[str] | tuple[str, ...]) -> list[str]:
    """containerd's ChainIDs: chain[0] = diff_id[0]; chain[i] = sha256(chain[i-1] + " " + d)."""
    out: list[str] = []
    for diff in diff_ids:
        out.append(diff if not out else "sha256:" + hashlib.sha256(
            f"{out[-1]} {diff}".encode()).hexdigest())
    return out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VerifiedReader:
    """Passes bytes through while hashing them; raises SourceError at EOF on a mismatch.

    Nothing read from an unverified stream is published until EOF has been reached, so a
    bad blob fails the whole index before any pointer is written.
    """

    def __init__(self, raw: IO[bytes], digest: str, size: int | None = None) -> None:
        algo, _, expected = digest.partition(":")
        if algo not in ("sha256", "sha512"):
            raise SourceError(f"unsupported digest algorithm in {digest!r}")
        self._raw = raw
        self._digest = digest
        self._expected = expected
        self._hash = hashlib.new(algo)
        self._size = size
        self.count = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self.count += len(data)
        if self._size is not None and self.count > self._size:
            raise SourceError(f"blob {self._digest} is larger than its descriptor says")
        if not data and n != 0:
            self._finish()
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._size is not None and self.count != self._size:
            raise SourceError(
                f"blob {self._digest} is truncated: {self.count} of {self._size} bytes"
            )
        if self._hash.hexdigest() != self._expected:
            raise SourceError(f"blob digest mismatch: expected {self._digest}")

    def drain(self) -> None:
        """Read to EOF (tar streams stop before trailing padding) and verify."""
        while self.read(1 << 20):
            pass
        self._finish()

    def close(self) -> None:
        self._raw.close()
