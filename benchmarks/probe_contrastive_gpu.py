"""GPU probe of the Triton contrastive kernels alone: the symmetric forward (one fused sweep, and
two one-direction sweeps) and the backward (two gradient sweeps, and one sweep with atomics) timed
apart and per candidate (each tile of a gradient sweep too), the first call's time (compiling,
tuning), the tile config and strategy each size picked, and the tensor-core rates (the split
forward's counting the FLOPs it executes; the rest nominal: 2 B^2 D forward, 4 B^2 D backward).

Usage: python benchmarks/probe_contrastive_gpu.py [B ...]   (bf16, D = 256 and 512)
"""
import json
import sys
import time

import torch

import wmkernels
from wmkernels.triton import contrastive as tc


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main(sizes):
    rows = []
    for b in sizes:
        for d in (256, 512):
            g = torch.Generator(device="cuda").manual_seed(0)
            z1 = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            z2 = torch.randn(b, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            scale = torch.tensor(14.0, device="cuda")
            # the first call of a size: compiles (cold Triton cache on a fresh machine) and times the
            # candidates (B >= 8192), what a user's first step pays once
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            wmkernels.contrastive_loss(z1, z2, logit_scale=scale, backend="triton").backward()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            acc, a, bb, ka, kb = tc._prepare(z1, z2, True)
            split = timed(lambda: (tc._lse(ka, kb, scale, acc), tc._lse(kb, ka, scale, acc)))
            fwd = timed(lambda: tc._sym_lse(ka, kb, scale, acc))  # fused or split, whichever was timed faster
            per_cand = {str(c): round(timed(lambda: tc._sym_lse(ka, kb, scale, acc, cand=c)) * 1e3, 3)
                        for c in tc.candidates("sym", tc.block_d(d), ka.dtype) + [tc._SPLIT]}
            lse, _, _ = tc._lse(ka, kb, scale, acc)
            gr = torch.full((b,), 1.0 / b, device="cuda")
            bwd = timed(lambda: tc._grads(ka, kb, scale, lse, gr, lse, gr, True, acc))  # two sweeps or one, as timed
            bwd_cand = {}
            for c in tc._grads_candidates(tc.block_d(d), ka.dtype):
                ms = timed(lambda: tc._grads(ka, kb, scale, lse, gr, lse, gr, True, acc, cand=c)) * 1e3
                bwd_cand[str(c)] = round(ms, 3)
            grad_cand = {}  # the tiles of one gradient sweep (the two-sweep backward runs two)
            for c in tc.candidates("grad", tc.block_d(d), ka.dtype):
                ms = timed(lambda: tc._grad(ka, kb, scale, lse, gr, lse, gr, True, True, acc, cand=c)) * 1e3
                grad_cand[str(c)] = round(ms, 3)
            total = timed(lambda: wmkernels.contrastive_loss(z1, z2, logit_scale=scale, backend="triton").backward())
            f = 2 * b * b * d
            rows.append({"B": b, "D": d, "first_call_s": first, "fwd_ms": fwd * 1e3, "fwd_split_ms": split * 1e3,
                         "bwd_ms": bwd * 1e3,
                         "fwd_bwd_ms": total * 1e3, "fwd_split_tflops_executed": 2 * f / split / 1e12,
                         "fwd_tflops_nominal": f / fwd / 1e12, "bwd_tflops_nominal": 2 * f / bwd / 1e12,
                         "nominal_tflops": 3 * f / total / 1e12, "fwd_ms_per_candidate": per_cand,
                         "bwd_ms_per_candidate": bwd_cand, "grad_sweep_ms_per_tile": grad_cand})
            print(json.dumps(rows[-1]), flush=True)
    # key: (kind, dtype, constexprs, size classes, ...): shown as kind, padded D, dtype, the rest
    print("configs picked:", {str((k[0], dict(k[2])["BLOCK_D"], str(k[1]), *k[3:])): v for k, v in tc._picked.items()})
    return rows


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [65536])
