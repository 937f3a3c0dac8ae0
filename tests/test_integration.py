"""The losses inside real training code, against the plain PyTorch formulas they replace (float64
values and gradients): compiled steps, autocast, gradient accumulation, activation checkpointing,
channels_last_3d views, torch.func, serialization, eval loops, views and in-place outputs, hooks."""
import copy
import io
import math
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import wmkernels
from conftest import runnable_backends
from wmkernels import masking

BACKENDS = [b for b in ("cpu", "torch") if b in runnable_backends("cpu")]
F64 = torch.float64
TUB = (2, 4, 4)  # a (B, 3, 4, 8, 8) video has 2 x 2 x 2 = 8 tokens of P = 96 values
P = 96


@pytest.fixture(params=BACKENDS)
def be(request):
    return request.param


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------- plain PyTorch formulas (the references)


def ref_mse(x, y, weight=None, reduction="mean"):
    if weight is None:
        return F.mse_loss(x, y, reduction=reduction)
    sq = (x - y).square() * weight
    return sq.sum() / weight.expand_as(x).sum() if reduction == "mean" else sq.sum()


def ref_contrastive(z1, z2, scale=1 / 0.07):
    logits = scale * F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T
    labels = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def ref_masked(pred, video, index, layout="BCTHW", eps=1e-6):
    """MAE norm-pix loss: per-patch (x - mean) / sqrt(var + eps) targets, mean over the masked patches."""
    src = "b c (t pt) (h ph) (w pw)" if layout == "BCTHW" else "b (t pt) c (h ph) (w pw)"
    x = rearrange(video, f"{src} -> b (t h w) (pt ph pw c)", pt=TUB[0], ph=TUB[1], pw=TUB[2])
    if index.dtype == torch.int64:
        x = torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))
    x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + eps).sqrt()
    per_patch = (pred - x).square().mean(-1)
    if index.dtype == torch.bool:
        return (per_patch * index).sum() / index.sum()
    return per_patch.mean()


def _mask(batch=2, seed=0, ratio=0.75):
    return masking.random(batch, (2, 2, 2), ratio, generator=torch.Generator().manual_seed(seed))


