"""Helpers to mount indexed images in tests, always unmounted afterwards."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cafs.mounts import mount


@contextlib.contextmanager
def mounted(source: str, mnt: Path, store_url: str, cache_dir: Path,
            fetch_deadline: float | None = None) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    log = mnt.parent / f"{mnt.name}.log"
    mount.mount_detached(source, mnt, store_url=store_url, cache_dir=cache_dir,
                         log_file=log, fetch_deadline=fetch_deadline)
    try:
        yield mnt
    finally:
        unmount_quietly(mnt)


def unmount_quietly(mnt: Path) -> None:
    """Whatever a test left mounted at `mnt` goes: cleanly if it can, else detached."""
    if mount.is_mounted(mnt):
        try:
            mount.unmount(mnt)
        except mount.MountError:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def log_of(mnt: Path) -> str:
    return (mnt.parent / f"{mnt.name}.log").read_text()
