"""Triton masked video modeling kernels: one program per patch row, the patch read straight from
the strided video.

`_loss_rows_kernel` (forward and backward): reads a masked patch (P values) and its prediction,
normalizes the patch (norm_pix), writes the row's loss, and when asked the prediction gradient and
the video gradient (atomically added into an fp32/fp64 video-shaped buffer). Forward with the
fused gradient: 8 bytes read + 4 written per fp32 element. `_gather_kernel`: reads a patch, writes
a row. `_scatter_kernel`: the gather's backward. `_unshuffle_kernel` / `_unshuffle_bwd_kernel`:
one output row per program, reading one visible row or the mask token (and pos_embed).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference import masked as ref
from ._index import LAUNCH, on_device, round_to

_TL = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8"}
NORM = {"none": 0, "mae": 1, "videomae": 2}


@triton.jit
def _patch_offsets(q, b, n, gh, gw, sb, sc, st, sh, sw, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   NC: tl.constexpr):
    """Element offsets of values q = ((i * PH + j) * PW + k) * NC + c of token n of sample b."""
    c = q % NC
    r = q // NC
    k = r % PW
    r = r // PW
    j = r % PH
    i = r // PH
    tw = n % gw
    th = (n // gw) % gh
    tt = n // (gw * gh)
    origin = b * sb + tt * PT * st + th * PH * sh + tw * PW * sw
    # 64-bit products: an in-patch index times a stride below 2^31 (an int32 argument) can pass 2^31
    return origin + c.to(tl.int64) * sc + i.to(tl.int64) * st + j.to(tl.int64) * sh + k.to(tl.int64) * sw, c


@triton.jit
def _load_x(video_ptr, mean_ptr, std_ptr, q, live, b, n, gh, gw, sb, sc, st, sh, sw, has_affine,
            PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr):
    """Values q of a patch in ACC, `(x - mean[c]) / std[c]` when has_affine; (x, c, 1 / std[c] or 1)."""
    off, c = _patch_offsets(q, b, n, gh, gw, sb, sc, st, sh, sw, PT, PH, PW, NC)
    x = tl.load(video_ptr + off, mask=live, other=0).to(ACC)
    sd = tl.full(x.shape, 1.0, ACC)
    if has_affine != 0:
        sd = tl.load(std_ptr + c, mask=live, other=1.0).to(ACC)
        x = (x - tl.load(mean_ptr + c, mask=live, other=0.0).to(ACC)) / sd
    return x, c, sd


@triton.jit
def _per_value(vec, onehot):
    """vec[group of each value]: a [NCP] per-group vector spread over a chunk's values."""
    return tl.sum(tl.where(onehot, vec[None, :], 0.0), axis=1)