def _video(batch=2, dtype=F64, seed=0):
    return torch.rand(batch, 3, 4, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _dense(b, dtype=F64):
    return torch.randn(b, 16, dtype=dtype), torch.randn(b, 16, dtype=dtype), None


def _masked_data(ids: bool):
    def data(b, dtype=F64):
        m = _mask(b, seed=b)
        index = m.ids_masked if ids else m.mask
        return torch.randn(b, index.shape[1], P, dtype=dtype), _video(b, dtype, seed=b), index
    return data


def _weight(p):
    """Per-feature weights in fp32 (fp64 for fp64 predictions), as a config would hold them."""
    return torch.linspace(0.5, 1, 16, dtype=torch.promote_types(p.dtype, torch.float32))


# name -> (data(b) -> (model input, target, index), wmkernels loss (pred, target, index, backend), reference
# (pred, target, index)); pred has the model input's shape; for the masked losses the target is the video
LOSSES = {
    "mse": (_dense, lambda p, t, i, be: wmkernels.mse_loss(p, t, backend=be), lambda p, t, i: ref_mse(p, t)),
    "mse_weighted": (_dense, lambda p, t, i, be: wmkernels.mse_loss(p, t, weight=_weight(p), backend=be),
                     lambda p, t, i: ref_mse(p, t, _weight(p))),
    "contrastive": (_dense, lambda p, t, i, be: wmkernels.contrastive_loss(p, t, backend=be),
                    lambda p, t, i: ref_contrastive(p, t)),
    "masked_bool": (_masked_data(False), lambda p, v, i, be: wmkernels.masked_mse_loss(p, v, i, TUB, backend=be),
                    ref_masked),
    "masked_ids": (_masked_data(True), lambda p, v, i, be: wmkernels.masked_mse_loss(p, v, i, TUB, backend=be),
                   ref_masked),
}


def _slow_unless(default, params):
    """The default cases run in the quick suite, the rest of the matrix with the slow tests."""
    return [p if p in default else pytest.param(p, marks=pytest.mark.slow) for p in params]


def _models(width, dtype=F64):
    """Two identical small models: one feeds wmkernels, the other the reference."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width)).to(dtype)
    b = copy.deepcopy(a)
    return a, b


def _assert_same_grads(m1, m2, **tol):
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, **tol)


# ------------------------------------------------------------------------------------ (1) torch.compile


@pytest.mark.parametrize("be", _slow_unless(BACKENDS[:1], BACKENDS))
@pytest.mark.parametrize("name", _slow_unless(("mse_weighted", "contrastive", "masked_ids"), LOSSES))
def test_compiled_step_dynamic_batch_matches_reference(name, be):
    """model + loss under torch.compile(fullgraph=True, dynamic=True): one graph for every batch size."""
    data, wk, ref = LOSSES[name]
    m1, m2 = _models(data(1)[0].shape[-1])
    step = torch.compile(lambda m, x, y, i: wk(m(x), y, i, be), fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (5, 7, 9):  # sizes no other dimension has: duck sizing would add guards of its own
        x, y, i = data(b)
        m1.zero_grad(), m2.zero_grad()
        l1, l2 = step(m1, x, y, i), ref(m2(x), y, i)
        (0.5 * l1).backward(), (0.5 * l2).backward()
        torch.testing.assert_close(l1, l2)
        _assert_same_grads(m1, m2)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("be", _slow_unless(BACKENDS[:1], BACKENDS))
@pytest.mark.parametrize("name", _slow_unless(("mse",), ["mse", "contrastive", "masked_bool"]))
def test_compiled_step_with_backward_inside(name, be):
    """The whole step, backward included, in one fullgraph region (Dynamo tracing Tensor.backward)."""
    data, wk, ref = LOSSES[name]
    x, y, i = data(2)
    m1, m2 = _models(x.shape[-1])

    def step(m, x, y, i):
        loss = wk(m(x), y, i, be)
        (loss / 4).backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        l1 = torch.compile(step, fullgraph=True, backend="aot_eager")(m1, x, y, i)
    l2 = ref(m2(x), y, i)
    (l2 / 4).backward()
    torch.testing.assert_close(l1, l2)
    _assert_same_grads(m1, m2)


def _graphs_over_sizes(fn, calls):
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for args in calls:
        torch.testing.assert_close(compiled(*args), fn(*args))
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("op", _slow_unless(("contrastive_labels",), ["contrastive_labels", "unshuffle", "gather"]))
def test_compile_dynamic_no_recompile_per_size(op):
    def masks(t):
        return masking.tube(2, (t, 2, 2), 0.5, generator=torch.Generator().manual_seed(t))

    if op == "contrastive_labels":
        fn = lambda a, b, lab: wmkernels.contrastive_loss(a, b, labels=lab)  # noqa: E731
        calls = [(torch.randn(n, 8), torch.randn(n, 8), torch.randperm(n)) for n in (4, 6, 9)]
    elif op == "unshuffle":
        # D = 6: a token width equal to N would duck-size them together (a specialization of the test's)
        fn = lambda v, r: wmkernels.unshuffle_with_mask_tokens(v, torch.zeros(6), r)  # noqa: E731
        calls = [(torch.randn(2, 2 * t, 6), masks(t).ids_restore) for t in (2, 3, 4)]
    else:
        fn = lambda v, i: wmkernels.gather_patches(v, i, TUB)  # noqa: E731
        calls = [(torch.rand(2, 3, 2 * t, 8, 8), masks(t).ids_keep) for t in (3, 4, 5)]
    assert _graphs_over_sizes(fn, calls) == 1


def test_masks_inside_compiled_step_with_changing_batch():
    @torch.compile(backend="aot_eager")
    def step(video, pred):
        m = masking.random(video.shape[0], masking.grid_size(video.shape, TUB), 0.5)
        return wmkernels.masked_mse_loss(pred, video, m.mask, TUB)

    for b in (2, 3):
        assert step(torch.rand(b, 3, 4, 8, 8), torch.randn(b, 8, P)).isfinite()


@pytest.mark.parametrize("op, be", [(op, b) for op in ("unshuffle", "contrastive_labels") for b in BACKENDS])
def test_compiled_value_checks_still_raise(op, be):
    """Under torch.compile the host checks become asserts in the graph: bad values still raise."""
    if op == "contrastive_labels":
        fn = lambda a, lab: wmkernels.contrastive_loss(a, a.flip(0), labels=lab, backend=be)  # noqa: E731
        args = (torch.randn(4, 8), torch.tensor([0, 1, 1, 2]))  # not a permutation
    else:
        fn = lambda a, r: wmkernels.unshuffle_with_mask_tokens(a, torch.zeros(8), r, backend=be)  # noqa: E731
        args = (torch.randn(2, 2, 8), torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]]))  # row 1 repeats 0
    with pytest.raises(ValueError):
        fn(*args)
    with pytest.raises((ValueError, RuntimeError)):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)


@pytest.mark.slow
def test_compiled_out_of_range_ids_raise_not_crash():
    code = ("import torch, wmkernels\n"
            "f = torch.compile(lambda p, i: wmkernels.masked_mse_loss(p, torch.rand(2, 3, 4, 8, 8), i, (2, 4, 4)),"
            " backend='aot_eager')\n"
            "try:\n"
            "    f(torch.randn(2, 2, 96), torch.tensor([[0, 8], [1, 100000]]))\n"
            "except (ValueError, RuntimeError) as e:\n"
            "    print('raised', type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "raised" in out.stdout, (out.returncode, out.stderr[-500:])


# -------------------------------------------------------------------------------- (2) autocast bf16


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_autocast_bf16_step(name, be, compiled):
    """Under autocast the loss comes out fp32 like F.mse_loss / F.cross_entropy; its value and
    gradients match the float64 formula applied to the same bf16 model outputs."""
    data, wk, ref = LOSSES[name]
    x, y, i = data(4, torch.float32)
    m = torch.nn.Linear(x.shape[-1], x.shape[-1])
    loss_fn = torch.compile(wk, fullgraph=True, backend="aot_eager") if compiled else wk
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        loss = loss_fn(out, y, i, be)
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, out)
    out64 = out.detach().double().requires_grad_()
    expected = ref(out64, y.double(), i)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), out64.grad, rtol=1.6e-2, atol=1e-2 * out64.grad.abs().max().item())


@pytest.mark.parametrize("name, be", [("mse", "cpu"), ("mse", "torch"), ("masked", "cpu"), ("masked", "torch")])
def test_fp16_autocast_with_grad_scaler(name, be):
    """The scaled backward of a well-fit model (small errors): F.mse_loss under autocast runs in fp32
    and rounds the scaled gradient once, 1e-4 from the float64 value."""
    g = torch.Generator().manual_seed(0)
    if name == "mse":
        target = torch.randn(1 << 16, generator=g) * 0.1
        loss_fn = lambda p: wmkernels.mse_loss(p, target, backend=be)  # noqa: E731
    else:
        video = torch.rand(2, 3, 8, 64, 64, generator=g)
        tub = (2, 16, 16)
        ids = masking.tube(2, masking.grid_size(video.shape, tub), 0.9, generator=g).ids_masked
        target = wmkernels.gather_patches(video, ids, tub)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        loss_fn = lambda p: wmkernels.masked_mse_loss(p, video, ids, tub, backend=be)  # noqa: E731
    pred = (target + 0.01 * torch.randn(target.shape, generator=g)).half().requires_grad_()
    scale = torch.amp.GradScaler("cpu").get_scale()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_fn(pred)
    (loss * scale).backward()
    exact = 2 * (pred.detach().double() - target.double()) / pred.numel() * scale
    assert ((pred.grad.double() - exact).norm() / exact.norm()).item() < 1e-3


# ---------------------------------------------------------- (3) gradient accumulation, retain_graph


@pytest.mark.parametrize("name", list(LOSSES))
def test_grad_accumulation_over_micro_batches(name, be):
    data, wk, ref = LOSSES[name]
    m1, m2 = _models(data(1)[0].shape[-1])
    n_micro = 3
    for b in (2, 3, 2):
        x, y, i = data(b)
        (wk(m1(x), y, i, be) / n_micro).backward()
        (ref(m2(x), y, i) / n_micro).backward()
    _assert_same_grads(m1, m2)


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("name", list(LOSSES))
def test_retain_graph_repeated_backward_into_leaf(name, be, scale):
    """A leaf fed straight to the loss: three backward passes over one graph accumulate 3x the
    gradient (the cpu backend hands out the gradient it computed in the forward at scale 1)."""
    data, wk, ref = LOSSES[name]
    x, y, i = data(2)
    x.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    loss, expected = wk(x, y, i, be) * scale, ref(x_ref, y, i) * scale
    for _ in range(3):
        loss.backward(retain_graph=True)
        expected.backward(retain_graph=True)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_two_losses_on_one_activation_with_retain_graph(be):
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    t1, t2 = torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    h = x * 1.0
    loss = wmkernels.mse_loss(h, t1, backend=be) + wmkernels.mse_loss(h, t2, backend=be)
    (expected,) = torch.autograd.grad(F.mse_loss(x, t1) + F.mse_loss(x, t2), x)
    for _ in range(2):
        x.grad = None
        loss.backward(retain_graph=True)
        torch.testing.assert_close(x.grad, expected)


# -------------------------------------------------------------------- (4) activation checkpointing


@pytest.mark.parametrize("determinism_check", ["default", "none"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_checkpointed_block_calling_the_loss(name, be, determinism_check):
    data, wk, ref = LOSSES[name]
    x, y, i = data(2)
    m1, m2 = _models(x.shape[-1])
    y.requires_grad_()  # the target (for the masked losses the video) gets its gradient too
    y_ref = y.detach().clone().requires_grad_()
    loss = checkpoint(lambda a, b: wk(torch.tanh(m1(a)), b, i, be), x, y, use_reentrant=False,
                      determinism_check=determinism_check)
    expected = ref(torch.tanh(m2(x)), y_ref, i)
    (0.5 * loss).backward(), (0.5 * expected).backward()
    torch.testing.assert_close(loss, expected)
    _assert_same_grads(m1, m2)
    torch.testing.assert_close(y.grad, y_ref.grad)


def test_checkpoint_inside_compiled_region(be):
    m1, m2 = _models(16)
    x, y = torch.randn(4, 16, dtype=F64), torch.randn(4, 16, dtype=F64)
    f = torch.compile(lambda a, b: checkpoint(lambda p, q: wmkernels.mse_loss(torch.tanh(m1(p)), q, backend=be), a, b,
                                              use_reentrant=False), fullgraph=True, backend="aot_eager")
    loss, expected = f(x, y), F.mse_loss(torch.tanh(m2(x)), y)
    loss.backward(), expected.backward()
    torch.testing.assert_close(loss, expected)
    _assert_same_grads(m1, m2)


# ----------------------------------------------------------------------------- (5) channels_last_3d


def test_channels_last_3d_model_output_views(be):
    """A conv video model's channels_last_3d output, permuted and sliced, fed to both losses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.GELU(),
                                torch.nn.Conv3d(4, 3, 3, padding=1)).to(F64)
    video = _video(2)
    mask = masking.tube(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    w = torch.linspace(0.5, 1, 3, dtype=F64).view(1, 3, 1, 1, 1)

    def losses(out, vid, ours):
        if ours:  # float64 Conv3d does not keep the format: convert, as a last layer would
            out, vid = (t.contiguous(memory_format=torch.channels_last_3d) for t in (out, vid))
            assert out.stride(1) == 1 and vid.stride(1) == 1
        mse = (lambda *a, **k: wmkernels.mse_loss(*a, backend=be, **k)) if ours else ref_mse
        masked = (lambda p, v, i, *a: wmkernels.masked_mse_loss(p, v, i, TUB, *a, backend=be)) if ours else ref_masked
        pred, tgt = out.permute(0, 2, 1, 3, 4), vid.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) views
        tokens = rearrange(out, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=2, ph=4, pw=4)
        return [
            mse(pred[:, :-1], tgt[:, 1:]),
            mse(pred[:, :-1], tgt[:, 1:], weight=w),
            mse(out[..., 1:7, ::2], vid[..., 1:7, ::2], reduction="sum"),
            masked(tokens, vid, mask.mask),
            masked(tokens.flip(1), out, mask.mask),  # the target video is the model output: gradients to both
            masked(tokens.gather(1, mask.ids_masked[..., None].expand(-1, -1, P)), pred, mask.ids_masked, "BTCHW"),
        ]

    out = model(video)
    for ours, expected in zip(losses(out, video, True), losses(out, video, False)):
        torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(torch.autograd.grad(ours, out, retain_graph=True)[0],
                                   torch.autograd.grad(expected, out, retain_graph=True)[0])


