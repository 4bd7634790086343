"""End to end, as root: Kubernetes' path. containerd 1.6's CRI plugin, configured as issue 4
tells users to (`snapshotter = "cafs"`, `disable_snapshot_annotations = false`), driven over
gRPC with the kubelet's own API (runtime.v1 RuntimeService and ImageService).

A multi-layer busybox image is pushed to a local docker-registry and `cafs index`ed. CRI's
PullImage of it is the remote-snapshot handshake: containerd's unpacker calls Prepare with
`containerd.io/snapshot.ref` and the `cri.*` labels for every layer, cafs answers
ALREADY_EXISTS, and no layer is downloaded. A pod (host network, so no CNI; its sandbox
image a local "pause" imported with ctr) then runs a container from it, whose output CRI
writes to the log file asked for. Removing the container, the pod and the image leaves no
cafs mount or daemon behind. An image never indexed is pulled and run the same way, through
the snapshotter's overlayfs fallback.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import Registry
from ctdcluster import CAFS, Cluster, require_containerd, write_archive, write_layout

from bench.imagebuild import Entry, ImageInfo, build_layout
from bench.registrypush import push_layout
from snapshotter.api import cri_runtime_pb2 as cri
from snapshotter.api import cri_runtime_pb2_grpc as cri_grpc
from snapshotter.layout import Layout

pytestmark = [pytest.mark.root, pytest.mark.slow]

E = Entry
NS = "k8s.io"  # CRI's containerd namespace
PAUSE_REF = "example.com/cafs/pause:1"
HELLO = "hello from cafs through CRI\n"
RPC_TIMEOUT = 60


def busybox_base(marker: str) -> list[Entry]:
    """busybox and the directories a container needs; `marker` makes the layer (and so its
    chain) unique to one image, so no image finds another's layer already unpacked."""
    return [
        *[E(d, "dir") for d in ("bin", "etc", "tmp", "proc", "dev", "sys")],
        E.from_host("bin/busybox", "/bin/busybox"),
        E("bin/sh", "symlink", linkname="busybox"),
        E(f"etc/{marker}", data=b"base\n"),
    ]


def indexed_layers() -> list[list[Entry]]:
    """Three layers; the second whites out a file of the first."""
    return [
        busybox_base("gone"),
        [E("etc", "dir"), E("etc/hello", data=HELLO.encode()), E("etc/gone", "whiteout")],
        [E("etc", "dir"), E("etc/third", data=b"third layer\n")],
    ]


def plain_layers() -> list[list[Entry]]:
    return [busybox_base("plain-base"), [E("etc", "dir"), E("etc/plain", data=b"plain\n")]]


def cri_config(base: Path, registry: Registry) -> str:
    """The CRI plugin as issue 4 configures it, plus what a test node needs: a local pause
    image, no CNI (pods use the host network), plain HTTP to the local registry, an OOM
    score it may set in a container (restrict_oom_score_adj), and snapshot usage collected
    every second rather than every ten."""
    hosts = base / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        f'server = "{registry.url}"\n'
        f'[host."{registry.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    for d in ("cni-bin", "cni-conf"):
        (base / d).mkdir()
    return (
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        f'  sandbox_image = "{PAUSE_REF}"\n'
        '  stream_server_address = "127.0.0.1"\n'
        '  stream_server_port = "0"\n'
        "  restrict_oom_score_adj = true\n"
        "  stats_collect_period = 1\n"  # CRI asks every snapshot's Usage each second
        '  [plugins."io.containerd.grpc.v1.cri".containerd]\n'
        '    snapshotter = "cafs"\n'
        "    disable_snapshot_annotations = false\n"
        '  [plugins."io.containerd.grpc.v1.cri".cni]\n'
        f'    bin_dir = "{base / "cni-bin"}"\n'
        f'    conf_dir = "{base / "cni-conf"}"\n'
        '  [plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'    config_path = "{base / "certs.d"}"\n'
    )


@dataclass
class Node:
    """A kubelet's view of the node: the CRI services, plus the test's own ways in."""

    cluster: Cluster
    runtime: cri_grpc.RuntimeServiceStub
    images: cri_grpc.ImageServiceStub
    indexed: ImageInfo
    indexed_ref: str
    plain: ImageInfo
    plain_ref: str

    def ctr(self, *args: str) -> str:
        return self.cluster.ctr("-n", NS, *args).stdout

    def content(self) -> set[str]:
        return set(self.ctr("content", "ls", "-q").split())

    def snapshots(self) -> dict[str, tuple[bool, dict[str, str]]]:
        """Committed snapshots by the name containerd knows them by (a chain ID), with
        (remote, labels) as the snapshotter itself records them. The snapshotter sees
        containerd's backend keys: a remote snapshot is named by its chain ID, one that
        containerd committed after unpacking a layer `<namespace>/<n>/<chain ID>`."""
        db = Layout(self.cluster.root).db_path
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT key, remote, labels FROM snapshots WHERE kind = 3"
            ).fetchall()
        return {
            key.rsplit("/", 1)[-1]: (bool(remote), json.loads(labels))
            for key, remote, labels in rows
        }

    def image_status(self, ref: str) -> cri.Image | None:
        resp = self.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=RPC_TIMEOUT
        )
        return resp.image if resp.HasField("image") else None


