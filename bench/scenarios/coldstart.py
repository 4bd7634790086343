"""Container cold start: from "image not on the node" to the container's first line of output.

The image is a Debian rootfs made of the host's packages (`host_rootfs_layers`): python3
and python3-numpy (#20's workload), or with `--quick` python3 alone (~60 MB); plus layers of
incompressible files the command never reads (512 MiB in two layers; `--quick` 64 MiB in one),
pushed to a local `docker-registry` and indexed by cafs into S3 (SeaweedFS, or moto, over
HTTP), so both sides fetch over HTTP on loopback (or both through `--link RATE:DELAY`).
Indexing is set-up, not part of the cold start. The command is
`python3 -c 'import numpy; print("ready")'` (`--quick`: `import json`); the time is taken
when its first line reaches us, read line by line from the client's stdout.

Each repeat measures, side by side, from a cold node:

- `ctr images pull --plain-http REF` + `ctr run --rm REF` on containerd's overlayfs
  snapshotter (the baseline: download every layer, unpack, run);
- `cafs pull REF` + `ctr run --rm --snapshotter cafs REF` (lazy: only what is read is
  fetched);
- `cafs run --rm REF -- CMD` (the same lazy mount under runc, without containerd);
- `cafs run` twice more, yardsticks of the design: without the neighbour pack and the
  import table (blob by blob on a miss: what cafs did before them), and without the import
  table (a module's miss fetches its directory around it);
- if `cafs profile` exists: `cafs pull` + `ctr run` again, and (not with `--quick`)
  `cafs run`, with a startup profile in the store, recorded once with `cafs profile REF --
  CMD` and replayed by the mount. The profile is put in the store only for these contenders
  and removed again, so the others run without one;
- stargz-snapshotter, the lazy-pulling peer (`bench/stargz.py` builds its daemon, which
  serves this containerd as proxy plugin `stargz`): `ctr-remote images rpull` + `ctr run
  --snapshotter stargz` of the image converted once with `ctr-remote images convert
  --estargz --oci` and pushed to the same registry, and of the image `ctr-remote images
  optimize` made with the same command (its prefetch landmark, the counterpart of a cafs
  profile). Where its packages are missing the results say "stargz: not available (why)".

Before each contender the node forgets everything: images removed (`ctr images rm --sync`,
leftover content and snapshots removed by hand), node caches emptied, page cache dropped
(`echo 3 > /proc/sys/vm/drop_caches`, machine-wide). The servers are not the node: the
registry's files, and SeaweedFS's (moto keeps its objects in memory), are read back into the
page cache after the drop, so both sides fetch from a warm server.

After each containerd contender of the first repeat, its root filesystem (`ctr images mount`)
is compared with overlayfs's (`bench/trees.py`): contents, modes, owners, links, xattrs and
mtimes must match, except what stargz is known to change (mtimes rounded down to whole
seconds, symlink mode bits), which is counted.

Kept beside each cold start: the pull and run steps; the requests the registry served and
the bytes it sent (from its access log) for containerd and stargz, the store requests for
cafs; for cafs when its FUSE mount was ready
(from the mount's log) and what it fetched (its statistics); without `--quick`, a second,
warm start of the same image, the floor under each cold start (the page cache dropped again
with every byte still on the node's disk: overlayfs's `ctr run` of the unpacked image, and
`cafs pull` + `ctr run` of the forgotten image from a full node cache, which must fetch
nothing, or the results say so) and the cold start-up time of each client (`ctr --help`,
`python -m cafs --help`).
Bytes downloaded are what the server sent: containerd, the gzip layers; stargz, its
manifests and ranged reads of the eStargz layers (registry log); cafs, by SeaweedFS's own
count of the bucket's traffic, everything `cafs pull` and the mount fetched (the image's
records, index and EROFS image; blobs and pack ranges as stored, zstd envelopes where
compression paid); from moto, which keeps no count, the mount's fetches only.
The mount's own figure (`mount_bytes`) and the decoded bytes (`decoded_bytes`) are kept
beside them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import stargz
from bench.cluster import TOOLS, Cluster, start_cluster
from bench.context import Context
from bench.core import ScenarioResult, register
from bench.hostimage import PYTHON_PACKAGES, host_rootfs_layers, installed_packages, python_config
from bench.imagebuild import Entry, ImageInfo, build_layout
from bench.netshape import delay_proxy
from bench.registrypush import push_layout
from bench.services import REGISTRY_BIN, free_port, serving, start_registry
from bench.trees import Tree, compare, snapshot
from bench.workspace import query
from blobstore import open_store
from cafs import paths
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

# runc keeps container state in one place per namespace for every containerd on the node
# (/run/containerd/runc), so IDs must not collide with another run's.
RUN_ID = secrets.token_hex(3)

EXPECTED = "ready"


@dataclass(frozen=True)
class Workload:
    """What the container runs to its first line, and the host packages its image holds."""

    command: tuple[str, ...]
    packages: tuple[str, ...]


# #20's workload: a Debian image with python3-numpy; `--quick` (CI) the stdlib's json.
NUMPY = Workload(("python3", "-c", 'import numpy; print("ready")'),
                 (*PYTHON_PACKAGES, "python3-numpy"))
JSON = Workload(("python3", "-c", 'import json; print("ready")'), PYTHON_PACKAGES)


def workload(quick: bool) -> Workload:
    """numpy's where python3-numpy is installed on the host (`make deps` installs it), the
    stdlib's json with `--quick`; a full run without numpy says what is missing."""
    if quick:
        return JSON
    if "python3-numpy" not in installed_packages():
        raise RuntimeError("coldstart needs the Debian package python3-numpy on this host "
                           "for its image (make deps installs it), or --quick")
    return NUMPY
