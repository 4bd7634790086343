"""`cafs snapshotter` and `cafs pull`: registered into the cafs CLI by `add_commands`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from cafs.terminal import shown
from snapshotter import CONTAINERD_ADDRESS as DEFAULT_ADDRESS

# grpc and the generated stubs are imported by the commands that use them, not to build the
# parser: every `cafs` invocation builds it.

if TYPE_CHECKING:
    from snapshotter.pullprotocol import PullResult

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/cafs/snapshotter"
WATCHDOG_EVERY = 5  # seconds between checks that remote layers in use are still served
DEFAULT_SOCKET = "/run/cafs/snapshotter.sock"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    sn = subparsers.add_parser(
        "snapshotter",
        help="serve the containerd proxy snapshotter",
        description="Serve containerd's snapshots API on a unix socket: indexed layers are "
        "mounted lazily from the store, everything else works as overlayfs.",
    )
    sn.add_argument(
        "--root", default=None, type=Path, help=f"state (default {DEFAULT_ROOT})"
    )
    sn.add_argument(
        "--address", default=None, type=Path, help=f"socket (default {DEFAULT_SOCKET})"
    )
    sn.add_argument(
        "--metrics-address", default=None, help="HOST:PORT for a Prometheus endpoint (off)"
    )
    sn.add_argument(
        "--store", default=None, help="store URL (default: $CAFS_STORE or the local store)"
    )
    sn.add_argument("--cache-dir", default=None, type=Path, help="node blob cache for FUSE mounts")
    sn.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sn.add_argument("--no-mount-server", action="store_true",
                    help="start each FUSE daemon as a new interpreter (slower mounts)")
    sn.set_defaults(func=run_snapshotter)

    pl = subparsers.add_parser(
        "pull",
        help="make an indexed image appear in containerd without downloading its layers",
        description="Create the image in containerd and prepare its layers through the cafs "
        "snapshotter, so `ctr run --snapshotter cafs REF` starts it lazily.",
    )
    pl.add_argument("ref", help="image reference as indexed (e.g. docker.io/library/python:3.12)")
    pl.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"containerd socket (default {DEFAULT_ADDRESS})"
    )
    pl.add_argument("--namespace", "-n", default="default", help="containerd namespace")
    pl.add_argument(
        "--snapshotter-address", default=DEFAULT_SOCKET,
        help="the cafs snapshotter's socket: it reads its store for the pull, and --store is "
        f"read only where it cannot (default {DEFAULT_SOCKET})",
    )
    pl.add_argument(
        "--store", default=None, help="store URL (default: $CAFS_STORE or the local store)"
    )
    pl.add_argument(
        "--snapshotter", default="cafs", help="containerd's name for the cafs proxy plugin"
    )
    pl.add_argument("--name", default=None, help="image name in containerd (default: the full ref)")
    pl.set_defaults(func=run_pull)


def _setup_logging(level: str) -> None:
    """The daemon's --log-level wins over whatever the cafs CLI configured for commands."""
    from cafs import logs

    logs.setup(getattr(logging, level.upper()))


def run_snapshotter(args: argparse.Namespace) -> int:
    from blobstore import StoreError, default_store_url, open_store
    from cafs.mounts.server import start_child as start_mount_server
    from snapshotter.catalog import Catalog
    from snapshotter.pullprotocol import pull_socket
    from snapshotter.pullservice import PullServer, puller
    from snapshotter.remote import CafsMounter
    from snapshotter.service import Server
    from snapshotter.snapshotter import Snapshotter

    _setup_logging(getattr(args, "log_level", "info"))
    args.root = args.root or Path(DEFAULT_ROOT)
    args.address = args.address or Path(DEFAULT_SOCKET)
    store_url = args.store or default_store_url()
    try:
        store = open_store(store_url)
        catalog = Catalog(store)
        mounter = CafsMounter(catalog, store.url, args.cache_dir,
                              getattr(args, "settings", None))
        snapshotter = Snapshotter(args.root, mounter)
    except (StoreError, OSError, RuntimeError) as exc:
        print(f"cafs snapshotter: {shown(str(exc))}", file=sys.stderr)
        return 2
    metrics = None
    if getattr(args, "metrics_address", None):
        from snapshotter.metrics import SnapshotterMetrics

        metrics = SnapshotterMetrics(snapshotter)  # before the server: it counts every call
    server = Server(snapshotter, args.address,
                    interceptors=[metrics.interceptor()] if metrics else [])
    pulls = PullServer(pull_socket(server.address), puller(catalog, mounter.warm))
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        snapshotter.close()
        print(f"cafs snapshotter: {shown(str(exc))}", file=sys.stderr)
        return 1
    try:
        pulls.start()
    except (OSError, RuntimeError) as exc:
        server.stop()  # ours: it started; closes the snapshotter too
        print(f"cafs snapshotter: {shown(str(exc))}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics is not None:
        from snapshotter.metrics import serve

        try:
            serve(args.metrics_address, metrics)
        except (OSError, ValueError) as exc:
            server.stop()
            print(f"cafs snapshotter: metrics endpoint {args.metrics_address}: "
                  f"{shown(str(exc))}",
                  file=sys.stderr)
            return 1
    mount_server = start_mount_server() if not getattr(args, "no_mount_server", False) else None
    recovery = threading.Thread(target=snapshotter.recover, name="recover", daemon=True)
    recovery.start()
    ticks = 0
    while not stop.wait(1.0):
        mounter.reap()
        ticks += 1
        if ticks % WATCHDOG_EVERY == 0:
            snapshotter.heal()
    recovery.join(timeout=10)
    pulls.stop()
    server.stop()
    if mount_server is not None:
        mount_server.terminate()
        mount_server.wait(timeout=10)
    return 0


def run_pull(args: argparse.Namespace) -> int:
    """Asks the snapshotter to pull (snapshotter/pullservice.py); where none answers on its
    pull socket (not running, an older one), pulls in this process from --store."""
    try:
        result = _pull_by_snapshotter(args)
        if result is None:
            result = _pull_here(args)
    except _PullFailed as exc:
        print(f"cafs pull: {shown(str(exc))}", file=sys.stderr)
        return 1
    print(
        f"{shown(result.name)}: {len(result.prepared)} layers served by cafs, "
        f"{len(result.present)} already present (top chain {result.top_chain})"
    )
    return 0


class _PullFailed(Exception):
    pass


def _pull_by_snapshotter(args: argparse.Namespace) -> PullResult | None:
    """The snapshotter's pull; None where none listens on its pull socket."""
    from cafs import ipc
    from snapshotter.pullprotocol import PullRequest, ask, pull_socket

    sock = pull_socket(args.snapshotter_address)
    request = PullRequest(ref=args.ref, name=args.name, address=os.path.abspath(args.address),
                          namespace=args.namespace, snapshotter=args.snapshotter)
    try:
        return ask(sock, request)
    except ipc.ErrorReply as exc:
        raise _PullFailed(str(exc)) from exc
    except (OSError, ipc.ProtocolError) as exc:  # not ours, or broken: never pulled around
        raise _PullFailed(f"snapshotter pull socket {sock}: {exc}") from exc


def _pull_here(args: argparse.Namespace) -> PullResult:
    from blobstore import StoreError
    from snapshotter.catalog import CatalogError
    from snapshotter.pull import PullError, pull

    try:
        return pull(args.ref, address=args.address, namespace=args.namespace,
                    store_url=args.store, snapshotter=args.snapshotter, name=args.name)
    except (PullError, CatalogError, StoreError) as exc:
        raise _PullFailed(str(exc)) from exc
