"""Trust on a shared node: another local user can neither squat cafs's directories and
sockets, nor read the node cache or a file:// store, nor plant files cafs trusts; and a
user's own mount works, for that user alone. Each attack runs as a real unprivileged user.

Commands run as a user with the system's interpreter (the test venv's lives under root's
0700 home) on the venv's packages, which it can load (same Python minor version). Where a
user must mount, they run in a mount namespace of their own whose /dev/fuse they may open
(this node's is root's alone), as on a node where FUSE is open to users.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from users import User, ensure_user, reachable_dir, readable

import cafs
from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from cafs import paths
from cafs.mounts import mount
from indexer.build import IndexOptions, index_image
from indexer.sources import open_source

pytestmark = pytest.mark.root
CODE: list[str] = []  # where the users below import cafs and its packages from (_code)
SYSTEM_PYTHON = "/usr/bin/python3"
SECRET = b"root's eyes only\n"


@pytest.fixture(scope="module", autouse=True)
def _code() -> Iterator[None]:
    """The checkout and the venv's packages, reachable by the users these tests run as."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with readable([Path(cafs.__file__).resolve().parent.parent,
                   Path(pyfuse3.__file__).resolve().parent.parent]) as dirs:
        CODE[:] = dirs
        yield
    CODE.clear()


def _system_python_can_load_the_venv() -> None:
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(sys.version_info[:2]), \
        f"{SYSTEM_PYTHON} is {out}: it cannot load this venv's packages as another user"


