"""End to end, as root: a private containerd 1.6 with cafs as a proxy snapshotter.

An image is built here (busybox from Debian's busybox-static), indexed into a file:// store,
made to appear in containerd with `cafs pull` and run with `ctr run --snapshotter cafs`
through the real cafs FUSE daemon, with no layer ever entering containerd's content store.
The fallback path (a plain `ctr images import`, unpacked by containerd through the
snapshotter as overlayfs would) runs too, and so do the restart and cleanup guarantees.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from blobstore import open_store
from snapshotter.pull import PullError, pull

pytestmark = [pytest.mark.root, pytest.mark.slow]
T = TypeVar("T")

REF = "example.com/cafs/busybox:1"
PLAIN_REF = "example.com/plain/busybox:1"
CAFS = [sys.executable, "-m", "cafs"]
Layer = list[tuple[str, str, bytes | str]]  # (path, kind, content or link target)


def _sha(data: bytes) -> str:
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


def write_layout(layout: Path, name: str, layers: list[Layer]) -> None:
    """A single-image OCI layout, uncompressed layers, tagged 'v1' and named for ctr."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict[str, object]:
        (blobs / _sha(data)[7:]).write_bytes(data)
        return {"digest": _sha(data), "size": len(data)}

    tars = [_tar(layer) for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in tars]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **put(json.dumps(config).encode()),
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
    def __init__(self, base: Path) -> None:
        self.base = base
        self.ctd_sock = base / "ctd.sock"
        self.sn_sock = base / "cafs.sock"
        self.root = base / "snroot"
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
        _wait_for(lambda: self.sn_sock.exists(), "snapshotter socket", self.snapshotter)

    def stop_snapshotter(self, sig: int = signal.SIGTERM) -> int:
        assert self.snapshotter is not None
        self.snapshotter.send_signal(sig)
        code = self.snapshotter.wait(timeout=30)
        self.snapshotter = None
        return code

    def start_containerd(self) -> None:
        config = self.base / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{self.base}/ctd-root"\nstate = "{self.base}/ctd-state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.ctd_sock}"\n'
            f'[proxy_plugins.cafs]\n  type = "snapshot"\n  address = "{self.sn_sock}"\n'
        )
        with open(self.base / "containerd.log", "ab") as log:
            self.containerd = subprocess.Popen(
                ["containerd", "--config", str(config)], stdout=log, stderr=log
            )
        _wait_for(
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
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "KILL", task, check=False)
            time.sleep(0.2)
            self.ctr("tasks", "rm", "-f", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", container, check=False)
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


def _wait_for(
    ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout}s")
        time.sleep(0.05)


def _retry(fn: Callable[[], T], timeout: float = 15) -> T:
    """containerd redials a restarted proxy with backoff; the first calls may fail."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [t for t in ("containerd", "ctr", "runc") if shutil.which(t) is None]
    if missing or not Path("/bin/busybox").exists() or not Path("/dev/fuse").exists():
        pytest.skip(f"needs containerd, runc, busybox-static and /dev/fuse (missing {missing})")
    from indexer.build import IndexOptions, index_image
    from indexer.sources import open_source

    c = Cluster(tmp_path_factory.mktemp("ctd"))
    write_layout(c.base / "layout", REF, busybox_layers())
    index_image(
        open_source(f"oci:{c.base / 'layout'}:v1"), open_store(c.store_url), IndexOptions(name=REF)
    )
    try:
        c.start_snapshotter()  # first: containerd backs off from a socket that is not there
        c.start_containerd()
        yield c
    finally:
        c.teardown()


def _pull(c: Cluster) -> None:
    """After a test restarted the snapshotter, containerd redials it with backoff."""
    deadline = time.monotonic() + 15
    while True:
        try:
            pull(REF, address=str(c.ctd_sock), store_url=c.store_url)
            return
        except PullError as exc:
            if "unavailable" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_pull_and_run_without_downloading_layers(cluster: Cluster) -> None:
    _pull(cluster)
    _pull(cluster)  # idempotent: the chain is found and kept
    out = cluster.run("lazy1", "sh", "-c", "cat /etc/hello; ls /etc; echo w >/tmp/w; cat /tmp/w")
    assert out.split() == ["hello", "from", "cafs", "hello", "w"]  # /etc/gone whited out
    content = cluster.ctr("content", "ls", "-q").stdout.split()
    layers = json.loads(
        (cluster.base / "layout" / "blobs" / "sha256" / _manifest_hex(cluster)).read_text()
    )["layers"]
    assert len(content) == 2 and not {layer["digest"] for layer in layers} & set(content)
    snaps = cluster.ctr("snapshots", "--snapshotter", "cafs", "ls").stdout
    assert snaps.count("Committed") == 2


def _manifest_hex(c: Cluster) -> str:
    index = json.loads((c.base / "layout" / "index.json").read_text())
    return str(index["manifests"][0]["digest"]).removeprefix("sha256:")


def test_unindexed_image_falls_back_to_overlay(cluster: Cluster) -> None:
    """Its base layer is the indexed image's, so it also stacks an overlay on a remote."""
    plain = cluster.base / "plain"
    layers = busybox_layers()
    layers[1] = [("etc", "dir", b""), ("etc/plain", "file", "plain overlay\n")]
    write_layout(plain, PLAIN_REF, layers)
    write_archive(plain, cluster.base / "plain.tar")
    cluster.ctr("images", "import", "--no-unpack", str(cluster.base / "plain.tar"))
    assert cluster.run("plain1", "cat", "/etc/plain", image=PLAIN_REF) == "plain overlay\n"
    cluster.ctr("images", "rm", "--sync", PLAIN_REF)


def test_snapshotter_restart_never_breaks_a_running_container(cluster: Cluster) -> None:
    _pull(cluster)
    cluster.run("long1", "sleep", "600", detach=True)
    try:
        daemons = cluster.daemons()  # the top chain's, and the base's from the import above
        assert daemons
        assert cluster.stop_snapshotter(signal.SIGKILL) != 0  # the harshest stop
        assert cluster.exec("long1", "e1", "cat", "/etc/hello") == "hello from cafs\n"
        cluster.start_snapshotter()  # replaces the stale socket, re-adopts the live mounts
        assert _retry(lambda: cluster.run("after1", "cat", "/etc/hello")) == "hello from cafs\n"
        assert sorted(cluster.daemons()) == sorted(daemons)
        log = (cluster.base / "snapshotter.log").read_text()
        assert f"{len(daemons)} live, 0 remounted" in log
        assert cluster.stop_snapshotter() == 0  # SIGTERM: clean, and still no harm done
        assert cluster.exec("long1", "e2", "cat", "/etc/hello") == "hello from cafs\n"
        cluster.start_snapshotter()
    finally:
        cluster.ctr("tasks", "kill", "-s", "KILL", "long1", check=False)
        time.sleep(0.3)
        cluster.ctr("tasks", "rm", "-f", "long1", check=False)
        cluster.ctr("containers", "rm", "long1", check=False)


def test_a_dead_daemon_is_remounted_on_demand(cluster: Cluster) -> None:
    _pull(cluster)
    _retry(lambda: cluster.run("warm1", "true"))
    dead = cluster.daemons()
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    assert cluster.run("again1", "cat", "/etc/hello") == "hello from cafs\n"
    alive = cluster.daemons()
    assert len(alive) == 1 and not set(alive) & set(dead)  # only the top chain is needed


def test_image_removal_unmounts_and_deletes_everything(cluster: Cluster) -> None:
    _pull(cluster)
    _retry(lambda: cluster.run("last1", "true"))
    assert cluster.daemons()
    cluster.ctr("images", "rm", "--sync", REF)
    listing = cluster.ctr("snapshots", "--snapshotter", "cafs", "ls").stdout
    assert listing.splitlines()[1:] == []  # the header only
    deadline = time.monotonic() + 10
    while cluster.daemons() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.daemons() == []
    assert [m for m in cluster.mounts() if str(cluster.root) in m] == []
    assert os.listdir(cluster.root / "snapshots") == []
