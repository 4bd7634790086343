"""One configuration: built-in defaults < /etc/cafs/config.toml < CAFS_* env vars < flags.

`cafs config show` prints every value in effect and where it came from. The file is TOML:

    [store]
    url = "s3://bucket/cafs"          # default: file:///var/lib/cafs/store (root)
    [cache]
    dir = "/var/cache/cafs"
    size = "200G"                     # default: a quarter of the cache's disk
    [mount]
    fetch_deadline = 60               # seconds before a read that cannot be served gets EIO
    [snapshotter]
    root = "/var/lib/cafs/snapshotter"
    address = "/run/cafs/snapshotter.sock"
    metrics_address = "127.0.0.1:9742" # Prometheus endpoint; empty: off
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blobstore import default_store_url
from cafs import paths

DEFAULT_FILE = Path("/etc/cafs/config.toml")


class ConfigError(ValueError):
    """The configuration file or a CAFS_* variable is malformed."""


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (e.g. 512M, 200G)") from None


@dataclass(frozen=True)
class Setting:
    key: str  # "section.name" in the file
    env: str
    default: Any
    kind: type = str


SETTINGS = [
    Setting("store.url", "CAFS_STORE", None),
    Setting("cache.dir", "CAFS_CACHE_DIR", None),
    Setting("cache.size", "CAFS_CACHE_SIZE", None, int),
    Setting("mount.fetch_deadline", "CAFS_FETCH_DEADLINE", 60.0, float),
    Setting("snapshotter.root", "CAFS_SNAPSHOTTER_ROOT", "/var/lib/cafs/snapshotter"),
    Setting("snapshotter.address", "CAFS_SNAPSHOTTER_ADDRESS", "/run/cafs/snapshotter.sock"),
    Setting("snapshotter.metrics_address", "CAFS_METRICS_ADDRESS", ""),
]


@dataclass
class Config:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values[key]


def _convert(setting: Setting, raw: Any, where: str) -> Any:
    try:
        if setting.kind is int:
            return parse_size(raw)
        if setting.kind is float:
            return float(raw)
        return str(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad value {raw!r} for {setting.key}: {exc}") from None


def _builtin(setting: Setting) -> Any:
    if setting.key == "store.url":
        saved = os.environ.pop("CAFS_STORE", None)  # the env layer is applied separately
        try:
            return default_store_url()
        finally:
            if saved is not None:
                os.environ["CAFS_STORE"] = saved
    if setting.key == "cache.dir":
        return str(paths.cache_dir())
    return setting.default


def load(path: Path | None = None) -> Config:
    path = path or Path(os.environ.get("CAFS_CONFIG", DEFAULT_FILE))
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    cfg = Config()
    known = {s.key for s in SETTINGS}
    for section, body in data.items():
        for name in body if isinstance(body, dict) else [section]:
            if f"{section}.{name}" not in known:
                raise ConfigError(f"{path}: unknown setting {section}.{name}")
    for s in SETTINGS:
        section, name = s.key.split(".")
        if s.env in os.environ:
            cfg.values[s.key] = _convert(s, os.environ[s.env], s.env)
            cfg.sources[s.key] = f"env {s.env}"
        elif name in data.get(section, {}):
            cfg.values[s.key] = _convert(s, data[section][name], str(path))
            cfg.sources[s.key] = str(path)
        else:
            cfg.values[s.key] = _builtin(s)
            cfg.sources[s.key] = "default"
    return cfg


# Which argparse destinations each setting fills when the flag was not given.
FLAG_DEST = {"store": "store.url", "cache_dir": "cache.dir", "cache_size": "cache.size",
             "fetch_deadline": "mount.fetch_deadline"}
SNAPSHOTTER_DEST = {"root": "snapshotter.root", "address": "snapshotter.address",
                    "metrics_address": "snapshotter.metrics_address"}


def apply(args: argparse.Namespace, cfg: Config) -> None:
    """Fill flags left unset from the configuration; flags always win."""
    dests = dict(FLAG_DEST)
    if getattr(args, "command", None) == "snapshotter":
        dests.update(SNAPSHOTTER_DEST)
    for dest, key in dests.items():
        if hasattr(args, dest) and getattr(args, dest) is None:
            value = cfg.get(key)
            if value is not None and dest in ("cache_dir", "root", "address"):
                value = Path(value)
            setattr(args, dest, value)


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
