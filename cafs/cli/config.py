"""`cafs config show`: every setting in effect and where it came from (cafs/config.py)."""

from __future__ import annotations

import argparse
from typing import Any

from cafs.config import SETTINGS, load


def cmd_show(args: argparse.Namespace) -> int:
    cfg = load()
    width = max(len(s.key) for s in SETTINGS)
    for s in SETTINGS:
        value = cfg.get(s.key)
        shown = "(a quarter of the cache disk)" if value is None else repr(value)
        print(f"{s.key:<{width}}  {shown:<40}  from {cfg.sources[s.key]}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("config", help="show the configuration in effect")
    p.add_argument("action", choices=["show"])
    p.set_defaults(func=cmd_show)
