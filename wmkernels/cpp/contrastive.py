"""Compiled contrastive loss (csrc/cpu/contrastive.cpp): same functions as wmkernels.reference.contrastive.

The C++ sweep produces everything that depends on the B x B logits tile by tile: logsumexp, max,
argmax and the positive logit per row / column forward; G @ b and G.T @ a with the full
d loss / d logits G (softmax, label and smoothing parts) backward. What is left is O(B D) and done
in place here: the smoothing sum (a matrix-vector product), the scale, and normalization.
"""
from __future__ import annotations

from .. import _ext
from ..reference import contrastive as ref

TILE = 2048  # rows and columns per logits tile: 16 MiB of fp32, the one B x B-derived buffer (smaller
# tiles make the K = D matmuls markedly less efficient)


def contrastive_forward(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric):
    acc = ref.acc_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    lse_r, max_r, arg_r, pos_r, lse_c, max_c, arg_c, pos_c = _ext.load().contrastive_sweep_fwd(
        a, b, scale, labels_row, labels_col, symmetric, TILE
    )
    loss_r = _loss(lse_r, pos_r, a, b, scale, pos_weight, smooth_row)
    if not symmetric:  # the column entries are distinct empty tensors
        return loss_r, lse_r, max_r, arg_r == labels_row, pos_c, lse_c, max_c, arg_c == labels_col
    loss_c = _loss(lse_c, pos_c, b, a, scale, pos_weight, smooth_col)
    return loss_r, lse_r, max_r, arg_r == labels_row, loss_c, lse_c, max_c, arg_c == labels_col


def _loss(lse, pos, a, b, scale, pos_weight, smooth):
    """Per-row cross-entropy from the sweep's statistics (the positive logit is already scaled)."""
    return lse - pos_weight * pos - scale * ref.smoothing_sums(a, b, smooth)


def contrastive_backward(
    g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_row, lse_col, pos_weight, smooth_row, smooth_col,
    normalize, symmetric,
):
    acc = ref.acc_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    g_row, g_col = g_row.to(acc).contiguous(), g_col.to(acc).contiguous()
    ga, gb = _ext.load().contrastive_sweep_bwd(
        a, b, scale, lse_row, lse_col, g_row, g_col, labels_row, labels_col, pos_weight, smooth_row, smooth_col,
        symmetric, TILE,
    )
    return ref.scale_normalize_backward_(z1, z2, a, b, scale, normalize, ga, gb)
