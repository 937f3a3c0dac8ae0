"""Contrastive loss with negatives from every rank: all-gather with gradients, or a ring.

Each rank scores its own rows (both directions when symmetric) against the global batch and
returns the mean over its rows. Gradients reaching a rank's features are summed over the ranks'
losses, so DDP's gradient averaging yields the gradient of the global mean loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validation
from .._registry import impl
from . import contrastive as ops


# one-buffer collectives (torch 2.13 renames them *_single; 2.5-2.12 know only the old names)
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_NO_REDUCE_SCATTER: set = set()  # process-group backends that refused it (gloo before torch 2.6 or so)


def _sum_own_slice(grad: torch.Tensor, rows: int, group) -> torch.Tensor:
    """Sum over ranks of `grad` (world * rows, ...), this rank's rows of it: a reduce-scatter, which
    moves 1/world of the bytes an all-reduce of the whole gradient would; an all-reduce and a slice
    where the process group has no reduce-scatter (refused on every rank alike, before any exchange)."""
    backend = str(dist.get_backend(group))
    if backend not in _NO_REDUCE_SCATTER:
        out = grad.new_empty((rows, *grad.shape[1:]))
        try:
            _reduce_scatter_into(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out
        except (RuntimeError, NotImplementedError) as e:
            if "support" not in str(e).lower():
                raise
            _NO_REDUCE_SCATTER.add(backend)
    grad = grad.clone()  # all_reduce works in place: autograd's gradient is not ours to write
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    rank = dist.get_rank(group)
    return grad[rank * rows : (rank + 1) * rows]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 into one buffer; backward sums every rank's gradient for this rank's
    slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _sum_own_slice(grad.contiguous(), ctx.rows, ctx.group), None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    return _GatherWithGrad.apply(x, group)


def _global_labels(labels, rows: int, world: int, rank: int, device, group) -> torch.Tensor:
    """Every rank's labels, concatenated (global column indices), without gradient."""
    if labels is None:
        return torch.arange(rows * world, device=device)
    labels = labels.long()  # int16 / uint8 labels: gloo and NCCL gather no such type
    out = labels.new_empty(world * rows)
    _all_gather_into(out, labels.contiguous(), group=group)
    return out


