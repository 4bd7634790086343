"""stargz-snapshotter, the lazy-pulling peer cafs is measured against: its daemon, built here.

Debian packages stargz-snapshotter's Go library (`golang-github-containerd-stargz-snapshotter-
dev`) and its client `ctr-remote` (`stargz-snapshotter`), but not the daemon: upstream's main
pulls in CRI and kubeconfig keychains that need Kubernetes Go packages Debian lacks. So the
bench builds its own small main (`bench/stargz/main.go`: docker-config keychain, in-memory
metadata store) with Debian's Go in GOPATH mode over `/usr/share/gocode`, plus a private
GOPATH holding a type-only stand-in for the one CRI package the packaged resolver imports
(`bench/stargz/criapi/auth.go`) and a link for go-fuse, which Debian installs without the
`/v2` of its import path. The binary is cached under `build/stargz/`, keyed by a hash
of the sources, the Go version and the library's version, so it is built once (a few
minutes of CPU) and reused.

`unavailable()` names what is missing without building; `build()` returns the binary or
raises `StargzUnavailable` (a package is missing) or `StargzBuildError` (it is there and the
build failed: a bug to fix, never a reason to skip).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).resolve().parent / "stargz"
MAIN = SOURCE / "main.go"
STAND_IN = SOURCE / "criapi" / "auth.go"
STAND_IN_PACKAGE = "k8s.io/cri-api/pkg/apis/runtime/v1alpha2"
GOCODE = Path("/usr/share/gocode")
# Import paths with a major-version suffix that Debian installs without it: GOPATH mode
# (no modules) finds them only through a link of that name in the private GOPATH.
VERSION_ALIASES = {"github.com/hanwen/go-fuse/v2": "github.com/hanwen/go-fuse"}
LIBRARY = GOCODE / "src/github.com/containerd/stargz-snapshotter"
LIBRARY_PACKAGE = "golang-github-containerd-stargz-snapshotter-dev"
BUILD_DIR = REPO / "build" / "stargz"
BINARY_NAME = "cafs-stargz-grpc"
PLUGIN = "stargz"  # the proxy plugin name ctr-remote rpull uses by default
BUILD_TIMEOUT = 1800.0

# Debian packages (bookworm) that building and running the peer needs, with what needs them.
PACKAGES = {
    "golang-go": "go",
    LIBRARY_PACKAGE: str(LIBRARY),
    "stargz-snapshotter": "ctr-remote",
}


class StargzUnavailable(RuntimeError):
    """A package the peer needs is not installed (the message says which)."""


class StargzBuildError(RuntimeError):
    """The packages are there, and building the daemon failed."""


def unavailable() -> str | None:
    """Why the peer cannot run here (one line naming the package), or None."""
    missing = []
    for package, what in PACKAGES.items():
        found = Path(what).exists() if what.startswith("/") else shutil.which(what)
        if not found:
            missing.append(package)
    if missing:
        return f"needs {' '.join(missing)} (apt-get install {' '.join(missing)})"
    return None


def _library_version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", LIBRARY_PACKAGE],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def source_key() -> str:
    """What the binary depends on: our sources, the Go toolchain, the library's version."""
    go = subprocess.run(["go", "version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    parts = (MAIN.read_bytes(), STAND_IN.read_bytes(), go.encode(), _library_version().encode())
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def build() -> Path:
    """The daemon's binary, built on first use (GO111MODULE=off, GOPATH = a private dir with
    the stand-in, then /usr/share/gocode) and cached under build/stargz/KEY/."""
    reason = unavailable()
    if reason is not None:
        raise StargzUnavailable(f"stargz-snapshotter: {reason}")
    out = BUILD_DIR / source_key()
    binary = out / BINARY_NAME
    if binary.exists():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix="gopath-") as gopath:
        stand_in = Path(gopath, "src", STAND_IN_PACKAGE)
        stand_in.mkdir(parents=True)
        shutil.copy(STAND_IN, stand_in / STAND_IN.name)
        for alias, path in VERSION_ALIASES.items():
            link = Path(gopath, "src", alias)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(GOCODE / "src" / path)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": f"{gopath}:{GOCODE}",
            "GOCACHE": str(BUILD_DIR / "go-cache"),
            "GOFLAGS": "",
            "GOPROXY": "off",
            "CGO_ENABLED": "0",
        }
        partial = out / f"{BINARY_NAME}.partial"
        proc = subprocess.run(
            ["go", "build", "-o", str(partial), str(MAIN)],
            cwd=gopath,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise StargzBuildError(f"go build of {MAIN} failed: {proc.stderr.strip()[-3000:]}")
        partial.rename(binary)  # atomic: a concurrent build finds a whole binary or none
    return binary


def daemon(binary: Path) -> Callable[[Path, Path], list[str]]:
    """How to start the daemon, for `Cluster.add_proxy`: (root, socket) -> argv."""

    def command(root: Path, socket: Path) -> list[str]:
        return [str(binary), "--root", str(root), "--address", str(socket), "--log-level", "warn"]

    return command
