"""Triton kernels under GPU semantics: 64-bit patch offsets, PyTorch's bf16
rounding of stored gradients, eps kept fp64, launches on the tensors' own device. Tiny shapes."""
import inspect
import math
import types

import pytest
import torch

import wmkernels
from conftest import TRITON_AVAILABLE, device_for

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton unavailable")

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from wmkernels.triton import _index, contrastive, masked, mse

    @triton.jit
    def _offsets_kernel(out_ptr, b, n, gh, gw, sb, sc, st, sh, sw, PT: tl.constexpr, PH: tl.constexpr,
                        PW: tl.constexpr, NC: tl.constexpr):
        """Stores the offsets of a patch's values; b and n are int64 as in the loss and gather kernels."""
        P: tl.constexpr = PT * PH * PW * NC
        q = tl.arange(0, P)
        off, _ = masked._patch_offsets(q, b.to(tl.int64), n.to(tl.int64), gh, gw, sb, sc, st, sh, sw,
                                       PT, PH, PW, NC)
        tl.store(out_ptr + q, off)


def test_patch_offsets_do_not_wrap_at_2_31():
    """Strides below 2^31 arrive as int32: their products with in-patch indices must not wrap."""
    pt, ph, pw, nc = 4, 2, 1, 4  # indices up to 3: 3 * stride passes 2^31
    sc, st, sh, sw = 2**30 + 1, 2**30 + 3, 2**31 - 5, 1
    out = torch.zeros(pt * ph * pw * nc, dtype=torch.int64, device=device_for("triton"))
    _offsets_kernel[(1,)](out, 0, 0, 1, 1, 0, sc, st, sh, sw, PT=pt, PH=ph, PW=pw, NC=nc)
    want = [c * sc + i * st + j * sh + k * sw
            for i in range(pt) for j in range(ph) for k in range(pw) for c in range(nc)]
    assert out.tolist() == want


def test_mse_bf16_gradients_round_like_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g).bfloat16().to(device_for("triton"))
    y = torch.randn(3000, generator=g).bfloat16().to(x.device)
    grads = {}
    for backend in ("torch", "triton"):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        wmkernels.mse_loss(a, b, reduction="sum", backend=backend).backward()
        grads[backend] = (a.grad, b.grad)
    assert torch.equal(grads["triton"][0], grads["torch"][0])
    assert torch.equal(grads["triton"][1], grads["torch"][1])


def test_on_device_guards_the_tensors_gpu():
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert isinstance(_index.on_device(fake), torch.cuda.device) and _index.on_device(fake).idx == 1
    assert not isinstance(_index.on_device(torch.empty(1)), torch.cuda.device)


def _each_public_op(dev: str):
    """One forward+backward of every public op on tiny inputs, on the Triton backend: a list of
    callables, run in order by the launch tests."""
    video = torch.randn(1, 1, 2, 2, 2, device=dev, requires_grad=True)  # one 2x2x2 tubelet, P = 8
    ids = torch.zeros(1, 1, dtype=torch.int64, device=dev)
    x, pred, vis, z = (torch.randn(*shape, device=dev, requires_grad=True) for shape in ((2, 3), (1, 1, 8), (1, 1, 4),
                                                                                        (3, 4)))
    ids_restore = torch.tensor([[1, 0]], device=dev)
    return [
        lambda: wmkernels.mse_loss(x, torch.randn(2, 3, device=dev), backend="triton").backward(),
        lambda: wmkernels.gather_patches(video, ids, (2, 2, 2), backend="triton").sum().backward(),
        lambda: wmkernels.masked_mse_loss(pred, video, ids, (2, 2, 2), backend="triton").backward(),
        lambda: wmkernels.unshuffle_with_mask_tokens(vis, torch.zeros(4, device=dev), ids_restore,
                                                     backend="triton").sum().backward(),
        lambda: wmkernels.contrastive_loss(z, torch.randn(3, 4, device=dev), backend="triton").backward(),  # fused
    ]


def test_every_launch_is_guarded(monkeypatch):
    """Triton launches on the current device: each launcher must enter the tensors' device first."""
    seen = []

    def record(t):
        seen.append(t.device)
        return _index.on_device(t)

    for module in (mse, masked, contrastive):
        monkeypatch.setattr(module, "on_device", record)
    dev = device_for("triton")
    for i, op in enumerate(_each_public_op(dev)):
        op()
        assert len(seen) == 2 * (i + 1)  # the forward's launcher and the backward's
    assert all(d == torch.empty(0, device=dev).device for d in seen)  # cuda:0, not "cuda", on a GPU


def test_every_launch_disables_fp_fusion(monkeypatch):
    """Every kernel of every op launches with _index.LAUNCH (no fused multiply-adds): the backward's
    recomputed logit must round as the forward's did, and Triton's default changes in 3.10."""
    launched = {}

    class Spy:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def call(*args, **kwargs):
                launched.setdefault(self.name, []).append(kwargs.get("enable_fp_fusion"))
                return launch(*args, **kwargs)
            return call

    kernels = [(m, n) for m in (mse, masked, contrastive) for n in dir(m) if n.endswith("_kernel")]
    for m, n in kernels:
        monkeypatch.setattr(m, n, Spy(getattr(m, n), f"{m.__name__}.{n}"))
    dev = device_for("triton")
    for op in _each_public_op(dev):
        op()
    z = torch.randn(3, 4, device=dev)
    zb = z.bfloat16()  # the one-sweep backward takes half operands only
    acc, _, _, ka, kb = contrastive._prepare(zb, zb.flip(0), True)
    one = torch.ones((), device=dev)
    contrastive._lse(ka, kb, one, acc, splits=2)  # split columns: the partials' merge
    lse = contrastive._lse(ka, kb, one, acc)[0]
    g = torch.full((3,), 1 / 3, device=dev)
    contrastive._grads(ka, kb, one, lse, g, lse, g, True, acc, cand=contrastive.candidates("fused", 64, ka.dtype)[0])
    assert sorted(launched) == sorted(f"{m.__name__}.{n}" for m, n in kernels)  # each kernel at least once
    assert all(v is False for calls in launched.values() for v in calls), launched


