"""CPUs a process may use: the cgroup quota wins over the cores it sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cafs.cpus import cgroup_quota, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_takes_the_smallest_quota_on_the_way_up(tmp_path: Path) -> None:
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(root / "kubepods" / "cpu.max", "250000 100000\n")
    _write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    _write(proc, "0::/kubepods/pod1\n")
    assert cgroup_quota(root, proc) == 2.5
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cgroup_quota(root, proc) == 1.5
    assert usable_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_v1_quota_and_no_quota(tmp_path: Path) -> None:
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    _write(proc, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\ngarbage\n")
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(root, proc) is None  # -1: unlimited; no v2 cpu.max either
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    assert cgroup_quota(root, proc) == 0.5
    assert usable_cpus(root, proc) == 1  # never fewer than one


def test_a_container_sees_its_own_cgroup_as_the_root(tmp_path: Path) -> None:
    """No cgroup namespace: /proc names the host's path, the mounted tree is the container's."""
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu\n")
    _write(root / "cpu.max", "300000 100000\n")
    _write(proc, "0::/system.slice/docker-abc.scope\n")
    assert cgroup_quota(root, proc) == 3.0


def test_unreadable_or_missing_files_mean_no_quota(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path, tmp_path / "absent") is None
    assert usable_cpus(tmp_path, tmp_path / "absent") == len(os.sched_getaffinity(0))


def _child_cgroup_with_half_a_cpu(name: str) -> Path:
    """A real cgroup (v1 `cpu` hierarchy, else v2) limited to 50 ms per 100 ms."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if v1.is_dir():
        child = v1 / name
        child.mkdir()
        (child / "cpu.cfs_quota_us").write_text("50000")
        return child
    own = Path("/proc/self/cgroup").read_text().splitlines()[0].split(":", 2)[2]
    parent = Path("/sys/fs/cgroup") / own.lstrip("/")
    if "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
        (parent / "cgroup.subtree_control").write_text("+cpu")
    child = parent / name
    child.mkdir()
    (child / "cpu.max").write_text("50000 100000")
    return child


@pytest.mark.root
def test_a_process_in_a_real_limited_cgroup_counts_one_cpu() -> None:
    child = _child_cgroup_with_half_a_cpu(f"cafs-test-{os.getpid()}")
    try:
        script = "from cafs.cpus import *; print(usable_cpus(), cgroup_quota())"
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$0" -c "$1"',
             sys.executable, script],
            check=True, capture_output=True, text=True).stdout.split()
        assert out == ["1", "0.5"]
    finally:
        child.rmdir()
