"""Token masks for masked video modeling: random (MAE), tube (VideoMAE) and 3D block (V-JEPA).

Every generator returns a `Masks` over a (T', H', W') token grid, tokens in (t, h, w) row-major
order, with the same number of masked tokens in every sample; all work runs on `device` without
host syncs and is deterministic for a given device and `torch.Generator`.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import _validation


@dataclasses.dataclass(frozen=True)
class Masks:
    """One masking of a batch of token sequences of length N = T' * H' * W'.

    mask: (B, N) bool, True = masked (hidden from the encoder, predicted by the decoder).
    ids_keep: (B, N_keep) int64, the visible tokens in ascending order.
    ids_masked: (B, N_masked) int64, the masked tokens in ascending order.
    ids_restore: (B, N) int64, the position of each token in cat([ids_keep, ids_masked], 1):
        `unshuffle_with_mask_tokens(visible, mask_token, ids_restore)` puts the tokens back.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    ids_restore: torch.Tensor

    @property
    def num_masked(self) -> int:
        return self.ids_masked.shape[1]

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]


def grid_size(video_shape, tubelet, layout: str = "BCTHW") -> tuple[int, int, int]:
    """The token grid (T', H', W') of a video of `video_shape` cut into `tubelet` = (t, h, w) patches."""
    tubelet = _validation.check_tubelet(tubelet)
    _validation.check_video_layout(layout)
    if len(video_shape) != 5:
        raise ValueError(f"video_shape: expected 5 dims ({layout}), got {tuple(video_shape)}")
    t, h, w = (video_shape[2], video_shape[3], video_shape[4]) if layout == "BCTHW" else (
        video_shape[1], video_shape[3], video_shape[4])
    _validation.check_divisible("video", (t, h, w), tubelet)
    return t // tubelet[0], h // tubelet[1], w // tubelet[2]


def _check(batch_size, grid, ratio) -> tuple[int, tuple[int, int, int], float]:
    """(batch_size, grid, ratio) as Python numbers, validated."""
    if not _validation.is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    grid = tuple(grid)
    if len(grid) != 3 or not all(_validation.is_int(g) and g >= 1 for g in grid):
        raise ValueError(f"grid: expected three positive ints (T', H', W'), got {grid!r}")
    if not _validation.is_real(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a float in [0, 1), got {ratio!r}")
    return int(batch_size), tuple(int(g) for g in grid), float(ratio)


def _check_range(name: str, pair, upper: float | None) -> tuple[float, float]:
    """A (low, high) pair with 0 < low <= high (<= upper when given)."""
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_validation.is_real(x) for x in pair)
    if not ok or not 0.0 < pair[0] <= pair[1] <= (upper if upper is not None else math.inf):
        bound = f" <= {upper:g}" if upper is not None else ""
        raise ValueError(f"{name}: expected (low, high) with 0 < low <= high{bound}, got {pair!r}")
    return float(pair[0]), float(pair[1])


def _rand(*size, device, generator, dtype=None) -> torch.Tensor:
    """torch.rand, with `generator` left out when None: torch.compile cannot trace an explicit
    generator=None once the batch size is symbolic (a mask made inside a compiled step)."""
    extra = {"generator": generator} if generator is not None else {}
    return torch.rand(*size, device=device, dtype=dtype, **extra)


def _device(device, generator: torch.Generator | None) -> torch.device:
    device = torch.device(device if device is not None else (generator.device if generator is not None else "cpu"))
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: expected a generator on {device.type}, got one on {generator.device.type}")
    return device


def from_mask(mask: torch.Tensor, num_masked: int) -> Masks:
    """`Masks` of a (B, N) bool mask whose every row has exactly `num_masked` True entries."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask: expected a (B, N) bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)} "
                         f"of shape {tuple(getattr(mask, 'shape', ()))}")
    if not _validation.is_int(num_masked) or not 0 <= num_masked <= mask.shape[1]:
        raise ValueError(f"num_masked: expected an int in [0, {mask.shape[1]}] (N), got {num_masked!r}")
    # a row with another count would give ids_keep holding masked tokens: checked on CPU, asserted on GPU
    msg = f"mask: expected {num_masked} True entries in every row (num_masked)"
    if _validation.values_ok(mask) and mask.numel():
        counts = mask.sum(1)
        if (counts != num_masked).any():
            row = int((counts != num_masked).nonzero()[0])
            raise ValueError(f"{msg}, row {row} has {int(counts[row])}")
    _validation.device_check(mask, lambda: (mask.sum(1) == num_masked).all(), msg)
    return _masks_of(mask, int(num_masked))


def _masks_of(mask: torch.Tensor, num_masked: int) -> Masks:
    """`from_mask` without the checks, for the masks built here (exactly `num_masked` per row)."""
    n_keep = mask.shape[1] - num_masked
    # a stable sort of the 0/1 mask lists the visible tokens, then the masked ones, each ascending
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return Masks(mask, ids_shuffle[:, :n_keep], ids_shuffle[:, n_keep:], ids_restore)


def _top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool with True at the k largest scores of each row."""
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1).indices, True)
    return mask


