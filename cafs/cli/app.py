"""The `cafs` command line: a thin layer over indexer, cafs and snapshotter."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from cafs import config
from cafs.cli.output import console, markup

# Only what every command needs is imported up front: `cafs mount` through a mount server
# takes less time than importing rich and the indexer would.


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment: one line, exit 1, no traceback."""
    from blobstore import StoreError
    from indexer.catalog import CatalogError
    from indexer.source import SourceError

    return (SourceError, StoreError, CatalogError, ValueError, OSError, RuntimeError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; given the command about to run, only its module is imported (importing
    every subsystem, grpc included, costs more than most commands take to run)."""
    parser = argparse.ArgumentParser(prog="cafs", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    for register in _extensions(command):
        register(sub)
    return parser


# Subcommands that live beside their subsystem, by module.
EXTENSIONS = {
    "cafs.cli.images": ("index", "images", "inspect"),
    "cafs.cli.mounts": ("mount", "mount-server", "umount", "stats", "run"),
    "cafs.cli.admin": ("gc", "rm", "cache"),
    "cafs.cli.config": ("config",),
    "cafs.cli.prefetch": ("profile", "profiles", "weights"),
    "snapshotter.cli": ("snapshotter", "pull"),
}


def _extensions(command: str | None = None) -> list[Callable[[Any], None]]:
    modules = [m for m, cmds in EXTENSIONS.items() if command in cmds]
    if not modules:  # help, or a command we do not know: build everything
        modules = list(EXTENSIONS)
    regs: list[Callable[[Any], None]] = []
    for module in modules:
        try:
            mod = __import__(module, fromlist=["add_commands"])
        except ImportError as exc:
            if exc.name != module:
                raise
            continue
        regs.append(mod.add_commands)
    return regs


def _command_of(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    from cafs.logs import ShownFormatter, quiet_signing_loggers

    handler = logging.StreamHandler()
    handler.setFormatter(ShownFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        handlers=[handler])
    quiet_signing_loggers()
    try:
        settings = config.load()
        config.apply(args, settings)
        args.settings = settings  # for the commands that resolve a daemon's configuration
        code: int = args.func(args)
        return code
    except BrokenPipeError:  # `cafs ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        console(True).print("cafs: interrupted")
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        # The message may quote the image (tar names, config): text, never markup.
        console(True).print(f"[red]cafs: error:[/] {markup(exc)}", highlight=False,
                             markup=True)
        return 1

