"""Model weights: recognised at index time, prefetched by the mount, loaded bit-exactly."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import sys
import tarfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors import deserialize
from safetensors.numpy import load_file, save_file
from test_profile import mounted

from bench.imagebuild import Entry, build_layout
from blobstore import open_store
from blobstore.envelope import digest
from cafs.cli.app import main as cafs
from cafs.mounts import mount
from cafs.weights import gpu
from cafs.weights.loader import Loader, WeightsError, load_safetensors, model_files, read_header
from cafs.weights.reader import CachedReader
from indexer.build import IndexOptions, index_image
from indexer.catalog import load_index
from indexer.layer import LayerApplier, LayerError
from indexer.sources import open_source
from indexer.tree import new_dir
from indexer.weights import describe

MiB = 1 << 20
RNG = np.random.default_rng(7)
NOT_NUMPY = {"BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # dtype -> bytes per element


def write_raw(path: Path, tensors: dict[str, tuple[str, list[int], bytes]],
              metadata: dict[str, str] | None = None) -> None:
    """A safetensors file by the spec, for dtypes numpy cannot save (BF16, FP8)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset,
                                                                         offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text +
                     b"".join(d for _, _, d in tensors.values()))


def mixed_tensors() -> dict[str, np.ndarray]:
    return {
        "f32": RNG.standard_normal((513, 301)).astype(np.float32),
        "f16": RNG.standard_normal(7001).astype(np.float16),
        "f64": np.array([np.nan, -0.0, np.inf, 1e-310]),  # bit patterns that must survive
        "i8": RNG.integers(-128, 127, (77, 33), dtype=np.int8),
        "u8": RNG.integers(0, 255, 999, dtype=np.uint8),
        "i64": RNG.integers(-(2**62), 2**62, 50, dtype=np.int64),
        "mask": RNG.integers(0, 2, (10, 10)).astype(bool),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, dtype=np.float32),
        "big": RNG.standard_normal((1024, 1500)).astype(np.float32),  # crosses windows
    }


def assert_same_as_safetensors(got: dict[str, Any], path: Path) -> None:
    """Equal to safetensors' own reading: names, shapes, every bit, and the dtypes of
    `safetensors.numpy.load_file` (which cannot load BF16/FP8 without ml_dtypes: those are
    checked against the library's raw `deserialize`)."""
    raw: dict[str, Any] = {}
    for f in model_files(path):
        raw.update(dict(deserialize(f.read_bytes())))
    assert sorted(got) == sorted(raw)
    for name, info in raw.items():
        assert list(got[name].shape) == info["shape"], name
        assert got[name].tobytes() == bytes(info["data"]), name
        if info["dtype"] in NOT_NUMPY:
            assert got[name].dtype.itemsize == NOT_NUMPY[info["dtype"]], name
    if any(info["dtype"] in NOT_NUMPY for info in raw.values()):
        return
    for f in model_files(path):
        for name, arr in load_file(f).items():
            assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
            assert got[name].tobytes() == arr.tobytes(), name


