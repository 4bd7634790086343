"""Image sources against real things: Debian's docker-registry, skopeo-written archives.

Registry behaviours docker-registry cannot show on its own (bearer tokens, redirects to
blob storage, tampered bytes, dropped connections, 503s) come from the front
(`_FrontHandler`), a small HTTP server that proxies to the real registry and misbehaves on
request.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.imagebuild import (
    Entry,
    ImageInfo,
    add_index,
    build_layout,
    write_docker_archive,
    write_oci_archive,
)
from bench.registrypush import push_index, push_layout
from indexer.archive import DockerArchiveSource, OCIArchiveSource
from indexer.layout import OCILayoutSource, media_type_of
from indexer.reference import Reference
from indexer.registry import RegistrySource
from indexer.source import (
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    ImageSource,
    Platform,
    ResolvedImage,
    SourceError,
    VerifiedReader,
    sha256_digest,
)
from indexer.sources import open_source

REGISTRY_BIN = "/usr/bin/docker-registry"
AMD64, ARM64 = Platform("linux", "amd64"), Platform("linux", "arm64", "v8")
pytestmark = pytest.mark.skipif(not Path(REGISTRY_BIN).exists(), reason="no docker-registry")


# --- fixtures: images, registries -----------------------------------------------------------


def _layers(name: str) -> list[list[Entry]]:
    return [
        [Entry("etc", "dir"), Entry("etc/os-release", data=f"ID={name}\n".encode())],
        [Entry("app", "dir"), Entry.random("app/data.bin", 70_000, seed=name)],
    ]


@dataclass
class Images:
    layout: Path
    by_tag: dict[str, ImageInfo]
    index_digest: str


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    layout = tmp_path_factory.mktemp("layout") / "images"
    by_tag = {
        comp: build_layout(layout, comp, _layers(comp), compression=comp, platform="linux/amd64")
        for comp in ("gzip", "zstd", "none")
    }
    by_tag["arm"] = build_layout(layout, "arm", _layers("arm"), platform="linux/arm64/v8")
    index_digest = add_index(layout, "multi", {"linux/amd64": "gzip", "linux/arm64/v8": "arm"})
    return Images(layout, by_tag, index_digest)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pushed(images: Images, registry: Any) -> str:
    """The shared registry (conftest) holding this module's images; returns its host."""
    for tag in ("gzip", "zstd", "none"):
        push_layout(images.layout, tag, registry.host, "sources/img")
    push_index(
        images.layout,
        {"linux/amd64": "gzip", "linux/arm64/v8": "arm"},
        registry.host,
        "sources/img",
        "multi",
    )
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
            f"oci:{images.layout}:gzip",
            f"docker://{registry.host}/sources/docker:v2",
        ],
        check=True,
        capture_output=True,
    )
    return str(registry.host)


@dataclass
class Login:
    host: str
    user: str
    password: str


@pytest.fixture(scope="module")
def private(images: Images, registry_auth: Any) -> Login:
    """The shared htpasswd registry with one image pushed under `sources/private`."""
    push_layout(
        images.layout, "gzip", registry_auth.host, "sources/private", auth=registry_auth.auth
    )
    return Login(registry_auth.host, *registry_auth.auth)


def _docker_config(
    tmp_path: Path, host: str, user: str, password: str, style: str = "auth"
) -> Path:
    if style == "auth":
        entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        key = host
    else:
        entry = {"username": user, "password": password}
        key = f"https://{host}/v1/"
    config_dir = tmp_path / "docker"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(
        json.dumps({"auths": {key: entry}, "credsStore": "desktop"})
    )
    return config_dir


def _read_all(source: ImageSource, image: ResolvedImage) -> list[bytes]:
    """Every layer through VerifiedReader, as the indexer reads them."""
    blobs = []
    for desc in image.layers:
        reader = VerifiedReader(source.open_blob(desc), desc.digest, desc.size)
        try:
            blobs.append(reader.read())
            reader.drain()
        finally:
            reader.close()
    return blobs


