"""stargz-snapshotter, the peer the coldstart benchmark measures cafs against, for real: the
bench builds its daemon from Debian's packaged library (bench/stargz.py), converts an image
with `ctr-remote images convert --estargz`, lazily pulls it with `ctr-remote images rpull`
and runs it through a private containerd with `--snapshotter stargz`.

Where the packages are installed (as on CI) a failed build fails these tests; where they are
missing, the failure names them (`apt-get install ...`): a root test never skips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench import stargz, trees
from bench.cluster import Cluster, ClusterError, start_cluster
from bench.registrypush import push_layout
from bench.scenarios import coldstart
from bench.services import Registry
from tests.ctdcluster import busybox_layers, write_layout

REPO = Path(__file__).resolve().parent.parent
HELLO = "hello from cafs"  # the first line of /etc/hello in busybox_layers' image


@pytest.fixture(scope="module")
def daemon() -> Path:
    return stargz.build()  # StargzUnavailable names the missing packages


@pytest.fixture
def cluster(tmp_path: Path, daemon: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "ctd", [], proxies={stargz.PLUGIN: stargz.daemon(daemon)})
    try:
        yield c
    finally:
        assert c.teardown() == []


def _esgz_image(cluster: Cluster, registry: Registry, tmp_path: Path) -> tuple[str, str]:
    """The busybox image pushed as is and converted to eStargz (both references)."""
    write_layout(tmp_path / "layout", "busybox", busybox_layers())
    push_layout(tmp_path / "layout", "v1", registry.host, "test/stargz", "v1")
    ref, esgz = f"{registry.host}/test/stargz:v1", f"{registry.host}/test/stargz:esgz"
    remote = ["ctr-remote", "--address", str(cluster.ctd_sock), "images"]
    cluster.ctr("images", "pull", "--plain-http", ref)
    subprocess.run([*remote, "convert", "--estargz", "--oci", ref, esgz], check=True)
    cluster.push(esgz)
    return ref, esgz


@pytest.mark.root
def test_a_push_that_fails_is_tried_again_and_every_error_is_reported(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """containerd 1.6's push is sometimes cut short (CI saw `unexpected EOF`): set-up pushes
    try again, log each failure, and raise with every attempt's error when none succeeds."""
    with pytest.raises(ClusterError, match="failed 3 times") as raised:
        cluster.push("127.0.0.1:9/none/such:v1")
    assert str(raised.value).count("attempt ") == 3
    assert len([r for r in caplog.records if "push" in r.getMessage()]) == 3


@pytest.mark.root
def test_rpull_and_run_an_estargz_image_lazily(
    cluster: Cluster, registry: Registry, tmp_path: Path
) -> None:
    _, esgz = _esgz_image(cluster, registry, tmp_path)
    cluster.forget_images()
    rpull = ["ctr-remote", "--address", str(cluster.ctd_sock), "images", "rpull"]
    subprocess.run([*rpull, "--plain-http", "--snapshotter", stargz.PLUGIN, esgz], check=True)

    digest = cluster.ctr("images", "ls").stdout.split(esgz, 1)[1].split()[1]
    manifest = json.loads(cluster.ctr("content", "get", digest).stdout)
    layers = {layer["digest"] for layer in manifest["layers"]}
    content = set(cluster.ctr("content", "ls", "-q").stdout.split())
    assert layers and not layers & content, "rpull downloaded layers: nothing was lazy"
    fuse = [p for p in cluster.mounts() if p.startswith(str(cluster.proxies["stargz"].root))]
    assert fuse, "no remote snapshot mounted by the stargz daemon"

    run = ("run", "--rm", "--snapshotter", stargz.PLUGIN, esgz)
    out = cluster.ctr(*run, "t1", "/bin/busybox", "cat", "/etc/hello")
    assert out.stdout.splitlines()[0] == HELLO
    gone = cluster.ctr(*run, "t2", "/bin/busybox", "ls", "/etc/gone", check=False)
    assert gone.returncode != 0, "the whiteout of the top layer did not hide /etc/gone"


