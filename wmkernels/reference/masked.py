"""Reference masked video modeling ops (plain PyTorch + einops): the specification of every backend.

Tokens are tubelets in (t, h, w) row-major order; a patch's values are ordered `(pt ph pw) c`
(channel innermost), as VideoMAE's `rearrange(..., 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)')`.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

from . import acc_dtype  # re-exported: ref.acc_dtype in the backends

_TOKENS = "b (t h w) (pt ph pw c)"
_VIDEO = {"BCTHW": "b c (t pt) (h ph) (w pw)", "BTCHW": "b (t pt) c (h ph) (w pw)"}


def channel_dim(layout: str) -> int:
    return 1 if layout == "BCTHW" else 2


def patchify(video: torch.Tensor, tubelet, layout: str) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) tokens of a video; one copy."""
    pt, ph, pw = tubelet
    return rearrange(video, f"{_VIDEO[layout]} -> {_TOKENS}", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid, tubelet, layout: str) -> torch.Tensor:
    """The inverse of `patchify`: a (B, C, T, H, W) or (B, T, C, H, W) video from (B, N, P) tokens."""
    (t, h, w), (pt, ph, pw) = grid, tubelet
    return rearrange(tokens, f"{_TOKENS} -> {_VIDEO[layout]}", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def _grid(video_shape, tubelet, layout):
    c = channel_dim(layout)
    t = video_shape[2] if c == 1 else video_shape[1]
    return t // tubelet[0], video_shape[3] // tubelet[1], video_shape[4] // tubelet[2]


def _tiled(v: torch.Tensor | None, p: int) -> torch.Tensor | None:
    """A per-channel vector repeated over a patch's values (channel innermost)."""
    return None if v is None else v.repeat(p // v.numel())


def _rows(video, index, tubelet, layout, acc):
    """The patches the loss or gather reads, in `acc`: the `ids` rows, or all rows for a mask."""
    x = patchify(video, tubelet, layout)
    if index.dtype == torch.int64:
        x = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
    return x.to(acc)


def gather_patches(video, ids, tubelet, layout, mean, std, out_dtype) -> torch.Tensor:
    """(B, K, P): the patches `ids` of `video`, normalized `(x - mean[c]) / std[c]` when given."""
    if mean is None and std is None and video.dtype == out_dtype:
        x = patchify(video, tubelet, layout)
        return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))
    x = _rows(video, ids, tubelet, layout, acc_dtype(out_dtype, video.dtype))
    p = x.shape[-1]
    if mean is not None:
        x = x - _tiled(mean, p).to(x.dtype)
    if std is not None:
        x = x / _tiled(std, p).to(x.dtype)
    return x.to(out_dtype)


def _scatter_rows(g, index, video_shape, tubelet, layout):
    """The video-shaped sum of row gradients `g` (B, R, P) put back at their tokens."""
    grid = _grid(video_shape, tubelet, layout)
    if index.dtype == torch.int64:
        full = g.new_zeros(g.shape[0], math.prod(grid), g.shape[-1])
        full.scatter_add_(1, index[..., None].expand(-1, -1, g.shape[-1]), g)
        g = full
    return unpatchify(g, grid, tubelet, layout)


def gather_patches_backward(grad, ids, video_shape, video_dtype, tubelet, layout, std) -> torch.Tensor:
    """d loss / d video: the patch gradients (divided by std) added back at their tokens."""
    g = grad.to(acc_dtype(grad.dtype, video_dtype))
    if std is not None:
        g = g / _tiled(std, g.shape[-1]).to(g.dtype)
    return _scatter_rows(g, ids, video_shape, tubelet, layout).to(video_dtype).contiguous()


def _normalize(x, norm_pix: bool, norm_mode: str, eps: float, channels: int):
    """Per-patch normalized targets and what their backward needs: (y, inv_scale, sigma)."""
    if not norm_pix:
        return x, None, None
    # statistics of the values shifted by each group's first one: a flat group is exactly 0 (its
    # rounded mean would leave noise that eps = 1e-6 on sigma scales to targets of 0.3)
    if norm_mode == "mae":
        x = x - x[..., :1]
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=True, keepdim=True)
        inv = torch.rsqrt(var + eps)
        return (x - mu) * inv, inv, None
    xc = x.unflatten(-1, (-1, channels))  # (..., pt ph pw, c): statistics over each channel's values
    xc = xc - xc[..., :1, :]
    mu = xc.mean(-2, keepdim=True)
    sigma = xc.std(-2, unbiased=True, keepdim=True)
    inv = 1.0 / (sigma + eps)
    return ((xc - mu) * inv).flatten(-2), inv, sigma


def _normalize_backward(gy, y, norm_mode, inv, sigma, channels):
    """d loss / d x of the per-patch normalization, given d loss / d y."""
    if inv is None:
        return gy
    if norm_mode == "mae":
        n = gy.shape[-1]
        dot = (gy * y).sum(-1, keepdim=True)
        return (gy - gy.mean(-1, keepdim=True) - y * dot / (n - 1)) * inv
    gyc, yc = gy.unflatten(-1, (-1, channels)), y.unflatten(-1, (-1, channels))
    n = gyc.shape[-2]
    dot = (gyc * yc).sum(-2, keepdim=True)
    # a constant group (sigma = 0) takes the std's gradient there as 0, as torch.std's autograd does
    k = torch.where(sigma > 0, dot / (sigma * (n - 1)), 0.0)
    gx = (gyc - gyc.mean(-2, keepdim=True)) * inv - yc * k
    return gx.flatten(-2)


