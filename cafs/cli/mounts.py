"""CLI subcommands of the mount side: mount, umount, stats, run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cafs.cli.units import seconds_arg, size_arg
from cafs.mounts import mount
from cafs.terminal import shown


def cmd_mount(args: argparse.Namespace) -> int:
    from cafs import config

    cfg = config.daemon_config(
        args.image, args.mountpoint, getattr(args, "settings", None), store_url=args.store,
        cache_dir=args.cache_dir, cache_size=args.cache_size,
        fetch_deadline=args.fetch_deadline, record=args.record, profile=args.profile,
        prefetch_weights=args.prefetch_weights, suid_dev=args.allow_suid_dev)
    if args.foreground:
        from cafs.daemon.main import serve

        return serve(cfg)
    pid = mount.start(cfg)
    if not args.quiet:
        print(f"mounted {args.image} at {args.mountpoint} (daemon pid {pid})")
    return 0


def cmd_mount_server(args: argparse.Namespace) -> int:
    from cafs.mounts import server as mountserver

    argv = [] if args.idle_timeout is None else ["--idle-timeout", str(args.idle_timeout)]
    return mountserver.main(argv)


def cmd_umount(args: argparse.Namespace) -> int:
    mount.unmount(args.mountpoint)
    return 0


def _fmt(stats: dict[str, Any]) -> str:
    mib = 1 << 20
    return "\n".join([
        f"fetched on demand: {stats['demand_bytes'] / mib:.1f} MiB "
        f"({stats['demand_blobs']} blobs)",
        f"prefetched:        {stats['prefetch_bytes'] / mib:.1f} MiB "
        f"({stats['prefetch_blobs']} blobs)",
        f"store requests:    {stats.get('store_gets', 0)} "
        f"({stats.get('neighbour_gets', 0)} neighbour pack segments, "
        f"{stats.get('neighbour_bytes', 0) / mib:.1f} MiB; "
        f"{stats.get('library_blobs', 0)} library blobs, "
        f"{stats.get('import_files', 0)} imported files ahead), "
        f"{stats.get('store_bytes', 0) / mib:.2f} MiB as stored",
        f"fetched:           {stats['fetched_percent']:.2f}% of "
        f"{stats['image_bytes'] / mib:.1f} MiB",
        f"cache hit ratio:   {stats['cache_hit_ratio']:.3f} "
        f"({stats['cache_hits']} hits, {stats['cache_misses']} misses)",
        f"reads:             {stats['reads']} ({stats['read_bytes'] / mib:.1f} MiB), "
        f"latency p50 {stats['read_latency_p50_ms']:.2f} ms, "
        f"p99 {stats['read_latency_p99_ms']:.2f} ms",
        f"stuck reads:       {stats['stuck_reads']} (in flight {stats['reads_in_flight']})",
        f"errors:            store {stats['store_errors']}, corrupt {stats['corrupt_blobs']}, "
        f"EIO {stats['eio']}",
        *_fmt_prefetch(stats.get("prefetch")),
        f"metadata served by: {stats.get('metadata', 'fuse')}",
    ])


def _fmt_prefetch(state: dict[str, Any] | None) -> list[str]:
    if not state or not state.get("plans"):
        return []
    plans = ", ".join(f"{shown(p['name'])} {p['state']} {p['done_blobs'] + p['cached_blobs']}/"
                      f"{p['blobs']} blobs" for p in state["plans"])
    return [f"prefetch:          {plans}"]


def cmd_stats(args: argparse.Namespace) -> int:
    stats = mount.query(args.mountpoint, "stats")
    print(json.dumps(stats, indent=1) if args.json else _fmt(stats))
    return 0


STATS_HEADING = "cafs run --stats: the mount at exit"


def cmd_run(args: argparse.Namespace) -> int:
    from cafs.run.container import run
    from cafs.run.spec import RunOptions, Security

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    opts = RunOptions(command=command, env=args.env or [], workdir=args.workdir,
                      user=args.user, host_network=args.net_host,
                      tty=args.tty and sys.stdin.isatty(),
                      security=Security.parse(args.security_opt or []))
    at_exit: list[dict[str, Any]] = []
    status = run(args.image, opts, store_url=args.store, remove=args.rm, name=args.name,
                 cache_dir=args.cache_dir, on_exit=at_exit.append if args.stats else None,
                 profile=args.profile, prefetch_weights=args.prefetch_weights,
                 daemon={"cache_size": args.cache_size, "fetch_deadline": args.fetch_deadline,
                         "settings": getattr(args, "settings", None)})
    if at_exit:  # after the container's own output, under a heading, with its exit status
        print(f"{STATS_HEADING} (container exited {status}):\n{_fmt(at_exit[0])}",
              file=sys.stderr)
    return status


def prefetch_options(p: argparse.ArgumentParser) -> None:
    """--profile/--no-profile and --prefetch-weights, shared by mount, run and profile."""
    p.add_argument("--profile", default="default", metavar="NAME",
                   help="startup profile to replay if the image has it (default: default)")
    p.add_argument("--no-profile", dest="profile", action="store_const", const=None,
                   help="replay no profile")
    p.add_argument("--prefetch-weights", nargs="?", const="on", default="auto",
                   choices=("auto", "on", "off"),
                   help="fetch model weight files ahead of reads (auto: on GPU nodes)")
    p.add_argument("--no-prefetch-weights", dest="prefetch_weights", action="store_const",
                   const="off")




def daemon_options(p: argparse.ArgumentParser) -> None:
    """The daemon's settings a flag may set over the file and CAFS_* (cafs/config.py)."""
    p.add_argument("--store")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--cache-size", type=size_arg, help="cache budget (e.g. 200G; default: "
                   "[cache] size, CAFS_CACHE_SIZE, else a quarter of the cache's disk)")
    p.add_argument("--fetch-deadline", type=seconds_arg, metavar="SECONDS",
                   help="seconds before a read that cannot be served gets EIO (default: "
                        "[mount] fetch_deadline, CAFS_FETCH_DEADLINE, else 60)")




