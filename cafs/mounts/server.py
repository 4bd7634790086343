"""A mount server: a process that has imported the daemon once and forks a daemon per mount.

Measured: a fresh `python -m cafs.daemon` spends ~0.4 s importing trio, pyfuse3 and the rest
before it reads a byte of the index, while mounting a 100k-file image takes ~0.1 s. The
server pays the imports once; each mount is a fork, so `cafs mount`, `cafs run` and the
snapshotter's mounts start in a fraction of the time.

The server is single-threaded (forking a threaded process is unsafe) and only ever forks;
each daemon is double-forked into its own session, so it outlives the server exactly as a
directly spawned daemon outlives the command that started it. A request carries the
client's arguments, environment and working directory, so a daemon started through the
server behaves as one the client would have spawned (the environment: only the variables a
daemon reads, cafs.mounts.mount.daemon_env). Only the server's own user may ask, and a client asks
only a server of its own uid (SO_PEERCRED both ways); the socket lives in the user's
private run dir (blobstore/privatedir.py). A server whose code differs from the client's
answers "stale": the client then spawns the daemon itself. Where that is because the
server's own code changed on disk since it started (an upgrade), the server then executes
itself again, new code, same process: a long-lived server does not leave every later mount
on the slow path.

Protocol (cafs/ipc.py's framing): request {"op": "mount", "argv": [...], "env": {...},
"cwd": str, "log": str, "code": fingerprint}; replies {"ok": {"pid": N}}, then the daemon's
own ready reply ({"ok": "mounted"} or {"error": why}) on the same connection; or one
{"error": why} ("stale: ..." where the code differs, "refused: ..." for a bad request).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from blobstore import privatedir
from cafs import ipc, logs, paths
from cafs.terminal import shown

log = logging.getLogger(__name__)
PACKAGES = ("cafs", "blobstore", "indexer")
IDLE_TIMEOUT = 3600.0


CODE_ROOT = Path(__file__).resolve().parents[2]  # where the packages are imported from


def fingerprint(root: Path = CODE_ROOT) -> str:
    """Identifies the code a daemon would run: every source file of the packages, their
    subpackages included, by path, size and mtime."""
    h = hashlib.sha256(sys.executable.encode())
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            st = path.stat()
            h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:32]


class Server:
    def __init__(self, path: Path, idle_timeout: float, parent: int | None,
                 argv: list[str] | None = None) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.parent = parent
        self.argv = argv or []  # its own arguments, to start again with after an upgrade
        self.code = fingerprint()
        self.upgraded = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.last_used = time.monotonic()

    def bind(self, wait: float = 3.0) -> None:
        """Take the socket; a server still answering there gets `wait` seconds to go (the
        one of a snapshotter that just restarted stops within a second of its parent)."""
        privatedir.ensure(self.path.parent)
        deadline = time.monotonic() + wait
        while self.path.exists() and answers(self.path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"a mount server already listens on {self.path}")
            time.sleep(0.1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.listen(64)
        self.sock.settimeout(1.0)

    def serve(self) -> None:
        """Accept until idle for `idle_timeout`, the parent is gone or the socket was taken."""
        ident = self.path.stat().st_ino
        try:
            while not self._should_stop(ident):
                _reap()
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                self.last_used = time.monotonic()
                with conn:
                    self._handle(conn)
                if self.upgraded:
                    self._restart()
                    return  # could not start the new code: stop; clients spawn daemons
        finally:
            self.sock.close()
            if _inode(self.path) == ident:
                self.path.unlink()

    def _should_stop(self, ident: int) -> bool:
        if self.parent is not None and os.getppid() != self.parent:
            log.info("parent %d is gone: stopping", self.parent)
            return True
        if _inode(self.path) != ident:
            log.info("socket %s was removed or replaced: stopping", self.path)
            return True
        return time.monotonic() - self.last_used > self.idle_timeout

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = self._read_request(conn)
        except (OSError, ValueError) as exc:  # ipc.ProtocolError is a ValueError
            _answer(conn, ipc.error(f"refused: {exc}"))
            return
        if request.get("code") != self.code:
            _answer(conn, ipc.error("stale: this server runs other code than the client"))
            self.upgraded = fingerprint() != self.code
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.sock.close()
            _first_child(conn, request)
        os.waitpid(pid, 0)
        log.info("started a daemon for %s", request["argv"][1:2])

    def _restart(self) -> None:
        """Its code changed on disk since it started (cafs was upgraded): run the new code
        in this same process (pid, parent and session kept, so a supervisor or the
        snapshotter that started it sees no change), rather than answer "stale" to every
        client, each of which then pays the interpreter's start-up, until someone restarts
        it. The socket is not inherited: the new code binds the path again."""
        log.info("cafs changed on disk since this server started: starting again with it")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [sys.executable, "-m", "cafs.mounts.server", *self.argv])
        except OSError as exc:  # the interpreter itself went with the upgrade
            log.error("cannot start the new code (%s): stopping", exc)

    def _read_request(self, conn: socket.socket) -> dict[str, Any]:
        uid = privatedir.peer_uid(conn)
        if uid != os.geteuid():
            raise ValueError(f"uid {uid} may not use the mount server of uid {os.geteuid()}")
        request = ipc.receive(conn, ipc.LineBuffer(ipc.MAX_REQUEST))
        if ipc.op_of(request) != "mount":
            raise ipc.ProtocolError(f"unknown op {request['op']!r}")
        argv, env = request.get("argv"), request.get("env")
        if not (isinstance(argv, list) and isinstance(env, dict)
                and all(isinstance(a, str) for a in argv)):
            raise ipc.ProtocolError('"argv" must be a list of strings and "env" an object')
        ipc.text_arg(request, "log")
        return request


def _first_child(conn: socket.socket, request: dict[str, Any]) -> None:
    """Detach (new session, second fork) so the daemon is nobody's child, then run it."""
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _daemon(conn, request)
    finally:
        os._exit(1)