# ------------------------------------------------------------------------------------- (6) torch.func


@pytest.mark.parametrize("name", ["mse", "masked_bool", "contrastive"])  # contrastive: its sweep op once returned
def test_vmap_over_the_loss(name, be):  # a Tensor[], which torch's per-sample fallback cannot batch
    data, wk, ref = LOSSES[name]
    _, y, i = data(2)
    xs = torch.randn(3, *data(2)[0].shape, dtype=F64)
    with warnings.catch_warnings():  # no batching rule: torch's per-sample fallback, slow but right
        warnings.simplefilter("ignore")
        got = torch.func.vmap(lambda a: wk(a, y, i, be))(xs)
    torch.testing.assert_close(got, torch.stack([ref(a, y, i) for a in xs]))


@pytest.mark.parametrize("name", ["mse", "contrastive"])
def test_func_grad_works_or_says_why(name, be):
    data, wk, ref = LOSSES[name]
    x, y, i = data(4)
    try:
        got = torch.func.grad(lambda a: wk(a, y, i, be))(x)
    except (RuntimeError, NotImplementedError) as e:
        assert "wmkernels" in str(e)
    else:
        torch.testing.assert_close(got, torch.func.grad(lambda a: ref(a, y, i))(x))


@pytest.mark.parametrize("name", ["mse", "contrastive", "masked_bool"])
def test_jvp_is_right_or_raises(name, be):
    """Forward-mode AD: a clear wmkernels error, never a dropped tangent (once 0 or None on cpu)."""
    data, wk, ref = LOSSES[name]
    x, y, i = data(4)
    t = torch.randn_like(x)
    _, expected = torch.func.jvp(lambda a: ref(a, y, i), (x,), (t,))
    try:
        _, got = torch.func.jvp(lambda a: wk(a, y, i, be), (x,), (t,))
    except (RuntimeError, NotImplementedError) as e:
        assert "wmkernels" in str(e)
        return
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------ (7) serialization of modules


