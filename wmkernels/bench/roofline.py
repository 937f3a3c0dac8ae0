"""This device's roofline, measured in the benchmark's own run: copy bandwidth (bytes read +
written per second by a large tensor copy) and matmul throughput (fp32, bf16)."""
from __future__ import annotations

import time

import torch

from .harness import sync


def _best_time(fn, device: str, repeats: int) -> float:
    """Shortest of `repeats` timed calls after one warm-up: a peak is what the device can do."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(device: str, nbytes: int, repeats: int = 7) -> float:
    """GB/s of `dst.copy_(src)` on `nbytes`-byte float32 tensors, counting read + write."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / _best_time(lambda: dst.copy_(src), device, repeats) / 1e9


def matmul_tflops(device: str, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul into a preallocated output (2 n^3 flops)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: torch.mm(a, b, out=c), device, repeats) / 1e12


def measure(device: str, quick: bool) -> dict:
    """Copy GB/s and matmul TFLOP/s per dtype on `device`, with the sizes used."""
    if device.startswith("cuda"):
        nbytes, n = (256 << 20, 4096) if quick else (1 << 30, 8192)
    else:
        nbytes, n = (64 << 20, 512) if quick else (256 << 20, 1024)
    out = {"copy_gbps": copy_bandwidth(device, nbytes), "copy_bytes": nbytes, "matmul_n": n, "matmul_tflops": {}}
    for dtype in (torch.float32, torch.bfloat16):
        out["matmul_tflops"][str(dtype).removeprefix("torch.")] = matmul_tflops(device, dtype, n)
    if device.startswith("cuda"):
        out["matmul_tf32_allowed"] = torch.backends.cuda.matmul.allow_tf32
    return out