def write_model(root: Path) -> Path:
    """A two-shard model with its index JSON, as Hugging Face lays it out."""
    root.mkdir(parents=True, exist_ok=True)
    shards = [{f"layer{n}.w": RNG.standard_normal((700, 1000)).astype(np.float32),
               f"layer{n}.b": RNG.standard_normal(1000).astype(np.float16)} for n in range(2)]
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05}-of-00002.safetensors"
        save_file(tensors, str(root / name), metadata={"format": "np"})
        weight_map.update({k: name for k in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (root / "config.json").write_text("{}")
    return root


def bf16_file(path: Path) -> Path:
    bits = RNG.integers(0, 2**16, 3000, dtype=np.uint16)
    write_raw(path, {"bf16": ("BF16", [30, 100], bits.tobytes()),
                     "fp8": ("F8_E4M3", [64], RNG.bytes(64)),
                     "f16": ("F16", [8], np.arange(8, dtype=np.float16).tobytes())},
              {"format": "pt"})
    return path


# ----------------------------------------------------------------------- the loader, CPU


def test_loader_equals_safetensors_for_many_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_tensors(), str(path))
    got = load_safetensors(path)
    ref = load_file(path)
    for name, arr in ref.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        assert got[name].tobytes() == arr.tobytes()
    assert_same_as_safetensors(got, path)
    small = Loader(path, readers=3, window=64 * 1024)  # many windows, tensors split
    assert_same_as_safetensors(small.load(), path)
    assert small.report.tensors == len(ref) and small.report.bytes == sum(
        a.nbytes for a in ref.values())


def test_a_window_of_more_tensors_than_one_scattered_read_takes(tmp_path: Path) -> None:
    """Each window is read straight into its tensors' memory, one buffer per tensor: a
    window over more tensors than one preadv may take (IOV_MAX) is read in several."""
    from cafs.weights.reader import IOV_MAX

    tensors = {f"t{i:05}": RNG.integers(0, 255, 1 + i % 7, dtype=np.uint8)
               for i in range(3 * IOV_MAX)}
    path = tmp_path / "tiny.safetensors"
    save_file(tensors, str(path))
    loader = Loader(path, readers=2, window=64 * 1024)  # the header and ~12k tensors
    assert_same_as_safetensors(loader.load(), path)


def test_windows_already_here_are_read_while_an_earlier_one_is_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk whose stream starves must not hold the load: the windows after it that are
    already cached are read meanwhile (its wait would time out if they were not)."""
    import threading

    import cafs.weights.loader
    from cafs.weights.reader import FileReader

    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": RNG.standard_normal(16 * 1024, np.float32) for i in range(8)},
              str(path))
    later_read = threading.Event()
    waited: list[int] = []

    class Starving(FileReader):
        def has(self, offset: int, length: int) -> bool:
            return offset >= 64 * 1024 or later_read.is_set()  # the first window comes last

        def wait(self, offset: int, length: int) -> None:
            waited.append(offset)
            assert later_read.wait(10), "the load waited on the first window alone"

        def readinto(self, bufs: Any, offset: int) -> None:
            super().readinto(bufs, offset)
            if offset >= 64 * 1024:
                later_read.set()

    monkeypatch.setattr(cafs.weights.loader, "open_reader",
                        lambda p, size, direct, wait: Starving(p, size))
    loader = Loader(path, readers=2, window=64 * 1024)
    assert_same_as_safetensors(loader.load(), path)
    assert waited == [0]


@given(st.lists(st.integers(0, 40), max_size=12), st.integers(0, 64), st.data())
def test_a_scattered_read_fills_its_buffers_in_order(sizes: list[int], offset: int,
                                                     data: Any) -> None:
    from cafs.weights.reader import fill, split

    content = bytes(range(256)) * 2
    want = content[offset : offset + sum(sizes)]
    bufs = [memoryview(bytearray(n)) for n in sizes]
    fd = os.memfd_create("content")
    try:
        os.write(fd, content)
        assert fill(fd, bufs, offset)
        assert fill(fd, [memoryview(bytearray(1))], len(content)) is False  # past its end
    finally:
        os.close(fd)
    assert b"".join(map(bytes, bufs)) == want
    cut = data.draw(st.integers(0, sum(sizes)))
    head, rest = split(bufs, cut)
    assert b"".join(map(bytes, head)) == want[:cut]
    assert b"".join(map(bytes, rest)) == want[cut:]


def test_loader_bf16_and_fp8_bits(tmp_path: Path) -> None:
    path = bf16_file(tmp_path / "half.safetensors")
    got = load_safetensors(path)
    assert_same_as_safetensors(got, path)
    assert got["bf16"].shape == (30, 100)
    assert read_header(path).metadata == {"format": "pt"}


def test_loader_reads_sharded_models_by_index_json(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    files = model_files(model)
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors"]
    assert model_files(model / "model.safetensors.index.json") == files
    got = load_safetensors(model)
    assert_same_as_safetensors(got, model)
    assert sorted(got) == ["layer0.b", "layer0.w", "layer1.b", "layer1.w"]


def test_a_bad_shard_among_many_is_refused_by_name(tmp_path: Path) -> None:
    """Headers are read at once, in threads: a bad one still raises WeightsError naming it."""
    model = write_model(tmp_path / "model")
    (model / "model-00002-of-00002.safetensors").write_bytes(struct.pack("<Q", 10) + b"{bad}")
    with pytest.raises(WeightsError, match=r"model-00002-of-00002\.safetensors: .*header"):
        Loader(model)


def test_loader_refuses_what_is_not_safetensors(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(WeightsError, match="bad safetensors header"):
        load_safetensors(tmp_path / "bad.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(WeightsError, match="impossible"):
        read_header(tmp_path / "huge.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"no \.safetensors"):
        model_files(tmp_path / "empty")
    write_raw(tmp_path / "ok.safetensors", {"x": ("U8", [1], b"\x01")})
    with pytest.raises(WeightsError, match="unknown device"):
        load_safetensors(tmp_path / "ok.safetensors", device="tpu")


def test_cache_files_that_do_not_verify_are_read_from_the_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1000 + 17)
    (tmp_path / "f").write_bytes(data)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    keys = [digest(c) for c in chunks]
    for n, (key, chunk) in enumerate(zip(keys, chunks, strict=True)):
        if n == 2:
            continue  # not cached
        (tmp_path / "cache" / key[:2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache" / key[:2] / key).write_bytes(chunk if n else b"X" * len(chunk))
    reader = CachedReader(tmp_path / "f", len(data), {"chunk_size": 1000, "blobs": keys,
                                                      "cache": str(tmp_path / "cache")})
    buf = memoryview(bytearray(len(data)))
    reader.readinto([buf], 0)
    assert bytes(buf) == data
    assert reader.direct_bytes == 1000 + 17  # chunk 1 and the short last one
    reader.close()


def test_cache_files_the_fetcher_verified_are_not_hashed_again_unless_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's trust record (NodeCache.trust) spares the loader a second BLAKE3 pass
    over every chunk; a file changed in place after it was recorded is hashed, and refused."""
    import cafs.weights.reader
    from blobstore.cache import NodeCache

    data = os.urandom(3 * 1000)
    (tmp_path / "f").write_bytes(data)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    keys = [digest(c) for c in chunks]
    cache = NodeCache(tmp_path / "cache", fsync=False)
    for key, chunk in zip(keys, chunks, strict=True):
        cache.insert(key, chunk)
        fd = cache.open(key, len(chunk))
        assert fd is not None
        cache.trust(key, fd)
        os.close(fd)
    with open(cache.path(keys[1]), "r+b") as f:  # same size, new bytes, after the record
        f.write(b"X" * 1000)
    hashed: list[int] = []

    def counting(piece: Any) -> str:
        hashed.append(len(piece))
        return digest(piece)

    monkeypatch.setattr(cafs.weights.reader, "digest", counting)
    reader = CachedReader(tmp_path / "f", len(data), {"chunk_size": 1000, "blobs": keys,
                                                      "cache": str(cache.blobs)})
    buf = memoryview(bytearray(len(data)))
    reader.readinto([buf], 0)
    assert bytes(buf) == data
    assert hashed == [1000]  # only the changed file, which is then read from the path
    assert reader.direct_bytes == 2000
    reader.close()


# ------------------------------------------------------------------- GPU and its absence


def test_no_gpu_falls_back_to_cpu_with_a_clear_message(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    report = gpu.probe_nvml()
    if report.available:
        pytest.skip("this node has an NVIDIA GPU")
    assert "NVML" in (report.reason or "") or "pynvml" in (report.reason or "")
    assert gpu.prefetch_parallel(report) == 32
    path = bf16_file(tmp_path / "w.safetensors")
    with caplog.at_level(logging.WARNING, logger="cafs.weights"):
        loader = Loader(path, "cuda:0")
        got = loader.load()
    assert loader.report.device == "cpu" and "loading to CPU memory" in (loader.report.note
                                                                         or "")
    assert "cuda:0 unavailable" in caplog.text
    assert_same_as_safetensors(got, path)
    assert cafs(["weights", "load", str(path), "--device", "cuda", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["device"] == "cpu"
    assert "no NVIDIA GPU" in captured.err
    assert cafs(["weights", "gpus"]) == 0
    assert "no NVIDIA GPU" in capsys.readouterr().out


def _cuda() -> Any:
    """torch, where it sees a CUDA device; else the test skips (CI has no GPU)."""
    torch = pytest.importorskip("torch", reason="GPU path: torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("GPU path: torch sees no CUDA device")
    return torch


def assert_same_on_gpu(got: dict[str, Any], path: Path, device: str = "cuda:0") -> None:
    """Equal, bit for bit, dtype and shape, to `safetensors.torch.load_file` on the GPU."""
    from safetensors.torch import load_file as load_torch

    torch = _cuda()
    ref: dict[str, Any] = {}
    for f in model_files(path):
        ref.update(load_torch(f, device=device))
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        t = got[name]
        assert t.device == torch.device(device), name
        assert t.dtype == want.dtype and t.shape == want.shape, name
        assert torch.equal(t.view(-1).view(torch.uint8) if t.numel() else t,
                           want.view(-1).view(torch.uint8) if want.numel() else want), name


def test_gpu_load_equals_safetensors_torch(tmp_path: Path) -> None:
    """The CUDA path (pinned buffers reused behind events, async copies on a side stream)
    gives what safetensors gives: every dtype, windows that split tensors, more windows than
    buffers, shards by index JSON."""
    torch = _cuda()
    mixed = tmp_path / "mixed.safetensors"
    save_file(mixed_tensors(), str(mixed))
    half = bf16_file(tmp_path / "half.safetensors")
    model = write_model(tmp_path / "model")
    for path in (mixed, half, model):
        loader = Loader(path, "cuda")
        got = loader.load()
        assert loader.report.device == "cuda:0" and loader.report.note is None
        assert_same_on_gpu(got, path)
        small = Loader(path, "cuda:0", readers=3, window=64 * 1024)
        assert_same_on_gpu(small.load(), path)
    assert torch.cuda.current_stream().query()  # the caller's stream waited for our copies


def test_gpu_probe_names_the_device_torch_sees(capsys: pytest.CaptureFixture[str]) -> None:
    torch = _cuda()
    report = gpu.probe_nvml()
    assert report.available and report.driver, report.describe()
    first = report.gpus[0]
    assert first.name == torch.cuda.get_device_name(0)
    _, total = torch.cuda.mem_get_info(0)  # CUDA's total leaves out what the driver keeps
    assert total <= first.memory_total < total * 1.02 and 0 < first.memory_free <= total
    assert gpu.MIN_PARALLEL <= gpu.prefetch_parallel(report) <= gpu.MAX_PARALLEL
    with pytest.raises(gpu.GpuError, match="do not fit on GPU 0"):
        gpu.check_fits(report, 0, first.memory_total)
    assert cafs(["weights", "gpus"]) == 0
    assert first.name in capsys.readouterr().out


def test_gpu_load_refuses_weights_larger_than_free_memory(tmp_path: Path) -> None:
    """Checked before a byte moves: a header that claims more than the GPU has free."""
    torch = _cuda()
    free, _ = torch.cuda.mem_get_info(0)
    n = free // 4 + (1 << 20)
    path = tmp_path / "huge.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + 4 * n)  # sparse: nothing is written
    with pytest.raises(gpu.GpuError, match="do not fit on GPU 0"):
        Loader(path, "cuda:0")
    assert cafs(["weights", "load", str(path), "--device", "cuda:0"]) != 0


def fake_nvml(free: list[int], gen: int = 4, width: int = 16) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mem = [types.SimpleNamespace(total=80 << 30, free=f, used=(80 << 30) - f) for f in free]
    mod.nvmlInit = lambda: None  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(free)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: mem[h]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: gen  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCurrPcieLinkWidth = lambda h: width  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: "550.54"  # type: ignore[attr-defined]
    return mod


def test_nvml_sizes_parallelism_and_refuses_what_cannot_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([70 << 30, 1 << 30]))
    report = gpu.probe_nvml()
    assert [g.index for g in report.gpus] == [0, 1] and report.driver == "550.54"
    assert report.gpus[0].pcie_bandwidth == pytest.approx(31.5e9, rel=1e-3)
    assert gpu.prefetch_parallel(report) == gpu.MAX_PARALLEL
    assert gpu.check_fits(report, 0, 60 << 30).index == 0
    with pytest.raises(gpu.GpuError, match="do not fit on GPU 1"):
        gpu.check_fits(report, 1, 2 << 30)
    with pytest.raises(gpu.GpuError, match="no GPU 5"):
        gpu.check_fits(report, 5, 1)
    assert gpu.device_index("cuda:1") == 1 and gpu.device_index("cpu") is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([1 << 30], gen=1, width=1))
    assert gpu.prefetch_parallel(gpu.probe_nvml()) == gpu.MIN_PARALLEL


# ------------------------------------------------------------------------- index time


def _tar(files: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


class _Sink:
    def add(self, key: str, data: bytes) -> None:
        pass


def test_index_time_recognition(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(mixed_tensors(), str(path), metadata={"k": "v"})
    files = {"models/m.safetensors": path.read_bytes(), "fw/firmware.bin": b"\x01\x02" * 40,
             "m/pytorch_model.bin": b"PK\x03\x04" + b"\0" * 20, "m/x.gguf": b"GGUF\3\0\0\0",
             "m/bad.safetensors": b"\xff" * 64, "m/notes.txt": b"hi",
             "old/model.pt": pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\0" * 9,
             "fw/random.bin": b"\x80\x02" + b"\x5a" * 99}  # a pickle's first bytes only
    root = new_dir()
    applier = LayerApplier(root, _Sink(), digest, 512)  # the header spans several chunks
    applier.apply(_tar(files))
    meta = describe(root)
    assert applier.saw_weights and meta is not None
    by_path = {f["path"]: f for f in meta["files"]}
    assert sorted(by_path) == ["m/pytorch_model.bin", "m/x.gguf", "models/m.safetensors",
                               "old/model.pt"]
    st = by_path["models/m.safetensors"]
    header = read_header(path)
    assert st == {"path": "models/m.safetensors", "format": "safetensors",
                  "size": path.stat().st_size, "header_len": header.header_len,
                  "tensors": len(header.tensors)}  # not the table: the loader reads that
    assert by_path["m/x.gguf"] == {"path": "m/x.gguf", "format": "gguf", "size": 8,
                                   "version": 3}
    plain = new_dir()
    LayerApplier(plain, _Sink(), digest, 512).apply(_tar({"a.txt": b"x"}))
    assert describe(plain) is None


class _Keep:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, key: str, data: bytes) -> None:
        self.blobs[key] = bytes(data)


def test_weight_files_by_content_get_the_weights_chunk_size(tmp_path: Path) -> None:
    """A name is not enough: a `.bin` that is no weight file keeps the index's chunk size.
    Either way each chunk is the file's bytes at its place, and the probe saw them all."""
    path = tmp_path / "m.safetensors"
    save_file(mixed_tensors(), str(path))
    firmware = os.urandom(10_000)
    files = {"m.safetensors": path.read_bytes(), "fw/firmware.bin": firmware,
             "m/pytorch_model.bin": b"PK\x03\x04" + os.urandom(9_000), "notes.txt": b"hi" * 999}
    root = new_dir()
    sink = _Keep()
    LayerApplier(root, sink, digest, 1000, weights_chunk_size=4096).apply(_tar(files))
    assert root.children is not None
    nodes = {"m.safetensors": root.children[b"m.safetensors"]}
    for name in ("fw/firmware.bin", "m/pytorch_model.bin"):
        parent, base = name.encode().split(b"/")
        children = root.children[parent].children
        assert children is not None
        nodes[name] = children[base]
    nodes["notes.txt"] = root.children[b"notes.txt"]
    sizes = {name: node.chunk_size for name, node in nodes.items()}
    assert sizes == {"m.safetensors": 4096, "fw/firmware.bin": 1000,
                     "m/pytorch_model.bin": 4096, "notes.txt": 1000}
    for name, node in nodes.items():
        data = files[name]
        assert [sink.blobs[k] for k in node.chunks] == [
            data[at : at + node.chunk_size] for at in range(0, len(data), node.chunk_size)]
    assert nodes["m.safetensors"].weights is not None and nodes["fw/firmware.bin"].weights is None


def test_a_weight_file_cut_short_inside_its_head_is_refused() -> None:
    buf = _tar({"m.safetensors": b"\x08" + bytes(7) + b"{}      " + bytes(5000)})
    raw = buf.getvalue()
    cut = raw.index(b"{}      ") + 100  # the member's data ends early
    with pytest.raises(LayerError, match="truncated"):
        LayerApplier(new_dir(), _Sink(), digest, 1000, weights_chunk_size=4096).apply(
            io.BytesIO(raw[:cut]))


# ----------------------------------------------------------------------- on a cafs mount


def _weights_image(tmp_path: Path, url: str, opts: IndexOptions | None = None
                   ) -> tuple[str, str, Path]:
    src = tmp_path / "src"
    write_model(src / "model")
    bf16_file(src / "half.safetensors")
    entries = [Entry(f"srv/{p.relative_to(src)}", data=p.read_bytes())
               for p in sorted(src.rglob("*")) if p.is_file()]
    entries.append(Entry("srv/app.py", data=b"print('serve')\n"))
    build_layout(tmp_path / "l", "t", [entries], compression="none")
    rec = index_image(open_source(f"oci:{tmp_path / 'l'}:t"), open_store(url),
                      opts or IndexOptions()).record
    return rec.ref, rec.index, src


def _wait_done(mnt: Path) -> dict[str, Any]:
    for _ in range(600):
        state = mount.query(mnt, "prefetch")
        if state["state"] == "done":
            return state
        time.sleep(0.05)
    raise AssertionError(state)


@pytest.mark.root
def test_weights_on_a_mount_prefetched_and_loaded_bit_exactly(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    ref, index_key, src = _weights_image(tmp_path, url)
    index = load_index(open_store(url), index_key)
    listed = [f["path"] for f in index.meta["weights"]["files"]]
    assert listed == ["srv/half.safetensors", "srv/model/model-00001-of-00002.safetensors",
                      "srv/model/model-00002-of-00002.safetensors"]
    again = index_image(open_source(f"oci:{tmp_path / 'l'}:t"),
                        open_store(f"file://{tmp_path}/store2"), IndexOptions())
    assert again.record.index == index_key  # deterministic with weights in the meta
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache",
                 prefetch_weights="on") as mnt:
        (plan,) = _wait_done(mnt)["plans"]
        assert plan["name"] == "weights" and plan["failed_blobs"] == 0
        weight_bytes = sum(f["size"] for f in index.meta["weights"]["files"])
        assert weight_bytes < plan["bytes"] < weight_bytes + 1000  # + the JSON beside them
        loader = Loader(mnt / "srv/model")
        got = loader.load()
        assert_same_as_safetensors(got, src / "model")
        assert loader.report.direct_bytes > 0  # straight from the node cache
        assert_same_as_safetensors(load_safetensors(mnt / "srv/half.safetensors"),
                                   src / "half.safetensors")
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 0 and stats["prefetch_bytes"] == plan["bytes"]
    with mounted(ref, tmp_path / "lazy", url, tmp_path / "cache2",
                 prefetch_weights="auto") as mnt:
        plans = [p["name"] for p in mount.query(mnt, "prefetch")["plans"]]
        assert plans == (["weights"] if gpu.probe().available else [])  # by itself on a GPU
        got = load_safetensors(mnt / "srv/model", prefetch=False, direct=False)
        assert_same_as_safetensors(got, src / "model")
    if not gpu.probe().available:
        assert "weights not prefetched: no NVIDIA GPU" in (tmp_path / "lazy.log").read_text()


@pytest.mark.root
def test_weight_files_have_their_own_chunk_size_and_read_exactly(tmp_path: Path) -> None:
    """Weight files are cut into `weights_chunk_size` pieces, everything else into the
    index's: reads across either kind of boundary, lazy or prefetched, through FUSE or
    from the cache files, give the file's bytes."""
    url = f"file://{tmp_path}/store"
    small, large = 64 << 10, 1 << 20
    ref, index_key, src = _weights_image(tmp_path, url, IndexOptions(
        chunk_size=small, weights_chunk_size=large))
    index = load_index(open_store(url), index_key)
    assert (index.chunk_size, index.max_chunk_size) == (small, large)
    shard = src / "model/model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    assert len(data) > 2 * large
    node = index.inode(index.resolve(b"srv/model/" + shard.name.encode()) or 0)
    assert node.chunk_size == large and node.count == -(-len(data) // large)
    json_file = index.inode(index.resolve(b"srv/model/model.safetensors.index.json") or 0)
    assert json_file.chunk_size == small
    with mounted(ref, tmp_path / "lazy", url, tmp_path / "cache",
                 prefetch_weights="off") as mnt:
        fd = os.open(mnt / "srv/model" / shard.name, os.O_RDONLY)
        try:
            for at in (large - 100, 2 * large - 1, small - 1, 0, len(data) - 5):
                assert os.pread(fd, 300, at) == data[at : at + 300], at
        finally:
            os.close(fd)
        assert (mnt / "srv/model" / shard.name).read_bytes() == data
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache2",
                 prefetch_weights="on") as mnt:
        assert _wait_done(mnt)["plans"][0]["failed_blobs"] == 0
        loader = Loader(mnt / "srv/model")
        assert_same_as_safetensors(loader.load(), src / "model")
        assert loader.report.direct_bytes > 2 * large  # whole large chunks from the cache


@pytest.mark.root
def test_weights_prefetch_command_and_loader_request(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    url = f"file://{tmp_path}/store"
    ref, _, _ = _weights_image(tmp_path, url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache",
                 prefetch_weights="off") as mnt:
        assert cafs(["weights", "prefetch", str(mnt / "srv/model")]) == 0
        state = mount.query(mnt, "prefetch")
        assert [p["name"] for p in state["plans"]] == ["path:srv/model"]
        assert state["plans"][0]["state"] == "done"
        assert mount.query(mnt)["demand_blobs"] == 0
        assert cafs(["weights", "load", str(mnt / "srv/half.safetensors"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tensors"] == 3
        assert mount.query(mnt, "prefetch")["plans"][-1]["name"] == "path:srv/half.safetensors"
        assert cafs(["weights", "list", "--store", url, ref]) == 0
        assert "srv/model/model-00002-of-00002.safetensors" in capsys.readouterr().out


@pytest.mark.root
def test_weights_prefetched_by_worker_processes(tmp_path: Path) -> None:
    """`--prefetch-processes`: workers fetch, verify and cache; the daemon and the loader
    trust their files; the pool stops when the plan is done, the rest with the mount."""
    url = f"file://{tmp_path}/store"
    ref, _, src = _weights_image(tmp_path, url)
    with mounted(ref, tmp_path / "mnt", url, tmp_path / "cache", prefetch_weights="on",
                 daemon_args=["--prefetch-processes", "2"]) as mnt:
        state = _wait_done(mnt)
        (plan,) = state["plans"]
        assert plan["processes"] == 2 and plan["failed_blobs"] == 0
        assert state["processes"]["filled_blobs"] == plan["blobs"] - plan["cached_blobs"] > 0
        assert state["processes"]["running"] is False  # stopped with no plan left
        loader = Loader(mnt / "srv/model")
        assert_same_as_safetensors(loader.load(), src / "model")
        assert loader.report.direct_bytes > 0
        stats = mount.query(mnt)
        assert stats["demand_blobs"] == 0 and stats["corrupt_blobs"] == 0
        assert stats["prefetch_bytes"] == plan["bytes"]
        # The loader's own prefetch requests found everything cached: no second pool.
        log = (tmp_path / "mnt.log").read_text()
        assert log.count("worker processes for large plans") == 1
        pid = mount.query(mnt, "info")["pid"]
        workers = _descendants(pid)
        assert workers  # the forkserver stays while the daemon runs
    for _ in range(100):  # the daemon and its processes are gone with the mount
        left = [p for p in [pid, *workers] if _running(p)]
        if not left:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"worker processes outlived the mount: {left}")


def _running(pid: int) -> bool:
    """Exists and has not exited (a zombie waits for whoever reaps it: not ours to judge)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    parents = {int(p): _parent(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        todo += kids
    return found


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1
