"""Non-finite and degenerate inputs: every backend puts NaN / inf where the float64 PyTorch formula
does (never a NaN where it is finite, never finite values where it is NaN), or refuses with a ValueError.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import wmkernels
from conftest import FULL_BACKENDS, TRITON_AVAILABLE, device_for

BACKENDS = FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else [])
CONTRASTIVE_BACKENDS = [b for b in BACKENDS if b in ("torch", "cpu", "triton")]


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    for name, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(where(a), where(e)), f"{name} at {where(a).nonzero().tolist()}, expected at " \
                                                f"{where(e).nonzero().tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_mode", ["mae", "videomae"])
def test_masked_mse_mask_ignores_nonfinite_unmasked_patches(backend, norm_mode):
    """A bool mask means the mean over the masked patches, as ids_masked does: a NaN / inf in an
    unmasked pred row or video patch is never read (not multiplied by 0, which gives NaN)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, [0, 3, 5]] = True
    pred = torch.randn(2, 8, 24, generator=g)
    pred[0, 1, 4] = math.nan  # token 1 and the video patch of token 2 are unmasked
    pred[1, 2, 0] = math.inf
    video[0, 1, 0, 0, 2] = math.nan
    video[1, 2, 1, 1, 3] = -math.inf
    ids = torch.tensor([[0, 3, 5], [0, 3, 5]])
    p = pred.to(dev).requires_grad_()
    v = video.to(dev).requires_grad_()
    loss = wmkernels.masked_mse_loss(p, v, mask.to(dev), (2, 2, 2), norm_mode=norm_mode, backend=backend)
    gp, gv = torch.autograd.grad(loss, [p, v])
    p_ids = pred[:, [0, 3, 5]].to(dev).requires_grad_()
    v_ids = video.to(dev).requires_grad_()
    want = wmkernels.masked_mse_loss(p_ids, v_ids, ids.to(dev), (2, 2, 2), norm_mode=norm_mode, backend="torch")
    gp_ids, gv_ids = torch.autograd.grad(want, [p_ids, v_ids])
    assert torch.isfinite(loss) and torch.isfinite(gp).all() and torch.isfinite(gv).all()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gp[:, [0, 3, 5]], gp_ids)
    assert not gp[:, [1, 2, 4, 6, 7]].any()
    torch.testing.assert_close(gv, gv_ids)


def _formula_accuracy(z1, z2, labels):
    """top-1 of rows whose cross-entropy is not NaN, float64."""
    logits = F.normalize(z1.double(), dim=1) @ F.normalize(z2.double(), dim=1).T
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ((logits.argmax(1) == labels) & ~ce.isnan()).double().mean().item()


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_contrastive_accuracy_never_counts_nan_rows(backend, symmetric):
    """A NaN embedding row makes its loss NaN; its argmax (whatever a kernel's running max kept)
    is no hit. Here the NaN row's label is column 0, where a first-index argmax would land."""
    dev = device_for(backend)
    z1 = torch.eye(4, 3)
    z1[3] = torch.tensor([0.0, 0.6, 0.8])
    z2 = z1.clone()
    z1[0, 1] = math.nan
    r = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), symmetric=symmetric, return_accuracy=True,
                                   backend=backend)
    assert math.isclose(r.accuracy_12.item(), _formula_accuracy(z1, z2, torch.arange(4)))
    assert r.accuracy_12.item() == 0.75
    if symmetric:  # columns: every z2 row meets the NaN row of z1, so every column loss is NaN
        assert r.accuracy_21.item() == 0.0


