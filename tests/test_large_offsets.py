"""64-bit offsets: the masked video ops and the contrastive loss on tensors whose elements sit past
2^31 (and 2^32) elements into their storage, and on outputs of more than 2^31 elements.

A huge `torch.empty` storage is only reserved: untouched pages cost no memory, so a sparse view
with far strides (or a contiguous video where only the gathered patches are written) reaches
offsets past 2^32 for a few MB. Each result is compared bit for bit with the same backend on the
view's small contiguous copy, and with the torch reference.
"""
import numpy as np
import pytest
import torch

import wmkernels
from wmkernels import masking
from wmkernels.reference import masked as ref
from conftest import TOL, TRITON_AVAILABLE, device_for, runnable_backends

# Triton only where it runs on CPU tensors (the interpreter, slow): on a GPU these storages would be real.
BACKENDS = (["cpu"] if "cpu" in runnable_backends("cpu") else []) + (
    [pytest.param("triton", marks=pytest.mark.slow)] if TRITON_AVAILABLE and device_for("triton") == "cpu" else [])
FAR = 2**31 + 7  # a stride that puts the second element along its dim past 2^31
TUB = (2, 16, 16)
P = 2 * 16 * 16 * 3


def reserve(numel: int, dtype: torch.dtype) -> torch.Tensor:
    try:
        return torch.empty(numel, dtype=dtype)
    except RuntimeError as e:  # a host that does not overcommit memory cannot reserve it
        pytest.skip(f"cannot reserve {numel} elements of {dtype}: {e}")


def far_view(shape, strides, dtype, seed=0, offset=3) -> torch.Tensor:
    """A view (seeded random values) of `shape` / `strides` into a reserved storage."""
    numel = offset + sum((s - 1) * st for s, st in zip(shape, strides)) + 1
    v = reserve(numel, dtype).as_strided(shape, strides, offset)
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        v.copy_(torch.randint(1, 256, shape, generator=g, dtype=torch.uint8))
    else:
        v.copy_(torch.randn(shape, generator=g).to(dtype))
    return v


def far_video(dtype, layout, B=2, C=3, T=4, H=32, W=32):
    """(B, C, H, W) blocks per frame, frames FAR apart (uint8: frame 3 past 2^32; bf16: frames
    FAR / 2 apart, frame 3 past 2^31 elements; 6.4 GB reserved either way)."""
    st = FAR if dtype == torch.uint8 else FAR // 2
    sb, sc = C * H * W, H * W
    if layout == "BCTHW":
        return far_view((B, C, T, H, W), (sb, sc, st, W, 1), dtype)
    return far_view((B, T, C, H, W), (sb, st, sc, W, 1), dtype)


def assert_matches(got, same_backend, reference):
    """Bit for bit the backend's result on the contiguous copy; the reference within got's dtype."""
    assert torch.equal(got, same_backend)
    torch.testing.assert_close(got.double(), reference.double(), **TOL[got.dtype])