def test_contrastive_module_with_learnable_scale_round_trips():
    crit = wmkernels.nn.ContrastiveLoss(learnable_scale=True, max_scale=50.0).to(F64)
    with torch.no_grad():
        crit.logit_scale.fill_(2.5)
    z1, z2 = torch.randn(6, 8, dtype=F64), torch.randn(6, 8, dtype=F64)
    loss = crit(z1, z2)
    buf = io.BytesIO()
    torch.save(crit, buf)
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), copy.deepcopy(crit), pickle.loads(pickle.dumps(crit))]
    fresh = wmkernels.nn.ContrastiveLoss(learnable_scale=True, max_scale=50.0).to(F64)
    buf = io.BytesIO()
    torch.save(crit.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for c in copies + [fresh]:
        assert c.logit_scale is not crit.logit_scale and c.max_scale == 50.0
        torch.testing.assert_close(c(z1, z2), loss, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="logit_scale"):
        wmkernels.nn.ContrastiveLoss().load_state_dict(crit.state_dict())
    # the scale's gradient is the reference's at the parameter clamped (in place) at log(max_scale)
    (g,) = torch.autograd.grad(loss, crit.logit_scale)
    s = crit.logit_scale.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ref_contrastive(z1, z2, s.exp()), s)
    torch.testing.assert_close(g, g_ref)
    with torch.no_grad():
        crit.logit_scale.fill_(math.log(80.0))
    (g,) = torch.autograd.grad(crit(z1, z2), crit.logit_scale)
    assert crit.logit_scale.item() == math.log(50.0) and g != 0