def _daemon(conn: socket.socket, request: dict[str, Any]) -> None:
    from cafs.daemon.main import main as daemon_main

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # What `ps` and the snapshotter's liveness check expect of a daemon: its command line
    # (short: the title must fit where the server's own argv and environment were).
    setproctitle(f"{Path(sys.executable).name} -m cafs.daemon {' '.join(request['argv'][:2])}")
    try:
        _become(request)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        _answer(conn, ipc.error(f"cannot start the daemon: {exc}"))
        os._exit(1)
    conn.settimeout(None)
    conn.sendall(ipc.encode(ipc.ok({"pid": os.getpid()})))
    fd = os.dup(conn.fileno())
    conn.close()
    rc = 1
    try:
        rc = daemon_main([*request["argv"], "--ready-fd", str(fd)])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _become(request: dict[str, Any]) -> None:
    """Take the client's environment, directory and log file, as a spawned daemon would."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    os.chdir(request.get("cwd") or "/")
    null = os.open(os.devnull, os.O_RDONLY)
    logf = privatedir.open_log(request["log"])
    os.dup2(null, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    os.close(null)
    os.close(logf)


def _answer(conn: socket.socket, reply: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(ipc.TIMEOUT)
        conn.sendall(ipc.encode(reply))


def answers(path: Path) -> bool:
    """Something listens on the unix socket (a server still running there)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _preload() -> None:
    """Import what daemons need now, once; the S3 client only where it is installed."""
    import cafs.daemon.main  # noqa: F401

    with contextlib.suppress(ImportError):
        import blobstore.s3

        blobstore.s3.warm()


def start_child() -> subprocess.Popen[bytes] | None:
    """A mount server for this process's lifetime (the snapshotter's); it exits when its
    parent does. None, with a warning, where it cannot start: mounts then spawn daemons."""
    cmd = [sys.executable, "-m", "cafs.mounts.server", "--parent-pid", str(os.getpid()),
           "--idle-timeout", "inf"]
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.warning("no mount server (%s): each mount starts a new interpreter", exc)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cafs mount-server")
    p.add_argument("--socket", type=Path, default=None)
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                   help="seconds without a request before the server exits")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this parent exits")
    args = p.parse_args(argv)
    logs.setup()
    # Takes over the argv and environment area now, before any child changes its environment.
    given = sys.argv[1:] if argv is None else argv
    setproctitle(" ".join([Path(sys.executable).name, "-m", "cafs.mounts.server", *given]))
    server = Server(args.socket or paths.mount_server_socket(), args.idle_timeout,
                    args.parent_pid, given)
    try:
        server.bind()
    except (RuntimeError, OSError) as exc:
        print(f"cafs mount-server: {shown(str(exc))}", file=sys.stderr)
        return 1
    _preload()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info("mount server listening on %s", server.path)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
