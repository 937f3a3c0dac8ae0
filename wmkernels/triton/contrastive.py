"""Triton contrastive-loss kernels: logits tiles on the tensor cores, online logsumexp, recomputing backward.

Operands: bf16 / fp16 inputs are normalized in fp32 and rounded once to their own dtype (what the
eager formula's F.normalize gives); every product then runs on the tensor cores with fp32
accumulation, and the label / smoothing terms use the same rounded rows, so the result is the fp32
loss of those rows. fp32 and fp64 inputs run exact IEEE products on small tiles (not on the tensor
cores: TF32 would lose fp32 accuracy, and three-pass TF32 spilled registers at every tile tried).

Forward, one direction (`_lse_kernel`): one program per block of rows keeps its rows on chip and
streams the column rows, writing logsumexp, max and first argmax per row. Symmetric
(`_sym_lse_kernel` + `_col_reduce_kernel`): one sweep forms each logit once for both directions; a
persistent grid of P programs (one per SM) keeps each program's running column statistics in its
own row of P x N partials (12 bytes per entry in fp32), merged afterwards; one exp per logit serves
both directions (see `_FAR`). Backward (`_grad_kernel`): the same sweep forms G = g_row P + g_col Q
per tile (one exp per logit) and accumulates G @ y for its rows; launched for d a (rows a) and d b
(rows b). Where timed faster (and nondeterminism is allowed), one sweep serves both
(`_fused_grad_kernel`: each program keeps d b for its column block, d a is added by atomics). Few
rows against many columns (a rank's rows against the gathered batch, or a small batch) would leave
SMs idle, so the columns are then split across programs too (`_col_splits`),
whose partial row statistics / gradients are merged afterwards. Nothing B x B is stored: extra
memory is the prepared rows, O(B) statistics and the P x N partials (the split backward: one
M x D fp32 partial per split). Full column tiles run without masks; the last, partial one is
masked.

Tile shapes: at large B on a GPU each kernel times a few candidate configs once per (kernel, padded
D, dtype, size class) and keeps the fastest (`_pick`; like triton.autotune, that first call waits for
the GPU: warm up before capturing CUDA graphs, or set WMKERNELS_TUNE=0 for the default configs);
small problems and the interpreter use the first candidate. The symmetric forward also times two
one-direction sweeps (`_SPLIT`) against the fused one. Tile shapes, the SM count and that choice
change the order of the logsumexp updates, so results agree across them to rounding, not bit for
bit (on one GPU and config, runs repeat exactly, except where the one-sweep backward's atomics were
picked: torch.use_deterministic_algorithms(True) rules it out).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import contrastive as ref
from ._index import LAUNCH, on_device

_TUNE_MIN_ROWS = 8192  # below this many rows (squared: logits) the first candidate config is used, untimed
_REDUCE_BLOCK = 256  # columns per program of the partials' reduction
# One exp per logit serves both directions (row softmax numerators rescaled per column) unless a
# column's max (forward) or logsumexp (backward) sits more than this below the block's largest row
# max / logsumexp: then the rescaled numerators could have underflowed where the column still needs
# them, and the tile takes a second exp. Below it, every term within exp(-17) (fp32 rounding) of a
# column's max stays >= exp(-57), a normal float. Typical scales (up to ~20) never reach it.
_FAR: tl.constexpr = tl.constexpr(40.0)
_picked: dict[tuple, tuple] = {}
_DIVISIBLE = ("M", "N", "D", "split_cols")  # sizes divisible by 16 in the ahead-of-time compiles (aot_specs)


@triton.jit
def _mma(p, q, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """p @ q accumulated in ACC. UPCAST (the interpreter with bf16, whose tl.dot multiplies the raw
    bits) widens the operands first; compiled kernels never set it."""
    if UPCAST:
        out = tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        out = tl.dot(p, q, input_precision=PREC, out_dtype=ACC)
    return out


@triton.jit
def _load_rows_of(y_ptr, cols, feats, N, D, MASK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """y[cols][:, feats] (row-major, D per row), zeros for rows >= N (MASK_N) and features >= D."""
    ptrs = y_ptr + cols[:, None] * D + feats[None, :]
    if MASK_N:
        if EVEN_D:
            out = tl.load(ptrs, mask=(cols < N)[:, None], other=0.0)
        else:
            out = tl.load(ptrs, mask=(cols < N)[:, None] & (feats < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            out = tl.load(ptrs)
        else:
            out = tl.load(ptrs, mask=(feats < D)[None, :], other=0.0)
    return out


@triton.jit
def _tile_logits(x, y_ptr, cols, dd, N, D, s, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(y rows `cols`, scale * x @ y.T) for one column tile; -inf in columns >= N when MASK_N."""
    y = _load_rows_of(y_ptr, cols, dd, N, D, MASK_N, EVEN_D)
    logits = _mma(x, tl.trans(y), ACC, PREC, UPCAST) * s
    if MASK_N:
        logits = tl.where((cols < N)[None, :], logits, float("-inf"))
    return y, logits


