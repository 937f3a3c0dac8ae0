"""Contrastive-loss benchmark cases (issue 4): forward+backward of the eager formula (B x B logits,
two cross-entropies), its torch.compile, each wmkernels backend runnable on the device, and, on
GPU when importable, Inf-CL's `cal_flash_loss` once per direction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import wmkernels
from .harness import Case

_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton",)}


def runnable_backends(device: str) -> list[str]:
    status = wmkernels.available_backends()
    dev = torch.device(device).type
    return [b for b in _BACKENDS.get(dev, ()) if status[b].available and dev in status[b].devices]


def eager_formula(z1: torch.Tensor, z2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss as everybody writes it: normalize, B x B logits, two cross-entropies."""
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = scale * a @ b.T
    labels = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _fwd_bwd(loss_fn):
    """A contender: (loss, d z1, d z2, d scale) of one forward+backward. The gradients are returned
    as computed: an fp32 copy of bf16 ones would add its bytes to every contender's time and peak
    memory (the check compares in float64 anyway)."""
    def run(d):
        loss = loss_fn(d["z1"], d["z2"], d["scale"])
        grads = torch.autograd.grad(loss, (d["z1"], d["z2"], d["scale"]))
        return (loss.detach().float(), *grads)
    return run


def _infcl():
    """Inf-CL's one-direction flash loss applied in both directions, or None when not installed."""
    try:
        from inf_cl import cal_flash_loss
    except ImportError:
        return None

    def loss(z1, z2, scale):  # cal_flash_loss returns per-row losses (D must be a multiple of 256)
        a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        labels = torch.arange(z1.shape[0], device=z1.device)
        row, col = cal_flash_loss(a, b, labels, scale=scale), cal_flash_loss(b, a, labels, scale=scale)
        return 0.5 * (row.mean() + col.mean())

    return loss


# Positives z1 + noise at cosine ~0.45: a loss of a few nats, as in training. Closer pairs saturate
# the softmax (loss ~0.01), where bf16 eager's own gradients are 20% off and no check can be tight.
_NOISE = 2.0


def _atol(tol: float, rows: int) -> float:
    """The loss averages `rows` rows, so gradient elements are ~0.03 / rows (rms): an absolute
    tolerance below that (zeros fail), above the reference's own rounding of the small ones (bf16
    eager's; Inf-CL's, 6e-9 off float64 on one element of 67M at B = 262144, where the rms is
    1.9e-7: a tenth of tol / rows flagged it)."""
    return tol * 0.3 / rows


# GPU: torch.compile (a fresh compilation per shape) only up to this B; the eager formula above it is
# timed too (it runs out of memory at once where B x B does not fit).
_GPU_COMPILE_MAX_B = 16384


def _contenders(device: str, batch: int) -> dict:
    out = {"eager": _fwd_bwd(eager_formula)}
    if not device.startswith("cuda") or batch <= _GPU_COMPILE_MAX_B:
        out["compile"] = _fwd_bwd(torch.compile(eager_formula, dynamic=False))
    for b in runnable_backends(device):
        out[f"wmkernels-{b}"] = _fwd_bwd(lambda z1, z2, s, b=b: wmkernels.contrastive_loss(z1, z2, logit_scale=s, backend=b))
    infcl = _infcl() if device.startswith("cuda") else None
    if infcl is not None:
        out["infcl-flash"] = _fwd_bwd(infcl)
    return out


