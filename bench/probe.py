"""Measurements taken in a child process, so the benchmark's own Python is not what is timed.

`python -m bench.probe read FILE` reads a file start to end with large buffers;
`python -m bench.probe walk DIR` walks a tree and lstat()s every entry. Each prints one JSON
line with what it did and how long it took, timed inside the child (interpreter start-up is
not counted). Kept free of imports beyond the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

READ_BUFFER = 4 << 20


def read_file(path: str, bufsize: int = READ_BUFFER) -> dict[str, Any]:
    buf = bytearray(bufsize)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        while n := os.readv(fd, [buf]):
            total += n
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    return {"bytes": total, "seconds": seconds}


def walk_tree(root: str) -> dict[str, Any]:
    entries = 0
    started = time.perf_counter()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(parent, name))
            entries += 1
    return {"entries": entries, "seconds": time.perf_counter() - started}


def main(argv: list[str]) -> int:
    what, target = argv[0], argv[1]
    result = read_file(target) if what == "read" else walk_tree(target)
    print(json.dumps(result))
    return 0


def run_probe(what: str, target: Path, timeout: float = 600) -> dict[str, Any]:
    """Run a probe in a fresh interpreter and return its JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.probe", what, str(target)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe {what} {target} failed: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
