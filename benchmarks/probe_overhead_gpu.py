"""Where the time of a small, bandwidth-bound loss goes on a GPU: MSE forward+backward timed end to
end (synchronized), its host time alone (calls enqueued back to back, one sync at the end, minus
the GPU's share), and a torch.profiler table per contender (every CUDA kernel launched, its GPU
time, and the CPU time of each op). On the H100 runs of Nov 26-27 wmkernels' 16M-element MSE took
0.88 ms (Triton) where eager PyTorch took 0.26 and the bytes need 0.07: this says which part.

Usage: python benchmarks/probe_overhead_gpu.py [N ...]   (fp32 elements; default 16777216 65536)
Runs on CPU too (no CUDA kernels then; the Triton contender needs a GPU or TRITON_INTERPRET=1).
"""
import json
import sys
import time

import torch
import torch.nn.functional as F

import wmkernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def contenders():
    out = {"eager": lambda x, y: F.mse_loss(x, y).backward()}
    for b in ("triton", "cuda", "torch") if DEV == "cuda" else ("cpu", "torch"):
        st = wmkernels.available_backends()[b]
        if b == "torch" or (st.available and DEV in st.devices):
            out[f"wmkernels-{b}"] = lambda x, y, b=b: wmkernels.mse_loss(x, y, backend=b).backward()
    return out


def timed(fn, x, y, reps: int, sync_each: bool) -> float:
    """Median per-call seconds over 5 rounds of `reps` calls (synchronized per call or per round)."""
    rounds = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn(x, y)
            if sync_each:
                sync()
        sync()
        rounds.append((time.perf_counter() - t) / reps)
    return sorted(rounds)[2]


def profile(fn, x, y, reps: int = 20) -> list[dict]:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn(x, y)
        sync()
    rows = []
    for e in prof.key_averages():
        gpu_us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / reps
        rows.append({"op": e.key, "calls": e.count / reps, "cpu_self_us": e.self_cpu_time_total / reps,
                     "gpu_us": gpu_us})
    return sorted(rows, key=lambda r: -(r["cpu_self_us"] + r["gpu_us"]))


def main(sizes):
    for n in sizes:
        x = torch.randn(n, device=DEV, requires_grad=True)
        y = torch.randn(n, device=DEV)
        for name, fn in contenders().items():
            for _ in range(3):
                fn(x, y)  # compile, warm the allocator
            end_to_end = timed(fn, x, y, 50, sync_each=True)
            # back to back: the GPU overlaps with the host, so this is max(host, GPU) per call
            queued = timed(fn, x, y, 50, sync_each=False)
            prof = profile(fn, x, y)
            kernels = [r for r in prof if r["gpu_us"] > 0 and r["cpu_self_us"] == 0]
            print(json.dumps({"N": n, "contender": name, "end_to_end_us": end_to_end * 1e6,
                              "back_to_back_us": queued * 1e6,
                              "gpu_kernels_us": sum(r["gpu_us"] for r in kernels),
                              "kernels_per_call": sum(r["calls"] for r in kernels),
                              "top_ops": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}
                                          for r in prof[:12]]}), flush=True)
            x.grad = None


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16777216, 65536])
