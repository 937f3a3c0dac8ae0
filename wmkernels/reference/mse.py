"""Reference MSE: the formula of `torch.nn.functional.mse_loss`, with a broadcast weight."""
from __future__ import annotations

import torch

from . import acc_dtype


def mse_denominator(input: torch.Tensor, weight: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor | float:
    """Sum of the weight broadcast to `input` (a tensor in `acc` precision), or the element count.

    Broadcasting repeats each weight element `input.numel() / weight.numel()` times, so the
    broadcast weight is never materialized. The count stays a Python number: a tensor made from
    it on a GPU would be a blocking host-to-device copy.
    """
    if weight is None:
        return float(input.numel())
    repeat = input.numel() // max(weight.numel(), 1)
    return weight.sum(dtype=acc) * repeat


def mse_forward(input, target, weight, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i (x_i - y_i)^2, divided by sum_i w_i (or N) for "mean"; elementwise for "none"."""
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    # in place after the first temporary: the reference also runs past 2^31 elements
    sq = (input.to(acc) - target.to(acc)).square_()
    if weight is not None:
        sq = sq.mul_(weight.to(acc))
    if reduction == "none":
        return sq.to(out_dtype)
    total = sq.sum()
    if reduction == "mean":
        total = total / mse_denominator(input, weight, acc)
    return total.to(out_dtype)


def mse_backward(grad_out, input, target, weight, reduction: str, need_input: bool, need_target: bool):
    """d loss / d input (and d target = its negative), in each tensor's own dtype."""
    acc = acc_dtype(input, target, weight)
    # the coefficient first, the difference last: 2 (x - y) alone overflows fp32 for bf16 values
    # near 1e38 where 2 w (x - y) / sum(w) does not
    coef = grad_out.to(acc) * 2.0
    if reduction == "mean":
        coef = coef / mse_denominator(input, weight, acc)
    if weight is not None:
        coef = coef * weight.to(acc)
    g = (input.to(acc) - target.to(acc)) * coef
    gi = g.to(input.dtype) if need_input else None
    gt = (-g).to(target.dtype) if need_target else None
    return gi, gt


def mse_weight_backward(grad_out, input, target, weight, reduction: str) -> torch.Tensor:
    """d loss / d weight, summed back to the weight's own shape.

    sum: (x - y)^2.  mean: ((x - y)^2 - loss) / sum(w), since loss = sum(w sq) / sum(w), with the
    loss recomputed in the accumulation dtype (the returned one may be rounded to bf16).
    none: grad_out * (x - y)^2.
    """
    acc = torch.float64 if torch.float64 in (input.dtype, target.dtype, weight.dtype) else torch.float32
    g = (input.to(acc) - target.to(acc)).square_()
    if reduction == "mean":
        denom = mse_denominator(input, weight, acc)
        g = (g - (g * weight.to(acc)).sum() / denom) / denom
    g = g * grad_out.to(acc)
    return g.sum_to_size(weight.shape).to(weight.dtype)
