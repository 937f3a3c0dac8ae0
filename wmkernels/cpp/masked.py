"""Compiled masked video modeling ops (csrc/cpu/masked.cpp, csrc/cuda/masked.cu): same functions as
wmkernels.reference.masked."""
from __future__ import annotations

import torch

from .. import _ext
from ..reference import masked as ref


def _ops():
    return _ext.load()


def gather_patches(video, ids, tubelet, layout, mean, std, out_dtype) -> torch.Tensor:
    return _ops().masked_gather(video, ids, tubelet, layout, mean, std, out_dtype)


def gather_patches_backward(grad, ids, video_shape, video_dtype, tubelet, layout, std) -> torch.Tensor:
    return _ops().masked_gather_bwd(grad, ids, video_shape, video_dtype, tubelet, layout, std)


def masked_mse_forward_with_grad(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, out_dtype):
    """(loss, d loss / d pred at grad_output = 1), both from one pass over the masked patches."""
    return _ops().masked_mse_fwd(pred, video, index, tubelet, layout, norm_pix, norm_mode == "videomae", eps,
                                 mean, std, out_dtype, True)


def masked_mse_forward(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, out_dtype):
    return _ops().masked_mse_fwd(pred, video, index, tubelet, layout, norm_pix, norm_mode == "videomae", eps,
                                 mean, std, out_dtype, False)[0]


def masked_mse_backward(grad_out, pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std,
                        need_pred: bool, need_video: bool):
    gp, gv = _ops().masked_mse_bwd(grad_out, pred, video, index, tubelet, layout, norm_pix,
                                   norm_mode == "videomae", eps, mean, std, need_pred, need_video)
    return (gp if need_pred else None), (gv if need_video else None)


def unshuffle_forward(visible, mask_token, ids_restore, pos_embed, out_dtype) -> torch.Tensor:
    return _ops().masked_unshuffle(visible, mask_token, ids_restore, pos_embed, out_dtype)


def unshuffle_backward(grad, ids_restore, num_visible: int, visible_dtype, token_dtype, pos_shape, pos_dtype,
                       need_visible: bool, need_token: bool, need_pos: bool):
    gv, gt = _ops().masked_unshuffle_bwd(grad, ids_restore, num_visible, visible_dtype, token_dtype,
                                         need_visible, need_token)
    gp = ref.pos_embed_grad(grad, pos_shape, pos_dtype) if need_pos else None  # ATen's reduction: one pass
    return (gv if need_visible else None), (gt if need_token else None), gp
