"""Budgets for hostile images: each amplification is refused, or bounded, in bounded time
and memory, with a one-line error naming the budget and the flag that raises it.

Every case runs `cafs index` for real, as a subprocess (its peak RSS is its own), on an
image built here; umoci refuses or unpacks the same images in milliseconds where the old
indexer took minutes or gigabytes (figures: docs/ARCHITECTURE.md, "Budgets for hostile
images").
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from blobstore.envelope import digest
from indexer.catalog import list_images, load_index
from indexer.layer import LayerApplier, LayerError
from indexer.tree import new_dir

CODE = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    rc: int
    stderr: str
    seconds: float
    max_rss: int  # bytes, after exec (ru_maxrss would count the forking test's own)


# `cafs index` as `python -m cafs` runs it, reporting its peak RSS (VmHWM) as it exits.
_CLI = """import atexit, os, sys
from cafs.cli.app import main
def peak():
    status = open("/proc/self/status").read()
    kib = status.split("VmHWM:")[1].split()[0]
    open(os.environ["PEAK_FILE"], "w").write(kib)
atexit.register(peak)
sys.exit(main(sys.argv[1:]))
"""


def index(layout: Path, store: Path, *flags: str, timeout: float = 60) -> Run:
    """`cafs index oci:LAYOUT:t` in a child process of its own, timed and measured."""
    peak = store.parent / f"{store.name}.peak"
    argv = [sys.executable, "-c", _CLI, "index", f"oci:{layout}:t",
            "--store", f"file://{store}", "-q", *flags]
    env = {**os.environ, "PYTHONPATH": str(CODE), "PEAK_FILE": str(peak)}
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"cafs index ran past {timeout} s") from None
    return Run(proc.returncode, proc.stderr, time.monotonic() - start,
               int(peak.read_text()) * 1024)


def _meta(store: Path) -> dict[str, Any]:
    """The top index meta of the one image in `store`."""
    blobs = open_store(f"file://{store}")
    (record,) = list_images(blobs)
    return load_index(blobs, record.index).meta


def refused(run: Run, budget: str) -> None:
    """Exit 1 with one line naming the budget and its flag, no traceback."""
    lines = run.stderr.strip().splitlines()
    assert run.rc == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith("cafs: error: ") and "image refused: " in lines[0] and \
        f"(budget {budget}; raise it with `cafs index --{budget.replace('_', '-')} N`)" \
        in lines[0], lines[0]


# ------------------------------------------------------------------------------ symlinks


def test_symlink_fanout_is_refused_after_40_hops_per_lookup(tmp_path: Path) -> None:
    """L9 -> L8/L8/L8/L8/L8/L8, ... L0 -> '.': a lookup of L9/f expands 6^9 symlinks. The
    kernel and umoci stop after 40 (255) hops in one lookup, nested ones included; hops
    counted per nesting level let it run (84 s here, for a 1 KiB layer)."""
    entries = [Entry("L0", "symlink", linkname=".")]
    entries += [Entry(f"L{k}", "symlink", linkname="/".join([f"L{k - 1}"] * 6))
                for k in range(1, 10)]
    build_layout(tmp_path / "l", "t", [[*entries, Entry("L9/f", data=b"x")]])
    run = index(tmp_path / "l", tmp_path / "s", timeout=30)
    assert run.rc == 1 and "too many levels of symbolic links" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and run.seconds < 15


def _chain_layers(layers: int, per_layer: int) -> list[list[Entry]]:
    """A chain of 39 symlinks whose targets walk 201 components each, then entries created
    through it: each entry's lookup takes ~7,800 steps, within the 40-hop rule."""
    chain = [Entry("d", "dir"), Entry("x", "dir")]
    chain += [Entry(f"c{i}", "symlink", linkname="x/../" * 100 + (f"c{i + 1}" if i < 38 else "d"))
              for i in range(39)]
    files = [[Entry(f"c0/f{n}-{i}") for i in range(per_layer)] for n in range(layers)]
    return [chain, *files]


def test_link_resolution_is_one_budget_for_the_whole_image(tmp_path: Path) -> None:
    """4 layers of 10 lookups (the last, of hard links' targets): each layer within 100,000
    steps, the image over it."""
    links = [Entry(f"h{i}", "hardlink", linkname="c0/f0-0") for i in range(10)]
    build_layout(tmp_path / "l", "t", [*_chain_layers(3, 10), links])
    refused(index(tmp_path / "l", tmp_path / "s", "--max-link-steps", "100000"),
            "max_link_steps")
    refused(index(tmp_path / "l", tmp_path / "s", "--max-link-steps", "250000"),
            "max_link_steps")  # ~236,000 for the files: the hard links are charged too
    ok = index(tmp_path / "l", tmp_path / "s2", "--max-link-steps", "400000")
    assert ok.rc == 0, ok.stderr