def cafs_as(user: User, *args: str | Path, env: dict[str, str] | None = None,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`cafs ARGS` run as `user` (with `env` on top of a clean one), in `prefix`'s
    namespace if given."""
    variables = [f"{k}={v}" for k, v in {"PYTHONPATH": ":".join(CODE), **(env or {})}.items()]
    argv = user.command("env", *variables, SYSTEM_PYTHON, "-m", "cafs", *map(str, args))
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture(scope="session")
def victim() -> User:
    """A second unprivileged user: the one the attacker is after."""
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    return ensure_user("cafs-victim")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, others may pass through (a user's home under
    pytest's tmp_path would be too long a run dir for a unix socket's path)."""
    path = Path(tempfile.mkdtemp(prefix="cafs-t-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, str, Path]:
    """(store URL, ref, store dir): an image with a file only root may read."""
    layout = tmp_path / "layout"
    build_layout(layout, "t", [[Entry("pub", data=b"for all\n"),
                                Entry("secret", data=SECRET, mode=0o600)]])
    store = reachable_dir(tmp_path / "node") / "store"
    url = f"file://{store}"
    rec = index_image(open_source(f"oci:{layout}:t"), open_store(url), IndexOptions()).record
    return url, rec.ref, store


def _owned_by(user: User, path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, user.uid, user.gid)
    path.chmod(mode)
    return path


def as_user(prefix: tuple[str, ...], user: User, *argv: str | Path
            ) -> subprocess.CompletedProcess[str]:
    """argv run as `user` inside the namespace `prefix` enters."""
    return subprocess.run([*prefix, *user.command(*argv)], capture_output=True, text=True,
                          timeout=60, check=False)


def _store_of(user: User, image: tuple[str, str, Path], home: Path) -> str:
    """A copy of the image's store that `user` owns (a store is private to its owner)."""
    _, _, store = image
    copy = home / "store"
    shutil.copytree(store, copy)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(copy)], check=True)
    return f"file://{copy}"


@pytest.fixture
def fuse_ns(tmp_path: Path) -> Iterator[tuple[str, ...]]:
    """A mount namespace whose /dev/fuse any user may open; yields the command prefix that
    enters it. Mounts made in it go when it does."""
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                               "sleep", "infinity"])
    prefix = ("nsenter", "-t", str(holder.pid), "-m", "--")
    node = tmp_path / "fuse-dev"
    try:
        for _ in range(100):  # until unshare has made the namespace and become sleep
            if os.readlink(f"/proc/{holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                break
            time.sleep(0.02)
        subprocess.run([*prefix, "sh", "-ec", f"mknod {node} c 10 229; chmod 666 {node}; "
                        f"mount --bind {node} /dev/fuse"], check=True, capture_output=True)
        yield prefix
    finally:
        holder.kill()
        holder.wait()


LISTENER = """
import os, socket, sys
path, record = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), mode=0o777, exist_ok=True)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o777)
s.listen(8)
s.settimeout(30)
open(record + ".ready", "w").close()
got = 0
try:
    while True:
        conn, _ = s.accept()
        conn.settimeout(5)
        try:
            conn.sendall(b'{"ok":{"pid":1}}\\n{"ok":"mounted"}\\n')
            while True:
                part = conn.recv(65536)
                if not part:
                    break
                got += len(part)
                with open(record, "w") as f:
                    f.write(str(got))
        except OSError:
            pass
        conn.close()
except OSError:
    pass
"""


Listen = Callable[[Path], Path]


@pytest.fixture
def listener(attacker: User, tmp_path: Path) -> Iterator[Listen]:
    """Starts, as the attacker, a fake mount server at a path; yields a function that
    starts one and returns the file where it records how many bytes it was sent."""
    procs: list[subprocess.Popen[str]] = []
    loot = _owned_by(attacker, reachable_dir(tmp_path / "loot"))

    def listen(sock: Path) -> Path:
        record = loot / f"bytes-{len(procs)}"
        procs.append(subprocess.Popen(attacker.command(SYSTEM_PYTHON, "-I", "-c", LISTENER,
                                                       str(sock), str(record))))
        deadline = time.monotonic() + 15
        while not Path(f"{record}.ready").exists():
            assert time.monotonic() < deadline and procs[-1].poll() is None, "no listener"
            time.sleep(0.05)
        return record

    yield listen
    for proc in procs:
        proc.kill()
        proc.wait()


def _received(record: Path) -> int:
    return int(record.read_text()) if record.exists() else 0


# --- item 1: run-directory squatting --------------------------------------------------------


def test_a_squatted_tmp_run_dir_receives_nothing_and_the_mount_is_real(
        attacker: User, victim: User, image: tuple[str, str, Path], listener: Listen,
        fuse_ns: tuple[str, ...], short_dir: Path) -> None:
    """The real case: a user without XDG_RUNTIME_DIR (su, cron, CI) whose old default run
    dir, /tmp/cafs-<uid>/cafs, the attacker made first and listens in."""
    _system_python_can_load_the_venv()
    squat = Path(f"/tmp/cafs-{victim.uid}")
    shutil.rmtree(squat, ignore_errors=True)
    try:
        attacker.run("mkdir", "-m", "777", "-p", str(squat / "cafs"))
        record = listener(squat / "cafs" / "mountd.sock")
        home = _owned_by(victim, short_dir / "home")
        url = _store_of(victim, image, home)
        mnt = _owned_by(victim, home / "mnt")
        env = {"HOME": str(home), "AWS_SECRET_ACCESS_KEY": "victim-secret"}
        res = cafs_as(victim, "mount", image[1], mnt, "--store", url, env=env, prefix=fuse_ns)
        try:
            assert _received(record) == 0
            assert "(daemon pid 1)" not in res.stdout + res.stderr
            assert res.returncode == 0, res.stderr
            listing = as_user(fuse_ns, victim, "cat", mnt / "pub")
            assert listing.stdout == "for all\n"  # mounted for real, by the victim
        finally:
            cafs_as(victim, "umount", mnt, env=env, prefix=fuse_ns)
    finally:
        shutil.rmtree(squat, ignore_errors=True)


def test_a_run_dir_another_user_owns_is_refused_before_anything_is_sent(
        attacker: User, image: tuple[str, str, Path], listener: Listen, tmp_path: Path,
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, ref, _ = image
    squat = _owned_by(attacker, short_dir / "run", 0o777)
    record = listener(squat / "mountd.sock")
    monkeypatch.setenv("CAFS_RUN_DIR", str(squat))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "root-secret")
    (tmp_path / "mnt").mkdir()
    with pytest.raises(mount.MountError, match=f"owned by uid {attacker.uid}"):
        mount.mount_detached(ref, tmp_path / "mnt", store_url=url, cache_dir=tmp_path / "c")
    assert _received(record) == 0


def test_a_server_of_another_uid_gets_nothing_even_in_our_own_run_dir(
        attacker: User, image: tuple[str, str, Path], listener: Listen, tmp_path: Path,
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker got a listener into the run dir while it was open to them (an old
    version's mode, say); the dir is ours and private now, the server still is not."""
    url, ref, _ = image
    run = short_dir / "run"
    run.mkdir(mode=0o777)
    run.chmod(0o777)
    record = listener(run / "mountd.sock")
    run.chmod(0o700)
    monkeypatch.setenv("CAFS_RUN_DIR", str(run))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "root-secret")
    (tmp_path / "mnt").mkdir()
    with pytest.raises(mount.MountError, match=f"runs as uid {attacker.uid}"):
        mount.mount_detached(ref, tmp_path / "mnt", store_url=url, cache_dir=tmp_path / "c")
    assert _received(record) == 0


def test_a_link_planted_at_info_json_overwrites_nothing(
        attacker: User, image: tuple[str, str, Path], tmp_path: Path, short_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url, ref, _ = image
    precious = tmp_path / "precious"
    precious.write_text("keep me\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = _owned_by(attacker, short_dir / "run", 0o777)
    monkeypatch.setenv("CAFS_RUN_DIR", str(run))
    state = paths.mount_state_dir(mnt)
    attacker.run("mkdir", "-m", "777", "-p", str(state))
    attacker.run("ln", "-s", str(precious), str(state / "info.json"))
    assert (state / "info.json").is_symlink()
    refused = None
    try:
        mount.mount_detached(ref, mnt, store_url=url, cache_dir=tmp_path / "cache")
    except mount.MountError as exc:
        refused = str(exc)
    finally:
        if mount.is_mounted(mnt):
            mount.unmount(mnt)
    assert precious.read_text() == "keep me\n"
    assert refused is not None and f"owned by uid {attacker.uid}" in refused


# --- item 3: the node cache and the file:// store are private -------------------------------

PEEK = """
import json, os, sys
found = []
for path in json.loads(sys.argv[1]):
    try:
        if os.path.isdir(path):
            found.append([path, os.listdir(path)])
        else:
            with open(path, "rb") as f:
                found.append([path, f.read().decode("latin-1")])
    except OSError as exc:
        print(exc, file=sys.stderr)
print(json.dumps(found))
"""


@pytest.mark.parametrize("cache_was", ["new", "left open by an older cafs"])
def test_cache_and_store_are_unreadable_to_other_users(
        attacker: User, image: tuple[str, str, Path], tmp_path: Path, cache_was: str) -> None:
    url, ref, store = image
    cache = reachable_dir(tmp_path / "node") / "cache"
    if cache_was != "new":
        for d in (cache, cache / "blobs", cache / "indexes"):
            d.mkdir(mode=0o755)
            d.chmod(0o755)
    inside = []
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount.mount_detached(ref, mnt, store_url=url, cache_dir=cache, log_file=tmp_path / "log")
    try:
        assert (mnt / "secret").read_bytes() == SECRET
    finally:
        mount.unmount(mnt)
    for root in (cache, store):
        for dirpath, _, filenames in os.walk(root):
            inside.append(dirpath)
            inside += [os.path.join(dirpath, n) for n in filenames]
    assert any(SECRET in Path(p).read_bytes() for p in inside if os.path.isfile(p))
    res = attacker.python(PEEK.replace("sys.argv[1]", repr(json.dumps(inside))))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []


def test_a_mount_request_carries_only_what_a_daemon_reads(
        image: tuple[str, str, Path], tmp_path: Path, short_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Even to our own server: not the environment wholesale."""
    url, ref, _ = image
    monkeypatch.setenv("CAFS_RUN_DIR", str(short_dir / "run"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "for the daemon")
    monkeypatch.setenv("UNRELATED_TOKEN", "for nobody")
    server = socket.socket(socket.AF_UNIX)
    (short_dir / "run").mkdir(mode=0o700)
    server.bind(str(paths.mount_server_socket()))
    server.listen(1)
    requests: list[dict[str, Any]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as f:
            requests.append(json.loads(f.readline()))
            conn.sendall(b'{"error":"stale"}\n')  # the client then starts the daemon itself

    thread = threading.Thread(target=serve)
    thread.start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mount.mount_detached(ref, mnt, store_url=url, cache_dir=tmp_path / "cache",
                             log_file=tmp_path / "log")
        mount.unmount(mnt)
    finally:
        thread.join(timeout=10)
        server.close()
    env = requests[0]["env"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "for the daemon" and "UNRELATED_TOKEN" not in env


# --- item 6: a cache others can write is refused --------------------------------------------


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_a_cache_dir_others_can_write_is_refused(
        attacker: User, image: tuple[str, str, Path], tmp_path: Path, how: str) -> None:
    url, ref, _ = image
    cache = reachable_dir(tmp_path / "node") / "cache"
    if how == "writable by others":
        cache.mkdir(mode=0o777)
        cache.chmod(0o777)
    else:
        _owned_by(attacker, cache)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        with pytest.raises(mount.MountError, match=how.replace("another user", "uid")):
            mount.mount_detached(ref, mnt, store_url=url, cache_dir=cache,
                                 log_file=tmp_path / "log")
    finally:
        if mount.is_mounted(mnt):
            mount.unmount(mnt)


# --- item 9: a user's own mount --------------------------------------------------------------


def test_a_users_mount_works_and_is_theirs_alone(
        attacker: User, image: tuple[str, str, Path], fuse_ns: tuple[str, ...],
        short_dir: Path) -> None:
    """No allow_other for a user (fusermount3 refuses it on a default /etc/fuse.conf): the
    mount works, the user reads it, and nobody else, root included, can even look."""
    _system_python_can_load_the_venv()
    home = _owned_by(attacker, short_dir / "home")
    url = _store_of(attacker, image, home)
    mnt = _owned_by(attacker, home / "mnt", 0o755)
    env = {"HOME": str(home)}
    res = cafs_as(attacker, "mount", image[1], mnt, "--store", url, env=env, prefix=fuse_ns)
    try:
        assert res.returncode == 0, res.stderr
        assert as_user(fuse_ns, attacker, "cat", mnt / "pub").stdout == "for all\n"
        nobody = User("nobody", 65534, 65534)
        other = as_user(fuse_ns, nobody, "ls", mnt)
        assert other.returncode != 0 and "Permission denied" in other.stderr
        as_root = subprocess.run([*fuse_ns, "ls", str(mnt)], capture_output=True, text=True)
        assert as_root.returncode != 0 and "Permission denied" in as_root.stderr
    finally:
        res = cafs_as(attacker, "umount", mnt, env=env, prefix=fuse_ns)
    assert res.returncode == 0, res.stderr
