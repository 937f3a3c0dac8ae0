"""Masked video modeling ops: fused tubelet gather, mask-token unshuffle and masked norm-pix MSE.

Registered ops `wmkernels::gather_patches`, `wmkernels::unshuffle_with_mask_tokens`,
`wmkernels::masked_mse_loss` (each with its backward op) and their public functions.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import _backends, _validation
from .._registry import impl
from . import _eager
from ._grad import is_one_on_cpu
from ..reference import masked as ref

GATHER_SUPPORTED = ("triton", "cuda", "cpu", "torch")
LOSS_SUPPORTED = ("triton", "cuda", "cpu", "torch")
UNSHUFFLE_SUPPORTED = ("triton", "cpu", "torch")
NORM_MODES = ("mae", "videomae")


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


# ---------------------------------------------------------------------------------------------- gather


@torch.library.custom_op("wmkernels::gather_patches", mutates_args=())
def gather_patches_op(
    video: torch.Tensor,
    ids: torch.Tensor,
    tubelet: list[int],
    layout: str,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return impl("masked", backend).gather_patches(video, ids, tubelet, layout, mean, std, out_dtype)


@gather_patches_op.register_fake
def _(video, ids, tubelet, layout, mean, std, out_dtype, backend):
    c = video.shape[ref.channel_dim(layout)]
    return video.new_empty((ids.shape[0], ids.shape[1], math.prod(tubelet) * c), dtype=out_dtype)


@torch.library.custom_op("wmkernels::gather_patches_backward", mutates_args=())
def gather_patches_backward_op(
    grad: torch.Tensor,
    ids: torch.Tensor,
    video_shape: list[int],
    video_dtype: torch.dtype,
    tubelet: list[int],
    layout: str,
    std: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return impl("masked", backend).gather_patches_backward(grad, ids, video_shape, video_dtype, tubelet, layout, std)


@gather_patches_backward_op.register_fake
def _(grad, ids, video_shape, video_dtype, tubelet, layout, std, backend):
    return grad.new_empty(video_shape, dtype=video_dtype)


def _gather_setup(ctx, inputs, output):
    video, ids, tubelet, layout, _, std, _, backend = inputs
    ctx.video_shape, ctx.video_dtype = list(video.shape), video.dtype
    ctx.tubelet, ctx.layout, ctx.backend = tubelet, layout, backend
    ctx.save_for_backward(ids, std)


def _gather_backward(ctx, grad):
    ids, std = ctx.saved_tensors
    gv = None
    if ctx.needs_input_grad[0]:
        gv = _eager.call(
            gather_patches_backward_op, grad.contiguous(), ids, ctx.video_shape, ctx.video_dtype, ctx.tubelet,
            ctx.layout, std, ctx.backend,
        )
    return gv, None, None, None, None, None, None, None


_gather_patches = _eager.autograd_op(gather_patches_op, _gather_setup, _gather_backward)


# ------------------------------------------------------------------------------------------ unshuffle


@torch.library.custom_op("wmkernels::unshuffle_with_mask_tokens", mutates_args=())
def unshuffle_op(
    visible: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    return impl("masked", backend).unshuffle_forward(visible, mask_token, ids_restore, pos_embed, out_dtype)


@unshuffle_op.register_fake
def _(visible, mask_token, ids_restore, pos_embed, out_dtype, backend):
    return visible.new_empty((visible.shape[0], ids_restore.shape[1], visible.shape[2]), dtype=out_dtype)


@torch.library.custom_op("wmkernels::unshuffle_with_mask_tokens_backward", mutates_args=())
def unshuffle_backward_op(
    grad: torch.Tensor,
    ids_restore: torch.Tensor,
    num_visible: int,
    visible_dtype: torch.dtype,
    token_dtype: torch.dtype,
    pos_shape: list[int],
    pos_dtype: torch.dtype,
    need_visible: bool,
    need_token: bool,
    need_pos: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d visible, d mask_token flattened to (D,), d pos_embed); an empty tensor for one not needed."""
    gv, gt, gp = impl("masked", backend).unshuffle_backward(
        grad, ids_restore, num_visible, visible_dtype, token_dtype, pos_shape, pos_dtype,
        need_visible, need_token, need_pos,
    )
    return (
        gv if need_visible else _empty(grad),
        gt if need_token else _empty(grad),
        gp if need_pos else _empty(grad),
    )


