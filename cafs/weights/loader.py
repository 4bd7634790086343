"""A safetensors loader for model servers: large overlapped reads, straight to the device.

A model cold start is bounded by how fast weight bytes move from the store to where the
model wants them. This loader reads each file's data section in large windows, several at
once (each window a separate read, so a lazy cafs mount fetches them in parallel), and
copies every window's tensors to their destination while the next windows are still being
read: numpy (or torch) arrays in CPU memory, or CUDA memory through a few reusable pinned
host buffers with asynchronous copies. On a cafs mount it first asks the mount daemon to
prefetch the files at full parallelism and, where the daemon can say which node-cache
files back a path, reads those directly (verifying each against its BLAKE3 key) instead
of going through FUSE.

Results are bit-identical to `safetensors.numpy.load_file`. torch is optional: without it,
or without a CUDA device, a GPU load falls back to CPU memory and says why.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cafs.weights import gpu
from cafs.weights.reader import FileReader, Reader, open_reader, request_prefetch
from indexer.weights import parse_safetensors_header, safetensors_metadata

log = logging.getLogger(__name__)
MiB = 1 << 20
INDEX_SUFFIX = ".safetensors.index.json"
HEADER_READERS = 16  # files whose headers are read at once
WAITERS = 8  # windows not cached yet waited for at once (each a read blocked in the mount)
POLL_SECONDS = 0.05  # how often to look for windows the prefetch brought in meanwhile
LOOKAHEAD = 64  # windows past the first one not read yet that may be read before it
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)

# safetensors dtype -> (numpy dtype name, ml_dtypes name or None, raw-bits numpy dtype)
NUMPY_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "U64": "uint64",
    "I32": "int32", "U32": "uint32", "I16": "int16", "U16": "uint16", "I8": "int8",
    "U8": "uint8", "BOOL": "bool", "C64": "complex64",
}
ML_DTYPES = {"BF16": ("bfloat16", "uint16"), "F8_E4M3": ("float8_e4m3fn", "uint8"),
             "F8_E5M2": ("float8_e5m2", "uint8"), "F8_E8M0": ("float8_e8m0fnu", "uint8")}
TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}


class WeightsError(ValueError):
    """Not a safetensors file or model directory this loader can read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsFile:
    path: Path
    size: int
    header_len: int
    tensors: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_header(path: str | os.PathLike[str]) -> SafetensorsFile:
    """The tensor table of a safetensors file, checked as the safetensors library does."""
    p = Path(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{p}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * MiB:
            raise WeightsError(f"{p}: header length {n} is impossible")
        header = f.read(n)
    try:
        table = parse_safetensors_header(header, size - 8 - n)
        metadata = safetensors_metadata(header)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise WeightsError(f"{p}: bad safetensors header: {exc}") from exc
    base = 8 + n
    tensors = [TensorInfo(t["name"], t["dtype"], tuple(t["shape"]),
                          base + t["data_offsets"][0], base + t["data_offsets"][1])
               for t in table]
    return SafetensorsFile(p, size, n, tensors, metadata)


def read_headers(paths: Sequence[Path]) -> list[SafetensorsFile]:
    """Every file's tensor table, read at once: on a lazy mount each header is a miss of
    its file's first chunk (16 MiB for weights), and read one after another they held a
    load of 8 shards 1.4 s on loopback S3 before its first tensor, while the prefetch had
    already brought most of the model in."""
    if len(paths) < 2:
        return [read_header(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), HEADER_READERS),
                            thread_name_prefix="cafs-headers") as pool:
        return list(pool.map(read_header, paths))


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a model: one file, the shards an index JSON names (in shard
    order), or a directory's index JSON or else all its .safetensors files."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*" + INDEX_SUFFIX))
        if indexes:
            return model_files(indexes[0])
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{p}: no .safetensors files")
        return files
    if p.name.endswith(INDEX_SUFFIX):
        try:
            weight_map = json.loads(p.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{p}: not a safetensors index: {exc}") from exc
        return [p.parent / name for name in sorted(set(weight_map.values()))]
    return [p]


# ------------------------------------------------------------------------- destinations


def _numpy_dtype(dtype: str) -> Any:
    import numpy as np

    if dtype in NUMPY_DTYPES:
        return np.dtype(NUMPY_DTYPES[dtype])
    name, raw = ML_DTYPES[dtype]
    try:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    except (ImportError, AttributeError):
        return np.dtype(raw)  # the raw bits: numpy has no such type without ml_dtypes


class NumpySink:
    """Tensors in CPU memory as numpy arrays (what `safetensors.numpy` returns)."""

    device = "cpu"
    threaded = True  # copies may run in the reader threads, and reads go straight in

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        self.raw: dict[str, Any] = {}

    def allocate(self, t: TensorInfo) -> None:
        self.raw[t.name] = self.np.empty(t.nbytes, self.np.uint8)

    def copy(self, t: TensorInfo, dst: int, src: memoryview) -> None:
        self.raw[t.name][dst : dst + len(src)] = self.np.frombuffer(src, self.np.uint8)

    def view(self, t: TensorInfo, dst: int, n: int) -> memoryview:
        """Writable memory of bytes [dst, dst + n) of a tensor, to read into directly."""
        return memoryview(self.raw[t.name][dst : dst + n])

    def finish(self, t: TensorInfo) -> Any:
        return self.raw.pop(t.name).view(_numpy_dtype(t.dtype)).reshape(t.shape)

    def done_with(self, buf: memoryview) -> None:
        return None


class TorchSink:
    """torch tensors, on CPU or, through pinned buffers and async copies, on a GPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        # A GPU's copies are queued by one thread, in order, each buffer's behind an event.
        self.threaded = not self.cuda
        self.raw: dict[str, Any] = {}
        self.stream = torch.cuda.Stream(device=torch.device(device)) if self.cuda else None
        self.events: dict[int, Any] = {}
        self.pinned: dict[int, Any] = {}

    def buffer(self, size: int) -> memoryview:
        """A pinned host buffer, as a writable memoryview over its memory."""
        t = self.torch.empty(size, dtype=self.torch.uint8, pin_memory=self.cuda)
        self.pinned[t.data_ptr()] = t
        return memoryview(t.numpy()).cast("B")

    def allocate(self, t: TensorInfo) -> None:
        self.raw[t.name] = self.torch.empty(t.nbytes, dtype=self.torch.uint8,
                                            device=self.device)

    def copy(self, t: TensorInfo, dst: int, src: memoryview) -> None:
        if not self.cuda:
            import numpy as np

            self.raw[t.name][dst : dst + len(src)].numpy()[:] = np.frombuffer(src, np.uint8)
            return
        with self.torch.cuda.stream(self.stream):
            self.raw[t.name][dst : dst + len(src)].copy_(self._host_slice(src),
                                                         non_blocking=True)

    def view(self, t: TensorInfo, dst: int, n: int) -> memoryview:
        """Writable memory of bytes [dst, dst + n) of a CPU tensor, to read into directly."""
        return memoryview(self.raw[t.name][dst : dst + n].numpy())

    def _host_slice(self, src: memoryview) -> Any:
        """The pinned tensor memory behind a slice of one of our buffers (an async copy
        from pageable memory would silently be synchronous)."""
        addr = _address(src)
        for base, tensor in self.pinned.items():
            if base <= addr < base + tensor.numel():
                return tensor[addr - base : addr - base + len(src)]
        raise AssertionError("copy source is not a pinned buffer")

    def done_with(self, buf: memoryview) -> None:
        """Record that `buf`'s copies are queued: it is reused only after they ran."""
        if self.cuda:
            event = self.torch.cuda.Event()
            event.record(self.stream)
            self.events[_address(buf)] = event

    def wait_reusable(self, buf: memoryview) -> None:
        event = self.events.pop(_address(buf), None)
        if event is not None:
            event.synchronize()

    def finish(self, t: TensorInfo) -> Any:
        dtype = getattr(self.torch, TORCH_DTYPES[t.dtype])
        return self.raw.pop(t.name).view(dtype).reshape(t.shape)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.stream.synchronize()


def _address(view: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(view, np.uint8).ctypes.data)


# ------------------------------------------------------------------------------ loading


@dataclass
class LoadReport:
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    direct_bytes: int = 0  # read straight from node-cache files
    note: str | None = None  # why the load went elsewhere than asked

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class _Window:
    file: int
    offset: int
    length: int


class Loader:
    """One load: plan the windows, read them in parallel, copy them out in order."""

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", *,
                 framework: str | None = None, progress: ProgressFn | None = None,
                 direct: bool = True, prefetch: bool = True, readers: int = 4,
                 window: int = 16 * MiB) -> None:
        self.files = read_headers(model_files(path))
        self.report = LoadReport(files=len(self.files),
                                 tensors=sum(len(f.tensors) for f in self.files),
                                 bytes=sum(f.data_bytes for f in self.files))
        self.progress = progress
        self.readers = max(1, readers)
        self.window = window
        self.direct = direct
        self.prefetch = prefetch
        self.sink = self._sink(device, framework)
        self.report.device = self.sink.device

    def _sink(self, device: str, framework: str | None) -> NumpySink | TorchSink:
        index = gpu.device_index(device)
        if index is None:
            if device != "cpu":
                raise WeightsError(f"unknown device {device!r}: use cpu or cuda[:N]")
            return TorchSink("cpu") if framework == "torch" else NumpySink()
        reason = _cuda_unavailable(index)
        if reason is None:
            report = gpu.probe_nvml()
            if report.available:
                gpu.check_fits(report, index, self.report.bytes)
            return TorchSink(f"cuda:{index}")
        self.report.note = f"{device} unavailable ({reason}): loading to CPU memory"
        log.warning("%s", self.report.note)
        return TorchSink("cpu") if framework == "torch" and _has_torch() else NumpySink()

    def load(self) -> dict[str, Any]:
        started = time.monotonic()
        readers = [open_reader(f.path, f.size, self.direct, self.prefetch) for f in self.files]
        try:
            if self.prefetch:
                request_prefetch([f.path for f in self.files])
            for f in self.files:
                for t in f.tensors:
                    self.sink.allocate(t)
            self._stream(readers)
            if isinstance(self.sink, TorchSink):
                self.sink.synchronize()
            out = {t.name: self.sink.finish(t) for f in self.files for t in f.tensors}
        finally:
            self.report.direct_bytes = sum(r.direct_bytes for r in readers)
            for r in readers:
                r.close()
        self.report.seconds = time.monotonic() - started
        return out

    def _windows(self, readers: Sequence[Reader]) -> Iterator[_Window]:
        """Windows over each file's tensor bytes, aligned to the reader's preferred size
        (a node-cache chunk when reading cache files directly)."""
        for i, f in enumerate(self.files):
            if not f.tensors:
                continue
            step = readers[i].align(self.window)
            start = f.tensors[0].begin // step * step
            end = max(t.end for t in f.tensors)
            for off in range(start, end, step):
                yield _Window(i, off, min(step, end - off))

    def _stream(self, readers: Sequence[Reader]) -> None:
        """Read the windows, `self.readers` at once, those whose bytes are already here
        first, whatever their order. Why: behind a shaped link one chunk's stream can
        starve for seconds while the others come in; a loader taking windows in order
        waited on it, its readers idle with most of the model already cached, then copied
        1.5 GiB in a rush after the last byte (1 - 2 s of a 2 GiB load behind 1 Gbit/s).
        The next windows not here yet are waited for apart (`Reader.wait`, at most WAITERS
        at once, in order), so a wait holds no reader. Only the first LOOKAHEAD windows
        not read yet are looked at, each round: a model of 10,000 windows must not cost a
        stat of every one per finished read."""
        pending = dict.fromkeys(self._windows(readers))  # in file order; an ordered set
        if not pending:
            return
        size = max(w.length for w in pending)
        free = collections.deque(self._buffer(size)
                                 for _ in range(min(self.readers + 2, len(pending))))
        reading: dict[Future[int | None], tuple[_Window, memoryview]] = {}
        waiting: dict[Future[None], _Window] = {}
        waited: set[_Window] = set()  # here, or read through the mount if still not cached
        done = 0
        with ThreadPoolExecutor(self.readers, thread_name_prefix="cafs-weights") as pool, \
                ThreadPoolExecutor(WAITERS, thread_name_prefix="cafs-wait") as waiters:
            while pending or reading or waiting:
                for w in list(itertools.islice(pending, LOOKAHEAD)):
                    if not free and len(waiting) >= WAITERS:
                        break
                    if w in waited or readers[w.file].has(w.offset, w.length):
                        if free:
                            del pending[w]
                            buf = free.popleft()
                            reading[pool.submit(self._read, readers[w.file], w, buf)] = (w, buf)
                    elif len(waiting) < WAITERS and w not in waiting.values():
                        waiting[waiters.submit(readers[w.file].wait, w.offset, w.length)] = w
                running: list[Future[Any]] = [*reading, *waiting]
                finished, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                for fut in finished:
                    if fut in waiting:
                        waited.add(waiting.pop(fut))
                        continue
                    w, buf = reading.pop(fut)
                    done += self._finish(w, buf, fut.result())
                    free.append(buf)
                    if self.progress is not None:
                        self.progress(done, self.report.bytes)

    def _finish(self, w: _Window, buf: memoryview, copied: int | None) -> int:
        """A window read: its tensor bytes, once its buffer may be reused."""
        if copied is None:  # still in the buffer: the GPU's copies are queued from here
            copied = self._scatter(w, buf[: w.length])
            self.sink.done_with(buf)
        return copied

    def _buffer(self, size: int) -> memoryview:
        """Pinned for a GPU; else uninitialised memory (zeroing it would cost a pass)."""
        if isinstance(self.sink, TorchSink) and self.sink.cuda:
            return self.sink.buffer(size)
        import numpy as np

        return memoryview(np.empty(size, np.uint8).data).cast("B")

    def _read(self, reader: Reader, w: _Window, buf: memoryview) -> int | None:
        """Read a window. Into CPU memory its bytes go straight into the tensors they belong
        to, one scattered read per window, in parallel reader threads: no pass over the
        bytes to copy them out of `buf` (measured: that copy, and the first touch of the
        tensors' fresh pages it did, cost 0.75 - 0.95 CPU-s/GiB on a 2-core VM), and the
        first touch is not left to one thread. Returns the tensor bytes read, or None if
        `buf` holds them (a GPU's copies are queued from there)."""
        if isinstance(self.sink, TorchSink):
            self.sink.wait_reusable(buf)
        if not self.sink.threaded:
            reader.readinto([buf[: w.length]], w.offset)
            return None
        views, tensor_bytes = self._destinations(w, buf)
        reader.readinto(views, w.offset)
        return tensor_bytes

    def _destinations(self, w: _Window, buf: memoryview) -> tuple[list[memoryview], int]:
        """Where each byte of the window goes, in order: the tensors' memory, and `buf` for
        bytes of no tensor (the header, padding); with the tensor bytes among them."""
        views: list[memoryview] = []
        lo, hi = w.offset, w.offset + w.length
        at, tensor_bytes = lo, 0
        for t in _overlapping(self.files[w.file].tensors, lo, hi):
            a, b = max(t.begin, lo), min(t.end, hi)
            if a > at:
                views.append(buf[at - lo : a - lo])
            views.append(self.sink.view(t, a - t.begin, b - a))
            tensor_bytes += b - a
            at = b
        if at < hi:
            views.append(buf[at - lo : hi - lo])
        return views, tensor_bytes

    def _scatter(self, w: _Window, data: memoryview) -> int:
        """Copy the parts of tensors inside this window; returns tensor bytes copied."""
        copied = 0
        lo, hi = w.offset, w.offset + w.length
        for t in _overlapping(self.files[w.file].tensors, lo, hi):
            a, b = max(t.begin, lo), min(t.end, hi)
            self.sink.copy(t, a - t.begin, data[a - lo : b - lo])
            copied += b - a
        return copied


