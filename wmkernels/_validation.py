"""Input checks at the public boundary, shared by every op: one place, messages that name the argument."""
from __future__ import annotations

import numbers

import torch

REDUCTIONS = ("none", "mean", "sum")


def is_int(x) -> bool:
    """An int, numpy's included (sizes read from configs and arrays), but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """A real number, Python's or NumPy's (np.float32 from a config), but not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


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


VIDEO_LAYOUTS = ("BCTHW", "BTCHW")


def check_video_layout(layout) -> None:
    if layout not in VIDEO_LAYOUTS:
        raise ValueError(f"layout: expected one of {VIDEO_LAYOUTS}, got {layout!r}")


def check_tubelet(tubelet) -> tuple[int, int, int]:
    """`tubelet` as a tuple of three Python ints (NumPy's accepted: sizes from configs and arrays)."""
    ok = isinstance(tubelet, (tuple, list, torch.Size)) and len(tubelet) == 3
    if not ok or not all(is_int(s) and s >= 1 for s in tubelet):
        raise ValueError(f"tubelet: expected three positive ints (t, h, w), got {tubelet!r}")
    return tuple(int(s) for s in tubelet)


def check_dtype(name: str, dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype (e.g. torch.float32), got {dtype!r}")


def check_divisible(name: str, sizes, tubelet) -> None:
    if any(s % p for s, p in zip(sizes, tubelet)):
        raise ValueError(
            f"{name}: (T, H, W) = {tuple(sizes)} is not divisible by the tubelet {tuple(tubelet)}"
        )


def values_ok(t: torch.Tensor) -> bool:
    """Whether value checks run on the host: CPU tensors outside torch.compile (reading a GPU
    tensor on the host would sync, a traced one has no values: those get `device_check`)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def device_check(t: torch.Tensor, cond, message: str) -> None:
    """A value check without a host sync, for GPU tensors and under torch.compile: `cond()` (a bool
    tensor) is asserted where the tensor lives (a traced graph keeps the assert), and a failure
    stops the next synchronizing call with `message` instead of letting a kernel read out of
    bounds. Build `message` with `shown` for sizes: a symbolic size formatted into it would
    specialize the graph to that size."""
    if t.numel() and not values_ok(t):
        torch._assert_async(cond(), message)


def shown(n) -> str:
    """`n` for a message, "N" while tracing (a symbolic size formatted into a string would
    specialize the graph to it, and dynamo cannot trace the formatting at all)."""
    return "N" if torch.compiler.is_compiling() else str(n)


def check_index_tensor(name: str, t, shape: tuple[int, ...], upper: int) -> None:
    """An int64 tensor of `shape` (None: any size) with values in [0, upper): checked on the host
    for CPU tensors, by an assert where the tensor lives for GPU or traced ones."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype torch.int64, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, t.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if values_ok(t) and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name}: expected values in [0, {upper}), got values in [{lo}, {hi}]")
    device_check(t, lambda: ((t >= 0) & (t < upper)).all(), f"{name}: expected values in [0, {shown(upper)})")
