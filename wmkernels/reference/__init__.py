"""The reference backend: plain PyTorch, readable, and the specification every kernel is tested against."""
from __future__ import annotations

import torch


def acc_dtype(*operands: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """The accumulation dtype of every op and backend: fp64 when any operand (a tensor or a dtype;
    None skipped) is fp64, else fp32 (fp16 / bf16 / fp32 inputs accumulate in fp32)."""
    dtypes = [o.dtype if isinstance(o, torch.Tensor) else o for o in operands if o is not None]
    return torch.float64 if torch.float64 in dtypes else torch.float32
