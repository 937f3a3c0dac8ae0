"""Shared by the Triton kernels: 64-bit offsets of a flat index in a 5-d layout, PyTorch's rounding
to a stored dtype, the device a launch runs on and the options every launch passes."""
import contextlib

import torch
import triton
import triton.language as tl

# Every launch: no fused multiply-adds. A value is then rounded once wherever it is formed, so the
# contrastive backward's recomputed logit equals the forward's (fused, s * x.y - lse stayed
# unrounded: gradients 0.6% off at logit scale 1e6 in fp32, NaN at 1e10, on an H100), results do
# not move with Triton's default (fusion on until 3.9, which warns, off from 3.10) and round like
# the C++ CPU kernels. The kernels are bandwidth- or tensor-core-bound: the unfused multiply costs
# ~4% at most (contrastive B = 65536, D = 256).
LAUNCH = {"enable_fp_fusion": False}


def on_device(t: torch.Tensor):
    """`t`'s GPU made current around a launch: Triton launches on the current device and its
    current stream, whatever device the tensors are on (tensors on cuda:1 with cuda:0 current
    would be read from the wrong GPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def strided_offset(idx, s1, s2, s3, s4, t0, t1, t2, t3, t4):
    """Offset of flat (row-major) index `idx` in a tensor of sizes (., s1, s2, s3, s4) with strides t*."""
    i4 = idx % s4
    r = idx // s4
    i3 = r % s3
    r = r // s3
    i2 = r % s2
    r = r // s2
    i1 = r % s1
    i0 = r // s1
    return i0 * t0 + i1 * t1 + i2 * t2 + i3 * t3 + i4 * t4


@triton.jit
def offset(idx, CONTIG: tl.constexpr, s1, s2, s3, s4, t0, t1, t2, t3, t4):
    """`idx` itself for a dense row-major operand (no index arithmetic), else `strided_offset`."""
    if CONTIG:
        off = idx
    else:
        off = strided_offset(idx, s1, s2, s3, s4, t0, t1, t2, t3, t4)
    return off


@triton.jit
def round_to(x, OUT: tl.constexpr):
    """x in dtype OUT, rounded to nearest even like PyTorch. bf16 is rounded by hand from the fp32
    bits: the interpreter's own fp32 -> bf16 conversion truncates."""
    if OUT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(OUT)