def _formula_rows(z1, z2, scale, symmetric):
    a = z1.double().requires_grad_()
    b = z2.double().requires_grad_()
    logits = scale * a @ b.T
    labels = torch.arange(z1.shape[0])
    per = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        per = 0.5 * (per + F.cross_entropy(logits.T, labels, reduction="none"))
    ga, gb = torch.autograd.grad(per.mean(), [a, b])
    return per, ga, gb


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_contrastive_infinite_logits_unnormalized(backend, symmetric, value):
    """normalize=False with an inf embedding entry: rows whose logsumexp is infinite are NaN with
    NaN gradients (F.cross_entropy's log_softmax), rows with only a -inf logit stay finite (a
    zero smoothing term is not 0 * inf), and no gradient is finite where the formula's is NaN."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(5, 4, generator=g)
    z2 = torch.randn(5, 4, generator=g)
    z2[2, 1] = value
    a = z1.to(dev).requires_grad_()
    b = z2.to(dev).requires_grad_()
    per = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), logit_scale=2.0, normalize=False, symmetric=symmetric,
                                     reduction="none", backend=backend)
    loss = wmkernels.contrastive_loss(a, b, logit_scale=2.0, normalize=False, symmetric=symmetric, backend=backend)
    ga, gb = torch.autograd.grad(loss, [a, b])
    want, want_a, want_b = _formula_rows(z1, z2, 2.0, symmetric)
    assert torch.isfinite(want).any() and not torch.isfinite(want).all()  # the case is mixed
    assert_same_nonfinite(per, want)
    assert_same_nonfinite(loss, want.mean())
    for got, ref in ((ga, want_a), (gb, want_b)):
        assert not (torch.isfinite(got.cpu()) & ref.isnan()).any()
        assert not (~torch.isfinite(got.cpu()) & torch.isfinite(ref)).any()


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-300),
    dict(logit_scale=1e39),
    dict(temperature=torch.tensor(1e-40)),
    dict(logit_scale=torch.tensor(1e300, dtype=torch.float64)),
])
def test_contrastive_rejects_a_multiplier_that_overflows(kwargs):
    """A positive finite temperature whose 1 / temperature is inf in fp32 would make every loss NaN."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"^{name}: expected a positive finite .*logit multiplier"):
        wmkernels.contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), **kwargs)


def test_contrastive_tiny_temperature_is_finite():
    """temperature=1e-8: logits up to 1e8 stay finite through the logsumexp and the gradients."""
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(6, 5, generator=g).requires_grad_()
    z2 = torch.randn(6, 5, generator=g).requires_grad_()
    t = torch.tensor(1e-8, requires_grad=True)
    loss = wmkernels.contrastive_loss(z1, z2, temperature=t)
    grads = torch.autograd.grad(loss, [z1, z2, t])
    assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_mse_gradient_does_not_overflow_before_scaling(backend, reduction):
    """bf16 values near 1e38 (fp32's range): 2 (x - y) overflows fp32 where 2 w (x - y) / sum(w)
    does not, so the gradient must not be inf."""
    dev = device_for(backend)
    x = torch.full((4, 8), 1e38, dtype=torch.bfloat16, device=dev).requires_grad_()
    y = torch.full((4, 8), -1e38, dtype=torch.bfloat16, device=dev)
    w = torch.full((4, 1), 0.25, dtype=torch.bfloat16, device=dev)
    loss = wmkernels.mse_loss(x, y, reduction=reduction, weight=w, backend=backend)
    (gx,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    want = 2 * 0.25 * (x.detach().double() - y.double()) / (w.double().sum() * 8 if reduction == "mean" else 1)
    assert torch.isfinite(gx).all()
    torch.testing.assert_close(gx.double().cpu(), want.cpu(), rtol=1.6e-2, atol=0)


@pytest.mark.parametrize("name", ["mean", "std"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_masked_ops_reject_nonfinite_channel_stats(name, value):
    """A NaN / inf per-channel statistic would poison (or zero) every target: refused on the host."""
    video = torch.randn(1, 3, 2, 4, 4)
    ids = torch.tensor([[0, 1]])
    stats = {name: (0.5, value, 0.5)}
    with pytest.raises(ValueError, match=f"^{name}: expected finite per-channel values"):
        wmkernels.gather_patches(video, ids, (2, 2, 2), **stats)
    with pytest.raises(ValueError, match=f"^{name}: expected finite per-channel values"):
        wmkernels.masked_mse_loss(torch.randn(1, 2, 24), video, ids, (2, 2, 2), **stats)
