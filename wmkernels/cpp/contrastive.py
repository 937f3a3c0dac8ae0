"""Compiled contrastive loss (csrc/cpu/contrastive.cpp): same functions as wmkernels.reference.contrastive.

The C++ sweep produces the B x B-dependent parts (logsumexp, max, argmax; G @ b and G.T @ a) tile
by tile; normalization and the label / smoothing terms are O(B D) and shared with the reference.
"""
from __future__ import annotations

from .. import _ext
from ..reference import contrastive as ref

TILE = 1024  # rows and columns per logits tile: 4 MiB of fp32, three such buffers at most


def contrastive_forward(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric):
    acc = ref.acc_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    core = _ext.load().contrastive_sweep_fwd(a, b, scale, symmetric, TILE)
    return ref.finish_forward(a, b, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, symmetric, core)


def contrastive_backward(
    g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_row, lse_col, pos_weight, smooth_row, smooth_col,
    normalize, symmetric,
):
    acc = ref.acc_dtype(z1, z2)
    a, b = ref.prepare(z1, normalize, acc), ref.prepare(z2, normalize, acc)
    g_row, g_col = g_row.to(acc).contiguous(), g_col.to(acc).contiguous()
    ga, gb = _ext.load().contrastive_sweep_bwd(a, b, scale, lse_row, lse_col, g_row, g_col, symmetric, TILE)
    return ref.finish_backward(
        z1, z2, a, b, scale, labels_row, labels_col, g_row, g_col, pos_weight, smooth_row, smooth_col,
        normalize, symmetric, ga, gb,
    )
