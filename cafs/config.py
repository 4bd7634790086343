"""One configuration: built-in defaults < /etc/cafs/config.toml < CAFS_* env vars < flags.

`cafs config show` prints every value in effect and where it came from. What a mount daemon
runs with is one schema, `DaemonConfig`, whose field comments state each default; whoever
starts a daemon (`cafs mount`, `cafs run`, the snapshotter) resolves it once with
`daemon_config` and hands it whole to the daemon as JSON, spawned or forked by a mount
server alike, so no layer translates a setting by hand and the daemon reads none itself.
The file is TOML:

    [store]
    url = "s3://bucket/cafs"          # default: file:///var/lib/cafs/store (root)
    [cache]
    dir = "/var/cache/cafs"
    size = "200G"                     # default: a quarter of the cache's disk
    [mount]
    fetch_deadline = 30               # default 60 (DaemonConfig): seconds before a read
                                      # that cannot be served gets EIO
    kernel_metadata = "off"           # default auto: EROFS + overlay where possible
    read_splice = false               # default true: warm reads answered from the cache file
    neighbour_packs = false           # default true: a miss brings its directory's neighbours
    neighbour_segment = "2M"          # default 512K: what one miss fetches of them at most
    neighbour_ahead = "0"             # default 4M: a directory's first miss fetches this much
                                      # of it and of its sibling directories
    libraries_ahead = "0"             # default 32M: a program's first read fetches this much
                                      # of it and of the libraries it loads
    imports_ahead = "0"               # default 32M: a Python module's first read fetches
                                      # this much of it and of the modules it imports
    [snapshotter]
    root = "/var/lib/cafs/snapshotter"
    address = "/run/cafs/snapshotter.sock"
    metrics_address = "127.0.0.1:9742" # Prometheus endpoint; empty: off
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
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
class DaemonConfig:
    """Everything one mount daemon runs with (see the module's docstring)."""

    source: str  # the image: REF, sha256:MANIFEST, chain:sha256:ID or index:BLAKE3
    mountpoint: Path  # its real path
    state_dir: Path  # pid, info, control socket: cafs.paths.mount_state_dir(mountpoint)
    store_url: str  # [store] url, CAFS_STORE, --store; default: blobstore.default_store_url()
    cache_dir: Path  # [cache] dir, CAFS_CACHE_DIR, --cache-dir; default: cafs.paths.cache_dir()
    cache_size: int | None = None  # [cache] size, CAFS_CACHE_SIZE, --cache-size (bytes);
    # None: a quarter of the cache's disk
    fetch_deadline: float = 60.0  # [mount] fetch_deadline, CAFS_FETCH_DEADLINE,
    # --fetch-deadline: seconds before a read that cannot be served gets EIO
    kernel_metadata: str = "auto"  # [mount] kernel_metadata, CAFS_KERNEL_METADATA: auto
    # (EROFS + overlay serve the tree where the kernel and image allow) or off (FUSE alone)
    max_tasks: int = 64  # FUSE requests served at once
    record: str | None = None  # record a startup profile under this name
    profile: str | None = "default"  # replay this profile if the image has one; None: none
    prefetch_weights: str = "auto"  # on, off, or auto: on where NVML finds a GPU
    prefetch_parallel: int = 16  # store calls in flight for a profile replay
    prefetch_rate: int = 0  # prefetch bytes per second, 0: unlimited
    use_pack: bool = True  # replay a profile from its startup pack where it has one
    prefetch_processes: int | None = None  # worker processes for large prefetch plans;
    # None: by the cores, 0: none
    suid_dev: bool = False  # honour setuid bits and device files (default: nosuid,nodev)
    read_splice: bool = True  # [mount] read_splice, CAFS_READ_SPLICE: answer warm reads with
    # a span of the cache file (patched pyfuse3); off: copy through a buffer (comparisons)
    neighbours: bool = True  # [mount] neighbour_packs, CAFS_NEIGHBOUR_PACKS: a missed small
    # file comes with its directory's neighbours from the image's neighbour pack
    neighbour_segment: int = 512 << 10  # [mount] neighbour_segment, CAFS_NEIGHBOUR_SEGMENT:
    # bytes of the neighbour pack one miss fetches at most (cafs.daemon.neighbours.SEGMENT_MAX)
    neighbour_ahead: int = 4 << 20  # [mount] neighbour_ahead, CAFS_NEIGHBOUR_AHEAD: bytes of a
    # directory's run, then its siblings' runs, in the pack fetched, in parallel segments, on
    # its first miss (AHEAD_MAX)
    libraries_ahead: int = 32 << 20  # [mount] libraries_ahead, CAFS_LIBRARIES_AHEAD: bytes a
    # program's first read brings in of it and the libraries it loads (cafs/daemon/libraries.py);
    # 0: none
    imports_ahead: int = 32 << 20  # [mount] imports_ahead, CAFS_IMPORTS_AHEAD: bytes a Python
    # module's first read brings in of it and the modules it imports (cafs/daemon/imports.py);
    # 0: none
    debug: bool = False  # debug logging

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fetch_deadline) and self.fetch_deadline > 0):
            raise ConfigError(f"fetch deadline must be a positive number of seconds, "
                              f"not {self.fetch_deadline}")
        if self.cache_size is not None and self.cache_size <= 0:
            raise ConfigError(f"cache size must be positive, not {self.cache_size}")
        if self.kernel_metadata not in ("auto", "off"):
            raise ConfigError(f"kernel metadata must be auto or off, "
                              f"not {self.kernel_metadata!r}")
        if not 0 <= self.neighbour_segment <= 1 << 30:
            raise ConfigError(f"neighbour segment must be 0 to 1 GiB, "
                              f"not {self.neighbour_segment}")
        if not 0 <= self.neighbour_ahead <= 1 << 30:
            raise ConfigError(f"neighbour ahead must be 0 to 1 GiB, not {self.neighbour_ahead}")
        if not 0 <= self.libraries_ahead <= 1 << 30:
            raise ConfigError(f"libraries ahead must be 0 to 1 GiB, not {self.libraries_ahead}")
        if not 0 <= self.imports_ahead <= 1 << 30:
            raise ConfigError(f"imports ahead must be 0 to 1 GiB, not {self.imports_ahead}")
        if self.prefetch_weights not in ("auto", "on", "off"):
            raise ConfigError(f"prefetch weights must be auto, on or off, "
                              f"not {self.prefetch_weights!r}")
        for name, least in (("max_tasks", 1), ("prefetch_parallel", 1), ("prefetch_rate", 0),
                            ("prefetch_processes", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"{name} must be at least {least}, not {value}")
        for name in ("mountpoint", "state_dir"):
            if not getattr(self, name).is_absolute():
                raise ConfigError(f"{name} must be an absolute path, not {getattr(self, name)}")
        if not self.source or not self.store_url:
            raise ConfigError("source and store_url must not be empty")

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, text: str) -> DaemonConfig:
        """As `to_json` wrote it: every field present, of its type and within its bounds;
        anything else is a ConfigError that names the field, never a default."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"malformed daemon configuration: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("malformed daemon configuration: not a JSON object")
        names = [f.name for f in fields(cls)]
        missing, unknown = set(names) - set(data), set(data) - set(names)
        if missing or unknown:
            raise ConfigError(f"malformed daemon configuration: missing {sorted(missing)}, "
                              f"unknown {sorted(unknown)}")
        values = {f.name: _typed(f.name, str(f.type), data[f.name]) for f in fields(cls)}
        return cls(**values)


def _typed(name: str, kind: str, value: Any) -> Any:
    """`value` as the field's type (from its annotation), or ConfigError."""
    if value is None and kind.endswith(" | None"):
        return None
    base = kind.removesuffix(" | None")
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value if isinstance(value, float) else 0.0) or abs(value) > 1e18:
            raise ConfigError(f"daemon configuration: {name} must be a finite number")
        return float(value)
    if base in ("str", "Path") and isinstance(value, str):
        if "\0" in value:
            raise ConfigError(f"daemon configuration: {name} contains a NUL character")
        return Path(value) if base == "Path" else value
    raise ConfigError(f"daemon configuration: {name} must be {kind}, not {value!r:.80}")