def _case(device: str, b: int, d: int, dtype: torch.dtype) -> Case:
    def setup():
        g = torch.Generator(device=device).manual_seed(b + d)
        z1 = torch.randn(b, d, device=device, dtype=dtype, generator=g)
        z2 = (z1 + _NOISE * torch.randn(b, d, device=device, dtype=dtype, generator=g)).requires_grad_()
        scale = torch.tensor(14.0, device=device, requires_grad=True)
        return {"z1": z1.requires_grad_(), "z2": z2, "scale": scale}

    es = torch.empty(0, dtype=dtype).element_size()
    contenders = _contenders(device, b)
    # Where B x B logits cannot fit (eager fails), Inf-CL is the reference the others are checked against.
    too_big = device.startswith("cuda") and b * b * es * 4 > torch.cuda.get_device_properties(0).total_memory
    reference = "infcl-flash" if too_big and "infcl-flash" in contenders else "eager"
    name = f"B{b}-D{d}-{str(dtype).removeprefix('torch.')}"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return Case(
        op="contrastive", name=name, size=b, setup=setup, contenders=contenders, reference=reference,
        bytes_moved=4 * b * d * es,  # read z1, z2 once, write d z1, d z2 once
        flops=6 * b * b * d,  # nominal: 2 B^2 D forward + 4 B^2 D backward (recomputation not credited)
        rtol=tol, atol=_atol(tol, b), params={"B": b, "D": d, "dtype": str(dtype).removeprefix("torch.")},
        dtype=str(dtype).removeprefix("torch."),
    )


def _gather_case(device: str, rows: int, world: int, d: int, dtype: torch.dtype) -> Case:
    """One rank's share of `distributed="gather"` (rank 0 of `world`): its `rows` against the
    gathered rows * world columns, one direction (the per-rank op that mode runs twice)."""
    n = rows * world

    def setup():
        g = torch.Generator(device=device).manual_seed(rows + n + d)
        z1 = torch.randn(rows, d, device=device, dtype=dtype, generator=g)
        z2 = torch.randn(n, d, device=device, dtype=dtype, generator=g)
        z2[:rows] = z1 + _NOISE * torch.randn(rows, d, device=device, dtype=dtype, generator=g)
        scale = torch.tensor(14.0, device=device, requires_grad=True)
        return {"z1": z1.requires_grad_(), "z2": z2.requires_grad_(), "scale": scale}

    def eager(z1, z2, scale):
        logits = scale * F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
        return F.cross_entropy(logits, torch.arange(z1.shape[0], device=z1.device))

    def ours(backend):
        from ..ops.contrastive import contrastive_loss_fn

        def loss(z1, z2, scale):
            labels = torch.arange(z1.shape[0], device=z1.device)
            return contrastive_loss_fn(z1, z2, scale, labels, labels[:0], 1.0, 0.0, 0.0, True, False, backend)[0].mean()
        return loss

    contenders = {"eager": _fwd_bwd(eager), "compile": _fwd_bwd(torch.compile(eager, dynamic=False))}
    contenders.update({f"wmkernels-{b}": _fwd_bwd(ours(b)) for b in runnable_backends(device)})
    es = torch.empty(0, dtype=dtype).element_size()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return Case(
        op="contrastive", name=f"gather-M{rows}-N{n}-D{d}-{str(dtype).removeprefix('torch.')}", size=rows * n,
        setup=setup, contenders=contenders, reference="eager", bytes_moved=2 * (rows + n) * d * es,
        flops=6 * rows * n * d, rtol=tol, atol=_atol(tol, rows), params={"M": rows, "N": n, "D": d},
        dtype=str(dtype).removeprefix("torch."),
    )


def cases(device: str, quick: bool) -> list[Case]:
    """Quick: B = 1024, D = 256 fp32. Full: B = 4096, 16384 x D = 256, 512 in fp32 on CPU; on GPU
    B = 16384 .. 262144 in bf16 (eager runs out of memory at the top; that row reports the error),
    and one rank's share of distributed="gather" (1024 local rows, 32 ranks, D = 256)."""
    if quick:
        return [_case(device, 1024, 256, torch.float32)]
    if torch.device(device).type == "cuda":
        return [_case(device, b, d, torch.bfloat16) for b in (16384, 65536, 262144) for d in (256, 512)] + [
            _gather_case(device, 1024, 32, 256, torch.bfloat16)]
    return [_case(device, b, d, torch.float32) for b in (4096, 16384) for d in (256, 512)]