@triton.jit
def _chunked_logits(x_ptr, rows, y_ptr, cols, M, N, D, s, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """scale * x @ y.T for one tile, the features streamed BLOCK_K at a time (wide D: the rows of x
    are not kept resident, they would not fit in registers)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, BLOCK_D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        xmask = (rows < M)[:, None]
        ymask = (cols < N)[:, None] if MASK_N else tl.full([BLOCK_N, 1], 1, tl.int1)
        if not EVEN_D:
            xmask = xmask & (kk < D)[None, :]
            ymask = ymask & (kk < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=xmask, other=0.0)
        y = tl.load(y_ptr + cols[:, None] * D + kk[None, :], mask=ymask, other=0.0)
        acc += _mma(x, tl.trans(y), ACC, PREC, UPCAST)
    logits = acc * s
    if MASK_N:
        logits = tl.where((cols < N)[None, :], logits, float("-inf"))
    return logits


@triton.jit
def _load_rows(x_ptr, rows, dd, M, D, EVEN_D: tl.constexpr):
    ptrs = x_ptr + rows[:, None] * D + dd[None, :]
    if EVEN_D:
        x = tl.load(ptrs, mask=(rows < M)[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows < M)[:, None] & (dd < D)[None, :], other=0.0)
    return x


@triton.jit
def _lse_update(logits, j0, m, l, arg):
    tmax = tl.max(logits, axis=1)
    targ = tl.argmax(logits, axis=1).to(tl.int64) + j0
    arg = tl.where(tmax > m, targ, arg)  # strict: ties keep the earlier column
    new_m = tl.maximum(m, tmax)
    c = _finite_shift(new_m)
    l = l * tl.exp(m - c) + tl.sum(tl.exp(logits - c[:, None]), axis=1)
    return new_m, l, arg


@triton.jit
def _finite_shift(mx):
    """The running max as the exponent shift, 0 where it is still -inf: a row (or column) whose
    logits so far are all -inf sums exp(-inf - 0) = 0, not exp(-inf + inf) = NaN, so later finite
    logits give the finite logsumexp the formula has. Per row, not per logit."""
    return tl.where(mx == float("-inf"), 0.0, mx)


@triton.jit
def _fwd_logits(x, x_ptr, rows, y_ptr, cols, dd, M, N, D, s, MASK_N: tl.constexpr, RESIDENT: tl.constexpr,
                EVEN_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One forward tile's logits, x resident (RESIDENT) or streamed in BLOCK_K chunks."""
    if RESIDENT:
        _, logits = _tile_logits(x, y_ptr, cols, dd, N, D, s, MASK_N, EVEN_D, ACC, PREC, UPCAST)
    else:
        logits = _chunked_logits(x_ptr, rows, y_ptr, cols, M, N, D, s, MASK_N, EVEN_D, ACC, PREC, UPCAST,
                                 BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    return logits


@triton.jit
def _lse_step(x, x_ptr, rows, y_ptr, j0, dd, M, N, D, s, m, l, arg, MASK_N: tl.constexpr, RESIDENT: tl.constexpr,
              EVEN_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One column tile of the forward sweep: its logits into the row statistics (m, l, arg)."""
    cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    logits = _fwd_logits(x, x_ptr, rows, y_ptr, cols, dd, M, N, D, s, MASK_N, RESIDENT, EVEN_D, ACC, PREC, UPCAST,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    return _lse_update(logits, j0, m, l, arg)


@triton.jit
def _col_range(N, split_cols, SPLIT: tl.constexpr):
    """[c0, c1): the columns of this program's split (program_id 1), or all N."""
    if SPLIT:
        c0 = tl.program_id(1).to(tl.int64) * split_cols
        c1 = tl.minimum(c0 + split_cols, N)
    else:
        c0 = tl.zeros([], tl.int64)
        c1 = N + tl.zeros([], tl.int64)
    return c0, c1


@triton.jit
def _store_rows(lse_ptr, max_ptr, arg_ptr, rows, M, m, l, arg, SPLIT: tl.constexpr):
    """Row results: logsumexp, max, first argmax; with SPLIT this split's partial max, sum of
    exp(L - max) and argmax (int32) at split * M + row, for _col_reduce_kernel."""
    rmask = rows < M
    if SPLIT:
        part = tl.program_id(1).to(tl.int64) * M + rows
        tl.store(lse_ptr + part, m, mask=rmask)
        tl.store(max_ptr + part, l, mask=rmask)
        tl.store(arg_ptr + part, arg.to(tl.int32), mask=rmask)
    else:
        tl.store(lse_ptr + rows, m + tl.log(l), mask=rmask)
        tl.store(max_ptr + rows, m, mask=rmask)
        tl.store(arg_ptr + rows, arg, mask=rmask)


@triton.jit
def _lse_kernel(
    x_ptr, y_ptr, scale_ptr, lse_ptr, max_ptr, arg_ptr, M, N, D, split_cols,
    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Per row i of x: logsumexp_j, max_j and first argmax_j of scale * x_i . y_j. With SPLIT,
    program (i, c) covers columns [c split_cols, (c + 1) split_cols) and writes its partial max,
    sum of exp(L - max) and first argmax (int32) at c M + row of lse_ptr, max_ptr, arg_ptr, the
    layout _col_reduce_kernel merges (few rows, many columns: the rows alone would leave SMs idle)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    RESIDENT: tl.constexpr = BLOCK_K == BLOCK_D
    x = _load_rows(x_ptr, rows, dd, M, D, EVEN_D) if RESIDENT else 0.0  # else streamed per tile
    s = tl.load(scale_ptr).to(ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    arg = tl.zeros([BLOCK_M], tl.int64)
    c0, c1 = _col_range(N, split_cols, SPLIT)
    n_full = c0 + ((c1 - c0) // BLOCK_N) * BLOCK_N
    for j0 in range(c0, n_full, BLOCK_N):  # c1 bounds the masks: columns past it belong to another split
        m, l, arg = _lse_step(x, x_ptr, rows, y_ptr, j0, dd, M, c1, D, s, m, l, arg, False, RESIDENT, EVEN_D, ACC,
                              PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    if n_full < c1:
        m, l, arg = _lse_step(x, x_ptr, rows, y_ptr, n_full, dd, M, c1, D, s, m, l, arg, True, RESIDENT, EVEN_D, ACC,
                              PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    _store_rows(lse_ptr, max_ptr, arg_ptr, rows, M, m, l, arg, SPLIT)


@triton.jit
def _sym_step(x, x_ptr, rows, r0, y_ptr, j0, dd, M, N, D, s, m, l, arg, pm_ptr, ps_ptr, pa_ptr, later,
              MASK_N: tl.constexpr, RESIDENT: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the symmetric sweep: row statistics in registers, and this program's running
    column statistics (max, sum of exp, first argmax over the rows it has seen) read and written
    back in its own slice of the partials (no other program touches it). The slice is read only
    when `later` (on the program's first row block it is uninitialized).

    One exp per logit: the column sums reuse the row softmax numerators P = exp(L - m_i),
    sum_i exp(L_ij - c) = exp(R - c) sum_i P_ij exp(m_i - R) with R = max_i m_i, unless some
    column's max sits more than _FAR below R (see _FAR)."""
    cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    logits = _fwd_logits(x, x_ptr, rows, y_ptr, cols, dd, M, N, D, s, MASK_N, RESIDENT, EVEN_D, ACC, PREC, UPCAST,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    tmax = tl.max(logits, axis=1)
    arg = tl.where(tmax > m, tl.argmax(logits, axis=1).to(tl.int64) + j0, arg)  # strict: ties keep the earlier
    new_m = tl.maximum(m, tmax)
    c = _finite_shift(new_m)
    p = tl.exp(logits - c[:, None])
    l = l * tl.exp(m - c) + tl.sum(p, axis=1)
    m = new_m

    rvalid = rows < M  # rows past M are zero rows, not candidates of any column
    lc = tl.where(rvalid[:, None], logits, float("-inf"))
    cmask = cols < N
    rd = cmask & (tl.zeros([BLOCK_N], tl.int32) + later != 0)  # a scalar flag as a vector mask
    pm = tl.load(pm_ptr + cols, mask=rd, other=float("-inf"))
    ps = tl.load(ps_ptr + cols, mask=rd, other=0.0)
    pa = tl.load(pa_ptr + cols, mask=rd, other=0)
    cmax = tl.max(lc, axis=0)
    pa = tl.where(cmax > pm, (tl.argmax(lc, axis=0) + r0).to(tl.int32), pa)  # rows come in increasing order
    new = tl.maximum(pm, cmax)
    shift = tl.where(cmask, _finite_shift(new), 0.0)  # columns past N stay -inf without -inf - -inf
    big = _finite_shift(tl.max(tl.where(rvalid, m, float("-inf")), axis=0))
    gap = tl.where(cmask, big - shift, 0.0)
    if tl.max(gap, axis=0) > _FAR:
        csum = tl.sum(tl.exp(lc - shift[None, :]), axis=0)
    else:
        w = tl.where(rvalid, tl.exp(m - big), 0.0)
        csum = tl.sum(p * w[:, None], axis=0) * tl.exp(gap)
    tl.store(pm_ptr + cols, new, mask=cmask)
    tl.store(ps_ptr + cols, ps * tl.exp(pm - shift) + csum, mask=cmask)
    tl.store(pa_ptr + cols, pa, mask=cmask)
    return m, l, arg


@triton.jit
def _sym_lse_kernel(
    x_ptr, y_ptr, scale_ptr, lse_ptr, max_ptr, arg_ptr, pm_ptr, ps_ptr, pa_ptr, M, N, D, n_row_blocks, split_cols,
    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Both directions in one sweep over the logits L = scale * x @ y.T: per row of x its
    logsumexp, max and first argmax (as _lse_kernel), and per program p (a persistent grid of P
    programs, block rows p, p + P, ...) the partial column statistics over its rows in row p of the
    P x N buffers pm (max), ps (sum of exp(L - pm)), pa (first argmax, int32), merged by
    _col_reduce_kernel. Each logit is formed once; reads the rows once per program tile, writes
    O(P N + M). With SPLIT (few row blocks), program (p, c) covers the columns of split c only and
    writes row partials as _lse_kernel does (the column ranges of one p are disjoint)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    RESIDENT: tl.constexpr = BLOCK_K == BLOCK_D
    s = tl.load(scale_ptr).to(ACC)
    part = pid.to(tl.int64) * N
    c0, c1 = _col_range(N, split_cols, SPLIT)
    n_full = c0 + ((c1 - c0) // BLOCK_N) * BLOCK_N
    for rb in range(pid, n_row_blocks, nprog):
        r0 = rb * BLOCK_M  # < M: fits int32
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        x = _load_rows(x_ptr, rows, dd, M, D, EVEN_D) if RESIDENT else 0.0  # else streamed per tile
        later = rb - pid  # nonzero after the program's first row block
        m = tl.full([BLOCK_M], float("-inf"), ACC)
        l = tl.zeros([BLOCK_M], ACC)
        arg = tl.zeros([BLOCK_M], tl.int64)
        for j0 in range(c0, n_full, BLOCK_N):  # c1 bounds the masks
            m, l, arg = _sym_step(x, x_ptr, rows, r0, y_ptr, j0, dd, M, c1, D, s, m, l, arg, pm_ptr + part,
                                  ps_ptr + part, pa_ptr + part, later, False, RESIDENT, EVEN_D, ACC, PREC, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
        if n_full < c1:
            m, l, arg = _sym_step(x, x_ptr, rows, r0, y_ptr, n_full, dd, M, c1, D, s, m, l, arg, pm_ptr + part,
                                  ps_ptr + part, pa_ptr + part, later, True, RESIDENT, EVEN_D, ACC, PREC, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
        _store_rows(lse_ptr, max_ptr, arg_ptr, rows, M, m, l, arg, SPLIT)


@triton.jit
def _col_reduce_kernel(pm_ptr, ps_ptr, pa_ptr, lse_ptr, max_ptr, arg_ptr, N, P, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Logsumexp, max and first argmax of each of N entries from P partial rows of (max, sum of
    exp(x - max), first argmax): the symmetric sweep's column partials, or the row partials of
    column splits. Reads 12 bytes (fp32) per partial entry, the max twice."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cmask = cols < N
    mx = tl.full([BLOCK], float("-inf"), ACC)
    for p in range(P):
        mx = tl.maximum(mx, tl.load(pm_ptr + p * N + cols, mask=cmask, other=float("-inf")))
    shift = tl.where(cmask, _finite_shift(mx), 0.0)
    sm = tl.zeros([BLOCK], ACC)
    arg = tl.full([BLOCK], 2147483647, tl.int32)
    for p in range(P):
        pm = tl.load(pm_ptr + p * N + cols, mask=cmask, other=float("-inf"))
        sm += tl.load(ps_ptr + p * N + cols, mask=cmask, other=0.0) * tl.exp(pm - shift)
        pa = tl.load(pa_ptr + p * N + cols, mask=cmask, other=0)
        arg = tl.where(pm == mx, tl.minimum(arg, pa), arg)  # the first row reaching the max
    tl.store(lse_ptr + cols, mx + tl.log(tl.where(cmask, sm, 1.0)), mask=cmask)
    tl.store(max_ptr + cols, mx, mask=cmask)
    tl.store(arg_ptr + cols, arg.to(tl.int64), mask=cmask)


@triton.jit
def _row_rescale(lse_x, rmask):
    """(big, u): the block's largest row logsumexp and u_i = exp(lse_x[i] - big), 0 on rows past
    the end, for the one-exp column term of _grad_weights."""
    big = tl.max(tl.where(rmask, lse_x, float("-inf")), axis=0)
    return big, tl.where(rmask, tl.exp(lse_x - big), 0.0)


@triton.jit
def _prob(e):
    """exp(e) capped at 1 (NaN kept): e = L - lse is <= 0 in exact arithmetic, but half operands
    recompute a logit from another tile shape than the forward's (another summation order), and at
    logit scales of 1e4+ that ulp-sized mismatch times the scale made probabilities above 1 (54 at
    temperature 1e-8, gradients 50x too large, before _index.LAUNCH also ruled out fused multiply-adds).
    The cpu kernel caps the same way."""
    return tl.exp(tl.minimum(e, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _at_most_one(q):
    return tl.minimum(q, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _grad_weights(logits, lse_x, g_x, u, gap, lse_y, g_y, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,
                  ONE_EXP: tl.constexpr):
    """G = g_x[i] exp(L - lse_x[i]) (ROW_TERM) + g_y[j] exp(L - lse_y[j]) (COL_TERM) for one tile,
    each probability capped at 1 (see _prob). With both terms and ONE_EXP, one exp per logit:
    exp(L - lse_y) = P u_i exp(gap_j) (P = exp(L - lse_x), u_i = exp(lse_x[i] - big), gap_j = big -
    lse_y[j], big the block's largest lse_x), unless a column's gap exceeds _FAR, where P may have
    underflowed: then a second exp. (The rescaling takes registers, so both variants are tuning
    candidates.)"""
    if ROW_TERM:
        p = _prob(logits - lse_x[:, None])
        if COL_TERM and not ONE_EXP:
            g = g_x[:, None] * p + g_y[None, :] * _prob(logits - lse_y[None, :])
        elif COL_TERM:
            if tl.max(gap, axis=0) > _FAR:
                g = g_x[:, None] * p + g_y[None, :] * _prob(logits - lse_y[None, :])
            else:
                g = g_x[:, None] * p + g_y[None, :] * _at_most_one(p * (u[:, None] * tl.exp(gap)[None, :]))
        else:
            g = g_x[:, None] * p
    else:
        g = g_y[None, :] * _prob(logits - lse_y[None, :])
    return g


@triton.jit
def _grad_tile(acc, y, logits, lse_x, g_x, u, big, lse_y_ptr, g_y_ptr, cols, N,
               ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, ONE_EXP: tl.constexpr, MASK_N: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + G @ y for one column tile (see _grad_weights)."""
    lse_y = 0.0  # placeholders without COL_TERM (never read)
    g_y = 0.0
    gap = 0.0
    if COL_TERM:
        if MASK_N:
            lse_y = tl.load(lse_y_ptr + cols, mask=cols < N, other=0.0)
            g_y = tl.load(g_y_ptr + cols, mask=cols < N, other=0.0)
        else:
            lse_y = tl.load(lse_y_ptr + cols)
            g_y = tl.load(g_y_ptr + cols)
        gap = big - lse_y
        if MASK_N:
            gap = tl.where(cols < N, gap, 0.0)
    g = _grad_weights(logits, lse_x, g_x, u, gap, lse_y, g_y, ROW_TERM, COL_TERM, ONE_EXP)
    if MASK_N:
        g = tl.where((cols < N)[None, :], g, 0.0)
    return acc + _mma(g.to(y.dtype), y, ACC, PREC, UPCAST)


@triton.jit
def _out_features(y, y_ptr, cols, oo, N, D, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_O: tl.constexpr):
    """The features `oo` of the tile's y rows, the product's operand: the tile itself when a
    program owns whole rows (BLOCK_O == BLOCK_D), else those columns read again (from cache)."""
    if BLOCK_O == BLOCK_D:
        out = y
    else:
        out = _load_rows_of(y_ptr, cols, oo, N, D, MASK_N, EVEN_D)
    return out


@triton.jit
def _grad_kernel(
    x_ptr, y_ptr, scale_ptr, lse_x_ptr, g_x_ptr, lse_y_ptr, g_y_ptr, out_ptr, M, N, D, split_cols,
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr, ONE_EXP: tl.constexpr, SPLIT: tl.constexpr,
):
    """out_i = sum_j G_ij y_j with G_ij = g_x[i] exp(L_ij - lse_x[i]) (ROW_TERM)
    + g_y[j] exp(L_ij - lse_y[j]) (COL_TERM), L = scale * x @ y.T recomputed per tile; fp32 out.
    With SPLIT, program (i, c) sums over the columns of split c only, into out[c] (c, M, D).
    BLOCK_O < BLOCK_D: each row block's output features in BLOCK_D / BLOCK_O programs of BLOCK_O
    features each, every one recomputing the full logits (more FLOPs, a smaller accumulator: a
    64 x 512 fp32 one takes 128 registers per thread of 8 warps, split in two 64)."""
    N_OUT: tl.constexpr = BLOCK_D // BLOCK_O
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // N_OUT) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    oo = (pid % N_OUT) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    rmask = rows < M
    x = _load_rows(x_ptr, rows, dd, M, D, EVEN_D)
    s = tl.load(scale_ptr).to(ACC)
    lse_x = tl.zeros([BLOCK_M], ACC)
    g_x = tl.zeros([BLOCK_M], ACC)
    if ROW_TERM:
        lse_x = tl.load(lse_x_ptr + rows, mask=rmask, other=0.0)
        g_x = tl.load(g_x_ptr + rows, mask=rmask, other=0.0)
    big, u = _row_rescale(lse_x, rmask)
    acc = tl.zeros([BLOCK_M, BLOCK_O], ACC)
    c0, c1 = _col_range(N, split_cols, SPLIT)
    n_full = c0 + ((c1 - c0) // BLOCK_N) * BLOCK_N
    for j0 in range(c0, n_full, BLOCK_N):  # c1 bounds the masks
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y, logits = _tile_logits(x, y_ptr, cols, dd, c1, D, s, False, EVEN_D, ACC, PREC, UPCAST)
        y = _out_features(y, y_ptr, cols, oo, c1, D, False, EVEN_D, BLOCK_D, BLOCK_O)
        acc = _grad_tile(acc, y, logits, lse_x, g_x, u, big, lse_y_ptr, g_y_ptr, cols, c1, ROW_TERM, COL_TERM,
                         ONE_EXP, False, ACC, PREC, UPCAST)
    if n_full < c1:
        cols = n_full + tl.arange(0, BLOCK_N).to(tl.int64)
        y, logits = _tile_logits(x, y_ptr, cols, dd, c1, D, s, True, EVEN_D, ACC, PREC, UPCAST)
        y = _out_features(y, y_ptr, cols, oo, c1, D, True, EVEN_D, BLOCK_D, BLOCK_O)
        acc = _grad_tile(acc, y, logits, lse_x, g_x, u, big, lse_y_ptr, g_y_ptr, cols, c1, ROW_TERM, COL_TERM,
                         ONE_EXP, True, ACC, PREC, UPCAST)
    if SPLIT:
        out_ptr += tl.program_id(1).to(tl.int64) * M * D
    ptrs = out_ptr + rows[:, None] * D + oo[None, :]
    if EVEN_D:
        tl.store(ptrs, acc, mask=rmask[:, None])
    else:
        tl.store(ptrs, acc, mask=rmask[:, None] & (oo < D)[None, :])


@triton.jit
def _fused_grad_step(x_ptr, rows, y, cols, dd, lse_x_ptr, g_x_ptr, lse_y, g_y, dx_ptr, acc, M, N, D, s, pad_cols,
                     COL_TERM: tl.constexpr, ONE_EXP: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One row block of the one-sweep backward: the tile's G (see _grad_weights), G @ y added into
    dx by atomics, acc + G.T @ x returned. Rows past M (MASK_M) and padded columns (`pad_cols`,
    the last column block) get -inf logits, so G is 0 there. (Reading y per row block and adding
    G @ y in feature chunks, to free registers, spilled far more at every tile tried, in the
    unaligned specialization.)"""
    rmask = rows < M
    if MASK_M:
        x = _load_rows(x_ptr, rows, dd, M, D, EVEN_D)
        lse_x = tl.load(lse_x_ptr + rows, mask=rmask, other=0.0)
        g_x = tl.load(g_x_ptr + rows, mask=rmask, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(x_ptr + rows[:, None] * D + dd[None, :])
        else:
            x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=(dd < D)[None, :], other=0.0)
        lse_x = tl.load(lse_x_ptr + rows)
        g_x = tl.load(g_x_ptr + rows)
    logits = _mma(x, tl.trans(y), ACC, PREC, UPCAST) * s
    if MASK_M:
        logits = tl.where(rmask[:, None], logits, float("-inf"))
    big, u = _row_rescale(lse_x, rmask)  # per row, not per logit: the mask costs nothing here
    if pad_cols:  # uniform per program: only the last column block
        logits = tl.where((cols < N)[None, :], logits, float("-inf"))
    g = _grad_weights(logits, lse_x, g_x, u, big - lse_y, lse_y, g_y, True, COL_TERM, ONE_EXP).to(x.dtype)
    ptrs = dx_ptr + rows[:, None] * D + dd[None, :]
    dx = _mma(g, y, ACC, PREC, UPCAST)
    if MASK_M or not EVEN_D:
        tl.atomic_add(ptrs, dx, mask=rmask[:, None] & (dd < D)[None, :], sem="relaxed")
    else:
        tl.atomic_add(ptrs, dx, sem="relaxed")
    return acc + _mma(tl.trans(g), x, ACC, PREC, UPCAST)


@triton.jit
def _fused_grad_kernel(
    x_ptr, y_ptr, scale_ptr, lse_x_ptr, g_x_ptr, lse_y_ptr, g_y_ptr, dx_ptr, dy_ptr, M, N, D,
    COL_TERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_EXP: tl.constexpr,
):
    """Both gradients in one sweep (each logit formed once): with G_ij = g_x[i] exp(L_ij - lse_x[i])
    + g_y[j] exp(L_ij - lse_y[j]) (the second term with COL_TERM), dy_j = sum_i G_ij x_i for this
    program's column block, kept in registers and stored once, and dx_i += sum_j G_ij y_j added
    into the zero-initialized fp32 dx by atomics (as FlashAttention-2 does for dQ): the order of
    those additions varies run to run, so the host never picks this kernel under
    torch.use_deterministic_algorithms."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    cmask = cols < N
    y = _load_rows(y_ptr, cols, dd, N, D, EVEN_D)
    s = tl.load(scale_ptr).to(ACC)
    if COL_TERM:
        lse_y = tl.load(lse_y_ptr + cols, mask=cmask, other=float("inf"))  # padded: no column term
        g_y = tl.load(g_y_ptr + cols, mask=cmask, other=0.0)
    else:  # placeholders, never read
        lse_y = tl.zeros([BLOCK_N], ACC)
        g_y = tl.zeros([BLOCK_N], ACC)
    pad_cols = (tl.program_id(0).to(tl.int64) + 1) * BLOCK_N > N
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    n_full = M // BLOCK_M
    m_full = n_full * BLOCK_M
    for k in range(0, n_full):
        # each program starts at its own row block (wrapping around), so that programs running at the
        # same time add into different rows of dx instead of all contending for the same ones
        i0 = ((k + tl.program_id(0).to(tl.int64)) % n_full) * BLOCK_M
        rows = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        acc = _fused_grad_step(x_ptr, rows, y, cols, dd, lse_x_ptr, g_x_ptr, lse_y, g_y, dx_ptr, acc, M, N, D, s,
                               pad_cols, COL_TERM, ONE_EXP, False, EVEN_D, ACC, PREC, UPCAST)
    if m_full < M:
        rows = m_full + tl.arange(0, BLOCK_M).to(tl.int64)
        acc = _fused_grad_step(x_ptr, rows, y, cols, dd, lse_x_ptr, g_x_ptr, lse_y, g_y, dx_ptr, acc, M, N, D, s,
                               pad_cols, COL_TERM, ONE_EXP, True, EVEN_D, ACC, PREC, UPCAST)
    ptrs = dy_ptr + cols[:, None] * D + dd[None, :]
    if EVEN_D:
        tl.store(ptrs, acc, mask=cmask[:, None])
    else:
        tl.store(ptrs, acc, mask=cmask[:, None] & (dd < D)[None, :])


# --- configs -------------------------------------------------------------------------------------

def _operand_dtype(z1: torch.Tensor, z2: torch.Tensor) -> torch.dtype:
    """The dtype the kernels read: the inputs' own half dtype when both share it, else fp32 / fp64."""
    if z1.dtype == z2.dtype and z1.dtype in (torch.bfloat16, torch.float16):
        return z1.dtype
    return ref.acc_dtype(z1, z2)


def _precision(op: torch.dtype) -> str:
    """IEEE products for every operand dtype: bf16/fp16 run on the tensor cores as they are; fp32
    is not rounded to TF32 (three-pass TF32 spilled registers at every tile shape tried)."""
    return "ieee"


def _upcast(op: torch.dtype) -> bool:
    return op == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def block_d(d: int) -> int:
    """D padded to a power of two >= 16 (tl.dot's minimum inner size)."""
    return max(16, triton.next_power_of_2(d))


def candidates(kind: str, bd: int, op: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, ONE_EXP for "grad" / "fused"]) to try for
    `kind` ("lse" / "sym" / "grad" / "fused": the one-sweep backward, half operands only), padded
    width `bd` and operand dtype; the first is the default. BLOCK_K < bd (forward) streams the
    rows' features in chunks instead of keeping them resident; for "grad" the third field is
    BLOCK_O, the output features per program (< bd: a row block's gradient in bd / BLOCK_O
    programs, each recomputing the logits: 6 instead of 4 B^2 D per sweep for half the accumulator;
    candidates at bd = 512 only, where the H100 ran the whole-row backward at half the D = 256
    rate; not yet timed on a GPU: the tuner decides).

    Register spills, sm_90, in the launcher's aligned specialization (16-byte aligned rows, B and D
    multiples of 16: what runs at scale; tests/tools/aot_compile_triton.py enforces the triton 3.9
    figures), compiled without fused multiply-adds (_index.LAUNCH): the half-operand tiles are
    spill-free on triton 3.9 and 3.6 except the symmetric (128, 64, 64) tiles at bd 256 / 512
    (0 / 108 bytes on 3.9, 16 / 128 on 3.6), the two-exp (64, 32) backward tile at 512 (16 / 0),
    its output-chunked (64, 32, 256) variant (0 / 56) and the one-sweep (16, 32) tile at 512 (64 /
    96; every one-sweep tile with wgmma spills 2-4 KB there).
    Unaligned operands compile another specialization without vectorized, pipelined loads, which
    spills more (up to ~3.5 KB for the two-exp backward tiles on 3.6). The one-sweep backward keeps
    a BLOCK_N x bd accumulator and forms a BLOCK_M x bd product per tile, and its fp32 atomics (bd
    per BLOCK_N columns per logit) grow as BLOCK_N shrinks: a tuning candidate, never the default.

    Hopper's wgmma needs 64 rows per warp group: a tile with BLOCK_M < 64 (in the one-sweep
    backward also BLOCK_N < 64, the rows of its G.T @ x) compiles to mma.sync only, the older and
    slower tensor-core path (checked in the sm_90 PTX). Among the above that is the two-sweep
    backward's (32, 32) tiles and the one-sweep (16, 64) / (16, 32) ones. The AOT test requires
    wgmma of every half-operand tile with 64-row warp groups.

    fp32 and fp64 run IEEE products (not on the tensor cores) on 16 x 16 tiles; they spill registers
    at bd >= 128 (up to a few hundred bytes there, up to ~7.5 KB at bd = 512: the resident rows and,
    backward, a 16 x bd accumulator per program)."""
    if op in (torch.float32, torch.float64):
        # IEEE products: register-hungry, so small tiles. The forward and the backward form each
        # logit the same way (same column tile, features resident), so the backward's recomputed
        # logits equal the forward's bit for bit and softmax rows cancel exactly against labels.
        return {"lse": [(16, 16, bd, 4, 2)], "sym": [(16, 16, bd, 8, 2)], "grad": [(16, 16, bd, 8, 2, False)],
                "fused": []}[kind]
    if kind == "fused":  # one-sweep backward: a BLOCK_N x bd fp32 accumulator, a BLOCK_M x bd product
        table = {64: [(64, 64, 64, 8, 2, True), (64, 32, 64, 8, 2, True)],
                 128: [(64, 128, 128, 8, 2, True), (64, 64, 128, 8, 2, True)],
                 256: [(64, 64, 256, 8, 2, True), (16, 64, 256, 8, 2, True)],  # wider tiles spill 1.5-2 KB
                 512: [(16, 32, 512, 8, 2, True)],  # spills 64 / 128 B (triton 3.9 / 3.6)
                 }.get(max(64, bd), [(16, 32, bd, 8, 2, True)])
    elif kind == "sym":  # the column statistics take registers: narrower column tiles, features streamed
        table = {64: [(128, 32, 64, 8, 3), (64, 32, 64, 4, 3)],
                 128: [(128, 32, 128, 8, 3), (128, 32, 64, 8, 3), (64, 64, 64, 8, 3)],
                 256: [(128, 32, 256, 8, 3), (128, 64, 64, 8, 3), (128, 32, 64, 8, 3), (64, 64, 64, 8, 3)],
                 512: [(128, 32, 128, 8, 3), (128, 64, 64, 8, 3), (128, 32, 64, 8, 3), (64, 32, 128, 8, 3)],
                 }.get(max(64, bd), [(64, 32, 64, 4, 3)])
    elif kind == "lse":
        table = {64: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3)],
                 128: [(128, 128, 128, 8, 3), (128, 64, 128, 8, 3), (64, 128, 128, 4, 3)],
                 256: [(128, 64, 256, 8, 2), (128, 128, 256, 8, 2), (64, 64, 256, 4, 3)],
                 512: [(64, 64, 128, 4, 3), (128, 32, 512, 8, 2), (64, 32, 512, 4, 3)],
                 }.get(max(64, bd), [(64, 64, 128, 4, 3)])
    else:  # the third field: BLOCK_O (output features per program), the last: ONE_EXP (see _grad_weights)
        table = {64: [(128, 64, 64, 8, 2, False), (64, 64, 64, 4, 3, False), (128, 32, 64, 8, 2, True)],
                 128: [(64, 64, 128, 4, 3, False), (64, 64, 128, 8, 2, False), (64, 32, 128, 4, 3, True)],
                 256: [(64, 16, 256, 8, 2, True), (64, 32, 256, 8, 2, True), (64, 32, 256, 4, 2, False),
                       (128, 32, 256, 8, 2, False), (32, 32, 256, 4, 2, True)],
                 512: [(64, 16, 512, 8, 2, True), (64, 16, 512, 8, 2, False), (64, 32, 512, 8, 2, False),
                       (32, 32, 512, 8, 2, True), (64, 32, 256, 8, 2, False), (64, 16, 256, 8, 2, False)],
                 }.get(max(64, bd), [(32, 16, bd, 8, 1, False)])
    return [(bm, bn, min(bk, bd), *rest) for bm, bn, bk, *rest in table]  # BLOCK_K <= padded D


def _tuned(key: tuple, cands: list, run, logits: int, device: torch.device):
    """run(cand) for the candidate picked for `key`: the first one on CPU (the interpreter), below
    _TUNE_MIN_ROWS ** 2 logits, with WMKERNELS_TUNE=0 or under torch.use_deterministic_algorithms
    (a pick by timing can differ between processes, and with it the rounding), else the fastest
    when first timed."""
    small = logits < _TUNE_MIN_ROWS ** 2
    fixed = os.environ.get("WMKERNELS_TUNE") == "0" or torch.are_deterministic_algorithms_enabled()
    if device.type != "cuda" or small or len(cands) == 1 or fixed:
        chosen = cands[0]
    else:  # per device too: two GPU models in one process may well pick differently
        key = key + (device,)
        if key not in _picked:
            _picked[key] = _pick(key, cands, run)
        chosen = _picked[key]
    return run(chosen)


def _meta(kind: str, cand: tuple) -> dict:
    bm, bn, bk, warps, stages = cand[:5]
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **LAUNCH)
    if kind in ("grad", "fused"):
        meta["ONE_EXP"] = cand[5]
    if kind in ("lse", "sym"):
        meta["BLOCK_K"] = bk
    if kind == "grad":
        meta["BLOCK_O"] = bk
    return meta


def _pick(key, cands, run):
    """Times each candidate once after a compile-and-warm-up run; the fastest wins. A config
    that does not compile for this device (out of shared memory or registers) is skipped."""
    times = {}
    for cand in cands:
        try:
            run(cand)
        except Exception:  # triton's OutOfResources and friends differ across versions
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(cand)
        end.record()
        end.synchronize()
        times[cand] = start.elapsed_time(end)
    if not times:
        raise RuntimeError(f"no Triton config for {key} compiled for this device: {cands}")
    return min(times, key=times.get)


def _sm_count(device: torch.device) -> int:
    """SMs of a GPU: the persistent symmetric forward runs one program on each (each keeps a row
    of column partials, so more would cost memory, not speed). 2 under the interpreter, so that
    the tests see programs with several row blocks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _col_splits(row_programs: int, n: int, bn: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(number of column splits, columns per split, a multiple of bn). On a GPU, enough splits for
    about two programs per SM when the rows alone give fewer (a rank's local rows against the
    gathered batch), keeping at least 8 column tiles per split; one elsewhere unless `splits`
    asks (tests)."""
    if splits is None:
        splits = 1 if device.type != "cuda" else 2 * _sm_count(device) // max(row_programs, 1)
        splits = min(splits, triton.cdiv(n, 8 * bn))
    splits = max(1, min(splits, triton.cdiv(n, bn)))
    cols = triton.cdiv(triton.cdiv(n, splits), bn) * bn
    return triton.cdiv(n, cols), cols


# --- host side -----------------------------------------------------------------------------------

def _launch_setup(x, y, acc):
    """(M, N, D, padded D, device, the constexprs every contrastive kernel takes) for rows x
    against rows y accumulated in `acc`."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    bd = block_d(d)
    cx = dict(ACC=_tl_acc(acc), PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype), EVEN_D=d == bd, BLOCK_D=bd)
    return m, n, d, bd, x.device, cx


def _size_key(kind: str, x, cx: dict, m: int, n: int, *extra) -> tuple:
    """What a tuned choice is kept for: the kernel kind, operand dtype, constexprs, size classes."""
    return (kind, x.dtype, tuple(sorted(cx.items())), m.bit_length(), n.bit_length(), *extra)


def _merge(pm, ps, pa, lse, mx, arg, parts: int, acc_tl) -> None:
    """lse, max, first argmax of each column of the (parts, n) partial statistics."""
    n = lse.shape[0]
    _col_reduce_kernel[(triton.cdiv(n, _REDUCE_BLOCK),)](pm, ps, pa, lse, mx, arg, n, parts, ACC=acc_tl,
                                                         BLOCK=_REDUCE_BLOCK, **LAUNCH)


def _lse(x, y, scale, acc, cand=None, splits=None):
    """(lse, max, arg) per row of x against the rows of y; `cand` / `splits` override the tuned
    config and the column split count (tests, probes)."""
    m, n, d, bd, dev, cx = _launch_setup(x, y, acc)

    def run(cand):
        programs = triton.cdiv(m, cand[0])
        k, cols = _col_splits(programs, n, cand[1], dev, splits)
        lse, mx = torch.empty(m, dtype=acc, device=dev), torch.empty(m, dtype=acc, device=dev)
        arg = torch.empty(m, dtype=torch.int64, device=dev)
        if k == 1:
            _lse_kernel[(programs, 1)](x, y, scale, lse, mx, arg, m, n, d, cols, **cx, **_meta("lse", cand),
                                       SPLIT=False)
            return lse, mx, arg
        pm, ps = torch.empty(k, m, dtype=acc, device=dev), torch.empty(k, m, dtype=acc, device=dev)
        pa = torch.empty(k, m, dtype=torch.int32, device=dev)
        _lse_kernel[(programs, k)](x, y, scale, pm, ps, pa, m, n, d, cols, **cx, **_meta("lse", cand), SPLIT=True)
        _merge(pm, ps, pa, lse, mx, arg, k, cx["ACC"])
        return lse, mx, arg

    if cand is not None:
        return run(cand)
    key = _size_key("lse", x, cx, m, n)
    return _tuned(key, candidates("lse", bd, x.dtype), run, m * n, dev)


def _grad(x, y, scale, lse_x, g_x, lse_y, g_y, row_term: bool, col_term: bool, acc, cand=None, splits=None):
    """sum_j G_ij y_j per row of x (see _grad_kernel), fp32 / fp64; `cand` / `splits` as in _lse."""
    m, n, d, bd, dev, cx = _launch_setup(x, y, acc)
    cx.update(ROW_TERM=row_term, COL_TERM=col_term)

    def run(cand):
        programs = triton.cdiv(m, cand[0]) * (bd // cand[2])  # row blocks x output feature chunks
        k, cols = _col_splits(programs, n, cand[1], dev, splits)
        out = torch.empty((k, *x.shape), dtype=acc, device=dev)
        _grad_kernel[(programs, k)](x, y, scale, lse_x, g_x, lse_y, g_y, out, m, n, d, cols, **cx,
                                    **_meta("grad", cand), SPLIT=k > 1)
        return out[0] if k == 1 else out.sum(0)

    if cand is not None:
        return run(cand)
    key = _size_key("grad", x, cx, m, n)
    return _tuned(key, candidates("grad", bd, x.dtype), run, m * n, dev)


_TWO_SWEEPS = ("two-sweeps",)  # the backward as one _grad sweep per gradient, the deterministic default


def _grads_candidates(bd: int, op: torch.dtype) -> list:
    """The backward's strategies: two sweeps first (the default), then the one-sweep tiles unless
    torch.use_deterministic_algorithms is on (their atomics add in a varying order)."""
    if torch.are_deterministic_algorithms_enabled():
        return [_TWO_SWEEPS]
    return [_TWO_SWEEPS] + candidates("fused", bd, op)


def _grads(x, y, scale, lse_x, g_x, lse_y, g_y, symmetric: bool, acc, cand=None):
    """(d x, d y) = (G @ y, G.T @ x) with G_ij = g_x[i] exp(L_ij - lse_x[i]) (+ g_y[j] exp(L_ij -
    lse_y[j]) when symmetric): one sweep per gradient (_TWO_SWEEPS, each tuned alone), or, where
    timed faster on a GPU and nondeterminism is allowed, one sweep for both (_fused_grad_kernel,
    half operands only: 6 instead of 8 B^2 D flops, d x through fp32 atomics). `cand` overrides."""
    m, n, d, bd, dev, cx = _launch_setup(x, y, acc)

    def run(cand):
        if cand == _TWO_SWEEPS:
            return (_grad(x, y, scale, lse_x, g_x, lse_y, g_y, True, symmetric, acc),
                    _grad(y, x, scale, lse_y, g_y, lse_x, g_x, symmetric, True, acc))
        dx = torch.zeros(x.shape, dtype=acc, device=dev)
        dy = torch.empty(y.shape, dtype=acc, device=dev)
        _fused_grad_kernel[(triton.cdiv(n, cand[1]),)](x, y, scale, lse_x, g_x, lse_y, g_y, dx, dy, m, n, d, **cx,
                                                       COL_TERM=symmetric, **_meta("fused", cand))
        return dx, dy

    if cand is not None:
        return run(cand)
    cands = _grads_candidates(bd, x.dtype)
    key = _size_key("grads", x, cx, m, n, symmetric, len(cands))
    return _tuned(key, cands, run, m * n, dev)


def _prepare(z1, z2, normalize):
    """(a, b) in the accumulation dtype for the O(B D) terms and (ka, kb) in the dtype the kernels
    read; for half inputs a, b are ka, kb widened, so every term sees the same rows."""
    acc, op = ref.acc_dtype(z1, z2), _operand_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    if op == acc:
        return acc, a, b, a, b
    ka, kb = a.to(op), b.to(op)
    return acc, ka.to(acc), kb.to(acc), ka, kb


_SPLIT = ("split",)  # the symmetric forward as two one-direction sweeps, a tuning candidate


def _sym_lse(x, y, scale, acc, cand=None, splits=None):
    """(lse, max, arg) per row of x and per row of y (the columns) of scale * x @ y.T: one fused
    sweep (P x N partials, P = _sm_count) or, where timed faster, one sweep per direction.
    `cand` (a "sym" candidate or _SPLIT) and `splits` (column splits) override the choices, for
    tests and probes."""
    m, n, d, bd, dev, cx = _launch_setup(x, y, acc)

    def run(cand):
        if cand == _SPLIT:
            return _lse(x, y, scale, acc, splits=splits) + _lse(y, x, scale, acc, splits=splits)
        n_rb = triton.cdiv(m, cand[0])
        p = min(_sm_count(dev), n_rb)
        k, cols = _col_splits(p, n, cand[1], dev, splits)
        rows = [torch.empty(m, dtype=acc, device=dev), torch.empty(m, dtype=acc, device=dev),
                torch.empty(m, dtype=torch.int64, device=dev)]
        rparts = rows if k == 1 else [torch.empty(k, m, dtype=acc, device=dev),
                                      torch.empty(k, m, dtype=acc, device=dev),
                                      torch.empty(k, m, dtype=torch.int32, device=dev)]
        pm, ps = torch.empty(p, n, dtype=acc, device=dev), torch.empty(p, n, dtype=acc, device=dev)
        pa = torch.empty(p, n, dtype=torch.int32, device=dev)
        _sym_lse_kernel[(p, k)](x, y, scale, *rparts, pm, ps, pa, m, n, d, n_rb, cols, **cx, **_meta("sym", cand),
                                SPLIT=k > 1)
        if k > 1:
            _merge(*rparts, *rows, k, cx["ACC"])
        columns = [torch.empty(n, dtype=acc, device=dev), torch.empty(n, dtype=acc, device=dev),
                   torch.empty(n, dtype=torch.int64, device=dev)]
        _merge(pm, ps, pa, *columns, p, cx["ACC"])
        return (*rows, *columns)

    if cand is not None:
        return run(cand)
    key = _size_key("sym", x, cx, m, n)
    return _tuned(key, candidates("sym", bd, x.dtype) + [_SPLIT], run, m * n, dev)


def contrastive_forward(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize,
                        symmetric):
    acc, a, b, ka, kb = _prepare(z1, z2, normalize)
    scale = scale.to(acc).contiguous()
    with on_device(ka):
        core = _sym_lse(ka, kb, scale, acc) if symmetric else _lse(ka, kb, scale, acc) + (None, None, None)
    return ref.finish_forward(a, b, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, symmetric, core)


def contrastive_backward(
    g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_row, lse_col, pos_weight, smooth_row, smooth_col,
    normalize, symmetric,
):
    acc, a, b, ka, kb = _prepare(z1, z2, normalize)
    scale = scale.to(acc).contiguous()
    g_row, g_col = g_row.to(acc).contiguous(), g_col.to(acc).contiguous()
    lse_row, lse_col = lse_row.to(acc).contiguous(), lse_col.to(acc).contiguous()
    lse_c = lse_col if symmetric else lse_row  # placeholders: never read without COL_TERM / ROW_TERM
    g_c = g_col if symmetric else g_row
    with on_device(ka):
        ga, gb = _grads(ka, kb, scale, lse_row, g_row, lse_c, g_c, symmetric, acc)
    del ka, kb  # for half inputs a separate copy, no longer needed: the finishing terms read a, b
    return ref.finish_backward(
        z1, z2, a, b, scale, labels_row, labels_col, g_row, g_col, pos_weight, smooth_row, smooth_col,
        normalize, symmetric, ga, gb,
    )


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs, options, checks) the host code can launch: every tuning
    candidate in bf16 (sm_90), the default config of every dtype and padded width (sm_80 and sm_90;
    the one-sweep backward, half operands only: its first bf16 tile, and fp16 once).
    `checks` names the targets, the register spill bytes tolerated, whether the sm_90 code must use
    wgmma (the half-operand tiles with 64 rows per warp group), the integer arguments the
    launcher sees divisible by 16 at scale (B and D multiples of 16) and whether fused
    multiply-adds are forbidden (half operands: see _index.LAUNCH)."""
    specs = []
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    dims = {"M": "i64", "N": "i64", "D": "i64"}
    for op, name in names.items():
        acc = torch.float64 if op == torch.float64 else torch.float32
        aname = "fp64" if acc == torch.float64 else "fp32"
        for bd in (64, 128, 256, 512) if op != torch.float64 else (64, 256):
            base = {"ACC": _tl_acc(acc), "PREC": _precision(op), "UPCAST": False, "EVEN_D": True, "BLOCK_D": bd}
            wide = op in (torch.float32, torch.float64)

            def checks(i, archs, wgmma, split=False):
                """Default tiles (i == 0) spill-free in half precision below bd = 512 (256 bytes at
                512), tuning candidates up to 512 bytes (spilling tiles have won on the H100: the
                tuner decides); fp32 / fp64 IEEE tiles as noted in `candidates`."""
                if wide:
                    spill = 8192 if bd >= 128 else 256
                else:
                    spill = 512 if i else 256 if bd >= 512 else 0
                return {"max_spill_bytes": max(spill, 64 if split else 0), "archs": archs, "wgmma": wgmma,
                        "divisible": _DIVISIBLE, "no_fma": not wide}  # (fp32 / fp64 dots are fma chains)
            # the split variants (partials written): bf16 default configs (the code does not depend on
            # the operand dtype; what a rank's local rows against the gathered batch launch with)
            fwd_ptrs = {"x_ptr": f"*{name}", "y_ptr": f"*{name}", "scale_ptr": f"*{aname}"}
            lse_sig = {False: {**fwd_ptrs, "lse_ptr": f"*{aname}", "max_ptr": f"*{aname}", "arg_ptr": "*i64"},
                       True: {**fwd_ptrs, "lse_ptr": f"*{aname}", "max_ptr": f"*{aname}", "arg_ptr": "*i32"}}
            sym_sig = {False: {**lse_sig[False], "pm_ptr": f"*{aname}", "ps_ptr": f"*{aname}", "pa_ptr": "*i32", **dims,
                               "n_row_blocks": "i32", "split_cols": "i64"}}
            sym_sig[True] = {**sym_sig[False], "arg_ptr": "*i32"}
            for kind in ("lse", "sym"):
                for i, (bm, bn, bk, warps, stages) in enumerate(candidates(kind, bd, op)):
                    if i and op != torch.bfloat16:
                        break
                    for split in (False, True) if i == 0 and op == torch.bfloat16 else (False,):
                        cx = {**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split}
                        if kind == "lse":
                            kernel, sig = _lse_kernel, {**lse_sig[split], **dims, "split_cols": "i64"}
                        else:
                            kernel, sig = _sym_lse_kernel, sym_sig[split]
                        specs.append((kernel, {**sig, **{k: "constexpr" for k in cx}}, cx,
                                      {"num_warps": warps, "num_stages": stages},
                                      checks(i, (80, 90) if i == 0 and not split else (90,), not wide and bm >= 64,
                                             split)))
            for i, (bm, bn, bo, warps, stages, one_exp) in enumerate(candidates("grad", bd, op)):
                if i and op != torch.bfloat16:
                    break
                terms = ((True, False), (True, True), (False, True)) if bd == 64 and i == 0 else ((True, True),)
                splits = (False, True) if i == 0 and op == torch.bfloat16 else (False,)
                for (row_term, col_term), split in [(t, sp) for t in terms for sp in splits]:
                    cx = {"ROW_TERM": row_term, "COL_TERM": col_term, **base, "BLOCK_M": bm, "BLOCK_N": bn,
                          "BLOCK_O": bo, "ONE_EXP": one_exp, "SPLIT": split}
                    sig = {"x_ptr": f"*{name}", "y_ptr": f"*{name}",
                           **{p: f"*{aname}" for p in ("scale_ptr", "lse_x_ptr", "g_x_ptr", "lse_y_ptr", "g_y_ptr",
                                                       "out_ptr")}}
                    specs.append((_grad_kernel, {**sig, **dims, "split_cols": "i64", **{k: "constexpr" for k in cx}},
                                  cx, {"num_warps": warps, "num_stages": stages},
                                  checks(i, (80, 90) if i == 0 and not split else (90,), not wide and bm >= 64, split)))
            # the one-sweep backward (compiles slowly): every bf16 tile, the one-direction variant once,
            # fp16 once (the code does not depend on the half type)
            for i, (bm, bn, _, warps, stages, one_exp) in enumerate(candidates("fused", bd, op)):
                if op == torch.float16 and (i or bd != 256):
                    break
                for col_term in (True, False) if i == 0 and bd == 64 else (True,):
                    cx = {"COL_TERM": col_term, **base, "BLOCK_M": bm, "BLOCK_N": bn, "ONE_EXP": one_exp}
                    sig = {"x_ptr": f"*{name}", "y_ptr": f"*{name}",
                           **{p: f"*{aname}" for p in ("scale_ptr", "lse_x_ptr", "g_x_ptr", "lse_y_ptr", "g_y_ptr",
                                                       "dx_ptr", "dy_ptr")}}
                    specs.append((_fused_grad_kernel, {**sig, **dims, **{k: "constexpr" for k in cx}}, cx,
                                  {"num_warps": warps, "num_stages": stages},
                                  checks(i, (80, 90) if i == 0 and op == torch.bfloat16 else (90,),
                                         bm >= 64 and bn >= 64)))
    for aname, acc in (("fp32", tl.float32), ("fp64", tl.float64)):
        cx = {"ACC": acc, "BLOCK": _REDUCE_BLOCK}
        sig = {**{p: f"*{aname}" for p in ("pm_ptr", "ps_ptr")}, "pa_ptr": "*i32", "lse_ptr": f"*{aname}",
               "max_ptr": f"*{aname}", "arg_ptr": "*i64", "N": "i64", "P": "i32"}
        specs.append((_col_reduce_kernel, {**sig, **{k: "constexpr" for k in cx}}, cx, {}, {"divisible": _DIVISIBLE}))
    return specs
