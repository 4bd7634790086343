"""A realistic Debian rootfs (python3 included) made of the files this host's installed
packages own, so the demo and the benchmarks have a real image without any download."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.imagebuild import DEFAULT_PATH_ENV, Entry

PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")
BASE_PACKAGES = ("libc6", "busybox-static")
_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class _DebPackage:
    name: str
    provides: tuple[str, ...]
    depends: tuple[tuple[str, ...], ...]  # AND of ORs, package names only


def _parse_relations(text: str) -> list[tuple[str, ...]]:
    groups = []
    for group in filter(None, (g.strip() for g in text.split(","))):
        alternatives = (alt.split()[0].split(":")[0] for alt in group.split("|") if alt.strip())
        groups.append(tuple(alternatives))
    return groups


def installed_packages() -> dict[str, _DebPackage]:
    """The host's installed Debian packages, by name."""
    fmt = "${Package}\t${db:Status-Abbrev}\t${Provides}\t${Depends}, ${Pre-Depends}\n"
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", fmt], check=True, capture_output=True, text=True
    ).stdout
    packages = {}
    for line in out.splitlines():
        name, status, provides, depends = line.split("\t")
        if status.startswith("ii"):
            provided = tuple(alt[0] for alt in _parse_relations(provides))
            packages[name] = _DebPackage(name, provided, tuple(_parse_relations(depends)))
    return packages


def _closure(roots: Iterable[str], installed: Mapping[str, _DebPackage]) -> set[str]:
    providers: dict[str, str] = {}
    for pkg in installed.values():
        for virtual in pkg.provides:
            providers.setdefault(virtual, pkg.name)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in installed:
            raise LookupError(f"Debian package {name!r} is not installed on this host")
        seen.add(name)
        for alternatives in installed[name].depends:
            choice = next((a for a in alternatives if a in installed), None)
            choice = choice or next((providers[a] for a in alternatives if a in providers), None)
            if choice is not None:
                todo.append(choice)
    return seen


def debian_closure(roots: Iterable[str]) -> set[str]:
    """The installed packages `roots` need through Depends and Pre-Depends; of alternatives
    the first installed one is taken, virtual names resolve through Provides."""
    return _closure(roots, installed_packages())


def _package_paths(packages: Iterable[str]) -> set[bytes]:
    """Host paths the packages own, parents resolved: on a merged-/usr host (/lib ->
    usr/lib) each file then has one canonical path, and no entry goes through a symlink."""
    out = subprocess.run(["dpkg-query", "-L", *sorted(packages)], check=True, capture_output=True)
    paths = set()
    for line in out.stdout.splitlines():
        if not line.startswith(b"/") or line == b"/.":
            continue
        parent, _, name = line.rpartition(b"/")
        real = os.path.join(os.path.realpath(parent or b"/"), name)
        if os.path.lexists(real):
            paths.add(real)
    return paths


ALTERNATIVES = b"/var/lib/dpkg/alternatives"


def _alternatives(paths: set[bytes]) -> set[bytes]:
    """The update-alternatives links (`/usr/lib/…/libblas.so.3` → `/etc/alternatives/…` →
    the chosen file) whose choice is among `paths`: maintainer scripts make them, so no
    package lists them, and numpy cannot load its BLAS without them."""
    found: set[bytes] = set()
    if not os.path.isdir(ALTERNATIVES):
        return found
    for name in os.listdir(ALTERNATIVES):
        with open(os.path.join(ALTERNATIVES, name), "rb") as f:
            lines = f.read().split(b"\n")
        links = [(name, lines[1])] if len(lines) > 1 else []
        for i in range(2, len(lines) - 1, 2):  # slave name, slave link, until an empty line
            if not lines[i]:
                break
            links.append((lines[i], lines[i + 1]))
        for alt, link in links:
            chosen = b"/etc/alternatives/" + alt
            if os.path.islink(link) and os.path.realpath(chosen) in paths:
                found |= {link, chosen}
    return found