@pytest.mark.root
def test_stargz_tree_is_overlayfs_tree(
    cluster: Cluster, registry: Registry, tmp_path: Path
) -> None:
    """What the bench's tree check sees: the same tree, mtimes whole seconds here."""
    ref, esgz = _esgz_image(cluster, registry, tmp_path)
    cluster.forget_images()
    cluster.ctr("images", "pull", "--plain-http", ref)
    rpull = ["ctr-remote", "--address", str(cluster.ctd_sock), "images", "rpull"]
    subprocess.run([*rpull, "--plain-http", "--snapshotter", stargz.PLUGIN, esgz], check=True)
    views = {}
    for snapshotter, image in (("overlayfs", ref), (stargz.PLUGIN, esgz)):
        target = tmp_path / f"view-{snapshotter}"
        target.mkdir()
        with cluster.image_view(snapshotter, image, target):
            views[snapshotter] = trees.snapshot(target)
    found = trees.compare(views["overlayfs"], views[stargz.PLUGIN])
    assert found.same, found.diffs
    # busybox_layers' mtimes are whole seconds; its symlink's tar header says 0644
    assert found.known == {trees.SYMLINK_MODE: 1}
    assert "etc/hello" in views[stargz.PLUGIN].entries
    assert "etc/gone" not in views[stargz.PLUGIN].entries


def test_tree_comparison_counts_known_differences_and_fails_others() -> None:
    file = trees.Entry("reg", 0o644, 0, 0, 3, "ab", None, 0, (), 1_700_000_000_750_000_000)
    link = trees.Entry("lnk", 0o777, 0, 0, 0, None, "f", 0, (), 1_700_000_000_000_000_000)
    want = trees.Tree({"f": file, "l": link})
    assert trees.compare(want, trees.Tree({"f": file, "l": link})).same
    rounded = replace(file, mtime_ns=1_700_000_000_000_000_000)
    found = trees.compare(want, trees.Tree({"f": rounded, "l": replace(link, mode=0o644)}))
    assert found.same and found.known == {trees.MTIME_ROUNDED: 1, trees.SYMLINK_MODE: 1}
    found = trees.compare(want, trees.Tree({"f": replace(rounded, mode=0o600), "l": link}))
    assert found.diffs == [
        f"f: mode: expected {0o644}, got {0o600}",
        "f: mtime_ns: expected 1700000000750000000, got 1700000000000000000",
    ]
    found = trees.compare(want, trees.Tree({"f": replace(file, mtime_ns=1), "l": link}))
    assert found.diffs == ["f: mtime_ns: expected 1700000000750000000, got 1"]
    found = trees.compare(want, trees.Tree({"f": replace(file, sha256="cd"), "l": link}))
    assert found.diffs == ["f: sha256: expected 'ab', got 'cd'"]
    assert trees.compare(want, trees.Tree({"l": link})).diffs == ["missing: f (reg)"]


def test_missing_packages_make_the_peer_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(stargz.PACKAGES, stargz.LIBRARY_PACKAGE, "/nonexistent/stargz-library")
    reason = stargz.unavailable()
    assert reason is not None and stargz.LIBRARY_PACKAGE in reason
    with pytest.raises(stargz.StargzUnavailable, match=stargz.LIBRARY_PACKAGE):
        stargz.build()
    daemon, missing = coldstart.stargz_daemon()
    assert daemon is None and missing is not None
    assert coldstart._peer_label(None, missing).startswith("not available (stargz-snapshotter:")


@pytest.mark.root
@pytest.mark.slow
def test_coldstart_runs_stargz_beside_cafs(tmp_path: Path, daemon: Path) -> None:
    """The quick coldstart has the peer's contenders, with bytes, requests and tree checks."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    cmd = [sys.executable, "-m", "bench", "run", "--quick", "--repeat", "1", "--scenario"]
    cmd += ["coldstart", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert list(work.iterdir()) == []
    (scenario,) = json.loads((out / "results.json").read_text())["scenarios"]
    assert scenario["error"] is None, scenario["error"]
    keys = {s["key"] for s in scenario["series"]}
    for group in (coldstart.COLD, coldstart.REQUESTS, coldstart.BYTES):
        assert f"{group}: {coldstart.STARGZ}" in keys
    assert f"{coldstart.REQUESTS}: {coldstart.LAZY}" in keys
    checked = scenario["params"]["trees"]
    assert checked[coldstart.LAZY] == "same as overlayfs"
    assert checked[coldstart.STARGZ].startswith("same as overlayfs")
