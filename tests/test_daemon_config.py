"""A mount daemon runs with the configuration in effect where it was started: the file and
CAFS_* variables reach it from every entry point (`cafs mount`, `cafs run`, the
snapshotter, a mount server), and the daemon says what it took in its `info`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs import config, paths
from cafs.cli.app import main as cafs
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source
from snapshotter import remote
from snapshotter.api import containerd_snapshots_pb2 as pb
from snapshotter.api import containerd_snapshots_pb2_grpc as pb_grpc
from snapshotter.snapshotter import REF_LABEL

CACHE_SIZE = 3 << 30  # "3G" in the file
DEADLINE = 7.5  # CAFS_FETCH_DEADLINE


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file with a cache size, kernel metadata off and a deadline the variable
    overrides."""
    path = tmp_path / "config.toml"
    path.write_text('[cache]\nsize = "3G"\n[mount]\nfetch_deadline = 5\n'
                    'kernel_metadata = "off"\n')
    for s in config.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    monkeypatch.setenv("CAFS_CONFIG", str(path))
    monkeypatch.setenv("CAFS_FETCH_DEADLINE", str(DEADLINE))
    return path


def _assert_took_the_settings(info: dict[str, Any]) -> None:
    assert info["config"]["fetch_deadline"] == DEADLINE
    assert info["fetch_deadline"] == DEADLINE  # what its fetcher runs with
    assert info["config"]["cache_size"] == CACHE_SIZE
    assert info["cache_budget"] == CACHE_SIZE  # not a quarter of the disk
    assert info["config"]["kernel_metadata"] == "off"
    assert info["metadata"] == "fuse"


def _image(tmp_path: Path, entries: list[Entry] | None = None) -> tuple[str, str, list[str]]:
    info = build_layout(tmp_path / "l", "t", [entries or [Entry("f", data=b"hi\n")]])
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path}/l:t"), open_store(url),
                      IndexOptions()).record.ref
    return url, ref, info.chain_ids


def _wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_schema_resolves_file_then_environment_then_flags(settings: Path) -> None:
    cfg = config.daemon_config("ref", "/")
    assert (cfg.cache_size, cfg.fetch_deadline) == (CACHE_SIZE, DEADLINE)
    flagged = config.daemon_config("ref", "/", fetch_deadline=2, cache_size=1 << 20)
    assert (flagged.cache_size, flagged.fetch_deadline) == (1 << 20, 2.0)
    assert config.DaemonConfig.from_json(flagged.to_json()) == flagged
    with pytest.raises(config.ConfigError, match="fetch deadline"):
        config.daemon_config("ref", "/", fetch_deadline=-1)
    with pytest.raises(config.ConfigError, match=r"unknown|malformed"):
        config.DaemonConfig.from_json('{"source": "x", "bogus": 1}')


def _valid() -> dict[str, Any]:
    return config.DaemonConfig(source="ref", mountpoint=Path("/mnt"), state_dir=Path("/s"),
                               store_url="file:///store", cache_dir=Path("/cache")).as_dict()


@pytest.mark.parametrize(("change", "says"), [
    ({"prefetch_parallel": 0}, "prefetch_parallel must be at least 1"),
    ({"max_tasks": -1}, "max_tasks must be at least 1"),
    ({"prefetch_parallel": "16"}, "prefetch_parallel must be int"),
    ({"use_pack": 1}, "use_pack must be bool"),
    ({"fetch_deadline": True}, "fetch_deadline must be float"),
    ({"cache_size": 1.5}, "cache_size must be int | None"),
    ({"mountpoint": "relative"}, "mountpoint must be an absolute path"),
    ({"debug": None}, "debug must be bool"),
])
def test_a_daemon_configuration_is_checked_field_by_field(change: dict[str, Any],
                                                          says: str) -> None:
    with pytest.raises(config.ConfigError, match=says):
        config.DaemonConfig.from_json(json.dumps({**_valid(), **change}))


def test_a_field_with_a_default_may_not_be_left_out() -> None:
    partial = {k: v for k, v in _valid().items() if k != "prefetch_parallel"}
    with pytest.raises(config.ConfigError, match=r"missing.*prefetch_parallel"):
        config.DaemonConfig.from_json(json.dumps(partial))


OPTIONAL = {"cache_size", "record", "profile", "prefetch_processes"}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@settings_(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from([*_valid(), "bogus"]), JSON, max_size=4),
       dropped=st.sets(st.sampled_from(list(_valid())), max_size=2))
def test_any_daemon_configuration_is_taken_or_refused_with_config_error(
        changes: dict[str, Any], dropped: set[str]) -> None:
    data = {k: v for k, v in {**_valid(), **changes}.items() if k not in dropped}
    try:
        cfg = config.DaemonConfig.from_json(json.dumps(data))
    except config.ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert config.DaemonConfig.from_json(cfg.to_json()) == cfg
    typed = {**_valid(), "cache_size": 1, "record": "r", "prefetch_processes": 0}
    for name, value in cfg.as_dict().items():  # each value of its field's type
        assert (value is None and name in OPTIONAL) or type(value) is type(typed[name]), name


@given(st.text() | st.binary().map(lambda b: b.decode("latin-1")))
def test_any_text_is_a_configuration_or_a_config_error(text: str) -> None:
    with contextlib.suppress(config.ConfigError):
        config.DaemonConfig.from_json(text)


