"""Drop-in parity with the code users migrate from: OpenCLIP's ClipLoss, MAE's masking and loss,
VideoMAE's tube masks and targets, F.mse_loss.

Each oracle is a few lines transcribed from the upstream file named in its comment, run on the
same inputs and settings; values and gradients must agree to float rounding.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import wmkernels
from wmkernels import masking
from conftest import FULL_BACKENDS, TOL

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm IMAGENET_DEFAULT_*
FLOATS = [torch.float32, torch.float64]


def close(actual, expected, dtype, rtol_scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"] * rtol_scale, atol=tol["atol"] * rtol_scale)


# ------------------------------------------------------------------------------ OpenCLIP ClipLoss


def clip_loss(image_features, text_features, logit_scale):
    """mlfoundations/open_clip src/open_clip/loss.py, ClipLoss.forward with world_size=1."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device, dtype=torch.long)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("prenormalized", [False, True], ids=["normalize-in-loss", "model-normalized"])
def test_contrastive_matches_open_clip(backend, dtype, prenormalized):
    # OpenCLIP's model normalizes the features and passes logit_scale.exp() of a log-space parameter
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(11, 16, generator=g, dtype=dtype) for _ in range(2))
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    leaves_ref = [t.clone().requires_grad_() for t in (z1, z2, log_scale)]
    leaves = [t.clone().requires_grad_() for t in (z1, z2, log_scale)]
    a, b, s = leaves_ref
    ref = clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), s.exp())
    a, b, s = leaves
    if prenormalized:
        out = wmkernels.contrastive_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), logit_scale=s.exp(),
                                         normalize=False, backend=backend)
    else:
        out = wmkernels.contrastive_loss(a, b, logit_scale=s.exp(), backend=backend)
    assert out.dtype == ref.dtype
    grads_ref = torch.autograd.grad(ref, leaves_ref)
    grads = torch.autograd.grad(out, leaves)
    close(out, ref, dtype)
    for got, want in zip(grads, grads_ref):
        close(got, want, dtype)


# -------------------------------------------------------------------------------------------- MAE


def mae_patchify(imgs, p):
    """facebookresearch/mae models_mae.py, MaskedAutoencoderViT.patchify."""
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))


def mae_random_masking(x, mask_ratio):
    """facebookresearch/mae models_mae.py, random_masking: (mask, ids_restore); 1 = removed."""
    n, length, _ = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones([n, length], device=x.device)
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore), ids_restore


def mae_forward_loss(imgs, pred, mask, p, norm_pix_loss):
    """facebookresearch/mae models_mae.py, forward_loss."""
    target = mae_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def test_patchify_order_is_mae_and_videomae():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16, generator=g)
    assert torch.equal(wmkernels.patchify(imgs.unsqueeze(2), (1, 4, 4)), mae_patchify(imgs, 4))
    video = torch.randn(2, 3, 4, 16, 16, generator=g)
    # MCG-NJU/VideoMAE engine_for_pretraining.py, the unnormalized-target rearrange
    ref = rearrange(video, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=2, p1=8, p2=8)
    ids = torch.tensor([[0, 3, 5], [7, 1, 2]])
    want = torch.gather(ref, 1, ids[..., None].expand(-1, -1, ref.shape[-1]))
    for backend in FULL_BACKENDS:
        assert torch.equal(wmkernels.gather_patches(video, ids, (2, 8, 8), backend=backend), want)
        assert torch.equal(wmkernels.gather_patches(video.transpose(1, 2), ids, (2, 8, 8), "BTCHW", backend=backend),
                           want)


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (196, 0.75), (49, 0.75), (1568, 0.9), (16, 0.7)])
def test_random_mask_reproduces_mae_random_masking(length, ratio):
    torch.manual_seed(3)
    mask_ref, ids_restore_ref = mae_random_masking(torch.zeros(2, length, 1), ratio)
    torch.manual_seed(3)
    m = masking.random(2, (1, 1, length), ratio)  # MAE's count: 37 of 49 masked at 0.75, not int(0.75 * 49)
    assert torch.equal(m.mask, mask_ref.bool())
    # same visible set; MAE lists it in noise order, Masks in ascending order
    len_keep = m.num_keep
    keep_ref = torch.argsort(ids_restore_ref, dim=1)[:, :len_keep]
    assert torch.equal(m.ids_keep, keep_ref.sort(dim=1).values)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_loss_matches_mae_forward_loss(backend, dtype, norm_pix):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16, generator=g, dtype=dtype)
    torch.manual_seed(1)
    mask, _ = mae_random_masking(torch.zeros(3, 16, 1), 0.75)
    pred = torch.randn(3, 16, 48, generator=g, dtype=dtype)
    i1, p1, i2, p2 = (t.clone().requires_grad_() for t in (imgs, pred, imgs, pred))
    ref = mae_forward_loss(i1, p1, mask.to(dtype), 4, norm_pix)
    out = wmkernels.masked_mse_loss(p2, i2.unsqueeze(2), mask.bool(), (1, 4, 4), norm_pix=norm_pix, backend=backend)
    assert out.dtype == ref.dtype
    close(out, ref, dtype)
    for got, want in zip(torch.autograd.grad(out, (p2, i2)), torch.autograd.grad(ref, (p1, i1))):
        close(got, want, dtype)


