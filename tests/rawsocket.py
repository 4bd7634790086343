"""Talking to a cafs unix socket by hand, as `socat` would: bytes in, bytes out."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path


def exchange(sock_path: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """What the server answers `data` before it closes the connection."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # it may close before the end: it had heard enough
        return read_to_end(s)


def read_to_end(s: socket.socket) -> bytes:
    """Until the server closes; a close with our bytes unread resets, after its reply."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while part := s.recv(1 << 16):
            got += part
    return got
