"""wmkernels.mse_loss against a float64 reference and F.mse_loss: every backend x dtype x
reduction x weight x layout x size, gradients, mixed dtypes, compile, autocast, bad input."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, FULL_BACKENDS, LAYOUTS, TOL, TRITON_AVAILABLE, assert_close, device_for, make_layout

import wmkernels

SHAPES = {"empty": (0, 3), "one": (1,), "odd": (3, 5, 7, 11), "video": (2, 3, 3, 6, 10)}
WEIGHTS = ["none", "per_frame", "full"]


def ref_mse(x, y, w, reduction):
    """The float64 formula every backend must reproduce (F.mse_loss with a broadcast weight)."""
    sq = (x.double() - y.double()) ** 2
    if w is not None:
        sq = sq * w.double()
    if reduction == "none":
        return sq
    if reduction == "sum":
        return sq.sum()
    denom = w.double().expand_as(sq).sum() if w is not None else sq.numel()
    return sq.sum() / denom


def make_weight(kind, shape, dtype):
    if kind == "none":
        return None
    if kind == "per_frame":
        wshape = (shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 else shape
        return torch.rand(wshape, dtype=dtype) + 0.5
    return (torch.rand(shape) > 0.3).to(dtype)  # a 0/1 mask


def make_inputs(shape, dtype, layout, wkind, seed=0, device="cpu"):
    """Generated on CPU (the same values on every machine), moved to `device`, then laid out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    y = torch.randn(shape, generator=g).to(dtype).to(device)
    if layout != "contiguous" and len(shape) > 0 and shape[0] > 0:
        x, y = make_layout(x, layout), make_layout(y, "strided" if layout == "expanded" else layout)
    w = make_weight(wkind, shape, dtype)
    return x, y, (w.to(device) if w is not None else None)


def check_case(backend, dtype, reduction, wkind, layout, shape):
    dev = device_for(backend)
    x, y, w = make_inputs(shape, dtype, layout, wkind, device=dev)
    # the float64 reference runs on CPU
    xr = x.detach().cpu().clone().requires_grad_(True)
    yr = y.detach().cpu().clone().requires_grad_(True)
    wr = w.detach().cpu().clone().requires_grad_(True) if w is not None else None
    x.requires_grad_(True), y.requires_grad_(True)
    if w is not None:
        w.requires_grad_(True)
    out = wmkernels.mse_loss(x, y, reduction=reduction, weight=w, backend=backend)
    expected = ref_mse(xr, yr, wr, reduction)
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert out.device == x.device
    numel = max(x.numel(), 1)
    assert_close(out.cpu(), expected, dtype, scale=numel if reduction == "sum" else 1)
    if x.numel() == 0:
        return
    grad = torch.randn(out.shape, dtype=dtype) if reduction == "none" else torch.tensor(1.7, dtype=dtype)
    params = [x, y] + ([w] if w is not None else [])
    got = torch.autograd.grad(out, params, grad.to(dev))
    want = torch.autograd.grad(expected, [xr, yr] + ([wr] if wr is not None else []), grad.double())
    for name, a, b in zip(("input", "target", "weight"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        # the weight gradient of a mean sums N terms: its absolute error grows with them
        assert_close(a.cpu(), b, dtype, scale=numel if name == "weight" else 1)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("wkind", WEIGHTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matrix(backend, dtype, reduction, wkind, layout, shape):
    check_case(backend, dtype, reduction, wkind, layout, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "permuted"])
@pytest.mark.parametrize("wkind", ["none", "per_frame"])
def test_large(backend, dtype, layout, wkind):
    check_case(backend, dtype, "mean", wkind, layout, (4, 3, 17, 103, 53))  # 1.1M elements, odd


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton not runnable here")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("wkind,layout", [("none", "contiguous"), ("per_frame", "strided"), ("full", "permuted"),
                                          ("none", "expanded")])
def test_triton(dtype, reduction, wkind, layout):
    check_case("triton", dtype, reduction, wkind, layout, SHAPES["video"])


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton not runnable here")
def test_triton_multi_program_and_six_dims():
    # more than one program per grid, and a layout that does not merge to five dims
    check_case("triton", torch.float32, "mean", "none", "contiguous", (3, 7001))
    dev = device_for("triton")
    x = torch.randn(2, 3, 2, 3, 2, 3).to(dev).permute(5, 3, 1, 0, 2, 4).requires_grad_(True)
    y = torch.randn(3, 3, 3, 2, 2, 2).to(dev)
    check = wmkernels.mse_loss(x, y, backend="triton")
    torch.testing.assert_close(check, F.mse_loss(x, y))
    (g,) = torch.autograd.grad(check, x)
    torch.testing.assert_close(g, 2 * (x - y).detach() / x.numel())


