"""Trust on a shared node: what a local user can get from cafs's mounts and `cafs run`'s
containers, and what a container can do to the node.

The attacker is a real unprivileged user. The image holds a setuid-root program that exits
with its effective uid (tests/euid_probe.py) and a world-writable device node for
/dev/zero: on a mount that honours them, any user who reaches it is root (Docker's
CVE-2021-41091) and reads devices it was never given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from euid_probe import euid_probe, status_of
from users import User, reachable_dir

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

pytestmark = pytest.mark.root

APP_UID = 1000
CANNOT_EXECUTE = 126  # env(1) could not run it: a path the attacker cannot reach


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, str]:
    layers = [[
        Entry.from_host("bin/busybox", "/bin/busybox", mode=0o755),
        Entry("bin/sh", "symlink", linkname="busybox"),
        Entry("bin/probe", data=euid_probe(), mode=0o4755),
        Entry("devices/zero", "char", mode=0o666, devmajor=1, devminor=5),
        Entry("etc/passwd", data=f"root:x:0:0::/root:/bin/sh\napp:x:{APP_UID}:{APP_UID}::/:"
                                 "/bin/sh\n".encode()),
        Entry("etc/group", data=f"root:x:0:\napp:x:{APP_UID}:\n".encode()),
        Entry("mnt", "dir"),
    ]]
    build_layout(tmp_path / "l", "t", layers, config={"Entrypoint": ["/bin/sh", "-c"],
                                                       "Cmd": ["true"]})
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                      IndexOptions()).record.ref
    return url, ref


@pytest.fixture
def node_dir() -> Iterator[Path]:
    """A short directory every user can traverse, as /run and /tmp are (pytest's tmp_path
    is neither: under a 0700 directory, and too long for the mounts' control sockets)."""
    path = Path(tempfile.mkdtemp(prefix="cafs-trust-"))
    reachable_dir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(node_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "CAFS_RUN_DIR": str(node_dir / "run"), "CAFS_MOUNT_SERVER": "off",
            **extra}


def _cafs(*args: str, env: dict[str, str], cache: Path | None = None
          ) -> subprocess.CompletedProcess[str]:
    cache_args = ["--cache-dir", str(cache)] if cache is not None else []
    return subprocess.run([sys.executable, "-m", "cafs", args[0], *cache_args, *args[1:]],
                          capture_output=True, text=True, timeout=120, env=env)


def _attacker_opens(attacker: User, path: Path) -> str:
    """What the attacker gets from reading a byte of `path`: the bytes, or the error."""
    res = attacker.python(f"""
try:
    with open({str(path)!r}, "rb") as f:
        print(f.read(1))
except OSError as exc:
    print(type(exc).__name__)
""")
    return res.stdout.strip()


@pytest.fixture(params=["auto", "off"], ids=["kernel-metadata", "fuse-metadata"])
def metadata_env(request: pytest.FixtureRequest, node_dir: Path) -> dict[str, str]:
    """Both ways a mount is stacked: EROFS + overlay over FUSE, and FUSE alone."""
    return _env(node_dir, CAFS_KERNEL_METADATA=request.param)


def _mounted(image: tuple[str, str], mountpoint: Path, env: dict[str, str], cache: Path,
             *flags: str) -> None:
    url, ref = image
    res = _cafs("mount", "--store", url, *flags, ref, str(mountpoint), env=env, cache=cache)
    assert res.returncode == 0, res.stderr


def test_a_mount_runs_no_setuid_binary_and_opens_no_device(
        image: tuple[str, str], attacker: User, node_dir: Path, metadata_env: dict[str, str],
        tmp_path: Path) -> None:
    assert status_of(attacker.uid) not in (0, CANNOT_EXECUTE)
    mnt = reachable_dir(node_dir / "mnt")
    _mounted(image, mnt, metadata_env, tmp_path / "c")
    try:
        assert (mnt / "bin/probe").stat().st_mode & 0o4000  # the bit is there...
        # ...and ignored: the program runs, as the attacker.
        assert attacker.run(mnt / "bin/probe").returncode == status_of(attacker.uid)
        assert _attacker_opens(attacker, mnt / "devices/zero") == "PermissionError"
    finally:
        _cafs("umount", str(mnt), env=metadata_env)


def test_allow_suid_dev_honours_them_where_asked(
        image: tuple[str, str], attacker: User, node_dir: Path, metadata_env: dict[str, str],
        tmp_path: Path) -> None:
    """The explicit opt-in (for a mountpoint only root can reach) does what it says; it also
    shows the probe and the device would give the attacker root and /dev/zero."""
    mnt = reachable_dir(node_dir / "mnt")
    _mounted(image, mnt, metadata_env, tmp_path / "c", "--allow-suid-dev")
    try:
        assert attacker.run(mnt / "bin/probe").returncode == 0
        assert _attacker_opens(attacker, mnt / "devices/zero") == repr(b"\0")
    finally:
        _cafs("umount", str(mnt), env=metadata_env)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_running_containers_bundle_is_out_of_other_users_reach(
        image: tuple[str, str], attacker: User, node_dir: Path, tmp_path: Path) -> None:
    url, ref = image
    env = _env(node_dir)
    reachable_dir(node_dir / "run")  # as /run/cafs was: what is under it must hold alone
    name = "trust-bundle"
    cmd = [sys.executable, "-m", "cafs", "run", "--rm", "--name", name, "--cache-dir",
           str(tmp_path / "c"), "--store", url, ref, "--", "sleep 60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    bundle = node_dir / "run" / "containers" / name
    try:
        _wait_for(bundle / "config.json", proc)
        assert (bundle.parent.stat().st_mode & 0o777, bundle.stat().st_mode & 0o777) == (
            0o700, 0o700)
        for layer in ("rootfs", "lower"):
            probe = bundle / layer / "bin/probe"
            assert subprocess.run([probe]).returncode == 0  # there, and setuid-root
            assert attacker.run(probe).returncode in (CANNOT_EXECUTE, status_of(attacker.uid))
            assert _attacker_opens(attacker, bundle / layer / "devices/zero") == (
                "PermissionError")
    finally:
        subprocess.run(["runc", "kill", name, "KILL"], capture_output=True)
        proc.communicate(timeout=60)
    assert not bundle.exists()


def _run(image: tuple[str, str], cache: Path, *args: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    url, ref = image
    return _cafs("run", "--rm", "--store", url, *args[:-1], ref, "--", args[-1],
                 env=env or dict(os.environ), cache=cache)


NEST = ("grep Seccomp: /proc/self/status; mount -t tmpfs none /mnt || echo mount refused; "
        "unshare -r -U -m sh -c 'mount -t tmpfs none /mnt && echo mounted' || echo refused")


def test_run_confines_the_container_with_seccomp(image: tuple[str, str],
                                                 tmp_path: Path) -> None:
    res = _run(image, tmp_path / "c", NEST)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["Seccomp:\t2", "mount refused", "refused"]


def test_seccomp_unconfined_lifts_the_profile(image: tuple[str, str], tmp_path: Path) -> None:
    res = _run(image, tmp_path / "c", "--security-opt", "seccomp=unconfined", NEST)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["Seccomp:\t0", "mount refused", "mounted"]


def test_setuid_binaries_work_inside_the_container(
        image: tuple[str, str], metadata_env: dict[str, str], tmp_path: Path) -> None:
    """On the container's own overlay, above the nosuid lazy mount, as in containerd."""
    res = _run(image, tmp_path / "c", "--user", "app", "/bin/probe", env=metadata_env)
    assert res.returncode == 0, res.stderr
    res = _run(image, tmp_path / "c", "--user", "app", "--security-opt", "no-new-privileges",
               "/bin/probe", env=metadata_env)
    assert res.returncode == status_of(APP_UID), res.stderr


# One read-only and one masked path that every kernel has (runc skips missing ones).
SYSTEM_PATHS = "grep -cE ' (/proc/sys|/sys/firmware) ' /proc/self/mountinfo"


def test_system_paths_are_masked_unless_unconfined(image: tuple[str, str],
                                                   tmp_path: Path) -> None:
    assert _run(image, tmp_path / "c", SYSTEM_PATHS).stdout == "2\n"
    res = _run(image, tmp_path / "c", "--security-opt", "systempaths=unconfined", SYSTEM_PATHS)
    assert res.stdout == "0\n"


def test_run_records_the_profile_in_the_bundle(image: tuple[str, str], node_dir: Path,
                                               tmp_path: Path) -> None:
    url, ref = image
    env = _env(node_dir)
    for name, opts in (("confined", []), ("unconfined", ["--security-opt",
                                                          "seccomp=unconfined"])):
        res = _cafs("run", "--name", name, "--store", url, *opts, ref, env=env,
                    cache=tmp_path / "c")
        assert res.returncode == 0, res.stderr
    spec = json.loads((node_dir / "run/containers/confined/config.json").read_text())
    assert spec["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert spec["process"]["capabilities"]["bounding"] == spec["process"]["capabilities"][
        "permitted"] and "CAP_SYS_ADMIN" not in spec["process"]["capabilities"]["bounding"]
    spec = json.loads((node_dir / "run/containers/unconfined/config.json").read_text())
    assert "seccomp" not in spec["linux"]


def test_run_bad_security_options_and_names(image: tuple[str, str], tmp_path: Path) -> None:
    res = _run(image, tmp_path / "c", "--security-opt", "seccomp=bogus", "true")
    assert res.returncode == 1 and "unknown security option 'seccomp=bogus'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = _run(image, tmp_path / "c", "--name", "../escape", "true")
    assert res.returncode == 1 and "bad container name" in res.stderr