@pytest.mark.parametrize("layout", ["BCTHW", "BTCHW"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_patches_far_view(backend, dtype, layout):
    video = far_video(dtype, layout)
    small = video.contiguous()
    ids = torch.tensor([[7, 0, 5, 2, 6], [4, 3, 1, 7, 6]])  # tokens 4..7 are in frames 2..3
    stats = dict(mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
    got, same, want = (wmkernels.gather_patches(v, ids, TUB, layout, dtype=torch.float32, backend=be, **stats)
                       for v, be in ((video, backend), (small, backend), (small, "torch")))
    assert_matches(got, same, want)
    if dtype.is_floating_point:
        grad = torch.randn(2, 5, P, generator=torch.Generator().manual_seed(1)).to(dtype)
        gv = []
        for v, be in ((video, backend), (small, backend), (small, "torch")):
            v = v.detach().requires_grad_()
            wmkernels.gather_patches(v, ids, TUB, layout, backend=be).backward(grad)
            gv.append(v.grad)
        assert_matches(*gv)


@pytest.mark.parametrize("kind", ["ids", "mask"])
@pytest.mark.parametrize("norm_mode", ["mae", "videomae"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mse_far_view(backend, dtype, norm_mode, kind):
    video = far_video(dtype, "BCTHW", B=1)  # one sample: the interpreted Triton runs a program per row
    m = masking.random(1, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(2))
    index = m.ids_masked if kind == "ids" else m.mask
    pred = torch.randn(1, index.shape[1], P, generator=torch.Generator().manual_seed(3))
    stats = dict(mean=(100.0, 120.0, 140.0), std=(50.0, 60.0, 70.0)) if dtype == torch.uint8 else {}
    out = []
    for v, be in ((video, backend), (video.contiguous(), backend), (video.contiguous(), "torch")):
        p = pred.clone().requires_grad_()
        v = v.detach().requires_grad_(v.is_floating_point())
        loss = wmkernels.masked_mse_loss(p, v, index, TUB, norm_mode=norm_mode, backend=be, **stats)
        loss.backward(torch.tensor(1.5))
        out.append((loss.detach(), p.grad, v.grad))
    for i in range(2 if dtype == torch.uint8 else 3):
        assert_matches(*(o[i] for o in out))


@pytest.mark.parametrize("layout", ["BCTHW", "BTCHW"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_video_past_2_pow_31(backend, layout):
    """A contiguous uint8 video of 2.2e9 elements: sample 1 starts past 2^30, its last patches
    end past 2^31. Only the gathered patches are written."""
    B, C, T, H, W = 2, 3, 16, 4800, 4800
    shape = (B, C, T, H, W) if layout == "BCTHW" else (B, T, C, H, W)
    video = reserve(B * C * T * H * W, torch.uint8).view(shape)
    gt, gh, gw = T // 2, H // 16, W // 16
    last = gt * gh * gw - 1
    toks = [last, last - 1, last - gw, (gt - 1) * gh * gw, 0, gh * gw - 1]
    ids = torch.tensor([toks, toks[::-1]])
    g = torch.Generator().manual_seed(4)
    patches = []
    for b in range(B):
        for n in ids[b].tolist():
            t, h, w = n // (gh * gw), (n // gw) % gh, n % gw
            box = (slice(b, b + 1), slice(None), slice(2 * t, 2 * t + 2), slice(16 * h, 16 * h + 16),
                   slice(16 * w, 16 * w + 16))
            if layout == "BTCHW":
                box = (box[0], box[2], box[1], *box[3:])
            cut = video[box]
            cut.copy_(torch.randint(1, 256, cut.shape, generator=g, dtype=torch.uint8))
            patches.append(ref.patchify(cut, TUB, layout)[0, 0])
    want = torch.stack(patches).view(B, len(toks), P)
    torch.testing.assert_close(wmkernels.gather_patches(video, ids, TUB, layout, backend=backend), want.float(),
                               rtol=0, atol=0)
    # the same patches as a small video of one token row, ids 0..K-1, through the torch reference
    small = ref.unpatchify(want, (1, 1, len(toks)), TUB, layout)
    small_ids = torch.arange(len(toks)).expand(B, -1).contiguous()
    pred = torch.randn(B, len(toks), P, generator=g)
    for norm_mode in ("mae", "videomae"):
        res = []
        for v, i, be in ((video, ids, backend), (small, small_ids, "torch")):
            p = pred.clone().requires_grad_()
            loss = wmkernels.masked_mse_loss(p, v, i, TUB, layout, norm_mode=norm_mode, backend=be)
            loss.backward()
            res.append((loss.detach(), p.grad))
        for got, ref_ in zip(*res):
            torch.testing.assert_close(got, ref_, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unshuffle_far_views(backend, dtype):
    far = FAR if dtype.itemsize == 2 else FAR // 2
    B, N, K, D = 3, 8, 3, 16
    visible = far_view((B, K, D), (far, D, 1), dtype, seed=5)         # sample 2 past 2^32
    pos = far_view((1, N, D), (1, far // 4, 1), dtype, seed=6)         # token 7 past 2^31
    token = far_view((D,), (far // 8,), dtype, seed=7)                 # value 15 past 2^31
    ids = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(s)) for s in range(B)])
    grad = torch.linspace(-1, 1, B * N * D).view(B, N, D).to(dtype)
    out = []
    for args, be in (((visible, token, pos), backend), ([t.contiguous() for t in (visible, token, pos)], backend),
                     ([t.contiguous() for t in (visible, token, pos)], "torch")):
        args = [t.detach().requires_grad_() for t in args]
        y = wmkernels.unshuffle_with_mask_tokens(*args[:2], ids, args[2], backend=be)
        y.backward(grad)
        out.append((y.detach(), *(t.grad for t in args)))
    for i in range(4):
        assert_matches(*(o[i] for o in out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_far_views(backend, dtype):
    far = FAR if dtype.itemsize == 2 else FAR // 2
    z1 = far_view((4, 8), (far, 1), dtype, seed=8)        # rows 2, 3 past 2^32 (bf16) / 2^31 (fp32)
    z2 = far_view((4, 8), (1, far // 4), dtype, seed=9)   # features 5..7 past 2^31
    out = []
    for a, b, be in ((z1, z2, backend), (z1.contiguous(), z2.contiguous(), backend),
                     (z1.contiguous(), z2.contiguous(), "torch")):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        r = wmkernels.contrastive_loss(a, b, temperature=0.1, label_smoothing=0.1, return_accuracy=True, backend=be)
        r.loss.backward()
        out.append((r.loss.detach(), r.accuracy, a.grad, b.grad))
    for i in range(4):
        assert torch.equal(out[0][i], out[1][i])
    for i in (0, 2, 3):  # not the accuracy: Triton's bf16 rounding of the rows may flip a near tie
        torch.testing.assert_close(out[0][i].double(), out[2][i].double(), **TOL[torch.bfloat16])


@pytest.mark.slow
@pytest.mark.parametrize("op", ["gather_patches", "masked_mse_loss", "unshuffle_with_mask_tokens"])
def test_outputs_past_2_pow_31_elements(op):
    """(B, K, P) and (B, N, D) outputs and gradients of 2^31+ bf16 elements (4.3 GB each) on the
    cpu backend; the rows past 2^31 are checked against a per-row reference."""
    if "cpu" not in runnable_backends("cpu"):
        pytest.skip("needs the cpu backend")
    g = torch.Generator().manual_seed(10)
    K = 2**30 // P + 1  # 2 * K * P > 2^31
    if op == "gather_patches":
        video = torch.randint(0, 256, (2, 3, 2, 16, 16 * 64), generator=g, dtype=torch.uint8)
        ids = torch.randint(0, 64, (2, K), generator=g)
        out = wmkernels.gather_patches(video, ids, TUB, dtype=torch.bfloat16, backend="cpu")
        x = ref.patchify(video, TUB, "BCTHW").bfloat16()
        for b in range(2):
            assert torch.equal(out[b, -3:], x[b, ids[b, -3:]])
    elif op == "masked_mse_loss":
        video = torch.randn(2, 3, 2, 16, 16 * 64, generator=g)
        ids = torch.randint(0, 64, (2, K), generator=g)
        # zeros from calloc: fresh pages, not touched until the last rows are written
        pred = torch.from_numpy(np.zeros(2 * K * P, dtype=np.int16)).view(torch.bfloat16).view(2, K, P)
        pred[:, -1] = torch.randn(2, P, generator=g).bfloat16()
        pred.requires_grad_()
        loss = wmkernels.masked_mse_loss(pred, video, ids, TUB, backend="cpu")
        y = ref.patchify(video, TUB, "BCTHW").double()
        y = (y - y.mean(-1, keepdim=True)) / (y.var(-1, keepdim=True) + 1e-6).sqrt()
        p_last = pred[:, -1].detach().double()
        y_last = torch.stack([y[b, ids[b, -1]] for b in range(2)])
        row = (y**2).mean(-1).gather(1, ids)  # the loss of a zero prediction per row
        want = (row[:, :-1].sum() + ((p_last - y_last) ** 2).mean(-1).sum()) / (2 * K)
        torch.testing.assert_close(loss.detach().double(), want, **TOL[torch.bfloat16])
        loss.backward()
        grad = pred.grad
        del pred
        torch.testing.assert_close(grad[:, -1].double(), 2 * (p_last - y_last) / (P * 2 * K), **TOL[torch.bfloat16])
    else:
        D, V = 1024, 4
        N = 2**31 // D + 8
        visible = torch.randn(1, V, D, generator=g).bfloat16()
        token = torch.randn(D, generator=g).bfloat16()
        ids = torch.cat([torch.arange(V, N), torch.arange(V)]).view(1, N)  # the visible rows land last
        out = wmkernels.unshuffle_with_mask_tokens(visible, token, ids, backend="cpu")
        assert torch.equal(out[0, -V:], visible[0])
        assert torch.equal(out[0, :2], token.expand(2, D))