def test_uint8_with_imagenet_stats_times_255_matches_mae(backend):
    # MAE's loader hands the model ToTensor + Normalize images: the README's raw-unit statistics
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imgs = (raw.float() / 255 - mean) / std
    torch.manual_seed(1)
    mask, _ = mae_random_masking(torch.zeros(2, 16, 1), 0.75)
    pred = torch.randn(2, 16, 48, generator=g)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ref = mae_forward_loss(imgs, p1, mask, 4, True)
    out = wmkernels.masked_mse_loss(p2, raw.unsqueeze(2), mask.bool(), (1, 4, 4), backend=backend,
                                    mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
    close(out, ref, torch.float32, 2.0)
    close(torch.autograd.grad(out, p2)[0], torch.autograd.grad(ref, p1)[0], torch.float32, 2.0)


# --------------------------------------------------------------------------------------- VideoMAE


def videomae_tube_mask(input_size, mask_ratio, rng):
    """MCG-NJU/VideoMAE masking_generator.py, TubeMaskingGenerator.__call__ (numpy swapped for torch)."""
    frames, height, width = input_size
    per_frame = height * width
    num_masks_per_frame = int(mask_ratio * per_frame)
    mask_per_frame = torch.cat([torch.zeros(per_frame - num_masks_per_frame), torch.ones(num_masks_per_frame)])
    mask_per_frame = mask_per_frame[torch.randperm(per_frame, generator=rng)]
    return mask_per_frame.repeat(frames)


def videomae_labels(videos, bool_masked_pos, patch_size, normlize_target):
    """MCG-NJU/VideoMAE engine_for_pretraining.py, train_one_epoch: the regression targets."""
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=videos.dtype)[None, :, None, None, None]
    std = torch.as_tensor(IMAGENET_STD, dtype=videos.dtype)[None, :, None, None, None]
    unnorm_videos = videos * std + mean  # in [0, 1]
    if normlize_target:
        videos_squeeze = rearrange(unnorm_videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c",
                                   p0=2, p1=patch_size, p2=patch_size)
        videos_norm = (videos_squeeze - videos_squeeze.mean(dim=-2, keepdim=True)) / (
            videos_squeeze.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        videos_patch = rearrange(videos_norm, "b n p c -> b n (p c)")
    else:
        videos_patch = rearrange(unnorm_videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)",
                                 p0=2, p1=patch_size, p2=patch_size)
    b, _, c = videos_patch.shape
    return videos_patch[bool_masked_pos].reshape(b, -1, c)


