"""Fused MSE loss: the registered op `wmkernels::mse_loss`, its backward, and `mse_loss`.

A drop-in for `torch.nn.functional.mse_loss` with a broadcastable `weight` and a backend choice.
"""
from __future__ import annotations

import torch

from .. import _backends, _validation
from .._registry import impl
from . import _eager
from ._grad import is_one_on_cpu
from ..reference import mse as ref

SUPPORTED = ("triton", "cuda", "cpu", "torch")


@torch.library.custom_op("wmkernels::mse_loss", mutates_args=())
def mse_loss_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    out_dtype: torch.dtype,
    backend: str,
    fuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, grad): grad is d loss / d input at grad_output = 1 when `fuse_grad`
    (computed in the same pass), else an empty tensor."""
    # elementwise: nothing to fuse, the reference is one expression; empty: no kernel to launch
    # (F.mse_loss gives NaN for the mean and 0 for the sum, as the reference does)
    if reduction == "none" or not input.numel():
        return ref.mse_forward(input, target, weight, reduction, out_dtype), input.new_empty(0)
    backend_impl = impl("mse", backend)
    if fuse_grad:
        return backend_impl.mse_forward_with_grad(input, target, weight, reduction, out_dtype)
    return backend_impl.mse_forward(input, target, weight, reduction, out_dtype), input.new_empty(0)


@mse_loss_op.register_fake
def _(input, target, weight, reduction, out_dtype, backend, fuse_grad):
    shape = input.shape if reduction == "none" else ()
    grad = torch.empty_like(input) if fuse_grad else input.new_empty(0)
    return input.new_empty(shape, dtype=out_dtype), grad


@torch.library.custom_op("wmkernels::mse_loss_backward", mutates_args=())
def mse_loss_backward_op(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    backend: str,
    need_input: bool,
    need_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d target) recomputed from the inputs; an empty tensor for one not needed."""
    module = ref if reduction == "none" or not input.numel() else impl("mse", backend)
    gi, gt = module.mse_backward(grad_out, input, target, weight, reduction, need_input, need_target)
    return (gi if gi is not None else input.new_empty(0)), (gt if gt is not None else target.new_empty(0))


@mse_loss_backward_op.register_fake
def _(grad_out, input, target, weight, reduction, backend, need_input, need_target):
    return (
        torch.empty_like(input) if need_input else input.new_empty(0),
        torch.empty_like(target) if need_target else target.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, target, weight, reduction, _, backend, fuse_grad = inputs
    _, grad = output
    ctx.reduction, ctx.backend, ctx.fuse_grad = reduction, backend, fuse_grad
    ctx.save_for_backward(input, target, weight, grad if fuse_grad else None)
    # the fused gradient is a by-product: no gradient flows into it, and none is zero-filled for it
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_fused):
    input, target, weight, fused = ctx.saved_tensors
    need_input, need_target, need_weight = ctx.needs_input_grad[:3]
    gi = gt = gw = None
    if grad_loss is None:
        return gi, gt, gw, None, None, None, None
    if ctx.fuse_grad and (need_input or need_target):
        g = fused if is_one_on_cpu(grad_loss) else fused * grad_loss
        gi = g if need_input else None
        gt = (-g).to(target.dtype) if need_target else None
    elif need_input or need_target:
        gi, gt = _eager.call(
            mse_loss_backward_op, grad_loss, input, target, weight, ctx.reduction, ctx.backend, need_input, need_target
        )
        gi, gt = (gi if need_input else None), (gt if need_target else None)
    if need_weight:
        gw = ref.mse_weight_backward(grad_loss, input, target, weight, ctx.reduction)
    return gi, gt, gw, None, None, None, None


_mse_loss = _eager.autograd_op(mse_loss_op, _setup_context, _backward)


def _result_dtype(input, target, weight) -> torch.dtype:
    dtype = torch.promote_types(input.dtype, target.dtype)  # same shapes: equals result_type
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    # F.mse_loss runs in float32 under autocast; we read the low-precision inputs directly.
    if torch.is_autocast_enabled(input.device.type):
        dtype = torch.promote_types(dtype, torch.float32)
    return dtype


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean squared error, a drop-in for `torch.nn.functional.mse_loss`.

    `weight` broadcasts to `input` (a per-frame weight of shape (B, T, 1, 1, 1), or a 0/1 mask);
    with `reduction="mean"` the weighted sum is divided by the sum of the broadcast weight, so a
    0/1 mask gives the mean over the selected elements. Inputs of different floating dtypes follow
    PyTorch's type promotion without converted copies; fp16/bf16/fp32 accumulate in fp32, fp64 in
    fp64. Strided views are read in place. `backend` picks the implementation (see
    `wmkernels.available_backends()`); `reduction="none"` is elementwise and always runs the
    reference expression.

    Backward strategy, chosen by measurement: on the `cpu` backend the input gradient is written
    in the same pass as the loss (12 bytes per fp32 element for forward + backward; 23.8 ms vs
    34.5 ms for forward-then-recompute on 16M fp32, one core of this project's 2-core CI
    machine), and a grad_output of exactly 1 (read on the host for free) skips the scaling pass;
    not for fp16, where the unscaled 2 (x - y) / N underflows before a GradScaler's scale arrives.
    On GPU backends grad_output cannot be read without a sync, so saving the gradient would cost
    a scaling pass: the backward recomputes it from input and target instead (8 + 12 = 20 bytes
    per element either way, and no gradient buffer held between the passes).
    """
    _validation.check_float_tensor("input", input)
    _validation.check_float_tensor("target", target)
    _validation.check_same_shape("target", target, "input", input)
    _validation.check_reduction(reduction)
    if weight is not None:
        _validation.check_float_tensor("weight", weight)
        _validation.check_broadcastable("weight", weight, "input", input)
    _validation.check_same_device(input=input, target=target, weight=weight)
    name = _backends.resolve("mse_loss", SUPPORTED, input.device, backend)
    grad_wanted = torch.is_grad_enabled() and (input.requires_grad or target.requires_grad)
    fuse = (
        name == "cpu"
        and grad_wanted
        and reduction != "none"
        and input.numel() > 0
        # the fused gradient is written in the input's dtype: the target's is its negation
        and (not target.requires_grad or target.dtype == input.dtype)
        # fp16 at grad_output = 1 underflows (2 (x - y) / N): a GradScaler's scale comes later
        and input.dtype != torch.float16
    )
    loss, _ = _mse_loss(input, target, weight, reduction, _result_dtype(input, target, weight), name, fuse)
    return loss
