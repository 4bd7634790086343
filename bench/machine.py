"""A description of the machine a run was taken on, for the record beside every number."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from cafs.mounts import mountinfo


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _output(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _block_device(major: int, minor: int) -> dict[str, Any]:
    """The disk behind a device number: name, model, rotational flag (parent disk's)."""
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if not sys_dev.exists():
        return {}
    dev = sys_dev.resolve()
    disk = dev if (dev / "queue").exists() else dev.parent
    return {
        "device": dev.name,
        "disk": disk.name,
        "model": _read(str(disk / "device" / "model")) or _read(str(disk / "device" / "vendor")),
        "rotational": _read(str(disk / "queue" / "rotational")) == "1",
        "scheduler": _read(str(disk / "queue" / "scheduler")),
    }


def disk_info(path: Path) -> dict[str, Any]:
    """The filesystem holding `path` (where the benchmark's files live) and its disk."""
    real = os.path.realpath(path)
    best = None
    for entry in mountinfo.mounts():
        point = entry.mountpoint.rstrip("/") + "/"
        if (real + "/").startswith(point) and (best is None or len(point) > len(best.mountpoint)):
            best = entry
    usage = shutil.disk_usage(real)
    info: dict[str, Any] = {"path": real, "total_bytes": usage.total, "free_bytes": usage.free}
    if best is not None:
        info.update(mountpoint=best.mountpoint, fstype=best.fstype, source=best.source)
        info.update(_block_device(best.major, best.minor))
    return info


def git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    commit = _output("git", "-C", str(here), "rev-parse", "--short", "HEAD")
    dirty = _output("git", "-C", str(here), "status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "") if commit else ""


def describe(workdir: Path) -> dict[str, Any]:
    uname = os.uname()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": uname.nodename,
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_bytes(),
        "kernel": f"{uname.sysname} {uname.release}",
        "arch": uname.machine,
        "virtualization": _output("systemd-detect-virt") or "unknown",
        "os": _os_name(),
        "python": sys.version.split()[0],
        "disk": disk_info(workdir),
        "cafs_commit": git_commit(),
        "loadavg_start": list(os.getloadavg()),
        "umoci": _output("umoci", "--version"),
    }


def _os_name() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def one_line(machine: dict[str, Any]) -> str:
    mem = machine.get("memory_bytes", 0) / (1 << 30)
    disk = machine.get("disk", {})
    return (
        f"{machine.get('cpu_model')}, {machine.get('cores')} cores, {mem:.0f} GiB RAM, "
        f"{machine.get('kernel')}, disk {disk.get('disk', '?')} ({disk.get('fstype', '?')}, "
        f"rotational flag {int(bool(disk.get('rotational')))}), "
        f"virtualization: {machine.get('virtualization')}"
    )
