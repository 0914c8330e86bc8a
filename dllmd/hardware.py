"""What this machine has: cores, memory, GPUs, disk, and a measured matmul rate.

The planner sizes layer spans by free memory and weights them by measured throughput, so the
rate is measured (once, then cached in the home) rather than guessed from a model number.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import psutil
import torch

from dllmd.storage import atomic_write

CACHE_FILE = "hardware.json"
MATMUL_SIZE = 1024


def best_device() -> torch.device:
    """The device a node computes on: CUDA if present, then Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
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
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"index": i, "name": torch.cuda.get_device_name(i), "memory_total": total, "memory_free": free})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_gflops(device: torch.device, seconds: float = 0.3) -> float:
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


def cached_gflops(home: Path) -> float:
    """The matmul rate for this machine, measured on first use and cached in the home. The cache
    is keyed by what changes the figure (device, torch version, core count)."""
    device = best_device()
    key = f"{device.type}:{torch.cuda.get_device_name(0) if device.type == 'cuda' else platform.processor()}:" \
          f"{torch.__version__}:{os.cpu_count()}"
    path = home / CACHE_FILE
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and isinstance(cached.get("matmul_gflops"), (int, float)):
            return float(cached["matmul_gflops"])
    except (FileNotFoundError, ValueError):
        pass
    gflops = measure_matmul_gflops(device)
    atomic_write(path, json.dumps({"key": key, "matmul_gflops": gflops}).encode())
    return gflops


def snapshot(home: Path, gflops: float) -> dict:
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
        "matmul_gflops": gflops,
        "torch": torch.__version__,
    }
