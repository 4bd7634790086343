"""A private containerd with cafs proxy snapshotters: for benchmarks and end-to-end tests.

Everything lives under one base directory: containerd's root, state, socket and config, and
per snapshotter its root, socket, node cache and log (sockets go to a short temp dir instead
when the base's path is too long for a unix socket). Several cafs snapshotters can serve
one containerd, each under its own plugin name and with its own store (`ctr run
--snapshotter NAME`, `cafs pull --snapshotter NAME`). The CRI plugin is disabled; the
overlayfs snapshotter stays containerd's default, so `ctr images pull` + `ctr run` is the
conventional path beside the cafs one. Other snapshotters (stargz-snapshotter's daemon,
`bench/stargz.py`) join as proxy plugins too (`add_proxy`, or `proxies` of `start_cluster`).

`teardown` (also `with Cluster(...)`) kills tasks, removes containers, stops containerd and
the snapshotters, kills what is left of shims and cafs mount daemons started for this base
(found by the base path in their command line), and unmounts everything below the base,
deepest first. It never raises.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cafs.mounts import mountinfo

CAFS = (sys.executable, "-m", "cafs")
_LOG = logging.getLogger(__name__)
TOOLS = ("containerd", "ctr", "runc")
SOCKET_PATH_MAX = 100  # a unix socket path has room for 107 bytes; containerd adds ".ttrpc"


class ClusterError(RuntimeError):
    """A containerd or snapshotter step failed; the message carries the tail of their logs."""


@dataclass
class SnapshotterProc:
    """One `cafs snapshotter`, registered in containerd as proxy plugin `name`."""

    name: str
    root: Path
    socket: Path
    store_url: str
    cache_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class ProxyProc:
    """A snapshotter other than cafs (stargz-snapshotter's daemon), registered in containerd
    as proxy plugin `name`: `command(root, socket)` starts it serving on `socket`."""

    name: str
    root: Path
    socket: Path
    log: Path
    command: Callable[[Path, Path], list[str]]
    proc: subprocess.Popen[bytes] | None = None


def missing_tools() -> list[str]:
    """What a cluster needs and this machine lacks (executables, /dev/fuse)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    return missing


def wait_for(
    ready: Callable[[], bool],
    what: str,
    proc: subprocess.Popen[Any] | None = None,
    timeout: float = 30,
    log: Path | None = None,
) -> None:
    """Poll `ready` until true; fail early if `proc` exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"{what} exited with {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} not ready after {timeout:.0f}s{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path | None, size: int = 3000) -> str:
    if log is None:
        return ""
    with contextlib.suppress(OSError):
        return f"\n--- {log.name}\n" + log.read_text(errors="replace")[-size:]
    return ""


def _cmdline(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _mountpoints() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of this mount namespace."""
    return [(m.mountpoint, m.fstype) for m in mountinfo.mounts()]


class Cluster:
    def __init__(self, base: Path, env: Mapping[str, str] | None = None) -> None:
        """`env` is added to the environment the snapshotters (and the cafs commands run
        through `cafs`) get, which is read at start, so variables set later still count."""
        self.base = base.resolve()
        self.base.mkdir(parents=True, exist_ok=True)
        self.sock_dir = self.base
        if len(str(self.base / "cafs-snapshotter.sock.ttrpc")) > SOCKET_PATH_MAX:
            self.sock_dir = Path(tempfile.mkdtemp(prefix="cafsc-"))  # removed at teardown
        self.ctd_sock = self.sock_dir / "ctd.sock"
        self.ctd_log = self.base / "containerd.log"
        self.extra_env = dict(env or {})
        self.snapshotters: dict[str, SnapshotterProc] = {}
        self.proxies: dict[str, ProxyProc] = {}
        self.containerd: subprocess.Popen[bytes] | None = None

    # -- set-up ------------------------------------------------------------------------------

    def add_snapshotter(
        self, store_url: str, name: str = "cafs", cache_dir: Path | None = None
    ) -> SnapshotterProc:
        """Declare a cafs snapshotter (before `start_containerd`: the plugin list is config)."""
        self._check_new(name)
        root = self.base / f"sn-{name}"
        sn = SnapshotterProc(
            name=name,
            root=root,
            socket=self.sock_dir / f"{name}.sock",
            store_url=store_url,
            cache_dir=cache_dir or self.base / f"cache-{name}",
            log=self.base / f"snapshotter-{name}.log",
        )
        sn.cache_dir.mkdir(parents=True, exist_ok=True)
        self.snapshotters[name] = sn
        return sn

    def add_proxy(self, name: str, command: Callable[[Path, Path], list[str]]) -> ProxyProc:
        """Declare another snapshotter, started by `command(root, socket)` (before
        `start_containerd`)."""
        self._check_new(name)
        proxy = ProxyProc(
            name=name,
            root=self.base / f"sn-{name}",
            socket=self.sock_dir / f"{name}.sock",
            log=self.base / f"snapshotter-{name}.log",
            command=command,
        )
        self.proxies[name] = proxy
        return proxy

    def _check_new(self, name: str) -> None:
        if name in self.snapshotters or name in self.proxies:
            raise ValueError(f"snapshotter {name!r} already added")
        if self.containerd is not None:
            raise ClusterError("add snapshotters before containerd starts")

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    def start(self) -> None:
        """Snapshotters first: containerd backs off from a proxy socket that is not there."""
        for name in self.snapshotters:
            self.start_snapshotter(name)
        for name in self.proxies:
            self.start_proxy(name)
        self.start_containerd()

    def start_snapshotter(self, name: str = "cafs") -> None:
        sn = self.snapshotters[name]
        args = ["snapshotter", "--root", str(sn.root), "--address", str(sn.socket)]
        args += ["--store", sn.store_url, "--cache-dir", str(sn.cache_dir)]
        with open(sn.log, "ab") as log:
            sn.proc = subprocess.Popen(
                [*CAFS, *args],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env(),
            )
        wait_for(sn.socket.exists, f"snapshotter {name}", sn.proc, log=sn.log)

    def stop_snapshotter(self, name: str = "cafs", sig: int = signal.SIGTERM) -> int:
        sn = self.snapshotters[name]
        if sn.proc is None:
            raise ClusterError(f"snapshotter {name} is not running")
        sn.proc.send_signal(sig)
        code = sn.proc.wait(timeout=30)
        sn.proc = None
        return code

    def start_proxy(self, name: str) -> None:
        proxy = self.proxies[name]
        proxy.root.mkdir(parents=True, exist_ok=True)
        with open(proxy.log, "ab") as log:
            proxy.proc = subprocess.Popen(
                proxy.command(proxy.root, proxy.socket),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self.env(),
            )
        wait_for(proxy.socket.exists, f"snapshotter {name}", proxy.proc, log=proxy.log)

    def restart_proxy(self, name: str) -> None:
        """Stop a proxy snapshotter, remove its root (state and caches: it starts cold),
        start it again and wait until containerd reaches it (no snapshot may be left)."""
        proxy = self.proxies[name]
        if proxy.proc is not None:
            stop(proxy.proc, [])
            proxy.proc = None
        unmount_below(proxy.root, [])
        shutil.rmtree(proxy.root)
        self.start_proxy(name)
        if self.containerd is not None:
            wait_for(
                functools.partial(self._answers, name),
                f"containerd's connection to snapshotter {name}",
                self.containerd,
                timeout=15,
            )

    def config_text(self) -> str:
        lines = [
            "version = 2",
            f'root = "{self.base}/ctd-root"',
            f'state = "{self.base}/ctd-state"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
            "[grpc]",
            f'  address = "{self.ctd_sock}"',
        ]
        for name, socket in self._plugin_sockets().items():
            lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{socket}"']
        return "\n".join(lines) + "\n"

    def start_containerd(self) -> None:
        config = self.base / "containerd.toml"
        config.write_text(self.config_text())
        with open(self.ctd_log, "ab") as log:
            self.containerd = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        wait_for(
            lambda: self.ctd_sock.exists() and self.ctr("version", check=False).returncode == 0,
            "containerd",
            self.containerd,
            log=self.ctd_log,
        )
        for name in self._plugin_sockets():  # containerd dials proxies lazily: connect now
            wait_for(
                functools.partial(self._answers, name),
                f"containerd's connection to snapshotter {name}",
                self.containerd,
                timeout=15,
            )

    def _plugin_sockets(self) -> dict[str, Path]:
        return {
            **{sn.name: sn.socket for sn in self.snapshotters.values()},
            **{p.name: p.socket for p in self.proxies.values()},
        }

    def _answers(self, snapshotter: str) -> bool:
        ls = self.ctr("snapshots", "--snapshotter", snapshotter, "ls", check=False)
        return ls.returncode == 0

    # -- use -------------------------------------------------------------------------------

    def ctr_command(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.ctd_sock), *args]

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.ctr_command(*args)
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)}: {res.stderr.strip()}{self.logs()}")
        return res

    def push(self, ref: str, attempts: int = 3) -> None:
        """`ctr images push --plain-http` of `ref`, tried up to `attempts` times: set-up, not
        measured. containerd 1.6's push fails now and then with `failed to copy: rpc error:
        code = Internal desc = unexpected EOF` (its content stream cut short; nerdctl's CI
        marks the same failure flaky), and a push starts over cleanly, so one failure must
        not fail a run. Each failure is logged; the last raises with every attempt's error."""
        errors: list[str] = []
        for attempt in range(1, attempts + 1):
            res = self.ctr("images", "push", "--plain-http", ref, check=False, timeout=600)
            if res.returncode == 0:
                return
            errors.append(f"attempt {attempt}: {res.stderr.strip()[-1000:]}")
            _LOG.warning("ctr images push %s failed (%s)", ref, errors[-1])
        raise ClusterError(f"ctr images push {ref} failed {attempts} times: "
                           + "; ".join(errors) + self.logs())

    def cafs_command(self, *args: str) -> list[str]:
        return [*CAFS, *args]

    def pull_command(
        self, ref: str, snapshotter: str = "cafs", name: str | None = None
    ) -> list[str]:
        """`cafs pull` of an indexed image into this containerd through `snapshotter`."""
        sn = self.snapshotters[snapshotter]
        cmd = ["pull", ref, "--address", str(self.ctd_sock), "--store", sn.store_url,
               "--snapshotter-address", str(sn.socket)]
        cmd += ["--snapshotter", snapshotter] + (["--name", name] if name else [])
        return self.cafs_command(*cmd)

    def chain_id(self, ref: str) -> str:
        """The top snapshot's name of an image in this containerd (the chain ID of its
        layers' diff IDs), found from its manifest and config in the content store."""
        listing = self.ctr("images", "ls").stdout.splitlines()[1:]
        digests = [line.split()[2] for line in listing if line.split()[0] == ref]
        if not digests:
            raise ClusterError(f"image {ref} is not in containerd")
        manifest = json.loads(self.ctr("content", "get", digests[0]).stdout)
        if "config" not in manifest:
            raise ClusterError(f"image {ref}: not a single-platform manifest")
        config = json.loads(self.ctr("content", "get", manifest["config"]["digest"]).stdout)
        chain = ""
        for diff_id in config["rootfs"]["diff_ids"]:
            link = f"{chain} {diff_id}".encode()
            chain = "sha256:" + hashlib.sha256(link).hexdigest() if chain else diff_id
        return chain

    @contextlib.contextmanager
    def image_view(self, snapshotter: str, ref: str, target: Path) -> Iterator[Path]:
        """The image's root filesystem as `snapshotter` serves it, mounted read-only at
        `target` (a View snapshot of its top layer) while the context lasts."""
        key = f"bench-view-{target}"
        view = ("snapshots", "--snapshotter", snapshotter, "view", "--mounts")
        mounts = json.loads(self.ctr(*view, key, self.chain_id(ref)).stdout)
        mounted = 0
        try:
            for m in mounts:
                kind, options = m.get("Type", m.get("type")), m.get("Options", m.get("options"))
                cmd = ["mount"] + ([] if kind == "bind" else ["-t", kind])
                cmd += ["-o", ",".join(options or ["ro"]), m.get("Source", m.get("source"))]
                subprocess.run([*cmd, str(target)], check=True, capture_output=True)
                mounted += 1
            yield target
        finally:
            for _ in range(mounted):
                subprocess.run(["umount", str(target)], capture_output=True)
            self.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, check=False)

    def logs(self) -> str:
        return "".join(_tail(log) for log in self._logs())

    def _logs(self) -> list[Path]:
        sn_logs = [sn.log for sn in self.snapshotters.values()]
        return [*sn_logs, *(p.log for p in self.proxies.values()), self.ctd_log]

    def daemons(self, snapshotter: str | None = None) -> list[int]:
        """Pids of cafs FUSE daemons serving mounts under a snapshotter's root (or any)."""
        roots = [
            os.fsencode(sn.root)
            for sn in self.snapshotters.values()
            if snapshotter is None or sn.name == snapshotter
        ]
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                cmdline = b" ".join(_cmdline(entry))  # argv, or a mount server's title
                if b"cafs.daemon" in cmdline and any(r in cmdline for r in roots):
                    pids.append(int(entry))
        return pids

    def mounts(self) -> list[str]:
        """Mountpoints below the base."""
        prefix = str(self.base) + "/"
        return [p for p, _ in _mountpoints() if p.startswith(prefix)]

    def remote_mounts(self, snapshotter: str = "cafs") -> list[Path]:
        """The cafs FUSE mountpoints of a snapshotter's remote snapshots."""
        prefix = str(self.snapshotters[snapshotter].root) + "/"
        return [Path(p) for p in mountinfo.cafs_mountpoints() if p.startswith(prefix)]

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q", check=False).stdout.split()

    def forget_images(self, timeout: float = 30) -> list[str]:
        """Make the node forget every image: `ctr images rm --sync`, then whatever content
        and snapshots the GC left (listed and removed), then wait for the cafs daemons to
        exit. Returns what had to be removed by hand (for the log)."""
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "KILL", task, check=False)
            time.sleep(0.1)
            self.ctr("tasks", "rm", "-f", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", container, check=False)
        images = self.images()
        if images:
            self.ctr("images", "rm", "--sync", *images)
        leftovers = []
        content = self.ctr("content", "ls", "-q", check=False).stdout.split()
        if content:
            leftovers += [f"content {d}" for d in content]
            self.ctr("content", "rm", *content, check=False)
        for name in ["overlayfs", *self._plugin_sockets()]:
            for _ in range(8):  # leaf first: what has children is refused, retried next round
                keys = self._snapshot_keys(name)
                if not keys:
                    break
                leftovers += [f"snapshot {name}/{k}" for k in keys]
                for key in keys:
                    self.ctr("snapshots", "--snapshotter", name, "rm", key, check=False)
        wait_for(lambda: not self.daemons(), "cafs mount daemons to exit", timeout=timeout)
        return leftovers

    def _snapshot_keys(self, snapshotter: str) -> list[str]:
        out = self.ctr("snapshots", "--snapshotter", snapshotter, "ls", check=False).stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

    def empty_caches(self) -> None:
        """Empty every snapshotter's node cache (no daemon may be running)."""
        if self.daemons():
            raise ClusterError("cafs mount daemons still running: cannot empty their cache")
        for sn in self.snapshotters.values():
            shutil.rmtree(sn.cache_dir, ignore_errors=True)
            sn.cache_dir.mkdir(parents=True)

    # -- tear-down -------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop and remove everything this cluster started; returns what needed force."""
        forced: list[str] = []
        if self.containerd is not None and self.containerd.poll() is None:
            with contextlib.suppress(Exception):
                for task in self.ctr("tasks", "ls", "-q", check=False, timeout=15).stdout.split():
                    self.ctr("tasks", "kill", "-s", "KILL", task, check=False, timeout=15)
                    time.sleep(0.2)
                    self.ctr("tasks", "rm", "-f", task, check=False, timeout=15)
                for c in self.ctr("containers", "ls", "-q", check=False, timeout=15).stdout.split():
                    self.ctr("containers", "rm", c, check=False, timeout=15)
        procs = [self.containerd, *(sn.proc for sn in self.snapshotters.values())]
        for proc in [*procs, *(p.proc for p in self.proxies.values())]:
            if proc is not None:
                stop(proc, forced)
        self.containerd = None
        for sn in self.snapshotters.values():
            sn.proc = None
        for proxy in self.proxies.values():
            proxy.proc = None
        unmount_below(self.base, forced)  # daemons exit on umount
        with contextlib.suppress(ClusterError):
            wait_for(lambda: not self._strays(), "processes to exit", timeout=5)
        for pid in self._strays():
            forced.append(f"killed stray process {pid}: {b' '.join(_cmdline(str(pid)))[:120]!r}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in sorted(self.mounts(), key=len, reverse=True):  # a killed daemon's
            subprocess.run(["umount", "-l", point], capture_output=True)
        if self.sock_dir != self.base:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        return forced

    def _strays(self) -> list[int]:
        """Processes (not ours) still naming the base or the sockets: shims, mount daemons."""
        needles = {os.fsencode(self.base), os.fsencode(self.sock_dir)}
        pids = []
        for entry in os.listdir("/proc"):
            mine = not entry.isdigit() or int(entry) == os.getpid()
            if not mine and any(n in a for a in _cmdline(entry) for n in needles):
                pids.append(int(entry))
        return pids

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()


def stop(proc: subprocess.Popen[Any], forced: list[str]) -> None:
    """SIGTERM, then SIGKILL after 15 s (noted in `forced`)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        forced.append(f"killed {proc.args!r} (pid {proc.pid})")
        proc.kill()
        proc.wait()


def unmount_below(root: Path, forced: list[str]) -> None:
    """Unmount everything below `root`, deepest first; lazily where busy (noted)."""
    prefix = str(root) + "/"
    points = [p for p, _ in _mountpoints() if p.startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            forced.append(f"lazy unmount of {point}")
            subprocess.run(["umount", "-l", point], capture_output=True)


def start_cluster(
    base: Path,
    stores: Sequence[tuple[str, str]],
    env: Mapping[str, str] | None = None,
    proxies: Mapping[str, Callable[[Path, Path], list[str]]] | None = None,
) -> Cluster:
    """A started cluster with one cafs snapshotter per (name, store URL), and other
    snapshotters started by `proxies[name](root, socket)`; torn down on failure."""
    cluster = Cluster(base, env)
    try:
        for name, url in stores:
            cluster.add_snapshotter(url, name)
        for name, command in (proxies or {}).items():
            cluster.add_proxy(name, command)
        cluster.start()
    except BaseException:
        cluster.teardown()
        raise
    return cluster