def test_option_modules_deepcopy_and_pickle():
    for mod in (wmkernels.nn.MSELoss(reduction="sum"),
                wmkernels.nn.MaskedMSELoss(tubelet=TUB, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))):
        for clone in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
            assert vars(clone).keys() == vars(mod).keys()
            assert all(getattr(clone, k) == getattr(mod, k) for k in ("reduction", "tubelet", "mean", "std")
                       if hasattr(mod, k))


# ------------------------------------------------------------------------------- (8) evaluation loops


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_eval_loop(be, mode):
    m1, _ = _models(16)
    head = torch.nn.Linear(P, P).to(F64)
    x, y, tok = torch.randn(4, 16, dtype=F64), torch.randn(4, 16, dtype=F64), torch.randn(2, 8, P, dtype=F64)
    mask = _mask().mask
    with mode():
        got = [wmkernels.mse_loss(m1(x), y, backend=be), wmkernels.mse_loss(m1(x), y, reduction="none", backend=be),
               wmkernels.contrastive_loss(m1(x), m1(y), return_accuracy=True, backend=be).loss,
               wmkernels.masked_mse_loss(head(tok), _video(), mask, TUB, backend=be)]
        expected = [F.mse_loss(m1(x), y), F.mse_loss(m1(x), y, reduction="none"), ref_contrastive(m1(x), m1(y)),
                    ref_masked(head(tok), _video(), mask)]
    for a, b in zip(got, expected):
        assert not a.requires_grad
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["contrastive", "masked"])
def test_inference_tensor_as_non_differentiable_input(name, be):
    m, _ = _models(16 if name == "contrastive" else P)
    with torch.inference_mode():
        teacher, video = torch.randn(4, 16, dtype=F64), _video()
    x = torch.randn(4, 16, dtype=F64) if name == "contrastive" else torch.randn(2, 8, P, dtype=F64)
    m_ref = copy.deepcopy(m)
    if name == "contrastive":
        loss, expected = wmkernels.contrastive_loss(m(x), teacher, backend=be), ref_contrastive(m_ref(x), teacher)
    else:
        mask = _mask().mask
        loss, expected = wmkernels.masked_mse_loss(m(x), video, mask, TUB, backend=be), ref_masked(m_ref(x), video, mask)
    loss.backward(), expected.backward()
    torch.testing.assert_close(loss, expected)
    _assert_same_grads(m, m_ref)


