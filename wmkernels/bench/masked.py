"""Masked video modeling benchmark cases (issue 3): forward+backward of the masked norm-pix MSE —
the eager pipeline (rearrange patchify, norm-pix, gather, MSE), the same under torch.compile, and
each wmkernels backend — plus the encoder-input patch gather from a uint8 video."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

import wmkernels
from wmkernels import masking
from .harness import Case

_BACKENDS = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}
_PATTERN = "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)"


def runnable_backends(device: str) -> list[str]:
    status = wmkernels.available_backends()
    dev = torch.device(device).type
    return [b for b in _BACKENDS.get(dev, ("torch",))
            if b == "torch" or (status[b].available and dev in status[b].devices)]


def eager_masked_loss(pred, video, ids_masked, tubelet, eps: float = 1e-6):
    """The reference pipeline: patchify the whole video in fp32, normalize every patch (MAE norm_pix),
    gather the masked patches, MSE against the predictions."""
    pt, ph, pw = tubelet
    x = rearrange(video.float(), _PATTERN, pt=pt, ph=ph, pw=pw)
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    target = (x - mean) / (var + eps) ** 0.5
    target = torch.gather(target, 1, ids_masked[..., None].expand(-1, -1, target.shape[-1]))
    return F.mse_loss(pred.float(), target)


def _fwd_bwd(loss_fn):
    def run(d):
        loss = loss_fn(d["pred"], d["video"], d["ids"], d["tubelet"])
        (grad,) = torch.autograd.grad(loss, d["pred"])
        return loss.detach().float(), grad
    return run


def _loss_contenders(device: str) -> dict:
    compiled = torch.compile(eager_masked_loss, dynamic=False)
    out = {"eager": _fwd_bwd(eager_masked_loss), "compile": _fwd_bwd(compiled)}
    for b in runnable_backends(device):
        out[f"wmkernels-{b}"] = _fwd_bwd(
            lambda p, v, i, t, b=b: wmkernels.masked_mse_loss(p, v, i, t, "BCTHW", norm_pix=True, backend=b)
        )
    return out


def _loss_case(device, b, c, t, hw, tubelet, ratio, dtype) -> Case:
    grid = (t // tubelet[0], hw // tubelet[1], hw // tubelet[2])
    p = math.prod(tubelet) * c
    m = t // tubelet[0] * int(ratio * grid[1] * grid[2])

    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        video = torch.randn((b, c, t, hw, hw), device=device, generator=g).to(dtype)
        masks = masking.tube(b, grid, ratio, device=device, generator=g)
        pred = torch.randn((b, m, p), device=device, generator=g).to(dtype).requires_grad_()
        return {"pred": pred, "video": video, "ids": masks.ids_masked, "tubelet": tubelet}

    es = torch.empty(0, dtype=dtype).element_size()
    rtol = 1e-4 if dtype == torch.float32 else 1.6e-2
    dt = str(dtype).removeprefix("torch.")
    name = f"loss-B{b}C{c}T{t}-{hw}x{hw}-{'x'.join(map(str, tubelet))}-tube{ratio}-{dt}"
    return Case(
        op="masked", name=name, size=b * m * p, setup=setup, contenders=_loss_contenders(device),
        reference="eager",
        # read the masked patches of the video and the predictions, write the prediction gradient
        bytes_moved=3 * b * m * p * es, rtol=rtol, atol=rtol / (b * m * p) * 4,
        params={"shape": f"video ({b}, {c}, {t}, {hw}, {hw}) BCTHW, pred ({b}, {m}, {p})",
                "mask": f"tube {ratio}", "norm_pix": "mae", "dtype": dt},
        dtype=dt,
    )


def eager_gather(video, ids, tubelet, mean, std):
    """Encoder input the usual way: normalize the whole uint8 video in fp32, patchify, gather."""
    pt, ph, pw = tubelet
    x = (video.float() - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    x = rearrange(x, _PATTERN, pt=pt, ph=ph, pw=pw)
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def _gather_case(device, b, c, t, hw, tubelet, ratio) -> Case:
    grid = (t // tubelet[0], hw // tubelet[1], hw // tubelet[2])
    k = math.prod(grid) - t // tubelet[0] * int(ratio * grid[1] * grid[2])
    p = math.prod(tubelet) * c
    mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std = (0.229 * 255, 0.224 * 255, 0.225 * 255)

    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        video = torch.randint(0, 256, (b, c, t, hw, hw), device=device, generator=g, dtype=torch.uint8)
        masks = masking.tube(b, grid, ratio, device=device, generator=g)
        return {"video": video, "ids": masks.ids_keep, "mean": torch.tensor(mean, device=device),
                "std": torch.tensor(std, device=device)}

    compiled = torch.compile(eager_gather, dynamic=False)
    contenders = {
        "eager": lambda d: eager_gather(d["video"], d["ids"], tubelet, d["mean"], d["std"]),
        "compile": lambda d: compiled(d["video"], d["ids"], tubelet, d["mean"], d["std"]),
    }
    for bk in runnable_backends(device):
        contenders[f"wmkernels-{bk}"] = lambda d, bk=bk: wmkernels.gather_patches(
            d["video"], d["ids"], tubelet, "BCTHW", mean=d["mean"], std=d["std"], backend=bk)
    return Case(
        op="masked", name=f"gather-uint8-B{b}C{c}T{t}-{hw}x{hw}-{'x'.join(map(str, tubelet))}-keep{1 - ratio:.2g}",
        size=b * k * p, setup=setup, contenders=contenders, reference="eager",
        bytes_moved=b * k * p * (1 + 4), rtol=1e-5, atol=1e-5,
        params={"shape": f"video ({b}, {c}, {t}, {hw}, {hw}) uint8 BCTHW, out ({b}, {k}, {p}) fp32",
                "dtype": "uint8->float32"},
        dtype="float32",
    )


def cases(device: str, quick: bool) -> list[Case]:
    """Full: VideoMAE-B shapes scaled to one machine (B=2, C=3, T=16, 224x224, tubelet 2x16x16,
    tube mask 0.9, P=1536) in fp32 and bf16, and the encoder-input gather. Quick: T=4, 64x64."""
    tub = (2, 16, 16)
    if quick:
        return [_loss_case(device, 1, 3, 4, 64, tub, 0.9, torch.float32),
                _loss_case(device, 1, 3, 4, 64, tub, 0.9, torch.bfloat16),
                _gather_case(device, 1, 3, 4, 64, tub, 0.9)]
    return [_loss_case(device, 2, 3, 16, 224, tub, 0.9, torch.float32),
            _loss_case(device, 2, 3, 16, 224, tub, 0.9, torch.bfloat16),
            _gather_case(device, 2, 3, 16, 224, tub, 0.9)]
