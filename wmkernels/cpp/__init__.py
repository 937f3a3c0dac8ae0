"""The compiled backends (`cpu` and `cuda`): thin calls into `torch.ops.wmkernels_C`.

The dispatcher routes each call to the CPU or CUDA kernel from the tensors' device.
"""
