"""Triton backend: GPU kernels that also run on CPU tensors under TRITON_INTERPRET=1."""