def test_masked_loss_eps_stays_fp64():
    """A compiled kernel gets a Python float as fp32 unless declared fp64 (the interpreter keeps it
    exact, so there only the declaration shows); eps = 0.1 rounded to fp32 moves the loss by ~2e-9."""
    declared = inspect.signature(masked._loss_rows_kernel.fn).parameters["eps"].annotation
    assert triton.runtime.jit._normalize_ty(declared) == "fp64"  # how the launcher reads it
    g = torch.Generator().manual_seed(0)
    dev = device_for("triton")
    video = (torch.randn(1, 3, 2, 4, 4, dtype=torch.float64, generator=g) * 0.3).to(dev)
    pred = torch.randn(1, 4, 24, dtype=torch.float64, generator=g).to(dev)
    mask = torch.tensor([[True, False, True, True]], device=dev)
    for mode in ("mae", "videomae"):
        want, got = (wmkernels.masked_mse_loss(pred, video, mask, (2, 2, 2), norm_mode=mode, eps=0.1, backend=b)
                     for b in ("torch", "triton"))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def _ce_rows(z1, z2, scale, labels, symmetric):
    logits = scale * z1.double() @ z2.double().T
    per = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        per = 0.5 * (per + torch.nn.functional.cross_entropy(logits.T, labels, reduction="none"))
    return per


@pytest.mark.parametrize("case", ["rows", "rows-sym", "columns-sym"])
def test_contrastive_all_neg_inf_first_tile_stays_finite(case):
    """normalize=False with -inf embedding entries: a row whose first column tile (or, symmetric, a
    column whose first row block) holds only -inf logits has a finite logsumexp once finite logits
    follow; the online logsumexp must not shift by its -inf running max (exp(-inf + inf) = NaN).
    48 rows: three 16-row tiles of the fp32 kernels, two programs under the interpreter."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(48, 4, generator=g), torch.randn(48, 4, generator=g)
    pos, neg = (z1, z2) if case != "columns-sym" else (z2, z1)
    pos[:, 0] = pos[:, 0].abs() + 0.1
    neg[:16, 0] = -math.inf  # with pos[:, 0] > 0: the logits against these rows are all -inf
    symmetric = case != "rows"
    labels = torch.arange(48)
    dev = device_for("triton")
    per = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), logit_scale=2.0, normalize=False, symmetric=symmetric,
                                     reduction="none", backend="triton").cpu()
    want = _ce_rows(z1, z2, 2.0, labels, symmetric)
    assert want.isfinite().sum() >= 32
    for where in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(where(per), where(want))
    torch.testing.assert_close(per[want.isfinite()].double(), want[want.isfinite()], rtol=1e-5, atol=1e-5)
    if case == "rows":  # positives away from the -inf columns: a finite loss (d a[:, 0] is 0 * -inf = NaN)
        labels = 16 + torch.arange(48) % 32
        a, b = z1.to(dev).requires_grad_(), z2.clone().to(dev).requires_grad_()
        loss = wmkernels.contrastive_loss(a, b, labels=labels.to(dev), logit_scale=2.0, normalize=False,
                                          symmetric=False, backend="triton")
        ga = torch.autograd.grad(loss, a)[0].cpu()
        ref = z1.double().requires_grad_()
        want_ga = torch.autograd.grad(_ce_rows(ref, z2, 2.0, labels, False).mean(), ref)[0]
        torch.testing.assert_close(loss.cpu().double(), _ce_rows(z1, z2, 2.0, labels, False).mean(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ga.double(), want_ga, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.skipif(not hasattr(torch.ops.wmkernels_C, "contrastive_sweep_bwd"), reason="compiled CPU kernels not built")
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dim", [40, 200])  # the first tiles of D <= 64 take two exps, of D 129-256 one
def test_contrastive_backward_caps_probabilities_at_one(symmetric, dim):
    """On a GPU the backward's recomputed logits can exceed the forward's logsumexp by an ulp times
    the scale (fused multiply-add, other tile shapes): probabilities above 1 (54 at temperature
    1e-8). Each probability is capped at 1, as in the cpu kernel: fed a logsumexp 30 too small,
    both give the same gradients instead of exp(30)-sized ones."""
    from wmkernels.cpp import contrastive as cpu
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(20, dim, generator=g), torch.randn(20, dim, generator=g)
    scale, labels = torch.tensor(10.0), torch.arange(20)
    labels_c = labels if symmetric else labels[:0]  # the column entries are empty one-way
    fwd = cpu.contrastive_forward(z1, z2, scale, labels, labels_c, 1.0, 0.0, 0.0, True, symmetric)
    g_r = torch.full((20,), 0.05)
    args = (g_r, g_r[:len(labels_c)], z1, z2, scale, labels, labels_c, fwd[1] - 30.0, fwd[5] - 30.0, 1.0, 0.0, 0.0,
            True, symmetric)
    want = cpu.contrastive_backward(*args)
    dev = device_for("triton")
    got = tc.contrastive_backward(*(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args))
    for a, b in zip(got, want):
        assert a.isfinite().all()
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