def _blob(images: Images, digest: str) -> bytes:
    return (images.layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def _check_image(images: Images, source: ImageSource, image: ResolvedImage, tag: str) -> None:
    info = images.by_tag[tag]
    assert image.config_digest == info.config_digest == sha256_digest(image.config)
    assert [d.digest for d in image.layers] == list(info.layer_digests)
    assert _read_all(source, image) == [_blob(images, d) for d in info.layer_digests]


# --- the front: a misbehaving proxy to a real registry --------------------------------------


@dataclass
class FrontState:
    upstream: str
    bearer: bool = False
    token_login: tuple[str, str] | None = None  # None: tokens for anyone
    tamper_manifests: bool = False
    redirect_blobs_to: str | None = None
    fail_once: set[str] = field(default_factory=set)
    truncate_once: set[str] = field(default_factory=set)
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    ranges: list[str] = field(default_factory=list)


class _FrontHandler(BaseHTTPRequestHandler):
    state: FrontState
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        st = self.state
        auth = self.headers.get("Authorization")
        st.seen.append((self.path, auth))
        if self.path.startswith("/token"):
            return self._token(auth)
        if st.bearer and (not auth or auth.removeprefix("Bearer ") not in st.tokens):
            realm = f"http://{self.headers['Host']}/token"
            return self._send(
                401,
                b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="front",'
                    'scope="repository:sources/img:pull"'
                },
            )
        for marker in list(st.fail_once):
            if marker in self.path:
                st.fail_once.discard(marker)
                return self._send(503, b"busy", {})
        if "/blobs/" in self.path and st.redirect_blobs_to:
            return self._send(307, b"", {"Location": st.redirect_blobs_to + self.path})
        self._proxy()

    def _token(self, auth: str | None) -> None:
        login = self.state.token_login
        if login is not None:
            wanted = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
            if auth != wanted:
                return self._send(401, b"{}", {})
        token = f"tok{len(self.state.tokens)}"
        self.state.tokens.add(token)
        self._send(200, json.dumps({"access_token": token}).encode(), {})

    def _proxy(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k in ("Accept", "Range")}
        if "Range" in headers:
            self.state.ranges.append(headers["Range"])
        up = requests.get(self.state.upstream + self.path, headers=headers, timeout=10)
        body = up.content
        keep = ("Content-Type", "Docker-Content-Digest", "Content-Range")
        out = {k: up.headers[k] for k in keep if k in up.headers}
        if "/manifests/" in self.path and self.state.tamper_manifests:
            body = body.replace(b'"schemaVersion"', b' "schemaVersion"', 1)
        for marker in list(self.state.truncate_once):
            if marker in self.path and up.status_code == 200:
                self.state.truncate_once.discard(marker)
                return self._send(200, body[: len(body) // 2], out, length=len(body))
        self._send(up.status_code, body, out)

    def _send(
        self, code: int, body: bytes, headers: dict[str, str], length: int | None = None
    ) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        if length is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if length is not None:
            self.close_connection = True


@pytest.fixture
def front(pushed: str) -> Iterator[tuple[str, FrontState]]:
    state = FrontState(upstream=f"http://{pushed}")
    handler = type("Handler", (_FrontHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _front_source(host: str, ref: str = "sources/img:gzip", **kwargs: Any) -> RegistrySource:
    source = RegistrySource(Reference.parse(f"{host}/{ref}"), plain_http=True, **kwargs)
    source.retries = 2
    return source


# --- references and transports --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("python", "docker.io/library/python:latest"),
        ("python:3.12", "docker.io/library/python:3.12"),
        ("docker://python:3.12", "docker.io/library/python:3.12"),
        ("index.docker.io/library/python:3.12", "docker.io/library/python:3.12"),
        ("user/repo", "docker.io/user/repo:latest"),
        ("127.0.0.1:5000/x/y:tag", "127.0.0.1:5000/x/y:tag"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000", "docker.io/library/localhost:5000"),
        ("ghcr.io/a/b/c-d_e.f__g:v1.0-rc", "ghcr.io/a/b/c-d_e.f__g:v1.0-rc"),
        ("host.example/x@sha256:" + "a" * 64, "host.example/x@sha256:" + "a" * 64),
        ("host/x", "docker.io/host/x:latest"),
        ("host:1/x:t@sha256:" + "b" * 64, "host:1/x:t@sha256:" + "b" * 64),
        ("[::1]:5000/x", "[::1]:5000/x:latest"),
    ],
)
def test_reference_normalizes_like_docker(text: str, canonical: str) -> None:
    assert str(Reference.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("Python", "lowercase"),
        ("host/Repo", "lowercase"),
        ("repo:bad tag", "whitespace"),
        ("repo:-x", "invalid tag"),
        ("repo:" + "x" * 129, "invalid tag"),
        ("repo@sha256:abc", "invalid digest"),
        ("repo@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("repo@sha256:" + "A" * 64, "lower hex"),
        ("@sha256:" + "a" * 64, "missing repository"),
        ("host:5000/", "missing repository"),
        ("a//b", "bad repository path component"),
        ("-bad.host/x", "invalid registry host"),
        ("x/" + "a" * 260, "longer than 255"),
    ],
)
def test_reference_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        Reference.parse(text)


def test_reference_parts() -> None:
    ref = Reference.parse("python:3.12")
    assert (ref.domain, ref.repository, ref.tag, ref.api_host) == (
        "docker.io",
        "library/python",
        "3.12",
        "registry-1.docker.io",
    )
    by_digest = Reference.parse("h:5/x:t@sha256:" + "c" * 64)
    assert by_digest.reference == "sha256:" + "c" * 64


def test_open_source_dispatch(tmp_path: Path, images: Images) -> None:
    registry = open_source("127.0.0.1:5000/x/y:1", plain_http=True)
    assert isinstance(registry, RegistrySource) and str(registry.ref) == "127.0.0.1:5000/x/y:1"
    assert isinstance(open_source("docker://busybox"), RegistrySource)
    layout = open_source(f"oci:{images.layout}:gzip")
    assert isinstance(layout, OCILayoutSource)
    colon_dir = tmp_path / "odd:dir"
    shutil.copytree(images.layout, colon_dir)
    with pytest.raises(SourceError, match="holds 5 images"):  # an existing path is not split
        open_source(f"oci:{colon_dir}").resolve(AMD64)
    assert open_source(f"oci:{colon_dir}:zstd").resolve(AMD64).name == "localhost/odd-dir:zstd"
    archive = tmp_path / "a:b.tar"
    write_docker_archive(images.layout, "gzip", archive, repo_tag="x/y:z")
    assert isinstance(open_source(f"docker-archive:{archive}:x/y:z"), DockerArchiveSource)
    assert open_source(f"docker-archive:{archive}:x/y:z").resolve(AMD64).name == "docker.io/x/y:z"
    for spec, message in [
        ("dir:/tmp/x", "unsupported transport 'dir:'"),
        ("https://host/x", "unknown transport 'https://'.*--plain-http"),
        ("oci:", "missing path"),
        ("oci-archive:/nonexistent.tar", "does not exist"),
        (f"oci:{tmp_path}/missing:tag", "does not exist"),
        ("docker-archive:", "missing path"),
        ("", "no image given"),
    ]:
        with pytest.raises(SourceError, match=message):
            open_source(spec)


# --- registry -------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["gzip", "zstd", "none"])
def test_registry_oci_manifest(images: Images, pushed: str, tag: str) -> None:
    with RegistrySource(Reference.parse(f"{pushed}/sources/img:{tag}"), True) as source:
        image = source.resolve(AMD64)
        assert image.name == f"{pushed}/sources/img:{tag}"
        assert image.manifest_media_type == MEDIA_OCI_MANIFEST
        assert image.manifest_digest == images.by_tag[tag].manifest_digest
        assert image.manifest == _blob(images, image.manifest_digest)
        assert image.index is None and image.platform == "linux/amd64"
        assert image.layers[0].media_type == images.by_tag[tag].layer_media_type
        _check_image(images, source, image, tag)


def test_registry_docker_v2_manifest(images: Images, pushed: str) -> None:
    source = open_source(f"docker://{pushed}/sources/docker:v2", plain_http=True)
    image = source.resolve(AMD64)
    assert image.manifest_media_type == MEDIA_DOCKER_MANIFEST
    assert image.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    _check_image(images, source, image, "gzip")


def test_registry_multi_platform_index(images: Images, pushed: str) -> None:
    source = RegistrySource(Reference.parse(f"{pushed}/sources/img:multi"), True)
    arm = source.resolve(ARM64)
    assert arm.platform == "linux/arm64/v8"
    assert arm.index_digest == sha256_digest(arm.index or b"")
    assert json.loads(arm.index or b"")["mediaType"] == MEDIA_OCI_INDEX
    _check_image(images, source, arm, "arm")
    amd = source.resolve(AMD64)
    assert amd.manifest_digest == images.by_tag["gzip"].manifest_digest
    assert amd.index == arm.index
    with pytest.raises(
        SourceError,
        match=r"no image for platform linux/s390x; available: "
        r"linux/amd64, linux/arm64/v8",
    ):
        source.resolve(Platform("linux", "s390x"))


def test_registry_by_digest(images: Images, pushed: str) -> None:
    digest = images.by_tag["zstd"].manifest_digest
    source = open_source(f"{pushed}/sources/img@{digest}", plain_http=True)
    image = source.resolve(AMD64)
    assert image.name == f"{pushed}/sources/img@{digest}"
    assert image.manifest_digest == digest
    index = open_source(f"{pushed}/sources/img@{images.index_digest}", plain_http=True)
    assert index.resolve(ARM64).index_digest == images.index_digest
    with pytest.raises(SourceError, match="not found"):
        open_source(f"{pushed}/sources/img@sha256:{'0' * 64}", plain_http=True).resolve(AMD64)


def test_registry_not_found(pushed: str) -> None:
    for ref, message in [("test/nothing:1", "not found"), ("sources/img:nope", "not found")]:
        with pytest.raises(SourceError, match=message):
            open_source(f"{pushed}/{ref}", plain_http=True).resolve(AMD64)
    source = RegistrySource(Reference.parse(f"{pushed}/sources/img:gzip"), True)
    image = source.resolve(AMD64)
    missing = Descriptor(image.layers[0].media_type, f"sha256:{'1' * 64}", 1)
    with pytest.raises(SourceError, match=f"blob sha256:{'1' * 64}.* not found"):
        source.open_blob(missing)


def test_registry_plain_http_hint(pushed: str) -> None:
    source = RegistrySource(Reference.parse(f"{pushed}/sources/img:gzip"))
    with pytest.raises(SourceError, match="--plain-http"):
        source.resolve(AMD64)


def test_registry_rejects_tampered_manifest(front: tuple[str, FrontState], images: Images) -> None:
    host, state = front
    state.tamper_manifests = True
    with pytest.raises(SourceError, match=r"Docker-Content-Digest .* does not match"):
        _front_source(host).resolve(AMD64)
    digest = images.by_tag["gzip"].manifest_digest
    with pytest.raises(SourceError, match="digest mismatch"):
        _front_source(host, f"sources/img@{digest}").resolve(AMD64)


def test_manifest_media_types_rejected() -> None:
    with pytest.raises(SourceError, match="schema 1"):
        media_type_of({"schemaVersion": 1, "fsLayers": []}, None, "m")
    with pytest.raises(SourceError, match="unsupported media type 'application/x-foo'"):
        media_type_of({"schemaVersion": 2, "mediaType": "application/x-foo"}, None, "m")


def test_registry_basic_auth(
    images: Images, private: Login, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = Reference.parse(f"{private.host}/sources/private:gzip")
    for style in ("auth", "username"):
        config = _docker_config(tmp_path, private.host, private.user, private.password, style)
        with RegistrySource(ref, True, config) as source:
            _check_image(images, source, source.resolve(AMD64), "gzip")
    config = _docker_config(tmp_path, private.host, private.user, private.password)
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    assert open_source(str(ref), plain_http=True).resolve(AMD64).name == str(ref)


def test_registry_auth_failures_keep_secrets(
    private: Login, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ref = Reference.parse(f"{private.host}/sources/private:gzip")
    with pytest.raises(SourceError, match=r"authentication failed.*wants a login"):
        RegistrySource(ref, True, tmp_path / "empty").resolve(AMD64)
    wrong = "WRONG-pass-do-not-log"
    config = _docker_config(tmp_path, private.host, private.user, wrong)
    source = RegistrySource(ref, True, config)
    with pytest.raises(SourceError, match=r"authentication failed for .*rejected") as err:
        source.resolve(AMD64)
    texts = [str(err.value), repr(err.value), repr(source), repr(source._auth), caplog.text]
    encoded = base64.b64encode(f"{private.user}:{wrong}".encode()).decode()
    for text in texts:
        assert wrong not in text and encoded not in text and private.password not in text


def test_registry_bearer_token_flow(
    front: tuple[str, FrontState], images: Images, tmp_path: Path
) -> None:
    host, state = front
    state.bearer = True
    with _front_source(host) as source:  # anonymous token
        _check_image(images, source, source.resolve(AMD64), "gzip")
    token_requests = [auth for path, auth in state.seen if path.startswith("/token")]
    assert token_requests == [None]
    assert "scope=repository%3Asources%2Fimg%3Apull" in state.seen[1][0]

    state.token_login, state.seen = ("bob", "token-pass"), []
    with pytest.raises(SourceError, match=r"authentication failed.*token server refused"):
        _front_source(host).resolve(AMD64)
    config = _docker_config(tmp_path, host, "bob", "token-pass")
    with _front_source(host, docker_config=config) as source:
        image = source.resolve(AMD64)
        state.tokens.clear()  # the token expires: the next request must renew it
        _check_image(images, source, image, "gzip")
    assert any(
        path.startswith("/token") and auth and auth.startswith("Basic ")
        for path, auth in state.seen
    )


def test_registry_redirect_drops_credentials(
    front: tuple[str, FrontState], images: Images, pushed: str
) -> None:
    host, state = front
    storage = FrontState(upstream=f"http://{pushed}")
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Storage", (_FrontHandler,), {"state": storage})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        state.bearer = True
        state.redirect_blobs_to = f"http://localhost:{server.server_address[1]}"
        with _front_source(host) as source:
            _check_image(images, source, source.resolve(AMD64), "gzip")
    finally:
        server.shutdown()
        server.server_close()
    assert storage.seen and all(auth is None for _, auth in storage.seen)
    assert all(auth for path, auth in state.seen if "/blobs/" in path)


def test_registry_retries_and_resumes(front: tuple[str, FrontState], images: Images) -> None:
    host, state = front
    layer = images.by_tag["gzip"].layer_digests[1]
    state.fail_once = {"/manifests/gzip", "/blobs/" + images.by_tag["gzip"].config_digest}
    state.truncate_once = {"/blobs/" + layer}
    with _front_source(host) as source:
        image = source.resolve(AMD64)
        _check_image(images, source, image, "gzip")
    assert not state.fail_once and not state.truncate_once
    layer_path = f"/v2/sources/img/blobs/{layer}"
    assert [path for path, _ in state.seen if layer in path] == [layer_path] * 2
    assert state.ranges == ["bytes=" + str(images.by_tag["gzip"].layer_sizes[1] // 2) + "-"]
    dead = RegistrySource(Reference.parse(f"127.0.0.1:{_free_port()}/x:y"), True, retries=1)
    with pytest.raises(SourceError, match=r"cannot reach registry .* after 2 attempts"):
        dead.resolve(AMD64)


# --- layouts and archives -------------------------------------------------------------------


def test_oci_layout(images: Images) -> None:
    source = OCILayoutSource(images.layout, "zstd")
    image = source.resolve(AMD64)
    assert image.name == "localhost/images:zstd"
    assert image.manifest_digest == images.by_tag["zstd"].manifest_digest
    _check_image(images, source, image, "zstd")
    multi = OCILayoutSource(images.layout, "multi").resolve(ARM64)
    assert multi.index_digest == images.index_digest and multi.platform == "linux/arm64/v8"
    with pytest.raises(SourceError, match=r"tag 'nope' not found .*available: arm, gzip"):
        OCILayoutSource(images.layout, "nope").resolve(AMD64)
    with pytest.raises(SourceError, match="holds 5 images; name one"):
        OCILayoutSource(images.layout).resolve(AMD64)
    with pytest.raises(SourceError, match="no image for platform linux/riscv64"):
        OCILayoutSource(images.layout, "multi").resolve(Platform("linux", "riscv64"))


def test_oci_layout_names_and_defaults(images: Images, tmp_path: Path) -> None:
    single = tmp_path / "My_Image.oci"
    info = build_layout(single, "v1", _layers("one"), platform="linux/amd64")
    index = json.loads((single / "index.json").read_text())
    assert OCILayoutSource(single).resolve(AMD64).name == "localhost/my_image:v1"
    index["manifests"][0]["annotations"]["io.containerd.image.name"] = "example.com/a/b:v1"
    (single / "index.json").write_text(json.dumps(index))
    by_full_ref = OCILayoutSource(single, "example.com/a/b:v1").resolve(AMD64)
    assert by_full_ref.name == "example.com/a/b:v1"
    assert by_full_ref.manifest_digest == info.manifest_digest
    with pytest.raises(SourceError, match="not an OCI image layout"):
        OCILayoutSource(tmp_path).resolve(AMD64)


def test_oci_layout_rejects_bad_blobs(images: Images, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(images.layout, broken)
    config = images.by_tag["gzip"].config_digest.split(":")[1]
    (broken / "blobs" / "sha256" / config).write_bytes(b"{}")
    with pytest.raises(SourceError, match="has 2 bytes"):
        OCILayoutSource(broken, "gzip").resolve(AMD64)
    with pytest.raises(SourceError, match="invalid digest"):
        OCILayoutSource(broken, "zstd").open_blob(Descriptor("x", "sha256:../../etc/passwd", 1))


def test_oci_archive(images: Images, tmp_path: Path) -> None:
    plain = tmp_path / "img.tar"
    write_oci_archive(images.layout, plain)
    compressed = tmp_path / "img.tar.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
    for path in (plain, compressed):
        source = OCIArchiveSource(path, "none")
        image = source.resolve(AMD64)
        assert image.name == "localhost/img:none"
        _check_image(images, source, image, "none")
        assert OCIArchiveSource(path, "multi").resolve(ARM64).platform == "linux/arm64/v8"
        source.close()
    skopeo = tmp_path / "skopeo.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{images.layout}:zstd", f"oci-archive:{skopeo}:zstd"],
        check=True,
        capture_output=True,
    )
    source2 = open_source(f"oci-archive:{skopeo}")
    _check_image(images, source2, source2.resolve(AMD64), "zstd")


def test_docker_archive(images: Images, tmp_path: Path) -> None:
    path = tmp_path / "saved.tar"
    write_docker_archive(images.layout, "gzip", path, repo_tag="busybox:1")
    source = DockerArchiveSource(path, "docker.io/library/busybox:1")
    image = source.resolve(AMD64)
    assert image.name == "docker.io/library/busybox:1"
    assert image.manifest_media_type == MEDIA_DOCKER_MANIFEST
    assert image.manifest_digest == sha256_digest(image.manifest)
    manifest = json.loads(image.manifest)
    assert manifest["config"]["digest"] == image.config_digest
    assert image.config_digest == images.by_tag["gzip"].config_digest
    assert [d.digest for d in image.layers] == list(images.by_tag["gzip"].diff_ids)
    assert {d.media_type for d in image.layers} == {"application/vnd.docker.image.rootfs.diff.tar"}
    assert len(_read_all(source, image)) == 2
    assert DockerArchiveSource(path, "@0").resolve(AMD64).manifest == image.manifest
    with pytest.raises(SourceError, match=r"'other:1' not found .*tags: busybox:1"):
        DockerArchiveSource(path, "other:1").resolve(AMD64)


def test_docker_archive_from_skopeo_and_gzip_layers(images: Images, tmp_path: Path) -> None:
    saved = tmp_path / "skopeo.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            f"oci:{images.layout}:gzip",
            f"docker-archive:{saved}:reg.example:5000/a/b:c",
        ],
        check=True,
        capture_output=True,
    )
    source = open_source(f"docker-archive:{saved}")
    image = source.resolve(AMD64)
    assert image.name == "reg.example:5000/a/b:c"
    assert len(_read_all(source, image)) == 2
    # a hand-made archive whose layers stayed gzip-compressed, one listed twice via symlink
    layer = _blob(images, images.by_tag["gzip"].layer_digests[0])
    config = json.loads(_blob(images, images.by_tag["gzip"].config_digest))
    config["rootfs"]["diff_ids"] = [images.by_tag["gzip"].diff_ids[0]] * 2
    config_bytes = json.dumps(config).encode()
    gz = tmp_path / "gz.tar"
    with tarfile.open(gz, "w") as tar:
        for name, data in [
            ("cfg.json", config_bytes),
            ("l1/layer.tar", layer),
            (
                "manifest.json",
                json.dumps(
                    [
                        {
                            "Config": "cfg.json",
                            "RepoTags": None,
                            "Layers": ["l1/layer.tar", "l2/layer.tar"],
                        }
                    ]
                ).encode(),
            ),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("l2/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../l1/layer.tar"
        tar.addfile(link)
    source = DockerArchiveSource(gz)
    image = source.resolve(AMD64)
    assert image.name == "localhost/gz:latest"
    assert [d.digest for d in image.layers] == [images.by_tag["gzip"].layer_digests[0]] * 2
    assert image.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert _read_all(source, image) == [layer, layer]


def test_docker_archive_detects_wrong_diff_id(images: Images, tmp_path: Path) -> None:
    path = tmp_path / "saved.tar"
    write_docker_archive(images.layout, "none", path)
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    layer_name = json.loads(members["manifest.json"])[0]["Layers"][0]
    members[layer_name] = members[layer_name][:-1] + b"\x01"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = DockerArchiveSource(path)
    image = source.resolve(AMD64)
    with pytest.raises(SourceError, match="digest mismatch"):
        _read_all(source, image)
    assert hashlib.sha256(members[layer_name]).hexdigest() not in image.layers[0].digest