@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.9), ((2, 3, 5), 0.75), ((4, 7, 7), 0.5)])
def test_tube_mask_has_videomae_count_and_structure(grid, ratio):
    ref = videomae_tube_mask(grid, ratio, torch.Generator().manual_seed(0))
    m = masking.tube(3, grid, ratio, generator=torch.Generator().manual_seed(0))
    assert m.num_masked == int(ref.sum())
    t, h, w = grid
    per_frame = m.mask.view(3, t, h * w)
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))  # one spatial mask tiled over time


@pytest.mark.parametrize("normlize_target", [True, False])
def test_masked_loss_matches_videomae(backend, normlize_target):
    # VideoMAE's loader gives the model an ImageNet-normalized float video and computes targets on
    # the video in [0, 1]: with a uint8 video pass std=255 (mean 0) and norm_mode="videomae"
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 4, 16, 16), generator=g, dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    videos = (raw.float() / 255 - mean) / std
    m = masking.tube(2, (2, 2, 2), 0.75, generator=g)
    pred = torch.randn(2, m.num_masked, 384, generator=g)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ref = torch.nn.MSELoss()(input=p1, target=videomae_labels(videos, m.mask, 8, normlize_target))
    out = wmkernels.masked_mse_loss(p2, raw, m.ids_masked, (2, 8, 8), norm_pix=normlize_target,
                                    norm_mode="videomae", std=(255.0,) * 3, backend=backend)
    close(out, ref, torch.float32, 2.0)
    close(torch.autograd.grad(out, p2)[0], torch.autograd.grad(ref, p1)[0], torch.float32, 2.0)


def test_masked_loss_matches_videomae_from_normalized_float_video(backend):
    # the loader's normalized video itself, undone on the fly: mean = -m / s, std = 1 / s (float64:
    # in fp32 both sides round differently, and eps = 1e-6 magnifies that in near-flat patches)
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (2, 3, 4, 16, 16), generator=g, dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1, 1)
    videos = (raw.double() / 255 - mean) / std
    m = masking.tube(2, (2, 2, 2), 0.5, generator=g)
    pred = torch.randn(2, m.num_masked, 384, generator=g, dtype=torch.float64)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ref = torch.nn.MSELoss()(input=p1, target=videomae_labels(videos, m.mask, 8, True))
    out = wmkernels.masked_mse_loss(p2, videos, m.ids_masked, (2, 8, 8), norm_mode="videomae", backend=backend,
                                    mean=[-a / b for a, b in zip(IMAGENET_MEAN, IMAGENET_STD)],
                                    std=[1 / b for b in IMAGENET_STD])
    close(out, ref, torch.float64)
    close(torch.autograd.grad(out, p2)[0], torch.autograd.grad(ref, p1)[0], torch.float64)


# ------------------------------------------------------------------------------------- F.mse_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_f_mse_loss(backend, dtype, reduction):
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 5, 7, generator=g).to(dtype) for _ in range(2))
    x1, y1, x2, y2 = (t.clone().requires_grad_() for t in (x, y, x, y))
    ref = F.mse_loss(x1, y1, reduction=reduction)
    out = wmkernels.mse_loss(x2, y2, reduction=reduction, backend=backend)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    w = torch.randn(ref.shape, generator=g).to(dtype)
    close(out.double(), ref.double(), dtype)
    grads = torch.autograd.grad((out * w).sum(), (x2, y2))
    for got, want in zip(grads, torch.autograd.grad((ref * w).sum(), (x1, y1))):
        close(got.double(), want.double(), dtype)


def test_mse_refuses_what_f_mse_loss_would_broadcast(backend):
    x, y = torch.randn(4, 5), torch.randn(1, 5)
    with pytest.warns(UserWarning, match="broadcasting"):
        F.mse_loss(x, y)
    with pytest.raises(ValueError, match=r"^target: expected shape \(4, 5\)"):
        wmkernels.mse_loss(x, y, backend=backend)
