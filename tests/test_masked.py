"""Masked video modeling: masks, gather_patches, unshuffle_with_mask_tokens, masked_mse_loss.

Every backend against an independent float64 einops pipeline (values and gradients), masks for
exact counts / tube property / determinism, unshuffle bit for bit, bad inputs.
"""
import itertools
import math
import os

import numpy as np
import pytest
import torch
from einops import rearrange

import wmkernels
from wmkernels import masking
from conftest import FULL_BACKENDS, TOL, TRITON_AVAILABLE, device_for, make_layout

VIDEO = {"BCTHW": "b c (t pt) (h ph) (w pw)", "BTCHW": "b (t pt) c (h ph) (w pw)"}
# (tubelet, (T, H, W)): small videos; 4x4x4 with an odd 3x5x7 grid.
TUBELETS = [((2, 16, 16), (4, 32, 32)), ((1, 16, 16), (2, 32, 16)), ((2, 8, 8), (4, 16, 24)), ((4, 4, 4), (12, 20, 28))]
VIDEO_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8]
BACKENDS = FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else [])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # on a GPU the Triton kernels run the full matrix


def make_video(b, c, thw, layout, dtype, seed=0, view="contiguous", device="cpu"):
    """Generated on CPU (the same values on every machine), moved to `device`, then laid out."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = thw
    shape = (b, c, t, h, w) if layout == "BCTHW" else (b, t, c, h, w)
    if dtype == torch.uint8:
        v = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        v = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    v = v.to(device)
    return make_layout(v, view) if view != "contiguous" else v


def ref_patches(video64, tubelet, layout, mean=None, std=None):
    """float64 (B, N, (pt ph pw) c) patches of the (normalized) video, written independently."""
    cdim = 1 if layout == "BCTHW" else 2
    shape = [1] * 5
    shape[cdim] = video64.shape[cdim]
    if mean is not None:
        video64 = video64 - torch.tensor(mean, dtype=torch.float64).view(shape)
    if std is not None:
        video64 = video64 / torch.tensor(std, dtype=torch.float64).view(shape)
    pt, ph, pw = tubelet
    return rearrange(video64, f"{VIDEO[layout]} -> b (t h w) (pt ph pw) c", pt=pt, ph=ph, pw=pw)


def ref_loss(pred64, video64, index, tubelet, layout, norm_pix, norm_mode, eps, mean=None, std=None):
    x = ref_patches(video64, tubelet, layout, mean, std)  # b n q c
    if norm_pix and norm_mode == "videomae":
        x = (x - x.mean(-2, keepdim=True)) / (x.std(-2, unbiased=True, keepdim=True) + eps)
    x = x.flatten(-2)
    if norm_pix and norm_mode == "mae":
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=True, keepdim=True) + eps) ** 0.5
    if index.dtype == torch.bool:
        per = ((pred64 - x) ** 2).mean(-1)
        return (per * index).sum() / index.sum()
    target = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
    return ((pred64 - target) ** 2).mean()


def close(actual, expected, dtype):
    """assert_close at the tolerance of `dtype`, relative to the largest expected magnitude (compared
    on the expected's device: the float64 references run on CPU)."""
    tol = TOL[torch.float32 if dtype == torch.uint8 else dtype]
    scale = expected.abs().max().clamp_min(1e-30)
    actual = actual.double().to(expected.device)
    torch.testing.assert_close(actual / scale, expected.double() / scale, rtol=tol["rtol"], atol=tol["atol"] * 4)


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("kind", ["random", "tube", "block"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(8, 14, 14), (3, 5, 7), (1, 1, 2), (1, 7, 7)])
def test_mask_counts_and_ids(kind, ratio, grid):
    m = getattr(masking, kind)(4, grid, ratio, generator=torch.Generator().manual_seed(1))
    t, h, w = grid
    n = t * h * w
    k = {"tube": t * int(ratio * h * w), "random": n - int(n * (1 - ratio)), "block": int(ratio * n)}[kind]
    assert m.mask.shape == (4, n) and m.mask.dtype == torch.bool
    assert (m.mask.sum(1) == k).all()
    assert m.ids_masked.shape == (4, k) and m.ids_keep.shape == (4, n - k)
    for x in (m.ids_keep, m.ids_masked, m.ids_restore):
        assert x.dtype == torch.int64
    assert m.mask.gather(1, m.ids_masked).all() and not m.mask.gather(1, m.ids_keep).any()
    shuffle = torch.cat([m.ids_keep, m.ids_masked], 1)
    assert torch.equal(shuffle.gather(1, m.ids_restore), torch.arange(n).expand(4, n))
    assert (m.ids_keep.diff(dim=1) > 0).all() and (m.ids_masked.diff(dim=1) > 0).all()
    if kind == "tube":
        per_slot = m.mask.view(4, t, h * w)
        assert (per_slot == per_slot[:, :1]).all()


@pytest.mark.parametrize("kind", ["random", "tube", "block"])
def test_mask_seeded_determinism(kind):
    fn = getattr(masking, kind)
    a = fn(3, (4, 6, 6), 0.8, generator=torch.Generator().manual_seed(7))
    b = fn(3, (4, 6, 6), 0.8, generator=torch.Generator().manual_seed(7))
    c = fn(3, (4, 6, 6), 0.8, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    assert not torch.equal(a.mask, c.mask)
    assert not torch.equal(a.mask[0], a.mask[1])  # samples differ


def test_block_mask_prefers_blocks():
    """The masked set is the union of 3D boxes when the ratio equals the union's size."""
    g = torch.Generator().manual_seed(3)
    m = masking.block(2, (4, 8, 8), 0.3, num_blocks=1, spatial_scale=(0.25, 0.25), temporal_scale=(0.5, 0.5),
                      aspect_ratio=(1.0, 1.0), generator=g)
    for row in m.mask.view(2, 4, 8, 8):
        # int(0.3 * 256) = 76 tokens >= the 2x4x4 box: the whole box is masked
        assert row.sum() == 76
        assert any(
            row[t0:t0 + 2, h0:h0 + 4, w0:w0 + 4].all()
            for t0, h0, w0 in itertools.product(range(3), range(5), range(5))
        )


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_mask_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        masking.tube(2, (2, 4, 4), ratio)


def test_mask_numpy_arguments_and_block_ranges():
    """Sizes and ratios read from numpy arrays or configs work; a malformed range names its argument."""
    np = pytest.importorskip("numpy")
    for kind in ("random", "tube", "block"):
        fn = getattr(masking, kind)
        a = fn(np.int64(2), tuple(np.array([2, 3, 4])), np.float64(0.5), generator=torch.Generator().manual_seed(1))
        b = fn(2, (2, 3, 4), 0.5, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    for name in ("spatial_scale", "temporal_scale", "aspect_ratio"):
        for bad in ((0.5,), (0.5, 0.2), None):
            with pytest.raises(ValueError, match=name):
                masking.block(2, (2, 4, 4), 0.5, **{name: bad})
    with pytest.raises(ValueError, match="ratio"):
        masking.random(2, (2, 4, 4), True)


def test_mask_bad_grid_and_generator():
    with pytest.raises(ValueError, match="grid"):
        masking.random(2, (2, 4), 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        masking.random(0, (2, 4, 4), 0.5)
    assert masking.grid_size((2, 3, 16, 224, 224), (2, 16, 16)) == (8, 14, 14)
    assert masking.grid_size((2, 16, 3, 224, 224), (2, 16, 16), "BTCHW") == (8, 14, 14)


# ----------------------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tubelet,thw", TUBELETS, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("layout", ["BCTHW", "BTCHW"])
@pytest.mark.parametrize("vdtype", VIDEO_DTYPES, ids=str)
def test_gather_patches(backend, tubelet, thw, layout, vdtype):
    if backend == "triton" and INTERPRETED and (tubelet[1] == 16 or vdtype in (torch.float16, torch.float64)):
        pytest.skip("Triton under the interpreter: covering subset on small shapes (a GPU runs them all)")
    if backend == "triton":
        thw = TRITON_THW.get(tubelet, thw)
    dev = device_for(backend)
    video = make_video(2, 3, thw, layout, vdtype, view="strided" if vdtype == torch.float32 else "contiguous",
                       device=dev)
    grid = masking.grid_size(video.shape, tubelet, layout)
    m = masking.random(2, grid, 0.6, generator=torch.Generator().manual_seed(0))  # on CPU, for the reference
    norm = vdtype == torch.uint8 or vdtype == torch.bfloat16
    mean, std = ((120.0, 110.0, 100.0), (60.0, 58.0, 57.0)) if norm else (None, None)
    vid = video.detach().requires_grad_(video.is_floating_point())
    out = wmkernels.gather_patches(vid, m.ids_keep.to(dev), tubelet, layout, mean=mean, std=std, backend=backend)
    want = ref_patches(video.cpu().double(), tubelet, layout, mean, std).flatten(-2)
    want = torch.gather(want, 1, m.ids_keep[..., None].expand(-1, -1, want.shape[-1]))
    assert out.dtype == (torch.float32 if vdtype == torch.uint8 else vdtype)
    if not norm:
        assert torch.equal(out.double().cpu(), want)  # a pure gather is exact
    close(out, want, vdtype)
    if vid.requires_grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * g.to(out.dtype).to(dev)).sum().backward()
        v64 = video.cpu().double().requires_grad_()
        w = ref_patches(v64, tubelet, layout, mean, std).flatten(-2)
        (torch.gather(w, 1, m.ids_keep[..., None].expand(-1, -1, w.shape[-1])) * g.to(out.dtype).double()).sum().backward()
        close(vid.grad, v64.grad, vdtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_repeated_ids_accumulate(backend):
    dev = device_for(backend)
    video = make_video(1, 2, (2, 8, 8), "BCTHW", torch.float32, device=dev).requires_grad_()
    ids = torch.tensor([[1, 1, 3, 1]])
    out = wmkernels.gather_patches(video, ids.to(dev), (1, 4, 4), backend=backend)
    out.sum().backward()
    v64 = video.detach().cpu().double().requires_grad_()
    p = rearrange(v64, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=1, ph=4, pw=4)
    p[:, ids[0]].sum().backward()
    assert torch.equal(video.grad.double().cpu(), v64.grad)


@pytest.mark.parametrize("layout", ["BCTHW", "BTCHW"])
def test_patchify_roundtrip(layout):
    video = make_video(2, 3, (4, 8, 12), layout, torch.float32)
    tokens = wmkernels.patchify(video, (2, 4, 4), layout)
    assert tokens.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
    assert torch.equal(tokens, ref_patches(video.double(), (2, 4, 4), layout).flatten(-2).float())
    assert torch.equal(wmkernels.unpatchify(tokens, (2, 2, 3), (2, 4, 4), layout), video)


# -------------------------------------------------------------------------------------------- unshuffle


def mae_unshuffle(visible, mask_token, ids_restore, pos_embed):
    b, k, d = visible.shape
    tokens = mask_token.reshape(1, 1, d).expand(b, ids_restore.shape[1] - k, d)
    x = torch.cat([visible, tokens], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    return x + pos_embed if pos_embed is not None else x


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu", "triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("pos", ["none", "shared", "per_sample"])
def test_unshuffle_bit_exact(backend, dtype, pos):
    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    m = masking.tube(2, (2, 3, 5), 0.75, generator=g)  # on CPU, for the reference
    d = 24
    visible = torch.randn(2, m.num_keep, d, generator=g).to(dtype).to(dev).requires_grad_()
    token = torch.randn(1, 1, d, generator=g).to(dtype).to(dev).requires_grad_()
    pshape = {"none": None, "shared": (1, 30, d), "per_sample": (2, 30, d)}[pos]
    pe = torch.randn(pshape, generator=g).to(dtype).to(dev).requires_grad_() if pshape else None
    out = wmkernels.unshuffle_with_mask_tokens(visible, token, m.ids_restore.to(dev), pe, backend=backend)
    want = mae_unshuffle(visible.detach().cpu(), token.detach().cpu(), m.ids_restore,
                         pe.detach().cpu() if pe is not None else None)
    assert out.dtype == dtype and torch.equal(out.cpu(), want)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * go.to(dtype).to(dev)).sum().backward()
    leaves = [t for t in (visible, token, pe) if t is not None]
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    (mae_unshuffle(*ref_leaves[:2], m.ids_restore, ref_leaves[2] if pe is not None else None)
     * go.to(dtype).double()).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        close(a.grad, b.grad, dtype)


# ------------------------------------------------------------------------------------------------- loss

LOSS_CASES = [
    # (tubelet, thw, layout, norm_pix, norm_mode, index kind, ratio)
    ((2, 16, 16), (4, 32, 32), "BCTHW", True, "mae", "ids", 0.9),
    ((1, 16, 16), (2, 32, 16), "BTCHW", True, "videomae", "ids", 0.75),
    ((2, 8, 8), (4, 16, 24), "BCTHW", True, "videomae", "mask", 0.5),
    ((2, 8, 8), (4, 16, 24), "BTCHW", False, "mae", "ids", 0.75),
    ((4, 4, 4), (12, 20, 28), "BTCHW", True, "mae", "mask", 0.9),
    ((4, 4, 4), (12, 20, 28), "BCTHW", True, "videomae", "ids", 0.5),
]


# The Triton interpreter runs one program per patch: smaller odd grids for it (2x3x5 tokens).
TRITON_THW = {(4, 4, 4): (8, 12, 20)}


def _loss_inputs(case, pdtype, vdtype, view, backend="torch"):
    """(video, index, pred) on `device_for(backend)`, generated on CPU."""
    tubelet, thw, layout, norm_pix, norm_mode, kind, ratio = case
    if backend == "triton":
        thw = TRITON_THW.get(tubelet, thw)
    dev = device_for(backend)
    video = make_video(2, 3, thw, layout, vdtype, seed=2, view=view, device=dev)
    grid = masking.grid_size(video.shape, tubelet, layout)
    m = masking.tube(2, grid, ratio, generator=torch.Generator().manual_seed(5))
    index = m.ids_masked if kind == "ids" else m.mask
    p = math.prod(tubelet) * 3
    rows = index.shape[1]
    pred = torch.randn(2, rows, p, generator=torch.Generator().manual_seed(6)).to(pdtype).to(dev)
    return video, index.to(dev), pred


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[2]}-{c[4] if c[3] else 'raw'}-{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8], ids=str)
def test_masked_mse_loss(backend, case, dtype):
    """dtype: of pred and video; uint8 = fp32 pred with a uint8 video and per-channel mean/std."""
    if backend == "triton" and INTERPRETED and (case[0][1] == 16 or dtype in (torch.float16, torch.float64)):
        pytest.skip("Triton under the interpreter: covering subset on small shapes (a GPU runs them all)")
    tubelet, _, layout, norm_pix, norm_mode, _, _ = case
    pdtype = torch.float32 if dtype == torch.uint8 else dtype
    view = "permuted" if dtype == torch.float32 else "contiguous"
    video, index, pred = _loss_inputs(case, pdtype, dtype, view, backend)
    mean, std = ((120.0, 110.0, 100.0), (60.0, 58.0, 57.0)) if dtype == torch.uint8 else (None, None)
    pred = pred.requires_grad_()
    vid = video.detach().requires_grad_(video.is_floating_point())
    loss = wmkernels.masked_mse_loss(pred, vid, index, tubelet, layout, norm_pix=norm_pix, norm_mode=norm_mode,
                                     mean=mean, std=std, backend=backend)
    # the float64 reference runs on CPU
    p64 = pred.detach().cpu().double().requires_grad_()
    v64 = video.cpu().double().requires_grad_()
    want = ref_loss(p64, v64, index.cpu(), tubelet, layout, norm_pix, norm_mode, 1e-6, mean, std)
    assert loss.dtype == pdtype and loss.shape == ()
    close(loss, want, pdtype)
    grads = torch.autograd.grad(loss * 3.0, [t for t in (pred, vid) if t.requires_grad])
    want_grads = torch.autograd.grad(want * 3.0, [p64, v64] if vid.requires_grad else [p64])
    for a, b in zip(grads, want_grads):
        close(a, b, pdtype)
    if index.dtype == torch.bool:
        assert (grads[0][~index] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_mode", ["mae", "videomae"])
def test_masked_mse_loss_constant_patches(backend, norm_mode):
    """Constant patches (black borders) and constant channels: finite gradients equal to the float64
    autograd of torch.std (whose gradient at std = 0 is taken as 0)."""
    dev = device_for(backend)
    video = make_video(2, 3, (2, 4, 8), "BCTHW", torch.float32, seed=3)
    video[0] = 0.5  # every patch of sample 0 constant
    video[1, 1, :, :, :4] = -2.0  # in sample 1, channel 1 constant in the first patch of each row
    m = masking.random(2, (1, 2, 4), 0.5, generator=torch.Generator().manual_seed(4))
    pred = torch.randn(2, m.num_masked, 2 * 2 * 2 * 3, generator=torch.Generator().manual_seed(5))
    p, v = pred.to(dev).requires_grad_(), video.to(dev).requires_grad_()
    loss = wmkernels.masked_mse_loss(p, v, m.ids_masked.to(dev), (2, 2, 2), norm_mode=norm_mode, backend=backend)
    grads = torch.autograd.grad(loss, [p, v])
    p64, v64 = pred.double().requires_grad_(), video.double().requires_grad_()
    want = ref_loss(p64, v64, m.ids_masked, (2, 2, 2), "BCTHW", True, norm_mode, 1e-6)
    close(loss, want, torch.float32)
    for a, b in zip(grads, torch.autograd.grad(want, [p64, v64])):
        assert torch.isfinite(a).all()
        close(a, b, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_mode", ["mae", "videomae"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_flat_colour_patches_have_zero_targets(backend, norm_mode, dtype):
    """A flat patch (every value of a group equal) normalizes to exactly 0, as in float64: a
    rounded mean (sum / n) left 1e-7 of noise that eps = 1e-6 on sigma scaled to targets of 0.3
    (VideoMAE's setting: uint8 video read in [0, 1] units, 223/255 among the worst colours)."""
    dev = device_for(backend)
    tub, cols = (2, 16, 16), torch.arange(0, 256, 8)  # 32 flat patches of different colours
    video = torch.empty(1, 3, 2, 16, 16 * len(cols), dtype=torch.float32)
    for i, k in enumerate(cols.tolist()):
        for c in range(3):
            video[0, c, :, :, 16 * i:16 * (i + 1)] = k if norm_mode == "mae" else (k + 223 * c) % 256  # a flat group
    std = (255.0,) * 3
    if dtype != torch.uint8:
        video, std = video / 255, None
    ids = torch.arange(len(cols))[None]
    pred = torch.zeros(1, len(cols), 2 * 16 * 16 * 3, requires_grad=True)
    loss = wmkernels.masked_mse_loss(pred.to(dev), video.to(dtype).to(dev), ids.to(dev), tub, norm_mode=norm_mode,
                                     std=std, backend=backend)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mse_loss_grad_out_one_and_deterministic(backend):
    case = LOSS_CASES[2] if backend == "triton" else LOSS_CASES[4]
    video, index, pred = _loss_inputs(case, torch.float32, torch.float32, "contiguous", backend)
    pred.requires_grad_()
    l1 = wmkernels.masked_mse_loss(pred, video, index, case[0], case[2], backend=backend)
    (g1,) = torch.autograd.grad(l1, pred)
    l2 = wmkernels.masked_mse_loss(pred, video, index, case[0], case[2], backend=backend)
    (g2,) = torch.autograd.grad(l2, pred)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_masked_mse_loss_compiles(backend):
    video, index, pred = _loss_inputs(LOSS_CASES[2], torch.float32, torch.float32, "contiguous", backend)
    pred.requires_grad_()

    def f(pred, video, index):
        return wmkernels.masked_mse_loss(pred, video, index, (2, 8, 8), "BCTHW", norm_mode="videomae", backend=backend)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(pred, video, index)
    want = f(pred, video, index)
    torch.testing.assert_close(out, want)
    (g,) = torch.autograd.grad(out * 2, pred)
    (g_want,) = torch.autograd.grad(want * 2, pred)
    torch.testing.assert_close(g, g_want)


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    video = make_video(2, 3, (4, 16, 16), "BCTHW", torch.float32)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="not divisible by the tubelet"):
        wmkernels.gather_patches(video, ids, (3, 8, 8))
    with pytest.raises(ValueError, match="layout"):
        wmkernels.gather_patches(video, ids, (2, 8, 8), "BHWCT")
    with pytest.raises(ValueError, match="tubelet"):
        wmkernels.gather_patches(video, ids, (2, 8))
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 8\)"):
        wmkernels.gather_patches(video, torch.full((2, 3), 8), (2, 8, 8))
    with pytest.raises(ValueError, match="ids: expected values"):
        wmkernels.gather_patches(video, torch.full((2, 3), -1), (2, 8, 8))
    with pytest.raises(TypeError, match="ids: expected dtype torch.int64"):
        wmkernels.gather_patches(video, ids.int(), (2, 8, 8))
    with pytest.raises(ValueError, match="ids: expected shape"):
        wmkernels.gather_patches(video, ids[:1], (2, 8, 8))
    with pytest.raises(ValueError, match="mean: expected 3"):
        wmkernels.gather_patches(video, ids, (2, 8, 8), mean=(1.0, 2.0))
    with pytest.raises(TypeError, match="video"):
        wmkernels.gather_patches(video.int(), ids, (2, 8, 8))
    pred = torch.randn(2, 3, 2 * 8 * 8 * 3)
    with pytest.raises(ValueError, match="pred: expected shape"):
        wmkernels.masked_mse_loss(pred[:, :2], video, ids, (2, 8, 8))
    with pytest.raises(ValueError, match="pred: expected shape"):
        wmkernels.masked_mse_loss(pred[..., :-1], video, ids, (2, 8, 8))
    with pytest.raises(ValueError, match="index: a bool mask"):
        wmkernels.masked_mse_loss(pred, video, torch.zeros(2, 3, dtype=torch.bool), (2, 8, 8))
    with pytest.raises(TypeError, match="index: expected dtype"):
        wmkernels.masked_mse_loss(pred, video, ids.int(), (2, 8, 8))
    with pytest.raises(ValueError, match="index: expected values"):
        wmkernels.masked_mse_loss(pred, video, ids + 100, (2, 8, 8))
    with pytest.raises(ValueError, match="norm_mode"):
        wmkernels.masked_mse_loss(pred, video, ids, (2, 8, 8), norm_mode="bad")
    with pytest.raises(ValueError, match="not divisible"):
        wmkernels.masked_mse_loss(pred, video[..., :15], ids, (2, 8, 8))
    with pytest.raises(ValueError, match="layout"):
        wmkernels.masked_mse_loss(pred, video, ids, (2, 8, 8), layout="THW")
    vis = torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match="mask_token"):
        wmkernels.unshuffle_with_mask_tokens(vis, torch.zeros(5), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids_restore"):
        wmkernels.unshuffle_with_mask_tokens(vis, torch.zeros(4), torch.full((2, 4), 4))
    with pytest.raises(TypeError, match="ids_restore: expected dtype"):
        wmkernels.unshuffle_with_mask_tokens(vis, torch.zeros(4), torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="pos_embed"):
        wmkernels.unshuffle_with_mask_tokens(vis, torch.zeros(4), torch.zeros(2, 4, dtype=torch.int64),
                                             torch.zeros(1, 5, 4))


def test_bad_argument_types_name_the_argument():
    """Arguments of the wrong kind: an error naming the argument, not one from deep inside."""
    video = make_video(2, 3, (4, 16, 16), "BCTHW", torch.float32)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    pred = torch.randn(2, 3, 2 * 8 * 8 * 3)
    with pytest.raises(ValueError, match=r"^tubelet: expected three positive ints \(t, h, w\), got 2"):
        wmkernels.gather_patches(video, ids, 2)
    with pytest.raises(ValueError, match="^tubelet: expected three positive ints"):
        wmkernels.nn.MaskedMSELoss(tubelet=2)
    with pytest.raises(TypeError, match="^mean: expected 3 per-channel numbers .*'imagenet'"):
        wmkernels.gather_patches(video, ids, (2, 8, 8), mean="imagenet")
    with pytest.raises(TypeError, match="^dtype: expected a torch.dtype .*'float32'"):
        wmkernels.gather_patches(video, ids, (2, 8, 8), dtype="float32")
    for eps in (float("nan"), float("inf"), True, -1.0, "1e-6"):
        with pytest.raises(ValueError, match="^eps: expected a finite number >= 0"):
            wmkernels.masked_mse_loss(pred, video, ids, (2, 8, 8), eps=eps)
    # NumPy scalars, as configs and arrays hand them over, are numbers like any other
    tub = tuple(np.int64(s) for s in (2, 8, 8))
    want = wmkernels.masked_mse_loss(pred, video, ids, (2, 8, 8), eps=1e-6)
    assert torch.equal(wmkernels.masked_mse_loss(pred, video, ids, tub, eps=np.float32(1e-6)), want)
    assert masking.grid_size(video.shape, tub) == (2, 2, 2)
    assert torch.equal(wmkernels.gather_patches(video, ids, tub), wmkernels.gather_patches(video, ids, (2, 8, 8)))


def test_from_mask_checks_the_count_per_row():
    mask = torch.tensor([[True, False, True, False], [True, True, True, False]])
    with pytest.raises(ValueError, match=r"^mask: expected 2 True entries in every row \(num_masked\), row 1 has 3"):
        masking.from_mask(mask, 2)
    with pytest.raises(ValueError, match=r"^num_masked: expected an int in \[0, 4\]"):
        masking.from_mask(mask, 5)
    with pytest.raises(ValueError, match="^mask: expected a \\(B, N\\) bool tensor"):
        masking.from_mask(mask.long(), 2)
    m = masking.from_mask(mask[:1], 2)
    assert m.ids_keep.tolist() == [[1, 3]] and m.ids_masked.tolist() == [[0, 2]]


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_masked_mse_loss_needs_masked_patches(backend):
    """A mean over no masked patches is undefined: a clear error, not a NaN or a ZeroDivisionError."""
    video = make_video(2, 3, (2, 8, 8), "BCTHW", torch.float32)
    tub = (2, 4, 4)
    with pytest.raises(ValueError, match=r"index: no masked patches \(shape \(2, 0\)\)"):
        wmkernels.masked_mse_loss(torch.randn(2, 0, 96), video, masking.tube(2, (1, 2, 2), 0.0).ids_masked, tub,
                                  backend=backend)
    with pytest.raises(ValueError, match="index: no masked patches"):
        wmkernels.masked_mse_loss(torch.randn(0, 1, 96), video[:0], torch.zeros(0, 1, dtype=torch.int64), tub,
                                  backend=backend)
    with pytest.raises(ValueError, match="index: no masked patches.*no True entry"):
        wmkernels.masked_mse_loss(torch.randn(2, 4, 96), video, torch.zeros(2, 4, dtype=torch.bool), tub,
                                  backend=backend)
    # one sample without masked patches is fine: the mean runs over the batch's masked patches
    mask = torch.tensor([[False] * 4, [True, False, True, False]])
    pred = torch.randn(2, 4, 96, dtype=torch.float64)
    dev = device_for(backend)
    loss = wmkernels.masked_mse_loss(pred.float().to(dev), video.to(dev), mask.to(dev), tub, backend=backend).cpu()
    close(loss, ref_loss(pred, video.double(), mask, tub, "BCTHW", True, "mae", 1e-6), torch.float32)


def test_bad_values_on_cpu():
    video = make_video(2, 3, (2, 8, 8), "BCTHW", torch.float32)
    with pytest.raises(ValueError, match=r"std: expected non-zero per-channel values .*\[1.0, 0.0, 2.0\]"):
        wmkernels.gather_patches(video, torch.zeros(2, 1, dtype=torch.int64), (2, 4, 4), std=(1.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="std: expected non-zero"):
        wmkernels.masked_mse_loss(torch.randn(2, 1, 96), video, torch.zeros(2, 1, dtype=torch.int64), (2, 4, 4),
                                  mean=(0.0, 0.0, 0.0), std=torch.tensor([0.0, 1.0, 1.0]))
    # MAE's float mask made int64 (not bool) would be read as ids: patches 0 and 1, a wrong loss
    m = masking.random(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    video8 = make_video(2, 3, (4, 8, 8), "BCTHW", torch.float32)
    with pytest.raises(ValueError, match=r"^index: an int64 \(B, N\) tensor of 0/1 values is a mask.*mask.bool\(\)"):
        wmkernels.masked_mse_loss(torch.randn(2, 8, 96), video8, m.mask.long(), (2, 4, 4))
    wmkernels.masked_mse_loss(torch.randn(2, 8, 96), video8, m.mask, (2, 4, 4))
    ids_restore = torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3]])  # row 1 repeats 0, never reads visible row 1
    with pytest.raises(ValueError, match=r"ids_restore: expected every row to be a permutation of \[0, 4\).*row 1"):
        wmkernels.unshuffle_with_mask_tokens(torch.randn(2, 2, 5), torch.zeros(5), ids_restore)


def test_bad_values_on_gpu_are_device_asserts(as_on_gpu):
    video = make_video(2, 3, (2, 8, 8), "BCTHW", torch.float32)
    tub, ok = (2, 4, 4), torch.tensor([[0, 3], [1, 2]])
    assert wmkernels.gather_patches(video, ok, tub).shape == (2, 2, 96)
    with pytest.raises(RuntimeError, match=r"^ids: expected values in \[0, 4\)"):
        wmkernels.gather_patches(video, torch.tensor([[0, 4], [1, 2]]), tub)
    with pytest.raises(RuntimeError, match=r"^index: expected values in \[0, 4\)"):
        wmkernels.masked_mse_loss(torch.randn(2, 2, 96), video, torch.tensor([[0, -1], [1, 2]]), tub)
    with pytest.raises(RuntimeError, match=r"^index: an int64 \(B, N\) tensor of 0/1 values is a mask"):
        wmkernels.masked_mse_loss(torch.randn(2, 4, 96), video, torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]), tub)
    wmkernels.masked_mse_loss(torch.randn(2, 4, 96), video, torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), tub)
    wmkernels.unshuffle_with_mask_tokens(torch.randn(2, 2, 5), torch.zeros(5), torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    with pytest.raises(RuntimeError, match=r"^ids_restore: expected every row to be a permutation"):
        wmkernels.unshuffle_with_mask_tokens(torch.randn(2, 2, 5), torch.zeros(5), torch.tensor([[0, 1, 2, 3], [0, 0, 2, 3]]))


def test_module_wrapper():
    video, index, pred = _loss_inputs(LOSS_CASES[3], torch.float32, torch.float32, "contiguous")
    loss = wmkernels.nn.MaskedMSELoss((2, 8, 8), "BTCHW", norm_pix=False, backend="torch")(pred, video, index)
    want = wmkernels.masked_mse_loss(pred, video, index, (2, 8, 8), "BTCHW", norm_pix=False, backend="torch")
    assert torch.equal(loss, want)


@pytest.mark.parametrize("backend", FULL_BACKENDS)
def test_gather_and_unshuffle_compile(backend):
    from wmkernels.ops.masked import UNSHUFFLE_SUPPORTED

    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    video = make_video(2, 3, (4, 16, 16), "BTCHW", torch.float32, device=dev).requires_grad_()
    m = masking.tube(2, (2, 2, 2), 0.5, generator=g)
    ids_keep, ids_restore = m.ids_keep.to(dev), m.ids_restore.to(dev)
    token = torch.randn(384 * 2, generator=g).to(dev).requires_grad_()
    pos = torch.randn(1, 8, 384 * 2, generator=g).to(dev).requires_grad_()
    # the unshuffle has no "cuda" implementation: the reference stands in for it there
    unshuffle_backend = backend if backend in UNSHUFFLE_SUPPORTED else "torch"

    def f(video):
        vis = wmkernels.gather_patches(video, ids_keep, (2, 8, 8), "BTCHW", backend=backend)
        vis = torch.cat([vis, vis], dim=-1)
        return wmkernels.unshuffle_with_mask_tokens(vis, token, ids_restore, pos, backend=unshuffle_backend)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(video)
    want = f(video)
    assert torch.equal(out, want)
    grads = torch.autograd.grad(out.square().sum(), [video, token, pos])
    want_grads = torch.autograd.grad(want.square().sum(), [video, token, pos])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [LOSS_CASES[1], LOSS_CASES[2]], ids=["ids", "mask"])
def test_backward_op_matches_fused_gradient(backend, case):
    """The recomputing backward op (used where the forward does not fuse) equals the fused gradient."""
    from wmkernels.ops.masked import masked_mse_loss_backward_op, masked_mse_loss_op

    tubelet, _, layout, norm_pix, norm_mode, _, _ = case
    video, index, pred = _loss_inputs(case, torch.float32, torch.float32, "contiguous", backend)
    args = (pred, video, index, list(tubelet), layout, norm_pix, norm_mode, 1e-6, None, None)
    _, fused = masked_mse_loss_op(*args, torch.float32, "torch", True)  # the reference runs on any device
    gp, gv = masked_mse_loss_backward_op(torch.tensor(3.0, device=pred.device), *args, True, False, backend)
    assert gv.numel() == 0
    torch.testing.assert_close(gp, 3.0 * fused, rtol=1e-5, atol=1e-9)
