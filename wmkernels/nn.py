"""`nn.Module` forms of the wmkernels losses: thin wrappers holding the options."""
from __future__ import annotations

import math

import torch

from ._validation import check_tubelet, is_real
from .ops.contrastive import contrastive_loss
from .ops.masked import masked_mse_loss
from .ops.mse import mse_loss


class MSELoss(torch.nn.Module):
    """`torch.nn.MSELoss` backed by `wmkernels.mse_loss`; `forward(input, target, weight=None)`."""

    def __init__(self, reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__()
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return mse_loss(input, target, reduction=self.reduction, weight=weight, backend=self.backend)


def clamped_scale(log_scale: torch.Tensor, max_scale: float) -> torch.Tensor:
    """exp(log_scale) after clamping the parameter itself at log(max_scale), in place. Clamping
    exp(.) instead would give a parameter past the bound a zero gradient for good: once an optimizer
    step overshoots, the scale could never come down again."""
    with torch.no_grad():
        log_scale.clamp_(max=math.log(max_scale))
    return log_scale.exp()


class ContrastiveLoss(torch.nn.Module):
    """CLIP-style contrastive loss backed by `wmkernels.contrastive_loss`; `forward(z1, z2, labels=None)`.

    With `learnable_scale=True` the logit scale is a parameter stored in log space like CLIP's,
    initialized to log(1 / temperature) (log(1/0.07) by default), and used as exp(.) of itself
    clamped at log(`max_scale`) (100), in place before each use, as OpenCLIP clamps it after each
    optimizer step; otherwise the fixed `temperature` is used. Other options are passed through.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_scale: bool = False,
        max_scale: float = 100.0,
        normalize: bool = True,
        symmetric: bool = True,
        label_smoothing: float = 0.0,
        return_accuracy: bool = False,
        distributed: str | None = None,
        reduction: str = "mean",
        group=None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("temperature", temperature), ("max_scale", max_scale)):
            if not is_real(v) or not 0 < v < math.inf:
                raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
        self.temperature, self.max_scale = temperature, max_scale
        self.logit_scale = (
            torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature))) if learnable_scale else None
        )
        self.options = dict(
            normalize=normalize, symmetric=symmetric, label_smoothing=label_smoothing, return_accuracy=return_accuracy,
            distributed=distributed, reduction=reduction, group=group, backend=backend,
        )

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None = None):
        scale = None if self.logit_scale is None else clamped_scale(self.logit_scale, self.max_scale)
        return contrastive_loss(z1, z2, temperature=self.temperature, logit_scale=scale, labels=labels, **self.options)


class MaskedMSELoss(torch.nn.Module):
    """Masked patch reconstruction loss backed by `wmkernels.masked_mse_loss`;
    `forward(pred, video, index)` with `index` = ids_masked (B, M) int64 or a (B, N) bool mask.

    eps acts in the units of the video after `mean`/`std`: MAE's targets are those of the
    ImageNet-normalized video (uint8: mean/std times 255), VideoMAE's those of the video in
    [0, 1] (`norm_mode="videomae"`; uint8: `std=(255,) * 3`).
    """

    def __init__(self, tubelet=(2, 16, 16), layout: str = "BCTHW", norm_pix: bool = True, norm_mode: str = "mae",
                 eps: float = 1e-6, mean=None, std=None, backend: str | None = None) -> None:
        super().__init__()
        self.tubelet, self.layout, self.backend = check_tubelet(tubelet), layout, backend
        self.norm_pix, self.norm_mode, self.eps, self.mean, self.std = norm_pix, norm_mode, eps, mean, std

    def forward(self, pred: torch.Tensor, video: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return masked_mse_loss(pred, video, index, self.tubelet, self.layout, norm_pix=self.norm_pix,
                               norm_mode=self.norm_mode, eps=self.eps, mean=self.mean, std=self.std,
                               backend=self.backend)
