"""`cafs index IMAGE`: from skopeo-style transport strings to an `ImageSource`.

    [docker://]HOST[:PORT]/REPO:TAG      a registry (the default transport, as for docker)
    oci:PATH[:TAG]                       an OCI image layout directory
    oci-archive:PATH[:TAG]               a tar of an OCI image layout
    docker-archive:PATH[:REF|:@N]        a `docker save` tar

A path may itself contain ':'. When the whole text names an existing file it is the path;
otherwise an OCI tag starts after the last ':' unless what follows has a '/', and a docker
archive's reference (which may hold ':' and '/') after the first ':' that ends an existing
file, falling back to skopeo's rule (the first ':').
"""

from __future__ import annotations

import re
from pathlib import Path

from indexer.archive import DockerArchiveSource, OCIArchiveSource
from indexer.layout import OCILayoutSource
from indexer.reference import Reference, is_valid_tag
from indexer.registry import RegistrySource
from indexer.source import ImageSource, SourceError

SUPPORTED = ("docker://", "oci:", "oci-archive:", "docker-archive:")
# skopeo's other transports: recognised only to say clearly that cafs cannot read them
UNSUPPORTED = ("dir", "containers-storage", "docker-daemon", "ostree", "sif", "tarball",
               "atomic")
_URL_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def open_source(
    spec: str, *, plain_http: bool = False, docker_config: Path | None = None
) -> ImageSource:
    """The source `spec` names; a SourceError says what is wrong with a bad one."""
    spec = spec.strip()
    if not spec:
        raise SourceError("no image given")
    transport, rest = _transport(spec)
    if transport == "docker":
        return RegistrySource(Reference.parse(rest), plain_http, docker_config)
    if transport == "docker-archive":
        path, ref = _split_archive(rest, spec)
        return DockerArchiveSource(path, ref)
    path, tag = _split_oci(rest, spec)
    if transport == "oci":
        return OCILayoutSource(path, tag)
    return OCIArchiveSource(path, tag)


def _transport(spec: str) -> tuple[str, str]:
    url = _URL_SCHEME_RE.match(spec)
    if url:
        scheme = url.group(1)
        if scheme == "docker":
            return "docker", spec[url.end():]
        hint = "; for a plain-HTTP registry give HOST/REPO:TAG and --plain-http" \
            if scheme in ("http", "https") else ""
        raise SourceError(f"unknown transport {scheme + '://'!r} in {spec!r}{hint}")
    for prefix in ("oci:", "oci-archive:", "docker-archive:"):
        if spec.startswith(prefix):
            return prefix[:-1], spec[len(prefix):]
    head, colon, tail = spec.partition(":")
    # `dir:foo` is also a docker reference (docker.io/library/dir:foo); only text that
    # cannot be a tag is taken for the transport.
    if colon and head in UNSUPPORTED and not is_valid_tag(tail):
        raise SourceError(f"unsupported transport {head + ':'!r} in {spec!r}; cafs reads "
                          f"{', '.join(SUPPORTED)}")
    return "docker", spec


def _split_oci(rest: str, spec: str) -> tuple[Path, str | None]:
    if not rest:
        raise SourceError(f"missing path in {spec!r}")
    if Path(rest).exists():
        return Path(rest), None
    path, colon, tag = rest.rpartition(":")
    if colon and path and "/" not in tag:
        return Path(path), tag or None
    return Path(rest), None


def _split_archive(rest: str, spec: str) -> tuple[Path, str | None]:
    if not rest:
        raise SourceError(f"missing path in {spec!r}")
    if Path(rest).exists():
        return Path(rest), None
    colons = [i for i, c in enumerate(rest) if c == ":"]
    for i in colons:
        if Path(rest[:i]).is_file():
            return Path(rest[:i]), rest[i + 1:] or None
    if colons and colons[0] > 0:
        return Path(rest[: colons[0]]), rest[colons[0] + 1:] or None
    return Path(rest), None
