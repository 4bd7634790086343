"""How many CPUs this process may really use: its affinity and its cgroup's CPU quota.

A Kubernetes pod with `limits.cpu: 2` on a 64-core node sees 64 cores in `os.cpu_count()`
and in its affinity mask; sizing worker processes or thread limiters from either starts
work the quota then throttles (the CFS quota stalls the whole cgroup once it is spent). The
quota is the smallest one on the way from the process's cgroup up to the root of the
hierarchy it can see, cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota in CPUs (1.5 for 150 ms per 100 ms), or None where there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # v2; in a hybrid layout its tree is mounted at unified/
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            quotas += _up_from(base, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            quotas += _up_from(root / "cpu", path, _v1_quota)
    return min(quotas, default=None)


def _up_from(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """Quotas of the cgroup and its ancestors. Where the path is not there (a container
    sees its own cgroup as the root of the tree), the walk starts at the root it sees."""
    found: list[float] = []
    where = base / path.lstrip("/")
    while True:
        quota = read(where)
        if quota is not None:
            found.append(quota)
        if where == base or base not in where.parents:
            return found
        where = where.parent


def _v2_quota(cgroup: Path) -> float | None:
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(cgroup: Path) -> float | None:
    try:
        limit = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period

