"""MSE benchmark cases (issue 2): forward+backward of eager `F.mse_loss`, `torch.compile`d
`F.mse_loss` and each wmkernels backend runnable on the device, with the memory floor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import wmkernels
from .harness import Case

_BACKENDS = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def runnable_backends(device: str) -> list[str]:
    status = wmkernels.available_backends()
    dev = torch.device(device).type
    return [b for b in _BACKENDS.get(dev, ("torch",))
            if b == "torch" or (status[b].available and dev in status[b].devices)]


def _fwd_bwd(loss_fn):
    """A contender: loss of (pred view, target view) and the gradient w.r.t. the whole pred."""
    def run(d):
        loss = loss_fn(d["view"](d["pred"]), d["target_view"](d["target"]))
        (grad,) = torch.autograd.grad(loss, d["pred"])
        return loss.detach(), grad
    return run


def _compiled_mse():
    """torch.compile of F.mse_loss, built on first call (importing inductor is slow; quick mode
    never calls it)."""
    compiled = []

    def run(x, y):
        if not compiled:
            compiled.append(torch.compile(lambda a, b: F.mse_loss(a, b), dynamic=False))
        return compiled[0](x, y)
    return run


def _contenders(device: str) -> dict:
    out = {"eager": _fwd_bwd(F.mse_loss), "compile": _fwd_bwd(_compiled_mse())}
    for b in runnable_backends(device):
        out[f"wmkernels-{b}"] = _fwd_bwd(lambda x, y, b=b: wmkernels.mse_loss(x, y, backend=b))
    return out


def _floor(d):
    """Read input and target once, write one gradient-sized output: the traffic a fused
    forward+backward cannot avoid (12 bytes per fp32 element)."""
    with torch.no_grad():
        return torch.sub(d["view"](d["pred"]), d["target_view"](d["target"]), out=d["floor_out"])


def _identity(t):
    return t


def _drop_last(t):
    return t[:, :-1]


def _drop_first(t):
    return t[:, 1:]


def _flat_case(device: str, n: int, dtype: torch.dtype, sweep: str | None, name: str | None = None) -> Case:
    def setup():
        pred = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        target = torch.randn(n, device=device, dtype=dtype)
        return {"pred": pred, "target": target, "view": _identity, "target_view": _identity,
                "floor_out": torch.empty(n, device=device, dtype=dtype)}

    es = torch.empty(0, dtype=dtype).element_size()
    return _case(name or f"flat-{_human(n)}-{_dt(dtype)}", n, dtype, setup, 3 * n * es, sweep,
                 {"shape": f"({n},)"})


def _next_frame_case(device: str, b: int, t: int, c: int, hw: int, dtype: torch.dtype) -> Case:
    shape = (b, t, c, hw, hw)

    def setup():
        pred = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        video = torch.randn(shape, device=device, dtype=dtype)
        floor_out = torch.empty((b, t - 1, c, hw, hw), device=device, dtype=dtype)
        return {"pred": pred, "target": video, "view": _drop_last, "target_view": _drop_first, "floor_out": floor_out}

    n_pred = b * t * c * hw * hw
    n = n_pred // t * (t - 1)
    es = torch.empty(0, dtype=dtype).element_size()
    # read pred[:, :-1] and video[:, 1:] once, write the gradient of the whole pred once
    return _case(f"next-frame-B{b}T{t}C{c}-{hw}x{hw}-{_dt(dtype)}", n, dtype, setup, (2 * n + n_pred) * es, None,
                 {"shape": str(shape), "layout": "pred[:, :-1] vs video[:, 1:]"})


def _case(name, n, dtype, setup, nbytes, sweep, params) -> Case:
    # Gradients are ~2|x - y| / n: the absolute tolerance scales with 1/n so it still means something.
    rtol = 1e-4 if dtype == torch.float32 else 1.6e-2
    return Case(op="mse", name=name, size=n, setup=setup, contenders={}, reference="eager", bytes_moved=nbytes,
                rtol=rtol, atol=rtol / max(n, 1), params={**params, "dtype": _dt(dtype)}, floor=_floor,
                sweep=sweep, dtype=_dt(dtype))


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _human(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else (f"{n >> 10}K" if n % (1 << 10) == 0 else str(n))


def cases(device: str, quick: bool) -> list[Case]:
    """Quick: 64K and 1M fp32, 1M bf16, a small next-frame clip. Full: 16M fp32 and bf16 (issue 2's
    shapes), next-frame B=8 T=16 C=3 128x128, and an fp32 size sweep 64K..16M for the plot."""
    f32, bf16 = torch.float32, torch.bfloat16
    if quick:
        out = [_flat_case(device, 1 << 16, f32, "float32"), _flat_case(device, 1 << 20, f32, "float32"),
               _flat_case(device, 1 << 20, bf16, None), _next_frame_case(device, 2, 4, 3, 32, f32)]
    else:
        out = [_flat_case(device, 1 << 24, f32, "float32"), _flat_case(device, 1 << 24, bf16, None),
               _next_frame_case(device, 8, 16, 3, 128, f32)]
        out += [_flat_case(device, n, f32, "float32") for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22)]
    for case in out:
        case.contenders = _contenders(device)
    return out