@unshuffle_backward_op.register_fake
def _(grad, ids_restore, num_visible, visible_dtype, token_dtype, pos_shape, pos_dtype, need_visible, need_token,
      need_pos, backend):
    b, _, d = grad.shape
    return (
        grad.new_empty((b, num_visible, d), dtype=visible_dtype) if need_visible else _empty(grad),
        grad.new_empty((d,), dtype=token_dtype) if need_token else _empty(grad),
        grad.new_empty(pos_shape, dtype=pos_dtype) if need_pos else _empty(grad),
    )


def _unshuffle_setup(ctx, inputs, output):
    visible, mask_token, ids_restore, pos_embed, _, backend = inputs
    ctx.num_visible, ctx.visible_dtype = visible.shape[1], visible.dtype
    ctx.token_shape, ctx.token_dtype = mask_token.shape, mask_token.dtype
    ctx.pos_shape = list(pos_embed.shape) if pos_embed is not None else []
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else visible.dtype
    ctx.backend = backend
    ctx.save_for_backward(ids_restore)


def _unshuffle_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_v, need_t, _, need_p = ctx.needs_input_grad[:4]
    if not (need_v or need_t or need_p):
        return None, None, None, None, None, None
    gv, gt, gp = _eager.call(
        unshuffle_backward_op, grad.contiguous(), ids_restore, ctx.num_visible, ctx.visible_dtype, ctx.token_dtype,
        ctx.pos_shape, ctx.pos_dtype, need_v, need_t, need_p, ctx.backend,
    )
    return (
        gv if need_v else None,
        gt.reshape(ctx.token_shape) if need_t else None,
        None,
        gp if need_p else None,
        None,
        None,
    )


_unshuffle = _eager.autograd_op(unshuffle_op, _unshuffle_setup, _unshuffle_backward)


# ----------------------------------------------------------------------------------------------- loss


@torch.library.custom_op("wmkernels::masked_mse_loss", mutates_args=())
def masked_mse_loss_op(
    pred: torch.Tensor,
    video: torch.Tensor,
    index: torch.Tensor,
    tubelet: list[int],
    layout: str,
    norm_pix: bool,
    norm_mode: str,
    eps: float,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: str,
    fuse_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred at grad_output = 1 when `fuse_grad`, else an empty tensor)."""
    module = impl("masked", backend)
    args = (pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, out_dtype)
    if fuse_grad:
        return module.masked_mse_forward_with_grad(*args)
    return module.masked_mse_forward(*args), _empty(pred)


@masked_mse_loss_op.register_fake
def _(pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, out_dtype, backend, fuse_grad):
    return pred.new_empty((), dtype=out_dtype), (torch.empty_like(pred) if fuse_grad else _empty(pred))


@torch.library.custom_op("wmkernels::masked_mse_loss_backward", mutates_args=())
def masked_mse_loss_backward_op(
    grad_out: torch.Tensor,
    pred: torch.Tensor,
    video: torch.Tensor,
    index: torch.Tensor,
    tubelet: list[int],
    layout: str,
    norm_pix: bool,
    norm_mode: str,
    eps: float,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    need_pred: bool,
    need_video: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d pred, d video) recomputed from the inputs; an empty tensor for one not needed."""
    gp, gv = impl("masked", backend).masked_mse_backward(
        grad_out, pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, need_pred, need_video
    )
    return (gp if need_pred else _empty(pred)), (gv if need_video else _empty(video))


@masked_mse_loss_backward_op.register_fake
def _(grad_out, pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, need_pred, need_video,
      backend):
    return (
        torch.empty_like(pred) if need_pred else _empty(pred),
        video.new_empty(video.shape) if need_video else _empty(video),
    )


def _loss_setup(ctx, inputs, output):
    pred, video, index, tubelet, layout, norm_pix, norm_mode, eps, mean, std, _, backend, fuse_grad = inputs
    ctx.args = (tubelet, layout, norm_pix, norm_mode, eps)
    ctx.backend, ctx.fuse_grad = backend, fuse_grad
    ctx.save_for_backward(pred, video, index, mean, std, output[1] if fuse_grad else None)
    # the fused-gradient output never receives a gradient: do not let autograd allocate zeros for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, grad_loss, _grad_fused):
    pred, video, index, mean, std, fused = ctx.saved_tensors
    need_pred, need_video = ctx.needs_input_grad[:2]
    gp = gv = None
    if grad_loss is None:
        return (None,) * 13
    if ctx.fuse_grad and need_pred:
        gp = fused if is_one_on_cpu(grad_loss) else fused * grad_loss  # scaled in fp32, rounded once
        need_pred = False
    if need_pred or need_video:
        tubelet, layout, norm_pix, norm_mode, eps = ctx.args
        p, v = _eager.call(
            masked_mse_loss_backward_op, grad_loss, pred, video, index, tubelet, layout, norm_pix, norm_mode, eps,
            mean, std, need_pred, need_video, ctx.backend,
        )
        gp = p if need_pred else gp
        gv = v if need_video else None
    return (gp, gv) + (None,) * 11