def test_bad_settings_are_one_line_errors(settings: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnt").mkdir()
    with pytest.raises(SystemExit) as exit_:
        cafs(["mount", "ref", str(tmp_path / "mnt"), "--fetch-deadline", "0"])
    assert exit_.value.code == 2
    assert "positive number of seconds" in capsys.readouterr().err
    monkeypatch.setenv("CAFS_FETCH_DEADLINE", "soon")
    assert cafs(["mount", "ref", str(tmp_path / "mnt")]) == 1
    err = capsys.readouterr().err
    assert "CAFS_FETCH_DEADLINE" in err and len(err.strip().splitlines()) == 1


@pytest.mark.root
def test_cafs_mount_hands_the_daemon_the_file_and_environment(settings: Path,
                                                               tmp_path: Path) -> None:
    url, ref, _ = _image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert cafs(["mount", "-q", ref, str(mnt), "--store", url,
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    try:
        _assert_took_the_settings(mount.query(mnt, "info"))
    finally:
        mount.unmount(mnt)
    assert cafs(["mount", "-q", ref, str(mnt), "--store", url, "--fetch-deadline", "3",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    try:
        assert mount.query(mnt, "info")["fetch_deadline"] == 3  # the flag wins
    finally:
        mount.unmount(mnt)


@pytest.mark.root
def test_a_mount_servers_daemon_takes_the_clients_settings(
        settings: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server was started with none of them: the daemon it forks gets the client's."""
    url, ref, _ = _image(tmp_path)
    monkeypatch.setenv("CAFS_RUN_DIR", str(tmp_path / "run"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("CAFS_CONFIG", "CAFS_FETCH_DEADLINE")}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([sys.executable, "-m", "cafs.mounts.server"], env=env,
                              stdout=log, stderr=log)
    try:
        _wait_for(paths.mount_server_socket().exists, "the server's socket")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mount.mount_detached(ref, mnt, store_url=url, cache_dir=tmp_path / "cache",
                             log_file=tmp_path / "mnt.log")
        try:
            assert "started a daemon" in (tmp_path / "server.log").read_text()
            _assert_took_the_settings(mount.query(mnt, "info"))
        finally:
            mount.unmount(mnt)
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


@pytest.mark.root
def test_cafs_run_hands_the_daemon_the_file_and_environment(settings: Path,
                                                             tmp_path: Path) -> None:
    url, ref, _ = _image(tmp_path, [
        Entry.from_host("bin/busybox", "/bin/busybox", mode=0o755),
        Entry("bin/sh", "symlink", linkname="busybox"),
        Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        Entry("etc/group", data=b"root:x:0:\n")])
    name = f"cfg-{os.getpid()}-{time.monotonic_ns()}"
    lower = paths.run_dir() / "containers" / name / "lower"
    # The container waits for its stdin to close, so it outlives the query however slow the
    # machine is; then `cafs run` unmounts and removes it.
    proc = subprocess.Popen([sys.executable, "-m", "cafs", "run", "--rm", "--name", name,
                             "--store", url, "--cache-dir", str(tmp_path / "cache"), ref,
                             "/bin/sh", "-c", "read line; true"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    info: list[dict[str, Any]] = []

    def answered() -> bool:
        """The mount is there before its daemon has written its state: ask until it answers."""
        with contextlib.suppress(mount.MountError, OSError):
            info.append(mount.query(lower, "info"))
        return bool(info) or proc.poll() is not None

    try:
        _wait_for(answered, "the container's mount daemon")
        assert info, "cafs run ended before its mount answered"
        _assert_took_the_settings(info[0])
    finally:
        _, err = proc.communicate(timeout=60)  # closes the container's stdin
    assert proc.returncode == 0, err


@pytest.fixture
def snapshotter_of(settings: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """A real `cafs snapshotter`; the function prepares a container on a chain and
    returns the chain's lazy mount."""
    monkeypatch.setenv("CAFS_RUN_DIR", str(tmp_path / "run"))
    procs: list[subprocess.Popen[bytes]] = []

    def start(chain: str, store: str, *flags: str) -> Path:
        server = "--no-mount-server" not in flags
        sock = tmp_path / "sn.sock"
        cmd = [sys.executable, "-m", "cafs", "snapshotter", "--root", str(tmp_path / "root"),
               "--address", str(sock), "--store", store, "--cache-dir",
               str(tmp_path / "cache"), *flags]
        log = open(tmp_path / "sn.log", "wb")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
        log.close()
        _wait_for(lambda: sock.exists() and procs[0].poll() is None, "the snapshotter")
        if server:  # its mount server, so that the daemon is forked by it
            _wait_for(paths.mount_server_socket().exists, "the snapshotter's mount server")
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            stub = pb_grpc.SnapshotsStub(channel)
            with pytest.raises(grpc.RpcError):  # the remote handshake: ALREADY_EXISTS
                stub.Prepare(pb.PrepareSnapshotRequest(key="extract", labels={REF_LABEL: chain}))
            (overlay,) = stub.Prepare(pb.PrepareSnapshotRequest(key="c1", parent=chain)).mounts
        return Path(next(o for o in overlay.options if o.startswith("lowerdir="))[9:])

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        proc.kill()
        proc.wait()
    for mnt in sorted(remote.mounts_under(tmp_path), key=lambda p: len(p.parts), reverse=True):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
@pytest.mark.parametrize("how", ["mount-server", "spawned"])
def test_the_snapshotters_daemons_take_the_file_and_environment(
        snapshotter_of: Callable[..., Path], tmp_path: Path, how: str) -> None:
    url, _, chains = _image(tmp_path)
    flags = ["--no-mount-server"] if how == "spawned" else []
    fs = snapshotter_of(chains[0], url, *flags)
    assert (fs / "f").read_bytes() == b"hi\n"
    _assert_took_the_settings(mount.query(fs, "info"))
