"""What the node's NVIDIA GPUs are, through NVML, for the weight prefetcher and loader.

NVML (`nvidia-ml-py`, imported as `pynvml`) answers without CUDA or torch: GPU count, free
memory and PCIe link. The prefetcher starts on its own only where NVML finds a GPU, sizes
its parallelism from the links it has to fill, and the loader refuses a load that cannot
fit in the device's free memory before it moves a byte. A node without a driver (no
libnvidia-ml.so) or without GPUs is a normal case, not an error: `probe()` then returns no
GPUs and a `reason` a person can act on.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any

# GB/s per lane and direction, after encoding overhead, by PCIe generation.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
S3_CONNECTION_BPS = 90e6  # what one S3 GET stream sustains (AWS guidance: 85-93 MB/s)
MIN_PARALLEL, MAX_PARALLEL = 16, 64


class GpuError(RuntimeError):
    """A GPU load cannot happen as asked (no device, or not enough free memory)."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total: int
    memory_free: int
    pcie_gen: int  # current link generation (0 if NVML does not say)
    pcie_width: int  # current link width in lanes

    @property
    def pcie_bandwidth(self) -> float:
        """Bytes per second host to device the link can carry, 0 if unknown."""
        return PCIE_LANE_GBPS.get(self.pcie_gen, 0.0) * self.pcie_width * 1e9


@dataclass(frozen=True)
class GpuReport:
    gpus: list[Gpu] = field(default_factory=list)
    driver: str | None = None
    reason: str | None = None  # why there are no GPUs, when there are none

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def describe(self) -> str:
        if not self.gpus:
            return f"no NVIDIA GPU: {self.reason}"
        return "; ".join(
            f"GPU {g.index} {g.name}: {g.memory_free / 2**30:.1f} of "
            f"{g.memory_total / 2**30:.1f} GiB free, PCIe gen{g.pcie_gen} x{g.pcie_width}"
            for g in self.gpus)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _link(nvml: Any, handle: Any) -> tuple[int, int]:
    try:
        return (int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
                int(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)))
    except Exception:  # some boards (SXM, virtual GPUs) do not report a link
        return 0, 0


def _read(nvml: Any) -> GpuReport:
    count = int(nvml.nvmlDeviceGetCount())
    gpus = []
    for i in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        gen, width = _link(nvml, handle)
        gpus.append(Gpu(i, _text(nvml.nvmlDeviceGetName(handle)), int(mem.total),
                        int(mem.free), gen, width))
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    return GpuReport(gpus, driver, None if gpus else "NVML found no GPU on this node")


def probe_nvml() -> GpuReport:
    """Ask NVML now (free memory changes: loaders call this, not the cached `probe`)."""
    try:
        import pynvml as nvml
    except ImportError:
        return GpuReport(reason="nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return GpuReport(reason=f"NVML unavailable ({exc}): no NVIDIA driver on this node")
    try:
        return _read(nvml)
    except Exception as exc:
        return GpuReport(reason=f"NVML query failed: {exc}")
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


@functools.lru_cache(maxsize=1)
def probe() -> GpuReport:
    """The node's GPUs, asked once per process (mounts decide on this at start)."""
    return probe_nvml()


def prefetch_parallel(report: GpuReport, default: int = 32) -> int:
    """Store calls in flight for weights: enough S3 streams to fill the GPUs' links.

    On any real GPU node that is the maximum; PCIe is rarely the bottleneck, the network
    is, but more streams than links can absorb only cost memory.
    """
    link = sum(g.pcie_bandwidth for g in report.gpus)
    if not link:
        return default
    return max(MIN_PARALLEL, min(MAX_PARALLEL, math.ceil(link / S3_CONNECTION_BPS)))


def device_index(device: str) -> int | None:
    """0 for "cuda" or "cuda:0", N for "cuda:N"; None for a device that is no GPU."""
    kind, _, num = device.partition(":")
    if kind != "cuda":
        return None
    return int(num) if num else 0


def check_fits(report: GpuReport, index: int, nbytes: int, headroom: float = 0.05) -> Gpu:
    """The GPU if `nbytes` fit in its free memory with some headroom, else GpuError."""
    gpu = next((g for g in report.gpus if g.index == index), None)
    if gpu is None:
        raise GpuError(f"no GPU {index}: {report.describe()}")
    if nbytes > gpu.memory_free * (1 - headroom):
        raise GpuError(f"{nbytes / 2**30:.2f} GiB of weights do not fit on GPU {index} "
                       f"({gpu.name}): {gpu.memory_free / 2**30:.2f} GiB free")
    return gpu
