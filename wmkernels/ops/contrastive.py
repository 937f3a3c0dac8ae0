"""Normalized contrastive loss: the registered op `wmkernels::contrastive_loss`, its backward, and
`contrastive_loss` (CLIP / OpenCLIP `ClipLoss` semantics, optionally across ranks).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backends, _validation
from .._registry import impl
from ..reference import contrastive as ref
from . import _eager

SUPPORTED = ("triton", "cpu", "torch")
DISTRIBUTED = (None, "gather", "ring")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class ContrastiveResult(NamedTuple):
    """What `contrastive_loss(..., return_accuracy=True)` returns.

    loss: the loss as without `return_accuracy`.
    accuracy: top-1 accuracy averaged over the directions scored (both when symmetric).
    accuracy_12: fraction of z1 rows whose highest logit is their positive z2 column.
    accuracy_21: the same for z2 rows against z1 (NaN when `symmetric=False`).
    Accuracies are fp32 scalars without gradient; under `distributed` they cover this rank's rows
    scored against the global batch.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    accuracy_12: torch.Tensor
    accuracy_21: torch.Tensor


def no_autocast(z: torch.Tensor):
    """The backends' own matmuls (the torch reference's logits, the smoothing term's matrix-vector
    product) must stay in the accumulation dtype: under autocast they would run in bf16 / fp16,
    forward only (backward runs outside it), so the saved logsumexp would not match the logits the
    backward recomputes (a 27% gradient error at scale 50) and a loss could come out negative."""
    return torch.autocast(z.device.type, enabled=False)


@torch.library.custom_op("wmkernels::contrastive_loss", mutates_args=())
def contrastive_loss_op(
    z1: torch.Tensor,
    z2: torch.Tensor,
    scale: torch.Tensor,
    labels_row: torch.Tensor,
    labels_col: torch.Tensor,
    pos_weight: float,
    smooth_row: float,
    smooth_col: float,
    normalize: bool,
    symmetric: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_row (M,), loss_col (N,), lse_row, lse_col, hit_row, hit_col) of z1 (M, D) against z2 (N, D);
    the column entries are empty unless `symmetric`. See reference.contrastive.contrastive_forward."""
    with no_autocast(z1):
        out = impl("contrastive", backend).contrastive_forward(
            z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric
        )
    loss_r, lse_r, _, hit_r, loss_c, lse_c, _, hit_c = out
    if not normalize:  # normalized rows keep |logit| <= scale: no infinite logsumexp, and no launches spent
        loss_r, lse_r = _unbounded_rows_nan(loss_r, lse_r)
        if symmetric:
            loss_c, lse_c = _unbounded_rows_nan(loss_c, lse_c)
    return loss_r, loss_c, lse_r, lse_c, hit_r, hit_c


def _unbounded_rows_nan(loss: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN loss and logsumexp for a row whose logsumexp is infinite (an inf logit, or fp32 overflow
    with normalize=False), as F.cross_entropy's log_softmax gives: an inf loss would otherwise come
    with finite gradients, and the NaN logsumexp the backward reads makes that row's softmax NaN."""
    unbounded = lse.isinf()
    return torch.where(unbounded, float("nan"), loss), torch.where(unbounded, float("nan"), lse)


@contrastive_loss_op.register_fake
def _(z1, z2, scale, labels_row, labels_col, pos_weight, smooth_row, smooth_col, normalize, symmetric, backend):
    m, n = z1.shape[0], (z2.shape[0] if symmetric else 0)
    row, col = z1.new_empty(m, dtype=scale.dtype), z1.new_empty(n, dtype=scale.dtype)
    return row, col, torch.empty_like(row), torch.empty_like(col), row.bool(), col.bool()