# ------------------------------------------------- (9) in-place outputs, storage offsets, mixed requires_grad


def _check(fn, ref, *leaves):
    """Values and gradients of every leaf that requires grad; no input is written to."""
    mine = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    theirs = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    before = [t.detach().clone() for t in leaves]
    got, expected = fn(*mine), ref(*theirs)
    torch.testing.assert_close(got, expected)
    wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
    for i, g, g_ref in zip(wanted, torch.autograd.grad(got, [mine[i] for i in wanted]),
                           torch.autograd.grad(expected, [theirs[i] for i in wanted])):
        torch.testing.assert_close(g, g_ref)
    for b, t in zip(before, mine):
        assert torch.equal(b, t.detach())


def _r(*shape, grad=False):
    return torch.randn(*shape, dtype=F64).requires_grad_(grad)


def test_mse_on_views_in_place_outputs_and_mixed_requires_grad(be):
    mse = lambda *a, **k: wmkernels.mse_loss(*a, backend=be, **k)  # noqa: E731
    _check(lambda x, y: mse((x * 1).mul_(2).add_(1), y), lambda x, y: F.mse_loss((x * 1).mul_(2).add_(1), y),
           _r(4, 5, grad=True), _r(4, 5))
    _check(lambda x, y: mse(torch.relu_(x * 1), y), lambda x, y: F.mse_loss(torch.relu_(x * 1), y), _r(4, 5, grad=True),
           _r(4, 5))
    _check(lambda b: mse(b[1:, 2:7], b[:-1, 1:6]), lambda b: F.mse_loss(b[1:, 2:7], b[:-1, 1:6]),
           _r(3, 9, 4, grad=True))
    strided = lambda g, offset: g.as_strided((4, 5), (11, 2), offset)  # noqa: E731
    _check(lambda g: mse(strided(g, 7), strided(g, 8)), lambda g: F.mse_loss(strided(g, 7), strided(g, 8)),
           _r(100, grad=True))
    _check(lambda g: mse(g, g), lambda g: F.mse_loss(g, g), _r(10, grad=True))
    _check(lambda x, y: mse(x, y.expand(4, 5)), lambda x, y: F.mse_loss(x, y.expand(4, 5)), _r(4, 5, grad=True),
           _r(1, 5, grad=True))
    _check(mse, F.mse_loss, _r(4, 5), _r(4, 5, grad=True))
    _check(mse, lambda x, y: F.mse_loss(x.double(), y), torch.randn(4, 5, requires_grad=True), _r(4, 5, grad=True))
    _check(lambda x, y, w: mse(x, y, weight=w), ref_mse, _r(4, 5), _r(4, 5), torch.rand(4, 1, dtype=F64,
                                                                                            requires_grad=True))
    _check(lambda x, y, w: mse(x, y, weight=w, reduction="sum"), lambda x, y, w: ref_mse(x, y, w, "sum"),
           _r(4, 5, grad=True), _r(4, 5, grad=True), torch.rand(1, 5, dtype=F64, requires_grad=True))


