"""Compiled MSE (csrc/cpu/mse.cpp, csrc/cuda/mse.cu): same functions as wmkernels.reference.mse."""
from __future__ import annotations

import torch

from .. import _ext


def mse_forward(input, target, weight, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _ext.load().mse_fwd(input, target, weight, reduction, out_dtype, False)[0]


def mse_forward_with_grad(input, target, weight, reduction: str, out_dtype: torch.dtype):
    """(loss, d loss / d input at grad_output = 1), both from one pass over the data."""
    return _ext.load().mse_fwd(input, target, weight, reduction, out_dtype, True)


def mse_backward(grad_out, input, target, weight, reduction: str, need_input: bool, need_target: bool):
    gi, gt = _ext.load().mse_bwd(grad_out, input, target, weight, reduction, need_input, need_target)
    return (gi if need_input else None), (gt if need_target else None)
