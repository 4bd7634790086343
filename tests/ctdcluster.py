"""A private containerd 1.6 with cafs as its proxy snapshotter, for the end-to-end tests
(tests/test_snapshotter_containerd.py drives it with ctr and `cafs pull`,
tests/test_snapshotter_cri.py through its CRI plugin), and the busybox images they run.

Everything lives under one temporary directory: containerd's root, state and socket, the
snapshotter's root, socket and store, cafs' run, log and cache directories. Needs root,
/dev/fuse, containerd, runc and busybox-static (`require_containerd` skips without them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REF = "example.com/cafs/busybox:1"
CAFS = [sys.executable, "-m", "cafs"]
Layer = list[tuple[str, str, bytes | str]]  # (path, kind, content or link target)
BUSYBOX_CONFIG: dict[str, Any] = {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}


def require_containerd() -> None:
    """Skip unless everything the private containerd needs is here (root is checked by the
    `root` marker's hook in conftest)."""
    missing = [t for t in ("containerd", "ctr", "runc") if shutil.which(t) is None]
    if missing or not Path("/bin/busybox").exists() or not Path("/dev/fuse").exists():
        pytest.skip(f"needs containerd, runc, busybox-static and /dev/fuse (missing {missing})")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: Layer) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, content in entries:
            info = tarfile.TarInfo(path)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(content)
                tar.addfile(info)
            else:
                data = content if isinstance(content, bytes) else content.encode()
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_layout(
    layout: Path, name: str, layers: list[Layer], config: Mapping[str, Any] = BUSYBOX_CONFIG
) -> None:
    """A single-image OCI layout, uncompressed layers, tagged 'v1' and named for ctr;
    `config` is the image config's `config` object."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, object]:
        (blobs / sha256_digest(data)[7:]).write_bytes(data)
        return {"digest": sha256_digest(data), "size": len(data)}

    tars = [_tar(layer) for layer in layers]
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": dict(config),
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in tars]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(image_config).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(t)} for t in tars],
    }
    desc = {"mediaType": manifest["mediaType"], **put(json.dumps(manifest).encode())}
    desc["annotations"] = {
        "org.opencontainers.image.ref.name": "v1",
        "io.containerd.image.name": name,
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


def write_archive(layout: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout)), recursive=False)


def busybox_layers() -> list[Layer]:
    base: Layer = [
        *[(d, "dir", b"") for d in ("bin", "etc", "tmp", "proc", "dev", "sys")],
        ("bin/busybox", "file", Path("/bin/busybox").read_bytes()),
        ("bin/sh", "symlink", "busybox"),
        ("etc/gone", "file", "deleted by the next layer\n"),
    ]
    top: Layer = [
        ("etc", "dir", b""),
        ("etc/hello", "file", "hello from cafs\n"),
        ("etc/.wh.gone", "file", b""),
    ]
    return [base, top]


class Cluster:
    def __init__(self, base: Path, root: Path | None = None) -> None:
        """`root`: the snapshotter's root directory (default `<base>/snroot`)."""
        self.base = base
        self.ctd_sock = base / "ctd.sock"
        self.sn_sock = base / "cafs.sock"
        self.ctd_root = base / "ctd-root"
        self.root = root or base / "snroot"
        self.store_url = f"file://{base / 'store'}"
        self.env = {
            **os.environ,
            "CAFS_RUN_DIR": str(base / "run"),
            "CAFS_LOG_DIR": str(base / "log"),
            "CAFS_CACHE_DIR": str(base / "cache"),
        }
        self.snapshotter: subprocess.Popen[bytes] | None = None
        self.containerd: subprocess.Popen[bytes] | None = None

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["ctr", "--address", str(self.ctd_sock), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {res.stderr}{self.logs()}")
        return res

    def run(self, name: str, *cmd: str, image: str = REF, detach: bool = False) -> str:
        """`ctr run` of busybox with the cafs snapshotter; returns the output."""
        mode = "-d" if detach else "--rm"
        args = ["run", mode, "--snapshotter", "cafs", image, name, "/bin/busybox", *cmd]
        return self.ctr(*args).stdout

    def exec(self, container: str, exec_id: str, *cmd: str) -> str:
        return self.ctr(
            "tasks", "exec", "--exec-id", exec_id, container, "/bin/busybox", *cmd
        ).stdout

    def logs(self) -> str:
        out = []
        for name in ("snapshotter.log", "containerd.log"):
            with contextlib.suppress(FileNotFoundError):
                out.append(f"\n--- {name}\n" + (self.base / name).read_text()[-3000:])
        return "".join(out)

    def start_snapshotter(self) -> None:
        args = ["snapshotter", "--root", str(self.root), "--address", str(self.sn_sock)]
        args += ["--store", self.store_url, "--cache-dir", str(self.base / "cache")]
        with open(self.base / "snapshotter.log", "ab") as log:
            self.snapshotter = subprocess.Popen(
                [*CAFS, *args], stdout=log, stderr=log, env=self.env
            )
        wait_for(lambda: self.sn_sock.exists(), "snapshotter socket", self.snapshotter)

    def heal(self) -> None:
        """Start the snapshotter again if a test stopped it and failed before restarting it,
        so that one failing test does not take the module's later tests with it."""
        if self.snapshotter is None or self.snapshotter.poll() is not None:
            self.start_snapshotter()

    def stop_snapshotter(self, sig: int = signal.SIGTERM) -> int:
        assert self.snapshotter is not None
        self.snapshotter.send_signal(sig)
        code = self.snapshotter.wait(timeout=30)
        self.snapshotter = None
        return code

    def start_containerd(self, cri: str | None = None) -> None:
        """Without `cri`, the CRI plugin is disabled; with it, `cri` is appended to the
        config (the `[plugins."io.containerd.grpc.v1.cri"]` tables), and the plugin keeps
        its state under containerd's private root and state directories."""
        config = self.base / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{self.ctd_root}"\nstate = "{self.base}/ctd-state"\n'
            + ('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n' if cri is None else "")
            + f'[grpc]\n  address = "{self.ctd_sock}"\n'
            f'[proxy_plugins.cafs]\n  type = "snapshot"\n  address = "{self.sn_sock}"\n'
            + (cri or "")
        )
        with open(self.base / "containerd.log", "ab") as log:
            self.containerd = subprocess.Popen(
                ["containerd", "--config", str(config)], stdout=log, stderr=log
            )
        wait_for(
            lambda: self.ctd_sock.exists() and self.ctr("version", check=False).returncode == 0,
            "containerd",
            self.containerd,
        )

    def daemons(self) -> list[int]:
        """Pids of cafs FUSE daemons serving mounts under this cluster's root."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()  # argv, or a mount server's title
                if b"cafs.daemon" in cmdline and str(self.root).encode() in cmdline:
                    pids.append(int(entry.name))
        return pids

    def mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if str(self.base) in line.split()[4]]

    def teardown(self) -> None:
        """Whatever a failed test left: tasks and containers in every namespace (CRI's are
        in k8s.io), then the daemons, the FUSE daemons and every mount under the base."""
        namespaces = self.ctr("namespaces", "ls", "-q", check=False).stdout.split()
        for ns in namespaces or ["default"]:
            for task in self.ctr("-n", ns, "tasks", "ls", "-q", check=False).stdout.split():
                self.ctr("-n", ns, "tasks", "kill", "-s", "KILL", task, check=False)
                time.sleep(0.2)
                self.ctr("-n", ns, "tasks", "rm", "-f", task, check=False)
            containers = self.ctr("-n", ns, "containers", "ls", "-q", check=False).stdout
            for container in containers.split():
                self.ctr("-n", ns, "containers", "rm", container, check=False)
        for proc in (self.snapshotter, self.containerd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for pid in self.daemons():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mountpoint in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False)


def wait_for(
    ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout}s")
        time.sleep(0.05)


def retry(fn: Callable[[], T], timeout: float = 15) -> T:
    """containerd redials a restarted proxy with backoff; the first calls may fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
