"""The mount server: daemons forked from a pre-loaded process behave as spawned ones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounts import mounted
from rawsocket import exchange, read_to_end

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs import ipc, paths
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

pytestmark = pytest.mark.root
DATA = os.urandom(3 << 20)


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, str]:
    build_layout(tmp_path / "l", "t", [[Entry("data", "file", data=DATA),
                                        Entry("etc", "dir"), Entry("etc/x", data=b"x\n")]])
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path}/l:t"), open_store(url), IndexOptions()).record
    return url, ref.ref


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    monkeypatch.setenv("CAFS_RUN_DIR", str(tmp_path / "run"))
    env = {k: v for k, v in os.environ.items() if k != "CAFS_STORE"}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing there: daemons need the client's
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "cafs.mounts.server"], env=env,
                            stdout=log, stderr=log)
    _wait_for(lambda: paths.mount_server_socket().exists(), "the server's socket")
    yield proc
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _wait_for(cond: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _server_log(tmp_path: Path) -> str:
    return (tmp_path / "server.log").read_text()


def test_daemon_forked_by_the_server_serves_and_outlives_it(
        server: subprocess.Popen[bytes], image: tuple[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, ref = image
    monkeypatch.setenv("CAFS_STORE", url)  # only the client has it: the daemon must get it
    with mounted(ref, tmp_path / "mnt", "", tmp_path / "cache") as mnt:
        pid = mount.daemon_pid(mnt)
        assert pid is not None and pid != server.pid
        assert "started a daemon" in _server_log(tmp_path)
        title = _cmdline(pid)
        assert b"cafs.daemon" in title and str(mnt).encode() in title
        assert Path(f"/proc/{pid}/status").read_text().count(f"PPid:\t{os.getpid()}\n") == 0
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert (mnt / "data").read_bytes() == DATA
        assert (mnt / "etc/x").read_bytes() == b"x\n"
    assert not mount.is_mounted(tmp_path / "mnt")
    _wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the daemon to exit")


def test_a_failing_mount_through_the_server_says_why(
        server: subprocess.Popen[bytes], image: tuple[str, str], tmp_path: Path) -> None:
    url, _ = image
    (tmp_path / "mnt").mkdir()
    with pytest.raises(mount.MountError, match="no-such/image"):
        mount.mount_detached("no-such/image:1", tmp_path / "mnt", store_url=url,
                             cache_dir=tmp_path / "cache", log_file=tmp_path / "m.log")
    assert "started a daemon" in _server_log(tmp_path)
    assert not mount.is_mounted(tmp_path / "mnt")


def test_a_server_running_other_code_is_not_used(
        server: subprocess.Popen[bytes], image: tuple[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, ref = image
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(paths.mount_server_socket()))
        s.sendall(json.dumps({"op": "mount", "argv": [ref, "/x"], "env": {}, "log": "/dev/null",
                              "code": "old"}).encode() + b"\n")
        assert json.loads(s.makefile().readline())["error"].startswith("stale")
    monkeypatch.setattr("cafs.mounts.server.fingerprint", lambda: "other code")
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        assert (mnt / "etc/x").read_bytes() == b"x\n"
        pid = mount.daemon_pid(mnt)
        assert pid is not None and b"\0-m\0cafs.daemon\0" in _cmdline(pid)  # spawned: real argv
    assert "started a daemon" not in _server_log(tmp_path)


def test_only_the_servers_user_may_ask(server: subprocess.Popen[bytes]) -> None:
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); s.sendall(b'{}\\n'); print(s.makefile().readline())\n"
             "except PermissionError: print('denied')\n")
    out = subprocess.run(["/usr/bin/python3", "-c", probe, str(paths.mount_server_socket())],
                         user=65534, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "denied" or json.loads(out)["error"].startswith("refused:")


def test_server_stops_with_its_parent_and_removes_its_socket(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable, "
         f"'-m', 'cafs.mounts.server', '--socket', '{sock}', '--parent-pid', "
         "str(__import__('os').getpid())]); time.sleep(60)"])
    _wait_for(sock.exists, "the server's socket")
    parent.kill()
    parent.wait()
    _wait_for(lambda: not sock.exists(), "the server to stop", timeout=10)


def test_a_forked_daemon_reads_s3_with_the_clients_settings(
        server: subprocess.Popen[bytes], s3_server: object, tmp_path: Path) -> None:
    """The server parsed S3's service model ahead, but settings and credentials are the
    client's: the server itself points at an endpoint where nothing listens."""
    url = s3_server.url  # type: ignore[attr-defined]
    build_layout(tmp_path / "l", "t", [[Entry("data", "file", data=DATA)]])
    ref = index_image(open_source(f"oci:{tmp_path}/l:t"), open_store(url), IndexOptions()).record
    with mounted(ref.ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        assert (mnt / "data").read_bytes() == DATA
    assert "started a daemon" in _server_log(tmp_path)


def test_a_forked_daemon_prefetches_through_worker_processes(
        server: subprocess.Popen[bytes], image: tuple[str, str], tmp_path: Path) -> None:
    """The pool's forkserver starts from a daemon that the server forked (its `__main__`
    is the server's), and its workers fill the cache the daemon then serves from."""
    url, ref = image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount.mount_detached(ref, mnt, store_url=url, cache_dir=tmp_path / "cache",
                         log_file=tmp_path / "mnt.log", daemon_args=["--prefetch-processes", "2"])
    try:
        assert "started a daemon" in _server_log(tmp_path)
        assert mount.query(mnt, "prefetch-path", path="data")["blobs"] == 1
        _wait_for(lambda: mount.query(mnt, "prefetch")["state"] == "done", "the prefetch")
        state = mount.query(mnt, "prefetch")
        assert state["processes"]["filled_blobs"] == 1 and state["plans"][0]["processes"] == 2
        assert (mnt / "data").read_bytes() == DATA
        assert mount.query(mnt)["demand_blobs"] == 0
    finally:
        mount.unmount(mnt)


def _ask(sock: Path, request: dict[str, object]) -> str:
    """The server's first reply, as text: "pid", or its error."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(json.dumps({"op": "mount", "log": "/dev/null", **request}).encode() + b"\n")
        reply = json.loads(s.makefile().readline())
        return "pid" if "pid" in reply.get("ok", {}) else str(reply["error"]).split(":")[0]


def test_a_server_whose_code_was_upgraded_starts_again_with_it(tmp_path: Path) -> None:
    """Run from a copy of the packages, so the test can change the code under it."""
    code = tmp_path / "code"
    for package in ("cafs", "blobstore", "indexer"):
        shutil.copytree(Path(__file__).parent.parent / package, code / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(code)}

    def fingerprint() -> str:
        return subprocess.run(
            [sys.executable, "-c", "from cafs.mounts.server import fingerprint; "
             "print(fingerprint())"], cwd=code, env=env, check=True, capture_output=True,
            text=True).stdout.strip()

    sock = tmp_path / "s.sock"
    old = fingerprint()
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "cafs.mounts.server", "--socket",
                                   str(sock)], cwd=code, env=env, stdout=log, stderr=log)
    try:
        _wait_for(sock.exists, "the server's socket")
        with (code / "cafs" / "daemon" / "stats.py").open("a") as f:
            f.write("# upgraded\n")
        new = fingerprint()
        assert new != old
        request = {"argv": ["--no-such-option"], "env": {}, "cwd": str(tmp_path),
                   "log": str(tmp_path / "daemon.log"), "code": new}
        assert _ask(sock, request) == "stale"  # still the old code: the client spawns
        log_text = (tmp_path / "server.log").read_text
        _wait_for(lambda: log_text().count("mount server listening") == 2, "a new start")
        assert server.poll() is None  # the same process, now running the new code
        assert _ask(sock, request) == "pid"  # taken: a daemon was forked
        assert _ask(sock, {**request, "code": old}) == "stale"  # an older client
        assert "starting again" in log_text()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_server_that_cannot_start_its_new_code_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.mounts import server as mountserver

    sock = tmp_path / "s.sock"
    server = mountserver.Server(sock, 60.0, None)
    server.bind()
    monkeypatch.setattr(mountserver, "fingerprint", lambda: "new code")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "gone" / "python3"))
    answers: list[str] = []
    client = threading.Thread(target=lambda: answers.append(_ask(sock, {
        "argv": ["x"], "env": {}, "code": "new code"})))
    client.start()
    server.serve()  # returns: the interpreter of the upgrade is not there
    client.join(timeout=10)
    assert answers == ["stale"]
    assert not sock.exists()


BAD_REQUESTS = [b"[]\n", b'"mount"\n', b"\xff\n", b'{"op": "umount"}\n',
                b'{"op": "mount", "argv": "x", "env": {}, "log": "/dev/null", "code": ""}\n',
                b'{"op": "mount", "argv": [], "env": {}, "log": 3, "code": ""}\n',
                b"x" * (ipc.MAX_REQUEST + 10)]


def test_bad_requests_are_refused_and_the_server_goes_on(
        server: subprocess.Popen[bytes], image: tuple[str, str], tmp_path: Path) -> None:
    """A request that is JSON but not an object stopped the server (AttributeError)."""
    for data in BAD_REQUESTS:
        reply = ipc.decode(exchange(paths.mount_server_socket(), data).rstrip(b"\n"))
        assert reply["error"].startswith("refused:"), (data[:40], reply)
        assert server.poll() is None, data[:40]
    url, ref = image
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache") as mnt:
        assert (mnt / "etc/x").read_bytes() == b"x\n"
    assert "started a daemon" in _server_log(tmp_path)


def test_a_slow_client_is_cut_off(server: subprocess.Popen[bytes]) -> None:
    """The server is single-threaded: a client that trickles its request must not hold it
    (a byte now and then used to restart the wait each time)."""
    assert b"refused" in exchange(paths.mount_server_socket(), b"[]\n")  # serving by now
    with socket.socket(socket.AF_UNIX) as slow:
        slow.connect(str(paths.mount_server_socket()))
        started = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.5):
                try:
                    slow.sendall(b" ")
                except OSError:
                    return

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            slow.settimeout(ipc.TIMEOUT + 5)
            reply = ipc.decode(read_to_end(slow).rstrip(b"\n"))
        finally:
            stop.set()
            thread.join()
        assert time.monotonic() - started < ipc.TIMEOUT + 3
    assert "within" in reply["error"]
    assert server.poll() is None