def _poll(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Node]:
    require_containerd()
    base = tmp_path_factory.mktemp("cri")
    # Where contrib/README.md puts the snapshotter's root for Kubernetes: the directory CRI
    # names as the image filesystem of a snapshotter called cafs (see the ImageFsInfo test).
    c = Cluster(base, root=base / "ctd-root" / "io.containerd.snapshotter.v1.cafs")
    tag = uuid.uuid4().hex[:8]  # the registry is the session's: repositories of our own
    indexed = build_layout(c.base / "images", "indexed", indexed_layers(), {"Env": ["PATH=/bin"]})
    plain = build_layout(c.base / "images", "plain", plain_layers(), {"Env": ["PATH=/bin"]})
    indexed_ref = f"{registry.host}/cri/indexed:{tag}"
    plain_ref = f"{registry.host}/cri/plain:{tag}"
    push_layout(c.base / "images", "indexed", registry.host, "cri/indexed", tag)
    push_layout(c.base / "images", "plain", registry.host, "cri/plain", tag)
    subprocess.run(
        [*CAFS, "index", indexed_ref, "--plain-http", "--store", c.store_url, "-q"],
        check=True, env=c.env, timeout=120,
    )
    pause = [("bin", "dir", b""), ("bin/busybox", "file", Path("/bin/busybox").read_bytes())]
    write_layout(
        c.base / "pause", PAUSE_REF, [pause],
        config={"Entrypoint": ["/bin/busybox", "sleep", "86400"]},
    )
    write_archive(c.base / "pause", c.base / "pause.tar")
    channel = None
    try:
        c.start_snapshotter()
        c.start_containerd(cri=cri_config(c.base, registry))
        # The sandbox image, as an air-gapped node gets it: imported into CRI's namespace
        # and unpacked with cafs (never indexed: the overlayfs fallback).
        c.ctr("-n", NS, "images", "import", "--snapshotter", "cafs", str(c.base / "pause.tar"))
        channel = grpc.insecure_channel(f"unix://{c.ctd_sock}")
        n = Node(
            c, cri_grpc.RuntimeServiceStub(channel), cri_grpc.ImageServiceStub(channel),
            indexed, indexed_ref, plain, plain_ref,
        )
        version = n.runtime.Version(cri.VersionRequest(version="v1"), timeout=RPC_TIMEOUT)
        assert version.runtime_api_version == "v1", version
        # CRI learns of the import from containerd's events: wait until it sees the image.
        _poll(lambda: n.image_status(PAUSE_REF) is not None, "CRI sees the pause image")
        yield n
    finally:
        if channel is not None:
            channel.close()
        c.teardown()


def _pod_config(base: Path, name: str) -> cri.PodSandboxConfig:
    logs = base / "pods" / name
    logs.mkdir(parents=True)
    host = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="default"),
        log_directory=str(logs),
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=host)
        ),
    )


def _log_lines(path: Path) -> list[str]:
    """CRI's log format: `<RFC 3339 time> <stream> <F|P> <text>` per line."""
    if not path.exists():
        return []
    return [line.split(" ", 3)[3] for line in path.read_text().splitlines() if line]


def run_pod(n: Node, image: str, name: str, script: str) -> list[str]:
    """What the kubelet does for a one-container pod that runs to completion: sandbox,
    create, start, wait for exit, then stop and remove both. Returns the container's log."""
    pod = _pod_config(n.cluster.base, name)
    sandbox = n.runtime.RunPodSandbox(
        cri.RunPodSandboxRequest(config=pod), timeout=RPC_TIMEOUT
    ).pod_sandbox_id
    container = ""
    try:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name="main"),
            image=cri.ImageSpec(image=image),
            command=["/bin/sh", "-c", script],
            log_path="main/0.log",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=pod.linux.security_context.namespace_options
                )
            ),
        )
        container = n.runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=sandbox, config=config, sandbox_config=pod),
            timeout=RPC_TIMEOUT,
        ).container_id
        n.runtime.StartContainer(
            cri.StartContainerRequest(container_id=container), timeout=RPC_TIMEOUT
        )

        def status() -> cri.ContainerStatus:
            return n.runtime.ContainerStatus(
                cri.ContainerStatusRequest(container_id=container), timeout=RPC_TIMEOUT
            ).status

        _poll(lambda: status().state == cri.CONTAINER_EXITED, f"{name} exits")
        done = status()
        log = Path(done.log_path)
        assert log == Path(pod.log_directory) / "main" / "0.log"
        lines = _log_lines(log)
        assert done.exit_code == 0, (done.exit_code, done.reason, done.message, lines)
        return lines
    finally:
        if container:
            n.runtime.StopContainer(
                cri.StopContainerRequest(container_id=container, timeout=0), timeout=RPC_TIMEOUT
            )
            n.runtime.RemoveContainer(
                cri.RemoveContainerRequest(container_id=container), timeout=RPC_TIMEOUT
            )
        n.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=sandbox), timeout=RPC_TIMEOUT
        )
        n.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=sandbox), timeout=RPC_TIMEOUT
        )


