"""What this machine has: cores, memory, GPUs, disk, and its measured speed.

The planner sizes layer spans by free memory and weights them by measured throughput, so the
rates are measured (once, then cached in the home) rather than guessed from a model number: a matmul
rate (what prefill and big batches run at) and the rate at which a one-row matmul streams weights
from memory (what a decode token runs at: it reads every weight once and does two FLOPs per weight).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from dllmd.storage import atomic_write

CACHE_FILE = "hardware.json"
MATMUL_SIZE = 1024
# The stream probe's weights: larger than a desktop CPU's last-level cache, so the one-row matmuls read
# them from memory as a decode pass reads a model's layers; in matrices of 16 MiB, a layer's order.
STREAM_PROBE_BYTES = 256 << 20
STREAM_MATRIX = 2048

# The GPUs node.toml's [limits] lets this process use, as the owner numbers them (None: all of them).
_allowed_gpus: list[int] | None = None


class GpuLimitError(RuntimeError):
    """[limits] gpus cannot be applied; the message says why."""


def restrict_gpus(indices: list[int] | None) -> None:
    """Let this process compute only on GPUs ``indices`` ([]: CPU only; None: every GPU).

    CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when it starts, and merely importing some libraries
    (torchao) starts it: so this runs first thing in ``dllmd start``, and :func:`check_gpu_limit`
    confirms it took. Every later use (spans, training, NCCL) then sees just these GPUs, as
    ``cuda:0``, ``cuda:1``... An index counts among the GPUs the process would see without the limit
    (those of a ``CUDA_VISIBLE_DEVICES`` already set, else all)."""
    global _allowed_gpus
    if indices is None or _allowed_gpus == indices:
        return
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = [d.strip() for d in inherited.split(",") if d.strip()] if inherited is not None else None
    if seen is not None and any(i >= len(seen) for i in indices):
        raise GpuLimitError(f"limits.gpus = {indices}, but CUDA_VISIBLE_DEVICES={inherited!r} shows only "
                            f"{len(seen)} GPU(s)")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(seen[i] if seen is not None else str(i) for i in indices)
    _allowed_gpus = list(indices)


def check_gpu_limit(indices: list[int] | None) -> None:
    """GpuLimitError unless this process sees exactly the GPUs [limits] allows."""
    if indices is None:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible > len(indices):
        raise GpuLimitError(f"limits.gpus = {indices}, but CUDA started before the limit applied and "
                            f"{visible} GPUs are in use")
    if visible < len(indices):
        raise GpuLimitError(f"limits.gpus = {indices}, but only {visible} of those GPUs exist on this machine")


def best_device() -> torch.device:
    """The device a node computes on: CUDA if present, then Apple MPS, else CPU (only the CPU when
    [limits] gpus is empty)."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if _allowed_gpus == []:
        return torch.device("cpu")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def return_freed_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    Loading a span allocates and frees large temporaries (an int4 matrix unpacks to 4 bytes per
    weight before it is repacked); glibc keeps such freed heap memory in the process, so the node's
    resident memory would show the peak of the load rather than what it holds."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        pass


def gpus() -> list[dict]:
    """The GPUs this process may use, each with the index its owner knows it by."""
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            index = _allowed_gpus[i] if _allowed_gpus else i
            out.append({"index": index, "name": torch.cuda.get_device_name(i), "memory_total": total,
                        "memory_free": free})
    return out


def gpu_utilization(i: int) -> float | None:
    """GPU ``i``'s recent compute use in percent, or None where the driver's counters cannot be read
    (torch asks NVML, which the ``nvidia-ml-py`` package provides)."""
    try:
        return float(torch.cuda.utilization(i))
    except Exception:  # no NVML, a driver without the counter, a non-NVIDIA device: unknown, not an error
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_gflops(device: torch.device, seconds: float = 0.2) -> float:
    """fp32 GEMM rate of ``device`` in GFLOP/s (a warm-up, then as many products as fit in ``seconds``)."""
    n = MATMUL_SIZE
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)
    _sync(device)
    count, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        count += 1
        if count % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return round(2 * n**3 * count / elapsed / 1e9, 1)


def measure_stream_gbps(device: torch.device, seconds: float = 0.15) -> float:
    """GB/s of fp32 weights that one-row matmuls (a decode step's shape) read on ``device``: the rate
    that bounds a decode token, which reads every weight once (a warm-up pass, then as many as fit)."""
    n = STREAM_MATRIX
    count = max(1, STREAM_PROBE_BYTES // (n * n * 4))
    weights = [torch.ones(n, n, device=device) for _ in range(count)]  # ones: allocated at memset speed
    row = torch.ones(1, n, device=device)
    for w in weights:
        torch.nn.functional.linear(row, w)
    _sync(device)
    passes, start = 0, time.perf_counter()
    while True:
        for w in weights:
            torch.nn.functional.linear(row, w)
        passes += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()  # else the probe's 256 MiB stay cached and the GPU reports that much less free
    return round(passes * count * n * n * 4 / elapsed / 1e9, 2)


@dataclass(frozen=True)
class Speed:
    """This machine's measured rates (see the module docstring)."""

    matmul_gflops: float
    stream_gbps: float


def cached_speed(home: Path) -> Speed:
    """The rates for this machine on this process's torch threads, measured on first use and cached in
    the home. The cache is keyed by what changes them (device, torch version, core count, the threads
    torch computes on: node.toml's [limits] cap, or a local cluster's share of the cores); a cache from
    before the stream rate was measured is measured again."""
    device = best_device()
    key = f"{device.type}:{torch.cuda.get_device_name(0) if device.type == 'cuda' else platform.processor()}:" \
          f"{torch.__version__}:{os.cpu_count()}:threads={torch.get_num_threads()}"
    path = home / CACHE_FILE
    try:
        cached = json.loads(path.read_text())
        rates = [cached.get("matmul_gflops"), cached.get("stream_gbps")]
        if cached.get("key") == key and all(isinstance(r, (int, float)) and r > 0 for r in rates):
            return Speed(float(rates[0]), float(rates[1]))
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    speed = Speed(measure_matmul_gflops(device), measure_stream_gbps(device))
    atomic_write(path, json.dumps({"key": key, **asdict(speed)}).encode())
    return speed


def snapshot(home: Path, speed: Speed) -> dict:
    """A fresh description of the machine for ``info`` (memory and disk are read each time)."""
    mem = psutil.virtual_memory()
    return {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_cores": os.cpu_count() or 1,
        "ram_total": mem.total,
        "ram_available": mem.available,
        "gpus": gpus(),
        "device": best_device().type,
        "disk_free": shutil.disk_usage(home).free,
        "matmul_gflops": speed.matmul_gflops,
        "stream_gbps": speed.stream_gbps,
        "torch": torch.__version__,
    }
