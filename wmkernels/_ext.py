"""Loads the compiled kernels (`csrc/`) once: the installed `wmkernels._C`, else a JIT build.

The kernels register themselves as `torch.ops.wmkernels_C.*`; nothing here is op-specific.
"""
from __future__ import annotations

import functools
import glob
import importlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("wmkernels")

_PKG = Path(__file__).resolve().parent
# an installed package carries its sources (setup.py copies them in); a checkout has them beside it
_CSRC = _PKG / "csrc" if (_PKG / "csrc").is_dir() else _PKG.parent / "csrc"
_error: list[str] = []


def cpu_sources() -> list[str]:
    """The C++ sources of the CPU extension."""
    return sorted(glob.glob(str(_CSRC / "cpu" / "*.cpp"))) + [str(_CSRC / "binding.cpp")]


def _jit_build() -> None:
    from torch.utils import cpp_extension

    if not (_CSRC / "binding.cpp").exists():
        raise ImportError(f"wmkernels._C is not installed and its sources are not at {_CSRC} to build it")
    # a warning, not info: the first call stalls for minutes and the user should know why
    log.warning("wmkernels: wmkernels._C not importable; building the C++ extension from %s just in time "
                "(minutes the first time, cached after)", _CSRC)
    cpp_extension.load(
        name="wmkernels_C_jit",
        sources=cpu_sources(),
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


@functools.cache
def load():
    """The `torch.ops.wmkernels_C` namespace, or None (reason in `load_error()`)."""
    try:
        importlib.import_module("wmkernels._C")
    except ImportError as first:
        if os.environ.get("WMKERNELS_NO_JIT") == "1":
            _error.append(f"wmkernels._C not importable ({first}) and WMKERNELS_NO_JIT=1")
            return None
        try:
            _jit_build()
        except Exception as exc:  # a failed build must not break `import wmkernels`
            _error.append(f"wmkernels._C not importable ({first}); JIT build failed: {exc}")
            log.warning("wmkernels: %s", _error[-1])
            return None
    return torch.ops.wmkernels_C


def load_error() -> str:
    return _error[-1] if _error else ""


def has_cuda_kernels() -> bool:
    ops = load()
    return ops is not None and torch._C._dispatch_has_kernel_for_dispatch_key("wmkernels_C::mse_fwd", "CUDA")
