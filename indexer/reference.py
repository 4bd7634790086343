"""Image references parsed the way docker parses them.

The canonical string is what cafs records in the store (`refs/<name>`), so two spellings of
one image (`python:3.12`, `docker.io/library/python:3.12`, `docker://python:3.12`) must
normalise to the same text, or the same image would be indexed under two names.

Grammar (distribution/reference):

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component ( "/" path-component )*
    domain     := host [ ":" port ]   -- only when the first component has "." or ":",
                                         is "localhost", or has an upper-case letter
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from indexer.source import SourceError

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
# docker.io is an alias; the API lives elsewhere, and old configs key credentials by this URL.
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_LEGACY_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
MAX_NAME_LENGTH = 255

_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True)
class Reference:
    domain: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Normalise like `docker pull`: default domain, `library/`, and tag `latest`."""
        spec = text.removeprefix("docker://")
        if not spec:
            raise SourceError("empty image reference")
        if spec != spec.strip() or any(c.isspace() for c in spec):
            raise SourceError(f"invalid image reference {text!r}: contains whitespace")
        rest, digest = _split_digest(text, spec)
        name, tag = _split_tag(text, rest)
        domain, repository = _split_domain(text, name)
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(domain, repository, tag, digest)

    @property
    def name(self) -> str:
        """The repository's full name, without tag or digest."""
        return f"{self.domain}/{self.repository}"

    @property
    def reference(self) -> str:
        """What the distribution API's `/manifests/<reference>` wants: the digest wins."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """Where the registry's API actually answers (Docker Hub's alias is not it)."""
        return DOCKER_HUB_API if self.domain == DEFAULT_DOMAIN else self.domain

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def is_valid_tag(text: str) -> bool:
    return _TAG_RE.fullmatch(text) is not None


def validate_digest(text: str, context: str = "") -> str:
    """Check `algo:hex`, with the exact hex length for the algorithms cafs can verify."""
    where = f" in {context!r}" if context else ""
    if not _DIGEST_RE.fullmatch(text):
        raise SourceError(f"invalid digest {text!r}{where}: expected ALGORITHM:HEX")
    algo, _, hexpart = text.partition(":")
    want = _DIGEST_HEX_LENGTH.get(algo)
    if want is None:
        raise SourceError(f"unsupported digest algorithm {algo!r}{where}")
    if len(hexpart) != want or hexpart != hexpart.lower():
        raise SourceError(f"invalid {algo} digest {text!r}{where}: expected {want} lower hex")
    return text


def _split_digest(text: str, spec: str) -> tuple[str, str | None]:
    rest, at, digest = spec.partition("@")
    if not at:
        return spec, None
    if not rest:
        raise SourceError(f"invalid image reference {text!r}: missing repository name")
    return rest, validate_digest(digest, text)


def _split_tag(text: str, rest: str) -> tuple[str, str | None]:
    # A ':' after the last '/' starts a tag; one before it belongs to the domain's port.
    colon = rest.rfind(":")
    if colon < 0 or "/" in rest[colon:]:
        return rest, None
    name, tag = rest[:colon], rest[colon + 1 :]
    if not is_valid_tag(tag):
        raise SourceError(
            f"invalid tag {tag!r} in image reference {text!r}: "
            "expected up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        )
    return name, tag


def _split_domain(text: str, name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    looks_like_domain = (
        "." in first or ":" in first or first == "localhost" or first != first.lower()
    )
    if slash and looks_like_domain:
        domain, path = first, remainder
        if not _DOMAIN_RE.fullmatch(domain):
            raise SourceError(f"invalid registry host {domain!r} in image reference {text!r}")
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == "index.docker.io":
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = "library/" + path
    _validate_path(text, path)
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise SourceError(f"image name in {text!r} is longer than {MAX_NAME_LENGTH} characters")
    return domain, path


def _validate_path(text: str, path: str) -> None:
    if not path:
        raise SourceError(f"invalid image reference {text!r}: missing repository name")
    for component in path.split("/"):
        if _PATH_COMPONENT_RE.fullmatch(component):
            continue
        if component.lower() != component and _PATH_COMPONENT_RE.fullmatch(component.lower()):
            raise SourceError(f"invalid image reference {text!r}: repository name must be "
                              "lowercase")
        raise SourceError(
            f"invalid image reference {text!r}: bad repository path component {component!r}"
        )