@pytest.mark.parametrize("backend_name", FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else []))
def test_broadcast_weight_splitting_six_dims(backend_name):
    """A weight whose size-1 dims alternate with its own splits six dims even when every operand is
    contiguous: the five-dim kernels materialize it (the layout once raised or dropped a dim)."""
    dev = device_for(backend_name)
    x = torch.randn(2, 3, 4, 5, 6, 7).to(dev).requires_grad_(True)
    y, w = torch.randn(2, 3, 4, 5, 6, 7).to(dev), torch.rand(2, 1, 4, 1, 6, 1).to(dev)
    for reduction in ("mean", "sum"):
        ours = wmkernels.mse_loss(x, y, reduction=reduction, weight=w, backend=backend_name)
        ref = ref_mse(x.double(), y.double(), w.double(), reduction)
        assert_close(ours, ref, torch.float32)
        assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], torch.float32)


@pytest.mark.parametrize("backend_name", FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else []))
def test_matches_torch_functional(backend_name):
    dev = device_for(backend_name)  # F.mse_loss runs on the same device
    x, y = torch.randn(4, 5, 6).to(dev).requires_grad_(True), torch.randn(4, 5, 6).to(dev)
    w = torch.rand(4, 5, 6).to(dev)
    for reduction in ("mean", "sum", "none"):
        ours = wmkernels.mse_loss(x, y, reduction=reduction, backend=backend_name)
        theirs = F.mse_loss(x, y, reduction=reduction)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0])
        ours_w = wmkernels.mse_loss(x, y, reduction=reduction, weight=w, backend=backend_name)
        torch.testing.assert_close(ours_w, F.mse_loss(x, y, reduction=reduction, weight=w))


@pytest.mark.parametrize("backend_name", FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else []))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_like_functional(backend_name, reduction):
    """numel 0: F.mse_loss's NaN mean and zero sum, and an empty gradient (the Triton backward
    once divided by the zero count on the host)."""
    dev = device_for(backend_name)
    x, y = torch.empty(0, 3, device=dev, requires_grad=True), torch.empty(0, 3, device=dev, requires_grad=True)
    ours = wmkernels.mse_loss(x, y, reduction=reduction, backend=backend_name)
    torch.testing.assert_close(ours, F.mse_loss(x, y, reduction=reduction), equal_nan=True)
    gx, gy = torch.autograd.grad(ours.sum(), (x, y))
    assert gx.shape == x.shape and gy.shape == y.shape


MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
         (torch.float32, torch.float64), (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("xd,yd", MIXED, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("grads", ["input", "target", "both"])
def test_mixed_dtypes(backend, xd, yd, grads):
    g = torch.Generator().manual_seed(1)
    dev = device_for(backend)  # F.mse_loss and the float64 formula run on the same device
    x = torch.randn(3, 4, 50, generator=g).to(xd).to(dev).requires_grad_(grads != "target")
    y = torch.randn(3, 4, 50, generator=g).to(yd).to(dev).requires_grad_(grads != "input")
    out = wmkernels.mse_loss(x, y, backend=backend)
    want = F.mse_loss(x, y)
    assert out.dtype == want.dtype == torch.promote_types(xd, yd)
    lowest = xd if torch.finfo(xd).eps > torch.finfo(yd).eps else yd
    assert_close(out, ref_mse(x, y, None, "mean"), lowest)
    params = [p for p in (x, y) if p.requires_grad]
    got = torch.autograd.grad(out, params)
    want_g = torch.autograd.grad(ref_mse(x, y, None, "mean"), params)
    for a, b, p in zip(got, want_g, params):
        assert a.dtype == p.dtype
        assert_close(a, b, p.dtype)


@pytest.mark.parametrize("backend_name", FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else []))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_weight_accumulates_in_float64(backend_name, reduction):
    """fp32 input and target with an fp64 weight: the loss is fp64 by type promotion, and was once only
    fp32-accurate (the weight rounded to the inputs' fp32 accumulation)."""
    dev = device_for(backend_name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 40, generator=g).to(dev).requires_grad_(True)
    y = torch.randn(4, 3, 40, generator=g).to(dev)
    w = (torch.rand(4, 1, 40, generator=g, dtype=torch.float64) + 0.1).to(dev).requires_grad_(True)
    out = wmkernels.mse_loss(x, y, reduction=reduction, weight=w, backend=backend_name)
    want = ref_mse(x, y, w, reduction)
    assert out.dtype == torch.float64
    assert_close(out, want, torch.float64)
    got_x, got_w = torch.autograd.grad(out, (x, w))
    want_x, want_w = torch.autograd.grad(want, (x, w))
    assert_close(got_x, want_x, torch.float32)
    assert_close(got_w, want_w, torch.float64, scale=x.numel())


@pytest.mark.parametrize("backend_name", FULL_BACKENDS + (["triton"] if TRITON_AVAILABLE else []))
def test_gradcheck_float64(backend_name):
    dev = device_for(backend_name)
    x = torch.randn(3, 4, 5, dtype=torch.float64).to(dev).requires_grad_(True)
    y = torch.randn(3, 4, 5, dtype=torch.float64).to(dev).requires_grad_(True)
    w = torch.rand(3, 1, 5, dtype=torch.float64).to(dev).requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        fn = lambda a, b, c: wmkernels.mse_loss(a, b, reduction=reduction, weight=c, backend=backend_name)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, y, w))
        fn = lambda a, b: wmkernels.mse_loss(a, b, reduction=reduction, backend=backend_name)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, y))


