"""The layout's rules, read from the sources with `ast` (nothing is imported or run).

The top-level packages depend one way, blobstore <- indexer <- cafs <- snapshotter <- bench.
Inside cafs a module's path says which process runs it (cafs/daemon/__init__.py and its
siblings say why), and the import rules below keep it so: the shared top-level modules
import no subpackage, a model server imports the weight loader without the daemon, and the
snapshotter imports only what starts and finds mounts.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cafs.mounts.server import PACKAGES, fingerprint

ROOT = Path(__file__).resolve().parent.parent
TOP = ("blobstore", "indexer", "cafs", "snapshotter", "bench")
SUBPACKAGES = ("daemon", "mounts", "cli", "run", "weights")
SHARED = ("__init__", "config", "paths", "logs", "terminal", "cpus", "resolve", "profile",
          "ipc")
# What the snapshotter may import of cafs: starting and finding mounts, and the shared
# modules it needs for that; `cafs.resolve` and `cafs.daemon.kernelmeta` (which imports
# neither pyfuse3 nor trio) to bring a pulled image's index and EROFS image into the node
# cache ahead of its mount (snapshotter/remote.py, `warm`).
SNAPSHOTTER_MAY = ("cafs.mounts", "cafs.ipc", "cafs.config", "cafs.paths", "cafs.logs",
                   "cafs.terminal", "cafs.resolve", "cafs.daemon.kernelmeta")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The modules a file imports: import statements anywhere in it (or, with
    `top_level_only`, those that run when it is imported), and `importlib.import_module`
    calls with a literal name."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            # `from cafs.daemon import kernelmeta` imports the module cafs.daemon.kernelmeta
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if _is_module(f"{node.module}.{alias.name}")}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _file_of(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def loaded_by_importing(paths: Iterator[Path] | list[Path]) -> set[str]:
    """Every module importing these files' modules loads: module-level imports followed
    through the repository's own modules (a function's lazy import runs only if called)."""
    todo = [module_name(p) for p in paths]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = _file_of(name)
        if path is not None:
            todo += imports(path, top_level_only=True)
    return seen


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_top_level_packages_depend_one_way() -> None:
    wrong = []
    for i, package in enumerate(TOP):
        above = TOP[i + 1:]
        for path in sources(package):
            wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in imports(path)
                      if within(name, above)]
    assert wrong == []


def test_the_weight_loader_loads_without_the_daemon() -> None:
    """A model server imports cafs.weights: neither that nor anything it imports at module
    level may load the daemon, pyfuse3 or trio, and no function of it imports them later."""
    daemon = ("cafs.daemon", "pyfuse3", "trio")
    loaded = loaded_by_importing(sources("cafs/weights"))
    assert sorted(name for name in loaded if within(name, daemon)) == []
    lazy = [f"{p.relative_to(ROOT)} imports {name}" for p in sources("cafs/weights")
            for name in imports(p) if within(name, daemon)]
    assert lazy == []


def shared_modules() -> list[Path]:
    """The top-level modules of cafs, which serve every process; not `python -m cafs`
    (__main__.py), the command line's entry point, which runs cafs.cli."""
    return [p for p in sorted((ROOT / "cafs").glob("*.py")) if p.name != "__main__.py"]


def test_cafs_keeps_at_top_level_only_what_every_process_shares() -> None:
    assert {p.stem for p in shared_modules()} == set(SHARED)
    assert {p.name for p in (ROOT / "cafs").iterdir()
            if p.is_dir() and p.name != "__pycache__"} == set(SUBPACKAGES)


def test_the_shared_modules_import_no_subpackage() -> None:
    subpackages = tuple(f"cafs.{name}" for name in SUBPACKAGES)
    wrong = [f"{p.name} imports {name}" for p in shared_modules() for name in imports(p)
             if within(name, subpackages)]
    assert wrong == []


def test_the_shared_modules_load_neither_pyfuse3_nor_trio() -> None:
    loaded = loaded_by_importing(shared_modules())
    assert sorted(name for name in loaded if within(name, ("pyfuse3", "trio"))) == []


def test_the_snapshotter_imports_only_what_starts_and_finds_mounts() -> None:
    wrong = [f"{p.relative_to(ROOT)} imports {name}" for p in sources("snapshotter")
             for name in imports(p)
             if within(name, "cafs") and name != "cafs" and not within(name, SNAPSHOTTER_MAY)]
    assert wrong == []


def test_only_the_command_line_imports_it() -> None:
    """cafs.cli holds parsing and printing; libraries beneath it must not need them."""
    wrong = [f"{p.relative_to(ROOT)} imports {name}" for package in TOP[:-1]
             for p in sources(package)
             if not within(module_name(p), ("cafs.cli", "cafs.__main__"))
             for name in imports(p) if within(name, "cafs.cli")]
    assert wrong == []


def test_each_subpackage_says_what_it_is_for_and_imports_nothing() -> None:
    for name in SUBPACKAGES:
        tree = ast.parse((ROOT / "cafs" / name / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"cafs/{name}/__init__.py has no docstring"
        assert len(tree.body) == 1, f"cafs/{name}/__init__.py does more than say what it is"


@pytest.fixture
def code(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("module", [
    *(f"cafs/{name}/__init__.py" for name in SUBPACKAGES),
    "cafs/daemon/fetcher.py", "cafs/weights/reader.py", "cafs/config.py",
    "blobstore/cache.py", "indexer/format.py"])
def test_the_mount_servers_fingerprint_covers_every_module(code: Path, module: str) -> None:
    """A mount server whose code changed on disk must answer "stale" (cafs/mounts/server.py):
    that holds only if its fingerprint changes with any module a daemon may import."""
    before = fingerprint(code)
    with (code / module).open("a") as f:
        f.write("# changed\n")
    assert fingerprint(code) != before
