"""Shared fixtures: the real services tests run against (an OCI registry, an S3 server),
store URLs for every backend, and the test images built once per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import boto3
import pytest
from images import AWKWARD_CONFIG, SIMPLE_CONFIG, awkward_layers, simple_layers
from moto.server import ThreadedMotoServer
from reference import Tree, snapshot_tree, umoci_unpack
from users import User, ensure_user

from bench.imagebuild import ImageInfo, build_layout
from bench.seaweed import SeaweedFS
from bench.services import S3_CREDENTIALS, Registry, free_port, s3_server_name, start_registry

__all__ = ["Registry", "free_port"]  # imported from here by tests

REGISTRY_USER = ("cafs", "cafs-secret")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip `root` tests only where root is missing: as root they must run."""
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root")


# --- OCI registry --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Debian's docker-registry (distribution 2.8), plain HTTP, no auth."""
    with start_registry(tmp_path_factory.mktemp("registry"), None) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with htpasswd basic auth; the credentials are in `.auth`."""
    with start_registry(tmp_path_factory.mktemp("registry-auth"), REGISTRY_USER) as reg:
        yield reg


# --- S3 ------------------------------------------------------------------------------------


class _MotoServer(ThreadedMotoServer):
    """ThreadedMotoServer that also closes its socket on stop, so clients see the server
    gone (connection refused) and it can start again on the same port. The mocked state
    lives in moto's process-global backends and survives the restart."""

    def __init__(self, port: int) -> None:
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.running = False

    def start(self) -> None:
        if not self.running:
            super().start()
            self.running = True

    def stop(self) -> None:
        if self.running:
            super().stop()
            if self._server is not None:
                self._server.server_close()
            self.running = False


class _Restartable(Protocol):
    """What fault tests do to the S3 server: take it down and bring it back, same port,
    same objects (moto in this process, or SeaweedFS, `bench/seaweed.py`)."""

    endpoint: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def s3_server_kind() -> str:
    """The S3 server the tests run against: CAFS_TEST_S3=moto (default) or seaweed."""
    return s3_server_name(os.environ.get("CAFS_TEST_S3", "moto") or "moto")


@dataclass(frozen=True)
class S3Server:
    url: str  # "s3://BUCKET/cafs", a store URL
    endpoint: str  # "http://127.0.0.1:PORT"
    bucket: str
    _server: _Restartable

    def stop(self) -> None:
        """Take the endpoint down (connections are refused) for fault tests."""
        self._server.stop()

    def start(self) -> None:
        """Bring it back on the same port, with the same buckets and objects."""
        self._server.start()


@pytest.fixture(scope="session")
def _s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Restartable]:
    try:
        kind = s3_server_kind()
    except ValueError as exc:
        raise pytest.UsageError(f"CAFS_TEST_S3: {exc}") from None
    if kind == "seaweedfs":
        with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as weed:
            yield weed
        return
    server = _MotoServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(
    _s3: _Restartable, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[S3Server]:
    """An S3 server over HTTP (moto, or SeaweedFS with CAFS_TEST_S3=seaweed) with a fresh
    bucket; the AWS environment points at it for this test only (AWS_ENDPOINT_URL, fixed
    credentials, no profiles or config files)."""
    _s3.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _s3.endpoint)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    bucket = f"cafs-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=_s3.endpoint)
    client.create_bucket(Bucket=bucket)
    yield S3Server(f"s3://{bucket}/cafs", _s3.endpoint, bucket, _s3)
    _s3.start()
    if isinstance(_s3, SeaweedFS):  # a bucket holds a volume of its own: free it
        client.delete_bucket(Bucket=bucket)  # objects and all (allowDeleteBucketNotEmpty)


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind, so storage tests run against every backend."""
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        return server.url
    return f"file://{tmp_path / 'store'}"


# --- images --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def awkward_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, ImageInfo]:
    """The awkward image in an OCI layout: (layout_dir, tag, info). Shared: copy the
    layout before adding tags to it."""
    layout = tmp_path_factory.mktemp("awkward") / "layout"
    info = build_layout(layout, "awkward", awkward_layers(), config=AWKWARD_CONFIG)
    return layout, "awkward", info


@pytest.fixture(scope="session")
def simple_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, ImageInfo]:
    """The simple two-layer image in an OCI layout: (layout_dir, tag, info)."""
    layout = tmp_path_factory.mktemp("simple") / "layout"
    info = build_layout(layout, "simple", simple_layers(), config=SIMPLE_CONFIG)
    return layout, "simple", info


@pytest.fixture(scope="session")
def awkward_reference(
    awkward_layout: tuple[Path, str, ImageInfo], tmp_path_factory: pytest.TempPathFactory
) -> Tree:
    """What umoci makes of the awkward image (needs root: mark users `root`)."""
    layout, tag, _ = awkward_layout
    return snapshot_tree(umoci_unpack(layout, tag, tmp_path_factory.mktemp("awkward-ref") / "b"))


# --- users ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def attacker() -> User:
    """A real unprivileged local user (tests/users.py); attack tests run their attack as it.
    Needs root: mark users `root`."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    return ensure_user()
