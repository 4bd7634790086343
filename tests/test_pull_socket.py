"""The snapshotter's pull socket (snapshotter/pullservice.py, snapshotter/pullprotocol.py):
`cafs pull` sends one request and the snapshotter, which has its store client and grpc
loaded, plans and pulls. Here against a real store and no containerd: what the socket
answers, to whom, and that a bad request never stops it. The whole pull through
containerd: test_snapshotter_containerd.py."""

from __future__ import annotations

import json
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_snapshotter_pull import REF, publish
from users import User, reachable_dir

from blobstore.local import LocalStore
from cafs import ipc
from snapshotter.catalog import Catalog
from snapshotter.pullprotocol import PullRequest, PullResult, ask, pull_socket
from snapshotter.pullservice import PullServer, puller


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def sock(store: LocalStore, tmp_path: Path) -> Iterator[Path]:
    path = pull_socket(tmp_path / "sn" / "cafs.sock")
    server = PullServer(path, puller(Catalog(store)))
    server.start()
    yield path
    server.stop()
    assert not path.exists()


def request(ref: str = REF, address: str = "/nonexistent/containerd.sock") -> PullRequest:
    return PullRequest(ref, None, address, "default", "cafs")


def exchange(path: Path, data: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        return ipc.decode(s.makefile("rb").readline().rstrip(b"\n"))


@given(st.builds(PullRequest, st.text(min_size=1), st.none() | st.text(), st.text(), st.text(),
                 st.text()))
def test_a_request_survives_the_socket(req: PullRequest) -> None:
    assert PullRequest.from_message(ipc.decode(ipc.encode(req.message()).rstrip())) == req


def test_the_socket_is_the_snapshotters_alone(sock: Path) -> None:
    st_ = sock.stat()
    assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600


def test_the_pull_is_planned_from_the_snapshotters_store(sock: Path, store: LocalStore) -> None:
    """A ref the store lacks is refused by name; one it has is planned and goes on to
    containerd, here missing: so the plan was read from the snapshotter's store."""
    publish(store)
    with pytest.raises(ipc.ErrorReply, match="nothing:here"):
        ask(sock, request("nothing:here"))
    with pytest.raises(ipc.ErrorReply, match="no containerd socket at /nonexistent"):
        ask(sock, request())


def test_where_no_snapshotter_listens_the_command_pulls_itself(tmp_path: Path) -> None:
    assert ask(tmp_path / "none.sock.pull", request()) is None
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "dead.sock.pull"))  # a socket left by a dead snapshotter
    listener.close()
    assert ask(tmp_path / "dead.sock.pull", request()) is None


BAD = [b"[]\n", b'"pull"\n', b"\xff\n", b'{"op": "mount"}\n', b'{"op": "pull", "ref": ""}\n',
       b'{"op": "pull", "ref": "a", "name": 3, "address": "", "namespace": "", '
       b'"snapshotter": ""}\n',
       b'{"op": "pull", "ref": "a", "address": 1, "namespace": "", "snapshotter": ""}\n']


def test_bad_requests_are_refused_and_the_socket_goes_on(sock: Path, store: LocalStore) -> None:
    for data in BAD:
        reply = exchange(sock, data)
        assert str(reply["error"]).startswith(("refused:", "not a JSON")), (data, reply)
    publish(store)
    with pytest.raises(ipc.ErrorReply, match="no containerd socket"):
        ask(sock, request())


def test_only_the_snapshotters_uid_is_answered(sock: Path, attacker: User) -> None:
    """Even where the socket's mode would let another uid in, it hears nothing back."""
    reachable_dir(sock.parent)
    sock.chmod(0o666)
    # Refused, the socket is closed at once: the send itself may then fail (EPIPE), or
    # the receive (ECONNRESET, the request unread); either way nothing was heard.
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(10)\n"
             "s.connect(sys.argv[1])\n"
             "try: s.sendall(sys.argv[2].encode() + b'\\n'); print(repr(s.recv(100)))\n"
             "except (BrokenPipeError, ConnectionResetError): print(repr(b''))\n")
    res = attacker.run("/usr/bin/python3", "-I", "-c", probe, str(sock),
                       json.dumps(request().message()))
    assert res.returncode == 0 and res.stdout.strip() == "b''", res


def test_a_result_is_checked_before_it_is_believed() -> None:
    good = {"name": "n", "top_chain": "c", "prepared": ["c"], "present": []}
    assert PullResult.from_message(good) == PullResult("n", "c", ["c"], [])
    bad: object
    for bad in (None, [], {"name": "n"}, {**good, "prepared": 3}):
        with pytest.raises(ipc.ProtocolError):
            PullResult.from_message(bad)


def test_a_silent_client_is_cut_off_and_others_are_answered_meanwhile(
        sock: Path, store: LocalStore) -> None:
    publish(store)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.settimeout(ipc.TIMEOUT + 5)
        silent.connect(str(sock))
        started = time.monotonic()
        with pytest.raises(ipc.ErrorReply, match="no containerd socket"):
            ask(sock, request())
        assert time.monotonic() - started < 2
        reply = ipc.decode(silent.makefile("rb").readline().rstrip(b"\n"))
        assert time.monotonic() - started < ipc.TIMEOUT + 2
    assert "within" in str(reply["error"])
