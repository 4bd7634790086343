"""Operator subcommands: gc, rm, cache status|prune."""

from __future__ import annotations

import argparse
import json
from typing import Any

from blobstore import open_store
from blobstore.cache import NodeCache
from cafs import paths
from cafs.cli.units import mib, size_arg
from cafs.terminal import shown
from indexer.gc import GRACE, collect, remove_ref


def cmd_gc(args: argparse.Namespace) -> int:
    report = collect(open_store(args.store), grace=args.grace, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(vars(report), indent=1))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{report.images} images, {report.live_indexes} live indexes, "
          f"{report.live_blobs} live blobs; {verb} {len(report.deleted)} objects "
          f"({mib(report.deleted_bytes)}); kept {report.kept_young} unreferenced objects "
          f"younger than {args.grace:.0f}s")
    if args.verbose_list:
        for key in report.deleted:
            print(f"  {shown(key)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    for ref in args.refs:
        rec = remove_ref(store, ref)
        print(f"removed {shown(ref)} ({shown(rec.manifest_digest)}); run `cafs gc` to free "
              "its blobs")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    cache = NodeCache(args.cache_dir or paths.cache_dir(), args.cache_size)
    if args.action == "prune":
        target = 0 if args.all else args.to
        freed = cache.evict(target=target) if target is not None else cache.evict()
        print(f"freed {mib(freed)} (blobs in use are kept)")
    usage = cache.usage()
    info = {"dir": str(cache.root), "blobs": usage.blobs, "metadata_files": usage.metadata,
            "bytes": usage.bytes, "budget": usage.budget}
    print(json.dumps(info, indent=1) if args.json else
          f"{cache.root}: {usage.blobs} blobs, {usage.metadata} index and EROFS files, "
          f"{mib(usage.bytes)} of {mib(usage.budget)}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("gc", help="delete store objects no indexed image references")
    p.add_argument("--store")
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    p.add_argument("--grace", type=float, default=GRACE,
                   help="keep unreferenced objects younger than this many seconds (3600)")
    p.add_argument("--list", dest="verbose_list", action="store_true", help="list what goes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("rm", help="remove image names from the store (blobs go at gc)")
    p.add_argument("refs", nargs="+")
    p.add_argument("--store")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("cache", help="show or trim the node cache")
    p.add_argument("action", choices=["status", "prune"])
    p.add_argument("--cache-dir")
    p.add_argument("--cache-size", type=size_arg, help="budget (e.g. 200G; default: 1/4 of disk)")
    p.add_argument("--to", type=size_arg, help="prune down to this size (e.g. 10G, bytes)")
    p.add_argument("--all", action="store_true", help="prune every blob not in use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache)
