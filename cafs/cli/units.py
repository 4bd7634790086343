"""Sizes and durations: as flags take them (one parser, the configuration file's) and as the
commands show them."""

from __future__ import annotations

import argparse

from cafs import config


def size_arg(text: str) -> int:
    """A size flag (`512M`, `20G`, bytes), read exactly as the config file and the CAFS_*
    variables read one."""
    try:
        return config.parse_size(text)
    except config.ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def human(n: float) -> str:
    """Bytes in the largest binary unit that keeps the figure at 1024 or less."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"