def test_contrastive_on_views_in_place_outputs_and_mixed_requires_grad(be):
    cl = lambda *a, **k: wmkernels.contrastive_loss(*a, backend=be, **k)  # noqa: E731
    _check(cl, ref_contrastive, _r(5, 8, grad=True), _r(5, 8))
    _check(cl, ref_contrastive, _r(5, 8), _r(5, 8, grad=True))
    _check(lambda a: cl(a, a), lambda a: ref_contrastive(a, a), _r(5, 8, grad=True))
    _check(lambda g: cl(g[1:6, 2:], g[6:11, :-2]), lambda g: ref_contrastive(g[1:6, 2:], g[6:11, :-2]),
           _r(12, 10, grad=True))
    _check(lambda g: cl(g.t(), g.t().flip(0)), lambda g: ref_contrastive(g.t(), g.t().flip(0)), _r(8, 5, grad=True))
    _check(lambda a, b: cl((a * 1).tanh_(), b), lambda a, b: ref_contrastive((a * 1).tanh_(), b), _r(5, 8, grad=True),
           _r(5, 8))
    _check(lambda a, b, t: cl(a, b, temperature=t), lambda a, b, t: ref_contrastive(a, b, 1 / t), _r(5, 8, grad=True),
           _r(5, 8), torch.tensor(0.1, dtype=F64, requires_grad=True))


def test_masked_on_views_in_place_outputs_and_mixed_requires_grad(be):
    mm = _mask()
    vid = torch.rand(2, 3, 5, 9, 8, dtype=F64)
    ml = lambda p, v, i, *a: wmkernels.masked_mse_loss(p, v, i, TUB, *a, backend=be)  # noqa: E731
    _check(lambda p, v: ml(p, v[:, :, 1:, :8], mm.mask), lambda p, v: ref_masked(p, v[:, :, 1:, :8], mm.mask),
           _r(2, 8, P, grad=True), vid.clone().requires_grad_())
    _check(lambda p, v: ml(p, v[:, :, 1:, :8], mm.ids_masked),
           lambda p, v: ref_masked(p, v[:, :, 1:, :8], mm.ids_masked), _r(2, 6, P), vid.clone().requires_grad_())
    _check(lambda g: ml(g[1:3, 2:8, 3:99], vid[:, :, 1:, :8], mm.ids_masked),
           lambda g: ref_masked(g[1:3, 2:8, 3:99], vid[:, :, 1:, :8], mm.ids_masked), _r(4, 9, 100, grad=True))
    _check(lambda p: ml((p * 1).sigmoid_(), vid[:, :, 1:, :8], mm.mask),
           lambda p: ref_masked((p * 1).sigmoid_(), vid[:, :, 1:, :8], mm.mask), _r(2, 8, P, grad=True))
    ids = torch.cat([mm.ids_masked, mm.ids_masked], 1)[:, 3:9]  # a view with a storage offset
    _check(lambda p: ml(p, vid[:, :, 1:, :8], ids), lambda p: ref_masked(p, vid[:, :, 1:, :8], ids),
           _r(2, 6, P, grad=True))
    strided_mask = torch.stack([mm.mask, ~mm.mask], 2)[:, :, 0]
    _check(lambda p: ml(p, vid[:, :, 1:, :8], strided_mask), lambda p: ref_masked(p, vid[:, :, 1:, :8], mm.mask),
           _r(2, 8, P, grad=True))
    _check(lambda v: ml(wmkernels.patchify(v, TUB) * 0.5, v, mm.mask),
           lambda v: ref_masked(wmkernels.patchify(v, TUB) * 0.5, v, mm.mask), _video().requires_grad_())


# ------------------------------------------------------------------------------------------ (10) hooks


