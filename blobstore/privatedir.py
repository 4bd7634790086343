"""Private directories: where cafs keeps anything, made and checked in one place.

cafs runs on shared nodes. Every directory it keeps state in (run dir, per-mount state, logs,
node cache, file:// store, snapshotter root, container bundles) holds something another
user must not read (blobs of files the image keeps from them, credentials a request
carries) or must not replace (a socket a client sends to, a file a daemon writes). So each
is *private*: created 0700 by the running uid, its files 0600. One that already exists is
used only if it is a real directory (not a symlink), owned by the running uid and writable
by nobody else; read or search bits for others, which older versions of cafs left on
(0755), are taken away. Every directory above it must be owned by root or the running uid
and, where others may write to it, sticky (/tmp), so nobody else can rename it away and put
their own in its place (OpenSSH's StrictModes rule). Once that holds, only this uid and
root can add, remove or replace an entry inside, so paths beneath it are used as they are,
without re-checking each one on the hot path. A missing directory in a shared place (/tmp)
can be created first by someone else: that is why an existing one is checked, never
trusted, and why the check runs on the directory opened with O_NOFOLLOW, not on its name.

Files are created with O_EXCL | O_NOFOLLOW, mode 0600, under a random name and renamed into
place, so no planted link is followed and nobody sees a half-written file.

A unix socket's peer is checked too (`check_peer`): a client sends nothing to a server that
is not its own uid, whoever made the socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
from pathlib import Path

log = logging.getLogger(__name__)
DIR_MODE = 0o700
FILE_MODE = 0o600


class UnsafePath(PermissionError):
    """A directory or socket someone else could control: cafs will not use it."""


def ensure(path: Path | str) -> Path:
    """The private directory at `path`, created (with missing parents, each 0700) if absent.
    Raises UnsafePath, saying why and what to do, where it cannot be trusted."""
    path = Path(os.path.abspath(path))
    _check_ancestors(path.parent)
    missing = []
    for p in [path, *path.parents]:
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # someone else may have raced us: checked
            os.mkdir(p, DIR_MODE)
        _check_dir(p)
    if not missing:
        _check_dir(path)
    return path


def _check_dir(path: Path) -> None:
    """Ours, a real directory, writable by us alone; others' read bits are removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafePath(f"{path} is a symlink: cafs keeps its files only in a real "
                             "directory (give the path it points to, if that is yours)") from None
        raise UnsafePath(f"{path} is not a usable directory: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        uid = os.geteuid()
        if st.st_uid != uid:
            raise UnsafePath(f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}): "
                             "someone else may control it; remove it or choose another "
                             "directory")
        if st.st_mode & 0o022:
            raise UnsafePath(f"{path} is writable by others (mode {st.st_mode & 0o7777:04o}): "
                             f"someone may have planted files there; check it, then run "
                             f"`chmod 700 {path}`")
        if st.st_mode & 0o077:
            log.warning("%s was readable by others (mode %04o): made private (0700)", path,
                        st.st_mode & 0o7777)
            os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


def _check_ancestors(path: Path) -> None:
    """Nobody but root and us can replace anything on the way to `path`, as written and
    as resolved (a symlink on the way is checked like a directory, then its target)."""
    for chain in (path, Path(os.path.realpath(path))):
        for p in [chain, *chain.parents]:
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue  # created later, 0700, by ensure
            if st.st_uid not in (0, os.geteuid()):
                raise UnsafePath(f"{p} is owned by uid {st.st_uid}: it could replace what "
                                 "cafs keeps beneath it; choose a directory outside it")
            shared = stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022
            if shared and not st.st_mode & stat.S_ISVTX:
                raise UnsafePath(f"{p} is writable by others and not sticky (mode "
                                 f"{st.st_mode & 0o7777:04o}): they could replace what cafs "
                                 "keeps beneath it; choose a directory outside it")


def create(path: Path | str) -> int:
    """A new file at `path`, 0600, open for writing; never through a planted link."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   FILE_MODE)


def temp_name(path: Path) -> Path:
    """A fresh name beside `path` for a file that will be renamed onto it."""
    return path.with_name(f".{path.name}.{os.urandom(4).hex()}")  # secrets.token_hex's source


def write_file(path: Path, data: bytes, fsync: bool = False) -> None:
    """Replace `path` whole with `data`, 0600: written under a new name, then renamed, so
    a link planted at `path` is replaced, never followed, and no reader sees half a file."""
    tmp = temp_name(path)
    fd = create(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_log(path: Path | str) -> int:
    """A log file opened for appending, created 0600; a link at `path` is refused."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   FILE_MODE)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def check_peer(sock: socket.socket, path: Path | str) -> None:
    """Refuse (UnsafePath) a server that is not our own uid, before sending it anything."""
    uid, ours = peer_uid(sock), os.geteuid()
    if uid != ours:
        raise UnsafePath(f"the process listening on {path} runs as uid {uid}, not as you "
                         f"(uid {ours}): refusing to talk to it")
