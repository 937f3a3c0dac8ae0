"""wmkernels: fused loss kernels for world-model (video) pre-training.

Losses shaped like `torch.nn.functional` (modules in `wmkernels.nn`), masks and patch ops for masked
video modeling, and backends (triton, cuda, cpu, torch) chosen from the tensors' device.
"""
from ._backends import BackendStatus, available_backends
from .ops.contrastive import ContrastiveResult, contrastive_loss
from .ops.mse import mse_loss
from .ops.masked import gather_patches, masked_mse_loss, patchify, unpatchify, unshuffle_with_mask_tokens
from . import masking
from . import nn

__version__ = "0.1.0"

__all__ = ["BackendStatus", "available_backends", "ContrastiveResult", "contrastive_loss", "mse_loss", "gather_patches", "masked_mse_loss", "patchify", "unpatchify",
           "unshuffle_with_mask_tokens", "masking", "nn", "__version__"]
