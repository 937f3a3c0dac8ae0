"""Triton contrastive-loss kernels: logits tiles on the tensor cores, online logsumexp, recomputing backward.

Operands: bf16 / fp16 inputs are normalized in fp32 and rounded once to their own dtype (what the
eager formula's F.normalize gives); every product then runs on the tensor cores with fp32
accumulation, and the label / smoothing terms use the same rounded rows, so the result is the fp32
loss of those rows. fp32 and fp64 inputs run exact IEEE products on small tiles (not on the tensor
cores: TF32 would lose fp32 accuracy, and three-pass TF32 spilled registers at every tile tried).

Forward (`_lse_kernel`): one program per block of rows keeps its rows on chip and streams the
column rows, writing logsumexp, max and first argmax per row (launched once per direction).
Backward (`_grad_kernel`): the same sweep forms G = g_row P + g_col Q per tile and accumulates
G @ y for its rows; launched for d a (rows a) and d b (rows b). Nothing B x B is stored: extra
memory is the prepared rows and O(B) statistics. Full column tiles run without masks; the last,
partial one is masked.

Tile shapes: at large B on a GPU each kernel times a few candidate configs once per (kernel, padded
D, dtype, size class) and keeps the fastest (`_pick`; like triton.autotune, that first call waits for
the GPU: warm up before capturing CUDA graphs, or set WMKERNELS_TUNE=0 for the default configs);
small problems and the interpreter use the first candidate. Row results do not depend on BLOCK_M; BLOCK_N changes the order of the online
logsumexp updates, so two configs agree to rounding, not bit for bit.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import contrastive as ref

_TUNE_MIN_ROWS = 8192  # below this the first candidate config is used, untimed
_picked: dict[tuple, tuple] = {}


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
def _tile_logits(x, y_ptr, cols, dd, N, D, s, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(y rows `cols`, scale * x @ y.T) for one column tile; -inf in columns >= N when MASK_N."""
    ptrs = y_ptr + cols[:, None] * D + dd[None, :]
    if MASK_N:
        if EVEN_D:
            y = tl.load(ptrs, mask=(cols < N)[:, None], other=0.0)
        else:
            y = tl.load(ptrs, mask=(cols < N)[:, None] & (dd < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            y = tl.load(ptrs)
        else:
            y = tl.load(ptrs, mask=(dd < D)[None, :], other=0.0)
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
    l = l * tl.exp(m - new_m) + tl.sum(tl.exp(logits - new_m[:, None]), axis=1)
    return new_m, l, arg


@triton.jit
def _lse_step(x, x_ptr, rows, y_ptr, j0, dd, M, N, D, s, m, l, arg, MASK_N: tl.constexpr, RESIDENT: tl.constexpr,
              EVEN_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """One column tile of the forward sweep: its logits (x resident or streamed) into (m, l, arg)."""
    cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    if RESIDENT:
        _, logits = _tile_logits(x, y_ptr, cols, dd, N, D, s, MASK_N, EVEN_D, ACC, PREC, UPCAST)
    else:
        logits = _chunked_logits(x_ptr, rows, y_ptr, cols, M, N, D, s, MASK_N, EVEN_D, ACC, PREC, UPCAST,
                                 BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    return _lse_update(logits, j0, m, l, arg)


@triton.jit
def _lse_kernel(
    x_ptr, y_ptr, scale_ptr, lse_ptr, max_ptr, arg_ptr, M, N, D,
    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per row i of x: logsumexp_j, max_j and first argmax_j of scale * x_i . y_j."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    RESIDENT: tl.constexpr = BLOCK_K == BLOCK_D
    x = _load_rows(x_ptr, rows, dd, M, D, EVEN_D) if RESIDENT else 0.0  # else streamed per tile
    s = tl.load(scale_ptr).to(ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l = tl.zeros([BLOCK_M], ACC)
    arg = tl.zeros([BLOCK_M], tl.int64)
    n_full = (N // BLOCK_N) * BLOCK_N
    for j0 in range(0, n_full, BLOCK_N):
        m, l, arg = _lse_step(x, x_ptr, rows, y_ptr, j0, dd, M, N, D, s, m, l, arg, False, RESIDENT, EVEN_D, ACC,
                              PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    if n_full < N:
        m, l, arg = _lse_step(x, x_ptr, rows, y_ptr, n_full, dd, M, N, D, s, m, l, arg, True, RESIDENT, EVEN_D, ACC,
                              PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
    rmask = rows < M
    tl.store(lse_ptr + rows, m + tl.log(l), mask=rmask)
    tl.store(max_ptr + rows, m, mask=rmask)
    tl.store(arg_ptr + rows, arg, mask=rmask)


@triton.jit
def _grad_tile(acc, y, logits, lse_x, g_x, lse_y_ptr, g_y_ptr, cols, N,
               ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, MASK_N: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    g = tl.zeros_like(logits)
    if ROW_TERM:
        g += g_x[:, None] * tl.exp(logits - lse_x[:, None])
    if COL_TERM:
        if MASK_N:
            lse_y = tl.load(lse_y_ptr + cols, mask=cols < N, other=0.0)
            g_y = tl.load(g_y_ptr + cols, mask=cols < N, other=0.0)
        else:
            lse_y = tl.load(lse_y_ptr + cols)
            g_y = tl.load(g_y_ptr + cols)
        g += g_y[None, :] * tl.exp(logits - lse_y[None, :])
    if MASK_N:
        g = tl.where((cols < N)[None, :], g, 0.0)
    return acc + _mma(g.to(y.dtype), y, ACC, PREC, UPCAST)


@triton.jit
def _grad_kernel(
    x_ptr, y_ptr, scale_ptr, lse_x_ptr, g_x_ptr, lse_y_ptr, g_y_ptr, out_ptr, M, N, D,
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = sum_j G_ij y_j with G_ij = g_x[i] exp(L_ij - lse_x[i]) (ROW_TERM)
    + g_y[j] exp(L_ij - lse_y[j]) (COL_TERM), L = scale * x @ y.T recomputed per tile; fp32 out."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    dd = tl.arange(0, BLOCK_D).to(tl.int64)
    rmask = rows < M
    x = _load_rows(x_ptr, rows, dd, M, D, EVEN_D)
    s = tl.load(scale_ptr).to(ACC)
    lse_x = tl.zeros([BLOCK_M], ACC)
    g_x = tl.zeros([BLOCK_M], ACC)
    if ROW_TERM:
        lse_x = tl.load(lse_x_ptr + rows, mask=rmask, other=0.0)
        g_x = tl.load(g_x_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    n_full = (N // BLOCK_N) * BLOCK_N
    for j0 in range(0, n_full, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        y, logits = _tile_logits(x, y_ptr, cols, dd, N, D, s, False, EVEN_D, ACC, PREC, UPCAST)
        acc = _grad_tile(acc, y, logits, lse_x, g_x, lse_y_ptr, g_y_ptr, cols, N, ROW_TERM, COL_TERM, False, ACC, PREC, UPCAST)
    if n_full < N:
        cols = n_full + tl.arange(0, BLOCK_N).to(tl.int64)
        y, logits = _tile_logits(x, y_ptr, cols, dd, N, D, s, True, EVEN_D, ACC, PREC, UPCAST)
        acc = _grad_tile(acc, y, logits, lse_x, g_x, lse_y_ptr, g_y_ptr, cols, N, ROW_TERM, COL_TERM, True, ACC, PREC, UPCAST)
    ptrs = out_ptr + rows[:, None] * D + dd[None, :]
    if EVEN_D:
        tl.store(ptrs, acc, mask=rmask[:, None])
    else:
        tl.store(ptrs, acc, mask=rmask[:, None] & (dd < D)[None, :])


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
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) to try for `kind` ("lse" / "grad"), padded
    width `bd` and operand dtype; the first is the default. Each compiles for sm_90 without register
    spills (tests/tools/aot_compile_triton.py), except at bd = 512 (a few hundred bytes at most).
    BLOCK_K < bd (forward only) streams the rows' features in chunks instead of keeping them resident.

    fp32 and fp64 run IEEE products (not on the tensor cores) on 16 x 16 tiles; they spill registers
    at bd >= 128 (a few bytes there, up to a few KB at bd = 512: the resident rows and, backward,
    a 16 x bd accumulator per program)."""
    if op in (torch.float32, torch.float64):
        # IEEE products: register-hungry, so small tiles. The forward and the backward form each
        # logit the same way (same column tile, features resident), so the backward's recomputed
        # logits equal the forward's bit for bit and softmax rows cancel exactly against labels.
        return [(16, 16, bd, 4, 2)] if kind == "lse" else [(16, 16, bd, 8, 2)]
    if kind == "lse":
        table = {64: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3)],
                 128: [(128, 128, 128, 8, 3), (128, 64, 128, 8, 3), (64, 128, 128, 4, 3)],
                 256: [(128, 64, 256, 8, 2), (128, 128, 256, 8, 2), (64, 64, 256, 4, 3)],
                 512: [(64, 64, 128, 4, 3), (128, 32, 512, 8, 2), (64, 32, 512, 4, 3)],  # spills <= 64 B
                 }.get(max(64, bd), [(64, 64, 128, 4, 3)])
    else:
        table = {64: [(128, 64, 64, 8, 2), (64, 64, 64, 4, 3), (128, 32, 64, 8, 2)],
                 128: [(64, 64, 128, 4, 3), (64, 64, 128, 8, 2), (64, 32, 128, 4, 3)],
                 256: [(64, 32, 256, 4, 2), (128, 32, 256, 8, 2)],
                 512: [(64, 16, 512, 8, 2), (64, 32, 512, 8, 2)],  # 64 x 512 fp32 accumulator: spills <= 188 B
                 }.get(max(64, bd), [(32, 16, bd, 8, 1)])
    return [(bm, bn, min(bk, bd), warps, stages) for bm, bn, bk, warps, stages in table]  # BLOCK_K <= padded D


def _launch(kind: str, kernel, m: int, bd: int, op: torch.dtype, device: torch.device, args: tuple, cx: dict):
    cands = candidates(kind, bd, op)
    key = (kind, bd, op, tuple(sorted(cx.items())), m.bit_length())
    if device.type != "cuda" or m < _TUNE_MIN_ROWS or len(cands) == 1 or os.environ.get("WMKERNELS_TUNE") == "0":
        chosen = cands[0]
    elif key in _picked:
        chosen = _picked[key]
    else:
        chosen = _pick(kind, kernel, cands, m, args, cx)
        _picked[key] = chosen
    kernel[(triton.cdiv(m, chosen[0]),)](*args, **cx, **_meta(kind, chosen))


def _meta(kind: str, cand: tuple) -> dict:
    bm, bn, bk, warps, stages = cand
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    if kind == "lse":
        meta["BLOCK_K"] = bk
    return meta


def _pick(kind, kernel, cands, m, args, cx):
    """Times each candidate once after a compile-and-warm-up launch; the fastest wins. A config
    that does not compile for this device (out of shared memory or registers) is skipped."""
    times = {}
    for cand in cands:
        launch = lambda: kernel[(triton.cdiv(m, cand[0]),)](*args, **cx, **_meta(kind, cand))  # noqa: E731
        try:
            launch()
        except Exception:  # triton's OutOfResources and friends differ across versions
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        times[cand] = start.elapsed_time(end)
    if not times:
        raise RuntimeError(f"no Triton config of {kernel} compiled for this device: {cands}")
    return min(times, key=times.get)


# --- host side -----------------------------------------------------------------------------------

def _lse(x, y, scale, acc):
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    bd = block_d(d)
    lse, mx = torch.empty(m, dtype=acc, device=x.device), torch.empty(m, dtype=acc, device=x.device)
    arg = torch.empty(m, dtype=torch.int64, device=x.device)
    cx = dict(ACC=_tl_acc(acc), PREC=_precision(x.dtype), UPCAST=_upcast(x.dtype), EVEN_D=d == bd, BLOCK_D=bd)
    _launch("lse", _lse_kernel, m, bd, x.dtype, x.device, (x, y, scale, lse, mx, arg, m, n, d), cx)
    return lse, mx, arg


def _grad(x, y, scale, lse_x, g_x, lse_y, g_y, row_term: bool, col_term: bool, acc):
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    bd = block_d(d)
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    cx = dict(ROW_TERM=row_term, COL_TERM=col_term, ACC=_tl_acc(acc), PREC=_precision(x.dtype),
              UPCAST=_upcast(x.dtype), EVEN_D=d == bd, BLOCK_D=bd)
    _launch("grad", _grad_kernel, m, bd, x.dtype, x.device, (x, y, scale, lse_x, g_x, lse_y, g_y, out, m, n, d), cx)
    return out


def _prepare(z1, z2, normalize):
    """(a, b) in the accumulation dtype for the O(B D) terms and (ka, kb) in the dtype the kernels
    read; for half inputs a, b are ka, kb widened, so every term sees the same rows."""
    acc, op = ref.acc_dtype(z1, z2), _operand_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    if op == acc:
        return acc, a, b, a, b
    ka, kb = a.to(op), b.to(op)
    return acc, ka.to(acc), kb.to(acc), ka, kb


def contrastive_forward(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric):
    acc, a, b, ka, kb = _prepare(z1, z2, normalize)
    scale = scale.to(acc).contiguous()
    core = _lse(ka, kb, scale, acc) + (_lse(kb, ka, scale, acc) if symmetric else (None, None, None))
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
    ga = _grad(ka, kb, scale, lse_row, g_row, lse_c, g_c, True, symmetric, acc)
    gb = _grad(kb, ka, scale, lse_c, g_c, lse_row, g_row, symmetric, True, acc)
    del ka, kb  # for half inputs a separate copy, no longer needed: the finishing terms read a, b
    return ref.finish_backward(
        z1, z2, a, b, scale, labels_row, labels_col, g_row, g_col, pos_weight, smooth_row, smooth_col,
        normalize, symmetric, ga, gb,
    )


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs, options, checks) the host code can launch: every tuning
    candidate in bf16 (sm_90), the default config of every dtype and padded width (sm_80 and sm_90).
    `checks` names the targets and the register spill bytes tolerated (the 64 x 512 accumulators)."""
    specs = []
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    dims = {"M": "i64", "N": "i64", "D": "i64"}
    for op, name in names.items():
        acc = torch.float64 if op == torch.float64 else torch.float32
        aname = "fp64" if acc == torch.float64 else "fp32"
        for bd in (64, 128, 256, 512) if op != torch.float64 else (64, 256):
            base = {"ACC": _tl_acc(acc), "PREC": _precision(op), "UPCAST": False, "EVEN_D": True, "BLOCK_D": bd}
            wide = op in (torch.float32, torch.float64)
            checks = {"max_spill_bytes": 8192 if wide and bd >= 128 else 256 if bd >= 512 else 0}
            for i, (bm, bn, bk, warps, stages) in enumerate(candidates("lse", bd, op)):
                if i and op != torch.bfloat16:
                    break
                cx = {**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
                sig = {"x_ptr": f"*{name}", "y_ptr": f"*{name}", "scale_ptr": f"*{aname}", "lse_ptr": f"*{aname}",
                       "max_ptr": f"*{aname}", "arg_ptr": "*i64", **dims}
                specs.append((_lse_kernel, {**sig, **{k: "constexpr" for k in cx}}, cx,
                              {"num_warps": warps, "num_stages": stages}, {**checks, "archs": (80, 90) if i == 0 else (90,)}))
            for i, (bm, bn, _, warps, stages) in enumerate(candidates("grad", bd, op)):
                if i and op != torch.bfloat16:
                    break
                terms = ((True, False), (True, True), (False, True)) if bd == 64 and i == 0 else ((True, True),)
                for row_term, col_term in terms:
                    cx = {"ROW_TERM": row_term, "COL_TERM": col_term, **base, "BLOCK_M": bm, "BLOCK_N": bn}
                    sig = {"x_ptr": f"*{name}", "y_ptr": f"*{name}",
                           **{p: f"*{aname}" for p in ("scale_ptr", "lse_x_ptr", "g_x_ptr", "lse_y_ptr", "g_y_ptr",
                                                       "out_ptr")}}
                    specs.append((_grad_kernel, {**sig, **dims, **{k: "constexpr" for k in cx}}, cx,
                                  {"num_warps": warps, "num_stages": stages},
                                  {**checks, "archs": (80, 90) if i == 0 else (90,)}))
    return specs
