"""Maps (op, backend) to the module implementing it; modules are imported on first use."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

_MODULES = {"torch": "wmkernels.reference", "cpu": "wmkernels.cpp", "cuda": "wmkernels.cpp", "triton": "wmkernels.triton"}


@functools.cache  # looked up on every op call: an import_module call costs microseconds
def impl(op_module: str, backend: str) -> ModuleType:
    """The backend module for one op, e.g. impl("mse", "triton") -> wmkernels.triton.mse."""
    return importlib.import_module(f"{_MODULES[backend]}.{op_module}")
