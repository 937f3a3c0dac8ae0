"""Helpers shared by the ops' autograd glue."""
from __future__ import annotations

import torch


def is_one_on_cpu(t: torch.Tensor) -> bool:
    """Whether a CPU grad_output is exactly 1: free to read on CPU, so a gradient computed in the
    forward pass at grad_output = 1 is returned without a scaling pass. Never asked while tracing
    (the value is data: a traced tensor is a subclass such as FakeTensor / FunctionalTensor, which
    older torch versions' AOT backward tracing does not flag as compiling) or on a GPU (a sync)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() == 1
            and not torch.compiler.is_compiling() and t.item() == 1)