_masked_mse_loss = _eager.autograd_op(masked_mse_loss_op, _loss_setup, _loss_backward)


# ------------------------------------------------------------------------------------- public functions


def _video_dims(video: torch.Tensor, tubelet: tuple[int, int, int], layout: str) -> tuple[int, tuple[int, int, int], int]:
    """Validates a video (`tubelet` already checked); returns (channels, token grid, patch size P)."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video: expected a torch.Tensor, got {type(video).__name__}")
    _validation.check_video_layout(layout)
    if video.dim() != 5:
        raise ValueError(f"video: expected 5 dims ({layout}), got shape {tuple(video.shape)}")
    if not (video.is_floating_point() or video.dtype == torch.uint8):
        raise TypeError(f"video: expected a floating-point or uint8 tensor, got dtype {video.dtype}")
    c = video.shape[ref.channel_dim(layout)]
    t = video.shape[2] if layout == "BCTHW" else video.shape[1]
    _validation.check_divisible("video", (t, video.shape[3], video.shape[4]), tubelet)
    grid = (t // tubelet[0], video.shape[3] // tubelet[1], video.shape[4] // tubelet[2])
    return c, grid, math.prod(tubelet) * c


def _channel_stats(video, channels: int, mean, std, acc: torch.dtype):
    out = []
    for name, v in (("mean", mean), ("std", std)):
        if v is None:
            out.append(None)
            continue
        try:
            t = torch.as_tensor(v, dtype=acc).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: expected {channels} per-channel numbers (a sequence or tensor), got {v!r}") from e
        if _validation.values_ok(t):
            # a NaN or inf statistic would silently poison (or zero) every target of the batch
            if not t.isfinite().all():
                raise ValueError(f"{name}: expected finite per-channel values, got {t.tolist()}")
            if name == "std" and (t == 0).any():
                raise ValueError(f"std: expected non-zero per-channel values (they divide the video), got {t.tolist()}")
        if t.device != video.device:
            # a pinned staging copy goes to the GPU without waiting for it (a pageable one would sync)
            t = t.pin_memory().to(video.device, non_blocking=True) if video.is_cuda else t.to(video.device)
        t = t.reshape(-1)
        if t.numel() != channels:
            raise ValueError(f"{name}: expected {channels} per-channel values (the video's channels), got {t.numel()}")
        out.append(t.contiguous())
    return out


def patchify(video: torch.Tensor, tubelet: Sequence[int] = (2, 16, 16), layout: str = "BCTHW") -> torch.Tensor:
    """(B, N, pt*ph*pw*C) tokens of a (B, C, T, H, W) ("BCTHW") or (B, T, C, H, W) ("BTCHW") video.

    Tokens are in (t, h, w) row-major order and each patch's values in `(pt ph pw) c` order
    (channel innermost), as VideoMAE. Differentiable; one copy of the video (prefer
    `gather_patches` to read only some patches).
    """
    tubelet = _validation.check_tubelet(tubelet)
    _video_dims(video, tubelet, layout)
    return ref.patchify(video, tubelet, layout)


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], tubelet: Sequence[int] = (2, 16, 16),
               layout: str = "BCTHW") -> torch.Tensor:
    """The inverse of `patchify`: a video in `layout` from (B, T'*H'*W', P) tokens over the token `grid`."""
    tubelet, grid = _validation.check_tubelet(tubelet), tuple(grid)
    _validation.check_video_layout(layout)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens: expected a (B, N, P) tensor, got {getattr(tokens, 'shape', type(tokens))}")
    if len(grid) != 3 or tokens.shape[1] != math.prod(grid):
        raise ValueError(f"grid: expected (T', H', W') with T'*H'*W' = {tokens.shape[1]} tokens, got {grid!r}")
    if tokens.shape[2] % math.prod(tubelet):
        raise ValueError(f"tokens: patch size {tokens.shape[2]} is not a multiple of the tubelet volume {tubelet}")
    return ref.unpatchify(tokens, grid, tubelet, layout)


def gather_patches(
    video: torch.Tensor,
    ids: torch.Tensor,
    tubelet: Sequence[int] = (2, 16, 16),
    layout: str = "BCTHW",
    *,
    mean=None,
    std=None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """(B, K, P) patches `ids` (B, K) int64 of `video`, read straight from the (strided) video.

    Equal to `torch.gather(patchify(video, tubelet, layout), 1, ids[..., None].expand(-1, -1, P))`
    without materializing the patchified video; P = pt*ph*pw*C in `(pt ph pw) c` order.
    `video` is float or uint8; `mean`/`std` (C values, sequences or tensors, treated as
    constants) normalize on the fly: `(x - mean[c]) / std[c]` on the raw values (for uint8 in
    [0, 255] with ImageNet statistics pass them times 255). `dtype` is the output dtype (default:
    the video's, float32 for uint8). Gradients flow to a float video (summed for repeated ids).
    """
    tubelet = _validation.check_tubelet(tubelet)
    c, grid, _ = _video_dims(video, tubelet, layout)
    n = math.prod(grid)
    _validation.check_index_tensor("ids", ids, (video.shape[0], None), n)
    _validation.check_same_device(video=video, ids=ids)
    if dtype is None:
        dtype = video.dtype if video.is_floating_point() else torch.float32
    _validation.check_dtype("dtype", dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    mean_t, std_t = _channel_stats(video, c, mean, std, ref.acc_dtype(dtype, video.dtype))
    name = _backends.resolve("gather_patches", GATHER_SUPPORTED, video.device, backend)
    return _gather_patches(video, ids, list(tubelet), layout, mean_t, std_t, dtype, name)


def unshuffle_with_mask_tokens(
    visible: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE decoder input (B, N, D): visible tokens and the mask token in original token order,
    plus `pos_embed`.

    visible: (B, K, D) encoder outputs of the kept tokens in `Masks.ids_keep` order; mask_token:
    D values ((D,), (1, 1, D), ...); ids_restore: (B, N) int64, each row a permutation of [0, N)
    (`Masks.ids_restore`); pos_embed:
    broadcastable to (B, N, D), e.g. (1, N, D). Bit for bit equal to
    `gather(cat([visible, mask_token.expand(B, N - K, D)], 1), 1, ids_restore) + pos_embed`
    (in the promoted dtype); gradients flow to visible, mask_token and pos_embed.
    """
    _validation.check_float_tensor("visible", visible)
    _validation.check_float_tensor("mask_token", mask_token)
    if visible.dim() != 3:
        raise ValueError(f"visible: expected (B, K, D), got shape {tuple(visible.shape)}")
    b, k, d = visible.shape
    if mask_token.numel() != d:
        raise ValueError(f"mask_token: expected {d} values (visible's D), got shape {tuple(mask_token.shape)}")
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dim() != 2 or ids_restore.shape[1] < k:
        raise ValueError(
            f"ids_restore: expected shape ({b}, N) with N >= {k} (visible tokens), got "
            f"{tuple(getattr(ids_restore, 'shape', ()))}"
        )
    n = ids_restore.shape[1]
    _validation.check_index_tensor("ids_restore", ids_restore, (b, n), n)
    out_dtype = torch.promote_types(visible.dtype, mask_token.dtype)
    if pos_embed is not None:
        _validation.check_float_tensor("pos_embed", pos_embed)
        _validation.check_broadcastable("pos_embed", pos_embed, "the output", visible.new_empty(1).expand(b, n, d))
        out_dtype = torch.promote_types(out_dtype, pos_embed.dtype)
    _validation.check_same_device(visible=visible, mask_token=mask_token, ids_restore=ids_restore,
                                  pos_embed=pos_embed)
    # the backward sends each output row's gradient to one source row: a repeated id would leave
    # another row's gradient unwritten
    def covered():
        return torch.zeros(ids_restore.shape, dtype=torch.bool, device=ids_restore.device).scatter_(1, ids_restore, True)

    perm = f"ids_restore: expected every row to be a permutation of [0, {_validation.shown(n)}) (Masks.ids_restore)"
    if _validation.values_ok(ids_restore) and ids_restore.numel():
        hit = covered()
        if not hit.all():
            raise ValueError(f"{perm}, row {int((~hit).any(1).nonzero()[0])} repeats a value")
    _validation.device_check(ids_restore, lambda: covered().all(), perm)
    name = _backends.resolve("unshuffle_with_mask_tokens", UNSHUFFLE_SUPPORTED, visible.device, backend)
    return _unshuffle(visible, mask_token, ids_restore, pos_embed, out_dtype, name)


def masked_mse_loss(
    pred: torch.Tensor,
    video: torch.Tensor,
    index: torch.Tensor,
    tubelet: Sequence[int] = (2, 16, 16),
    layout: str = "BCTHW",
    *,
    norm_pix: bool = True,
    norm_mode: str = "mae",
    eps: float = 1e-6,
    mean=None,
    std=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Masked patch reconstruction loss with targets read from the raw video.

    `index` is either `ids_masked` (B, M) int64 with `pred` (B, M, P) predicting those patches
    (VideoMAE), or a (B, N) bool mask (True = masked) with `pred` (B, N, P) for every patch
    (MAE; unmasked rows get zero gradient); at least one patch must be masked. P = pt*ph*pw*C in `(pt ph pw) c` order (see
    `patchify`). Targets: the video patches, first `(x - mean[c]) / std[c]` when given (uint8
    videos as delivered by loaders), then with `norm_pix` normalized per patch:
    `norm_mode="mae"`: `(x - mean) / sqrt(var + eps)` over the patch's P values;
    `norm_mode="videomae"`: `(x - mean) / (std + eps)` per channel over its pt*ph*pw values
    (unbiased variance / std in both). Loss = mean over the masked patches of the mean over P
    of (pred - target)^2, accumulated in fp32 (fp64 for fp64 inputs), in pred's dtype promoted
    with a float video's. Gradients flow to `pred` and to a float `video` that requires grad.
    """
    tubelet = _validation.check_tubelet(tubelet)
    _validation.check_float_tensor("pred", pred)
    c, grid, p = _video_dims(video, tubelet, layout)
    b, n = video.shape[0], math.prod(grid)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index: expected ids_masked (int64) or a mask (bool) tensor, got {type(index).__name__}")
    if index.dtype == torch.bool:
        if tuple(index.shape) != (b, n):
            raise ValueError(f"index: a bool mask must have shape (B, N) = {(b, n)}, got {tuple(index.shape)}")
        want = (b, n, p)
    elif index.dtype == torch.int64:
        _validation.check_index_tensor("index", index, (b, None), n)
        if index.shape[1] == n > 2:  # MAE's 0/1 mask cast to int64 would pass as ids (patches 0 and 1 only)
            msg = "index: an int64 (B, N) tensor of 0/1 values is a mask, not ids_masked: pass mask.bool()"
            if _validation.values_ok(index) and int(index.max()) <= 1:
                raise ValueError(f"{msg} (got shape {tuple(index.shape)})")
            _validation.device_check(index, lambda: index.amax() > 1, msg)
        want = (b, index.shape[1], p)
    else:
        raise TypeError(f"index: expected dtype torch.int64 (ids_masked) or torch.bool (mask), got {index.dtype}")
    if tuple(pred.shape) != want:
        raise ValueError(f"pred: expected shape {want} (B, {'N' if index.dtype == torch.bool else 'M'}, P), "
                         f"got {tuple(pred.shape)}")
    # the loss is a mean over the masked patches: with none it is undefined (a mask's count is
    # read on CPU only: on a GPU that would sync, and the loss comes out NaN there)
    no_rows = index.numel() == 0 or (
        index.dtype == torch.bool and _validation.values_ok(index) and not index.any())
    if no_rows:
        raise ValueError(f"index: no masked patches (shape {tuple(index.shape)}"
                         f"{', no True entry' if index.numel() else ''}): the loss over them is undefined")
    if norm_mode not in NORM_MODES:
        raise ValueError(f"norm_mode: expected one of {NORM_MODES}, got {norm_mode!r}")
    group = p // c if norm_mode == "videomae" else p
    if norm_pix and group < 2:
        raise ValueError(f"tubelet: norm_pix needs at least 2 values per normalized group, tubelet is {tubelet}")
    # finiteness read on the host only: torch.compile traces eps as a symbolic float
    if not _validation.is_real(eps) or eps < 0 or (not torch.compiler.is_compiling() and not math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    _validation.check_same_device(pred=pred, video=video, index=index)
    acc = ref.acc_dtype(pred.dtype, video.dtype)
    mean_t, std_t = _channel_stats(video, c, mean, std, acc)
    out_dtype = torch.promote_types(pred.dtype, video.dtype) if video.is_floating_point() else pred.dtype
    if torch.is_autocast_enabled(pred.device.type):
        out_dtype = torch.promote_types(out_dtype, torch.float32)
    name = _backends.resolve("masked_mse_loss", LOSS_SUPPORTED, pred.device, backend)
    # cpu and torch write the pred gradient while the targets are at hand (one pass over them);
    # the GPU kernels recompute it in the backward instead of holding it between the passes. Not
    # in fp16: at grad_output = 1 the gradient underflows its range (a GradScaler's scale comes later)
    fuse = name in ("cpu", "torch") and torch.is_grad_enabled() and pred.requires_grad and pred.dtype != torch.float16
    loss, _ = _masked_mse_loss(
        pred, video, index, list(tubelet), layout, bool(norm_pix), norm_mode, float(eps), mean_t, std_t,
        out_dtype, name, fuse,
    )
    return loss
