"""Triton MSE kernels: a one-pass partial-sum forward and a recomputing backward.

Forward reads input and target once (plus the weight), writes one fp32/fp64 partial per program:
8 bytes/element for fp32. Backward recomputes `2 w (x - y) g / denom` from input and target:
reads 8, writes 4 (8 more when the target also wants its gradient) bytes/element for fp32.
Recomputing costs the same bytes as saving the gradient in the forward pass (which would need a
scaling pass by `grad_output`, unreadable on the host without a sync) and holds no extra memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import padded_layout
from ..reference import acc_dtype
from ..reference.mse import mse_denominator
from ._index import LAUNCH, offset, on_device, round_to, strided_offset

BLOCK = 1024
ITERS = 8


@triton.jit
def _mse_fwd_kernel(
    x_ptr, y_ptr, w_ptr, partial_ptr, n,
    s1, s2, s3, s4,
    xs0, xs1, xs2, xs3, xs4,
    ys0, ys1, ys2, ys3, ys4,
    ws0, ws1, ws2, ws3, ws4,
    HAS_W: tl.constexpr, CONTIG: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for it in range(ITERS):
        idx = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
        xo = offset(idx, CONTIG, s1, s2, s3, s4, xs0, xs1, xs2, xs3, xs4)
        yo = offset(idx, CONTIG, s1, s2, s3, s4, ys0, ys1, ys2, ys3, ys4)
        x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(ACC)
        y = tl.load(y_ptr + yo, mask=mask, other=0.0).to(ACC)
        d = x - y
        sq = d * d
        if HAS_W:
            wo = strided_offset(idx, s1, s2, s3, s4, ws0, ws1, ws2, ws3, ws4)
            sq = sq * tl.load(w_ptr + wo, mask=mask, other=0.0).to(ACC)
        acc += sq
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _mse_bwd_kernel(
    x_ptr, y_ptr, w_ptr, scale_ptr, gx_ptr, gy_ptr, n,
    s1, s2, s3, s4,
    xs0, xs1, xs2, xs3, xs4,
    ys0, ys1, ys2, ys3, ys4,
    ws0, ws1, ws2, ws3, ws4,
    gxs0, gxs1, gxs2, gxs3, gxs4,
    gys0, gys1, gys2, gys3, gys4,
    HAS_W: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GY: tl.constexpr, CONTIG: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    xo = offset(idx, CONTIG, s1, s2, s3, s4, xs0, xs1, xs2, xs3, xs4)
    yo = offset(idx, CONTIG, s1, s2, s3, s4, ys0, ys1, ys2, ys3, ys4)
    scale = tl.load(scale_ptr).to(ACC)
    x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + yo, mask=mask, other=0.0).to(ACC)
    if HAS_W:  # weight times scale first: 2 (x - y) alone can overflow where the gradient does not
        wo = strided_offset(idx, s1, s2, s3, s4, ws0, ws1, ws2, ws3, ws4)
        scale = scale * tl.load(w_ptr + wo, mask=mask, other=0.0).to(ACC)
    g = (x - y) * scale
    if WRITE_GX:
        gxo = offset(idx, CONTIG, s1, s2, s3, s4, gxs0, gxs1, gxs2, gxs3, gxs4)
        tl.store(gx_ptr + gxo, round_to(g, gx_ptr.dtype.element_ty), mask=mask)
    if WRITE_GY:
        gyo = offset(idx, CONTIG, s1, s2, s3, s4, gys0, gys1, gys2, gys3, gys4)
        tl.store(gy_ptr + gyo, round_to(-g, gy_ptr.dtype.element_ty), mask=mask)


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _layout(shape, reads, grads=()):
    """Layout of `reads` and `grads` (fresh buffers shaped like `shape`) over `shape`.

    When strides cannot be merged down to 5 dims, the read operands are copied contiguous and
    the gradient buffers reallocated contiguous: correct, at the cost of one copy. A broadcast
    weight can still split 6+ dims (stride 0 alternating with its own): then it is materialized.
    """
    try:
        return reads, grads, padded_layout(shape, [*reads, *grads])
    except ValueError:
        reads = [t.contiguous() for t in reads]
        grads = [torch.empty(shape, dtype=g.dtype, device=g.device) for g in grads]
    try:
        return reads, grads, padded_layout(shape, [*reads, *grads])
    except ValueError:
        reads = [t.expand(shape).contiguous() for t in reads]
        return reads, grads, padded_layout(shape, [*reads, *grads])


def _is_contig(sizes, strides) -> bool:
    return all(s[:-1] == [0] * 4 and s[-1] == 1 for s in strides) and sizes[:-1] == [1] * 4


def mse_forward(input, target, weight, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    acc = acc_dtype(input, target, weight)  # an fp64 weight too: the result is fp64 by promotion
    n = input.numel()
    w = weight if weight is not None else input
    (input, target, w), _, (sizes, strides) = _layout(input.shape, [input, target, w])
    contig = _is_contig(sizes, strides[:2])
    per_prog = BLOCK * ITERS
    grid = (max(triton.cdiv(n, per_prog), 1),)
    partial = torch.empty(grid[0], dtype=acc, device=input.device)  # every program writes its slot
    with on_device(input):
        _mse_fwd_kernel[grid](
            input, target, w, partial, n, *sizes[1:], *strides[0], *strides[1], *strides[2],
            HAS_W=weight is not None, CONTIG=contig, ACC=_tl_acc(acc), BLOCK=BLOCK, ITERS=ITERS, **LAUNCH,
        )
    total = partial.sum()
    if reduction == "mean":
        total = total / mse_denominator(input, weight, acc)
    return total.to(out_dtype)


def mse_backward(grad_out, input, target, weight, reduction: str, need_input: bool, need_target: bool):
    acc = acc_dtype(input, target, weight)
    n = input.numel()
    denom = mse_denominator(input, weight, acc) if reduction == "mean" else 1.0
    # one tiny op on the host path when the count is a number (each costs a launch on a GPU)
    scale = grad_out.to(acc) * (2.0 / denom) if isinstance(denom, float) else 2.0 * grad_out.to(acc) / denom
    w = weight if weight is not None else input
    (input, target, w), (gx, gy), (sizes, strides) = _layout(
        input.shape,
        [input, target, w],
        # a gradient not wanted is never written: its operand slot holds a placeholder
        [torch.empty_like(input) if need_input else input, torch.empty_like(target) if need_target else target],
    )
    contig = _is_contig(sizes, [strides[k] for k in (0, 1, 3, 4)])
    grid = (max(triton.cdiv(n, BLOCK), 1),)
    if n:
        with on_device(input):
            _mse_bwd_kernel[grid](
                input, target, w, scale, gx, gy, n, *sizes[1:],
                *strides[0], *strides[1], *strides[2], *strides[3], *strides[4],
                HAS_W=weight is not None, WRITE_GX=need_input, WRITE_GY=need_target, CONTIG=contig,
                ACC=_tl_acc(acc), BLOCK=BLOCK, **LAUNCH,
            )
    return (gx if need_input else None), (gy if need_target else None)


_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
_STRIDE_ARGS = [f"{p}s{d}" for p in ("x", "y", "w") for d in range(5)]


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs[, options, checks]) for every dtype pairing and flag set this
    module launches."""
    pairs = [(d, d) for d in _TL_NAMES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    specs = []
    for xd, yd in pairs:
        acc = torch.float64 if torch.float64 in (xd, yd) else torch.float32
        tx, ty, ta = _TL_NAMES[xd], _TL_NAMES[yd], _TL_NAMES[acc]
        sizes = {f"s{d}": "i64" for d in range(1, 5)}
        for has_w in (False, True):
            for contig in (False, True):
                flags = {"HAS_W": has_w, "CONTIG": contig, "ACC": _tl_acc(acc)}
                fwd_sig = {"x_ptr": f"*{tx}", "y_ptr": f"*{ty}", "w_ptr": f"*{ta}", "partial_ptr": f"*{ta}", "n": "i64",
                           **sizes, **{a: "i64" for a in _STRIDE_ARGS}}
                fwd_cx = {**flags, "BLOCK": BLOCK, "ITERS": ITERS}
                # fp64, weighted, strided: three 5-d offsets of fp64 rows; triton 3.6 spills 24 bytes
                # there without fused multiply-adds (_index.LAUNCH), a bandwidth-bound fallback path
                spill = 32 if acc == torch.float64 and has_w and not contig else 0
                specs.append((_mse_fwd_kernel, {**fwd_sig, **{k: "constexpr" for k in fwd_cx}}, fwd_cx, {},
                              {"max_spill_bytes": spill}))
                bwd_sig = {"x_ptr": f"*{tx}", "y_ptr": f"*{ty}", "w_ptr": f"*{ta}", "scale_ptr": f"*{ta}",
                           "gx_ptr": f"*{tx}", "gy_ptr": f"*{ty}", "n": "i64", **sizes,
                           **{a: "i64" for a in _STRIDE_ARGS},
                           **{f"{p}s{d}": "i64" for p in ("gx", "gy") for d in range(5)}}
                bwd_cx = {**flags, "WRITE_GX": True, "WRITE_GY": xd == yd, "BLOCK": BLOCK}
                specs.append((_mse_bwd_kernel, {**bwd_sig, **{k: "constexpr" for k in bwd_cx}}, bwd_cx))
    return specs
