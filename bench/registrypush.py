"""Push OCI layouts built by bench.imagebuild to a registry (OCI distribution API), so tests
and benchmarks can serve their own images from a real `docker-registry`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

from bench.imagebuild import MEDIA_INDEX, StrPath, blob_path, index_document, tagged_descriptor


class _Registry:
    """Just enough of the distribution API to upload blobs and manifests."""

    def __init__(
        self, registry: str, repo: str, plain_http: bool, auth: tuple[str, str] | None
    ) -> None:
        self.base = f"{'http' if plain_http else 'https'}://{registry}/v2/{repo}/"
        self.session = requests.Session()
        self.session.auth = auth

    def push_blob(self, path: Path, digest: str) -> None:
        head = self.session.head(self.base + f"blobs/{digest}", timeout=30)
        if head.status_code == 200:
            return
        if head.status_code != 404:
            head.raise_for_status()
        started = self.session.post(self.base + "blobs/uploads/", timeout=30)
        started.raise_for_status()
        location = urljoin(self.base, started.headers["Location"])
        separator = "&" if "?" in location else "?"
        with open(path, "rb") as body:
            put = self.session.put(
                f"{location}{separator}digest={digest}",
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                timeout=600,
            )
        put.raise_for_status()

    def push_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        put = self.session.put(
            self.base + f"manifests/{reference}",
            data=data,
            headers={"Content-Type": media_type},
            timeout=60,
        )
        put.raise_for_status()
        return "sha256:" + hashlib.sha256(data).hexdigest()


def _push_descriptor(layout: Path, reg: _Registry, desc: Mapping[str, Any], reference: str) -> str:
    data = blob_path(layout, desc["digest"]).read_bytes()
    doc = json.loads(data)
    if desc["mediaType"] == MEDIA_INDEX:
        for child in doc["manifests"]:
            _push_descriptor(layout, reg, child, child["digest"])
    else:
        for blob in [doc["config"], *doc["layers"]]:
            reg.push_blob(blob_path(layout, blob["digest"]), blob["digest"])
    return reg.push_manifest(reference, data, desc["mediaType"])


def push_layout(
    layout_dir: StrPath,
    tag: str,
    registry: str,
    repo: str,
    dest_tag: str | None = None,
    plain_http: bool = True,
    auth: tuple[str, str] | None = None,
) -> str:
    """Push the image (or index) tagged `tag` to `registry/repo:dest_tag` (default: tag).

    Blobs the registry has are skipped (HEAD); the others go up as monolithic uploads
    (POST, then PUT ?digest=). Returns the manifest digest, the same as in the layout.
    Raises requests.HTTPError on refusal (e.g. 401 without credentials).
    """
    layout = Path(layout_dir)
    reg = _Registry(registry, repo, plain_http, auth)
    return _push_descriptor(layout, reg, tagged_descriptor(layout, tag), dest_tag or tag)


def push_index(
    layout_dir: StrPath,
    platforms: Mapping[str, str],
    registry: str,
    repo: str,
    dest_tag: str,
    plain_http: bool = True,
    auth: tuple[str, str] | None = None,
) -> str:
    """Push a multi-platform image index over images in the layout (`platforms` maps
    "os/arch[/variant]" to their tags); the images go up by digest. Returns the index
    digest."""
    layout = Path(layout_dir)
    reg = _Registry(registry, repo, plain_http, auth)
    for tag in platforms.values():
        desc = tagged_descriptor(layout, tag)
        _push_descriptor(layout, reg, desc, desc["digest"])
    return reg.push_manifest(dest_tag, index_document(layout, platforms), MEDIA_INDEX)


# --- a Debian rootfs from the host's packages ----------------------------------------------
