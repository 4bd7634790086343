"""End to end, as root: a private containerd 1.6 with cafs as a proxy snapshotter.

An image is built here (busybox from Debian's busybox-static), indexed into a file:// store,
made to appear in containerd with `cafs pull` and run with `ctr run --snapshotter cafs`
through the real cafs FUSE daemon, with no layer ever entering containerd's content store.
The fallback path (a plain `ctr images import`, unpacked by containerd through the
snapshotter as overlayfs would) runs too, and so do the restart and cleanup guarantees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ctdcluster import (
    CAFS,
    REF,
    Cluster,
    busybox_layers,
    require_containerd,
    retry,
    write_archive,
    write_layout,
)

from blobstore import open_store
from snapshotter.containerd import UNAVAILABLE_RETRY_S
from snapshotter.pull import PullError, pull

pytestmark = [pytest.mark.root, pytest.mark.slow]

PLAIN_REF = "example.com/plain/busybox:1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    require_containerd()
    from indexer.build import IndexOptions, index_image
    from indexer.sources import open_source

    c = Cluster(tmp_path_factory.mktemp("ctd"))
    write_layout(c.base / "layout", REF, busybox_layers())
    index_image(
        open_source(f"oci:{c.base / 'layout'}:v1"), open_store(c.store_url), IndexOptions(name=REF)
    )
    try:
        c.start_snapshotter()  # first: containerd backs off from a socket that is not there
        c.start_containerd()
        yield c
    finally:
        c.teardown()


@pytest.fixture(autouse=True)
def _healthy(cluster: Cluster) -> Iterator[None]:
    """Each test starts with the snapshotter running, whatever the test before it did."""
    cluster.heal()
    yield
    cluster.heal()


def _pull(c: Cluster) -> None:
    """Right after a test restarted the snapshotter too: `cafs pull` rides out containerd's
    redial (test_pull_rides_out_a_snapshotter_restart)."""
    pull(REF, address=str(c.ctd_sock), store_url=c.store_url)


def test_pull_and_run_without_downloading_layers(cluster: Cluster) -> None:
    # `cafs pull` asks the snapshotter, which pulls from its own store: the command's store
    # is never read (snapshotter/pullservice.py).
    cmd = [*CAFS, "pull", REF, "--address", str(cluster.ctd_sock), "--store",
           "file:///nonexistent/cafs-store", "--snapshotter-address", str(cluster.sn_sock)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, check=True)
    assert "2 layers served by cafs, 0 already present" in out.stdout, out
    indexes = cluster.base / "cache" / "indexes"  # fetched ahead for the run to come
    deadline = time.monotonic() + 10
    while not (indexes.is_dir() and any(indexes.iterdir())):
        assert time.monotonic() < deadline, "the pull did not bring the index into the cache"
        time.sleep(0.05)
    _pull(cluster)  # idempotent: the chain is found and kept
    cmd[cmd.index(REF)] = "nothing:here"  # the snapshotter's own verdict, in one line
    bad = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env)
    assert bad.returncode == 1 and bad.stderr.startswith("cafs pull: ") and \
        "nothing:here" in bad.stderr and bad.stderr.count("\n") == 1, bad
    out = cluster.run("lazy1", "sh", "-c", "cat /etc/hello; ls /etc; echo w >/tmp/w; cat /tmp/w")
    assert out.split() == ["hello", "from", "cafs", "hello", "w"]  # /etc/gone whited out
    # the daemon mounts the index the pull resolved: it needs no store read before ready
    titles = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in cluster.daemons()]
    assert titles and all(b" index:" in t.replace(b"\0", b" ") for t in titles), titles
    content = cluster.ctr("content", "ls", "-q").stdout.split()
    layers = json.loads(
        (cluster.base / "layout" / "blobs" / "sha256" / _manifest_hex(cluster)).read_text()
    )["layers"]
    assert len(content) == 2 and not {layer["digest"] for layer in layers} & set(content)
    snaps = cluster.ctr("snapshots", "--snapshotter", "cafs", "ls").stdout
    assert snaps.count("Committed") == 2


def _manifest_hex(c: Cluster) -> str:
    index = json.loads((c.base / "layout" / "index.json").read_text())
    return str(index["manifests"][0]["digest"]).removeprefix("sha256:")


def test_unindexed_image_falls_back_to_overlay(cluster: Cluster) -> None:
    """Its base layer is the indexed image's, so it also stacks an overlay on a remote."""
    plain = cluster.base / "plain"
    layers = busybox_layers()
    layers[1] = [("etc", "dir", b""), ("etc/plain", "file", "plain overlay\n")]
    write_layout(plain, PLAIN_REF, layers)
    write_archive(plain, cluster.base / "plain.tar")
    cluster.ctr("images", "import", "--no-unpack", str(cluster.base / "plain.tar"))
    assert cluster.run("plain1", "cat", "/etc/plain", image=PLAIN_REF) == "plain overlay\n"
    cluster.ctr("images", "rm", "--sync", PLAIN_REF)


