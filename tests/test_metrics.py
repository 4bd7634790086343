"""The Prometheus endpoint reports every mount's figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from conftest import free_port
from mounts import mounted

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs.mounts.metrics import serve_metrics
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source


@pytest.mark.root
def test_metrics_endpoint_shows_mount_figures(tmp_path: Path) -> None:
    build_layout(tmp_path / "l", "t", [[Entry("f", data=b"z" * 10_000)]])
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                      IndexOptions()).record.ref
    port = free_port()
    serve_metrics(f"127.0.0.1:{port}")
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        (mnt / "f").read_bytes()
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    line = next(x for x in text.splitlines()
                if x.startswith("cafs_mount_demand_bytes_total") and str(mnt) in x)
    assert line.endswith(" 10000.0")
    assert "cafs_mount_read_latency_p99_ms" in text and "cafs_mounts " in text
    with pytest.raises(ValueError):
        serve_metrics("no-port")
