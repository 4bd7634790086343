"""OCI runtime spec (config.json) for `cafs run`, from an image config and user overrides.

Confinement is containerd's default: its capability set, its seccomp profile
(cafs/run/seccomp.py), its masked and read-only /proc and /sys paths. `--security-opt` lifts
them one by one, with Docker's names for the same switches.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cafs.run import seccomp

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
# containerd's default spec: what of /proc and /sys a container must not read (kernel
# memory, keys, timing side channels, firmware, power meters: CVE-2020-8694)...
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap"]
# ...and what it may read but not write (kernel settings, interrupts, the sysrq trigger).
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


class SpecError(ValueError):
    """The image config and the overrides do not make a runnable process."""


@dataclass
class Security:
    """What `--security-opt` turned off or on; the defaults are containerd's."""

    seccomp: bool = True  # the default profile (seccomp=unconfined: none)
    system_paths: bool = True  # masked/read-only paths (systempaths=unconfined: none)
    no_new_privileges: bool = False  # setuid binaries in the image work, as in containerd

    @classmethod
    def parse(cls, items: list[str]) -> Security:
        """Docker's spellings: seccomp=unconfined, systempaths=unconfined,
        no-new-privileges[=true|false]."""
        sec = cls()
        for item in items:
            key, _, value = item.partition("=")
            if key == "seccomp" and value == "unconfined":
                sec.seccomp = False
            elif key == "systempaths" and value == "unconfined":
                sec.system_paths = False
            elif key == "no-new-privileges" and value in ("", "true", "false"):
                sec.no_new_privileges = value != "false"
            else:
                raise SpecError(f"unknown security option {item!r}: expected seccomp=unconfined, "
                                "systempaths=unconfined or no-new-privileges[=true|false]")
        return sec


@dataclass
class RunOptions:
    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    host_network: bool = False
    hostname: str = "cafs"
    tty: bool = False
    security: Security = field(default_factory=Security)


def _lookup(rootfs: Path, table: str, name: str, column: int = 0) -> tuple[int, int] | None:
    """(id, primary gid) of a user or group in the image's /etc/passwd or /etc/group,
    matched by name (column 0) or by number (column 2)."""
    try:
        lines = (rootfs / "etc" / table).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":")
        if len(parts) >= 4 and parts[column] == name:
            try:
                gid = int(parts[3]) if table == "passwd" else int(parts[2])
                return int(parts[2]), gid
            except ValueError:
                return None
    return None


def resolve_user(rootfs: Path, spec: str) -> tuple[int, int]:
    """`user[:group]` with names or numbers, resolved inside the image like docker does."""
    if not spec:
        return 0, 0
    user, _, group = spec.partition(":")
    if user.isdigit():
        found = _lookup(rootfs, "passwd", user, column=2)
        uid, gid = int(user), (found[1] if found else 0)
    else:
        found = _lookup(rootfs, "passwd", user)
        if found is None:
            raise SpecError(f"user {user!r} not found in the image's /etc/passwd")
        uid, gid = found
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grp = _lookup(rootfs, "group", group)
            if grp is None:
                raise SpecError(f"group {group!r} not found in the image's /etc/group")
            gid = grp[0]
    return uid, gid


def additional_gids(rootfs: Path, uid: int, gid: int) -> list[int]:
    """Supplementary groups from the image's /etc/group, as containerd and docker set them
    (and so a startup profile recorded here includes the files containerd reads)."""
    names = set()
    try:
        for line in (rootfs / "etc" / "passwd").read_text(errors="replace").splitlines():
            parts = line.split(":")
            if len(parts) >= 3 and parts[2] == str(uid):
                names.add(parts[0])
        groups = (rootfs / "etc" / "group").read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in groups:
        parts = line.split(":")
        member = len(parts) >= 4 and names & set(parts[3].split(","))
        if member and parts[2].isdigit() and int(parts[2]) != gid:
            out.append(int(parts[2]))
    return sorted(set(out))


def process_args(config: dict[str, Any], command: list[str]) -> list[str]:
    entry = list(config.get("Entrypoint") or [])
    args = entry + (command if command else list(config.get("Cmd") or []))
    if not args:
        raise SpecError("no command: the image has no Entrypoint or Cmd; give one after --")
    return args


def merge_env(image_env: list[str], overrides: list[str]) -> list[str]:
    env: dict[str, str] = {}
    for item in [*image_env, *overrides]:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise SpecError(f"bad environment variable {item!r}: expected KEY=VALUE")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    return [f"{k}={v}" for k, v in env.items()]


def build_spec(config: dict[str, Any], rootfs: Path, opts: RunOptions) -> dict[str, Any]:
    uid, gid = resolve_user(rootfs, opts.user if opts.user is not None
                            else str(config.get("User") or ""))
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not opts.host_network:
        namespaces.append({"type": "network"})
    caps = {k: CAPS for k in ("bounding", "effective", "permitted")}
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # cannot exceed ours
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": opts.tty,
            "user": {"uid": uid, "gid": gid,
                     "additionalGids": additional_gids(rootfs, uid, gid)},
            "args": process_args(config, opts.command),
            "env": merge_env(list(config.get("Env") or []), opts.env),
            "cwd": opts.workdir or config.get("WorkingDir") or "/",
            "capabilities": caps,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": opts.security.no_new_privileges,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": opts.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": _linux(namespaces, opts.security),
    }


def _linux(namespaces: list[dict[str, str]], sec: Security) -> dict[str, Any]:
    linux: dict[str, Any] = {"resources": {"devices": [{"allow": False, "access": "rwm"}]},
                             "namespaces": namespaces}
    if sec.system_paths:
        linux["maskedPaths"] = MASKED_PATHS
        linux["readonlyPaths"] = READONLY_PATHS
    if sec.seccomp:
        linux["seccomp"] = seccomp.profile(CAPS)
    return linux