def test_symlink_targets_are_bounded_as_the_kernel_bounds_them() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("long")
        info.type, info.linkname = tarfile.SYMTYPE, "a/" * 2048
        tf.addfile(info)
    buf.seek(0)
    with pytest.raises(LayerError, match="target of 4096 bytes or more"):
        LayerApplier(new_dir(), _NoSink(), digest, 4096).apply(buf)


class _NoSink:
    def add(self, key: str, data: bytes) -> None:
        pass


# ------------------------------------------------------------------- bytes, entries, layers


def test_expanded_bytes_are_bounded_per_layer_and_per_image(tmp_path: Path) -> None:
    """Three zstd layers of 8 MiB of zeros (a few KiB each): each under a 20 MiB image
    budget, together over it."""
    layers = [[Entry.sparse_zero(f"z{n}", 8 << 20)] for n in range(3)]
    build_layout(tmp_path / "l", "t", layers, compression="zstd")
    refused(index(tmp_path / "l", tmp_path / "s", "--max-image-bytes", "20M"),
            "max_image_bytes")
    refused(index(tmp_path / "l", tmp_path / "s", "--max-layer-bytes", "4M"), "max_layer_bytes")
    assert index(tmp_path / "l", tmp_path / "s", "--max-image-bytes", "30M").rc == 0


def test_entries_count_the_parents_a_path_implies(tmp_path: Path) -> None:
    """20 entries, each 200 directories deep under a parent of its own: 4,000 inodes."""
    deep = "/".join(["a"] * 200)
    build_layout(tmp_path / "l", "t", [[Entry(f"x{n}/{deep}/f") for n in range(20)]])
    refused(index(tmp_path / "l", tmp_path / "s", "--max-entries", "1000"), "max_entries")
    assert index(tmp_path / "l", tmp_path / "s", "--max-entries", "5000").rc == 0


def test_layers_and_per_layer_indexes_are_bounded(tmp_path: Path) -> None:
    """A tree of 2,000 files under 10 empty layers: 11 indexes of ~2,000 inodes each."""
    files = [Entry(f"d{n // 100}/f{n}") for n in range(2000)]
    build_layout(tmp_path / "l", "t", [files, *([Entry(f"e{n}")] for n in range(10))])
    refused(index(tmp_path / "l", tmp_path / "s", "--max-layers", "5"), "max_layers")
    refused(index(tmp_path / "l", tmp_path / "s", "--max-index-entries", "10000"),
            "max_index_entries")
    assert index(tmp_path / "l", tmp_path / "s", "--max-index-entries", "30000").rc == 0


# ------------------------------------------------------------------------------ weights


def _safetensors(tensors: int) -> bytes:
    """A valid safetensors file of `tensors` empty tensors: all header."""
    header = json.dumps({f"t{n}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
                         for n in range(tensors)}).encode()
    return struct.pack("<Q", len(header)) + header


def test_a_huge_weights_header_costs_neither_time_nor_memory(tmp_path: Path) -> None:
    """A 40 MiB safetensors header of 700,000 tensors under 5 more layers: the old indexer
    parsed it into a tensor table, copied into every layer's index meta (which every mount
    parses): minutes and gigabytes. Past max_weights_header it is not read at all: indexing
    costs what the same bytes cost in a file of any other name."""
    data = _safetensors(700_000)
    assert len(data) > 32 << 20
    runs = []
    for name in ("m.safetensors", "m.data"):
        layers = [[Entry(name, data=data)], *([Entry(f"e{n}")] for n in range(5))]
        build_layout(tmp_path / name, "t", layers)
        runs.append(index(tmp_path / name, tmp_path / f"s-{name}", timeout=60))
    weights, plain = runs
    assert weights.rc == 0 and "over the max_weights_header budget" in weights.stderr
    assert weights.seconds < 20 and weights.max_rss < plain.max_rss + (32 << 20), runs
    assert weights.max_rss < 256 << 20, runs
    assert "weights" not in _meta(tmp_path / "s-m.safetensors")


def test_the_index_keeps_a_tensor_count_not_the_table(tmp_path: Path) -> None:
    """Under the budget (200,000 tensors, 11 MiB): described, in a few bytes."""
    build_layout(tmp_path / "l", "t", [[Entry("m.safetensors", data=_safetensors(200_000))]])
    run = index(tmp_path / "l", tmp_path / "s", timeout=60)
    assert run.rc == 0, run.stderr
    meta = _meta(tmp_path / "s")
    (described,) = meta["weights"]["files"]
    assert described["tensors"] == 200_000 and described["format"] == "safetensors"
    assert len(json.dumps(meta)) < 4096
