"""A client for the OCI distribution API: manifests, configs and layer streams.

Only what indexing needs: resolve a reference to one platform's manifest (keeping the
bytes the registry served, digests verified), and stream layer blobs for the caller to
verify with `VerifiedReader`. Failures a retry can cure (dropped connections, 5xx, 429)
are retried with bounded backoff, and a layer stream that breaks mid-way resumes with a
Range request rather than starting a multi-GB download over.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import random
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from indexer.dockerauth import Authenticator, load_credentials
from indexer.layout import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    check_blob,
    resolve_from,
)
from indexer.reference import Reference, validate_digest
from indexer.source import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    Descriptor,
    Platform,
    ResolvedImage,
    SourceError,
)

log = logging.getLogger(__name__)

ACCEPT = ", ".join((*MANIFEST_MEDIA_TYPES, *INDEX_MEDIA_TYPES))
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0
_STREAM_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
                  requests.RequestException)


class RegistrySource:
    """One repository on one registry; safe to share between blob-fetching threads."""

    def __init__(
        self,
        ref: Reference,
        plain_http: bool = False,
        docker_config: Path | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 4,
        pool_size: int = 32,
    ) -> None:
        self.ref = ref
        self._base = f"{'http' if plain_http else 'https'}://{ref.api_host}/v2/{ref.repository}/"
        self._timeout = (10.0, timeout)
        self.retries = retries
        self._session = requests.Session()
        self._session.headers.update({"User-Agent": "cafs/0.1", "Accept-Encoding": "identity"})
        self._session.auth = _OwnHeadersOnly()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._auth = Authenticator(self._session, ref.name, ref.repository,
                                   lambda: load_credentials(ref.domain, docker_config), timeout)

    def __repr__(self) -> str:
        return f"RegistrySource({str(self.ref)!r}, base={self._base!r})"

    def __enter__(self) -> RegistrySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def resolve(self, platform: Platform | None = None) -> ResolvedImage:
        """Fetch the reference's manifest (through its index when it names one)."""
        data, content_type, digest = self._get_manifest(self.ref.reference, self.ref.digest)
        return resolve_from(data, content_type, digest, self._fetch,
                            platform or Platform.host(), str(self.ref))

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        validate_digest(desc.digest, str(self.ref))
        return io.BufferedReader(_BlobStream(self, desc), buffer_size=1 << 20)

    def _fetch(self, desc: Descriptor) -> bytes:
        """A manifest or config named by a descriptor, checked against it."""
        if desc.media_type in (*INDEX_MEDIA_TYPES, *MANIFEST_MEDIA_TYPES):
            data, _, _ = self._get_manifest(desc.digest, desc.digest)
            return check_blob(data, desc, f"manifest of {self.ref}")
        if desc.size > MAX_CONFIG_BYTES:
            raise SourceError(f"config {desc.digest} of {self.ref} is too large")
        data, _ = self._get_bytes(f"blobs/{desc.digest}", {}, MAX_CONFIG_BYTES,
                                  f"config {desc.digest} of {self.ref.name}")
        return check_blob(data, desc, f"config of {self.ref}")

    def _get_manifest(self, reference: str, digest: str | None) -> tuple[bytes, str | None, str]:
        """The manifest's bytes, its Content-Type, and its digest (verified when known)."""
        what = f"manifest {self.ref.name}{'@' if digest else ':'}{reference}"
        data, resp = self._get_bytes(f"manifests/{reference}", {"Accept": ACCEPT},
                                     MAX_MANIFEST_BYTES, what)
        if digest is not None:
            _verify(data, digest, f"{what}: digest mismatch")
        header = resp.headers.get("Docker-Content-Digest")
        if header:
            _verify(data, header, f"{what}: the registry's Docker-Content-Digest {header} does "
                                  "not match the bytes it served")
        content_type = resp.headers.get("Content-Type", "").split(";")[0].strip() or None
        return data, content_type, digest or "sha256:" + hashlib.sha256(data).hexdigest()

    def _get_bytes(
        self, path: str, headers: dict[str, str], limit: int, what: str
    ) -> tuple[bytes, requests.Response]:
        """GET a small body whole, retrying when the connection drops while reading it."""
        for attempt in range(self.retries + 1):
            resp = self.get(path, headers, what)
            try:
                with resp:
                    return _read_body(resp, limit, what), resp
            except _STREAM_ERRORS as exc:
                if attempt == self.retries:
                    raise SourceError(f"{what}: connection lost while reading "
                                      f"({exc.__class__.__name__})") from None
                _backoff(attempt)
        raise AssertionError("unreachable")

    def get(self, path: str, headers: dict[str, str], what: str) -> requests.Response:
        """A streaming GET of `path` under the repository, authenticated, 2xx or SourceError."""
        url = urljoin(self._base, path)
        renewed = False
        while True:
            header, generation = self._auth.current()
            sent = dict(headers, Authorization=header) if header else headers
            resp, redirected = self._send(url, sent)
            if resp.status_code != 401 or redirected:
                return self._check(resp, what, redirected)
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            if renewed:
                raise SourceError(f"authentication failed for {self.ref.name}"
                                  f"{self._auth.failure_hint()}")
            self._auth.renew(challenge, generation)
            renewed = True

    def _send(self, url: str, headers: dict[str, str]) -> tuple[requests.Response, bool]:
        """One logical request with retries; returns the response and if it was redirected."""
        failure = ""
        for attempt in range(self.retries + 1):
            try:
                resp, redirected = self._follow(url, headers)
            except requests.exceptions.SSLError:
                raise SourceError(f"TLS handshake with {urlsplit(url).netloc} failed; for a "
                                  "registry that speaks plain HTTP pass --plain-http") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                failure = exc.__class__.__name__
            else:
                if resp.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return resp, redirected
                failure = f"HTTP {resp.status_code}"
                delay = _retry_after(resp)
                resp.close()
                if delay is not None:
                    time.sleep(delay)
                    continue
            if attempt < self.retries:
                log.info("registry %s: %s, retrying", self.ref.domain, failure)
                _backoff(attempt)
        raise SourceError(f"cannot reach registry {urlsplit(url).netloc} ({failure}) after "
                          f"{self.retries + 1} attempts")

    def _follow(self, url: str, headers: dict[str, str]) -> tuple[requests.Response, bool]:
        """Follow redirects by hand so credentials never travel to another host."""
        redirected = False
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._session.get(url, headers=headers, stream=True, timeout=self._timeout,
                                     allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status_code not in REDIRECT_STATUSES or not location:
                return resp, redirected
            resp.close()
            target = urljoin(url, location)
            if urlsplit(target).netloc != urlsplit(url).netloc or \
                    urlsplit(target).scheme != urlsplit(url).scheme:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url, redirected = target, True
        raise SourceError(f"registry {self.ref.domain} redirected more than {MAX_REDIRECTS} times")

    def _check(self, resp: requests.Response, what: str, redirected: bool) -> requests.Response:
        if resp.status_code in (200, 206):
            return resp
        code, message = _error_of(resp)
        resp.close()
        status = resp.status_code
        if redirected and status in (401, 403):
            raise SourceError(f"{what}: blob storage refused the redirected request "
                              f"(HTTP {status})")
        if status == 404 or code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"):
            if code == "NAME_UNKNOWN":
                raise SourceError(f"repository {self.ref.name} not found")
            raise SourceError(f"{what} not found")
        if status == 403:
            raise SourceError(f"access denied to {self.ref.name}")
        detail = f": {code} {message}".rstrip() if code else ""
        raise SourceError(f"{what}: registry answered HTTP {status}{detail}")


class _BlobStream(io.RawIOBase):
    """The stored bytes of one blob, resumed with a Range request if the connection drops."""

    def __init__(self, source: RegistrySource, desc: Descriptor) -> None:
        self._source = source
        self._desc = desc
        self._what = f"blob {desc.digest} of {source.ref.name}"
        self._pos = 0
        self._resumes = 0
        self._resp = source.get(f"blobs/{desc.digest}", {}, self._what)
        self._resp.raw.decode_content = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while True:
            try:
                n: int = self._resp.raw.readinto(buf)
            except _STREAM_ERRORS as exc:
                self._reopen(exc)
                continue
            self._pos += n
            return n

    def _reopen(self, exc: BaseException) -> None:
        self._resp.close()
        if self._resumes >= self._source.retries:
            raise SourceError(f"{self._what}: connection lost at byte {self._pos} "
                              f"({exc.__class__.__name__})") from None
        _backoff(self._resumes)
        self._resumes += 1
        log.info("%s: connection lost at byte %d, resuming", self._what, self._pos)
        resp = self._source.get(f"blobs/{self._desc.digest}",
                                {"Range": f"bytes={self._pos}-"}, self._what)
        resp.raw.decode_content = False
        self._resp = resp
        if resp.status_code == 200:  # the server ignored Range: skip what we already have
            _skip(resp.raw, self._pos, self._what)

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
        super().close()


class _OwnHeadersOnly(requests.auth.AuthBase):
    """Stops requests from adding ~/.netrc logins: only `Authenticator` decides what is sent,
    so a redirect to blob storage never carries a credential (requests consults netrc only
    when a session has no auth of its own)."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


def _skip(raw: Any, count: int, what: str) -> None:
    while count > 0:
        chunk = raw.read(min(count, 1 << 20))
        if not chunk:
            raise SourceError(f"{what}: stream ended while resuming")
        count -= len(chunk)


def _read_body(resp: requests.Response, limit: int, what: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_content(1 << 16):
        total += len(chunk)
        if total > limit:
            raise SourceError(f"{what} is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _verify(data: bytes, digest: str, message: str) -> None:
    algo, _, expected = validate_digest(digest).partition(":")
    if hashlib.new(algo, data).hexdigest() != expected:
        raise SourceError(message)


def _error_of(resp: requests.Response) -> tuple[str, str]:
    """The first error code and message of a distribution API error body, if any."""
    try:
        body = json.loads(resp.raw.read(65536, decode_content=True))
        first = (body.get("errors") or [{}])[0]
        return str(first.get("code", "")), str(first.get("message", ""))[:200]
    except (ValueError, AttributeError, IndexError, TypeError, *_STREAM_ERRORS):
        return "", ""


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return min(float(value), BACKOFF_CAP) if value.isdigit() else None


def _backoff(attempt: int) -> None:
    time.sleep(min(BACKOFF_BASE * 2**attempt, BACKOFF_CAP) * random.uniform(0.5, 1.0))