@torch.library.custom_op("wmkernels::contrastive_loss_backward", mutates_args=())
def contrastive_loss_backward_op(
    g_row: torch.Tensor,
    g_col: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    scale: torch.Tensor,
    labels_row: torch.Tensor,
    labels_col: torch.Tensor,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    pos_weight: float,
    smooth_row: float,
    smooth_col: float,
    normalize: bool,
    symmetric: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d z1, d z2, d scale), recomputing the logits tile by tile from z1, z2 and the saved LSEs."""
    with no_autocast(z1):
        return impl("contrastive", backend).contrastive_backward(
            g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_row, lse_col, pos_weight, smooth_row,
            smooth_col, normalize, symmetric,
        )


@contrastive_loss_backward_op.register_fake
def _(g_row, g_col, z1, z2, scale, *rest):
    return torch.empty_like(z1), torch.empty_like(z2), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    z1, z2, scale, labels_row, labels_col, pw, sr, sc, normalize, symmetric, backend = inputs
    _, _, lse_r, lse_c, hit_r, hit_c = output
    ctx.args = (pw, sr, sc, normalize, symmetric, backend)
    ctx.mark_non_differentiable(lse_r, lse_c, hit_r, hit_c)
    ctx.save_for_backward(z1, z2, scale, labels_row, labels_col, lse_r, lse_c)


def _backward(ctx, g_row, g_col, *_):
    z1, z2, scale, labels_row, labels_col, lse_r, lse_c = ctx.saved_tensors
    pw, sr, sc, normalize, symmetric, backend = ctx.args
    g_row = torch.zeros_like(lse_r) if g_row is None else g_row
    g_col = torch.zeros_like(lse_c) if g_col is None else g_col
    dz1, dz2, ds = _eager.call(
        contrastive_loss_backward_op, g_row, g_col, z1, z2, scale, labels_row, labels_col, lse_r, lse_c, pw, sr, sc,
        normalize, symmetric, backend,
    )
    need = ctx.needs_input_grad
    return (dz1 if need[0] else None), (dz2 if need[1] else None), (ds if need[2] else None), *([None] * 8)


contrastive_loss_fn = _eager.autograd_op(contrastive_loss_op, _setup_context, _backward)


def _scale_tensor(temperature, logit_scale, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """The logit multiplier as a 0-d `acc` tensor; autograd reaches a tensor logit_scale / temperature."""
    if logit_scale is not None:
        s = logit_scale if isinstance(logit_scale, torch.Tensor) else torch.tensor(float(logit_scale), dtype=acc)
    elif isinstance(temperature, torch.Tensor):
        # the reciprocal in the accumulation dtype: 1 / T in a bf16 T's own dtype is 0.15% off
        s = 1.0 / temperature.to(dtype=acc)
    else:
        s = torch.tensor(1.0 / float(temperature), dtype=acc)
    return s.to(device=device, dtype=acc).reshape(())


def _validate(z1, z2, temperature, logit_scale, labels, label_smoothing, distributed, reduction, symmetric) -> None:
    _validation.check_float_tensor("z1", z1)
    _validation.check_float_tensor("z2", z2)
    for name, z in (("z1", z1), ("z2", z2)):
        if z.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (batch, dim) tensor, got shape {tuple(z.shape)}")
    _validation.check_same_shape("z2", z2, "z1", z1)
    _validation.check_reduction(reduction)
    if z1.shape[0] == 0 or z1.shape[1] == 0:
        raise ValueError(f"z1: expected a non-empty (batch, dim) tensor, got shape {tuple(z1.shape)}")
    name, v = ("logit_scale", logit_scale) if logit_scale is not None else ("temperature", temperature)
    # the multiplier must also be finite in the accumulation dtype: temperature=1e-300 (or a
    # denormal fp32 tensor) would make it inf and every loss NaN
    acc = ref.acc_dtype(z1, z2)
    if isinstance(v, torch.Tensor):
        _validation.check_float_tensor(name, v)
        if v.numel() != 1:
            raise ValueError(f"{name}: expected a scalar (one element), got shape {tuple(v.shape)}")
        x = v.detach()

        def positive_finite():
            s = x.to(acc) if name == "logit_scale" else 1.0 / x.to(acc)
            return (x > 0) & x.isfinite() & s.isfinite()

        msg = f"{name}: expected a positive finite value (and a finite logit multiplier in {acc})"
        if _validation.values_ok(x) and not bool(positive_finite().all()):
            raise ValueError(f"{msg}, got {x.item()}")
        _validation.device_check(x, lambda: positive_finite().all(), msg)
    elif not _validation.is_real(v):
        raise TypeError(f"{name}: expected a number or a one-element tensor, got {type(v).__name__}")
    elif not 0 < v < math.inf:  # comparisons, not math.isfinite: v is symbolic under dynamic=True
        raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
    elif not (v if name == "logit_scale" else 1.0 / v) <= torch.finfo(acc).max:
        raise ValueError(f"{name}: expected a positive finite number with a finite logit multiplier in {acc}, "
                         f"got {v!r}")
    if not _validation.is_real(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    if distributed not in DISTRIBUTED:
        raise ValueError(f"distributed: expected one of {DISTRIBUTED}, got {distributed!r}")
    if distributed is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"distributed: {distributed!r} needs an initialized torch.distributed process group")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in LABEL_DTYPES:
            raise TypeError(f"labels: expected an integer tensor of dtype {LABEL_DTYPES}, got dtype {labels.dtype}")
        if labels.shape != (z1.shape[0],):
            raise ValueError(f"labels: expected shape ({z1.shape[0]},), got {tuple(labels.shape)}")
        _validation.check_same_device(z1=z1, labels=labels)


def _check_labels(labels: torch.Tensor, n: int, symmetric: bool) -> None:
    """Range (and permutation when symmetric) check: on the host for CPU labels, by asserts where
    the labels live for GPU or traced ones (no sync)."""
    perm = symmetric and labels.numel() == n
    perm_msg = "labels: with symmetric=True labels must be a permutation of the columns, got repeats"
    _validation.device_check(labels, lambda: ((labels >= 0) & (labels < n)).all(),
                             f"labels: expected values in [0, {_validation.shown(n)})")
    if perm:
        _validation.device_check(labels, lambda: torch.zeros(n, dtype=torch.bool, device=labels.device).scatter_(
            0, labels.long(), True).all(), perm_msg)
    if not _validation.values_ok(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"labels: expected values in [0, {n}), got values in [{lo}, {hi}]")
    if perm and torch.unique(labels).numel() != n:
        raise ValueError(perm_msg)


def _inverse(labels: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(labels).scatter_(0, labels, torch.arange(labels.numel(), device=labels.device))


def result_dtype(z1: torch.Tensor, z2: torch.Tensor) -> torch.dtype:
    """The dtype F.cross_entropy on the logits would return: the inputs' (fp32 under autocast)."""
    dtype = torch.promote_types(z1.dtype, z2.dtype)
    if torch.is_autocast_enabled(z1.device.type):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row


def contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor = 0.07,
    logit_scale: float | torch.Tensor | None = None,
    normalize: bool = True,
    symmetric: bool = True,
    labels: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    return_accuracy: bool = False,
    distributed: str | None = None,
    reduction: str = "mean",
    group=None,
    backend: str | None = None,
) -> torch.Tensor | ContrastiveResult:
    """Normalized contrastive (InfoNCE / CLIP) loss of paired embeddings z1, z2 of shape (B, D).

    logits = s * normalize(z1) @ normalize(z2).T with s = `logit_scale` (the multiplier itself,
    as OpenCLIP passes it; it wins over `temperature`) or 1 / `temperature`; a tensor s or
    temperature gets its gradient. Row i's positive is column `labels[i]` (default i).
    `symmetric=False` is exactly `F.cross_entropy(logits, labels, label_smoothing=...)`;
    `symmetric=True` averages it with the z2 -> z1 direction (`logits.T`, labels inverted; labels
    must then be a permutation). `reduction="none"` gives per-row losses (symmetric: the mean of
    row i's loss and column i's loss). Never builds the B x B matrix on the cpu / triton backends:
    logits are recomputed tile by tile with an online logsumexp (extra memory O(B D + B)).

    distributed="gather" (features all-gathered, gradients flowing back) or "ring" (features
    passed around the ring block by block): each rank scores its own rows against the global
    batch (labels are then global column indices, smoothing spreads over the global batch) and
    returns its LOCAL part of the loss: the mean (or sum) over its rows. With equal per-rank
    batches the global loss is the average of the ranks' values (`all_reduce(loss) / world`), and
    under DDP gradient averaging a step equals the single-process step on the concatenated batch.
    `return_accuracy=True` returns a `ContrastiveResult` with top-1 accuracies from the same pass.
    """
    _validate(z1, z2, temperature, logit_scale, labels, label_smoothing, distributed, reduction, symmetric)
    _validation.check_same_device(z1=z1, z2=z2)
    name = _backends.resolve("contrastive_loss", SUPPORTED, z1.device, backend)
    acc = ref.acc_dtype(z1, z2)
    scale = _scale_tensor(temperature, logit_scale, acc, z1.device)
    eps = float(label_smoothing)
    if distributed is not None:
        from . import contrastive_dist

        return contrastive_dist.distributed_loss(
            z1, z2, scale, labels, eps, normalize, symmetric, return_accuracy, distributed, reduction, group, name
        )
    b = z1.shape[0]
    if labels is None:
        labels_row = torch.arange(b, device=z1.device)
        labels_col = labels_row if symmetric else labels_row.new_empty(0)
    else:
        _check_labels(labels, b, symmetric)
        labels_row = labels.long()
        labels_col = _inverse(labels_row) if symmetric else labels_row.new_empty(0)
    loss_r, loss_c, _, _, hit_r, hit_c = contrastive_loss_fn(
        z1, z2, scale, labels_row, labels_col, 1.0 - eps, eps / b, eps / b, normalize, symmetric, name
    )
    per_row = 0.5 * (loss_r + loss_c) if symmetric else loss_r
    loss = _reduce(per_row, reduction).to(result_dtype(z1, z2))
    if not return_accuracy:
        return loss
    return accuracy_result(loss, hit_r, hit_c if symmetric else None, loss_r, loss_c)


def accuracy_result(loss, hit_row, hit_col, loss_row, loss_col) -> ContrastiveResult:
    """Accuracies from the hits, a row with a NaN loss never counted correct: its argmax is
    meaningless (a NaN logit compares false, so a kernel's running argmax can keep the label)."""
    acc_12 = (hit_row & ~loss_row.isnan()).float().mean()
    acc_21 = ((hit_col & ~loss_col.isnan()).float().mean() if hit_col is not None
              else torch.full_like(acc_12, float("nan")))
    both = 0.5 * (acc_12 + acc_21) if hit_col is not None else acc_12
    return ContrastiveResult(loss, both, acc_12, acc_21)