def test_snapshotter_restart_never_breaks_a_running_container(cluster: Cluster) -> None:
    _pull(cluster)
    cluster.run("long1", "sleep", "600", detach=True)
    try:
        daemons = cluster.daemons()  # the top chain's, and the base's from the import above
        assert daemons
        assert cluster.stop_snapshotter(signal.SIGKILL) != 0  # the harshest stop
        assert cluster.exec("long1", "e1", "cat", "/etc/hello") == "hello from cafs\n"
        cluster.start_snapshotter()  # replaces the stale socket, re-adopts the live mounts
        assert retry(lambda: cluster.run("after1", "cat", "/etc/hello")) == "hello from cafs\n"
        assert sorted(cluster.daemons()) == sorted(daemons)
        log = (cluster.base / "snapshotter.log").read_text()
        assert f"{len(daemons)} live, 0 remounted" in log
        assert cluster.stop_snapshotter() == 0  # SIGTERM: clean, and still no harm done
        assert cluster.exec("long1", "e2", "cat", "/etc/hello") == "hello from cafs\n"
        cluster.start_snapshotter()
    finally:
        cluster.ctr("tasks", "kill", "-s", "KILL", "long1", check=False)
        time.sleep(0.3)
        cluster.ctr("tasks", "rm", "-f", "long1", check=False)
        cluster.ctr("containers", "rm", "long1", check=False)


def test_a_dead_daemon_is_remounted_on_demand(cluster: Cluster) -> None:
    _pull(cluster)
    retry(lambda: cluster.run("warm1", "true"))
    dead = cluster.daemons()
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    assert cluster.run("again1", "cat", "/etc/hello") == "hello from cafs\n"
    alive = cluster.daemons()
    assert len(alive) == 1 and not set(alive) & set(dead)  # only the top chain is needed


def test_pull_rides_out_a_snapshotter_restart(cluster: Cluster) -> None:
    """A crashed snapshotter leaves its socket: containerd's redials are refused, so it
    backs off (up to ~3.6 s apart) and answers UNAVAILABLE until it has redialled the
    restarted one. `cafs pull` retries through that, and gives up with a clear error after
    UNAVAILABLE_RETRY_S when the snapshotter stays away."""
    _pull(cluster)
    cluster.ctr("images", "rm", "--sync", REF)  # so that the pull must Prepare every layer
    cluster.stop_snapshotter(signal.SIGKILL)
    assert cluster.sn_sock.exists()
    probe = cluster.ctr("snapshots", "--snapshotter", "cafs", "prepare", "probe", check=False)
    assert probe.returncode != 0  # containerd's dial was refused: it redials with backoff
    time.sleep(4)  # a few refused redials: the backoff grows to containerd's 3 s maximum
    started = time.monotonic()
    with pytest.raises(PullError, match="unavailable"):
        pull(REF, address=str(cluster.ctd_sock), store_url=cluster.store_url)
    assert UNAVAILABLE_RETRY_S <= time.monotonic() - started < UNAVAILABLE_RETRY_S + 10
    cluster.start_snapshotter()
    result = pull(REF, address=str(cluster.ctd_sock), store_url=cluster.store_url)
    assert len(result.prepared) == 2 and result.present == []


def test_image_removal_unmounts_and_deletes_everything(cluster: Cluster) -> None:
    _pull(cluster)
    retry(lambda: cluster.run("last1", "true"))
    assert cluster.daemons()
    cluster.ctr("images", "rm", "--sync", REF)
    listing = cluster.ctr("snapshots", "--snapshotter", "cafs", "ls").stdout
    assert listing.splitlines()[1:] == []  # the header only
    deadline = time.monotonic() + 10
    while cluster.daemons() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.daemons() == []
    assert [m for m in cluster.mounts() if str(cluster.root) in m] == []
    assert os.listdir(cluster.root / "snapshots") == []