# The daemon's fields that the file and the CAFS_* variables set, by setting key.
DAEMON_SETTINGS = {"store_url": "store.url", "cache_dir": "cache.dir",
                   "cache_size": "cache.size", "fetch_deadline": "mount.fetch_deadline",
                   "kernel_metadata": "mount.kernel_metadata", "read_splice": "mount.read_splice",
                   "neighbours": "mount.neighbour_packs",
                   "neighbour_segment": "mount.neighbour_segment",
                   "neighbour_ahead": "mount.neighbour_ahead",
                   "libraries_ahead": "mount.libraries_ahead",
                   "imports_ahead": "mount.imports_ahead"}


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
    Setting("mount.fetch_deadline", "CAFS_FETCH_DEADLINE", DaemonConfig.fetch_deadline, float),
    Setting("mount.kernel_metadata", "CAFS_KERNEL_METADATA", DaemonConfig.kernel_metadata),
    Setting("mount.read_splice", "CAFS_READ_SPLICE", DaemonConfig.read_splice, bool),
    Setting("mount.neighbour_packs", "CAFS_NEIGHBOUR_PACKS", DaemonConfig.neighbours, bool),
    Setting("mount.neighbour_segment", "CAFS_NEIGHBOUR_SEGMENT", DaemonConfig.neighbour_segment,
            int),
    Setting("mount.neighbour_ahead", "CAFS_NEIGHBOUR_AHEAD", DaemonConfig.neighbour_ahead, int),
    Setting("mount.libraries_ahead", "CAFS_LIBRARIES_AHEAD", DaemonConfig.libraries_ahead, int),
    Setting("mount.imports_ahead", "CAFS_IMPORTS_AHEAD", DaemonConfig.imports_ahead, int),
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
        if setting.kind is bool:
            return _boolean(raw)
        return str(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad value {raw!r} for {setting.key}: {exc}") from None


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ValueError("expected on or off (1/0, true/false)")


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
        import tomllib  # only where there is a file: every CLI start loads the settings

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


def daemon_config(source: str, mountpoint: Path | str, settings: Config | None = None, *,
                  store_url: str | None = None, cache_dir: Path | None = None,
                  cache_size: int | None = None, fetch_deadline: float | None = None,
                  **options: Any) -> DaemonConfig:
    """A daemon's whole configuration, resolved here and nowhere else: built-in defaults <
    the file < CAFS_* variables (`settings`, loaded now unless given) < the flags given;
    a flag left None takes the layer below. `options` (record, profile, prefetch tuning,
    suid_dev ...) are the schema's other fields, which only flags set."""
    cfg = settings if settings is not None else load()
    given = {"store_url": store_url, "cache_dir": cache_dir, "cache_size": cache_size,
             "fetch_deadline": fetch_deadline, "kernel_metadata": None, "read_splice": None,
             "neighbours": None, "neighbour_segment": None, "neighbour_ahead": None,
             "libraries_ahead": None, "imports_ahead": None}
    values: dict[str, Any] = {name: given[name] if given[name] not in (None, "") else cfg.get(key)
                              for name, key in DAEMON_SETTINGS.items()}
    mp = Path(os.path.realpath(mountpoint))
    try:
        return DaemonConfig(source=source, mountpoint=mp, state_dir=paths.mount_state_dir(mp),
                            store_url=str(values["store_url"]),
                            cache_dir=Path(values["cache_dir"]),
                            cache_size=values["cache_size"],
                            fetch_deadline=float(values["fetch_deadline"]),
                            kernel_metadata=str(values["kernel_metadata"]),
                            read_splice=bool(values["read_splice"]),
                            neighbours=bool(values["neighbours"]),
                            neighbour_segment=int(values["neighbour_segment"]),
                            neighbour_ahead=int(values["neighbour_ahead"]),
                            libraries_ahead=int(values["libraries_ahead"]),
                            imports_ahead=int(values["imports_ahead"]), **options)
    except TypeError as exc:
        raise ConfigError(f"unknown daemon option: {exc}") from None


def _processes(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= n <= 256:
        raise argparse.ArgumentTypeError(f"must be 0 to 256, not {n}")
    return n


class _Refuse(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise ConfigError(f"prefetch options: {message}")


def prefetch_tuning(argv: Sequence[str]) -> dict[str, Any]:
    """The schema's prefetch fields from flags (--prefetch-parallel N, --prefetch-rate B,
    --no-pack, --prefetch-processes N), for `cafs.mounts.mount.mount_detached(daemon_args=...)`."""
    p = _Refuse(prog="prefetch options", add_help=False)
    p.add_argument("--prefetch-parallel", type=int, default=DaemonConfig.prefetch_parallel)
    p.add_argument("--prefetch-rate", type=int, default=DaemonConfig.prefetch_rate)
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--prefetch-processes", type=_processes,
                   default=DaemonConfig.prefetch_processes)
    args = p.parse_args(list(argv))
    return {"prefetch_parallel": args.prefetch_parallel, "prefetch_rate": args.prefetch_rate,
            "use_pack": not args.no_pack, "prefetch_processes": args.prefetch_processes}
