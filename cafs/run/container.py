"""`cafs run`: a container from an indexed image, on a lazy root filesystem, with runc.

The image is mounted read-only through FUSE and an overlay puts a private upper layer on
top, exactly the shape containerd gives a container, without containerd.

The overlay (the container's root) must honour setuid bits for the container's own users,
so, as containerd does with its bundles and snapshots, every bundle lives in a directory
only root can enter: a local user who could reach the rootfs could run the image's
setuid-root binaries as root (Docker's CVE-2021-41091). The lazy mount below it is
nosuid,nodev besides (cafs/daemon/main.py); the kernel checks setuid on the mount a binary is
executed from, which is the overlay, so that does not reach into the container.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blobstore import open_store, privatedir
from cafs import paths
from cafs.mounts import mount
from cafs.resolve import load_mount_index
from cafs.run.spec import RunOptions, build_spec
from indexer.catalog import find_image


class RunError(RuntimeError):
    """The container could not be set up or run."""


@dataclass
class Bundle:
    root: Path

    @property
    def lower(self) -> Path:
        return self.root / "lower"

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"


def _make_bundle(containers: Path, cid: str) -> Bundle:
    """The container's bundle dir, created 0700 under a 0700 parent (made so if an older
    cafs left it open); refused if the name is taken or would leave `containers`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", cid):
        raise RunError(f"bad container name {cid!r}: use letters, digits and _ . + - "
                       "(not first)")
    containers.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(containers, 0o700)
    bundle = Bundle(containers / cid)
    try:
        bundle.root.mkdir(mode=0o700)
    except FileExistsError:
        raise RunError(f"a container named {cid!r} already exists ({bundle.root})") from None
    return bundle


def _sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RunError(f"{' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}")


@contextlib.contextmanager
def _mounted(b: Bundle, index_key: str, store_url: str | None,
             cache_dir: Path | None, options: dict[str, Any]) -> Iterator[None]:
    privatedir.ensure(b.root)  # the rootfs's upper dir holds the container's own files
    for d in (b.lower, b.upper, b.work, b.rootfs):
        d.mkdir(exist_ok=True)
    mount.mount_detached(f"index:{index_key}", b.lower, store_url=store_url,
                         cache_dir=cache_dir, **options)
    try:
        opts = f"lowerdir={b.lower},upperdir={b.upper},workdir={b.work}"
        _sh("mount", "-t", "overlay", "overlay", "-o", opts, str(b.rootfs))
        try:
            yield
        finally:
            _sh("umount", str(b.rootfs))
    finally:
        mount.unmount(b.lower)


def run(ref: str, opts: RunOptions, *, store_url: str | None = None, remove: bool = False,
        name: str | None = None, cache_dir: Path | None = None,
        on_exit: Callable[[dict[str, Any]], None] | None = None, record: str | None = None,
        profile: str | None = "default", prefetch_weights: str = "auto",
        daemon: dict[str, Any] | None = None) -> int:
    """Run to completion; returns the container's exit status. `on_exit` gets the mount's
    stats just before it is unmounted. The mount replays the image's `profile`, or with
    `record` records one (saved by the daemon when the container's mount goes away).
    `daemon`: more of cafs.mounts.mount.mount_detached's settings (cache_size, fetch_deadline,
    settings), resolved with the rest into the daemon's one configuration."""
    if os.geteuid() != 0:
        raise RunError("cafs run needs root (overlay mounts and runc)")
    if shutil.which("runc") is None:
        raise RunError("runc is not installed (apt-get install runc)")
    store = open_store(store_url)
    image = find_image(store, ref)
    # Through the node cache: the mount daemon loads the same index right after.
    index, _ = load_mount_index(store, f"index:{image.index}", cache_dir or paths.cache_dir())
    config = index.config.get("config", {})
    cid = name or f"cafs-{secrets.token_hex(6)}"
    bundle = _make_bundle(paths.run_dir() / "containers", cid)
    try:
        options = {"record": record, "profile": profile,
                   "prefetch_weights": prefetch_weights, **(daemon or {})}
        with _mounted(bundle, image.index, store_url, cache_dir, options):
            spec = build_spec(config, bundle.rootfs, opts)
            (bundle.root / "config.json").write_text(json.dumps(spec, indent=1))
            try:
                return subprocess.run(["runc", "run", "--bundle", str(bundle.root), cid]
                                      ).returncode
            finally:
                subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
                if on_exit is not None:
                    on_exit(mount.query(bundle.lower, "stats"))
    finally:
        if remove:
            shutil.rmtree(bundle.root, ignore_errors=True)