def _targets(video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, acc):
    x = _rows(video, index, tubelet, layout, acc)
    p = x.shape[-1]
    if mean is not None:
        x = x - _tiled(mean, p).to(acc)
    if std is not None:
        x = x / _tiled(std, p).to(acc)
    channels = video.shape[channel_dim(layout)]
    return _normalize(x, norm_pix, norm_mode, eps, channels)


def _row_keep(index, acc):
    """The rows the loss reads and its denominator: all rows and B*K for ids, the mask and its count
    for a mask."""
    if index.dtype == torch.int64:
        return None, float(index.numel())
    return index, index.sum(dtype=acc)


def _masked_only(t, keep):
    """`t` with the unmasked rows zeroed by selection, not multiplication: a NaN or inf in a patch
    the loss does not read (pred or video) must not leak into the loss or gradients (0 * NaN = NaN),
    as in the ids form and the compiled kernels."""
    if keep is None:
        return t
    return torch.where(keep.view(keep.shape + (1,) * (t.dim() - keep.dim())), t, 0.0)


def masked_mse_forward_with_grad(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std,
                                 out_dtype, need_grad: bool = True):
    """(loss, d loss / d pred at grad_output = 1, or None)."""
    acc = acc_dtype(pred.dtype, video.dtype)
    y, _, _ = _targets(video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, acc)
    d = pred.to(acc) - y
    per_row = (d * d).mean(-1)
    keep, denom = _row_keep(index, acc)
    loss = (_masked_only(per_row, keep).sum() / denom).to(out_dtype)
    if not need_grad:
        return loss, None
    g = _masked_only(d, keep) * (2.0 / (d.shape[-1] * denom))
    return loss, g.to(pred.dtype)


def masked_mse_forward(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, out_dtype):
    """Mean over the masked patches of the mean squared error against their (normalized) targets."""
    return masked_mse_forward_with_grad(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std,
                                        out_dtype, need_grad=False)[0]


def masked_mse_backward(grad_out, pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std,
                        need_pred: bool, need_video: bool):
    """(d pred, d video) at `grad_out`; None for one not needed."""
    acc = acc_dtype(pred.dtype, video.dtype)
    y, inv, sigma = _targets(video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, acc)
    keep, denom = _row_keep(index, acc)
    g = _masked_only(pred.to(acc) - y, keep) * (2.0 * grad_out.to(acc) / (y.shape[-1] * denom))
    gp = g.to(pred.dtype) if need_pred else None
    gv = None
    if need_video:
        channels = video.shape[channel_dim(layout)]
        gx = _masked_only(_normalize_backward(-g, y, norm_mode, inv, sigma, channels), keep)
        if std is not None:
            gx = gx / _tiled(std, gx.shape[-1]).to(acc)
        gv = _scatter_rows(gx, index, video.shape, tubelet, layout).to(video.dtype).contiguous()
    return gp, gv


def unshuffle_forward(visible, mask_token, ids_restore, pos_embed, out_dtype) -> torch.Tensor:
    """MAE's decoder input: cat(visible, mask tokens) gathered by `ids_restore`, plus `pos_embed`."""
    b, k, d = visible.shape
    n = ids_restore.shape[1]
    tokens = mask_token.to(out_dtype).reshape(1, 1, d).expand(b, n - k, d)
    x = torch.cat([visible.to(out_dtype), tokens], dim=1)
    x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, d))
    if pos_embed is not None:
        x = x + pos_embed.to(out_dtype)
    return x


def unshuffle_backward(grad, ids_restore, num_visible: int, visible_dtype, token_dtype, pos_shape, pos_dtype,
                       need_visible: bool, need_token: bool, need_pos: bool):
    """(d visible, d mask_token, d pos_embed): each output row's gradient goes back to the visible
    token or the mask token it came from; the mask token and a broadcast pos_embed sum theirs."""
    acc = acc_dtype(grad.dtype)
    shuffled = torch.empty_like(grad).scatter_(1, ids_restore[..., None].expand(-1, -1, grad.shape[-1]), grad)
    gv = shuffled[:, :num_visible].to(visible_dtype).contiguous() if need_visible else None
    gt = shuffled[:, num_visible:].sum((0, 1), dtype=acc).to(token_dtype) if need_token else None
    gp = pos_embed_grad(grad, pos_shape, pos_dtype) if need_pos else None
    return gv, gt, gp


def pos_embed_grad(grad, pos_shape, pos_dtype) -> torch.Tensor:
    """d pos_embed: `grad` summed over the dims pos_embed was broadcast along, accumulated in fp32
    (fp64 for fp64) by the reduction itself, not through an fp32 copy of the whole bf16 gradient."""
    acc = acc_dtype(grad.dtype)
    lead = grad.dim() - len(pos_shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(pos_shape) if n == 1 and grad.shape[lead + i] != 1]
    out = grad.sum(dims, dtype=acc) if dims else grad.to(acc)
    return out.reshape(pos_shape).to(pos_dtype, copy=True)
