"""An HTTP proxy in front of the S3 server that answers S3 errors on command.

Tests put it between cafs and moto (AWS_ENDPOINT_URL pointing at it) to see what botocore's
retries, the fetcher's deadline and the indexer make of a store answering 503 SlowDown or
500 InternalError. Otherwise it forwards every request as it came (keep-alive on both sides,
Range, PUT bodies, multipart uploads) and answers what the server answered.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

Match = Callable[[str, str], bool]  # (method, path with query) -> does the fault apply
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "expect", "content-length"}
S3_CODES = {301: ("PermanentRedirect", "The bucket you are attempting to access must be "
                   "addressed using the specified endpoint."),
            403: ("AccessDenied", "Access Denied"),
            500: ("InternalError", "We encountered an internal error. Please try again."),
            503: ("SlowDown", "Please reduce your request rate.")}


def s3_error(status: int) -> bytes:
    """The XML body S3 sends with an error, which botocore parses into the error code."""
    code, message = S3_CODES[status]
    rid = uuid.uuid4().hex[:16].upper()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{rid}</RequestId>"
            f"<HostId>faultproxy</HostId></Error>").encode()


@dataclass
class _Fault:
    status: int
    left: int | None  # faults still to answer; None: until healed
    every: int  # answer the fault on every n-th matching request
    match: Match | None
    seen: int = 0

    def applies(self, method: str, path: str) -> bool:
        if self.left == 0 or (self.match is not None and not self.match(method, path)):
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        if self.left is not None:
            self.left -= 1
        return True


@dataclass
class FaultProxy:
    upstream: str  # "http://HOST:PORT"
    answered: Counter[int] = field(default_factory=Counter)  # faults sent, by status
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    _fault: _Fault | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, status: int = 503, count: int | None = None, every: int = 1,
             match: Match | None = None) -> None:
        """Answer `status` to the next `count` matching requests (None: until `heal`), or to
        every `every`-th of them: intermittent failures."""
        with self._lock:
            self._fault = _Fault(status, count, every, match)

    def heal(self) -> None:
        with self._lock:
            self._fault = None

    def faults(self) -> int:
        with self._lock:
            return sum(self.answered.values())

    def decide(self, method: str, path: str) -> int | None:
        with self._lock:
            fault = self._fault
            if fault is None or not fault.applies(method, path):
                return None
            self.answered[fault.status] += 1
            return fault.status

    def note(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="faultproxy",
                         daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    """One client connection; its requests go over one kept-alive upstream connection."""

    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for PUTs
    proxy: FaultProxy
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._relay()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _relay(self) -> None:
        body = self._body()  # read even when failing: the connection stays usable
        status = self.proxy.decide(self.command, self.path)
        if status is not None:
            self.proxy.note(self.command, self.path, status)  # noted before the client sees it
            self._send(status, [("Content-Type", "application/xml")], s3_error(status))
            return
        try:
            resp = self._forward(body)
            data = resp.read()
        except OSError:
            self.close_connection = True  # the client sees the upstream's failure
            return
        self.proxy.note(self.command, self.path, resp.status)
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        if self.command == "HEAD":  # no body, but the length of the one a GET would get
            headers.append(("Content-Length", resp.getheader("Content-Length") or "0"))
        self._send(resp.status, headers, data, resp.reason)

    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes,
              reason: str | None = None) -> None:
        self.send_response_only(status, reason)
        for key, value in headers:
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        elif not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        if fresh or self._upstream is None:
            if self._upstream is not None:
                self._upstream.close()
            parts = urlsplit(self.proxy.upstream)
            self._upstream = http.client.HTTPConnection(parts.hostname or "", parts.port,
                                                        timeout=60)
        return self._upstream

    def _forward(self, body: bytes) -> http.client.HTTPResponse:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed
            conn = self._connection(fresh=attempt == 1)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if attempt:
                    raise
        raise AssertionError("unreachable")
