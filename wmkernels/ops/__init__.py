"""Registered ops (`torch.ops.wmkernels.*`) and the public functions that validate and call them."""
