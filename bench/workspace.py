"""Everything a run creates, and its removal: temp dirs, cafs mounts, child processes.

All state lives under one temp dir, and cafs is pointed at it (CAFS_RUN_DIR, CAFS_CACHE_DIR,
CAFS_LOG_DIR, CAFS_STORE), so nothing a run does touches the node's real cafs state. `close`
unmounts whatever is still mounted below the root (deepest first), ends the processes the
run started (each known by pid, or found by the root's unique path in its command line), and
removes the tree. It runs on success, failure, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.services import stop_process
from cafs.mounts import mount, mountinfo

CAFS_ENV = ("CAFS_RUN_DIR", "CAFS_CACHE_DIR", "CAFS_LOG_DIR", "CAFS_STORE")
SOCKET_TAIL = "/mounts/0123456789abcdef/control.sock"  # what cafs adds to its run dir


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below `root`."""
    prefix = str(root).rstrip("/") + "/"
    return [
        (m.mountpoint, m.fstype)
        for m in mountinfo.mounts()
        if m.mountpoint.startswith(prefix) or m.mountpoint == str(root)
    ]


def query(mnt: Path, request: str = "stats", timeout: float = 5.0) -> dict[str, Any]:
    """`cafs.mounts.mount.query`, retried: the daemon answers "mounted" before its control socket
    is listening, so a query right after `mount_detached` can find no socket yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return mount.query(mnt, request)
        except mount.MountError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def processes_mentioning(text: str) -> list[int]:
    """Pids (not ours) whose command line contains `text`."""
    needle, pids = text.encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all its threads (0 if it is gone or unknown):
    tells which side of a transfer was busy."""
    fields = _stat_fields(pid) if pid is not None else None
    return 0.0 if fields is None else _cpu(fields)


def _cpu(fields: list[str]) -> float:
    """User + system seconds from /proc stat fields (as `_stat_fields` gives them)."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    """The fields after the command name in /proc's stat of a process (or of one of its
    threads); None if it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def parent_of(pid: int) -> int | None:
    """The parent pid of a live process (None if it is gone)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def tree_cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process and of every process it started: its live
    descendants (worker processes, a forkserver and what it forked) and those already
    reaped (the kernel adds a waited-for child's time, its own reaped children's included,
    to its parent's cutime/cstime). What "every process cafs runs for a mount" costs."""
    if pid is None:
        return 0.0
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            stats[int(entry)] = fields
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    ticks, todo = 0, [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current)
        if fields is None:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
        todo += children.get(current, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int | None) -> dict[str, float]:
    """User + system CPU time of a live process's threads, summed by thread name with its
    trailing number dropped ("Trio thread 3": "Trio thread"): which of a daemon's threads
    were busy (its event loop, or the worker threads that fetch, hash and write). Threads
    that have exited are not counted: `tree_cpu_seconds` is the total."""
    out: dict[str, float] = {}
    if pid is None:
        return out
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n0123456789")
        except OSError:
            continue  # the thread exited meanwhile
        fields = _stat_fields(pid, int(tid))
        if fields is None:
            continue
        name = name.strip() or "?"
        out[name] = out.get(name, 0.0) + _cpu(fields)
    return {k: round(v, 2) for k, v in sorted(out.items())}


