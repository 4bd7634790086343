"""Default locations: system-wide as root, per-user otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def _root() -> bool:
    return os.geteuid() == 0


def run_dir() -> Path:
    """Sockets, pids and per-mount state. Never a predictable path in /tmp, which another
    user could create first and so receive what cafs sends to its sockets: without
    XDG_RUNTIME_DIR (su, sudo, cron, CI) a user's run dir is in their own cache home.
    Whatever it is, it is used only once blobstore.privatedir has checked it is theirs."""
    env = os.environ.get("CAFS_RUN_DIR")
    if env:
        return Path(env)
    if _root():
        return Path("/run/cafs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "cafs"
    return _cache_home() / "cafs-run"


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_dir() -> Path:
    env = os.environ.get("CAFS_CACHE_DIR")
    if env:
        return Path(env)
    if _root():
        return Path("/var/cache/cafs")
    return _cache_home() / "cafs"


def log_dir() -> Path:
    env = os.environ.get("CAFS_LOG_DIR")
    if env:
        return Path(env)
    return Path("/var/log/cafs") if _root() else cache_dir() / "log"


def canonical(path: Path | str) -> Path:
    """Real path without stat-ing the last component (a FUSE root that may not answer)."""
    p = Path(os.path.abspath(path))
    return Path(os.path.realpath(p.parent)) / p.name if p.name else p


def mount_state_dir(mountpoint: Path) -> Path:
    """Per-mount state (pid, info, control socket) keyed by the mountpoint's real path."""
    import hashlib  # here: loading OpenSSL costs every CLI start ~10 ms with a cold cache

    key = hashlib.sha256(os.fsencode(canonical(mountpoint))).hexdigest()[:16]
    return run_dir() / "mounts" / key


def mount_server_socket() -> Path:
    """Where a mount server (`cafs mount-server`) listens, if one runs."""
    return run_dir() / "mountd.sock"


UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, NUL included


def control_socket(mountpoint: Path) -> Path:
    """The daemon's control socket; refused up front if the run dir makes it too long for
    AF_UNIX (else the daemon would fail at bind with an obscure error)."""
    path = mount_state_dir(mountpoint) / "control.sock"
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ValueError(f"run directory {run_dir()} is too long for a unix socket path "
                         f"({len(os.fsencode(path))} bytes > {UNIX_PATH_MAX}): set CAFS_RUN_DIR "
                         "to a shorter directory")
    return path
