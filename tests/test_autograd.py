"""Autograd contract shared by every op: create_graph=True gives the same first-order gradients,
and backpropagating through a gradient raises (the backward ops have no autograd of their own)
instead of silently leaving the gradient's own terms out."""
import pytest
import torch

import wmkernels
from conftest import device_for


def _video():
    return torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))  # B C T H W; (1, 2, 2) tubelets: 8


def _ids(like, k=3):
    """(2, k) distinct token indices of the 8 per video (k = 8: a permutation, as ids_restore)."""
    g = torch.Generator().manual_seed(2)
    return torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(2)]).to(like.device)


CASES = {  # name -> (inputs that get gradients, fn(*inputs, backend))
    "mse_loss": (lambda: [torch.randn(3, 5), torch.randn(3, 5)], lambda p, t, be: wmkernels.mse_loss(p, t, backend=be)),
    "contrastive_loss": (lambda: [torch.randn(6, 4), torch.randn(6, 4)],
                         lambda a, b, be: wmkernels.contrastive_loss(a, b, backend=be)),
    "masked_mse_loss": (lambda: [torch.randn(2, 3, 12), _video()],
                        lambda p, v, be: wmkernels.masked_mse_loss(p, v, _ids(p), (1, 2, 2), backend=be)),
    "gather_patches": (lambda: [_video()],
                       lambda v, be: wmkernels.gather_patches(v, _ids(v), (1, 2, 2), backend=be).square().sum()),
    "unshuffle_with_mask_tokens": (
        lambda: [torch.randn(2, 3, 4), torch.randn(1, 1, 4), torch.randn(1, 8, 4)],
        lambda vis, tok, pos, be: wmkernels.unshuffle_with_mask_tokens(
            vis, tok, _ids(vis, 8), pos, backend=be).square().sum()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_raises_and_first_order_holds(name, backend):
    make, fn = CASES[name]
    torch.manual_seed(0)
    plain = [t.to(device_for(backend)).requires_grad_() for t in make()]
    fn(*plain, backend).backward()
    inputs = [t.detach().clone().requires_grad_() for t in plain]
    grads = torch.autograd.grad(fn(*inputs, backend), inputs, create_graph=True)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g.detach(), p.grad)
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match=f"wmkernels {name}: no double backward"):
        penalty.backward()