def random(batch_size: int, grid, ratio: float, *, device=None, generator: torch.Generator | None = None) -> Masks:
    """MAE masking: `N - int(N * (1 - ratio))` tokens masked uniformly at random in each sample,
    MAE's `random_masking` count (it keeps `int(N * (1 - ratio))`; one more than `int(ratio * N)`
    for some N: 37 of 49 at 0.75, 1412 of 1568 at 0.9). Both rank the same `torch.rand` noise, so
    from the same generator state the mask is MAE's."""
    batch_size, grid, ratio = _check(batch_size, grid, ratio)
    device = _device(device, generator)
    n = math.prod(grid)
    k = n - int(n * (1 - ratio))
    noise = _rand(batch_size, n, device=device, generator=generator)
    return _masks_of(_top_k_mask(noise, k), k)


def tube(batch_size: int, grid, ratio: float, *, device=None, generator: torch.Generator | None = None) -> Masks:
    """VideoMAE tube masking: one random spatial mask of `int(ratio * H' W')` tokens per sample,
    shared by all T' time slots (so `T' * int(ratio * H' W')` masked tokens)."""
    batch_size, grid, ratio = _check(batch_size, grid, ratio)
    device = _device(device, generator)
    t, h, w = grid
    k = int(ratio * h * w)
    noise = _rand(batch_size, h * w, device=device, generator=generator)
    spatial = _top_k_mask(noise, k)
    return _masks_of(spatial[:, None, :].expand(batch_size, t, h * w).reshape(batch_size, t * h * w), t * k)


def block(
    batch_size: int,
    grid,
    ratio: float,
    *,
    num_blocks: int = 8,
    spatial_scale: tuple[float, float] = (0.15, 0.15),
    temporal_scale: tuple[float, float] = (1.0, 1.0),
    aspect_ratio: tuple[float, float] = (0.75, 1.5),
    device=None,
    generator: torch.Generator | None = None,
) -> Masks:
    """V-JEPA-style masking: the union of `num_blocks` random 3D blocks, trimmed or topped up to
    exactly `int(ratio * N)` masked tokens.

    Each block covers a fraction of the H' x W' plane drawn from `spatial_scale` with an aspect
    ratio (h/w) drawn log-uniformly from `aspect_ratio`, and a fraction of the T' slots drawn from
    `temporal_scale`, at a uniform random position. Tokens inside the union win over those
    outside; ties (which union tokens to drop, which outside tokens to add) break at random.
    """
    batch_size, grid, ratio = _check(batch_size, grid, ratio)
    if not _validation.is_int(num_blocks) or num_blocks < 1:
        raise ValueError(f"num_blocks: expected a positive int, got {num_blocks!r}")
    num_blocks = int(num_blocks)
    spatial_scale = _check_range("spatial_scale", spatial_scale, 1.0)
    temporal_scale = _check_range("temporal_scale", temporal_scale, 1.0)
    aspect_ratio = _check_range("aspect_ratio", aspect_ratio, None)
    device = _device(device, generator)
    t, h, w = grid
    n = t * h * w
    k = int(ratio * n)
    u = _rand(batch_size, num_blocks, 6, device=device, generator=generator, dtype=torch.float64)
    area = (spatial_scale[0] + (spatial_scale[1] - spatial_scale[0]) * u[..., 0]) * (h * w)
    log_ar = math.log(aspect_ratio[0]) + (math.log(aspect_ratio[1]) - math.log(aspect_ratio[0])) * u[..., 1]
    ar = torch.exp(log_ar)
    bh = torch.sqrt(area * ar).round().clamp(1, h).long()
    bw = torch.sqrt(area / ar).round().clamp(1, w).long()
    bt = ((temporal_scale[0] + (temporal_scale[1] - temporal_scale[0]) * u[..., 2]) * t).round().clamp(1, t).long()
    t0 = (u[..., 3] * (t - bt + 1)).long().clamp(max=t - 1)
    h0 = (u[..., 4] * (h - bh + 1)).long().clamp(max=h - 1)
    w0 = (u[..., 5] * (w - bw + 1)).long().clamp(max=w - 1)
    tt = torch.arange(t, device=device).view(t, 1, 1)
    hh = torch.arange(h, device=device).view(1, h, 1)
    ww = torch.arange(w, device=device).view(1, 1, w)

    def inside(coord, start, size):
        return (coord >= start[..., None, None, None]) & (coord < (start + size)[..., None, None, None])

    union = (inside(tt, t0, bt) & inside(hh, h0, bh) & inside(ww, w0, bw)).any(dim=1).reshape(batch_size, n)
    noise = _rand(batch_size, n, device=device, generator=generator)
    return _masks_of(_top_k_mask(union.to(noise.dtype) + noise, k), k)