@pytest.mark.parametrize("name", ["mse", "contrastive", "masked_bool"])
def test_hooks_on_inputs_and_loss(name, be):
    data, wk, ref = LOSSES[name]
    x, y, i = data(4)
    loss_hooks = [None, lambda g: g * 3, lambda g: torch.ones_like(g)]
    input_hooks = [None, lambda g: g * 0.5, lambda g: g.clamp(-0.01, 0.01)]
    for loss_hook in loss_hooks:
        for input_hook in input_hooks:
            results = []
            for fn in (lambda a, b: wk(a, b, i, be), lambda a, b: ref(a, b, i)):
                leaf = x.clone().requires_grad_()
                seen = []
                h = leaf * 1.0
                h.register_hook(lambda g: seen.append(g.clone()))
                if input_hook:
                    h.register_hook(input_hook)
                loss = fn(h, y)
                if loss_hook:
                    loss.register_hook(loss_hook)
                loss.backward()
                results.append((loss, seen[0], leaf.grad))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b)


def test_module_backward_hooks(be):
    crit = wmkernels.nn.MSELoss(backend=be)
    seen = {}
    crit.register_full_backward_hook(lambda mod, gin, gout: seen.update(gin=gin[0], gout=gout[0]))
    crit.register_full_backward_pre_hook(lambda mod, gout: (gout[0] * 4,))
    x, y = torch.randn(4, 5, dtype=F64, requires_grad=True), torch.randn(4, 5, dtype=F64)
    crit(x, y).backward()
    expected = 4 * 2 * (x - y).detach() / x.numel()
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(seen["gin"], expected)
    assert seen["gout"].item() == 4


# ------------------------------------------------------------------ triton backend (interpreted on CPU)


@pytest.mark.skipif("triton" not in runnable_backends("cpu"), reason="triton needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("name", _slow_unless(("mse_weighted",), ["mse_weighted", "contrastive", "masked_ids"]))
def test_triton_checkpointed_accumulated_step(name):
    data, wk, ref = LOSSES[name]
    x, y, i = data(2)
    a, a_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):
        (checkpoint(lambda t: wk(t.tanh(), y, i, "triton"), a, use_reentrant=False) / 2).backward()
        (ref(a_ref.tanh(), y, i) / 2).backward()
    torch.testing.assert_close(a.grad, a_ref.grad)


@pytest.mark.skipif("cpu" not in runnable_backends("cpu"), reason="compiled CPU kernels not built")
def test_cpu_results_do_not_depend_on_the_thread_count():
    """README: reductions are bitwise the same whatever the thread count (a job resumed on another
    machine, or a DataLoader worker setting one thread, must not change the numbers)."""
    def run():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1_000_003, generator=g, requires_grad=True)
        y, w = torch.randn(1_000_003, generator=g), torch.rand(1_000_003, generator=g)
        out = [wmkernels.mse_loss(x, y, weight=w, backend="cpu")]
        out += torch.autograd.grad(out[-1], x)
        video = torch.rand(4, 3, 8, 32, 32, generator=g, requires_grad=True)
        m = masking.tube(4, (4, 8, 8), 0.75, generator=g)
        pred = torch.randn(4, m.num_masked, 96, generator=g, requires_grad=True)
        for mode in ("mae", "videomae"):
            out.append(wmkernels.masked_mse_loss(pred, video, m.ids_masked, TUB, norm_mode=mode, backend="cpu"))
            out += torch.autograd.grad(out[-1], [pred, video])
        tokens = wmkernels.gather_patches(video, m.ids_keep, TUB, backend="cpu")
        out += [tokens, *torch.autograd.grad(tokens.square().sum(), video)]
        z1, z2 = (torch.randn(2100, 40, generator=g, requires_grad=True) for _ in range(2))  # two tiles a side
        out.append(wmkernels.contrastive_loss(z1, z2, label_smoothing=0.1, backend="cpu"))
        return out + list(torch.autograd.grad(out[-1], [z1, z2]))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(7)  # odd and past the cores: BLAS split reductions at 3 threads, not 2
        seven = run()
    finally:
        torch.set_num_threads(before)
    assert [i for i, (a, b) in enumerate(zip(one, seven)) if not torch.equal(a, b)] == []
