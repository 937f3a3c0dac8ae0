"""Triton contrastive-loss kernels: logits tiles with tl.dot, online logsumexp, recomputing backward.

Forward (`_lse_kernel`): one program per block of rows keeps its rows (padded D) on chip and
streams the column rows, reading the (M + M/BLOCK_M * N) * D prepared elements and writing three
values per row; launched once per direction. Backward (`_grad_kernel`): the same sweep forms
G = g_row P + g_col Q per tile and accumulates G @ y for its rows; launched for d a (rows a) and
d b (rows b). Nothing B x B is stored: extra memory is the prepared rows and O(B) statistics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import contrastive as ref

# The padded feature widths compiled ahead of time (spill-free on sm_90); wider D runs, JIT-compiled.
BLOCK_DS = {torch.float32: (64, 128, 256, 512), torch.float64: (64, 128, 256)}


@triton.jit
def _lse_kernel(
    x_ptr, y_ptr, scale_ptr, lse_ptr, max_ptr, arg_ptr, M, N, D,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row i of x: logsumexp_j, max_j and first argmax_j of scale * x_i . y_j."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < M
    dmask = dd < D
    x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    s = tl.load(scale_ptr).to(ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    arg = tl.zeros([BLOCK_M], tl.int64)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        y = tl.load(y_ptr + cols[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        logits = tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=ACC) * s
        logits = tl.where(cmask[None, :], logits, float("-inf"))
        tmax = tl.max(logits, axis=1)
        targ = tl.argmax(logits, axis=1).to(tl.int64) + j0
        arg = tl.where(tmax > m, targ, arg)  # strict: ties keep the earlier column
        new_m = tl.maximum(m, tmax)
        l = l * tl.exp(m - new_m) + tl.sum(tl.exp(logits - new_m[:, None]), axis=1)
        m = new_m
    tl.store(lse_ptr + rows, m + tl.log(l), mask=rmask)
    tl.store(max_ptr + rows, m, mask=rmask)
    tl.store(arg_ptr + rows, arg, mask=rmask)


@triton.jit
def _grad_kernel(
    x_ptr, y_ptr, scale_ptr, lse_x_ptr, g_x_ptr, lse_y_ptr, g_y_ptr, out_ptr, M, N, D,
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = sum_j G_ij y_j with G_ij = g_x[i] exp(L_ij - lse_x[i]) (ROW_TERM)
    + g_y[j] exp(L_ij - lse_y[j]) (COL_TERM), L = scale * x @ y.T recomputed per tile."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < M
    dmask = dd < D
    x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    s = tl.load(scale_ptr).to(ACC)
    if ROW_TERM:
        lse_x = tl.load(lse_x_ptr + rows, mask=rmask, other=0.0)
        g_x = tl.load(g_x_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        y = tl.load(y_ptr + cols[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        logits = tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=ACC) * s
        g = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if ROW_TERM:
            g += g_x[:, None] * tl.exp(logits - lse_x[:, None])
        if COL_TERM:
            lse_y = tl.load(lse_y_ptr + cols, mask=cmask, other=0.0)
            g_y = tl.load(g_y_ptr + cols, mask=cmask, other=0.0)
            g += g_y[None, :] * tl.exp(logits - lse_y[None, :])
        g = tl.where(cmask[None, :], g, 0.0)
        acc += tl.dot(g, y, input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + rows[:, None] * D + dd[None, :], acc, mask=rmask[:, None] & dmask[None, :])


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): D padded (masked) to a power of two >= 64 (tl.dot needs >= 16;
    64 keeps the number of compiled variants small); tiles sized so the rows, the logits tile and
    the accumulator stay in registers (no spills on sm_90)."""
    block_d = max(64, triton.next_power_of_2(d))
    tile = 32 if block_d <= 128 else 16
    return tile, tile, block_d


def _lse(x, y, scale):
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    bm, bn, bd = _blocks(d)
    lse, mx = torch.empty(m, dtype=x.dtype, device=x.device), torch.empty(m, dtype=x.dtype, device=x.device)
    arg = torch.empty(m, dtype=torch.int64, device=x.device)
    _lse_kernel[(triton.cdiv(m, bm),)](
        x, y, scale, lse, mx, arg, m, n, d, ACC=_tl_acc(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd
    )
    return lse, mx, arg


def _grad(x, y, scale, lse_x, g_x, lse_y, g_y, row_term: bool, col_term: bool):
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    bm, bn, bd = _blocks(d)
    out = torch.empty_like(x)
    _grad_kernel[(triton.cdiv(m, bm),)](
        x, y, scale, lse_x, g_x, lse_y, g_y, out, m, n, d,
        ROW_TERM=row_term, COL_TERM=col_term, ACC=_tl_acc(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )
    return out


def contrastive_forward(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric):
    acc = ref.acc_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    scale = scale.to(acc).contiguous()
    core = _lse(a, b, scale) + (_lse(b, a, scale) if symmetric else (None, None, None))
    return ref.finish_forward(a, b, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, symmetric, core)


def contrastive_backward(
    g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_row, lse_col, pos_weight, smooth_row, smooth_col,
    normalize, symmetric,
):
    acc = ref.acc_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    g_row, g_col = g_row.to(acc).contiguous(), g_col.to(acc).contiguous()
    lse_col = lse_col if symmetric else lse_row  # placeholders: never read without COL_TERM / ROW_TERM
    g_c = g_col if symmetric else g_row
    ga = _grad(a, b, scale, lse_row, g_row, lse_col, g_c, True, symmetric)
    gb = _grad(b, a, scale, lse_col, g_c, lse_row, g_row, symmetric, True)
    return ref.finish_backward(
        z1, z2, a, b, scale, labels_row, labels_col, g_row, g_col, pos_weight, smooth_row, smooth_col,
        normalize, symmetric, ga, gb,
    )


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for each accumulation dtype, padded width and term set launched."""
    specs = []
    for acc, name in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        for block_d in BLOCK_DS[acc]:
            bm, bn, bd = _blocks(block_d)
            blocks = {"ACC": _tl_acc(acc), "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
            dims = {"M": "i64", "N": "i64", "D": "i64"}
            sig = {"x_ptr": f"*{name}", "y_ptr": f"*{name}", "scale_ptr": f"*{name}", "lse_ptr": f"*{name}",
                   "max_ptr": f"*{name}", "arg_ptr": "*i64", **dims}
            specs.append((_lse_kernel, {**sig, **{k: "constexpr" for k in blocks}}, blocks))
            for row_term, col_term in ((True, False), (True, True), (False, True)):
                cx = {"ROW_TERM": row_term, "COL_TERM": col_term, **blocks}
                sig = {p: f"*{name}" for p in ("x_ptr", "y_ptr", "scale_ptr", "lse_x_ptr", "g_x_ptr", "lse_y_ptr",
                                               "g_y_ptr", "out_ptr")}
                specs.append((_grad_kernel, {**sig, **dims, **{k: "constexpr" for k in cx}}, cx))
    return specs
