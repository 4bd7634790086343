"""`cafs index`, `cafs images`, `cafs inspect`: the indexer's commands, putting images into
the store and showing what it holds (run in the user's `cafs` process; no daemon involved)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from blobstore import default_store_url, open_store
from blobstore.envelope import MAX_SIZE
from cafs.cli.output import console, markup
from cafs.cli.units import human, size_arg
from cafs.terminal import shown
from indexer.format import MIN_CHUNK_SIZE


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.budgets import NAMES, Budgets
    from indexer.build import DEFAULT_WEIGHTS_CHUNK_SIZE, IndexOptions, index_image
    from indexer.source import Platform
    from indexer.sources import open_source

    given = {name: getattr(args, name) for name in NAMES if getattr(args, name) is not None}
    opts = IndexOptions(chunk_size=args.chunk_size, name=args.name, workers=args.jobs,
                        budgets=Budgets(**given),
                        weights_chunk_size=args.weights_chunk_size
                        or max(DEFAULT_WEIGHTS_CHUNK_SIZE, args.chunk_size))
    if args.platform:
        opts.platform = Platform.parse(args.platform)
    store = open_store(args.store)
    source = open_source(args.image, plain_http=args.plain_http)
    quiet = args.quiet or args.json
    busy = (contextlib.nullcontext() if quiet
            else console(True).status(f"indexing {args.image}", spinner="dots"))
    with busy:
        result = index_image(source, store, opts)
    rec, up = result.record, result.uploads
    summary = {
        "ref": rec.ref, "index": rec.index, "manifest": rec.manifest_digest,
        "layers": len(rec.layers), "files": rec.files, "bytes": rec.total_bytes,
        "image_bytes": result.image_bytes, "index_bytes": result.index_bytes,
        "blobs": up.unique, "blobs_uploaded": up.uploaded, "blobs_present": up.present,
        "uploaded_bytes": up.stored_bytes, "seconds": round(result.seconds, 3),
        "store": store.url,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    elif not args.quiet:
        console(False).print(f"indexed [bold]{markup(rec.ref)}[/] → index {rec.index[:16]}… "
                  f"({len(rec.layers)} layers, {rec.files} files, {human(rec.total_bytes)})")
        console(False).print(f"blobs: {up.unique} in image, {up.uploaded} uploaded "
                  f"({human(up.stored_bytes)} stored), {up.present} already in store; "
                  f"index {human(result.index_bytes)}; {result.seconds:.2f}s")
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from indexer.catalog import list_images

    store = open_store(args.store)
    images = list_images(store)
    if args.json:
        print(json.dumps([{"ref": r.ref, "index": r.index, "manifest": r.manifest_digest,
                           "files": r.files, "bytes": r.total_bytes} for r in images], indent=1))
        return 0
    from rich.table import Table

    table = Table("REF", "INDEX", "FILES", "SIZE", box=None)
    for r in images:
        table.add_row(markup(r.ref), markup(r.index[:16]), str(r.files),
                      human(r.total_bytes))
    console(False).print(table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from indexer.catalog import find_image, load_index

    store = open_store(args.store)
    rec = find_image(store, args.image)
    index = load_index(store, rec.index)
    if args.tree:
        for path, node in index.walk():
            sys.stdout.buffer.write(b"%06o %5d %5d %12d %s\n" % (
                node.mode, node.uid, node.gid, node.size, shown(path).encode()))
        return 0
    info: dict[str, Any] = {
        "ref": rec.ref, "index": rec.index, "manifest": rec.manifest_digest,
        "manifest_media_type": rec.manifest_media_type, "config": rec.config_digest,
        "platform": rec.platform, "files": rec.files, "bytes": rec.total_bytes,
        "inodes": index.inode_count, "chunk_size": index.chunk_size,
        "layers": [vars(layer) for layer in rec.layers],
        "image_config": index.config.get("config", {}),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key in ("ref", "index", "manifest", "platform", "files", "inodes", "chunk_size"):
            console(False).print(f"[bold]{key:>10}[/]: {markup(info[key])}")
        console(False).print(f"[bold]{'size':>10}[/]: {human(rec.total_bytes)}")
        out = console(False)
        for n, layer in enumerate(rec.layers):
            out.print(f"[bold]{'layer ' + str(n):>10}[/]: {markup(layer.digest)} "
                      f"chain {markup(layer.chain_id)}")
        cfg = info["image_config"]
        for key in ("Entrypoint", "Cmd", "WorkingDir", "User", "Env"):
            if cfg.get(key):
                console(False).print(f"[bold]{key:>10}[/]: {markup(cfg[key])}")
    return 0


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None,
                   help=f"blob store URL (default $CAFS_STORE or {default_store_url()})")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("index", help="index an OCI image into the store")
    p.add_argument("image", help="REF | docker://REF | oci:DIR[:TAG] | oci-archive:TAR[:TAG]"
                   " | docker-archive:TAR[:REF]")
    _store_arg(p)
    p.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this host's)")
    p.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry")
    p.add_argument("--name", help="record the image under this ref")
    p.add_argument("--chunk-size", type=_chunk_size, default=4 << 20, help="chunk size (4M)")
    p.add_argument("--weights-chunk-size", type=_chunk_size,
                   help="chunk size of model weight files, which are read whole (16M, or "
                   "--chunk-size if larger)")
    p.add_argument("-j", "--jobs", type=int, default=16, help="parallel uploads")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    _budget_args(p.add_argument_group("budgets for hostile images (refused past them)"))
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("images", help="list indexed images")
    _store_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("inspect", help="show an indexed image")
    p.add_argument("image", help="ref as indexed, or manifest digest")
    _store_arg(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--tree", action="store_true", help="list every entry")
    p.set_defaults(func=cmd_inspect)



def _budget_args(group: argparse._ArgumentGroup) -> None:
    """One flag per budget of indexer/budgets.py, its default shown in --help."""
    from indexer.budgets import NAMES, Budgets, explain, flag, unit

    for name in NAMES:
        default = getattr(Budgets(), name)
        size = unit(name) == "bytes"
        group.add_argument(flag(name), dest=name, metavar="N", default=None,
                           type=size_arg if size else _count,
                           help=f"{explain(name)} "
                                f"(default {human(default) if size else default})")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return value


def _chunk_size(text: str) -> int:
    """A chunk size the index format can hold and a reader accepts: 4K up to 4G - 1."""
    size = size_arg(text)
    if not MIN_CHUNK_SIZE <= size <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"chunk size {text!r} must be between "
                                         f"{MIN_CHUNK_SIZE} bytes and 4G - 1")
    return size