REPO = "bench/coldstart"
FILLER_FULL = (512 << 20, 2)  # bytes of files never read, in this many layers
FILLER_QUICK = (64 << 20, 1)
FILE_SIZES = (256 << 10, 2 << 20, 12 << 20)  # cycled through when filling a layer
CAFS = (sys.executable, "-m", "cafs")
TIMEOUT = 600.0

COLD = "cold start: image not on the node → first line"
PULL = "step 1: pull"
RUN = "step 2: run → first line"
READY = "run → lazy mount ready"
AFTER = "lazy mount ready → first line"
WARM = "warm start: image on the node → first line"
DISK = "floor: every byte on the node's disk, page cache dropped → first line"
CLI = "client start, page cache dropped (--help)"
BYTES = "bytes downloaded"
REQUESTS = "requests to the server"

OVERLAY = "ctr pull + ctr run (overlayfs)"
LAZY = "cafs pull + ctr run (cafs snapshotter)"
LAZY_P = "cafs pull + ctr run, profile replayed"
RUNC = "cafs run (runc)"
RUNC_P = "cafs run, profile replayed"
RUNC_NN = "cafs run, no neighbour packs"  # blob by blob on a miss: what cafs did before them
RUNC_NI = "cafs run, no import table"  # a module's miss fetches its directory around it
CTR_PULL = "ctr images pull (fetch + unpack)"
CAFS_PULL = "cafs pull"
CAFS_PULL_P = "cafs pull (profile stored)"
CTR_RUN = "ctr run, overlayfs"
CTR_RUN_CAFS = "ctr run, cafs"
CTR_RUN_P = "ctr run, cafs, profile replayed"
CTR_HELP = "ctr --help"
WARM_OVERLAY = "ctr run (overlayfs), image unpacked"
WARM_LAZY = "ctr run (cafs), its mount still up"
WARM_RUNC = "cafs run, node cache full"
DISK_OVERLAY = "ctr run (overlayfs), image unpacked"
DISK_LAZY = "cafs pull + ctr run, node cache full"
CAFS_HELP = "python -m cafs --help"
STARGZ = "ctr-remote rpull + ctr run (stargz)"
STARGZ_P = "ctr-remote rpull + ctr run, stargz optimized"
RPULL = "ctr-remote images rpull"
RPULL_P = "ctr-remote images rpull (optimized image)"
CTR_RUN_STARGZ = "ctr run, stargz"
CTR_RUN_STARGZ_P = "ctr run, stargz optimized"
ESGZ_TAG = "esgz"
OPT_TAG = "esgz-opt"


# --- the image --------------------------------------------------------------------------------


def filler_layers(total: int, count: int) -> list[list[Entry]]:
    """`count` layers of incompressible files, `total` bytes in all, that nothing reads."""
    layers = []
    per_layer = total // count
    for n in range(count):
        entries = [Entry("opt", "dir"), Entry("opt/unused", "dir"), Entry(f"opt/unused/{n}", "dir")]
        left, i = per_layer, 0
        while left > 0:
            size = min(left, FILE_SIZES[i % len(FILE_SIZES)])
            path = f"opt/unused/{n}/blob-{i:04d}.bin"
            entries.append(Entry.random(path, size, seed=f"coldstart-{n}-{i}"))
            left -= size
            i += 1
        layers.append(entries)
    return layers


def build_image(ctx: Context, layout: Path, work: Workload) -> ImageInfo:
    total, count = FILLER_QUICK if ctx.opts.quick else FILLER_FULL
    layers = host_rootfs_layers(work.packages) + filler_layers(total, count)
    return build_layout(layout, "coldstart", layers, config=python_config())


# --- the registry, on loopback or behind the shaped link ---------------------------------------


@dataclass(frozen=True)
class Served:
    host: str  # "127.0.0.1:PORT", what ctr pulls from
    storage: Path  # the registry's files
    log: Path  # its access log: a line per request, with the bytes sent


@contextlib.contextmanager
def registry_with(ctx: Context, workdir: Path, info: ImageInfo) -> Iterator[Served]:
    """A registry holding the image. With a shaped link the push goes to a loopback instance
    first (the push is set-up, not measured), then the same storage is served from inside
    the link's namespace through a delaying proxy, as the S3 server is."""
    push_dir = workdir / "push"
    push_dir.mkdir()
    with start_registry(push_dir) as reg:
        push_layout(info.layout_dir, info.tag, reg.host, REPO, "latest")
        if ctx.netns is None:
            yield Served(reg.host, push_dir / "storage", push_dir / "registry.log")
            return
    ns = ctx.netns
    inner = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(push_dir / "storage")}},
        "http": {"addr": f"{ns.ns_ip}:{inner}", "secret": "cafs-bench"},
    }
    (workdir / "shaped.yml").write_text(json.dumps(config) + "\n")
    cmd = [*ns.wrap, REGISTRY_BIN, "serve", str(workdir / "shaped.yml")]
    with serving(cmd, f"http://{ns.ns_ip}:{inner}/v2/", workdir / "shaped.log"):
        port = free_port()
        with delay_proxy(port, ns.ns_ip, inner, ns.link.delay_ms):
            yield Served(f"127.0.0.1:{port}", push_dir / "storage", workdir / "shaped.log")