def test_next_frame_views_are_not_copied(backend):
    dev = device_for(backend)
    video = torch.randn(2, 6, 3, 16, 16).to(dev)
    pred = torch.randn(2, 6, 3, 16, 16).to(dev).requires_grad_(True)
    with torch.profiler.profile() as prof:
        loss = wmkernels.mse_loss(pred[:, :-1], video[:, 1:], backend=backend)
    copies = [e.key for e in prof.key_averages() if e.key in ("aten::copy_", "aten::clone", "aten::contiguous")]
    if backend != "torch":  # the reference is allowed its temporaries
        assert not copies, copies
    torch.testing.assert_close(loss, F.mse_loss(pred[:, :-1], video[:, 1:]))


def test_deterministic(backend):
    dev = device_for(backend)
    x, y = torch.randn(3, 1000, 700).to(dev), torch.randn(3, 1000, 700).to(dev)
    w = torch.rand(3, 1, 700).to(dev)
    first = wmkernels.mse_loss(x, y, weight=w, backend=backend)
    for _ in range(3):
        assert torch.equal(wmkernels.mse_loss(x, y, weight=w, backend=backend), first)


def test_does_not_write_caller_tensors(backend):
    dev = device_for(backend)
    x, y = torch.randn(10, 10).to(dev).requires_grad_(True), torch.randn(10, 10).to(dev).requires_grad_(True)
    w = torch.rand(10, 1).to(dev)
    before = [t.detach().clone() for t in (x, y, w)]
    wmkernels.mse_loss(x, y, weight=w, backend=backend).backward()
    for t, b in zip((x, y, w), before):
        assert torch.equal(t.detach(), b)


def test_no_grad_and_detached(backend):
    dev = device_for(backend)
    x = torch.randn(5, 7).to(dev).requires_grad_(True)
    y = torch.randn(5, 7).to(dev)
    with torch.no_grad():
        out = wmkernels.mse_loss(x, y, backend=backend)
    assert not out.requires_grad
    out = wmkernels.mse_loss(x.detach(), y, backend=backend)
    assert not out.requires_grad


def test_grad_output_not_one(backend):
    dev = device_for(backend)
    x = torch.randn(5, 7).to(dev).requires_grad_(True)
    y = torch.randn(5, 7).to(dev)
    (3.0 * wmkernels.mse_loss(x, y, backend=backend)).backward()
    torch.testing.assert_close(x.grad, 3.0 * 2 * (x - y).detach() / x.numel())


def test_compile_fullgraph(backend):
    dev = device_for(backend)
    x = torch.randn(8, 33).to(dev).requires_grad_(True)
    y = torch.randn(8, 33).to(dev)
    w = torch.rand(8, 1).to(dev)

    @torch.compile(fullgraph=True)
    def step(a, b, c):
        return wmkernels.mse_loss(a * 2, b, weight=c, backend=backend)

    out = step(x, y, w)
    out.backward()
    want = F.mse_loss(2 * x, y, weight=w.expand(8, 33))
    torch.testing.assert_close(out, want)
    (g,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(x.grad, g)


def test_autocast_behaves_like_functional(backend):
    dev = device_for(backend)
    lin = torch.nn.Linear(16, 16).to(dev)
    x = torch.randn(4, 16).to(dev)
    video = torch.randn(4, 16).to(dev)
    with torch.autocast(dev, dtype=torch.bfloat16):
        pred = lin(x)
        assert pred.dtype == torch.bfloat16
        ours = wmkernels.mse_loss(pred, video, backend=backend)
        theirs = F.mse_loss(pred, video)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours, lin.weight, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs, lin.weight)
    torch.testing.assert_close(g_ours, g_theirs)


def test_module_form(backend):
    crit = wmkernels.nn.MSELoss(reduction="sum", backend=backend)
    dev = device_for(backend)
    x, y = torch.randn(3, 4).to(dev), torch.randn(3, 4).to(dev)
    torch.testing.assert_close(crit(x, y), torch.nn.MSELoss(reduction="sum")(x, y))