def evict(*paths: Path) -> None:
    """Drop the page cache of files (or of every file below dirs) without touching the rest
    of the machine: posix_fadvise(DONTNEED) after a sync. Works on files of a FUSE mount too
    (their pages are the kernel's, whatever keep_cache says); check with resident_bytes."""
    os.sync()
    for path in paths:
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
        for file in files:
            with contextlib.suppress(OSError):
                fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def drop_dentries() -> bool:
    """Drop the kernel's dentry and inode caches (machine-wide). False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        return True
    except OSError:
        return False


def resident_bytes(*paths: Path) -> int:
    """Bytes of files (or of every file below dirs) in the page cache, from util-linux
    fincore; -1 if it cannot tell."""
    files = [str(f) for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    if not files:
        return 0
    try:
        res = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *files],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:  # util-linux without fincore
        return -1
    try:
        return sum(int(line) for line in res.stdout.split())
    except ValueError:
        return -1


class Workspace:
    def __init__(self, base: str | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cafs-bench-", dir=base)).resolve()
        self._names: dict[str, int] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._extra_dirs: list[Path] = []
        self._saved_env = {k: os.environ.get(k) for k in CAFS_ENV}
        os.environ["CAFS_RUN_DIR"] = str(self._run_dir())
        os.environ["CAFS_CACHE_DIR"] = str(self.dir("cafs-cache"))
        os.environ["CAFS_LOG_DIR"] = str(self.dir("logs"))
        os.environ["CAFS_STORE"] = f"file://{self.dir('default-store')}"

    def _run_dir(self) -> Path:
        """cafs's run dir: inside the root, unless that makes its unix socket paths longer
        than the kernel allows (108 bytes); then a short temp dir removed at close."""
        inside = self.root / "cafs-run"
        if len(str(inside)) + len(SOCKET_TAIL) < 100:
            inside.mkdir()
            return inside
        short = Path(tempfile.mkdtemp(prefix="cafsb-"))
        self._extra_dirs.append(short)
        return short

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def dir(self, name: str) -> Path:
        """A new, empty directory named after `name` (made unique)."""
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        path = self.root / (name if n == 0 else f"{name}-{n}")
        path.mkdir(parents=True)
        return path

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run `fn` at close, before mounts and processes are cleaned (last added, first run)."""
        self._cleanups.append(fn)

    def spawn(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """A child process ended at close if still running."""
        proc = subprocess.Popen(list(cmd), **kwargs)
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def mounted(
        self, source: str, store_url: str, cache_dir: Path, **options: Any
    ) -> Iterator[Path]:
        """A cafs mount of `source` (daemon logs in logs/), unmounted on exit. `options` go
        to `cafs.mounts.mount.mount_detached` (record, profile, prefetch_weights, daemon_args)."""
        mnt = self.dir("mnt")
        log = self.logs / f"{mnt.name}.log"
        mount.mount_detached(
            source, mnt, store_url=store_url, cache_dir=cache_dir, log_file=log, **options
        )
        try:
            yield mnt
        finally:
            self.unmount(mnt)

    def unmount(self, mnt: Path) -> None:
        if not mount.is_mounted(mnt):
            return
        try:
            mount.unmount(mnt)
        except mount.MountError:
            time.sleep(0.5)  # a reader that just exited may still hold it
            try:
                mount.unmount(mnt)
            except mount.MountError:
                subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)

    def close(self) -> list[str]:
        """Remove everything; returns what needed force (for the log), never raises."""
        forced: list[str] = []
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
        try:
            while self._cleanups:
                fn = self._cleanups.pop()
                try:
                    fn()
                except Exception as exc:
                    forced.append(f"cleanup {fn!r} failed: {exc}")
            forced += self._unmount_all()
            forced += self._end_processes()
            for path in [self.root, *self._extra_dirs]:
                shutil.rmtree(path, ignore_errors=True)
                if path.exists():
                    forced.append(f"could not remove {path}")
        finally:
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            signal.signal(signal.SIGINT, previous)
        return forced

    def _unmount_all(self) -> list[str]:
        forced = []
        for point, fstype in sorted(mounts_under(self.root), key=lambda m: -len(m[0])):
            if mountinfo.is_cafs(point):
                self.unmount(Path(point))
            if (point, fstype) in mounts_under(self.root):
                forced.append(f"lazy unmount of {point} ({fstype})")
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        return forced

    def _end_processes(self) -> list[str]:
        forced = []
        for proc in self._procs:
            stop_process(proc)
        for pid in processes_mentioning(str(self.root)):
            forced.append(f"ended stray process {pid}")
            _end_pid(pid)
        return forced


def _end_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class _Interrupt:
    pending: int | None = None  # a signal whose KeyboardInterrupt the run has not handled


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so `finally` clean-up runs,
    and remember each until the run has handled it (`interrupt_handled`): Python drops an
    exception raised inside a finalizer ("Exception ignored in Popen.__del__"), so a Ctrl-C
    landing there would be lost; `raise_if_interrupted` raises it again."""

    def handler(signum: int, frame: FrameType | None) -> None:
        _Interrupt.pending = signum
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _Interrupt.pending = None


def raise_if_interrupted() -> None:
    """Raise a signal's KeyboardInterrupt that something swallowed; not while an exception
    is being handled (a `finally` on the way out of the first one)."""
    if _Interrupt.pending is not None and sys.exc_info()[1] is None:
        signum, _Interrupt.pending = _Interrupt.pending, None
        raise KeyboardInterrupt(f"signal {signum}")


def interrupt_handled() -> None:
    _Interrupt.pending = None