# --- the store and its startup profile --------------------------------------------------------


def index_into(image: ImageInfo, url: str, ref: str) -> None:
    source = open_source(f"oci:{image.layout_dir}:{image.tag}")
    index_image(source, open_store(url), IndexOptions(name=ref))


def has_profile_command() -> bool:
    out = subprocess.run([*CAFS, "--help"], capture_output=True, text=True).stdout
    return re.search(r"^\s+profile\s", out, re.M) is not None


class StoredProfile:
    """The image's startup profile, recorded once with `cafs profile`, then made visible in
    the store only while a profiled contender runs (mounts replay the profile they find)."""

    def __init__(self, ctx: Context, url: str, ref: str, command: tuple[str, ...]) -> None:
        self.store = open_store(url)
        before = set(self.store.list("profiles/"))
        cache = ctx.ws.dir("coldstart-profile-cache")
        cmd = [*CAFS, "profile", "--json", "--store", url, "--cache-dir", str(cache), ref]
        out = checked([*cmd, "--", *command])
        shutil.rmtree(cache)
        self.summary: dict[str, Any] = json.loads(out[out.index("{") :])
        keys = set(self.store.list("profiles/")) - before
        if not keys:
            raise RuntimeError("cafs profile stored no profile")
        self.saved = {key: self.store.get(key) for key in keys}

    def show(self) -> None:
        for key, data in self.saved.items():
            self.store.put(key, data)

    def hide(self) -> None:
        for key in self.saved:
            self.store.delete(key)


def delete_prefix(url: str) -> None:
    """Free the S3 server's memory of a store once the scenario is done with it."""
    with contextlib.suppress(Exception):
        store = open_store(url)
        for key in list(store.list("")):
            store.delete(key)


# --- the peer: stargz-snapshotter --------------------------------------------------------------


@dataclass(frozen=True)
class StargzImages:
    """The image as eStargz in the registry, and optimized for the command (None where
    `ctr-remote images optimize` does not work here; `why_not` says why)."""

    plain: str
    optimized: str | None
    why_not: str | None = None


def stargz_daemon() -> tuple[Path | None, str | None]:
    """The peer's daemon binary, or why it is not available (a package missing). A build
    that fails with the packages installed raises: that is a bug, not a missing peer."""
    try:
        return stargz.build(), None
    except stargz.StargzUnavailable as exc:
        return None, str(exc)


def convert_for_stargz(cluster: Cluster, ref: str, quick: bool,
                       command: tuple[str, ...]) -> StargzImages:
    """`ctr-remote images convert --estargz --oci` and `optimize` of the pulled image,
    pushed beside it (set-up, not measured). `quick` compresses at gzip level 1, not
    ctr-remote's default 9: five times faster on the filler, a few % more bytes."""
    base = ref.rsplit(":", 1)[0]
    plain, optimized = f"{base}:{ESGZ_TAG}", f"{base}:{OPT_TAG}"
    remote = ("ctr-remote", "--address", str(cluster.ctd_sock), "images")
    checked(cluster.ctr_command("images", "pull", "--plain-http", ref))
    level = ["--estargz-compression-level", "1"] if quick else []
    checked([*remote, "convert", "--estargz", "--oci", *level, ref, plain])
    cluster.push(plain)
    entrypoint, args = json.dumps(list(command[:2])), json.dumps(list(command[2:]))
    try:
        optimize = ["optimize", "--oci", *level, "--entrypoint", entrypoint, "--args", args]
        checked([*remote, *optimize, ref, optimized])
    except RuntimeError as exc:
        return StargzImages(plain, None, f"ctr-remote images optimize failed: {exc}")
    cluster.push(optimized)
    return StargzImages(plain, optimized)


_ACCESS = re.compile(rb'"(?:GET|HEAD) \S+ HTTP/[\d.]+" \d{3} (\d+|-)')


def registry_traffic(log: Path, since: int) -> tuple[int, int]:
    """(requests, bytes sent) in a registry's access log after byte offset `since`."""
    with open(log, "rb") as f:
        f.seek(since)
        found = _ACCESS.findall(f.read())
    return len(found), sum(int(n) for n in found if n != b"-")


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Started:
    """A client process: when it started and printed its first line (perf_counter and wall
    clock), its first line, its stderr."""

    began: float
    began_wall: float
    began_boot: float  # CLOCK_BOOTTIME, the clock of /proc/PID/stat start times
    first_line: float
    exited: float
    line: str
    stderr: str

    @property
    def to_first_line(self) -> float:
        return self.first_line - self.began