def security_options(p: argparse.ArgumentParser) -> None:
    """--security-opt, shared by run and profile (cafs/run/spec.py's Security)."""
    p.add_argument("--security-opt", action="append", metavar="OPT",
                   help="lift a default confinement (containerd's): seccomp=unconfined (no "
                        "seccomp profile), systempaths=unconfined (no masked or read-only "
                        "/proc and /sys paths); or no-new-privileges (setuid binaries in "
                        "the image stop working)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("mount", help="mount an indexed image lazily (returns once mounted)")
    p.add_argument("image", help="ref | sha256:MANIFEST | chain:sha256:ID | index:BLAKE3")
    p.add_argument("mountpoint", type=Path)
    daemon_options(p)
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--allow-suid-dev", action="store_true",
                   help="honour the image's setuid bits and device files (default: the mount "
                        "is nosuid,nodev, else any user who can reach it runs setuid-root "
                        "binaries as root); only for a mountpoint under a root-only (0700) "
                        "directory that a runtime uses directly as a container's root")
    p.add_argument("--record", metavar="NAME",
                   help="record a startup profile NAME (saved at unmount or on request)")
    prefetch_options(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("mount-server", help="serve fast mounts: daemons forked from one "
                       "process that has loaded the code already (foreground)")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="seconds without a request before it exits (default 3600)")
    p.set_defaults(func=cmd_mount_server)

    p = sub.add_parser("umount", help="unmount a cafs mount and stop its daemon")
    p.add_argument("mountpoint", type=Path)
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("stats", help="figures of a mount: fetched, cache hits, latency")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("run", help="run a container from an indexed image with runc")
    p.add_argument("image")
    p.add_argument("--rm", action="store_true", help="remove the container's layer after")
    p.add_argument("-e", "--env", action="append", help="KEY=VALUE")
    p.add_argument("-w", "--workdir")
    p.add_argument("-u", "--user")
    p.add_argument("--name")
    p.add_argument("--net-host", action="store_true", help="share the host's network")
    p.add_argument("-t", "--tty", action="store_true")
    security_options(p)
    p.add_argument("--stats", action="store_true", help="print what was fetched, at exit")
    daemon_options(p)
    prefetch_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)

