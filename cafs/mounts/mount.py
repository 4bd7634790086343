"""Starting, finding and stopping mount daemons (used by the CLI and the snapshotter).

`mount_detached` returns only once the kernel mount exists ("command returned => mounted"),
so callers can use the mountpoint at once. Daemons run in their own session and outlive
whoever started them; their pid and control socket live in a per-mountpoint state dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blobstore import privatedir
from cafs import config, ipc, paths
from cafs.mounts import mountinfo


class MountError(RuntimeError):
    """Mounting or unmounting failed; the message says why in a user's terms."""


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available: /dev/fuse is missing (load the fuse module, "
                         "or give the container --device /dev/fuse)")
    if os.geteuid() != 0:
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise MountError("no permission to use /dev/fuse: run as root")
        if shutil.which("fusermount3") is None:
            raise MountError("fusermount3 is missing: install the fuse3 package")


def is_mounted(mountpoint: Path) -> bool:
    return mountinfo.is_cafs(mountpoint)


def mount_detached(source: str, mountpoint: Path, *, store_url: str | None = None,
                   cache_dir: Path | None = None, cache_size: int | None = None,
                   log_file: Path | None = None, fetch_deadline: float | None = None,
                   timeout: float = 120.0, record: str | None = None,
                   profile: str | None = "default", prefetch_weights: str = "auto",
                   suid_dev: bool = False, daemon_args: Sequence[str] = (),
                   settings: config.Config | None = None) -> int:
    """Start a daemon serving `source` at `mountpoint`; returns its pid once mounted.

    The settings given here are flags over the file and CAFS_* variables (`settings`,
    loaded now unless given), resolved once into the daemon's whole configuration
    (cafs.config.daemon_config). The daemon replays the image's `profile` (if it has one;
    None: never) and prefetches its weight files per `prefetch_weights` (auto: on GPU
    nodes); with `record` it records a startup profile under that name instead, saved when
    it unmounts. `daemon_args`: prefetch tuning flags (--prefetch-parallel, --prefetch-rate,
    --no-pack, --prefetch-processes). The mount is nosuid,nodev unless `suid_dev`: only a
    mountpoint no other user can reach may honour the image's setuid bits and device files.
    """
    try:
        cfg = config.daemon_config(
            source, mountpoint, settings, store_url=store_url, cache_dir=cache_dir,
            cache_size=cache_size, fetch_deadline=fetch_deadline, record=record,
            profile=profile, prefetch_weights=prefetch_weights, suid_dev=suid_dev,
            **config.prefetch_tuning(daemon_args))
    except config.ConfigError as exc:
        raise MountError(str(exc)) from None
    return start(cfg, log_file, timeout)


def start(cfg: config.DaemonConfig, log_file: Path | None = None,
          timeout: float = 120.0) -> int:
    """Start a daemon with this whole configuration; returns its pid once mounted."""
    check_fuse()
    mountpoint = cfg.mountpoint
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a cafs mount")
    try:
        paths.control_socket(mountpoint)
        privatedir.ensure(paths.run_dir())
        if log_file is None:
            log_file = privatedir.ensure(paths.log_dir()) / f"mount-{cfg.state_dir.name}.log"
    except (ValueError, privatedir.UnsafePath) as exc:
        raise MountError(str(exc)) from None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # The whole configuration, the same on both paths; source and mountpoint also stand
    # alone, for `ps` and the snapshotter's liveness check (snapshotter/remote.py).
    args = [cfg.source, str(mountpoint), "--config", cfg.to_json()]
    pid = _via_server(args, log_file, timeout)
    if pid is not None:
        return pid
    return _spawn(args, log_file, timeout)