def _in_block(labels: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Labels as indices into the block of columns [start, start + rows); -1 where outside."""
    local = labels - start
    return torch.where((local >= 0) & (local < rows), local, torch.full_like(local, -1))


class _Ring:
    """Passes (z1 block, z2 block[, their gradients]) to the next rank, receiving the previous one's;
    the receive of step t + 1 is posted before the work of step t so communication overlaps it."""

    def __init__(self, group):
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def start(self, tensors):
        recv = [torch.empty_like(t) for t in tensors]
        reqs = [dist.isend(t.contiguous(), self.next, group=self.group, tag=i) for i, t in enumerate(tensors)]
        reqs += [dist.irecv(r, self.prev, group=self.group, tag=i) for i, r in enumerate(recv)]
        return reqs, recv

    @staticmethod
    def finish(pending):
        reqs, recv = pending
        for r in reqs:
            r.wait()
        return recv


class _RingContrastive(torch.autograd.Function):
    """Per-row losses of this rank's rows against all ranks' blocks, never holding more than one
    remote block. Forward: W - 1 shifts, merging each block's (logsumexp, linear terms, max, hit)
    into the rows' running values. Backward: recomputes each block, keeps the rows' gradient here
    and adds the columns' gradient to the travelling block's, which a W-th shift brings home."""

    @staticmethod
    def forward(ctx, z1, z2, scale, labels_row, labels_col, pw, sr, normalize, symmetric, group, backend):
        mod = impl("contrastive", backend)
        world, rank, rows = dist.get_world_size(group), dist.get_rank(group), z1.shape[0]
        ring = _Ring(group)
        dirs = [(z1, labels_row)] + ([(z2, labels_col)] if symmetric else [])
        state = [None] * len(dirs)
        blocks = [z1.detach(), z2.detach()]
        for step in range(world):
            pending = ring.start(blocks) if step + 1 < world else None
            src = (rank - step) % world
            for d, (rows_z, labels) in enumerate(dirs):
                cols = blocks[1] if d == 0 else blocks[0]
                lab = _in_block(labels, src * rows, cols.shape[0])
                with ops.no_autocast(rows_z):
                    loss, lse, mx, hit, *_ = mod.contrastive_forward(
                        rows_z, cols, scale, lab, lab[:0], pw, sr, sr, normalize, False
                    )
                lin = lse - loss
                if state[d] is None:
                    state[d] = [lse, lin, mx, hit, torch.full_like(lab, src)]
                    continue
                s_lse, s_lin, s_max, s_hit, s_src = state[d]
                better = (mx > s_max) | ((mx == s_max) & (src < s_src))  # argmax ties: lowest global column
                state[d] = [torch.logaddexp(s_lse, lse), s_lin + lin, torch.where(better, mx, s_max),
                            torch.where(better, hit, s_hit), torch.where(better, torch.full_like(s_src, src), s_src)]
            if pending is not None:
                blocks = ring.finish(pending)
        losses = [st[0] - st[1] for st in state]
        lses = [st[0] for st in state]
        hits = [st[3] for st in state]
        if not symmetric:
            losses.append(losses[0].new_empty(0))
            lses.append(lses[0].new_empty(0))
            hits.append(hits[0].new_empty(0))
        ctx.save_for_backward(z1, z2, scale, labels_row, labels_col, *lses)
        ctx.args = (pw, sr, normalize, symmetric, group, backend)
        ctx.mark_non_differentiable(*hits)
        return losses[0], losses[1], hits[0], hits[1]

    @staticmethod
    def backward(ctx, g_row, g_col, *_):
        z1, z2, scale, labels_row, labels_col, lse_r, lse_c = ctx.saved_tensors
        pw, sr, normalize, symmetric, group, backend = ctx.args
        mod = impl("contrastive", backend)
        world, rank, rows = dist.get_world_size(group), dist.get_rank(group), z1.shape[0]
        ring = _Ring(group)
        acc = torch.float64 if torch.float64 in (z1.dtype, z2.dtype) else torch.float32
        g1, g2 = torch.zeros_like(z1, dtype=acc), torch.zeros_like(z2, dtype=acc)
        dscale = torch.zeros_like(scale)
        travel = [z1.detach(), z2.detach(), torch.zeros_like(z1, dtype=acc), torch.zeros_like(z2, dtype=acc)]
        g_row = torch.zeros_like(lse_r) if g_row is None else g_row
        g_col = torch.zeros_like(lse_c) if g_col is None else g_col
        def one_direction(g, x, y_blk, labels, lse, src, gx, gy_blk):
            """Local rows x against the visiting block y_blk in one direction: adds the gradients."""
            lab = _in_block(labels, src * rows, rows)
            with ops.no_autocast(x):
                d_rows, d_cols, ds = mod.contrastive_backward(
                    g, g[:0], x, y_blk, scale, lab, lab[:0], lse, lse[:0], pw, sr, sr, normalize, False
                )
            gx += d_rows
            gy_blk += d_cols
            return ds

        for step in range(world):
            src = (rank - step) % world
            a_blk, b_blk, ga_blk, gb_blk = travel
            dscale += one_direction(g_row, z1, b_blk, labels_row, lse_r, src, g1, gb_blk)
            if symmetric:
                dscale += one_direction(g_col, z2, a_blk, labels_col, lse_c, src, g2, ga_blk)
            if world > 1:  # after the W-th shift each block is home (alone, it never left)
                travel = ring.finish(ring.start(travel))
        g1 += travel[2]
        g2 += travel[3]
        need = ctx.needs_input_grad
        return ((g1.to(z1.dtype) if need[0] else None), (g2.to(z2.dtype) if need[1] else None),
                (dscale if need[2] else None), *([None] * 8))


def _check_same_shape_on_ranks(z: torch.Tensor, mode: str, world: int, group) -> None:
    """Every rank must bring a batch of the same shape: the collectives would otherwise abort the
    process (gloo) or hang. Checked for CPU tensors only: on a GPU the exchange would be a sync."""
    if not _validation.values_ok(z):
        return
    mine = torch.tensor(z.shape, dtype=torch.int64)
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    if any(not torch.equal(s, mine) for s in shapes):
        raise ValueError(
            f"z1: distributed={mode!r} needs the same (batch, dim) on every rank, got {[tuple(s.tolist()) for s in shapes]}"
        )


def distributed_loss(z1, z2, scale, labels, eps, normalize, symmetric, return_accuracy, mode, reduction, group, backend):
    """This rank's part of the global contrastive loss (see `contrastive_loss`)."""
    world, rank, rows = dist.get_world_size(group), dist.get_rank(group), z1.shape[0]
    _check_same_shape_on_ranks(z1, mode, world, group)
    n = world * rows
    labels_all = _global_labels(labels, rows, world, rank, z1.device, group)
    if labels is not None:
        ops._check_labels(labels_all, n, symmetric)
    labels_row = labels_all[rank * rows : (rank + 1) * rows]
    labels_col = ops._inverse(labels_all)[rank * rows : (rank + 1) * rows] if symmetric else labels_row[:0]
    pw, sr = 1.0 - eps, eps / n
    if mode == "gather":
        z2_all = gather_with_grad(z2, group)
        loss_r, _, _, _, hit_r, _ = ops.contrastive_loss_fn(
            z1, z2_all, scale, labels_row, labels_row[:0], pw, sr, sr, normalize, False, backend
        )
        loss_c = hit_c = None
        if symmetric:
            z1_all = gather_with_grad(z1, group)
            loss_c, _, _, _, hit_c, _ = ops.contrastive_loss_fn(
                z2, z1_all, scale, labels_col, labels_col[:0], pw, sr, sr, normalize, False, backend
            )
    else:
        loss_r, loss_c, hit_r, hit_c = _RingContrastive.apply(
            z1, z2, scale, labels_row, labels_col, pw, sr, normalize, symmetric, group, backend
        )
        if not symmetric:
            loss_c = hit_c = None
    per_row = 0.5 * (loss_r + loss_c) if symmetric else loss_r
    loss = ops._reduce(per_row, reduction).to(ops.result_dtype(z1, z2))
    if not return_accuracy:
        return loss
    return ops.accuracy_result(loss, hit_r, hit_c, loss_r, loss_c)
