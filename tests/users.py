"""A real unprivileged local user for attack tests: the attacker on a shared node.

Attacks must run as a real other uid (not root with a dropped capability), because the
kernel's permission checks are what the tests are about. The user is created once per
machine (`useradd --system`, no home, no login shell) and reused; commands run as it
through `setpriv`, with no supplementary groups and a clean environment.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

NAME = "cafs-attacker"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def command(self, *argv: str | os.PathLike[str]) -> list[str]:
        """argv run as this user: its uid and gid, no other groups, no inherited env."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/",
                *map(str, argv)]

    def run(self, *argv: str | os.PathLike[str], timeout: float = 60,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run argv as this user; never raises on a non-zero exit (an attack may fail)."""
        return subprocess.run(self.command(*argv), capture_output=True, text=True,
                              timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]

    def python(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run stdlib-only Python code as this user, with the system's interpreter (the
        test venv's may live under root's 0700 home, out of the user's reach)."""
        return self.run("/usr/bin/python3", "-I", "-c", code, timeout=timeout)


def ensure_user(name: str = NAME) -> User:
    """The unprivileged user, created if missing (needs root)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    assert pw.pw_uid != 0
    return User(name, pw.pw_uid, pw.pw_gid)


def reachable_dir(path: Path) -> Path:
    """Make `path` (created) and every parent up to / traversable by other users (0711 on
    directories root owns that deny it), so an attacker can reach what the test puts there.
    pytest's tmp_path lives under a 0700 directory that would otherwise hide everything."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_mode & 0o001 == 0:
            os.chmod(p, (st.st_mode & 0o7777) | 0o011)
    return path


@contextlib.contextmanager
def readable(dirs: Sequence[Path]) -> Iterator[list[str]]:
    """`dirs` (the checkout, the venv's packages) where other users can reach them: each
    bind-mounted read-only under a fresh 0755 directory. A checkout may live under a home
    other users cannot enter (a newcomer's clone in /root is 0700), so running cafs as an
    attacker from the checkout's own path would fail before any attack. Needs root."""
    base = Path(tempfile.mkdtemp(prefix="cafs-code-"))
    base.chmod(0o755)
    targets: list[Path] = []
    try:
        for n, src in enumerate(dirs):
            target = base / str(n)
            target.mkdir(mode=0o755)
            targets.append(target)
            subprocess.run(["mount", "--bind", str(src), str(target)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield [str(t) for t in targets]
    finally:
        for target in reversed(targets):
            subprocess.run(["umount", "-l", str(target)], check=False)
            if not os.path.ismount(target):  # never delete through a mount
                os.rmdir(target)
        with contextlib.suppress(OSError):
            base.rmdir()