@triton.jit
def _loss_rows_kernel(
    pred_ptr, video_ptr, ids_ptr, mask_ptr, mean_ptr, std_ptr, scale_ptr, row_loss_ptr, gp_ptr, gv_ptr,
    R, gh, gw, sb, sc, st, sh, sw, gsb, gsc, gst, gsh, gsw,
    norm_mode, eps: tl.float64, is_mask, has_affine, write_gp, write_gv,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NC: tl.constexpr, NCP: tl.constexpr,
    CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    """One patch row in passes over CHUNK values at a time (registers stay bounded for any P):
    group sums, group variances, then loss / pred gradient (and the gradient's group sums), then
    the video gradient. The patch is read from global memory once; later passes hit the cache."""
    row = tl.program_id(0).to(tl.int64)
    b = row // R
    P: tl.constexpr = PT * PH * PW * NC
    if is_mask != 0:
        n = row % R
        w = tl.load(mask_ptr + row).to(ACC)
    else:
        n = tl.load(ids_ptr + row)
        w = tl.full((), 1.0, ACC)
    grp = tl.arange(0, NCP)
    mean = tl.zeros([NCP], ACC)
    inv = tl.full([NCP], 1.0, ACC)
    sigma = tl.full([NCP], 1.0, ACC)
    cnt = tl.full([NCP], 2.0, ACC)
    # normalization groups: the whole patch (mae) or each channel (videomae)
    if norm_mode != 0:
        # sums of the values shifted by each group's first value (value q = g for channel g, q = 0
        # for the patch): a flat patch gets its exact value as mean (sum / n rounds, and eps = 1e-6
        # on sigma turns that rounding into targets of 0.3 instead of 0)
        first = tl.where(norm_mode == 2, grp, 0)
        shift = _load_x(video_ptr, mean_ptr, std_ptr, first, (first < P) & ((w + tl.zeros([NCP], ACC)) != 0),
                        b, n, gh, gw, sb, sc, st, sh, sw, has_affine, PT, PH, PW, NC, ACC)[0]
        sums = tl.zeros([NCP], ACC)
        cnt = tl.zeros([NCP], ACC)
        for start in range(0, P, CHUNK):
            q = start + tl.arange(0, CHUNK)
            live = (q < P) & ((w + tl.zeros([CHUNK], ACC)) != 0)
            x, c, _ = _load_x(video_ptr, mean_ptr, std_ptr, q, live, b, n, gh, gw, sb, sc, st, sh, sw,
                              has_affine, PT, PH, PW, NC, ACC)
            gid = tl.where(norm_mode == 2, c, 0)
            onehot = (gid[:, None] == grp[None, :]) & (q < P)[:, None]
            sums += tl.sum(tl.where(onehot, x[:, None] - shift[None, :], 0.0), axis=0)
            cnt += tl.sum(onehot.to(ACC), axis=0)
        mean = shift + sums / tl.maximum(cnt, 1.0)
        ss = tl.zeros([NCP], ACC)
        for start in range(0, P, CHUNK):
            q = start + tl.arange(0, CHUNK)
            live = (q < P) & ((w + tl.zeros([CHUNK], ACC)) != 0)
            x, c, _ = _load_x(video_ptr, mean_ptr, std_ptr, q, live, b, n, gh, gw, sb, sc, st, sh, sw,
                              has_affine, PT, PH, PW, NC, ACC)
            gid = tl.where(norm_mode == 2, c, 0)
            onehot = (gid[:, None] == grp[None, :]) & (q < P)[:, None]
            dev = tl.where(onehot, x[:, None] - mean[None, :], 0.0)
            ss += tl.sum(dev * dev, axis=0)
        var = ss / tl.maximum(cnt - 1.0, 1.0)
        sig = tl.sqrt(var)
        sigma = tl.where(sig > 0, sig, 1.0)
        e = tl.full((), eps, ACC)  # passed as fp64: an fp32 argument would round it for fp64 inputs
        inv = tl.where(norm_mode == 2, 1.0 / (sig + e), 1.0 / tl.sqrt(var + e))
    scale = tl.load(scale_ptr).to(ACC) * w
    total = tl.zeros([CHUNK], ACC)
    sg = tl.zeros([NCP], ACC)
    dot = tl.zeros([NCP], ACC)
    for start in range(0, P, CHUNK):
        q = start + tl.arange(0, CHUNK)
        valid = q < P
        live = valid & ((w + tl.zeros([CHUNK], ACC)) != 0)
        x, c, _ = _load_x(video_ptr, mean_ptr, std_ptr, q, live, b, n, gh, gw, sb, sc, st, sh, sw,
                          has_affine, PT, PH, PW, NC, ACC)
        gid = tl.where(norm_mode == 2, c, 0)
        onehot = gid[:, None] == grp[None, :]
        y = (x - _per_value(mean, onehot)) * _per_value(inv, onehot)
        p = tl.load(pred_ptr + row * P + q, mask=live, other=0).to(ACC)
        d = tl.where(live, p - y, 0.0)
        total += d * d
        if write_gp != 0:
            tl.store(gp_ptr + row * P + q, round_to(scale * d, gp_ptr.dtype.element_ty), mask=valid)
        if write_gv != 0:
            gy = -scale * d
            sg += tl.sum(tl.where(onehot, gy[:, None], 0.0), axis=0)
            dot += tl.sum(tl.where(onehot, (gy * y)[:, None], 0.0), axis=0)
    tl.store(row_loss_ptr + row, w * tl.sum(total, axis=0) / P)
    if write_gv != 0:
        mg = sg / tl.maximum(cnt, 1.0)
        for start in range(0, P, CHUNK):
            q = start + tl.arange(0, CHUNK)
            live = (q < P) & ((w + tl.zeros([CHUNK], ACC)) != 0)
            x, c, sd = _load_x(video_ptr, mean_ptr, std_ptr, q, live, b, n, gh, gw, sb, sc, st, sh, sw,
                               has_affine, PT, PH, PW, NC, ACC)
            gid = tl.where(norm_mode == 2, c, 0)
            onehot = gid[:, None] == grp[None, :]
            iv = _per_value(inv, onehot)
            y = (x - _per_value(mean, onehot)) * iv
            p = tl.load(pred_ptr + row * P + q, mask=live, other=0).to(ACC)
            gy = -scale * tl.where(live, p - y, 0.0)
            gx = gy
            if norm_mode != 0:
                m1 = _per_value(cnt, onehot) - 1.0
                k_dot = _per_value(dot, onehot)
                gx_mae = (gy - _per_value(mg, onehot) - y * k_dot / m1) * iv
                gx_vmae = (gy - _per_value(mg, onehot)) * iv - y * k_dot / (_per_value(sigma, onehot) * m1)
                gx = tl.where(norm_mode == 2, gx_vmae, gx_mae)
            gx = gx / sd
            goff, _ = _patch_offsets(q, b, n, gh, gw, gsb, gsc, gst, gsh, gsw, PT, PH, PW, NC)
            tl.atomic_add(gv_ptr + goff, gx.to(gv_ptr.dtype.element_ty), mask=live)


@triton.jit
def _gather_kernel(
    video_ptr, ids_ptr, mean_ptr, std_ptr, out_ptr, K, gh, gw, sb, sc, st, sh, sw, has_affine,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NC: tl.constexpr, CHUNK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    P: tl.constexpr = PT * PH * PW * NC
    n = tl.load(ids_ptr + row)
    for start in range(0, P, CHUNK):
        q = start + tl.arange(0, CHUNK)
        valid = q < P
        x, _, _ = _load_x(video_ptr, mean_ptr, std_ptr, q, valid, row // K, n, gh, gw, sb, sc, st, sh, sw,
                          has_affine, PT, PH, PW, NC, ACC)
        tl.store(out_ptr + row * P + q, round_to(x, out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _scatter_kernel(
    grad_ptr, ids_ptr, std_ptr, gv_ptr, K, gh, gw, gsb, gsc, gst, gsh, gsw, has_affine,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NC: tl.constexpr, CHUNK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    P: tl.constexpr = PT * PH * PW * NC
    n = tl.load(ids_ptr + row)
    for start in range(0, P, CHUNK):
        q = start + tl.arange(0, CHUNK)
        valid = q < P
        off, c = _patch_offsets(q, row // K, n, gh, gw, gsb, gsc, gst, gsh, gsw, PT, PH, PW, NC)
        g = tl.load(grad_ptr + row * P + q, mask=valid, other=0).to(ACC)
        if has_affine != 0:
            g = g / tl.load(std_ptr + c, mask=valid, other=1.0).to(ACC)
        tl.atomic_add(gv_ptr + off, g.to(gv_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _unshuffle_kernel(
    vis_ptr, tok_ptr, ids_ptr, pos_ptr, out_ptr, K, N, D, psb, psn, psd, has_pos,
    ADD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    d = d0 + tl.arange(0, BLOCK_D)
    dm = d < D
    r = tl.load(ids_ptr + row) + tl.zeros([BLOCK_D], tl.int64)  # a block: masks combine blockwise
    v = tl.load(vis_ptr + (b * K + r) * D + d, mask=dm & (r < K), other=0)
    t = tl.load(tok_ptr + d, mask=dm & (r >= K), other=0)
    x = tl.where(r < K, v, t)
    if has_pos != 0:
        pe = tl.load(pos_ptr + b * psb + n * psn + d * psd, mask=dm, other=0)
        x = round_to(x.to(ADD) + pe.to(ADD), out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * D + d, x, mask=dm)


@triton.jit
def _unshuffle_bwd_kernel(grad_ptr, ids_ptr, gv_ptr, K, N, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    r = tl.load(ids_ptr + row) + tl.zeros([BLOCK_D], tl.int64)
    g = tl.load(grad_ptr + row * D + d, mask=dm & (r < K), other=0)
    tl.store(gv_ptr + (b * K + r) * D + d, g, mask=dm & (r < K))


# ------------------------------------------------------------------------------------------ launchers


def _acc(*dtypes) -> torch.dtype:
    return ref.acc_dtype(*dtypes)


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _geom(shape, strides, tubelet, layout):
    """(C, gh, gw, strides of b, c, t, h, w) of a video."""
    cd = ref.channel_dim(layout)
    td = 2 if cd == 1 else 1
    return shape[cd], shape[3] // tubelet[1], shape[4] // tubelet[2], (
        strides[0], strides[cd], strides[td], strides[3], strides[4])


def _affine(mean, std, channels, acc, device):
    """(mean, std, has_affine): a missing one of the two is the identity."""
    if mean is None and std is None:
        dummy = torch.empty(1, dtype=acc, device=device)  # never read; empty: no fill launch
        return dummy, dummy, 0
    mean = mean if mean is not None else torch.zeros(channels, dtype=acc, device=device)
    std = std if std is not None else torch.ones(channels, dtype=acc, device=device)
    return mean, std, 1


def _chunk(p: int, acc: torch.dtype) -> int:
    """Values per pass: fp64 keeps half as many live in registers (at most 12 bytes of spills at 4 warps)."""
    return min(triton.next_power_of_2(p), 256 if acc == torch.float64 else 512)


def gather_patches(video, ids, tubelet, layout, mean, std, out_dtype) -> torch.Tensor:
    c, gh, gw, vs = _geom(video.shape, video.stride(), tubelet, layout)
    b, k = ids.shape
    p = math.prod(tubelet) * c
    acc = _acc(out_dtype, video.dtype)
    mean, std, aff = _affine(mean, std, c, acc, video.device)
    out = torch.empty((b, k, p), dtype=out_dtype, device=video.device)
    if b * k:
        with on_device(video):
            _gather_kernel[(b * k,)](
                video, ids.contiguous(), mean, std, out, k, gh, gw, *vs, aff,
                PT=tubelet[0], PH=tubelet[1], PW=tubelet[2], NC=c, CHUNK=_chunk(p, acc), ACC=_tl_acc(acc), **LAUNCH,
            )
    return out


def gather_patches_backward(grad, ids, video_shape, video_dtype, tubelet, layout, std) -> torch.Tensor:
    acc = _acc(grad.dtype, video_dtype)
    gv = torch.zeros(video_shape, dtype=acc, device=grad.device)
    c, gh, gw, gs = _geom(gv.shape, gv.stride(), tubelet, layout)
    b, k, p = grad.shape
    _, std, aff = _affine(None, std, c, acc, grad.device)
    if b * k:
        with on_device(grad):
            _scatter_kernel[(b * k,)](
                grad.contiguous(), ids.contiguous(), std, gv, k, gh, gw, *gs, aff,
                PT=tubelet[0], PH=tubelet[1], PW=tubelet[2], NC=c, CHUNK=_chunk(p, acc), ACC=_tl_acc(acc), **LAUNCH,
            )
    return gv.to(video_dtype)


def _loss_rows(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, grad_out,
               write_gp: bool, write_gv: bool):
    """(loss sum / denom as a device scalar in acc, d pred or None, d video or None); grad_out None
    stands for 1. Every small op here is a GPU launch, so a count known on the host stays a number."""
    acc = _acc(pred.dtype, video.dtype)
    c, gh, gw, vs = _geom(video.shape, video.stride(), tubelet, layout)
    b, r, p = pred.shape
    is_mask = index.dtype == torch.bool
    denom = index.sum(dtype=acc) if is_mask else float(index.numel())
    if is_mask:
        scale = (2.0 / p) / denom if grad_out is None else grad_out.to(acc) * (2.0 / p) / denom
    elif grad_out is None:
        scale = torch.full((), 2.0 / (p * denom), dtype=acc, device=pred.device)
    else:
        scale = grad_out.to(acc) * (2.0 / (p * denom))
    mean, std, aff = _affine(mean, std, c, acc, video.device)
    row_loss = torch.empty(b * r, dtype=acc, device=pred.device)
    pred = pred.contiguous()
    # pointers a launch does not use get placeholders of the dtype the kernel is compiled for
    gp = torch.empty_like(pred) if write_gp else pred
    gv = torch.zeros(video.shape, dtype=acc, device=video.device) if write_gv else row_loss
    gs = _geom(gv.shape, gv.stride(), tubelet, layout)[3] if write_gv else (0,) * 5
    idx = index.contiguous()
    ids = idx if not is_mask else torch.empty(1, dtype=torch.int64, device=pred.device)  # never read
    mask = idx if is_mask else torch.empty(1, dtype=torch.bool, device=pred.device)
    if b * r:
        with on_device(pred):
            _loss_rows_kernel[(b * r,)](
                pred, video, ids, mask, mean, std, scale, row_loss, gp, gv,
                r, gh, gw, *vs, *gs,
                NORM[norm_mode] if norm_pix else 0, float(eps), int(is_mask), aff, int(write_gp), int(write_gv),
                PT=tubelet[0], PH=tubelet[1], PW=tubelet[2], NC=c, NCP=triton.next_power_of_2(c), CHUNK=_chunk(p, acc),
                ACC=_tl_acc(acc), **LAUNCH,
            )
    loss = row_loss.sum() / denom
    return loss, (gp if write_gp else None), (gv.to(video.dtype) if write_gv else None)


def masked_mse_forward_with_grad(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std,
                                 out_dtype):
    loss, gp, _ = _loss_rows(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, None,
                             True, False)
    return loss.to(out_dtype), gp


def masked_mse_forward(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, out_dtype):
    loss, _, _ = _loss_rows(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, None,
                            False, False)
    return loss.to(out_dtype)


def masked_mse_backward(grad_out, pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std,
                        need_pred: bool, need_video: bool):
    _, gp, gv = _loss_rows(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, grad_out,
                           need_pred, need_video)
    return gp, gv


def _add_dtype(out_dtype):
    return tl.float64 if out_dtype == torch.float64 else tl.float32


BLOCK_D = 256


def unshuffle_forward(visible, mask_token, ids_restore, pos_embed, out_dtype) -> torch.Tensor:
    vis = visible.to(out_dtype).contiguous()
    tok = mask_token.to(out_dtype).reshape(-1).contiguous()
    b, k, d = vis.shape
    n = ids_restore.shape[1]
    out = torch.empty((b, n, d), dtype=out_dtype, device=vis.device)
    pos = pos_embed.to(out_dtype).expand(b, n, d) if pos_embed is not None else vis
    ps = pos.stride() if pos_embed is not None else (0, 0, 0)
    if b * n:
        with on_device(vis):
            _unshuffle_kernel[(b * n, triton.cdiv(d, BLOCK_D))](
                vis, tok, ids_restore.contiguous(), pos, out, k, n, d, *ps, int(pos_embed is not None),
                ADD=_add_dtype(out_dtype), BLOCK_D=BLOCK_D, **LAUNCH,
            )
    return out


def unshuffle_backward(grad, ids_restore, num_visible: int, visible_dtype, token_dtype, pos_shape, pos_dtype,
                       need_visible: bool, need_token: bool, need_pos: bool):
    b, n, d = grad.shape
    acc = _acc(grad.dtype)
    gv = gt = gp = None
    if need_visible:
        gv = torch.empty((b, num_visible, d), dtype=grad.dtype, device=grad.device)
        if b * n:
            with on_device(grad):
                _unshuffle_bwd_kernel[(b * n, triton.cdiv(d, BLOCK_D))](
                    grad, ids_restore.contiguous(), gv, num_visible, n, d, BLOCK_D=BLOCK_D, **LAUNCH,
                )
        gv = gv.to(visible_dtype)
    if need_token:  # a reduction over the mask-token rows: one masked sum
        is_token = (ids_restore >= num_visible).unsqueeze(-1)
        gt = torch.where(is_token, grad, 0).sum((0, 1), dtype=acc).to(token_dtype)
    if need_pos:
        gp = ref.pos_embed_grad(grad, pos_shape, pos_dtype)
    return gv, gt, gp


# ------------------------------------------------------------------------------------------ AOT specs

AOT_TUBELETS = ((2, 16, 16), (1, 16, 16))  # VideoMAE's and MAE's; other tubelets compile on first use
AOT_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
             (torch.float64, torch.float64), (torch.float32, torch.uint8), (torch.bfloat16, torch.uint8)]


def aot_specs() -> list[tuple]:
    """(kernel, signature, constexprs) for every dtype pairing, tubelet (C = 3) and kernel shipped."""
    specs = []
    i64 = "i64"
    geo = {k: i64 for k in ("gh", "gw", "sb", "sc", "st", "sh", "sw")}
    ggeo = {k: i64 for k in ("gsb", "gsc", "gst", "gsh", "gsw")}
    for (pt, ph, pw) in AOT_TUBELETS:
        p = pt * ph * pw * 3
        for pd, vd in AOT_PAIRS:
            acc = _acc(pd, vd)
            tp, tv, ta = _TL[pd], _TL[vd], _TL[acc]
            shape = {"PT": pt, "PH": ph, "PW": pw, "NC": 3, "CHUNK": _chunk(p, acc), "ACC": _tl_acc(acc)}
            cx = {k: "constexpr" for k in shape}
            loss_shape = {**shape, "NCP": 4}
            loss_cx = {k: "constexpr" for k in loss_shape}
            loss_sig = {"pred_ptr": f"*{tp}", "video_ptr": f"*{tv}", "ids_ptr": "*i64", "mask_ptr": "*i1",
                        "mean_ptr": f"*{ta}", "std_ptr": f"*{ta}", "scale_ptr": f"*{ta}", "row_loss_ptr": f"*{ta}",
                        "gp_ptr": f"*{tp}", "gv_ptr": f"*{ta}", "R": i64, **geo, **ggeo,
                        "norm_mode": "i32", "eps": "fp64", "is_mask": "i32", "has_affine": "i32",
                        "write_gp": "i32", "write_gv": "i32", **loss_cx}
            # in the aligned specialization two tubelet / dtype pairs spill a few bytes (12 and 28 on triton 3.9)
            specs.append((_loss_rows_kernel, loss_sig, loss_shape, {}, {"max_spill_bytes": 32}))
            gather_sig = {"video_ptr": f"*{tv}", "ids_ptr": "*i64", "mean_ptr": f"*{ta}", "std_ptr": f"*{ta}",
                          "out_ptr": f"*{tp}", "K": i64, **geo, "has_affine": "i32", **cx}
            specs.append((_gather_kernel, gather_sig, shape))
            if vd != torch.uint8:
                scatter_sig = {"grad_ptr": f"*{tp}", "ids_ptr": "*i64", "std_ptr": f"*{ta}", "gv_ptr": f"*{ta}",
                               "K": i64, "gh": i64, "gw": i64, **ggeo, "has_affine": "i32", **cx}
                specs.append((_scatter_kernel, scatter_sig, shape))
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = _TL[dt]
        add = {"ADD": _add_dtype(dt), "BLOCK_D": BLOCK_D}
        sig = {"vis_ptr": f"*{t}", "tok_ptr": f"*{t}", "ids_ptr": "*i64", "pos_ptr": f"*{t}", "out_ptr": f"*{t}",
               "K": i64, "N": i64, "D": i64, "psb": i64, "psn": i64, "psd": i64, "has_pos": "i32",
               "ADD": "constexpr", "BLOCK_D": "constexpr"}
        specs.append((_unshuffle_kernel, sig, add))
        bsig = {"grad_ptr": f"*{t}", "ids_ptr": "*i64", "gv_ptr": f"*{t}", "K": i64, "N": i64, "D": i64,
                "BLOCK_D": "constexpr"}
        specs.append((_unshuffle_bwd_kernel, bsig, {"BLOCK_D": BLOCK_D}))
    return specs