def _overlapping(tensors: list[TensorInfo], lo: int, hi: int) -> Iterator[TensorInfo]:
    """Tensors (sorted by offset, non-overlapping) with bytes in [lo, hi)."""
    import bisect

    k = max(0, bisect.bisect_right([t.begin for t in tensors], lo) - 1) if tensors else 0
    for t in tensors[k:]:
        if t.begin >= hi:
            break
        if t.end > lo:
            yield t


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_unavailable(index: int) -> str | None:
    """Why tensors cannot go to CUDA device `index`, or None if they can."""
    report = gpu.probe()
    try:
        import torch
    except ImportError:
        why = "torch is not installed (pip install 'cafs[torch]')"
        return why if report.available else f"{report.describe()}; {why}"
    if not torch.cuda.is_available():
        return f"torch sees no CUDA device; {report.describe()}"
    if index >= torch.cuda.device_count():
        return f"torch sees {torch.cuda.device_count()} CUDA devices"
    return None


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu", *,
                     framework: str | None = None, progress: ProgressFn | None = None,
                     direct: bool = True, prefetch: bool = True) -> dict[str, Any]:
    """Every tensor of a safetensors file, shard index JSON or model directory.

    `device` "cpu" gives numpy arrays (torch tensors with framework="torch"); "cuda[:N]"
    gives torch CUDA tensors, or CPU arrays with a logged warning where there is no CUDA.
    BF16 and FP8 tensors in numpy need `ml_dtypes`; without it they come as the raw bits
    (uint16 / uint8), since numpy has no such types.
    """
    return Loader(path, device, framework=framework, progress=progress, direct=direct,
                  prefetch=prefetch).load()


__all__ = ["FileReader", "LoadReport", "Loader", "SafetensorsFile", "TensorInfo",
           "WeightsError", "load_safetensors", "model_files", "read_header"]