def _spawn(args: list[str], log_file: Path, timeout: float) -> int:
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "cafs.daemon", *args, "--ready-fd", str(wfd)]
    with os.fdopen(privatedir.open_log(log_file), "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(wfd,), start_new_session=True, close_fds=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        failure = _read_ready(pipe, proc, timeout)
    if failure is not None:
        proc.wait(timeout=10)
        _failed(args, failure, log_file)
    return proc.pid


def _failed(args: list[str], why: str, log_file: Path) -> None:
    raise MountError(f"mount of {args[0]} at {args[1]} failed: {why} (log: {log_file})")


def _via_server(args: list[str], log_file: Path, timeout: float) -> int | None:
    """Start the daemon through a running mount server; None where there is none to ask
    (or it runs other code), so the caller spawns the daemon itself."""
    path = paths.mount_server_socket()
    if os.environ.get("CAFS_MOUNT_SERVER", "on") == "off" or not path.exists():
        return None
    from cafs.mounts.server import fingerprint

    request = {"op": "mount", "argv": args, "env": daemon_env(), "cwd": os.getcwd(),
               "log": str(log_file), "code": fingerprint()}
    try:
        client = ipc.Client(path)
    except privatedir.UnsafePath as exc:
        raise MountError(f"not mounted: {exc}") from None
    except OSError:
        return None
    with client:
        try:
            client.send(request)
            pid = int(ipc.result_of(client.receive(timeout))["pid"])
        except (OSError, ValueError, TypeError, KeyError, ipc.ErrorReply):
            return None  # stale, refused or garbled: spawn as if there were no server
        # A daemon runs from here on: no second one may be spawned for this mountpoint.
        try:
            failure = _failure(client.receive(timeout))
        except ipc.TimedOut:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            failure = f"not ready after {timeout:.0f}s"
        except ipc.ProtocolError as exc:  # it died before a word, or garbled its line
            failure = f"the daemon exited before it was ready ({exc})"
        except OSError as exc:
            failure = f"the daemon's answer was lost: {exc}"
    if failure is not None:
        _wait_gone(pid, 10)
        _failed(args, failure, log_file)
    return pid


def _failure(ready: dict[str, Any]) -> str | None:
    """None where the daemon's ready line says mounted, else why not."""
    try:
        ipc.result_of(ready)
    except (ipc.ErrorReply, ipc.ProtocolError) as exc:
        return str(exc)
    return None


# What a daemon reads from its environment: cafs's own settings, the S3 client's (boto3:
# credentials, region, endpoint, profile and config files, CA bundle), where the user's
# directories are, and how to reach the network (proxies, CA certificates).
DAEMON_ENV_PREFIXES = ("CAFS_", "AWS_", "XDG_", "PYTHON")
DAEMON_ENV = frozenset({
    "HOME", "PATH", "TMPDIR", "TZ", "LANG", "LC_ALL", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy"})


def daemon_env() -> dict[str, str]:
    """The variables a mount server passes on to the daemon it forks for us.

    The daemon must run with *this* client's store settings (a user's AWS credentials,
    endpoint, profile, CAFS_STORE), not the server's: the server may have been started from
    another shell, or by the snapshotter, with others. So they travel in the request, but
    only to a server of our own uid (checked with SO_PEERCRED before anything is sent, and
    by the server of us), so nothing leaves the user, and only the variables the daemon
    reads: nothing unrelated (other tools' tokens, agent sockets) goes to a second process.
    """
    return {k: v for k, v in os.environ.items()
            if k in DAEMON_ENV or k.startswith(DAEMON_ENV_PREFIXES)}


def _read_ready(pipe: Any, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """None once the daemon's ready line (an ipc reply) says mounted, else why not."""
    import select

    ready, _, _ = select.select([pipe], [], [], timeout)
    if not ready:
        proc.kill()
        return f"not ready after {timeout:.0f}s"
    line: bytes = pipe.readline(ipc.MAX_REPLY)
    if not line:
        return f"daemon exited with status {proc.wait(timeout=10)}"
    try:
        return _failure(ipc.decode(line))
    except ipc.ProtocolError as exc:
        return f"the daemon's ready line is garbled: {exc}"


def daemon_pid(mountpoint: Path) -> int | None:
    try:
        return int((paths.mount_state_dir(mountpoint) / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def unmount(mountpoint: Path, timeout: float = 15.0) -> None:
    """Unmount and wait for the daemon to exit. Refuses (EBUSY) a mount still in use."""
    mountpoint = paths.canonical(mountpoint)
    pid = daemon_pid(mountpoint)
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not a cafs mount")
    tool = ["umount"] if os.geteuid() == 0 else ["fusermount3", "-u"]
    res = subprocess.run([*tool, str(mountpoint)], capture_output=True, text=True)
    if res.returncode != 0:
        raise MountError(f"cannot unmount {mountpoint}: {res.stderr.strip() or res.stdout}")
    if pid is not None:
        _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child: reap it
                return
        except ChildProcessError:
            pass
        if process_exited(pid):
            return
        time.sleep(0.02)


def process_exited(pid: int) -> bool:
    """Gone, or a zombie: it has finished, and whoever adopted it (a daemon is nobody's
    child) reaps it when it likes; some inits take a second."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def query(mountpoint: Path, op: str = "stats", timeout: float = 5.0, **args: Any) -> Any:
    """Ask a mount daemon over its control socket (cafs/ipc.py): `op` with `args`, e.g.
    query(mnt, "locate", path="srv/model.safetensors"). MountError where it cannot answer
    or answers with an error."""
    sock_path = paths.control_socket(mountpoint)
    if not sock_path.exists():
        raise MountError(f"{mountpoint} is not served by a cafs daemon on this node")
    try:
        return ipc.ask(sock_path, {"op": op, **args}, timeout)
    except ipc.ErrorReply as exc:
        raise MountError(f"cafs daemon of {mountpoint}: {exc}") from None
    except (OSError, ipc.ProtocolError) as exc:
        raise MountError(f"cafs daemon of {mountpoint} does not answer: {exc}") from exc
