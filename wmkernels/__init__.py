"""wmkernels: fused loss kernels for world-model (video) pre-training.

Functional losses shaped like `torch.nn.functional`, `nn.Module` wrappers in `wmkernels.nn`,
and backends (triton, cuda, cpu, torch) chosen from the tensors' device.
"""
from ._backends import BackendStatus, available_backends
from .ops.mse import mse_loss
from . import nn

__version__ = "0.1.0"

__all__ = ["BackendStatus", "available_backends", "mse_loss", "nn", "__version__"]
