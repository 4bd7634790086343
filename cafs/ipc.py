"""The one framing of cafs's unix-socket protocols: a mount daemon's control socket
(cafs/daemon/control.py) and the mount server (cafs/mounts/server.py).

Every request and every reply is one JSON object on one line: UTF-8, ended by a newline,
at most MAX_REQUEST (requests) or MAX_REPLY (replies) bytes, sent within TIMEOUT seconds.
A request is `{"op": NAME, ...its arguments}`; a reply is `{"ok": RESULT}` or
`{"error": "why"}`. A connection carries one request; the control socket answers it with
one reply, the mount server with two (`{"ok": {"pid": N}}` once it forked the daemon, then
the daemon's own `{"ok": "mounted"}` or `{"error": ...}`). A line that is not such an object
is answered `{"error": ...}` and the connection closed; nothing a client sends stops a server.

A client talks only to a server of its own uid: it checks SO_PEERCRED before it sends
anything (a request may carry the user's store credentials), and servers listen 0600 in
the user's private run dir. By hand, as that user:

    echo '{"op": "stats"}' | socat - UNIX-CONNECT:$RUN_DIR/mounts/<id>/control.sock

This module is shared by the daemon, the mount server and every client, so it imports
neither trio nor pyfuse3: the parts that read and write are plain functions over bytes
(`encode`, `decode`, `LineBuffer`), and the blocking socket client is `Client`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from blobstore import privatedir

MAX_REQUEST = 1 << 20  # a mount request carries the daemon's configuration and environment
MAX_REPLY = 64 << 20  # a `locate` reply lists every chunk of a file (a model's weights)
TIMEOUT = 5.0  # seconds a peer has to send one whole line


class ProtocolError(ValueError):
    """A line that is not one JSON object: not UTF-8, not JSON, not an object, too long,
    cut short or too slow."""


class TimedOut(ProtocolError):
    """No whole line within the time allowed."""


class ErrorReply(Exception):
    """The server answered {"error": ...}: it understood and refused or failed."""


def encode(message: dict[str, Any]) -> bytes:
    """One line. ASCII JSON: a path that is not UTF-8 travels as \\udcXX escapes and comes
    back the same (surrogateescape)."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """The object on one line; ProtocolError, and nothing else, for anything else."""
    try:
        message = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"not a JSON object but {type(message).__name__}")
    return message


def op_of(request: dict[str, Any]) -> str:
    """A request's operation name."""
    op = request.get("op")
    if not isinstance(op, str):
        raise ProtocolError('a request needs "op", a string')
    return op


def text_arg(request: dict[str, Any], name: str) -> str:
    """A request's string argument `name`."""
    value = request.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f'request {request.get("op")!r} needs "{name}", a string')
    return value


def ok(result: Any) -> dict[str, Any]:
    return {"ok": result}


def error(why: str) -> dict[str, Any]:
    return {"error": why}


def result_of(reply: dict[str, Any]) -> Any:
    """A reply's result; ErrorReply where it is an error, ProtocolError where neither."""
    if "error" in reply:
        raise ErrorReply(str(reply["error"]))
    if "ok" not in reply:
        raise ProtocolError('a reply needs "ok" or "error"')
    return reply["ok"]


class LineBuffer:
    """Bytes in, whole lines out, with a bound on a line's length (sans I/O: the trio
    server and the blocking client feed it alike). Each byte is copied and scanned once,
    so a long reply costs its length, not its length squared."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.scanned = 0  # no newline before this offset

    def feed(self, data: bytes) -> None:
        self.data += data

    def line(self) -> bytes | None:
        """The next whole line (without its newline), or None until one has arrived."""
        end = self.data.find(b"\n", self.scanned, self.limit + 1)
        if end < 0:
            self.scanned = min(len(self.data), self.limit + 1)
            if len(self.data) > self.limit:
                raise ProtocolError(f"line longer than {self.limit} bytes")
            return None
        line = bytes(self.data[:end])
        del self.data[:end + 1]
        self.scanned = 0
        return line


def receive(sock: socket.socket, buffer: LineBuffer, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next message on a blocking socket, whole within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (line := buffer.line()) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOut(f"no whole line within {timeout:g}s")
        sock.settimeout(left)
        try:
            part = sock.recv(1 << 16)
        except TimeoutError:
            raise TimedOut(f"no whole line within {timeout:g}s") from None
        if not part:
            raise ProtocolError("connection closed before a whole line")
        buffer.feed(part)
    return decode(line)


class Client:
    """A connection to a cafs server of our own uid (checked before anything is sent)."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = LineBuffer(MAX_REPLY)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
            privatedir.check_peer(self.sock, path)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, request: dict[str, Any]) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(encode(request))

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        return receive(self.sock, self.buffer, self.timeout if timeout is None else timeout)


def ask(sock: Path, request: dict[str, Any], timeout: float = TIMEOUT) -> Any:
    """One request, one reply: the result. OSError (no server, not ours), ProtocolError
    (a garbled or late reply) or ErrorReply (the server's refusal)."""
    with Client(sock, timeout) as client:
        client.send(request)
        return result_of(client.receive())
