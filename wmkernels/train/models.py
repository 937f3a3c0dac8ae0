"""Small video models: a ViT over tubelet tokens (masked autoencoder, next-frame predictor,
contrastive encoder) and a convolutional autoencoder (reconstruction).

Videos are (B, T, C, H, W) floats; patch values are ordered `(pt ph pw) c` as in VideoMAE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

import wmkernels


def patchify(video: torch.Tensor, pt: int, p: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, N, pt*p*p*C) tokens in (t, h, w) order, values `(pt ph pw) c`."""
    return wmkernels.patchify(video, (pt, p, p), "BTCHW")


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], pt: int, p: int) -> torch.Tensor:
    return wmkernels.unpatchify(tokens, grid, (pt, p, p), "BTCHW")


class PosEmbed(nn.Module):
    """Learned factorized (time + height + width) position embedding, interpolated to any grid,
    so a curriculum can change resolution and clip length without new parameters."""

    def __init__(self, dim: int, max_t: int = 16, max_hw: int = 16) -> None:
        super().__init__()
        self.pos_embed_t = nn.Parameter(torch.randn(1, dim, max_t) * 0.02)
        self.pos_embed_h = nn.Parameter(torch.randn(1, dim, max_hw) * 0.02)
        self.pos_embed_w = nn.Parameter(torch.randn(1, dim, max_hw) * 0.02)

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(N, dim) for a (t, h, w) token grid."""
        t, h, w = grid

        def axis(table, n):
            return table[0] if table.shape[-1] == n else F.interpolate(table, size=n, mode="linear", align_corners=True)[0]

        pt, ph, pw = axis(self.pos_embed_t, t), axis(self.pos_embed_h, h), axis(self.pos_embed_w, w)
        return (pt[:, :, None, None] + ph[:, None, :, None] + pw[:, None, None, :]).flatten(1).T


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = x + self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return self.norm(x)


def take_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (B, K) of x (B, N, D) or of a shared (N, D) table."""
    if x.ndim == 2:
        return x[ids]
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


class MaskedVideoModel(nn.Module):
    """VideoMAE: a ViT encoder on the visible tubelets, a light decoder on visible + mask tokens
    that predicts the pixels of the masked tubelets."""

    def __init__(self, channels: int, patch_size: int, tubelet: int, embed_dim: int, depth: int, heads: int,
                 mlp_ratio: float, decoder_dim: int, decoder_depth: int) -> None:
        super().__init__()
        self.pt, self.p = tubelet, patch_size
        patch_dim = tubelet * patch_size * patch_size * channels
        self.patch_embed = nn.Linear(patch_dim, embed_dim)
        self.pos = PosEmbed(embed_dim)
        self.encoder = Transformer(embed_dim, depth, heads, mlp_ratio)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = PosEmbed(decoder_dim)
        self.decoder = Transformer(decoder_dim, decoder_depth, heads, mlp_ratio)
        self.head = nn.Linear(decoder_dim, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def grid(self, video: torch.Tensor) -> tuple[int, int, int]:
        _, t, _, h, w = video.shape
        return t // self.pt, h // self.p, w // self.p

    def encode(self, visible_patches: torch.Tensor, grid, ids_keep: torch.Tensor) -> torch.Tensor:
        """Visible patches (B, N_visible, patch_dim) -> decoder-width tokens (B, N_visible, decoder_dim)."""
        x = self.patch_embed(visible_patches) + take_rows(self.pos(grid), ids_keep)
        return self.decoder_embed(self.encoder(x))

    def decode(self, tokens: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Full sequence (B, N, decoder_dim) with mask tokens -> predicted patches (B, N_masked, patch_dim)."""
        return self.head(take_rows(self.decoder(tokens), ids_masked))


class NextFrameModel(nn.Module):
    """A ViT over the context frames' patches; the last frame's tokens predict the change to the next frame."""

    def __init__(self, channels: int, patch_size: int, embed_dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.p = patch_size
        patch_dim = patch_size * patch_size * channels
        self.patch_embed = nn.Linear(patch_dim, embed_dim)
        self.pos = PosEmbed(embed_dim)
        self.encoder = Transformer(embed_dim, depth, heads, mlp_ratio)
        self.head = nn.Linear(embed_dim, patch_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) context -> (B, C, H, W) prediction of frame T."""
        _, t, _, h, w = context.shape
        grid = (t, h // self.p, w // self.p)
        x = self.encoder(self.patch_embed(patchify(context, 1, self.p)) + self.pos(grid))
        last = x[:, -grid[1] * grid[2]:]
        delta = unpatchify(self.head(last), (1, grid[1], grid[2]), 1, self.p)[:, 0]
        return context[:, -1] + delta


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, cout), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class ConvAutoencoder(nn.Module):
    """UNet-style video autoencoder without skips: each level halves H and W (log2(patch_size)
    levels), a 1x1x1 bottleneck, and the mirror image back to pixels."""

    def __init__(self, channels: int, patch_size: int, width: int, latent: int = 8) -> None:
        super().__init__()
        levels = int(math.log2(patch_size))
        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList([ConvBlock(channels, widths[0])])
        self.down.extend(ConvBlock(widths[i], widths[i + 1]) for i in range(levels))
        self.to_latent = nn.Conv3d(widths[-1], latent, 1)
        self.from_latent = nn.Conv3d(latent, widths[-1], 1)
        self.up = nn.ModuleList(ConvBlock(widths[i + 1], widths[i]) for i in reversed(range(levels)))
        self.out = nn.Conv3d(widths[0], channels, 3, padding=1)
        self.grad_checkpointing = False

    def _run(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = video.transpose(1, 2)  # (B, C, T, H, W) for Conv3d
        x = self._run(self.down[0], x)
        for blk in self.down[1:]:
            x = self._run(blk, F.avg_pool3d(x, (1, 2, 2)))
        x = self.from_latent(self.to_latent(x))
        for blk in self.up:
            x = self._run(blk, F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
        return torch.sigmoid(self.out(x)).transpose(1, 2)


class ContrastiveEncoder(nn.Module):
    """A ViT over tubelets, mean-pooled, then an MLP projection head."""

    def __init__(self, channels: int, patch_size: int, tubelet: int, embed_dim: int, depth: int, heads: int,
                 mlp_ratio: float, proj_dim: int) -> None:
        super().__init__()
        self.pt, self.p = tubelet, patch_size
        self.patch_embed = nn.Linear(tubelet * patch_size * patch_size * channels, embed_dim)
        self.pos = PosEmbed(embed_dim)
        self.encoder = Transformer(embed_dim, depth, heads, mlp_ratio)
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, proj_dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _, t, _, h, w = video.shape
        grid = (t // self.pt, h // self.p, w // self.p)
        x = self.encoder(self.patch_embed(patchify(video, self.pt, self.p)) + self.pos(grid))
        return self.proj(x.mean(1))


def set_grad_checkpointing(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = enabled
