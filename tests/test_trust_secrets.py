"""No credential leaves the process that needs it: S3 keys and session tokens, registry
passwords and the tokens made from them appear in no argv, output, error, log, state or info
file, control-socket reply, metrics text or store object. Each secret is a fresh, unique
string, so any place that shows it is found by searching for it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REGISTRY_USER, Registry, S3Server
from prometheus_client import CollectorRegistry, generate_latest

from bench.imagebuild import ImageInfo
from bench.registrypush import push_layout
from cafs import paths
from cafs.mounts import mount
from cafs.mounts.metrics import MountCollector

Layout = tuple[Path, str, ImageInfo]


def _cafs(*argv: str, check: bool = True) -> str:
    """Run the CLI as a user would; its stdout and stderr together."""
    res = subprocess.run([sys.executable, "-m", "cafs", *argv], capture_output=True,
                         text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def _files_under(*roots: Path) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    yield path, path.read_bytes()


def _leaks(secrets: list[str], places: dict[str, bytes]) -> list[str]:
    return [f"{secret!r} in {where}" for where, text in places.items()
            for secret in secrets if secret.encode() in text]


@pytest.fixture
def short_run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run and log dirs of this test alone, short enough for a socket path."""
    path = Path(tempfile.mkdtemp(prefix="cafs-s-"))
    monkeypatch.setenv("CAFS_RUN_DIR", str(path / "run"))
    monkeypatch.setenv("CAFS_LOG_DIR", str(path / "log"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.root
def test_store_credentials_reach_no_argv_output_log_state_reply_or_metrics(
    simple_layout: Layout, s3_server: S3Server, short_run_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secrets = [f"s3-secret-{uuid.uuid4().hex}", f"s3-session-{uuid.uuid4().hex}"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[0])
    monkeypatch.setenv("AWS_SESSION_TOKEN", secrets[1])
    layout, tag, _ = simple_layout
    url, cache, mnt = s3_server.url, tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    seen: dict[str, bytes] = {}
    seen["cafs index"] = _cafs("index", f"oci:{layout}:{tag}", "--store", url).encode()
    ref = json.loads(_cafs("images", "--store", url, "--json"))[0]["ref"]
    seen["cafs mount"] = _cafs("mount", ref, str(mnt), "--store", url,
                               "--cache-dir", str(cache)).encode()
    try:
        assert (mnt / "etc/hostname").read_bytes() == b"simple v2\n"
        pid = mount.daemon_pid(mnt)
        assert pid is not None
        seen["daemon argv"] = Path(f"/proc/{pid}/cmdline").read_bytes()
        seen["cafs stats"] = _cafs("stats", str(mnt)).encode()
        for request in ("info", "stats", "prefetch"):
            seen[f"control {request}"] = json.dumps(mount.query(mnt, request)).encode()
        registry = CollectorRegistry()
        registry.register(MountCollector())
        seen["metrics"] = generate_latest(registry)
        assert str(mnt).encode() in seen["metrics"]  # the scrape did reach the mount
        for path, data in _files_under(paths.mount_state_dir(mnt), short_run_dir / "log"):
            seen[str(path)] = data
    finally:
        seen["cafs umount"] = _cafs("umount", str(mnt), check=False).encode()
    denied = _cafs("mount", ref, str(tmp_path / "nowhere"), "--store", "s3://no-such-bucket-x",
                   check=False)
    seen["a failed mount"] = denied.encode()
    for path, data in _files_under(cache):
        seen[str(path)] = data
    assert any("log" in where for where in seen), sorted(seen)  # the daemon's log was read
    assert not _leaks(secrets, seen)


@pytest.mark.root
def test_registry_credentials_reach_no_output_log_or_store_object(
    registry_auth: Registry, simple_layout: Layout, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout, tag, _ = simple_layout
    user, password = REGISTRY_USER
    push_layout(layout, tag, registry_auth.host, "test/secret", auth=registry_auth.auth)
    wrong = f"wrong-{uuid.uuid4().hex}"
    store = tmp_path / "store"
    docker = tmp_path / "docker"
    docker.mkdir()

    def login(secret: str) -> None:
        token = base64.b64encode(f"{user}:{secret}".encode()).decode()
        (docker / "config.json").write_text(
            json.dumps({"auths": {registry_auth.host: {"auth": token}}}))

    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    image = f"{registry_auth.host}/test/secret:{tag}"
    login(wrong)
    refused = _cafs("index", image, "--plain-http", "--store", f"file://{store}", check=False)
    assert "authentication failed" in refused
    login(password)
    indexed = _cafs("index", image, "--plain-http", "--store", f"file://{store}")
    secrets = [password, wrong, base64.b64encode(f"{user}:{password}".encode()).decode(),
               base64.b64encode(f"{user}:{wrong}".encode()).decode()]
    seen = {"a refused index": refused.encode(), "cafs index": indexed.encode()}
    for path, data in _files_under(store):
        seen[str(path)] = data
    assert len(seen) > 3  # the store was written
    assert not _leaks(secrets, seen)


def test_debug_logging_writes_no_signature_or_session_token(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's debug log (cafs.logs.setup) while its store reads, presigned and not:
    botocore's and urllib3's debug records would show the signed headers and URLs."""
    secrets = [f"s3-secret-{uuid.uuid4().hex}", f"s3-session-{uuid.uuid4().hex}"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[0])
    monkeypatch.setenv("AWS_SESSION_TOKEN", secrets[1])
    script = (
        "import logging, sys\n"
        "from cafs import logs\n"
        "from blobstore import BlobNotFound, open_store\n"
        "logs.setup(logging.DEBUG)\n"
        "logging.getLogger('cafs').debug('debug records are written')\n"
        "for retries in (True, False):\n"
        "    store = open_store(sys.argv[1], retries=retries)\n"
        "    store.put('blobs/ab/x', b'x')\n"
        "    assert store.get('blobs/ab/x') == b'x'\n"
        "    assert store.get_range('blobs/ab/x', 0, 1) == b'x'\n"
        "    try:\n"
        "        store.get('blobs/ab/missing')\n"
        "    except BlobNotFound:\n"
        "        pass\n"
    )
    res = subprocess.run([sys.executable, "-c", script, s3_server.url], capture_output=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    log = res.stdout + res.stderr
    assert b"debug records are written" in log
    assert not _leaks([*secrets, "Signature="], {"the debug log": log})