def first_line(
    cmd: Sequence[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None
) -> Started:
    """Run `cmd` (with `env` added to the environment), timestamp the first line on its
    stdout, wait for it to exit (status 0)."""
    with tempfile.TemporaryFile() as err:
        began_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        began_wall, began = time.time(), time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env} if env else None,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf, first_at = b"", 0.0
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{' '.join(cmd)}: no exit after {timeout:.0f}s")
                    if not sel.select(left):
                        continue
                    data = os.read(proc.stdout.fileno(), 65536)
                    if not data:
                        break
                    buf += data
                    if not first_at and b"\n" in buf:
                        first_at = time.perf_counter()
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            exited = time.perf_counter()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}: {stderr.strip()[-2000:]}")
    if not first_at:
        raise RuntimeError(f"{' '.join(cmd)} printed no line: {stderr.strip()[-2000:]}")
    line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
    if line != EXPECTED:
        raise RuntimeError(f"{' '.join(cmd)} printed {line!r}, not {EXPECTED!r}")
    return Started(began, began_wall, began_boot, first_at, exited, line, stderr)


def checked(cmd: Sequence[str], timeout: float = TIMEOUT) -> str:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def timed(cmd: Sequence[str]) -> float:
    started = time.perf_counter()
    checked(cmd)
    return time.perf_counter() - started


def read_all(root: Path) -> None:
    """Read every file below `root` (into the page cache)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


_MOUNTED = re.compile(r'^ts=(\S+) .*msg="mounted \S+ .* in (\d+) ms\b', re.M)
_RUN_STATS = re.compile(r"^(fetched on demand|prefetched):\s+([\d.]+) MiB \((\d+) blobs\)", re.M)
_RUN_GETS = re.compile(
    r"^store requests:\s+(\d+) \((\d+) neighbour pack segments, ([\d.]+) MiB"
    r"(?:; \d+ library blobs(?:, \d+ imported files)? ahead)?\), ([\d.]+) MiB as stored",
    re.M,
)


def mounted_at(log: Path) -> tuple[float, float]:
    """(wall-clock time, ready_ms) of the last "mounted" line of a mount daemon's log."""
    found = _MOUNTED.findall(log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"{log}: no 'mounted' line")
    ts, ready_ms = found[-1]
    when = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.UTC).timestamp(), float(ready_ms)