def _host_entries(paths: Iterable[bytes]) -> list[Entry]:
    """Entries for host paths and all their ancestors, parents first, hard links kept."""
    wanted: set[bytes] = set()
    for path in paths:
        while path not in (b"/", b""):
            wanted.add(path)
            path = os.path.dirname(path)
    entries: list[Entry] = []
    first_link: dict[tuple[int, int], bytes] = {}
    for path in sorted(wanted):
        st = os.lstat(path)
        rel = path.lstrip(b"/")
        meta: dict[str, Any] = {
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": int(st.st_mtime),
        }
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(rel, "dir", **meta))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry(rel, "symlink", linkname=os.readlink(path), **meta))
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first_link:
                entries.append(Entry(rel, "hardlink", linkname=first_link[key]))
            else:
                first_link[key] = rel
                entries.append(Entry.from_host(rel, path))
    return entries


def _skeleton(have: set[bytes]) -> list[Entry]:
    """What a runtime expects beyond package contents: mount points, /tmp, users, the
    merged-/usr links and a /bin/sh."""
    entries = [Entry(d, "dir") for d in ("dev", "proc", "sys", "etc", "run", "var", "usr")]
    entries += [Entry("tmp", "dir", mode=0o1777), Entry("root", "dir", mode=0o700)]
    entries += [Entry("etc/passwd", data=_PASSWD), Entry("etc/group", data=_GROUP)]
    if os.path.isfile("/etc/ld.so.cache"):
        entries.append(Entry.from_host("etc/ld.so.cache", "/etc/ld.so.cache"))
    for top in (b"/bin", b"/sbin", b"/lib", b"/lib32", b"/lib64", b"/libx32"):
        if os.path.islink(top) and os.path.exists(top):
            entries.append(Entry(top[1:], "symlink", linkname=os.readlink(top)))
    bin_dir = b"usr/bin" if os.path.islink(b"/bin") else b"bin"
    if b"/" + bin_dir + b"/sh" not in have and b"/" + bin_dir + b"/busybox" in have:
        entries.append(Entry(bin_dir + b"/sh", "symlink", linkname="busybox"))
    return entries


def _is_versioned_python(path: bytes) -> bool:
    prefix = b"/usr/bin/python3."
    return path.startswith(prefix) and path[len(prefix) :].isdigit()


def host_rootfs_layers(
    packages: Sequence[str] = PYTHON_PACKAGES, base: Sequence[str] = BASE_PACKAGES
) -> list[list[Entry]]:
    """A realistic Debian rootfs in two layers, made of what the host's packages installed.

    Layer 0 holds `base` with its dependencies plus a skeleton (/etc/passwd, /tmp, /bin/sh
    to busybox when dash is absent); layer 1 the rest of what `packages` need, plus a
    /usr/bin/python3 link if none came with them. File content is read from the host only
    when a layer is written. With the defaults, `/usr/bin/python3 -c 'import json'` runs
    in it (about 60 MB).
    """
    installed = installed_packages()
    base_pkgs = _closure(base, installed)
    top_pkgs = _closure(packages, installed) - base_pkgs
    base_paths = _package_paths(base_pkgs)
    top_paths = (_package_paths(top_pkgs) - base_paths) if top_pkgs else set()
    top_paths |= _alternatives(top_paths) - base_paths
    layer0 = _skeleton(base_paths) + _host_entries(base_paths)
    layer1 = _host_entries(top_paths)
    pythons = sorted(p for p in top_paths | base_paths if _is_versioned_python(p))
    if pythons and b"/usr/bin/python3" not in top_paths | base_paths:
        layer1.append(Entry("usr/bin/python3", "symlink", linkname=os.path.basename(pythons[-1])))
    return [layer0, layer1]


def python_config() -> dict[str, Any]:
    """An image config to go with host_rootfs_layers(): a PATH and a Python command."""
    return {"Env": [DEFAULT_PATH_ENV], "Cmd": ["/usr/bin/python3"], "WorkingDir": "/"}
