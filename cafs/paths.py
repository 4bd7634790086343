"""Default locations: system-wide as root, per-user otherwise."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _root() -> bool:
    return os.geteuid() == 0


def run_dir() -> Path:
    env = os.environ.get("CAFS_RUN_DIR")
    if env:
        return Path(env)
    if _root():
        return Path("/run/cafs")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/cafs-{os.getuid()}") / "cafs"


def cache_dir() -> Path:
    env = os.environ.get("CAFS_CACHE_DIR")
    if env:
        return Path(env)
    if _root():
        return Path("/var/cache/cafs")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cafs"


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
    key = hashlib.sha256(os.fsencode(canonical(mountpoint))).hexdigest()[:16]
    return run_dir() / "mounts" / key