def process_started(pid: int) -> float:
    """When a live process started, on CLOCK_BOOTTIME (clock-tick resolution, 10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def parse_run_stats(stderr: str) -> dict[str, Any]:
    """The fetch figures `cafs run --stats` prints (MiB with one decimal)."""
    found = {m[1]: (float(m[2]), int(m[3])) for m in _RUN_STATS.finditer(stderr)}
    if "fetched on demand" not in found:
        raise RuntimeError(f"cafs run --stats printed no statistics: {stderr[-2000:]}")
    demand, prefetch = found["fetched on demand"], found.get("prefetched", (0.0, 0))
    gets = _RUN_GETS.search(stderr)
    if gets is None:  # not silently the decoded bytes in place of the wire's
        raise RuntimeError(f"cafs run --stats printed no store requests: {stderr[-2000:]}")
    return {
        "demand_bytes": round(demand[0] * (1 << 20)),
        "demand_blobs": demand[1],
        "prefetch_bytes": round(prefetch[0] * (1 << 20)),
        "prefetch_blobs": prefetch[1],
        "store_gets": int(gets[1]),
        "neighbour_gets": int(gets[2]),
        "neighbour_bytes": round(float(gets[3]) * (1 << 20)),
        "store_bytes": round(float(gets[4]) * (1 << 20)),
    }


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --- the contenders ---------------------------------------------------------------------------


class Coldstart:
    def __init__(
        self,
        ctx: Context,
        res: ScenarioResult,
        cluster: Cluster,
        ref: str,
        image: ImageInfo,
        registry: Served,
        profile: StoredProfile | None,
        peer: StargzImages | None,
        command: tuple[str, ...],
    ) -> None:
        self.ctx, self.res, self.cluster, self.ref = ctx, res, cluster, ref
        self.command = command
        self.image, self.registry, self.profile = image, registry, profile
        self.peer = peer
        self.peer_ran = False  # the last contender was stargz: its daemon is not idle
        self.reference: Tree | None = None  # overlayfs's tree, what the others must match
        self.sn = cluster.snapshotters[SN]
        self.s3 = ctx.s3()
        self.run_cache = ctx.ws.dir("coldstart-run-cache")
        self.full = not ctx.opts.quick

    def repeat(self, i: int) -> None:
        steps = [
            (OVERLAY, self.overlay),
            (LAZY, self.lazy),
            (RUNC, self.cafs_run),
            (RUNC_NN, self.cafs_run_blob_by_blob),
            (RUNC_NI, self.cafs_run_no_imports),
        ]
        if self.profile is not None:
            steps.append((LAZY_P, self.lazy_profiled))
            if self.full:
                steps.append((RUNC_P, self.cafs_run_profiled))
        if self.peer is not None:
            steps.append((STARGZ, self.stargz))
            if self.peer.optimized is not None:
                steps.append((STARGZ_P, self.stargz_optimized))
        for what, fn in steps:
            self.ctx.step(f"{what} {i + 1}/{self.ctx.repeat}")
            peer_step = what in (STARGZ, STARGZ_P)
            self.cold(restart_peer=peer_step or self.peer_ran)
            self.peer_ran = peer_step
            fn(i)
        if self.full:
            self.ctx.step(f"client start {i + 1}/{self.ctx.repeat}")
            self.client_start()
        self.cluster.forget_images()

    def cold(self, restart_peer: bool = False) -> None:
        """The node forgets the image; the servers stay warm. `restart_peer` (before and
        after stargz's contenders): its daemon starts afresh with an empty root, for it keeps
        resolved layers in memory for minutes and goes on fetching them in the background,
        which would count in the next contender's figures."""
        leftovers = self.cluster.forget_images()
        if leftovers:
            self.ctx.log(f"coldstart: removed by hand after images rm --sync: {leftovers}")
        self.cluster.empty_caches()
        if restart_peer:
            self.cluster.restart_proxy(stargz.PLUGIN)
        shutil.rmtree(self.run_cache)
        self.run_cache.mkdir()
        drop_page_cache()
        read_all(self.registry.storage)
        if self.s3.storage is not None:
            read_all(self.s3.storage)

    def add(
        self, group: str, contender: str, value: float, unit: str = "s", **details: Any
    ) -> None:
        baseline = contender in (OVERLAY, CTR_PULL, CTR_RUN, CTR_HELP, WARM_OVERLAY)
        self.res.add(group, contender, value, unit, "lower", baseline, **details)

    def add_start(self, names: tuple[str, str, str], started: float, pulled: float,
                  run: Started, **details: Any) -> None:
        """A contender's cold start (pull to first line), its pull and its run, under the
        names (cold, pull, run) its table rows use."""
        cold, pull, run_name = names
        self.add(COLD, cold, run.first_line - started, pull_s=pulled - started,
                 run_s=run.to_first_line, exit_s=run.exited - started, **details)
        self.add(PULL, pull, pulled - started)
        self.add(RUN, run_name, run.to_first_line)

    def overlay(self, i: int) -> None:
        c = self.cluster
        log_at = self.registry.log.stat().st_size
        started = time.perf_counter()
        checked(c.ctr_command("images", "pull", "--plain-http", self.ref))
        pulled = time.perf_counter()
        name = f"cs-overlay-{RUN_ID}-{i}"
        run = first_line(c.ctr_command("run", "--rm", self.ref, name, *self.command))
        self._registry_figures(OVERLAY, log_at)
        if i == 0:
            self.reference = self.tree("overlayfs", self.ref)
            self.res.params.setdefault("trees", {})[OVERLAY] = (
                f"reference: {len(self.reference.entries)} entries, "
                f"{self.reference.file_bytes} bytes in files"
            )
        layers = sum(self.image.layer_sizes)
        self.add_start((OVERLAY, CTR_PULL, CTR_RUN), started, pulled, run)
        self.add(
            BYTES,
            OVERLAY,
            layers / 1e6,
            "MB",
            bytes=layers,
            layer_sizes=list(self.image.layer_sizes),
        )
        if self.full:
            name = f"cs-overlay-{RUN_ID}-w{i}"
            warm = first_line(c.ctr_command("run", "--rm", self.ref, name, *self.command))
            self.add(WARM, WARM_OVERLAY, warm.to_first_line)
            drop_page_cache()
            disk = first_line(c.ctr_command("run", "--rm", self.ref, f"{name}d", *self.command))
            self.add(DISK, DISK_OVERLAY, disk.to_first_line)

    def lazy(self, i: int) -> None:
        self._lazy(i, LAZY, CAFS_PULL, CTR_RUN_CAFS, "lazy")

    def lazy_profiled(self, i: int) -> None:
        assert self.profile is not None
        self.profile.show()
        try:
            self._lazy(i, LAZY_P, CAFS_PULL_P, CTR_RUN_P, "profiled")
        finally:
            self.profile.hide()

    def _lazy(self, i: int, name: str, pull: str, run_name: str, tag: str) -> None:
        c = self.cluster
        sent_before = self.s3.sent_bytes()
        started = time.perf_counter()
        checked(c.pull_command(self.ref, SN))
        pulled = time.perf_counter()
        args = ("run", "--rm", "--snapshotter", SN, self.ref)
        run = first_line(c.ctr_command(*args, f"cs-{tag}-{RUN_ID}-{i}", *self.command))
        stats, ready_at, daemon_at = self._mount_stats()
        self.add_start((name, pull, run_name), started, pulled, run,
                       daemon_spawned_s=daemon_at - run.began_boot, stats=stats)
        self.add(
            READY,
            run_name,
            ready_at - run.began_wall,
            ready_ms=stats["ready_ms"],
            daemon_spawned_s=daemon_at - run.began_boot,
        )
        self.add(AFTER, run_name, run.first_line - run.began - (ready_at - run.began_wall))
        self._add_bytes(name, sent_before, stats["store_bytes"], stats["fetched_bytes"],
                        tree_bytes(self.sn.cache_dir))
        self.add(REQUESTS, name, stats["store_gets"], "requests", bytes=stats["store_bytes"])
        if i == 0:
            self.verify(name, SN, self.ref, known_allowed=False)
        if self.full and name == LAZY:
            warm = first_line(c.ctr_command(*args, f"cs-{tag}-{RUN_ID}-w{i}", *self.command))
            self.add(WARM, WARM_LAZY, warm.to_first_line)
            self.from_disk(i, args, tag)

    def from_disk(self, i: int, args: tuple[str, ...], tag: str) -> None:
        """The floor under a lazy cold start: the image forgotten (its snapshots, its mount
        and containerd's record of it) but every blob, index and metadata image left in the
        node cache, and the page cache dropped. What cafs pull + ctr run cost here, no byte
        fetched, is what the workload costs from the node's own disk: better fetching can
        only close the gap to it (a replayed profile may end a little under it, its bytes
        reaching the page cache on their way to the disk)."""
        self.cluster.forget_images()
        drop_page_cache()
        started = time.perf_counter()
        checked(self.cluster.pull_command(self.ref, SN))
        pulled = time.perf_counter()
        run = first_line(self.cluster.ctr_command(*args, f"cs-{tag}-{RUN_ID}-d{i}",
                                                  *self.command))
        stats, _, _ = self._mount_stats()
        if stats["fetched_bytes"]:  # then not quite a floor: said beside the figures
            self.res.notes.append(f"{DISK_LAZY}, repeat {i + 1}: fetched "
                                  f"{stats['fetched_bytes']} bytes the cold start had not")
        self.add(DISK, DISK_LAZY, run.first_line - started, pull_s=pulled - started,
                 run_s=run.to_first_line, stats=stats)

    def stargz(self, i: int) -> None:
        assert self.peer is not None
        self._stargz(i, STARGZ, RPULL, CTR_RUN_STARGZ, self.peer.plain, "stargz")

    def stargz_optimized(self, i: int) -> None:
        assert self.peer is not None and self.peer.optimized is not None
        self._stargz(i, STARGZ_P, RPULL_P, CTR_RUN_STARGZ_P, self.peer.optimized, "stargz-opt")

    def _stargz(self, i: int, name: str, pull: str, run_name: str, ref: str, tag: str) -> None:
        c = self.cluster
        log_at = self.registry.log.stat().st_size
        started = time.perf_counter()
        rpull = ["ctr-remote", "--address", str(c.ctd_sock), "images", "rpull"]
        checked([*rpull, "--plain-http", "--snapshotter", stargz.PLUGIN, ref])
        pulled = time.perf_counter()
        args = ("run", "--rm", "--snapshotter", stargz.PLUGIN, ref)
        run = first_line(c.ctr_command(*args, f"cs-{tag}-{RUN_ID}-{i}", *self.command))
        self.add_start((name, pull, run_name), started, pulled, run)
        self._registry_figures(name, log_at)
        if i == 0:
            self.verify(name, stargz.PLUGIN, ref, known_allowed=True)

    def _registry_figures(self, name: str, log_at: int) -> None:
        """What the registry served since `log_at` (its access log's size then): requests,
        and bytes sent (compressed, as on the wire)."""
        requests, sent = registry_traffic(self.registry.log, log_at)
        self.add(REQUESTS, name, requests, "requests", bytes=sent)
        if name != OVERLAY:  # containerd's bytes are the layers', added by `overlay`
            self.add(BYTES, name, sent / 1e6, "MB", bytes=sent)

    def tree(self, snapshotter: str, ref: str) -> Tree:
        """The image's root filesystem as `snapshotter` serves it (a read-only view)."""
        target = self.ctx.ws.dir(f"coldstart-view-{snapshotter}")
        try:
            with self.cluster.image_view(snapshotter, ref, target):
                return snapshot(target)
        finally:
            target.rmdir()

    def verify(self, name: str, snapshotter: str, ref: str, known_allowed: bool) -> None:
        """`name`'s tree is overlayfs's, or the scenario fails; stargz's known differences
        (`bench.trees`: mtimes in whole seconds, symlink modes) are counted in the results."""
        assert self.reference is not None, "overlayfs runs first"
        found = compare(self.reference, self.tree(snapshotter, ref))
        diffs = found.diffs
        if not known_allowed:
            diffs = [*diffs, *(f"{n} {kind}" for kind, n in found.known.items())]
        if diffs:
            shown = "\n  ".join(diffs[:20])
            raise RuntimeError(f"{name}: tree differs from overlayfs's ({len(diffs)}):\n  {shown}")
        verdict = "same as overlayfs"
        if found.known:
            verdict += ", except " + ", ".join(f"{n} {kind}" for kind, n in found.known.items())
        self.res.params.setdefault("trees", {})[name] = verdict

    def _mount_stats(self) -> tuple[dict[str, Any], float, float]:
        """The figures of the image's mounts (its top chain), when the (last) one was ready
        and when its daemon started (wall clock)."""
        mounts = self.cluster.remote_mounts(SN)
        if not mounts:
            raise RuntimeError("no cafs mount under the snapshotter after ctr run")
        total: dict[str, Any] = {"mounts": len(mounts), "fetched_bytes": 0}
        ready_at = daemon_at = 0.0
        for mnt in mounts:
            stats, info = query(mnt), query(mnt, "info")
            when, ready_ms = mounted_at(mnt.parent / "mount.log")
            if when > ready_at:
                ready_at, total["ready_ms"] = when, ready_ms
                daemon_at = process_started(int(info["pid"]))
            total["fetched_bytes"] += stats["demand_bytes"] + stats["prefetch_bytes"]
            for key in (
                "demand_bytes",
                "demand_blobs",
                "prefetch_bytes",
                "prefetch_blobs",
                "reads",
                "read_bytes",
                "cache_misses",
                "store_gets",
                "neighbour_gets",
                "neighbour_bytes",
                "store_bytes",
            ):
                total[key] = total.get(key, 0) + stats.get(key, 0)
            for key in ("read_latency_p50_ms", "read_latency_p99_ms", "image_bytes"):
                total[key] = max(total.get(key, 0), stats[key])
            total["prefetch"] = stats.get("prefetch")
        return total, ready_at, daemon_at

    def cafs_run(self, i: int) -> None:
        self._cafs_run(i, RUNC, "run")

    def cafs_run_blob_by_blob(self, i: int) -> None:
        self._cafs_run(i, RUNC_NN, "run-nn", {"CAFS_NEIGHBOUR_PACKS": "off",
                                              "CAFS_IMPORTS_AHEAD": "0"})

    def cafs_run_no_imports(self, i: int) -> None:
        self._cafs_run(i, RUNC_NI, "run-ni", {"CAFS_IMPORTS_AHEAD": "0"})

    def cafs_run_profiled(self, i: int) -> None:
        assert self.profile is not None
        self.profile.show()
        try:
            self._cafs_run(i, RUNC_P, "run-profiled")
        finally:
            self.profile.hide()

    def _cafs_run(self, i: int, name: str, tag: str, env: dict[str, str] | None = None) -> None:
        cid = f"coldstart-{os.getpid()}-{tag}-{i}"
        cmd = [
            *CAFS,
            "run",
            "--rm",
            "--stats",
            "--store",
            self.sn.store_url,
            "--cache-dir",
            str(self.run_cache),
            "--name",
            cid,
            self.ref,
            "--",
            *self.command,
        ]
        sent_before = self.s3.sent_bytes()
        run = first_line(cmd, env=env)
        stats = parse_run_stats(run.stderr)
        ready_at, ready_ms = mounted_at(self._run_log(cid))
        decoded = stats["demand_bytes"] + stats["prefetch_bytes"]
        wire = stats["store_bytes"]
        self.add(
            COLD,
            name,
            run.to_first_line,
            exit_s=run.exited - run.began,
            stats=stats,
            ready_ms=ready_ms,
        )
        self.add(READY, name, ready_at - run.began_wall, ready_ms=ready_ms)
        self.add(AFTER, name, run.to_first_line - (ready_at - run.began_wall))
        self._add_bytes(name, sent_before, wire, decoded, tree_bytes(self.run_cache))
        self.add(REQUESTS, name, stats["store_gets"], "requests", bytes=wire)
        if self.full and name == RUNC:
            cmd[cmd.index("--name") + 1] = f"{cid}-w"
            self.add(WARM, WARM_RUNC, first_line(cmd).to_first_line)

    def _add_bytes(self, name: str, sent_before: int | None, mount: int, decoded: int,
                   cache: int) -> None:
        """A cafs contender's bytes: what the S3 server sent since `sent_before` (its own
        count: the image's records, index and EROFS image as well as the mount's fetches),
        or, from a server that keeps none (moto), what the mount says it fetched."""
        sent = self.s3.sent_bytes()
        wire = sent - sent_before if sent is not None and sent_before is not None else mount
        self.add(BYTES, name, wire / 1e6, "MB", bytes=wire, mount_bytes=mount,
                 decoded_bytes=decoded, cache_bytes=cache,
                 counted_by="server" if sent is not None else "mount")

    def _run_log(self, cid: str) -> Path:
        needle = f"/containers/{cid}/lower"
        for log in paths.log_dir().glob("mount-*.log"):
            if needle in log.read_text(errors="replace"):
                return log
        raise RuntimeError(f"no mount log for cafs run container {cid} in {paths.log_dir()}")

    def client_start(self) -> None:
        """What starting each client costs on a cold node, before it does anything."""
        drop_page_cache()
        self.add(CLI, CTR_HELP, timed(["ctr", "--help"]))
        drop_page_cache()
        self.add(CLI, CAFS_HELP, timed([*CAFS, "--help"]))


SN = "cafs"


@register(
    "coldstart",
    "container cold start: ctr pull + run (overlayfs) vs cafs pull + run",
    tools=(*TOOLS, "docker-registry"),
    always_s3=True,
)
def run(ctx: Context, res: ScenarioResult) -> None:
    ctx.s3()  # first: the snapshotter and the cafs commands inherit its environment
    setup: dict[str, float] = {}
    work = workload(ctx.opts.quick)
    command = work.command
    with contextlib.ExitStack() as stack:
        with timer(setup, "build"):
            ctx.step("building the image")
            image = build_image(ctx, ctx.ws.dir("coldstart-image"), work)
        with timer(setup, "push"):
            ctx.step("starting the registry, pushing the image")
            workdir = ctx.ws.dir("coldstart-registry")
            registry = stack.enter_context(registry_with(ctx, workdir, image))
        ref = f"{registry.host}/{REPO}:latest"
        url = ctx.store_url("coldstart", "s3")
        stack.callback(delete_prefix, url)
        with timer(setup, "index"):
            ctx.step("cafs index (set-up, not measured)")
            index_into(image, url, ref)
        profile = None
        if has_profile_command():
            with timer(setup, "profile"):
                ctx.step("cafs profile (recorded once)")
                profile = StoredProfile(ctx, url, ref, command)
                profile.hide()
        with timer(setup, "cluster"):
            ctx.step("starting containerd, the cafs snapshotter and stargz's")
            daemon, missing = stargz_daemon()
            proxies = {} if daemon is None else {stargz.PLUGIN: stargz.daemon(daemon)}
            cluster = start_cluster(ctx.ws.dir("coldstart-ctd"), [(SN, url)], proxies=proxies)
            stack.callback(_teardown, ctx, cluster)
        peer = None
        if daemon is not None:
            with timer(setup, "stargz convert"):
                ctx.step("ctr-remote convert --estargz and optimize (set-up, not measured)")
                peer = convert_for_stargz(cluster, ref, ctx.opts.quick, command)
                cluster.forget_images()
        ctx.log("coldstart set-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items()))
        res.params.update(
            image_bytes=image.uncompressed_size,
            compressed_bytes=sum(image.layer_sizes),
            layers=len(image.layer_sizes),
            command=" ".join(command[:2]) + f" '{command[2]}'",
            store=ctx.store_label(url),
            link=ctx.opts.link,
            setup_seconds={k: round(v, 1) for k, v in setup.items()},
            profile=profile is not None,
        )
        if profile is not None:
            res.params.update(
                profile_bytes=profile.summary.get("bytes"),
                profile_blobs=profile.summary.get("blobs"),
            )
        res.params["stargz"] = _peer_label(peer, missing)
        if missing is not None or (peer is not None and peer.why_not is not None):
            res.notes.append(f"stargz: {res.params['stargz']}")
        bench = Coldstart(ctx, res, cluster, ref, image, registry, profile, peer, command)
        for i in range(ctx.repeat):
            bench.repeat(i)
            cold = [s for s in res.series if s.group == COLD and s.samples]
            summary = ", ".join(f"{s.contender} {s.samples[-1]:.2f} s" for s in cold)
            ctx.log(f"coldstart repeat {i + 1}: {summary}")
    _summarise(res, profile is not None, not ctx.opts.quick, peer, ctx.s3().metrics is not None)


def _peer_label(peer: StargzImages | None, missing: str | None) -> str:
    if peer is None:
        return f"not available ({missing})"
    if peer.optimized is None:
        return f"eStargz only; optimized: not available ({peer.why_not})"
    return "eStargz, and optimized with ctr-remote images optimize"


@contextlib.contextmanager
def timer(into: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        into[name] = time.perf_counter() - started


def _summarise(
    res: ScenarioResult, profiled: bool, full: bool, peer: StargzImages | None,
    server_counts: bool,
) -> None:
    base = f"{COLD}: {OVERLAY}"
    contenders = [LAZY, RUNC, RUNC_NN, RUNC_NI]
    if profiled:
        contenders += [LAZY_P] + ([RUNC_P] if full else [])
    for name in contenders:  # time ratios, as the other scenarios: 0.2 is 5x faster
        res.compare(f"cold start: {name} / {OVERLAY}", f"{COLD}: {name}", base)
    res.compare(f"bytes: {LAZY} / {OVERLAY}", f"{BYTES}: {LAZY}", f"{BYTES}: {OVERLAY}")
    if full:  # above 1: what fetching costs beyond the node's own disk
        res.compare(f"cold start / its floor: {LAZY}", f"{COLD}: {LAZY}", f"{DISK}: {DISK_LAZY}")
    for name in (RUNC, RUNC_NI):
        res.compare(f"cold start: {name} / {RUNC_NN}", f"{COLD}: {name}", f"{COLD}: {RUNC_NN}")
    res.compare(f"cold start: {RUNC} / {RUNC_NI}", f"{COLD}: {RUNC}", f"{COLD}: {RUNC_NI}")
    res.compare(f"bytes: {RUNC} / {RUNC_NI}", f"{BYTES}: {RUNC}", f"{BYTES}: {RUNC_NI}")
    if peer is not None:
        pairs = [(LAZY, STARGZ)] + ([(LAZY_P, STARGZ_P)] if profiled and peer.optimized else [])
        for ours, theirs in pairs:
            res.compare(f"cold start: {ours} / {theirs}", f"{COLD}: {ours}", f"{COLD}: {theirs}")
            res.compare(
                f"requests: {ours} / {theirs}", f"{REQUESTS}: {ours}", f"{REQUESTS}: {theirs}"
            )
    res.goal(
        "cafs pull + ctr run at least 5x faster than ctr pull + run (time ratio ≤ 0.2)",
        f"cold start: {LAZY} / {OVERLAY}",
        "<=",
        0.2,
    )
    res.notes.append(
        "Every contender starts from a cold node: image, content and snapshots removed, node "
        "caches emptied, page cache dropped; the registry's and SeaweedFS's files are read back "
        "into the page cache (moto keeps objects in memory), so both servers are warm."
    )
    res.notes.append(
        "Bytes are what the server sent: for cafs "
        + ("SeaweedFS's count of the bucket's traffic: `cafs pull`'s records, index and EROFS "
           "image and the mount's store objects and pack ranges as stored (zstd where it paid)"
           if server_counts else
           "the mount's store objects and pack ranges as stored (zstd where it paid); moto "
           "keeps no count, so what `cafs pull` fetched is left out")
        + "; stargz's manifests and ranged reads of eStargz layers; containerd's gzip layers."
    )


def _teardown(ctx: Context, cluster: Cluster) -> None:
    for line in cluster.teardown():
        ctx.log(f"coldstart teardown: {line}")
