"""Strided layouts for elementwise kernels: several tensors viewed over one shape, dims merged.

Kernels read operands through their strides (no copies); merging dims that are contiguous in
every operand keeps index arithmetic short.
"""
from __future__ import annotations

import torch

MAX_DIMS = 5


def collapse(shape: tuple[int, ...], strides: list[tuple[int, ...]]) -> tuple[list[int], list[list[int]]]:
    """Order dims by the first operand's strides (largest first), drop size-1 dims and merge
    neighbours that are contiguous in every operand. Returns (sizes, per-operand strides)."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -abs(strides[0][d]))
    sizes: list[int] = []
    out: list[list[int]] = [[] for _ in strides]
    for d in dims:
        if sizes and all(out[k][-1] == strides[k][d] * shape[d] for k in range(len(strides))):
            sizes[-1] *= shape[d]
            for k in range(len(strides)):
                out[k][-1] = strides[k][d]
            continue
        sizes.append(shape[d])
        for k in range(len(strides)):
            out[k].append(strides[k][d])
    return sizes, out


def padded_layout(shape: torch.Size, tensors: list[torch.Tensor]) -> tuple[list[int], list[list[int]]]:
    """`collapse` of `tensors` broadcast to `shape`, left-padded to MAX_DIMS dims.

    Raises ValueError when more than MAX_DIMS dims remain (callers then copy the odd operand).
    """
    strides = [t.stride() if t.shape == shape else t.expand(shape).stride() for t in tensors]  # expand costs ~3 us
    sizes, st = collapse(tuple(shape), strides)
    if len(sizes) > MAX_DIMS:
        raise ValueError(f"layout needs {len(sizes)} dims after merging, kernels take {MAX_DIMS}")
    pad = MAX_DIMS - len(sizes)
    return [1] * pad + sizes, [[0] * pad + s for s in st]