def assert_nothing_left(n: Node) -> None:
    """No pod, no container, and no mount at all under the test's directory: no FUSE
    mount, no container rootfs overlay, no sandbox /dev/shm."""
    assert not n.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=RPC_TIMEOUT).items
    containers = n.runtime.ListContainers(cri.ListContainersRequest(), timeout=RPC_TIMEOUT)
    assert not containers.containers
    assert n.cluster.mounts() == []


def test_image_filesystem_is_the_snapshotters_root(node: Node) -> None:
    """The kubelet's image GC and ephemeral-storage checks stat the mountpoint CRI reports
    (containerd 1.6/1.7 name it `<containerd root>/io.containerd.snapshotter.v1.<name>`,
    whatever the snapshotter's real root), and CRI fills the usage from the snapshotter's
    Usage, polled for every snapshot."""

    def image_fs() -> cri.FilesystemUsage:
        info = node.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=RPC_TIMEOUT)
        assert len(info.image_filesystems) == 1
        return info.image_filesystems[0]

    assert Path(image_fs().fs_id.mountpoint) == node.cluster.root
    assert node.cluster.root.is_dir()
    _poll(lambda: image_fs().used_bytes.value > 0, "CRI has the snapshots' usage")
    # The pause image's one layer, as unpacked by the overlay fallback: busybox and all.
    assert image_fs().used_bytes.value >= Path("/bin/busybox").stat().st_size


def test_pull_of_an_indexed_image_downloads_no_layer_and_its_pod_runs(node: Node) -> None:
    n, info = node, node.indexed
    resp = n.images.PullImage(
        cri.PullImageRequest(image=cri.ImageSpec(image=n.indexed_ref)), timeout=RPC_TIMEOUT
    )
    assert resp.image_ref == info.config_digest  # CRI's image id

    # The handshake: every layer's chain became a remote snapshot, with CRI's labels.
    remote = {name: labels for name, (is_remote, labels) in n.snapshots().items() if is_remote}
    assert sorted(remote) == sorted(info.chain_ids)
    for i, chain in enumerate(info.chain_ids):
        labels = remote[chain]
        assert labels["containerd.io/snapshot.ref"] == chain
        assert labels["containerd.io/snapshot/cri.image-ref"] == n.indexed_ref
        assert labels["containerd.io/snapshot/cri.layer-digest"] == info.layer_digests[i]
        assert labels["containerd.io/snapshot/cri.manifest-digest"] == info.manifest_digest
    listing = n.ctr("snapshots", "--snapshotter", "cafs", "ls")
    for chain in info.chain_ids:
        assert f"{chain} " in listing  # containerd's view: KEY PARENT KIND
    assert listing.count("Committed") == len(info.chain_ids) + 1  # and the pause image's
    # ...and containerd fetched the manifest and config, never a layer.
    content = n.content()
    assert {info.manifest_digest, info.config_digest} <= content
    assert not set(info.layer_digests) & content

    lines = run_pod(
        n, n.indexed_ref, "indexed",
        "cat /etc/hello /etc/third; test -e /etc/gone || echo gone is gone",
    )
    assert lines == [HELLO.strip(), "third layer", "gone is gone"]
    assert len(n.cluster.daemons()) == 1  # the top chain's FUSE mount served the container
    assert not set(info.layer_digests) & n.content()  # running it fetched nothing either

    n.images.RemoveImage(
        cri.RemoveImageRequest(image=cri.ImageSpec(image=n.indexed_ref)), timeout=RPC_TIMEOUT
    )
    assert n.image_status(n.indexed_ref) is None
    # CRI deletes the last reference synchronously: containerd's GC has removed the chain.
    assert not set(info.chain_ids) & set(n.snapshots())
    _poll(lambda: not n.cluster.daemons(), "the cafs daemons exit")
    assert_nothing_left(n)


def test_an_image_never_indexed_runs_through_the_overlay_fallback(node: Node) -> None:
    n, info = node, node.plain
    n.images.PullImage(
        cri.PullImageRequest(image=cri.ImageSpec(image=n.plain_ref)), timeout=RPC_TIMEOUT
    )
    snapshots = n.snapshots()
    assert [snapshots[chain][0] for chain in info.chain_ids] == [False, False]  # unpacked
    assert set(info.layer_digests) <= n.content()  # the layers were downloaded this time

    assert run_pod(n, n.plain_ref, "plain", "cat /etc/plain /etc/plain-base") == [
        "plain", "base",
    ]
    assert n.cluster.daemons() == []
    n.images.RemoveImage(
        cri.RemoveImageRequest(image=cri.ImageSpec(image=n.plain_ref)), timeout=RPC_TIMEOUT
    )
    assert not set(info.chain_ids) & set(n.snapshots())
    assert_nothing_left(n)

