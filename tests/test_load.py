"""Load: 20 mounts on one node and 64 concurrent readers; memory and fds stay flat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.imagebuild import Entry, build_layout
from bench.loadgen import many_mounts, run_load
from blobstore import open_store
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

pytestmark = [pytest.mark.root, pytest.mark.slow]
SECONDS = float(os.environ.get("CAFS_LOAD_SECONDS", "12"))


def test_twenty_mounts_sixty_four_readers(tmp_path: Path) -> None:
    files = [Entry(f"f{n:02}", data=os.urandom(64 << 10) * (1 + n % 12)) for n in range(40)]
    build_layout(tmp_path / "l", "t", [files], compression="none")
    url = f"file://{tmp_path}/store"
    record = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                         IndexOptions()).record
    with many_mounts(f"index:{record.index}", tmp_path / "mnt", 20, url,
                     tmp_path / "cache") as mnts:
        result = run_load(mnts, [f"f{n:02}" for n in range(40)], readers=64, seconds=SECONDS)
    assert result.errors == []
    assert result.reads > 500
    rss_growth, fd_growth = result.growth()
    assert rss_growth < 1.25, f"daemon memory grew {rss_growth:.2f}x under load"
    assert fd_growth <= 8, f"daemon fds grew by {fd_growth} under load"
