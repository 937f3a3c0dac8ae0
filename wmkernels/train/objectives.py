"""The four pre-training objectives, each a module wrapping its model and its wmkernels loss.

`forward(video, index, step)` returns the training loss. Masks and augmentations are drawn from
per-sample generators seeded by (seed, dataset index, step), so they survive a resume and do not
depend on how many processes share the batch. The losses, patch gather, mask-token unshuffle and
masks are the public wmkernels API.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import wmkernels
from wmkernels.nn import clamped_scale

from .data import sample_generator
from .models import ConvAutoencoder, ContrastiveEncoder, MaskedVideoModel, NextFrameModel, take_rows

MASK_SALT, VIEW_SALT = 101, 202


# ---- masked video modeling (VideoMAE) ----

@torch.compiler.disable  # per-sample host-side generators: kept out of a compiled graph
def tube_masks(index: list[int], grid: tuple[int, int, int], ratio: float, seed: int, step: int, device):
    """`wmkernels.masking.tube` masks, each sample's from its own (seed, index, step) generator.
    Returns (ids_keep, ids_masked, ids_restore), int64 (B, .) on `device`."""
    masks = [wmkernels.masking.tube(1, grid, ratio, generator=sample_generator(seed, i, step, MASK_SALT)) for i in index]
    return [torch.cat([getattr(m, k) for m in masks]).to(device) for k in ("ids_keep", "ids_masked", "ids_restore")]


def _patch_stats(target: torch.Tensor, eps: float = 1e-6):
    """Per-patch mean and sqrt(unbiased var + eps): the norm-pix statistics of `masked_mse_loss`."""
    return target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + eps).sqrt()


# ---- contrastive: two augmented views ----

@torch.compiler.disable
def _view_params(index: list[int], seed: int, step: int, view: int) -> torch.Tensor:
    return torch.stack([torch.rand(6, generator=sample_generator(seed, i, step, VIEW_SALT + view)) for i in index])


def augment(video: torch.Tensor, index: list[int], seed: int, step: int, view: int) -> torch.Tensor:
    """Random resized crop (area 40-100%), horizontal flip and brightness/contrast jitter, the same
    for every frame of a clip, with parameters drawn from (seed, index, step, view)."""
    b, t, c, h, w = video.shape
    params = _view_params(index, seed, step, view)
    side = (0.4 + 0.6 * params[:, 0]).sqrt()
    flip = torch.where(params[:, 1] < 0.5, -1.0, 1.0)
    tx, ty = (1 - side) * (2 * params[:, 2] - 1), (1 - side) * (2 * params[:, 3] - 1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = side * flip, tx, side, ty
    theta = theta.to(video.device, video.dtype).repeat_interleave(t, dim=0)
    frames = video.reshape(b * t, c, h, w)
    grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
    out = F.grid_sample(frames, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = (0.8 + 0.4 * params[:, 4]).to(video.device, video.dtype).view(b, 1, 1, 1, 1)
    contrast = (0.8 + 0.4 * params[:, 5]).to(video.device, video.dtype).view(b, 1, 1, 1, 1)
    out = out.view(b, t, c, h, w)
    mean = out.mean(dim=(1, 2, 3, 4), keepdim=True)
    return ((out - mean) * contrast + mean * bright).clamp(0, 1)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the peak signal-to-noise ratio (dB) of [0, 1] images."""
    mse = (pred.float().clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()


# ---- the objectives ----

class Objective(nn.Module):
    """Common interface: `forward` (training loss), `evaluate` (metrics), `visualize` (pred, target)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.seed = cfg.seed
        self.backend = None if cfg.loss_backend == "auto" else cfg.loss_backend
        self.distributed = False

    def mse(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return wmkernels.mse_loss(pred, target, backend=self.backend)


class MaskedObjective(Objective):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.model = MaskedVideoModel(cfg.channels, cfg.patch_size, cfg.tubelet, cfg.embed_dim, cfg.depth,
                                      cfg.num_heads, cfg.mlp_ratio, cfg.decoder_dim, cfg.decoder_depth)
        self.tubelet = (cfg.tubelet, cfg.patch_size, cfg.patch_size)
        self.ratio, self.norm_pix = cfg.mask_ratio, cfg.norm_pix

    def _predict(self, video, index, step):
        m, b = self.model, self.backend
        grid = m.grid(video)
        ids_keep, ids_masked, ids_restore = tube_masks(index, grid, self.ratio, self.seed, step, video.device)
        x = m.encode(wmkernels.gather_patches(video, ids_keep, self.tubelet, "BTCHW", backend=b), grid, ids_keep)
        x = wmkernels.unshuffle_with_mask_tokens(x, m.mask_token.to(x.dtype), ids_restore,
                                                 m.decoder_pos(grid).to(x.dtype)[None], backend=b)
        return m.decode(x, ids_masked), ids_masked

    def _loss(self, pred, video, ids_masked):
        return wmkernels.masked_mse_loss(pred, video, ids_masked, self.tubelet, "BTCHW", norm_pix=self.norm_pix,
                                         backend=self.backend)

    def forward(self, video, index, step: int):
        pred, ids_masked = self._predict(video, index, step)
        return self._loss(pred, video, ids_masked)

    def _pixels(self, video, index, step):
        """Loss, predicted and true pixels of the masked patches, and the video with them filled in."""
        pred, ids_masked = self._predict(video, index, step)
        loss = self._loss(pred, video, ids_masked)
        patches = wmkernels.patchify(video.float(), self.tubelet, "BTCHW")
        target = take_rows(patches, ids_masked)
        pred = pred.float()
        if self.norm_pix:
            mean, std = _patch_stats(target)
            pred = pred * std + mean
        full = patches.scatter(1, ids_masked[..., None].expand_as(pred), pred)
        return loss, pred, target, wmkernels.unpatchify(full, self.model.grid(video), self.tubelet, "BTCHW")

    def evaluate(self, video, index, step: int = -1) -> dict:
        loss, pred, target, _ = self._pixels(video, index, step)
        return {"loss": loss, "psnr": psnr(pred, target)}

    def visualize(self, video, index, step: int = -1):
        return self._pixels(video, index, step)[3].clamp(0, 1), video


class NextFrameObjective(Objective):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.model = NextFrameModel(cfg.channels, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio)

    def forward(self, video, index, step: int):
        return self.mse(self.model(video[:, :-1]), video[:, -1])

    def evaluate(self, video, index, step: int = -1) -> dict:
        pred = self.model(video[:, :-1])
        return {"loss": self.mse(pred, video[:, -1]), "psnr": psnr(pred, video[:, -1])}

    def visualize(self, video, index, step: int = -1):
        pred = self.model(video[:, :-1]).clamp(0, 1)
        return torch.cat([video[:, :-1], pred[:, None].to(video.dtype)], dim=1), video


class ReconstructionObjective(Objective):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.model = ConvAutoencoder(cfg.channels, cfg.patch_size, cfg.conv_width)

    def forward(self, video, index, step: int):
        return self.mse(self.model(video), video)

    def evaluate(self, video, index, step: int = -1) -> dict:
        recon = self.model(video)
        return {"loss": self.mse(recon, video), "psnr": psnr(recon, video)}

    def visualize(self, video, index, step: int = -1):
        return self.model(video).to(video.dtype), video


class ContrastiveObjective(Objective):
    """Two augmented views -> encoder + projection -> `wmkernels.contrastive_loss` (symmetric), with a
    learnable logit scale stored in log space like CLIP (init log(1/temperature), clamped at 100)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.model = ContrastiveEncoder(cfg.channels, cfg.patch_size, cfg.tubelet, cfg.embed_dim, cfg.depth,
                                        cfg.num_heads, cfg.mlp_ratio, cfg.proj_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)

    def _embed(self, video, index, step):
        views = torch.cat([augment(video, index, self.seed, step, 0), augment(video, index, self.seed, step, 1)])
        return self.model(views).chunk(2)

    def _loss(self, z1, z2, distributed: bool, **kw):
        return wmkernels.contrastive_loss(z1, z2, logit_scale=clamped_scale(self.logit_scale, 100.0),
                                          distributed="gather" if distributed else None, backend=self.backend, **kw)

    def forward(self, video, index, step: int):
        return self._loss(*self._embed(video, index, step), self.distributed)

    def evaluate(self, video, index, step: int = -1) -> dict:
        result = self._loss(*self._embed(video, index, step), False, return_accuracy=True)
        return {"loss": result.loss, "accuracy": result.accuracy}

    def visualize(self, video, index, step: int = -1):
        return augment(video, index, self.seed, step, 0), augment(video, index, self.seed, step, 1)


OBJECTIVE_CLASSES = {
    "masked": MaskedObjective,
    "next-frame": NextFrameObjective,
    "reconstruction": ReconstructionObjective,
    "contrastive": ContrastiveObjective,
}


def build_objective(cfg) -> Objective:
    return OBJECTIVE_CLASSES[cfg.objective](cfg)
