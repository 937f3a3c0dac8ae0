"""`nn.Module` forms of the wmkernels losses: thin wrappers holding the options."""
from __future__ import annotations

import torch

from .ops.mse import mse_loss


class MSELoss(torch.nn.Module):
    """`torch.nn.MSELoss` backed by `wmkernels.mse_loss`; `forward(input, target, weight=None)`."""

    def __init__(self, reduction: str = "mean", backend: str | None = None) -> None:
        super().__init__()
        self.reduction = reduction
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return mse_loss(input, target, reduction=self.reduction, weight=weight, backend=self.backend)
