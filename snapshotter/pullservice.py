"""`cafs pull`, done by the running snapshotter for the command.

Measured in the cold-start benchmark (page cache dropped, loopback SeaweedFS): a `cafs pull`
that planned and spoke to containerd itself took 0.77 s, 0.56 s of it importing grpc, the
protobuf stubs, the store client and the indexer before its first call. The snapshotter has
all of that loaded, a warm store client, and its store is the one that will serve the
layers. So the command sends one request on the snapshotter's pull socket and imports
nothing but the standard library; the snapshotter plans from its store, starts bringing the
top chain's index into the node cache (the run follows), and does the pull
(snapshotter.pull.apply), containerd calling this same process back for each layer.

Socket: snapshotter.pullprotocol.pull_socket(snapshotter socket), 0600, the snapshotter's
uid (root). Only that uid is answered; a client asks only a server of its own uid. The
messages: snapshotter/pullprotocol.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from blobstore import StoreError, privatedir
from cafs import ipc
from cafs.terminal import shown
from snapshotter.catalog import Catalog, CatalogError
from snapshotter.pull import PullError, apply, plan
from snapshotter.pullprotocol import PullRequest, PullResult
from snapshotter.service import prepare_socket

log = logging.getLogger(__name__)
MAX_PULLS = 8  # pulls at once; more wait their turn


def puller(catalog: Catalog,
           warm: Callable[[str], None] | None = None) -> Callable[[PullRequest], PullResult]:
    """What the server runs per request: plan from `catalog` (this snapshotter's store),
    `warm(top chain)` in the background (a pull announces a run: its index into the node
    cache), then the containerd side.

    Tried and not kept: mounting the top chain in the background once the pull is done.
    `ctr run` asks for the mounts ~5 ms after the pull returns, so the run found the daemon
    no nearer ready (mount ready 0.19 s after the run began, against 0.17 s without)."""

    def run(req: PullRequest) -> PullResult:
        started = time.monotonic()
        p = plan(req.ref, catalog, req.name)
        planned = time.monotonic()
        if warm is not None:
            threading.Thread(target=warm, args=(p.chains[-1],), name="warm",
                             daemon=True).start()
        result = apply(p, address=req.address, namespace=req.namespace,
                       snapshotter=req.snapshotter)
        log.info("pulled %s: planned in %.0f ms, containerd's part in %.0f ms",
                 shown(p.name), 1000 * (planned - started), 1000 * (time.monotonic() - planned))
        return result

    return run


class _Listener(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    handle: Callable[[socket.socket], None]


class _Connection(socketserver.BaseRequestHandler):
    server: _Listener

    def handle(self) -> None:
        self.server.handle(self.request)


class PullServer:
    """The pull socket of a snapshotter; `start()` binds and serves in threads."""

    def __init__(self, path: Path, run: Callable[[PullRequest], PullResult]) -> None:
        self.path = path
        self.run = run
        self._slots = threading.BoundedSemaphore(MAX_PULLS)
        self._listener: _Listener | None = None

    def start(self) -> None:
        prepare_socket(self.path)
        old = os.umask(0o177)  # born 0600: no window with wider permissions
        try:
            listener = _Listener(str(self.path), _Connection)
        finally:
            os.umask(old)
        listener.handle = self._answer
        self._listener = listener
        threading.Thread(target=listener.serve_forever, name="pull-socket", daemon=True).start()
        log.info("serving cafs pull on %s", self.path)

    def stop(self) -> None:
        if self._listener is None:
            return
        self._listener.shutdown()
        self._listener.server_close()
        self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _answer(self, conn: socket.socket) -> None:
        try:
            if privatedir.peer_uid(conn) != os.getuid():
                return  # not ours: nothing is read from it, nothing sent
            try:
                reply = self._reply(ipc.receive(conn, ipc.LineBuffer(ipc.MAX_REQUEST)))
            except ipc.ProtocolError as exc:  # not one JSON object, or too slow
                reply = ipc.error(f"refused: {exc}")
            conn.settimeout(ipc.TIMEOUT)
            conn.sendall(ipc.encode(reply))
        except (OSError, ipc.ProtocolError) as exc:
            log.info("pull socket: a client went away or sent garbage: %s", exc)

    def _reply(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            req = PullRequest.from_message(message)
        except ipc.ProtocolError as exc:
            return ipc.error(f"refused: {exc}")
        with self._slots:
            try:
                return ipc.ok(asdict(self.run(req)))
            except (PullError, CatalogError) as exc:
                return ipc.error(str(exc))
            except StoreError as exc:
                return ipc.error(f"store: {exc}")
            except Exception as exc:  # the snapshotter stays up; the client hears why
                log.exception("pull of %s failed", shown(req.ref))
                return ipc.error(f"pull failed: {exc}")
