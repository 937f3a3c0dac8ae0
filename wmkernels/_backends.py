"""Backend registry: which implementations this install has, and which one a call uses.

Backends are `triton`, `cuda` (compiled CUDA), `cpu` (compiled C++) and `torch` (the reference).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import warnings

import torch

from . import _ext

log = logging.getLogger("wmkernels")

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "WMKERNELS_BACKEND"


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, on which device types, and why not when it cannot."""

    available: bool
    devices: tuple[str, ...]
    reason: str


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, (), "the triton package is not installed")
    if triton_interpreted():
        return BackendStatus(True, ("cpu",), "TRITON_INTERPRET=1: Triton kernels run on CPU tensors")
    if not torch.cuda.is_available():
        return BackendStatus(False, (), "no CUDA device (set TRITON_INTERPRET=1 to run on CPU)")
    return BackendStatus(True, ("cuda",), "CUDA device found")


def _cpu_status() -> BackendStatus:
    if _ext.load() is None:
        return BackendStatus(False, (), f"C++ extension unavailable: {_ext.load_error()}")
    return BackendStatus(True, ("cpu",), "C++ extension loaded")


def _cuda_status() -> BackendStatus:
    if not torch.cuda.is_available():
        return BackendStatus(False, (), "no CUDA device")
    if _ext.load() is None:
        return BackendStatus(False, (), f"C++ extension unavailable: {_ext.load_error()}")
    if not _ext.has_cuda_kernels():
        return BackendStatus(False, (), "the extension was built without CUDA (torch or nvcc lacked it)")
    return BackendStatus(True, ("cuda",), "CUDA kernels built")


@functools.cache
def _statuses() -> dict[str, BackendStatus]:
    """Computed once per process (each part is fixed once first asked: the extension loads or not
    once, Triton's mode is read when its kernels are decorated); `resolve` runs on every op call."""
    return {
        "triton": _triton_status(),
        "cuda": _cuda_status(),
        "cpu": _cpu_status(),
        "torch": BackendStatus(True, ("cpu", "cuda", "any"), "reference, always available"),
    }


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether this install can run it, on which devices, and why not."""
    return dict(_statuses())


_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@functools.cache
def _warn_fallback(device_type: str, wanted: str, used: str, reason: str) -> None:
    msg = f"wmkernels: backend {wanted!r} unavailable on {device_type} ({reason}); using {used!r}"
    warnings.warn(msg, RuntimeWarning, stacklevel=4)  # the caller of mse_loss etc.
    log.warning(msg)


@torch.compiler.assume_constant_result
def resolve(op: str, supported: tuple[str, ...], device: torch.device, backend: str | None) -> str:
    """Pick the backend for one call of `op` on `device`.

    Order: the `backend` argument, then $WMKERNELS_BACKEND, then the device default
    (CUDA: triton > cuda > torch; CPU: cpu > torch; other devices: torch). An explicit choice
    that cannot run is a ValueError; a default that cannot run warns once and falls back.
    Under torch.compile the choice is made once, at trace time.
    """
    explicit = backend if backend is not None else os.environ.get(ENV_VAR) or None
    status = _statuses()
    if explicit is not None:
        if explicit not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {explicit!r}")
        if explicit not in supported:
            raise ValueError(f"backend: {op} has no {explicit!r} implementation (it has {supported})")
        st = status[explicit]
        if explicit != "torch" and not (st.available and device.type in st.devices):
            why = st.reason if not st.available else f"it runs on {st.devices}, the tensors are on {device.type}"
            raise ValueError(f"backend: {explicit!r} cannot run {op} here: {why}")
        log.debug("wmkernels: %s on %s runs on backend %r (explicit)", op, device, explicit)
        return explicit
    order = _DEFAULT_ORDER.get(device.type, ("torch",))
    for name in order:
        st = status[name]
        if name in supported and (name == "torch" or (st.available and device.type in st.devices)):
            if name != order[0]:
                _warn_fallback(device.type, order[0], name, status[order[0]].reason)
            log.debug("wmkernels: %s on %s runs on backend %r", op, device, name)
            return name
    return "torch"
