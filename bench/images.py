"""The images the benchmarks run on, built here from the host, without internet.

- realistic: a Debian rootfs with python3 (bench.hostimage.host_rootfs_layers) plus a layer
  of real Python packages taken from the running interpreter's site-packages (numpy, sympy,
  matplotlib, botocore, ...), installed where Debian's python3 finds them. Several hundred MB;
  `--quick` takes a few small packages only.
- realistic v2: the same with a few files of the package layer changed and one added, as a
  package upgrade would, for the dedup figures.
- bigfile: one large file of incompressible bytes.
- many files: a synthetic tree of N small files (100 per directory), for mount-ready time.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import subprocess
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import packages_distributions
from pathlib import Path

from bench.hostimage import host_rootfs_layers, python_config
from bench.imagebuild import DEFAULT_PATH_ENV, Entry
from blobstore import open_store
from indexer.build import IndexOptions, IndexResult, index_image
from indexer.sources import open_source

FULL_PACKAGES = (
    "numpy",
    "numpy.libs",
    "sympy",
    "mpmath",
    "matplotlib",
    "mpl_toolkits",
    "PIL",
    "pillow.libs",
    "fontTools",
    "kiwisolver",
    "contourpy",
    "cycler",
    "pyparsing",
    "dateutil",
    "botocore",
    "boto3",
    "s3transfer",
    "jmespath",
    "networkx",
    "cryptography",
    "pygments",
    "yaml",
    "jinja2",
    "markupsafe",
    "requests",
    "urllib3",
    "idna",
    "certifi",
    "packaging",
)
QUICK_PACKAGES = ("jmespath", "dateutil", "idna")
SITE_DIR = "usr/local/lib/python3.11/dist-packages"  # on Debian's python3.11 sys.path
CHANGED_FILES = 3  # files a "v2" changes


@dataclass(frozen=True)
class Built:
    """An image in an OCI layout and what the benchmarks need to know of it."""

    layout: Path
    tag: str
    image_bytes: int  # uncompressed layer tars together
    compressed_bytes: int
    layer_digests: tuple[str, ...]
    layer_sizes: tuple[int, ...]
    files: int

    @property
    def oci(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _dist_infos(site: Path, name: str) -> list[Path]:
    """The *.dist-info dirs of the distributions that provide top-level package `name`."""
    found = []
    for dist in packages_distributions().get(name, []):
        norm = re.sub(r"[-_.]+", "_", dist).lower()
        found += [p for p in site.glob("*.dist-info") if p.name.lower().startswith(norm + "-")]
    return sorted(found)


def _tree_entries(host: Path, dest: str) -> Iterator[Entry]:
    """Entries for `host` (file or dir tree) placed at `dest`, symlinks kept as links."""
    st = os.lstat(host)
    if stat.S_ISLNK(st.st_mode):
        yield Entry(dest, "symlink", linkname=os.readlink(host), mtime=int(st.st_mtime))
    elif stat.S_ISREG(st.st_mode):
        yield Entry.from_host(dest, os.fsencode(host), uid=0, gid=0)
    elif stat.S_ISDIR(st.st_mode):
        yield Entry(dest, "dir", mode=0o755, mtime=int(st.st_mtime))
        for child in sorted(os.listdir(host)):
            yield from _tree_entries(host / child, f"{dest}/{child}")


def package_layer(names: Sequence[str]) -> list[Entry]:
    """The named top-level packages (and their dist-info) from this interpreter's
    site-packages; names not installed are skipped."""
    site = site_packages()
    parts = SITE_DIR.split("/")
    entries = [Entry("/".join(parts[: i + 1]), "dir") for i in range(len(parts))]
    seen: set[Path] = set()
    for name in names:
        candidates = [site / name, site / f"{name}.py", *_dist_infos(site, name)]
        for path in candidates:
            if path.exists() and path not in seen:
                seen.add(path)
                entries.extend(_tree_entries(path, f"{SITE_DIR}/{path.name}"))
    return entries


def realistic_layers(quick: bool) -> list[list[Entry]]:
    layers = host_rootfs_layers()
    layers.append(package_layer(QUICK_PACKAGES if quick else FULL_PACKAGES))
    return layers


def _appended(entry: Entry, extra: bytes) -> Iterator[bytes]:
    yield from entry.chunks()
    yield extra


def version2(layers: Sequence[Sequence[Entry]]) -> list[list[Entry]]:
    """A new version: the last layer with CHANGED_FILES files edited and one file added."""
    *lower, top = (list(layer) for layer in layers)
    files = [i for i, e in enumerate(top) if e.kind == "file" and str(e.path).endswith(".py")]
    step = max(1, len(files) // CHANGED_FILES)
    for i in files[::step][:CHANGED_FILES]:
        old = top[i]
        extra = b"\n# patched in v2\n"
        top[i] = replace(
            old,
            size=(old.size or 0) + len(extra),
            data_source=functools.partial(_appended, old, extra),
        )
    top.append(Entry(f"{SITE_DIR}/cafs_bench_v2.py", data=b"VERSION = 2\n"))
    return [*lower, top]


def bigfile_layers(size: int) -> list[list[Entry]]:
    return [[Entry("data", "dir"), Entry.random("data/big.bin", size, seed="cafs-bench")]]


def many_files_layers(count: int, per_dir: int = 100) -> list[list[Entry]]:
    """`count` small files; 64 distinct contents, so the store holds few blobs."""
    entries = [Entry("files", "dir")]
    for d in range((count + per_dir - 1) // per_dir):
        entries.append(Entry(f"files/d{d:05d}", "dir"))
        for f in range(min(per_dir, count - d * per_dir)):
            n = d * per_dir + f
            entries.append(Entry(f"files/d{d:05d}/f{n:06d}.txt", data=b"%d\n" % (n % 64)))
    return [entries]


def config_for(name: str) -> dict[str, object]:
    return python_config() if name.startswith("realistic") else {"Env": [DEFAULT_PATH_ENV]}


def index_into(built: Built, store_url: str, name: str) -> IndexResult:
    """`cafs index` of the image into a store, recorded under `name`."""
    source = open_source(built.oci)
    return index_image(source, open_store(store_url), IndexOptions(name=name))


def umoci_unpack(built: Built, dest: Path) -> Path:
    """`umoci unpack` into `dest` (new); returns the rootfs."""
    script = 'umask 022 && exec umoci --log error unpack --image "$1" "$2"'
    image = f"{built.layout}:{built.tag}"
    proc = subprocess.run(["sh", "-c", script, "sh", image, str(dest)], capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"umoci unpack {image} failed: {proc.stderr.decode()[-2000:]}")
    return dest / "rootfs"
