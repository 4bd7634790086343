"""OCI image layouts, and the manifest walk every source shares.

An image layout (`oci-layout`, `index.json`, `blobs/<algo>/<hex>`) is the plainest form of
the content a registry serves, so the walk from an index through a platform's manifest to
its config lives here, and the registry and archive sources reuse it: whichever way the
bytes arrive, the same checks (media types, digests, sizes, platform choice) apply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from indexer.reference import Reference, is_valid_tag, validate_digest
from indexer.source import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Platform,
    ResolvedImage,
    SourceError,
)

MAX_MANIFEST_BYTES = 4 << 20  # the limit registries enforce; guards memory on hostile input
MAX_CONFIG_BYTES = 64 << 20
MAX_NESTING = 4
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
Fetch = Callable[[Descriptor], bytes]
log = logging.getLogger(__name__)


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{what} is not a JSON object")
    return obj


def media_type_of(obj: dict[str, Any], declared: str | None, what: str) -> str:
    """The manifest's real type: the body's own `mediaType` wins over a transport's label.

    A layout's descriptor or a registry's Content-Type can be generic (`application/json`)
    or absent; OCI manifests may omit `mediaType`, so the shape decides then.
    """
    body_type = obj.get("mediaType")
    if obj.get("schemaVersion") == 1 or body_type in SCHEMA1_TYPES or declared in SCHEMA1_TYPES:
        raise SourceError(f"{what} is a Docker schema 1 manifest, which cafs does not support; "
                          "convert it with `skopeo copy --format v2s2`")
    known = (*INDEX_MEDIA_TYPES, *MANIFEST_MEDIA_TYPES)
    media_type = body_type or (declared if declared in known else None)
    if media_type is None and "manifests" in obj:
        media_type = MEDIA_OCI_INDEX
    elif media_type is None and "config" in obj and "layers" in obj:
        media_type = MEDIA_OCI_MANIFEST
    if media_type not in known:
        raise SourceError(f"{what} has unsupported media type {media_type or declared!r}")
    if declared in known and declared != media_type:
        raise SourceError(f"{what} says it is {media_type} but was served as {declared}")
    return str(media_type)


def platform_text(platform: dict[str, Any]) -> str:
    parts = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    return "/".join(str(p) for p in parts if p)


def select_platform(entries: list[dict[str, Any]], platform: Platform, what: str) -> dict[str, Any]:
    """The entry for `platform`; an exact variant beats an entry that names none."""
    matching = [e for e in entries
                if isinstance(e.get("platform"), dict) and platform.matches(e["platform"])]
    exact = [e for e in matching if e["platform"].get("variant", "") == platform.variant]
    if exact or matching:
        return (exact or matching)[0]
    available = sorted({platform_text(e["platform"]) for e in entries
                        if isinstance(e.get("platform"), dict)} - {"unknown/unknown"})
    raise SourceError(f"{what} has no image for platform {platform}; available: "
                      f"{', '.join(available) or 'none'}")


def check_blob(data: bytes, desc: Descriptor, what: str) -> bytes:
    """Verify bytes read whole (manifests, configs) against their descriptor."""
    algo, _, expected = validate_digest(desc.digest, what).partition(":")
    if len(data) != desc.size:
        raise SourceError(f"{what} {desc.digest} has {len(data)} bytes, descriptor says "
                          f"{desc.size}")
    if hashlib.new(algo, data).hexdigest() != expected:
        raise SourceError(f"{what} digest mismatch: expected {desc.digest}")
    return data


def read_limited(fp: IO[bytes], limit: int, what: str) -> bytes:
    with fp:
        data = fp.read(limit + 1)
    if len(data) > limit:
        raise SourceError(f"{what} is larger than {limit} bytes")
    return data


def resolve_from(
    data: bytes, media_type: str | None, digest: str, fetch: Fetch, platform: Platform,
    name: str,
) -> ResolvedImage:
    """Walk from an index or manifest down to one platform's manifest and its config.

    `fetch` returns a descriptor's bytes already checked against its digest and size.
    """
    index: bytes | None = None
    index_digest: str | None = None
    chosen: str | None = None
    for _ in range(MAX_NESTING):
        what = f"manifest {digest} of {name}"
        obj = parse_json(data, what)
        media_type = media_type_of(obj, media_type, what)
        if media_type in MANIFEST_MEDIA_TYPES:
            resolved = _finish(data, media_type, digest, obj, fetch, name, chosen)
            if chosen is None:
                _warn_platform(resolved, platform)
            resolved.index, resolved.index_digest = index, index_digest
            return resolved
        if index is None:
            index, index_digest = data, digest
        entry = select_platform(_entries(obj, name), platform, f"image index of {name}")
        chosen = platform_text(entry["platform"])
        desc = Descriptor.from_json(entry)
        data, media_type, digest = fetch(desc), desc.media_type, desc.digest
    raise SourceError(f"image indexes of {name} nest deeper than {MAX_NESTING}")


def _entries(obj: dict[str, Any], name: str) -> list[dict[str, Any]]:
    entries = obj.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SourceError(f"image index of {name} has no valid 'manifests' list")
    return entries


def parse_manifest(obj: dict[str, Any], what: str) -> tuple[Descriptor, list[Descriptor]]:
    if obj.get("schemaVersion") != 2:
        raise SourceError(f"{what} has schemaVersion {obj.get('schemaVersion')!r}, expected 2")
    config, layers = obj.get("config"), obj.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise SourceError(f"{what} lacks 'config' or 'layers'")
    descs = [Descriptor.from_json(layer) for layer in layers if isinstance(layer, dict)]
    if len(descs) != len(layers):
        raise SourceError(f"{what} has a malformed layer descriptor")
    for desc in (Descriptor.from_json(config), *descs):
        validate_digest(desc.digest, what)
    return Descriptor.from_json(config), descs


def _finish(
    data: bytes, media_type: str, digest: str, obj: dict[str, Any], fetch: Fetch, name: str,
    chosen: str | None,
) -> ResolvedImage:
    what = f"manifest {digest} of {name}"
    config_desc, layers = parse_manifest(obj, what)
    if config_desc.size > MAX_CONFIG_BYTES:
        raise SourceError(f"config of {name} is {config_desc.size} bytes, over the limit")
    config = fetch(config_desc)
    if chosen is None:
        chosen = platform_text(parse_json(config, f"config of {name}"))
    return ResolvedImage(
        name=name, manifest=data, manifest_digest=digest, manifest_media_type=media_type,
        config=config, config_digest=config_desc.digest, layers=layers, platform=chosen,
    )


def _warn_platform(image: ResolvedImage, platform: Platform) -> None:
    """A single-platform image is taken as named (as docker does), but say so if it differs."""
    parts = image.platform.split("/")
    desc = {"os": parts[0], "architecture": parts[1] if len(parts) > 1 else ""}
    if len(parts) > 2:
        desc["variant"] = parts[2]
    if not platform.matches(desc):
        log.warning("%s is for platform %s, not %s", image.name, image.platform or "?", platform)


def local_name(path: Path, tag: str | None, annotations: dict[str, str]) -> str:
    """The name a local image is recorded under: its own full ref, else `localhost/...`."""
    for candidate in (annotations.get(CONTAINERD_NAME), annotations.get(REF_NAME), tag):
        if candidate and not is_valid_tag(candidate) and "/" in candidate:
            try:
                return str(Reference.parse(candidate))
            except SourceError:
                continue
    base = path.name
    for suffix in (".tar.gz", ".tgz", ".tar", ".oci"):
        base = base.removesuffix(suffix)
    repo = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("._-") or "image"
    repo = re.sub(r"[._-]{2,}", "-", repo)
    for candidate in (tag, annotations.get(REF_NAME)):
        if candidate and is_valid_tag(candidate):
            return f"localhost/{repo}:{candidate}"
    return f"localhost/{repo}:latest"


def _same_ref(a: str, b: str) -> bool:
    try:
        return str(Reference.parse(a)) == str(Reference.parse(b))
    except SourceError:
        return False


class LayoutReader(ABC):
    """An OCI layout read through `_open`, so a directory and a tar share one walk."""

    def __init__(self, where: str, path: Path, tag: str | None) -> None:
        self._where = where  # for messages: "OCI layout ./dir"
        self._path = path
        self._tag = tag or None

    @abstractmethod
    def _open(self, relpath: str) -> IO[bytes]:
        """A file inside the layout; raises FileNotFoundError when it is absent."""

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        algo, _, hexpart = validate_digest(desc.digest, self._where).partition(":")
        try:
            return self._open(f"blobs/{algo}/{hexpart}")
        except FileNotFoundError:
            raise SourceError(f"blob {desc.digest} not found in {self._where}") from None

    def resolve(self, platform: Platform) -> ResolvedImage:
        self._check_layout()
        index = parse_json(self._read("index.json", MAX_MANIFEST_BYTES), f"{self._where} index")
        entries = _entries(index, self._where)
        entry = self._pick(entries, platform)
        annotations = {str(k): str(v) for k, v in (entry.get("annotations") or {}).items()}
        name = local_name(self._path, self._tag, annotations)
        desc = Descriptor.from_json(entry)
        data = self._fetch(desc)
        resolved = resolve_from(data, desc.media_type, desc.digest, self._fetch, platform, name)
        if isinstance(entry.get("platform"), dict) and resolved.index is None:
            resolved.platform = platform_text(entry["platform"])
        return resolved

    def _check_layout(self) -> None:
        try:
            fp = self._open("oci-layout")
        except FileNotFoundError:
            raise SourceError(f"{self._where} is not an OCI image layout "
                              "(no oci-layout file)") from None
        marker = parse_json(read_limited(fp, 4096, "oci-layout"), f"{self._where} oci-layout")
        version = str(marker.get("imageLayoutVersion", ""))
        if not version.startswith("1."):
            raise SourceError(f"{self._where} has unsupported layout version {version!r}")

    def _read(self, relpath: str, limit: int) -> bytes:
        try:
            fp = self._open(relpath)
        except FileNotFoundError:
            raise SourceError(f"{relpath} not found in {self._where}") from None
        return read_limited(fp, limit, f"{relpath} in {self._where}")

    def _fetch(self, desc: Descriptor) -> bytes:
        limit = max(MAX_MANIFEST_BYTES, MAX_CONFIG_BYTES)
        if desc.size > limit:
            raise SourceError(f"{desc.digest} in {self._where} is too large to read whole")
        return check_blob(read_limited(self.open_blob(desc), limit, desc.digest), desc,
                          f"blob in {self._where}")

    def _pick(self, entries: list[dict[str, Any]], platform: Platform) -> dict[str, Any]:
        """The index.json entry the tag names (or the only one), by platform among equals."""
        tag = self._tag
        candidates = entries if tag is None else [e for e in entries if _names(e, tag)]
        if len(candidates) == 1:
            return candidates[0]
        if candidates and all(isinstance(e.get("platform"), dict) for e in candidates):
            # One image per platform (skopeo without --all, some exporters): choose by
            # platform, but never guess between two different images of one platform.
            entry = select_platform(candidates, platform, self._where)
            if sum(e["platform"] == entry["platform"] for e in candidates) == 1:
                return entry
        tags = sorted({str((e.get("annotations") or {}).get(REF_NAME)) for e in entries
                       if (e.get("annotations") or {}).get(REF_NAME)})
        listing = f"; available: {', '.join(tags)}" if tags else ""
        if tag is None:
            raise SourceError(f"{self._where} holds {len(entries)} images; name one with "
                              f":TAG{listing}")
        raise SourceError(f"tag {tag!r} not found in {self._where}{listing}")


def _names(entry: dict[str, Any], tag: str) -> bool:
    annotations = entry.get("annotations") or {}
    if tag in (annotations.get(REF_NAME), annotations.get(CONTAINERD_NAME)):
        return True
    full = annotations.get(CONTAINERD_NAME)
    return bool(full) and not is_valid_tag(tag) and _same_ref(str(full), tag)


class OCILayoutSource(LayoutReader):
    """An `oci:` directory, as `skopeo copy`, `umoci` and `buildctl` write them."""

    def __init__(self, path: Path, tag: str | None = None) -> None:
        super().__init__(f"OCI layout {path}", path, tag)
        if not path.is_dir():
            raise SourceError(f"OCI layout {path} does not exist or is not a directory")

    def close(self) -> None:
        """Nothing to release: every blob is opened (and closed) on its own."""

    def _open(self, relpath: str) -> IO[bytes]:
        return open(self._path / relpath, "rb")  # the caller closes it
