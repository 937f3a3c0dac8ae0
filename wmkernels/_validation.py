"""Input checks at the public boundary, shared by every op: one place, messages that name the argument."""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for k, v in named[1:]:
        if v.device != first.device:
            raise ValueError(f"{k}: expected device {first.device} (that of {first_name}), got {v.device}")


def check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(t.shape)}")


def check_broadcastable(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    try:
        ok = torch.broadcast_shapes(t.shape, ref.shape) == ref.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} does not broadcast to {ref_name}'s shape {tuple(ref.shape)}"
        )


def check_reduction(reduction, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction: expected one of {allowed}, got {reduction!r}")
