"""A `cafs mount-server` for a scenario, so that its mounts start as a node's do.

On a node, mounts come through the snapshotter, which runs a mount server
(cafs/mounts/server.py): each daemon is a fork of a process that has already imported the
daemon's code and botocore's S3 model, not a new interpreter (~0.65 CPU-s and ~0.4 s here).
A scenario that measures what a mount costs a node runs one too, and counts what the
server spends per mount (`tree_cpu_seconds` of it: the fork and the first child it reaps)
beside the daemon's own CPU time.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from bench.workspace import tree_cpu_seconds
from cafs import paths
from cafs.mounts.server import answers

READY_TIMEOUT = 60.0
IDLE_TIMEOUT = 3600.0


@contextlib.contextmanager
def mount_server() -> Iterator[int]:
    """A mount server on this process's socket (`paths.mount_server_socket`, the
    workspace's run dir), yielded by pid once it has loaded its code; stopped on exit."""
    cmd = [sys.executable, "-m", "cafs.mounts.server", "--idle-timeout", str(IDLE_TIMEOUT)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_loaded(proc)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_loaded(proc: subprocess.Popen[bytes]) -> None:
    """Until it answers and has stopped spending CPU: it imports the daemon's code after
    it binds, and a mount measured before that would be charged for the imports."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = -1.0
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the mount server did not start")
        if answers(paths.mount_server_socket()):
            now = tree_cpu_seconds(proc.pid)
            if now == last:
                return
            last = now
        time.sleep(0.3)
