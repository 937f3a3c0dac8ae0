"""Maps (op, backend) to the module implementing it; modules are imported on first use."""
from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"torch": "wmkernels.reference", "cpu": "wmkernels.cpp", "cuda": "wmkernels.cpp", "triton": "wmkernels.triton"}


def impl(op_module: str, backend: str) -> ModuleType:
    """The backend module for one op, e.g. impl("mse", "triton") -> wmkernels.triton.mse."""
    return importlib.import_module(f"{_MODULES[backend]}.{op_module}")
