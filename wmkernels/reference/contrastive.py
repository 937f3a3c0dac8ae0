"""Reference contrastive loss: the plain B x B formula, the specification every backend matches.

logits = scale * normalize(z1) @ normalize(z2).T; rows score z1 -> z2, columns score z2 -> z1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import acc_dtype  # re-exported: ref.acc_dtype in the backends

EPS = 1e-12  # F.normalize's eps: rows are divided by max(||z||, EPS)


def prepare(z: torch.Tensor, normalize: bool, acc: torch.dtype) -> torch.Tensor:
    """The rows the logits are built from: `z` in `acc` precision, L2-normalized when asked."""
    z = z.to(acc)
    return (F.normalize(z, dim=1, eps=EPS) if normalize else z).contiguous()


def normalize_backward_(dy: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """In place on dy: d/dz of y = z / max(||z||, EPS) given dy and y, (dy - y (y . dy)) / ||z||, or
    dy / EPS where ||z|| <= EPS. Temporaries are O(B): the row dot products go through bmm."""
    n = torch.linalg.vector_norm(z, dim=1, dtype=dy.dtype)
    inside = n > EPS
    coef = torch.where(inside, torch.bmm(y.unsqueeze(1), dy.unsqueeze(2)).view(-1), torch.zeros_like(n))
    dy.addcmul_(y, coef.unsqueeze(1), value=-1.0)
    return dy.div_(torch.where(inside, n, torch.full_like(n, EPS)).unsqueeze(1))


def linear_terms(a, b, scale, labels, pos_weight: float, smooth: float) -> torch.Tensor:
    """Per row of `a`: pos_weight * logit[i, labels[i]] + smooth * sum_j logit[i, j].

    The part of the cross-entropy linear in the logits, O(B D): the positive logit is one dot
    product, and sum_j logit[i, j] = scale * a_i . sum_j b_j. A label of -1 has no positive here.
    """
    # selected, not multiplied by 0, away from -1 labels: 0 * an inf dot product would be NaN
    pos = torch.where(labels >= 0, (a * b[labels.clamp_min(0)]).sum(1), 0.0)
    return scale * (pos_weight * pos + smoothing_sums(a, b, smooth))


def smoothing_sums(a, b, smooth: float):
    """smooth * sum_j a_i . b_j per row (one matrix-vector product), or 0 without smoothing: skipped,
    not multiplied by 0, where an inf column sum (normalize=False) would make every row NaN."""
    return smooth * (a @ b.sum(0)) if smooth else 0.0


def sub_linear_backward_(ga, gb, a, b, labels, g, pos_weight: float, smooth: float) -> None:
    """In place: ga -= d/da, gb -= d/db of sum_i g_i * linear_terms_i / scale (the scale factor is
    applied by the caller). The smoothing parts are rank-one updates, so the only B x D temporaries
    are the gathered positive rows."""
    has, idx = (labels >= 0)[:, None], labels.clamp_min(0)
    w = (g * pos_weight)[:, None]
    ga.addcmul_(torch.where(has, b[idx], 0.0), w, value=-1.0)
    gb.index_add_(0, idx, torch.where(has, a * w, 0.0), alpha=-1.0)
    if smooth:
        ga.addr_(g, b.sum(0), alpha=-smooth)
        gb.sub_((smooth * (g @ a))[None, :])


def finish_forward(a, b, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, symmetric, core):
    """Losses from the sweep's (lse, max, argmax) per row and per column plus the linear terms."""
    lse_r, max_r, arg_r, lse_c, max_c, arg_c = core
    loss_r = lse_r - linear_terms(a, b, scale, labels_row, pos_weight, smooth_row)
    hit_r = arg_r == labels_row
    if not symmetric:
        return loss_r, lse_r, max_r, hit_r, *(a.new_empty(0) for _ in range(3)), hit_r.new_empty(0)
    loss_c = lse_c - linear_terms(b, a, scale, labels_col, pos_weight, smooth_col)
    return loss_r, lse_r, max_r, hit_r, loss_c, lse_c, max_c, arg_c == labels_col


def finish_backward(
    z1, z2, a, b, scale, labels_row, labels_col, g_row, g_col, pos_weight, smooth_row, smooth_col,
    normalize, symmetric, ga, gb,
):
    """Gradients from the sweep's softmax parts ga = G_soft @ b, gb = G_soft.T @ a (consumed: updated
    in place, so the caller's buffers must be its own).

    Adds the linear (label, smoothing) parts, then scales, then goes back through normalization.
    d scale = sum_ij G_ij (a_i . b_j) = sum_i a_i . (G @ b)_i, so it costs O(B D).
    """
    sub_linear_backward_(ga, gb, a, b, labels_row, g_row, pos_weight, smooth_row)
    if symmetric:
        sub_linear_backward_(gb, ga, b, a, labels_col, g_col, pos_weight, smooth_col)
    return scale_normalize_backward_(z1, z2, a, b, scale, normalize, ga, gb)


def scale_normalize_backward_(z1, z2, a, b, scale, normalize, ga, gb):
    """(d z1, d z2, d scale) from ga = G @ b, gb = G.T @ a with G the full d loss / d logits over
    scale (consumed in place): d scale = sum_i a_i . ga_i, then the scale, then normalization."""
    dscale = torch.dot(a.reshape(-1), ga.reshape(-1))
    ga.mul_(scale)
    gb.mul_(scale)
    if normalize:
        normalize_backward_(ga, z1, a)
        normalize_backward_(gb, z2, b)
    return ga.to(z1.dtype), gb.to(z2.dtype), dscale.to(scale.dtype)


def contrastive_forward(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric):
    """Per-row losses and statistics of one B x B (or M x N) logits matrix, materialized.

    Returns (loss_row, lse_row, max_row, hit_row, loss_col, lse_col, max_col, hit_col):
    loss_row[i] = logsumexp_j L[i, j] - pos_weight L[i, y_i] - smooth_row sum_j L[i, j], the
    cross-entropy of row i with label smoothing; hit_row[i] = argmax_j L[i, j] == y_i. The column
    entries are the same on L.T with labels_col (empty unless `symmetric`).
    """
    acc = acc_dtype(z1, z2)
    a, b = prepare(z1, normalize, acc), prepare(z2, normalize, acc)
    logits = scale * (a @ b.T)
    max_r, arg_r = logits.max(1)
    core = (logits.logsumexp(1), max_r, arg_r, None, None, None)
    if symmetric:
        max_c, arg_c = logits.max(0)
        core = core[:3] + (logits.logsumexp(0), max_c, arg_c)
    return finish_forward(a, b, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, symmetric, core)


def contrastive_backward(
    g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_row, lse_col, pos_weight, smooth_row, smooth_col,
    normalize, symmetric,
):
    """(d z1, d z2, d scale) for upstream gradients g_row (M,) and g_col (N,) of the per-row losses."""
    acc = acc_dtype(z1, z2)
    a, b = prepare(z1, normalize, acc), prepare(z2, normalize, acc)
    logits = scale * (a @ b.T)
    g = g_row.to(acc)[:, None] * torch.exp(logits - lse_row[:, None])
    if symmetric:
        g = g + g_col.to(acc)[None, :] * torch.exp(logits - lse_col[None, :])
    return finish_backward(
        z1, z2, a, b, scale, labels_row, labels_col, g_row.to(acc), g_col.to(acc), pos_weight, smooth_row,
        smooth_col, normalize, symmetric, g @ b, g.T @ a,
    )
