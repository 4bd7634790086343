"""A daemon unmounts only the mount it made, never whatever sits at its mountpoint later."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mounts import mounted

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs.mounts import mount, mountinfo
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

pytestmark = pytest.mark.root


def _wait_exited(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not mount.process_exited(pid):
        assert time.monotonic() < deadline, f"daemon {pid} did not exit"
        time.sleep(0.01)


@pytest.mark.parametrize("kernel_metadata", ["auto", "off"])
@pytest.mark.parametrize("how", ["last-close", "sigterm"])
def test_a_detached_daemons_exit_leaves_the_next_mount_alone(
        tmp_path: Path, kernel_metadata: str, how: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Mount A, hold a file open on it, `umount -l`, mount B at the same path; when A's
    daemon ends (its last file closed, or a SIGTERM), B stays mounted and serving."""
    monkeypatch.setenv("CAFS_KERNEL_METADATA", kernel_metadata)
    build_layout(tmp_path / "l", "t", [[Entry("f", data=b"hello\n")]])
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path}/l:t"), open_store(url),
                      IndexOptions()).record.ref
    mnt = tmp_path / "mnt"
    with mounted(ref, mnt, url, tmp_path / "cache"):
        pid_a = mount.daemon_pid(mnt)
        assert pid_a is not None
        held = os.open(mnt / "f", os.O_RDONLY)
        try:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
            assert not mount.is_mounted(mnt)
            with mounted(ref, mnt, url, tmp_path / "cache"):
                pid_b = mount.daemon_pid(mnt)
                assert pid_b is not None and pid_b != pid_a
                if how == "sigterm":
                    os.kill(pid_a, signal.SIGTERM)
                    _wait_exited(pid_a)
                os.close(held)
                held = -1
                _wait_exited(pid_a)
                for _ in range(30):  # B must stay, serving, after A is gone
                    assert mountinfo.is_cafs(mnt), "A's daemon unmounted B"
                    assert (mnt / "f").read_bytes() == b"hello\n"
                    assert mount.query(mnt, "info")["pid"] == pid_b
                    time.sleep(0.1)
        finally:
            if held >= 0:
                os.close(held)
