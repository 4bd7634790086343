"""Real services on loopback for benchmarks and tests: an OCI registry and an S3 server.

`start_registry` runs Debian's `docker-registry` (distribution 2.8); `start_s3` runs an S3
server with a fresh bucket: SeaweedFS, a real object store (`bench/seaweed.py`), or moto's
mock in a child process (`python -m moto.server`). All are context managers that stop their
server on exit, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

REGISTRY_BIN = "/usr/bin/docker-registry"
Spawn = Callable[..., "subprocess.Popen[bytes]"]


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(
    url: str, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 15
) -> None:
    """Wait until `url` answers at all (any status); fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            output = log.read_text() if log else ""
            raise RuntimeError(f"server for {url} exited with {proc.returncode}: {output}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving(
    cmd: Sequence[str], url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process, logging to `log`, until `url` answers; stop it on exit."""
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            list(cmd), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:
        wait_http(url, proc, log)
        yield proc
    finally:
        stop_process(proc)


# --- OCI registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:PORT", as push_layout and image references want it
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def htpasswd_line(user: str, password: str) -> str:
    import bcrypt  # distribution's htpasswd accepts bcrypt hashes only

    # Cost 4, the least bcrypt allows: each authenticated request pays for it.
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"


@contextlib.contextmanager
def start_registry(workdir: Path, auth: tuple[str, str] | None = None) -> Iterator[Registry]:
    """docker-registry on a free loopback port, storing under `workdir`, plain HTTP, with
    htpasswd basic auth when `auth` is given."""
    if not os.path.exists(REGISTRY_BIN):
        raise FileNotFoundError(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
    host = f"127.0.0.1:{free_port()}"
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {
            "filesystem": {"rootdirectory": str(workdir / "storage")},
            "delete": {"enabled": True},
        },
        "http": {"addr": host, "secret": "cafs-test-secret"},
    }
    if auth is not None:
        (workdir / "htpasswd").write_text(htpasswd_line(*auth))
        config["auth"] = {"htpasswd": {"realm": "cafs-test", "path": str(workdir / "htpasswd")}}
    # YAML is a superset of JSON.
    (workdir / "config.yml").write_text(json.dumps(config, indent=2) + "\n")
    cmd = [REGISTRY_BIN, "serve", str(workdir / "config.yml")]
    with serving(cmd, f"http://{host}/v2/", workdir / "registry.log"):
        yield Registry(host, auth)


# --- S3 -----------------------------------------------------------------------------------

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


S3_SERVERS = ("seaweedfs", "moto")  # the S3 servers start_s3 runs; the first is the default
S3_ALIASES = {"seaweed": "seaweedfs"}


def s3_server_name(text: str) -> str:
    """The S3 server a flag or variable names ("seaweed" is short for "seaweedfs")."""
    name = S3_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in S3_SERVERS:
        raise ValueError(f"unknown S3 server {text!r}: use {' or '.join(S3_SERVERS)}")
    return name


@dataclass(frozen=True)
class S3:
    endpoint: str  # "http://127.0.0.1:PORT"
    bucket: str
    pid: int | None = None  # the server's process, to read its CPU time
    server: str = "moto"  # which of S3_SERVERS it is, for the record
    storage: Path | None = None  # the files it keeps objects in (None: moto keeps memory)
    metrics: str | None = None  # its Prometheus endpoint (SeaweedFS), None where it has none

    def store_url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def sent_bytes(self) -> int | None:
        """Bytes the server has sent from this bucket, response bodies as it counts them
        (SeaweedFS's `bucket_traffic_sent_bytes_total`), or None where it keeps no count.
        The server's own figure is what a client's cold start cost on the wire, whatever
        process of it fetched (`cafs pull`'s records, index and EROFS image, the mount's
        blobs and pack ranges), as the registry's access log is for containerd's."""
        if self.metrics is None:
            return None
        text = requests.get(self.metrics, timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name.endswith("bucket_traffic_sent_bytes_total")
                        and sample.labels.get("bucket") == self.bucket):
                    total += sample.value
        return int(total)

    def environ(self, scratch: Path) -> dict[str, str]:
        """The environment that points boto3 (here and in cafs daemons) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            **S3_CREDENTIALS,
            "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
        }


def start_s3(
    workdir: Path, host: str = "127.0.0.1", wrap: Sequence[str] = (), server: str = "seaweedfs"
) -> contextlib.AbstractContextManager[S3]:
    """An S3 server (one of S3_SERVERS) with one fresh bucket, stopped on exit. `wrap`
    prefixes its command (e.g. `ip netns exec NS`, with `host` an address inside that
    namespace)."""
    if s3_server_name(server) == "moto":
        return start_moto(workdir, host, wrap)
    from bench.seaweed import start_seaweedfs  # it builds on this module

    return start_seaweedfs(workdir, host, wrap)


@contextlib.contextmanager
def start_moto(workdir: Path, host: str = "127.0.0.1", wrap: Sequence[str] = ()) -> Iterator[S3]:
    """moto's S3 server in a child process with one fresh bucket."""
    port = free_port()
    cmd = [*wrap, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    s3 = S3(f"http://{host}:{port}", f"cafs-bench-{uuid.uuid4().hex[:12]}", server="moto")
    with serving(
        cmd, s3.endpoint, workdir / "moto.log", env={**os.environ, **S3_CREDENTIALS}
    ) as proc:
        s3 = replace(s3, pid=proc.pid)
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=s3.bucket)
        yield s3


@contextlib.contextmanager
def environment(values: dict[str, str], unset: Sequence[str] = ()) -> Iterator[None]:
    """Set (and unset) environment variables for a while, children included; then restore."""
    saved = {k: os.environ.get(k) for k in [*values, *unset]}
    for k in unset:
        os.environ.pop(k, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