def _ddp_step(backend):
    dev = device_for(backend)  # gloo runs broadcast and all_reduce (all DDP needs) on CUDA tensors too
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8).to(dev))
    x, y = torch.randn(4, 8).to(dev), torch.randn(4, 8).to(dev)
    wmkernels.mse_loss(model(x), y, backend=backend).backward()
    ref = torch.nn.Linear(8, 8).to(dev)
    ref.load_state_dict(model.module.state_dict())
    F.mse_loss(ref(x), y).backward()
    torch.testing.assert_close(model.module.weight.grad, ref.weight.grad)


def test_inside_ddp(backend, tmp_path):
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _ddp_step(backend)
    finally:
        gc.collect()  # the DDP reducer holds the process group: release it before destroying the group
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", FULL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_more_than_2_pow_31_elements(backend_name, dtype):
    if backend_name == "torch" and dtype != torch.float32:
        pytest.skip("the reference materializes its float32 temporaries: once is enough (8.6 GB)")
    rows = 715_827_883  # rows * 3 = 2**31 + 1 elements
    dev = device_for(backend_name)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=dtype).to(dev).expand(rows, 3)
    y = torch.zeros(1, 1, dtype=dtype).to(dev).expand(rows, 3)
    mean = wmkernels.mse_loss(x, y, backend=backend_name)
    torch.testing.assert_close(mean.double().cpu(), torch.tensor(14.0 / 3.0, dtype=torch.float64), **TOL[dtype])
    if backend_name != "torch":
        total = wmkernels.mse_loss(x, y, reduction="sum", backend=backend_name)
        assert total.double().item() == pytest.approx(14.0 * rows, rel=TOL[dtype]["rtol"])
        w = torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype).to(dev)
        masked = wmkernels.mse_loss(x, y, weight=w, backend=backend_name)
        assert masked.double().item() == pytest.approx(4.0, rel=TOL[dtype]["rtol"])


BAD = [
    (lambda: wmkernels.mse_loss(torch.randn(3), torch.randn(4)), ValueError, "target: expected shape"),
    (lambda: wmkernels.mse_loss(torch.randn(3), torch.randn(3), reduction="avg"), ValueError, "reduction"),
    (lambda: wmkernels.mse_loss(torch.arange(3), torch.randn(3)), TypeError, "input: expected a floating"),
    (lambda: wmkernels.mse_loss(torch.randn(3), torch.ones(3, dtype=torch.bool)), TypeError, "target"),
    (lambda: wmkernels.mse_loss([1.0], torch.randn(1)), TypeError, "input: expected a torch.Tensor"),
    (lambda: wmkernels.mse_loss(torch.randn(2, 3), torch.randn(2, 3), weight=torch.rand(3, 3)), ValueError,
     "weight: shape"),
    (lambda: wmkernels.mse_loss(torch.randn(2, 3), torch.randn(2, 3), weight=torch.ones(2, 3, dtype=torch.int64)),
     TypeError, "weight"),
    (lambda: wmkernels.mse_loss(torch.randn(3), torch.randn(3), backend="tpu"), ValueError, "backend"),
    (lambda: wmkernels.mse_loss(torch.randn(3), torch.randn(3, device="meta")), ValueError, "target: expected device"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_unavailable_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run"):
        wmkernels.mse_loss(torch.randn(3), torch.randn(3), backend="cuda")
    monkeypatch.setenv("WMKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend: 'cuda'"):
        wmkernels.mse_loss(torch.randn(3), torch.randn(3))


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("WMKERNELS_BACKEND", "torch")
    x, y = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4)
    with torch.profiler.profile() as prof:
        wmkernels.mse_loss(x, y)
    assert not any("wmkernels_C" in e.key for e in prof.key_averages())


def test_available_backends_says_why():
    status = wmkernels.available_backends()
    assert set(status) == {"triton", "cuda", "cpu", "torch"}
    assert status["torch"].available
    for st in status.values():
        assert st.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason


def test_missing_extension_falls_back_with_a_warning():
    """Without the compiled extension, `import wmkernels` works, warns once, and uses the reference."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc, warnings\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'wmkernels._C':\n"
        "            raise ImportError('removed for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, wmkernels\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    a = wmkernels.mse_loss(torch.ones(3), torch.zeros(3))\n"
        "    b = wmkernels.mse_loss(torch.ones(3), torch.zeros(3))\n"
        "assert a.item() == b.item() == 1.0\n"
        "assert not wmkernels.available_backends()['cpu'].available\n"
        "print(sum(\"using 'torch'\" in str(x.message) for x in w))\n"
    )
    env = {**os.environ, "WMKERNELS_NO_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
