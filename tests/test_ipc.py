"""cafs/ipc.py's framing, and a real mount daemon's control socket answering bad input with
an error reply or a closed connection, never by stopping."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mounts import mounted
from rawsocket import exchange, read_to_end

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs import ipc, paths
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_decode_raises_only_its_own_error(line: bytes) -> None:
    try:
        message = ipc.decode(line)
    except ipc.ProtocolError:
        return
    assert isinstance(message, dict)


@pytest.mark.parametrize("line", [b"[1]", b'"stats"', b"17", b"null", b"stats", b"\xff{}",
                                  b"[" * 100_000, b'{"op": "x"'])
def test_what_is_not_one_json_object_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ipc.ProtocolError):
        ipc.decode(line)


def test_a_path_that_is_not_utf8_travels_unchanged() -> None:
    name = os.fsdecode(b"dir/\xff\xfe.bin")
    line = ipc.encode({"op": "locate", "path": name})
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert ipc.decode(line[:-1])["path"] == name


def test_lines_are_split_and_bounded() -> None:
    buffer = ipc.LineBuffer(10)
    buffer.feed(b'{"a":1}\n{"b"')
    assert buffer.line() == b'{"a":1}' and buffer.line() is None
    buffer.feed(b":2}\n")
    assert buffer.line() == b'{"b":2}'
    buffer.feed(b"x" * 11)
    with pytest.raises(ipc.ProtocolError, match="longer than 10"):
        buffer.line()


@given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=5),
       st.lists(st.integers(1, 30), min_size=1))
def test_lines_come_out_whole_however_the_bytes_arrive(lines: list[bytes],
                                                       sizes: list[int]) -> None:
    stream, buffer, out = b"".join(line + b"\n" for line in lines), ipc.LineBuffer(20), []
    at = 0
    for size in sizes * (len(stream) + 1):
        if at >= len(stream):
            break
        buffer.feed(stream[at:at + size])
        at += size
        while (line := buffer.line()) is not None:
            out.append(line)
    assert out == lines


def test_a_reply_is_its_result_or_its_error() -> None:
    assert ipc.result_of({"ok": [1]}) == [1]
    with pytest.raises(ipc.ErrorReply, match="no such"):
        ipc.result_of({"error": "no such file"})
    with pytest.raises(ipc.ProtocolError):
        ipc.result_of({"pid": 1})


def test_a_client_waits_a_bounded_time_for_a_reply(tmp_path: Path) -> None:
    """A server that accepts and never answers costs the client its timeout, no more."""
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        started = time.monotonic()
        with pytest.raises(ipc.TimedOut, match="within"):
            ipc.ask(path, {"op": "stats"}, timeout=0.5)
        assert time.monotonic() - started < 3


# --- a real daemon's control socket ----------------------------------------------------------


@pytest.fixture
def mnt(tmp_path: Path) -> object:
    build_layout(tmp_path / "l", "t", [[Entry("data", "file", data=b"d" * 4096)]])
    url = f"file://{tmp_path}/store"
    ref = index_image(open_source(f"oci:{tmp_path}/l:t"), open_store(url), IndexOptions()).record
    with mounted(ref.ref, tmp_path / "mnt", url, tmp_path / "cache") as mountpoint:
        yield mountpoint


BAD_REQUESTS = [
    (b"[1]\n", "not a JSON object"),
    (b"stats\n", "not a JSON line"),  # the old framing
    (b'{"op": "stats"\n', "not a JSON line"),
    (b'{"op": "st\xffats"}\n', "not a JSON line"),
    (b'{"op": 7}\n', '"op"'),
    (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
    (b'{"op": "locate"}\n', '"path"'),
    (b'{"op": "locate", "path": ["x"]}\n', '"path"'),
    (b'{"op": "locate", "path": "no/such"}\n', "not in this image"),
    (b"x" * (ipc.MAX_REQUEST + 10), "longer than"),
]


@pytest.mark.root
def test_the_control_socket_answers_bad_requests_with_an_error(mnt: Path) -> None:
    sock_path = paths.control_socket(mnt)
    for data, says in BAD_REQUESTS:
        reply = ipc.decode(exchange(sock_path, data).rstrip(b"\n"))
        assert says in reply["error"], (data[:40], reply)
    assert mount.query(mnt)["reads"] >= 0
    assert mount.query(mnt, "locate", path="data")["size"] == 4096
    assert (mnt / "data").read_bytes() == b"d" * 4096


@pytest.mark.root
def test_a_slow_client_is_cut_off_and_others_are_answered_meanwhile(mnt: Path) -> None:
    sock_path = paths.control_socket(mnt)
    with socket.socket(socket.AF_UNIX) as slow:
        slow.connect(str(sock_path))
        slow.sendall(b'{"op": ')
        started = time.monotonic()
        assert mount.query(mnt, "info")["pid"] > 0  # not held up by the slow one
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.5):
                try:
                    slow.sendall(b" ")
                except OSError:
                    return

        thread = threading.Thread(target=trickle)
        thread.start()
        slow.settimeout(ipc.TIMEOUT + 5)
        got = read_to_end(slow)
        stop.set()
        thread.join()
        assert time.monotonic() - started < ipc.TIMEOUT + 3
    assert "within" in json.loads(got)["error"]
    assert mount.query(mnt)["reads"] >= 0
