"""The snapshotter driven over gRPC with the generated stubs, as containerd drives it.

The server runs in-process on a unix socket with a fake mounter standing in for the cafs
FUSE daemons (it "mounts" a chain by writing a marker into the mountpoint), so every RPC's
semantics and error codes, and the remote-snapshot handshake, are checked without FUSE.
Tests marked `root` also make the overlay mounts the snapshotter returns.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from snapshotter.api import containerd_snapshots_pb2 as pb
from snapshotter.api import containerd_snapshots_pb2_grpc as pb_grpc
from snapshotter.api import containerd_types_pb2 as types_pb
from snapshotter.errors import MountBusy
from snapshotter.service import Server, prepare_socket
from snapshotter.snapshotter import REF_LABEL, Snapshotter

CAFS = [sys.executable, "-m", "cafs"]
CHAIN_A = "sha256:" + "a" * 64
CHAIN_B = "sha256:" + "b" * 64
CHAIN_X = "sha256:" + "e" * 64  # not indexed
CRI_LABELS = {
    "containerd.io/snapshot/cri.image-ref": "example.com/app:1",
    "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "1" * 64,
}


class FakeMounter:
    """Serves CHAIN_A and CHAIN_B; a mounted chain is a marker file in the mountpoint."""

    def __init__(self, servable: set[str] | None = None) -> None:
        self.servable = {CHAIN_A, CHAIN_B} if servable is None else servable
        self.mounted: dict[Path, str] = {}
        self.busy: set[Path] = set()
        self.calls: list[str] = []
        self.fail = False

    def can_serve(self, chain_id: str) -> bool:
        return chain_id in self.servable

    def mount(self, chain_id: str, mountpoint: Path, labels: Mapping[str, str]) -> int:
        if self.fail:
            raise RuntimeError("store unreachable")
        (mountpoint / "chain").write_text(chain_id)
        self.mounted[mountpoint] = chain_id
        self.calls.append(chain_id)
        return 4242

    def is_mounted(self, mountpoint: Path) -> bool:
        return mountpoint in self.mounted

    def unmount(self, mountpoint: Path) -> None:
        if mountpoint in self.busy:
            raise MountBusy(f"{mountpoint} is in use")
        if self.mounted.pop(mountpoint, None):
            (mountpoint / "chain").unlink()

    def die(self, mountpoint: Path) -> None:
        """The daemon is gone: the kernel no longer serves the tree."""
        del self.mounted[mountpoint]


@dataclass
class Env:
    stub: pb_grpc.SnapshotsStub
    sn: Snapshotter
    mounter: FakeMounter
    root: Path
    socket: Path

    def fs(self, key: str) -> Path:
        return self.sn.layout.fs(self.sn.stat(key).id)

    def prepare(self, key: str, parent: str = "", **labels: str) -> list[types_pb.Mount]:
        req = pb.PrepareSnapshotRequest(snapshotter="cafs", key=key, parent=parent, labels=labels)
        return list(self.stub.Prepare(req).mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    def layer(self, name: str, parent: str = "", files: Mapping[str, str] | None = None) -> Path:
        """A committed snapshot holding `files`, made the way containerd unpacks a layer."""
        self.prepare(f"extract {name}", parent)
        fs = self.fs(f"extract {name}")
        for path, text in (files or {}).items():
            (fs / path).write_text(text)
        self.commit(name, f"extract {name}")
        return fs

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def list(self, *filters: str) -> list[pb.Info]:
        request = pb.ListSnapshotsRequest(snapshotter="cafs", filters=list(filters))
        return [info for resp in self.stub.List(request) for info in resp.info]

    def handshake(self, chain: str, parent: str = "") -> grpc.RpcError:
        labels = {REF_LABEL: chain, **CRI_LABELS}
        with pytest.raises(grpc.RpcError) as err:
            self.prepare(f"default/{time.monotonic_ns()}/extract-1-AbCd {chain}", parent, **labels)
        return err.value


def code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()


def start(root: Path, sock: Path, mounter: FakeMounter) -> tuple[Server, grpc.Channel, Env]:
    sn = Snapshotter(root, mounter)
    server = Server(sn, sock, workers=4)
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    return server, channel, Env(pb_grpc.SnapshotsStub(channel), sn, mounter, root, sock)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    server, channel, e = start(tmp_path / "root", tmp_path / "s.sock", FakeMounter())
    yield e
    channel.close()
    server.stop(grace=0)


# -- Prepare / View / Mounts -------------------------------------------------------------------


def test_prepare_without_parent_is_a_rw_bind_and_view_ro(env: Env) -> None:
    (mount,) = env.prepare("default/1/c1")
    assert (mount.type, mount.source, list(mount.options)) == (
        "bind",
        str(env.fs("default/1/c1")),
        ["rw", "rbind"],
    )
    assert mount.target == ""
    (view,) = env.stub.View(pb.ViewSnapshotRequest(key="default/2/v1")).mounts
    assert list(view.options) == ["ro", "rbind"]
    assert env.fs("default/1/c1").parent.name.isdigit()  # keys are never paths


def test_prepare_errors(env: Env) -> None:
    env.prepare("k")
    with pytest.raises(grpc.RpcError) as err:
        env.prepare("k")
    assert code(err) == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        env.prepare("")
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        env.prepare("k2", "no-such-parent")
    assert code(err) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        env.prepare("k3", "k")  # an active parent
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        env.prepare("k4", **{"x": "v" * 4096})
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT


def test_overlay_mounts_follow_containerd_rules(env: Env) -> None:
    low = env.layer("ns/1/l1", files={"a": "1"})
    mid = env.layer("ns/2/l2", "ns/1/l1")
    (mount,) = env.prepare("ns/3/c", "ns/2/l2")
    fs, work = env.fs("ns/3/c"), env.fs("ns/3/c").parent / "work"
    assert (mount.type, mount.source) == ("overlay", "overlay")
    opts = [o for o in mount.options if o != "index=off"]
    assert opts == [f"workdir={work}", f"upperdir={fs}", f"lowerdir={mid}:{low}"]
    assert work.is_dir()
    (one,) = env.stub.View(pb.ViewSnapshotRequest(key="v1", parent="ns/1/l1")).mounts
    assert (one.type, one.source, list(one.options)) == ("bind", str(low), ["ro", "rbind"])
    (two,) = env.stub.View(pb.ViewSnapshotRequest(key="v2", parent="ns/2/l2")).mounts
    assert [o for o in two.options if o != "index=off"] == [f"lowerdir={mid}:{low}"]
    again = env.stub.Mounts(pb.MountsRequest(key="ns/3/c")).mounts
    assert list(again) == [mount]


def test_mounts_errors(env: Env) -> None:
    env.layer("l1")
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Mounts(pb.MountsRequest(key="l1"))
    assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Mounts(pb.MountsRequest(key="nope"))
    assert code(err) == grpc.StatusCode.NOT_FOUND


# -- Commit / Stat / Update / Usage ------------------------------------------------------------


def test_commit_replaces_labels_and_measures_usage(env: Env) -> None:
    env.prepare("a", **{"containerd.io/snapshot/x": "1"})
    (env.fs("a") / "data").write_bytes(os.urandom(10000))
    size, inodes = env.sn.usage("a")
    assert size >= 10000 and inodes == 2
    env.commit("layer", "a", {"containerd.io/snapshot/y": "2"})
    info = env.stat("layer")
    assert info.kind == pb.COMMITTED and info.name == "layer"
    assert dict(info.labels) == {"containerd.io/snapshot/y": "2"}
    usage = env.stub.Usage(pb.UsageRequest(key="layer"))
    assert (usage.size, usage.inodes) == (size, inodes)
    with pytest.raises(grpc.RpcError) as err:
        env.stat("a")
    assert code(err) == grpc.StatusCode.NOT_FOUND


def test_commit_errors(env: Env) -> None:
    env.layer("done")
    env.prepare("active")
    env.prepare("other")
    for name, key, expected in [
        ("n", "missing", grpc.StatusCode.NOT_FOUND),
        ("n", "done", grpc.StatusCode.FAILED_PRECONDITION),
        ("done", "active", grpc.StatusCode.ALREADY_EXISTS),
        ("", "active", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            env.commit(name, key)
        assert code(err) == expected, (name, key)
    env.stub.View(pb.ViewSnapshotRequest(key="view", parent="done"))
    with pytest.raises(grpc.RpcError) as err:
        env.commit("n", "view")
    assert code(err) == grpc.StatusCode.FAILED_PRECONDITION


def test_stat_reports_everything(env: Env) -> None:
    env.layer("base")
    before = time.time()
    env.prepare("c", "base", **{"l": "v"})
    info = env.stat("c")
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "c",
        "base",
        pb.ACTIVE,
        {"l": "v"},
    )
    assert abs(info.created_at.seconds - before) < 5 and info.updated_at == info.created_at
    with pytest.raises(grpc.RpcError) as err:
        env.stat("missing")
    assert code(err) == grpc.StatusCode.NOT_FOUND


def _update(env: Env, name: str, labels: dict[str, str], *paths: str) -> pb.Info:
    mask = field_mask_pb2.FieldMask(paths=list(paths)) if paths else None
    req = pb.UpdateSnapshotRequest(info=pb.Info(name=name, labels=labels), update_mask=mask)
    return env.stub.Update(req).info


def test_update_labels(env: Env) -> None:
    env.prepare("s", **{"a": "1", "b": "2"})
    created = env.stat("s").created_at
    info = _update(env, "s", {"b": "20", "c": "3"}, "labels.b")
    assert dict(info.labels) == {"a": "1", "b": "20"}
    assert info.created_at == created and info.kind == pb.ACTIVE
    assert dict(_update(env, "s", {}, "labels.a").labels) == {"b": "20"}  # absent: unset
    assert dict(_update(env, "s", {"z": "9"}, "labels").labels) == {"z": "9"}
    assert dict(_update(env, "s", {"y": "8"}).labels) == {"y": "8"}  # no mask: all mutable
    assert dict(env.stat("s").labels) == {"y": "8"}
    for name, paths, expected in [
        ("s", ("parent",), grpc.StatusCode.INVALID_ARGUMENT),
        ("s", ("kind",), grpc.StatusCode.INVALID_ARGUMENT),
        ("missing", ("labels",), grpc.StatusCode.NOT_FOUND),
        ("", (), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            _update(env, name, {"k": "v"}, *paths)
        assert code(err) == expected


def test_usage(env: Env) -> None:
    env.prepare("a")
    (env.fs("a") / "f").write_bytes(b"x" * 8192)
    first = env.stub.Usage(pb.UsageRequest(key="a"))
    assert first.size >= 8192 and first.inodes == 2
    env.stub.View(pb.ViewSnapshotRequest(key="v"))
    assert env.stub.Usage(pb.UsageRequest(key="v")).size == 0
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Usage(pb.UsageRequest(key="missing"))
    assert code(err) == grpc.StatusCode.NOT_FOUND


def test_usage_of_an_active_snapshot_is_fresh(env: Env) -> None:
    """As overlayfs: what a container just wrote counts at once (CRI evicts on it)."""
    env.prepare("a")
    before = env.stub.Usage(pb.UsageRequest(key="a"))
    (env.fs("a") / "big").write_bytes(b"x" * (1 << 20))
    after = env.stub.Usage(pb.UsageRequest(key="a"))
    assert after.size >= before.size + (1 << 20) and after.inodes == before.inodes + 1
    (env.fs("a") / "big").unlink()
    assert env.stub.Usage(pb.UsageRequest(key="a")) == before


# -- Remove / List / Cleanup -------------------------------------------------------------------


def test_remove(env: Env) -> None:
    env.layer("base")
    env.prepare("child", "base")
    directory = env.fs("child").parent
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Remove(pb.RemoveSnapshotRequest(key="base"))
    assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
    env.stub.Remove(pb.RemoveSnapshotRequest(key="child"))
    assert not directory.exists()
    env.stub.Remove(pb.RemoveSnapshotRequest(key="base"))
    assert env.list() == []
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Remove(pb.RemoveSnapshotRequest(key="base"))
    assert code(err) == grpc.StatusCode.NOT_FOUND


def test_list_filters_and_batches(env: Env) -> None:
    env.layer("base", files={})
    env.stub.Update(
        pb.UpdateSnapshotRequest(
            info=pb.Info(name="base", labels={"containerd.io/snapshot.ref": "x"})
        )
    )
    for i in range(130):
        env.prepare(f"ns/{i}/c", "base")
    assert len(env.list()) == 131
    assert [i.name for i in env.list('labels."containerd.io/snapshot.ref"==x,parent==""')] == [
        "base"
    ]
    assert {i.name for i in env.list("kind==committed", "name==ns/7/c")} == {"base", "ns/7/c"}
    assert len(env.list("kind==active,parent==base")) == 130


def test_malformed_walk_filter_is_invalid_argument(env: Env) -> None:
    """As overlayfs (containerd's filters.Parse): refused, not read as "everything"."""
    env.layer("base", files={})
    for malformed in ("this is not a filter ===", 'labels."unterminated', "name==a,"):
        with pytest.raises(grpc.RpcError) as err:
            env.list("kind==committed", malformed)
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "filters: parse error" in (err.value.details() or "")


def test_cleanup_removes_only_orphans(env: Env) -> None:
    env.prepare("live")
    orphan = env.sn.layout.snapshots_dir / "999"
    (orphan / "fs").mkdir(parents=True)
    (orphan / "fs" / "f").write_text("x")
    stranger = env.sn.layout.snapshots_dir / "not-ours"
    stranger.mkdir()
    env.stub.Cleanup(pb.CleanupRequest(snapshotter="cafs"))
    assert not orphan.exists() and stranger.exists() and env.fs("live").is_dir()


# -- remote snapshots --------------------------------------------------------------------------


def test_remote_handshake(env: Env) -> None:
    err = env.handshake(CHAIN_A)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    # containerd's metadata layer now looks the target up exactly like this.
    found = env.list(f'labels."{REF_LABEL}"=={CHAIN_A},parent==""')
    assert len(found) == 1
    info = found[0]
    assert info.kind == pb.COMMITTED and info.name == CHAIN_A and info.parent == ""
    assert dict(info.labels) == {REF_LABEL: CHAIN_A, **CRI_LABELS}
    assert env.stat(CHAIN_A).kind == pb.COMMITTED
    assert env.mounter.calls == []  # nothing mounted until something stands on it

    again = env.handshake(CHAIN_A)  # another namespace, same chain and parent
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(env.list()) == 1

    env.handshake(CHAIN_B, parent=CHAIN_A)
    (b,) = env.list(f'labels."{REF_LABEL}"=={CHAIN_B},parent=="{CHAIN_A}"')
    assert (b.name, b.parent, b.kind) == (CHAIN_B, CHAIN_A, pb.COMMITTED)


def test_container_on_remote_chain_mounts_only_the_top(env: Env) -> None:
    env.handshake(CHAIN_A)
    env.handshake(CHAIN_B, parent=CHAIN_A)
    (mount,) = env.prepare("default/9/c1", CHAIN_B)
    top = env.fs(CHAIN_B)
    assert mount.type == "overlay"
    assert [o for o in mount.options if o.startswith("lowerdir=")] == [f"lowerdir={top}"]
    assert env.mounter.calls == [CHAIN_B]
    assert (top / "chain").read_text() == CHAIN_B
    env.stub.Mounts(pb.MountsRequest(key="default/9/c1"))
    assert env.mounter.calls == [CHAIN_B]  # live: not mounted twice
    (view,) = env.stub.View(pb.ViewSnapshotRequest(key="v", parent=CHAIN_A)).mounts
    assert (view.type, view.source) == ("bind", str(env.fs(CHAIN_A)))
    assert env.mounter.calls == [CHAIN_B, CHAIN_A]


def test_unindexed_layers_on_a_remote_base_stop_at_it(env: Env) -> None:
    env.handshake(CHAIN_A)
    # Not indexed: containerd gets an ordinary active snapshot to extract into.
    mounts = env.prepare("default/3/extract-2 x", CHAIN_A, **{REF_LABEL: CHAIN_X})
    assert mounts[0].type == "overlay"
    env.commit("default/4/" + CHAIN_X, "default/3/extract-2 x")
    (mount,) = env.prepare("default/5/c", "default/4/" + CHAIN_X)
    lower = next(o for o in mount.options if o.startswith("lowerdir="))
    assert lower == f"lowerdir={env.fs('default/4/' + CHAIN_X)}:{env.fs(CHAIN_A)}"


def test_remote_mount_failure_is_unavailable_and_leaves_nothing(env: Env) -> None:
    env.handshake(CHAIN_A)
    env.mounter.fail = True
    with pytest.raises(grpc.RpcError) as err:
        env.prepare("c", CHAIN_A)
    assert code(err) == grpc.StatusCode.UNAVAILABLE
    assert [i.name for i in env.list()] == [CHAIN_A]
    assert env.sn.layout.snapshot_ids_on_disk() == [env.sn.stat(CHAIN_A).id]


def test_mounts_remount_a_dead_remote(env: Env) -> None:
    env.handshake(CHAIN_A)
    env.prepare("c", CHAIN_A)
    env.mounter.die(env.fs(CHAIN_A))
    env.stub.Mounts(pb.MountsRequest(key="c"))
    assert env.mounter.calls == [CHAIN_A, CHAIN_A]
    assert env.mounter.is_mounted(env.fs(CHAIN_A))


def test_remove_remote_unmounts_unless_busy(env: Env) -> None:
    env.handshake(CHAIN_A)
    env.prepare("c", CHAIN_A)
    fs = env.fs(CHAIN_A)
    with pytest.raises(grpc.RpcError) as err:
        env.stub.Remove(pb.RemoveSnapshotRequest(key=CHAIN_A))
    assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert env.mounter.is_mounted(fs)
    env.stub.Remove(pb.RemoveSnapshotRequest(key="c"))
    env.mounter.busy.add(fs)  # e.g. a shell with its cwd in the mount
    env.stub.Remove(pb.RemoveSnapshotRequest(key=CHAIN_A))
    assert env.list() == [] and env.mounter.is_mounted(fs) and fs.is_dir()
    env.stub.Cleanup(pb.CleanupRequest())
    assert fs.is_dir()  # still busy: still untouched
    env.mounter.busy.clear()
    env.stub.Cleanup(pb.CleanupRequest())
    assert not env.mounter.is_mounted(fs) and not fs.parent.exists()


def test_restart_readopts_live_and_remounts_used_dead_mounts(tmp_path: Path) -> None:
    mounter = FakeMounter()
    server, channel, env = start(tmp_path / "root", tmp_path / "s.sock", mounter)
    env.handshake(CHAIN_A)
    env.handshake(CHAIN_B, parent=CHAIN_A)
    env.prepare("c", CHAIN_B)  # a running container on B
    env.stub.View(pb.ViewSnapshotRequest(key="v", parent=CHAIN_A))
    fs_a, fs_b = env.fs(CHAIN_A), env.fs(CHAIN_B)
    channel.close()
    server.stop(grace=0)

    # Live daemons outlive the snapshotter: they are adopted, not remounted.
    again = FakeMounter()
    again.mounted = dict(mounter.mounted)
    server, channel, env = start(tmp_path / "root", tmp_path / "s.sock", again)
    assert env.sn.recover() == (2, 0) and again.calls == []
    channel.close()
    server.stop(grace=0)

    # Dead ones that something stands on are remounted from the persisted labels.
    fresh = FakeMounter()
    server, channel, env = start(tmp_path / "root", tmp_path / "s.sock", fresh)
    assert env.sn.recover() == (0, 2)
    assert sorted(fresh.calls) == sorted([CHAIN_A, CHAIN_B])
    assert fresh.is_mounted(fs_a) and fresh.is_mounted(fs_b)
    assert dict(env.stat(CHAIN_B).labels)[REF_LABEL] == CHAIN_B
    channel.close()
    server.stop(grace=0)


# -- the server ----------------------------------------------------------------------------------


def test_socket_is_0660_and_stale_sockets_are_replaced(env: Env, tmp_path: Path) -> None:
    assert stat.S_IMODE(env.socket.stat().st_mode) == 0o660
    with pytest.raises(RuntimeError, match="already serving"):
        prepare_socket(env.socket)
    import socket as socketlib

    stale = tmp_path / "stale.sock"
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.bind(str(stale))
    prepare_socket(stale)
    assert not stale.exists()


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    args = ["snapshotter", "--root", str(tmp_path / "r"), "--address", str(sock)]
    args += ["--store", f"file://{tmp_path / 'store'}"]
    proc = subprocess.Popen([*CAFS, *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            assert list(pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest())) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    assert not sock.exists()
    assert (tmp_path / "r" / "metadata.db").exists()


def test_sigterm_removes_the_pull_socket_and_a_planted_file_stops_the_start(
        tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    args = ["snapshotter", "--root", str(tmp_path / "r"), "--address", str(sock),
            "--store", f"file://{tmp_path / 'store'}", "--no-mount-server"]
    proc = subprocess.Popen([*CAFS, *args], stderr=subprocess.PIPE)
    pull_sock = Path(f"{sock}.pull")
    try:
        deadline = time.monotonic() + 20
        while not pull_sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stat.S_IMODE(pull_sock.stat().st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    assert not pull_sock.exists() and not sock.exists()
    pull_sock.write_text("planted\n")  # not a socket: refused, left alone, nothing served
    res = subprocess.run([*CAFS, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "is not a socket" in res.stderr, res.stderr
    assert pull_sock.read_text() == "planted\n" and not sock.exists()


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    bad_root = ["snapshotter", "--root", str(tmp_path / "file" / "x"), "--address", "/tmp/x.sock"]
    res = subprocess.run([*CAFS, *bad_root], capture_output=True, text=True)
    assert res.returncode != 0 and "cafs snapshotter:" in res.stderr
    bad_pull = ["pull", "nothing:here", "--store", f"file://{tmp_path}/store"]
    bad_pull += ["--address", str(tmp_path / "no.sock")]
    res = subprocess.run([*CAFS, *bad_pull], capture_output=True, text=True)
    assert res.returncode == 1 and "cafs pull:" in res.stderr, res.stderr


# -- real mounts (root) --------------------------------------------------------------------------


def _mount(m: types_pb.Mount, target: Path) -> None:
    opts = ",".join(m.options)
    if m.type == "bind":
        subprocess.run(["mount", "--bind", "-o", opts, m.source, str(target)], check=True)
    else:
        subprocess.run(["mount", "-t", m.type, "-o", opts, m.source, str(target)], check=True)


@pytest.mark.root
def test_returned_overlay_mounts_work(env: Env, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    env.handshake(CHAIN_A)
    env.prepare("c1", CHAIN_A)  # mounts A (the fake writes its marker)
    env.stub.Remove(pb.RemoveSnapshotRequest(key="c1"))
    env.layer("l2", CHAIN_A, files={"added": "by l2"})
    (mount,) = env.prepare("c2", "l2")
    target = tmp_path / "rootfs"
    target.mkdir()
    _mount(mount, target)
    try:
        assert (target / "chain").read_text() == CHAIN_A
        assert (target / "added").read_text() == "by l2"
        (target / "new").write_text("container write")
        (target / "chain").unlink()
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert (env.fs("c2") / "new").read_text() == "container write"
    assert stat.S_ISCHR((env.fs("c2") / "chain").lstat().st_mode)  # an overlay whiteout
    assert (env.fs(CHAIN_A) / "chain").exists()  # the remote tree is untouched
    env.commit("l3", "c2")
    (ro,) = env.stub.View(pb.ViewSnapshotRequest(key="v", parent="l3")).mounts
    _mount(ro, target)
    try:
        assert sorted(p.name for p in target.iterdir()) == ["added", "new"]
        with pytest.raises(OSError):
            (target / "x").write_text("read-only")
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_watchdog_remounts_a_dead_layer_that_containers_use(tmp_path: Path) -> None:
    mounter = FakeMounter()
    server, channel, env = start(tmp_path / "root", tmp_path / "s.sock", mounter)
    env.handshake(CHAIN_A)
    env.prepare("c", CHAIN_A)  # a container on A
    fs_a = env.fs(CHAIN_A)
    assert env.sn.heal() == 0
    mounter.mounted.pop(fs_a)  # its daemon died
    assert env.sn.heal() == 1 and mounter.is_mounted(fs_a) and env.sn.healed == 1
    assert env.sn.heal() == 0
    channel.close()
    server.stop(grace=0)
