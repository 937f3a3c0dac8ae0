"""Shared test fixtures: backends runnable here, dtypes, per-dtype tolerances, layouts.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
any kernel is decorated, so it is set here, before wmkernels.triton is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import wmkernels  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Tolerances for comparing a backend's result in `dtype` with the float64 reference.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def runnable_backends(device: str = "cpu") -> list[str]:
    status = wmkernels.available_backends()
    return [b for b, st in status.items() if b == "torch" or (st.available and device in st.devices)]


# The full matrix runs on the compiled and reference backends; Triton (interpreted on CPU) on a
# covering subset with small shapes.
FULL_BACKENDS = [b for b in ("torch", "cpu", "cuda") if b in runnable_backends("cuda" if torch.cuda.is_available() else "cpu")]
TRITON_AVAILABLE = "triton" in runnable_backends("cuda" if torch.cuda.is_available() else "cpu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend: str) -> str:
    """The device a test's inputs for `backend` go to: "cuda" for the GPU backends ("triton",
    "cuda") on a machine with a GPU, else "cpu" (the reference and C++ backends, and Triton under
    the interpreter, which runs on CPU tensors). Tests build inputs on CPU from seeded generators
    and move the base tensors here before taking layout views, so the values are the same on every
    machine and strided layouts stay strided on the GPU."""
    if backend not in ("triton", "cuda") or not torch.cuda.is_available():
        return "cpu"
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "cpu"  # interpreted Triton (set by hand on a GPU machine) runs on CPU tensors
    return "cuda"


@pytest.fixture(params=FULL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare with the float64 reference at the tolerance of `dtype` (atol times `scale`)."""
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True
    )


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout: contiguous, strided (a slice of a larger
    tensor), permuted (channels-last-like), or expanded (stride 0 along the first dim)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "strided":
        big = torch.empty((*t.shape[:-1], t.shape[-1] * 2 + 1), dtype=t.dtype, device=t.device)
        big[..., 1 : 1 + 2 * t.shape[-1] : 2] = t
        return big[..., 1 : 1 + 2 * t.shape[-1] : 2]
    if layout == "permuted":
        perm = list(range(t.dim()))[::-1]
        return t.permute(perm).contiguous().permute(perm)
    if layout == "expanded":
        return t[:1].expand_as(t)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "strided", "permuted", "expanded"]


@pytest.fixture
def as_on_gpu(monkeypatch):
    """Value checks as they run for GPU tensors: no host check, so `device_check` asserts instead (on
    CPU tensors torch._assert_async raises at once: what a GPU would assert is observable here)."""
    from wmkernels import _validation

    monkeypatch.setattr(_validation, "values_ok", lambda t: False)
