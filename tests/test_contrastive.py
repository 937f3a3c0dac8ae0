"""contrastive_loss vs a float64 F.cross_entropy formula: values, dz1, dz2, logit-scale gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

import wmkernels
from conftest import DTYPES, FULL_BACKENDS, TRITON_AVAILABLE, assert_close, device_for, make_layout, runnable_backends
from wmkernels.cpp import contrastive as cpp_contrastive
from wmkernels.ops.contrastive import SUPPORTED

# the compiled and reference backends that implement the op (no CUDA C++ contrastive kernel)
BACKENDS = [b for b in FULL_BACKENDS if b in SUPPORTED]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Overrides conftest's: the full matrix on BACKENDS."""
    return request.param


def reference(z1, z2, scale, labels=None, eps=0.0, normalize=True, symmetric=True, reduction="mean"):
    """The loss in float64 from F.cross_entropy on the materialized logits (the issue's definition)."""
    a, b = z1.double(), z2.double()
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = scale * a @ b.T
    labels = torch.arange(len(z1)) if labels is None else labels
    loss = F.cross_entropy(logits, labels, label_smoothing=eps, reduction="none")
    if symmetric:
        inverse = torch.argsort(labels)
        loss = 0.5 * (loss + F.cross_entropy(logits.T, inverse, label_smoothing=eps, reduction="none"))
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def run_both(z1, z2, scale_value, backend, dtype, **kw):
    """(ours, reference) as (loss, dz1, dz2, dscale), with a random upstream gradient. Ours runs on
    the device of z1, z2 (and labels); the float64 reference on CPU."""
    x1 = z1.detach().to(dtype).requires_grad_()
    x2 = z2.detach().to(dtype).requires_grad_()
    s = torch.tensor(scale_value, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=z1.device,
                     requires_grad=True)
    loss = wmkernels.contrastive_loss(x1, x2, logit_scale=s, backend=backend, **kw)
    up = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    (loss * up.to(loss.device, loss.dtype)).sum().backward()
    r1 = x1.detach().cpu().double().requires_grad_()
    r2 = x2.detach().cpu().double().requires_grad_()
    rs = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
    ref_kw = {k: v for k, v in kw.items() if k != "label_smoothing"}
    if ref_kw.get("labels") is not None:
        ref_kw["labels"] = ref_kw["labels"].cpu()
    ref = reference(r1, r2, rs, **ref_kw, eps=kw.get("label_smoothing", 0.0))
    (ref * up).sum().backward()
    return (loss, x1.grad, x2.grad, s.grad), (ref, r1.grad, r2.grad, rs.grad)


def check(ours, ref, dtype, grad_scale=1.0):
    loss, g1, g2, gs = (t.cpu() for t in ours)  # the reference is on CPU
    rl, r1, r2, rs = ref
    assert loss.dtype == dtype
    assert_close(loss, rl, dtype, scale=4)
    assert_close(g1, r1, dtype, scale=grad_scale)
    assert_close(g2, r2, dtype, scale=grad_scale)
    # d scale sums B^2 terms: compare relative to the loss magnitude.
    assert_close(gs, rs, torch.float32 if dtype == torch.float64 else dtype, scale=10 * grad_scale)


CASES = [  # (B, D, symmetric, label_smoothing, custom labels, normalize)
    (1, 3, True, 0.0, False, True),
    (3, 64, False, 0.0, False, True),
    (3, 100, True, 0.1, True, True),
    (257, 64, True, 0.0, False, True),
    (257, 257, False, 0.2, True, True),
    (257, 3, True, 0.1, True, False),
    (1030, 100, True, 0.05, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-D{}-sym{}-eps{}-lab{}-norm{}".format(*c))
def test_matches_reference(backend, dtype, case, monkeypatch):
    B, D, symmetric, eps, custom, normalize = case
    if B > 300 and dtype not in (torch.float32, torch.float64):
        pytest.skip("large B covered in fp32/fp64")
    monkeypatch.setattr(cpp_contrastive, "TILE", 128)  # several tiles, last one partial
    g = torch.Generator().manual_seed(B * 1000 + D)
    z1 = torch.randn(B, D, generator=g)
    z2 = z1 + 0.5 * torch.randn(B, D, generator=g)
    labels = torch.randperm(B, generator=g) if custom else None
    if labels is not None:
        z2 = z2[torch.argsort(labels)]  # keep positives similar so the loss is not trivial
    dev = device_for(backend)  # generated on CPU, run on the backend's device
    z1, z2, labels = z1.to(dev), z2.to(dev), (labels.to(dev) if labels is not None else None)
    scale = 14.0 if normalize else 0.3
    ours, ref = run_both(z1, z2, scale, backend, dtype, labels=labels, label_smoothing=eps,
                         normalize=normalize, symmetric=symmetric)
    check(ours, ref, dtype, grad_scale=1.0 if B < 1000 else 4.0)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reductions(backend, reduction, symmetric):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(37, 20, generator=g), torch.randn(37, 20, generator=g)
    dev = device_for(backend)
    z1, z2 = z1.to(dev), z2.to(dev)
    ours, ref = run_both(z1, z2, 5.0, backend, torch.float64, reduction=reduction, symmetric=symmetric)
    check(ours, ref, torch.float64)


@pytest.mark.parametrize("layout", ["strided", "permuted", "expanded"])
def test_non_contiguous_inputs(backend, layout):
    g = torch.Generator().manual_seed(2)
    base1, base2 = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    dev = device_for(backend)
    base1, base2 = base1.to(dev), base2.to(dev)  # before the layout views: they stay strided there
    z1, z2 = make_layout(base1, layout), make_layout(base2, "strided")
    assert not z1.is_contiguous() or layout == "expanded"
    before = z1.clone()
    ours, ref = run_both(z1, z2, 10.0, backend, torch.float32, label_smoothing=0.1)
    check(ours, ref, torch.float32)
    assert torch.equal(z1, before)


def test_temperature_tensor_gets_gradient(backend):
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
    dev = device_for(backend)  # the reference runs on CPU
    t = torch.tensor(0.1, dtype=torch.float64, device=dev, requires_grad=True)
    loss = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), temperature=t, backend=backend)
    (gt,) = torch.autograd.grad(loss, t)
    t_ref = t.detach().cpu().clone().requires_grad_()
    (rt,) = torch.autograd.grad(reference(z1, z2, 1.0 / t_ref), t_ref)
    assert_close(gt.cpu(), rt, torch.float64)
    plain = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), temperature=0.1, backend=backend)
    assert_close(plain.cpu(), reference(z1, z2, 10.0), torch.float64)


@pytest.mark.parametrize("t_dtype", [torch.bfloat16, torch.float32])
def test_low_precision_temperature_divides_in_the_accumulation_dtype(backend, t_dtype):
    """The multiplier is 1 / T with T's value as given, taken in the embeddings' accumulation dtype (fp64
    here); 1 / T in a bf16 T's own dtype was 0.15% off, in fp32 3e-8 (above fp64 tolerance)."""
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
    dev = device_for(backend)
    t = torch.tensor(0.07, dtype=t_dtype, device=dev, requires_grad=True)
    loss = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), temperature=t, backend=backend)
    t_ref = t.detach().cpu().double().requires_grad_()
    want = reference(z1, z2, 1.0 / t_ref)
    assert_close(loss.cpu(), want, torch.float64)
    (gt,) = torch.autograd.grad(loss, t)
    (rt,) = torch.autograd.grad(want, t_ref)
    assert gt.dtype == t_dtype
    assert_close(gt.cpu().double(), rt.to(t_dtype).double(), t_dtype)


def test_logit_scale_wins_over_temperature(backend):
    z1, z2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    dev = device_for(backend)  # the reference runs on CPU
    loss = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), temperature=0.5, logit_scale=20.0, backend=backend)
    assert_close(loss.cpu(), reference(z1, z2, 20.0), torch.float64)


@pytest.mark.parametrize("symmetric", [True, False])
def test_accuracy(backend, symmetric, monkeypatch):
    monkeypatch.setattr(cpp_contrastive, "TILE", 16)
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(70, 12, generator=g, dtype=torch.float64)
    labels = torch.randperm(70, generator=g)
    z2 = (z1 + 1.2 * torch.randn(70, 12, generator=g, dtype=torch.float64))[torch.argsort(labels)]
    dev = device_for(backend)  # the reference runs on CPU
    res = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), labels=labels.to(dev), symmetric=symmetric,
                                     return_accuracy=True, backend=backend)
    assert isinstance(res, wmkernels.ContrastiveResult)
    logits = F.normalize(z1) @ F.normalize(z2).T
    acc12 = (logits.argmax(1) == labels).double().mean()
    acc21 = (logits.argmax(0) == torch.argsort(labels)).double().mean()
    assert 0.1 < acc12 < 0.95  # not trivially all right or all wrong
    assert res.accuracy_12.item() == pytest.approx(acc12.item())
    if symmetric:
        assert res.accuracy_21.item() == pytest.approx(acc21.item())
        assert res.accuracy.item() == pytest.approx(0.5 * (acc12 + acc21).item())
    else:
        assert math.isnan(res.accuracy_21.item()) and res.accuracy.item() == pytest.approx(acc12.item())
    assert_close(res.loss.cpu(), reference(z1, z2, 1 / 0.07, labels=labels, symmetric=symmetric), torch.float64)


def test_module_learnable_scale(backend):
    torch.manual_seed(5)
    dev = device_for(backend)  # the reference runs on CPU
    mod = wmkernels.nn.ContrastiveLoss(learnable_scale=True, backend=backend).double().to(dev)
    assert mod.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    z1, z2 = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    mod(z1.to(dev), z2.to(dev)).backward()
    s = mod.logit_scale.detach().cpu().clone().requires_grad_()
    reference(z1, z2, s.exp()).backward()
    assert_close(mod.logit_scale.grad.cpu(), s.grad, torch.float64)
    with torch.no_grad():
        mod.logit_scale.fill_(math.log(1000.0))  # an optimizer step past the bound
    mod.logit_scale.grad = None
    loss = mod(z1.to(dev), z2.to(dev))
    loss.backward()
    assert_close(loss.cpu(), reference(z1, z2, 100.0), torch.float64)
    # the parameter itself is clamped (OpenCLIP): its gradient is the one at 100, not a dead zero
    assert mod.logit_scale.item() == math.log(100.0)
    s = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    reference(z1, z2, s.exp()).backward()
    assert mod.logit_scale.grad.item() != 0.0
    assert_close(mod.logit_scale.grad.cpu(), s.grad, torch.float64)
    fixed = wmkernels.nn.ContrastiveLoss(temperature=0.2, backend=backend)
    assert fixed.logit_scale is None
    assert_close(fixed(z1.to(dev), z2.to(dev)).cpu(), reference(z1, z2, 5.0), torch.float64)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0, learnable_scale=True), dict(temperature=-1.0),
                                    dict(temperature=float("inf")), dict(max_scale=0.0), dict(temperature="0.1")])
def test_module_bad_options_name_the_argument(kwargs):
    with pytest.raises(ValueError, match=f"^{next(iter(kwargs))}: expected a positive finite number"):
        wmkernels.nn.ContrastiveLoss(**kwargs)


def test_opcheck(backend):
    dev = device_for(backend)
    z1, z2 = torch.randn(9, 5).to(dev).requires_grad_(), torch.randn(9, 5).to(dev).requires_grad_()
    scale = torch.tensor(3.0, device=dev, requires_grad=True)
    lab = torch.arange(9, device=dev)
    for symmetric in (True, False):
        args = (z1, z2, scale, lab, lab if symmetric else lab[:0], 0.9, 0.01, 0.01, True, symmetric, backend)
        torch.library.opcheck(torch.ops.wmkernels.contrastive_loss.default, args)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_fullgraph(backend, dynamic):
    """dynamic=True makes the float temperature symbolic: validation must not call math on it."""
    dev = device_for(backend)  # the reference runs on CPU
    fn = torch.compile(lambda a, b: wmkernels.contrastive_loss(a, b, backend=backend), fullgraph=True,
                       backend="aot_eager", dynamic=dynamic)
    for rows in (10, 7):
        z1, z2 = torch.randn(rows, 6).to(dev).requires_grad_(), torch.randn(rows, 6).to(dev).requires_grad_()
        loss = fn(z1, z2)
        loss.backward()
        assert_close(loss.cpu(), reference(z1.cpu(), z2.cpu(), 1 / 0.07), torch.float32)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(z2=torch.randn(5, 4)), ValueError, "z2: expected shape"),
        (dict(z1=torch.randn(6), z2=torch.randn(6)), ValueError, "z1: expected a 2-D"),
        (dict(z1=torch.randn(2, 3, 4), z2=torch.randn(2, 3, 4)), ValueError, "z1: expected a 2-D"),
        (dict(z1=torch.ones(6, 4, dtype=torch.long)), TypeError, "z1: expected a floating-point"),
        (dict(temperature=0.0), ValueError, "temperature: expected a positive"),
        (dict(temperature=-1.0), ValueError, "temperature: expected a positive"),
        (dict(temperature=torch.tensor(-0.1)), ValueError, "temperature: expected a positive"),
        (dict(logit_scale=torch.tensor([1.0, 2.0])), ValueError, "logit_scale: expected a scalar"),
        (dict(logit_scale=torch.tensor(math.inf)), ValueError, "logit_scale: expected a positive finite"),
        (dict(logit_scale=True), TypeError, "logit_scale: expected a number"),
        (dict(temperature=None), TypeError, "temperature: expected a number or a one-element tensor"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError, r"labels: expected values in \[0, 6\)"),
        (dict(labels=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, r"labels: expected values in \[0, 6\)"),
        (dict(labels=torch.tensor([0, 0, 2, 3, 4, 5])), ValueError, "labels: with symmetric=True"),
        (dict(labels=torch.arange(5)), ValueError, r"labels: expected shape \(6,\)"),
        (dict(labels=torch.arange(6.0)), TypeError, "labels: expected an integer"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing: expected a number in \[0, 1\)"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(distributed="gather"), ValueError, "distributed: 'gather' needs an initialized"),
        (dict(distributed="ring"), ValueError, "distributed: 'ring' needs an initialized"),
        (dict(distributed="allreduce"), ValueError, "distributed: expected one of"),
        (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = dict(z1=torch.randn(6, 4), z2=torch.randn(6, 4))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        wmkernels.contrastive_loss(**args)


def test_numpy_scalars_are_numbers(backend):
    """Options read from a config often arrive as NumPy scalars."""
    np = pytest.importorskip("numpy")
    dev = device_for(backend)
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    want = reference(z1, z2, 20.0, eps=0.1)
    for kw in (dict(temperature=np.float32(0.05)), dict(logit_scale=np.float64(20.0))):
        loss = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), label_smoothing=np.float64(0.1), backend=backend, **kw)
        assert_close(loss.cpu(), want, torch.float32)


def test_autocast_does_not_lower_the_loss_precision(backend):
    """Under autocast the backends' own matmuls once ran in bf16 in the forward only: the saved
    logsumexp then disagreed with the backward's fp32 logits (27% gradient error at scale 50)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 64, generator=g)
    z2 = z1 + 3 * torch.randn(64, 64, generator=g)
    grads = []
    for enabled in (False, True):
        x1, x2 = z1.to(dev).requires_grad_(), z2.to(dev).requires_grad_()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=enabled):
            loss = wmkernels.contrastive_loss(x1, x2, logit_scale=50.0, label_smoothing=0.1, backend=backend)
        loss.backward()
        grads.append((loss.detach().cpu(), x1.grad.cpu(), x2.grad.cpu()))
    for plain, autocast in zip(*grads):
        assert_close(autocast, plain, torch.float32)


def test_repeated_labels_allowed_one_direction(backend):
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 5, 5])
    dev = device_for(backend)  # the reference runs on CPU
    loss = wmkernels.contrastive_loss(z1.to(dev), z2.to(dev), labels=labels.to(dev), symmetric=False, backend=backend)
    assert_close(loss.cpu(), reference(z1, z2, 1 / 0.07, labels=labels, symmetric=False), torch.float64)


# --- distributed: gloo on CPU, 2 and 3 processes --------------------------------------------------

DIST_ROWS, DIST_IN, DIST_DIM = 8, 12, 16
DIST_CONFIGS = [  # (mode, symmetric, label_smoothing, custom labels, reduction)
    ("gather", True, 0.0, False, "mean"),
    ("gather", False, 0.1, True, "mean"),
    ("gather", True, 0.1, True, "mean"),
    ("ring", True, 0.0, False, "mean"),
    ("ring", True, 0.1, True, "mean"),
    ("ring", False, 0.0, True, "mean"),
]


class _Tower(torch.nn.Module):
    """A linear encoder for both views and a CLIP log-space logit scale."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(DIST_IN, DIST_DIM, dtype=torch.float64)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, x1, x2):
        return self.proj(x1), self.proj(x2 + 0.1), self.log_scale.exp()


def _dist_data(world):
    g = torch.Generator().manual_seed(world)
    n = world * DIST_ROWS
    x1 = torch.randn(n, DIST_IN, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(n, DIST_IN, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    return x1, x2[torch.argsort(perm)], perm


def _model():
    torch.manual_seed(0)
    return _Tower()


def _dist_worker(rank, world, port, backend, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))  # the loss's collectives on a group of their own
    x1, x2, perm = _dist_data(world)
    rows = slice(rank * DIST_ROWS, (rank + 1) * DIST_ROWS)
    results = []
    for mode, symmetric, eps, custom, reduction in DIST_CONFIGS:
        model = DDP(_model())
        z1, z2, scale = model(x1[rows], x2[rows])
        res = wmkernels.contrastive_loss(
            z1, z2, logit_scale=scale, symmetric=symmetric, label_smoothing=eps, labels=perm[rows] if custom else None,
            distributed=mode, reduction=reduction, group=group, return_accuracy=True, backend=backend,
        )
        res.loss.backward()
        loss = res.loss.detach().clone()
        dist.all_reduce(loss, group=group)
        acc = res.accuracy.detach().clone()
        dist.all_reduce(acc, group=group)
        m = model.module
        results.append({"loss": loss / world, "local_loss": res.loss.detach(), "acc": acc / world,
                        "grads": [p.grad.clone() for p in (m.proj.weight, m.proj.bias, m.log_scale)]})
    del model, m  # release DDP's reducer before the process group goes away
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unequal_batch_worker(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    z = torch.randn(4 - rank, 8)
    errors = []
    for mode in ("gather", "ring"):
        try:
            wmkernels.contrastive_loss(z, z + 1, distributed=mode, backend="torch")
        except ValueError as e:
            errors.append(str(e))
    torch.save(errors, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_distributed_unequal_batches_are_refused(tmp_path):
    """Ranks with different batch sizes once aborted the process inside gloo."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "errors")
    mp.spawn(_unequal_batch_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        errors = torch.load(f"{out}.{rank}")
        assert len(errors) == 2 and all("same (batch, dim) on every rank" in e and "(4, 8), (3, 8)" in e for e in errors)


def _gather_grad_worker(rank, world, port, out_path):
    import torch.distributed as dist

    from wmkernels.ops import contrastive_dist as cd

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    got = []
    for refuse in (False, True):  # the reduce-scatter, then a process group that has none
        if refuse:
            def refused(*args, **kwargs):
                raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

            cd._reduce_scatter_into = refused
        x = torch.arange(6.0, dtype=torch.float64).reshape(2, 3).add(10 * rank).requires_grad_()
        gathered = cd.gather_with_grad(x)
        weight = torch.arange(world * 6.0, dtype=torch.float64).reshape(world * 2, 3) * (rank + 1)
        grad_in = weight.clone()
        gathered.backward(grad_in)
        # the gradient autograd handed in is not written (the all-reduce fallback works on a copy)
        got.append((gathered.detach(), x.grad, torch.equal(grad_in, weight), set(cd._NO_REDUCE_SCATTER)))
    torch.save(got, f"{out_path}.{rank}")
    dist.destroy_process_group()


def _one_process_worker(rank, world, port, out_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 5, 3, 4], dtype=torch.int16)
    got = {}
    for mode in ("gather", "ring", None):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = wmkernels.contrastive_loss(a, b, labels=labels, distributed=mode, backend="torch")
        loss.backward()
        got[mode] = (loss.detach(), a.grad, b.grad)
    torch.save(got, out_path)
    dist.destroy_process_group()


def test_distributed_with_one_process_and_int16_labels(tmp_path):
    """torchrun --nproc_per_node 1: the ring's backward once sent to itself (gloo: pair not connected);
    int16 labels (a documented label dtype) once reached the all-gather, which has no such type."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "one.pt")
    mp.spawn(_one_process_worker, args=(1, _free_port(), out), nprocs=1, join=True)
    got = torch.load(out)
    for mode in ("gather", "ring"):
        for a, b in zip(got[mode], got[None]):
            assert_close(a, b, torch.float64)


def test_gather_with_grad_sums_each_ranks_slice(tmp_path):
    """Forward: every rank's rows in rank order; backward: this rank's rows of the gradients summed
    over ranks, by reduce-scatter and by the all-reduce fallback alike."""
    import torch.multiprocessing as mp

    world, out = 3, str(tmp_path / "gather")
    mp.spawn(_gather_grad_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    rows = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    want_fwd = torch.cat([rows + 10 * r for r in range(world)])
    total = torch.arange(world * 6.0, dtype=torch.float64).reshape(world * 2, 3) * sum(range(1, world + 1))
    for rank in range(world):
        for (fwd, grad, untouched, refused), fallback in zip(torch.load(f"{out}.{rank}"), (False, True)):
            assert torch.equal(fwd, want_fwd)
            assert torch.equal(grad, total[2 * rank : 2 * rank + 2])
            assert untouched
            assert refused == ({"gloo"} if fallback else set())


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_ddp_step_equals_single_process(world, tmp_path):
    import torch.multiprocessing as mp

    # the compiled CPU backend when it is built (gloo on CPU tensors: on a GPU machine too)
    backend = "cpu" if "cpu" in runnable_backends("cpu") else "torch"
    out = tmp_path / "results.pt"
    mp.spawn(_dist_worker, args=(world, _free_port(), backend, str(out)), nprocs=world, join=True)
    results = torch.load(out)
    x1, x2, perm = _dist_data(world)
    for (mode, symmetric, eps, custom, reduction), got in zip(DIST_CONFIGS, results):
        model = _model()
        z1, z2, scale = model(x1, x2)
        res = wmkernels.contrastive_loss(
            z1, z2, logit_scale=scale, symmetric=symmetric, label_smoothing=eps, labels=perm if custom else None,
            reduction=reduction, return_accuracy=True, backend="torch",
        )
        res.loss.backward()
        ref = reference(z1.detach(), z2.detach(), scale.detach(), labels=perm if custom else None, eps=eps,
                        symmetric=symmetric)
        assert_close(res.loss, ref, torch.float64)
        assert_close(got["loss"], res.loss, torch.float64)
        assert got["acc"].item() == pytest.approx(res.accuracy.item())
        want = [model.proj.weight.grad, model.proj.bias.grad, model.log_scale.grad]
        for g, w in zip(got["grads"], want):
            assert_close(g, w, torch.float64)


# --- Triton (interpreted on CPU): a covering subset on small shapes -------------------------------

TRITON_CASES = [  # (B, D, dtype, symmetric, label_smoothing, custom labels, normalize)
    (1, 3, torch.float32, True, 0.0, False, True),
    (67, 40, torch.float32, True, 0.1, True, True),
    (67, 40, torch.float32, False, 0.0, True, True),
    (33, 17, torch.float64, True, 0.1, False, True),
    (40, 24, torch.bfloat16, True, 0.0, False, True),
    (21, 9, torch.float16, False, 0.2, False, False),
    (33, 300, torch.bfloat16, True, 0.0, False, True),  # wide D: features streamed in chunks, masked D
    (20, 512, torch.float16, False, 0.1, True, True),  # wide D, even
    (130, 128, torch.bfloat16, True, 0.1, True, True),  # two row blocks, a partial column tile
    (300, 64, torch.bfloat16, True, 0.0, True, True),  # fused symmetric sweep: a program with two row blocks
    (37, 16, torch.bfloat16, True, 0.0, False, True),  # D below the 64-wide tables: BLOCK_K = padded D
    (37, 32, torch.float16, False, 0.0, False, True),
]


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "B{}-D{}-{}-sym{}-eps{}-lab{}-norm{}".format(
    c[0], c[1], str(c[2]).removeprefix("torch."), *c[3:]))
def test_triton_matches_reference(case):
    B, D, dtype, symmetric, eps, custom, normalize = case
    g = torch.Generator().manual_seed(B + D)
    z1 = torch.randn(B, D, generator=g)
    labels = torch.randperm(B, generator=g) if custom else None
    z2 = z1 + 0.5 * torch.randn(B, D, generator=g)
    if labels is not None:
        z2 = z2[torch.argsort(labels)]
    dev = device_for("triton")  # generated on CPU, run on the backend's device
    z1, z2, labels = z1.to(dev), z2.to(dev), (labels.to(dev) if labels is not None else None)
    ours, ref = run_both(z1, z2, 14.0 if normalize else 0.3, "triton", dtype, labels=labels, label_smoothing=eps,
                         normalize=normalize, symmetric=symmetric)
    check(ours, ref, dtype)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
def test_triton_accuracy_matches_cpu():
    g = torch.Generator().manual_seed(9)
    z1 = torch.randn(50, 20, generator=g, dtype=torch.float64)
    z2 = z1 + torch.randn(50, 20, generator=g, dtype=torch.float64)
    dev = device_for("triton")  # the torch backend runs on the same device: bit-equal accuracies
    z1, z2 = z1.to(dev), z2.to(dev)
    a = wmkernels.contrastive_loss(z1, z2, return_accuracy=True, backend="triton")
    b = wmkernels.contrastive_loss(z1, z2, return_accuracy=True, backend="torch")
    assert 0.2 < b.accuracy_12 < 0.99
    assert torch.equal(a.accuracy_12, b.accuracy_12) and torch.equal(a.accuracy_21, b.accuracy_21)
    assert_close(a.loss, b.loss, torch.float64)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
def test_triton_argmax_ties_take_the_first():
    """Equal logits in one column from rows in different programs of the fused symmetric sweep
    (16-row blocks, 2 programs under the interpreter): the first row wins, as in torch.max."""
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(70, 8, generator=g, dtype=torch.float64)
    z1[20] = z1[5]  # rows 5 (block 0, program 0) and 20 (block 1, program 1) score every column alike
    z1[66] = z1[40]  # blocks 2 and 4, both program 0
    z2 = z1 + 0.01 * torch.randn(70, 8, generator=g, dtype=torch.float64)
    z2[[5, 40]] = torch.randn(2, 8, generator=g, dtype=torch.float64)  # columns 5 and 40 miss either way
    dev = device_for("triton")
    z1, z2 = z1.to(dev), z2.to(dev)
    a = wmkernels.contrastive_loss(z1, z2, return_accuracy=True, backend="triton")
    b = wmkernels.contrastive_loss(z1, z2, return_accuracy=True, backend="torch")
    assert b.accuracy_21.item() == pytest.approx(66 / 70)  # and columns 20 and 66 lose their ties
    assert torch.equal(a.accuracy_12, b.accuracy_12) and torch.equal(a.accuracy_21, b.accuracy_21)


@pytest.mark.parametrize("backend", [b for b in (*BACKENDS, "triton") if b != "triton" or TRITON_AVAILABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_far_columns_at_clip_scale(backend, dtype):
    """logit_scale 100 (CLIP's clamp) with one z2 row opposite to every z1 row: its column's logits
    sit ~200 below the others'. The column logsumexp must stay finite and exact (the Triton sweep's
    one-exp column sums would underflow here; it switches to a second exp for such tiles)."""
    g = torch.Generator().manual_seed(11)
    base = torch.zeros(40, 24)
    base[:, 0] = 1.0
    z1 = base + 0.05 * torch.randn(40, 24, generator=g)
    z2 = base + 0.05 * torch.randn(40, 24, generator=g)
    z2[3] = -z2[3]
    dev = device_for(backend)
    ours, ref = run_both(z1.to(dev), z2.to(dev), 100.0, backend, dtype)
    assert torch.isfinite(ours[0]).all()
    # bf16 on Triton rounds the normalized rows to bf16 (as eager bf16 does); at scale 100 that
    # moves logits by up to ~0.4 against the fp64 reference
    check(ours, ref, dtype, grad_scale=2.0 if dtype == torch.bfloat16 and backend == "triton" else 1.0)


@pytest.mark.parametrize("backend", [b for b in (*BACKENDS, "triton") if b != "triton" or TRITON_AVAILABLE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e6, 1e10])
def test_huge_scales_keep_recomputed_logits_exact(backend, dtype, scale):
    """The backward recomputes each logit: it must round it as the forward did, or an ulp of
    difference times the scale puts a logit above its logsumexp (the cpu backend's fused
    multiply-add once gave 1e-2 relative gradient errors at 1e6 and NaN at 1e10)."""
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(37, 16, generator=g), torch.randn(37, 16, generator=g)
    grads = []
    for b, dt in ((backend, dtype), ("torch", torch.float64)):
        x1, x2 = z1.to(dt).requires_grad_(), z2.to(dt).requires_grad_()
        loss = wmkernels.contrastive_loss(x1.to(device_for(b)), x2.to(device_for(b)), logit_scale=scale, backend=b)
        grads.append(torch.autograd.grad(loss, (x1, x2)))
    for ours, ref in zip(*grads):
        err = (ours.double() - ref).abs().max() / ref.abs().max()
        assert err < (1e-5 if dtype == torch.float32 else 1e-12), err


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_symmetric_forward_matches_two_sweeps(dtype):
    """The fused symmetric sweep (persistent programs, column partials, one exp per logit) against
    the two one-direction sweeps the GPU times it against: lse and max to rounding (the column
    sweep forms b @ a.T tiles), argmax exactly. M != N, partial row and column tiles, several row
    blocks per program (under the interpreter)."""
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(3)
    dev = device_for("triton")
    z1, z2 = torch.randn(150, 40, generator=g).to(dev, dtype), torch.randn(97, 40, generator=g).to(dev, dtype)
    acc, _, _, ka, kb = tc._prepare(z1, z2, True)
    scale = torch.tensor(14.0, device=dev)
    split = tc._sym_lse(ka, kb, scale, acc, cand=tc._SPLIT)
    for cols in (1, 2):  # the columns in one range, and in two (each program writes row partials)
        fused = tc._sym_lse(ka, kb, scale, acc, cand=tc.candidates("sym", tc.block_d(40), ka.dtype)[-1], splits=cols)
        for i in (0, 1, 3, 4):  # logsumexp and max, per row and per column
            torch.testing.assert_close(fused[i], split[i], rtol=1e-5, atol=1e-5)
        for i in (2, 5):  # argmax
            assert torch.equal(fused[i], split[i])


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
@pytest.mark.parametrize("far", [False, True], ids=["near", "far-columns"])
def test_triton_one_exp_backward_matches_two_exps(far):
    """The backward's one-exp tiles (a GPU tuning candidate) against the default two-exp tiles, on
    ordinary logits and on logit_scale 100 with a column ~200 below the rest (the guarded case)."""
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(5)
    dev = device_for("triton")
    z1, z2 = torch.randn(150, 40, generator=g), torch.randn(150, 40, generator=g)
    if far:
        z1[:, 0] += 20.0
        z2[:, 0] += 20.0
        z2[7] = -z2[7]
    z1, z2 = z1.to(dev, torch.bfloat16), z2.to(dev, torch.bfloat16)
    acc, _, _, ka, kb = tc._prepare(z1, z2, True)
    scale = torch.tensor(100.0 if far else 14.0, device=dev)
    lse_r, _, _, lse_c, _, _ = tc._sym_lse(ka, kb, scale, acc)
    gr, gc = torch.rand(150, generator=g).to(dev), torch.rand(150, generator=g).to(dev)
    one_exp = [c for c in tc.candidates("grad", tc.block_d(40), ka.dtype) if c[5]][0]
    for x, y, lx, gx, ly, gy in ((ka, kb, lse_r, gr, lse_c, gc), (kb, ka, lse_c, gc, lse_r, gr)):
        want = tc._grad(x, y, scale, lx, gx, ly, gy, True, True, acc)
        got = tc._grad(x, y, scale, lx, gx, ly, gy, True, True, acc, cand=one_exp)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
@pytest.mark.parametrize("d", [40, 100])
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_output_chunks_match_whole_rows(d, splits):
    """The backward with each row block's output features in chunks (BLOCK_O < padded D, a GPU
    tuning candidate at D = 512) against whole rows: D = 40 and 100 (the last chunk partly or wholly
    past D), M != N with a partial last tile, with and without column splits; both terms."""
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(12)
    dev = device_for("triton")
    z1, z2 = torch.randn(70, d, generator=g).to(dev), torch.randn(45, d, generator=g).to(dev)
    acc, _, _, ka, kb = tc._prepare(z1, z2, True)
    scale = torch.tensor(14.0, device=dev)
    lse_r, _, _, lse_c, _, _ = tc._sym_lse(ka, kb, scale, acc, cand=tc._SPLIT)
    gr, gc = torch.rand(70, generator=g).to(dev), torch.rand(45, generator=g).to(dev)
    bd = tc.block_d(d)
    whole = tc._grad(ka, kb, scale, lse_r, gr, lse_c, gc, True, True, acc, cand=(32, 16, bd, 4, 2, False), splits=1)
    for bo in (bd // 2, bd // 4):
        got = tc._grad(ka, kb, scale, lse_r, gr, lse_c, gc, True, True, acc, cand=(32, 16, bo, 4, 2, False),
                       splits=splits)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6, msg=lambda m: f"BLOCK_O {bo}: {m}")
    assert whole.abs().max() > 0.01


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_column_splits_match_one_sweep(dtype):
    """Few rows against many columns (a rank's rows against the gathered batch): the forward and
    the backward split the columns across programs and merge partials; same results as one sweep
    (argmax exactly, the rest to rounding). 150 columns in 3 (fp32) or 2 (bf16) splits, the last partial."""
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(6)
    dev = device_for("triton")
    z1, z2 = torch.randn(20, 40, generator=g).to(dev, dtype), torch.randn(150, 40, generator=g).to(dev, dtype)
    z1[3] = z2[77].to(dtype)  # a clear argmax, away from the first tile
    acc, _, _, ka, kb = tc._prepare(z1, z2, True)
    scale = torch.tensor(14.0, device=dev)
    one, split = tc._lse(ka, kb, scale, acc, splits=1), tc._lse(ka, kb, scale, acc, splits=3)
    assert one[2][3].item() == 77
    torch.testing.assert_close(split[0], one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1], one[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(split[2], one[2])
    gr = torch.rand(20, generator=g).to(dev)
    for row_term, col_term in ((True, False), (True, True)):
        lse_c = torch.rand(150, generator=g).to(dev) + 3.0
        gc = torch.rand(150, generator=g).to(dev)
        args = (ka, kb, scale, one[0], gr, lse_c, gc, row_term, col_term, acc)
        torch.testing.assert_close(tc._grad(*args, splits=3), tc._grad(*args, splits=1), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "one-direction"])
@pytest.mark.parametrize("far", [None, "column", "row"])
def test_triton_one_sweep_backward_matches_two_sweeps(symmetric, far):
    """The one-sweep backward (a GPU tuning candidate: d b per column block in registers, d a by
    atomics) against the two gradient sweeps: M != N, a partial last row block and column block,
    D = 40 (masked features), each of its 64-wide tiles; and at logit_scale 100 with a column (or
    a row) ~200 below the rest: the one-exp guard, and the padded rows (columns) of the last
    block, whose zero features score 0, far above that column's (row's) logsumexp, must not turn
    into inf * 0 = NaN."""
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(8)
    dev = device_for("triton")
    z1, z2 = torch.randn(150, 40, generator=g), torch.randn(97, 40, generator=g)
    if far:  # every row near the first axis; one flipped: its logits ~ -97, exp(0 - lse) overflows
        z1[:, 0] += 40.0
        z2[:, 0] += 40.0
        if far == "column":
            z2[7] = -z2[7]
        else:
            z1[11] = -z1[11]
    z1, z2 = z1.to(dev, torch.bfloat16), z2.to(dev, torch.bfloat16)
    acc, _, _, ka, kb = tc._prepare(z1, z2, True)
    scale = torch.tensor(100.0 if far else 14.0, device=dev)
    lse_r, _, _, lse_c, _, _ = tc._sym_lse(ka, kb, scale, acc, cand=tc._SPLIT)
    gr, gc = torch.rand(150, generator=g).to(dev), torch.rand(97, generator=g).to(dev)
    if not symmetric:  # placeholders, as contrastive_backward passes them
        lse_c, gc = lse_r, gr
    want = tc._grads(ka, kb, scale, lse_r, gr, lse_c, gc, symmetric, acc, cand=tc._TWO_SWEEPS)
    cands = tc.candidates("fused", tc.block_d(40), ka.dtype)
    assert len(cands) == 2 and want[0].abs().max() > 0.01
    rtol = 1e-3 if dev == "cuda" else 1e-4  # the GPU rounds G to bf16 for its tensor cores
    for cand in cands:
        got = tc._grads(ka, kb, scale, lse_r, gr, lse_c, gc, symmetric, acc, cand=cand)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tuned tiles run on a GPU only")
@pytest.mark.parametrize("d", [100, 256, 512])
@pytest.mark.parametrize("kind", ["lse", "sym", "grad", "grads"])
def test_triton_every_gpu_candidate_matches_the_default(kind, d):
    """Every tile config a large GPU call may pick by timing, at the widths the tables hold (D = 100
    pads to 128 and masks), bf16, B = 2048 (what the probe compiles; the pick is timed at >= 8192
    rows, so no test reaches it by size): each against the default, as the interpreter subset
    checks them only at D = 40 (in fp32 there, bf16 here). lse / max to rounding, argmax exactly
    (ties aside), gradients to bf16 rounding."""
    from wmkernels.triton import contrastive as tc

    g = torch.Generator().manual_seed(11)
    z1, z2 = torch.randn(2048, d, generator=g), torch.randn(2048, d, generator=g)
    z1[5] = z2[1900]  # a clear argmax far from the first tiles
    z1, z2 = z1.to("cuda", torch.bfloat16), z2.to("cuda", torch.bfloat16)
    acc, _, _, ka, kb = tc._prepare(z1, z2, True)
    scale = torch.tensor(14.0, device="cuda")
    bd = tc.block_d(d)
    lse_r, _, _, lse_c, _, _ = tc._sym_lse(ka, kb, scale, acc, cand=tc._SPLIT)
    gr, gc = torch.rand(2048, generator=g).to("cuda"), torch.rand(2048, generator=g).to("cuda")
    cands, run = {
        "lse": (tc.candidates("lse", bd, ka.dtype), lambda c: tc._lse(ka, kb, scale, acc, cand=c)),
        "sym": (tc.candidates("sym", bd, ka.dtype) + [tc._SPLIT], lambda c: tc._sym_lse(ka, kb, scale, acc, cand=c)),
        "grad": (tc.candidates("grad", bd, ka.dtype),  # the tiles of the two-sweep backward
                 lambda c: tc._grad(ka, kb, scale, lse_r, gr, lse_c, gc, True, True, acc, cand=c)),
        "grads": (tc._grads_candidates(bd, ka.dtype),  # two sweeps, then the one-sweep tiles
                  lambda c: tc._grads(ka, kb, scale, lse_r, gr, lse_c, gc, True, acc, cand=c)),
    }[kind]
    want, checked = run(cands[0]), 0
    want = want if isinstance(want, tuple) else (want,)
    for cand in cands[1:]:
        got = run(cand)
        for i, (a, b) in enumerate(zip(got if isinstance(got, tuple) else (got,), want)):
            if a.dtype == torch.int64:  # argmax: row 5's is column 1900 and column 1900's is row 5
                assert (a == b).float().mean() > 0.99, (cand, i)
                assert a[5 if i == 2 else 1900].item() == (1900 if i == 2 else 5), (cand, i)
            elif kind in ("lse", "sym"):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{cand}, output {i}: {m}")
            else:  # G is rounded to bf16 for the tensor cores: a flipped rounding moves a product by
                # ~4e-4 of the largest entry (emulated on CPU); a lost column tile moves the norm by %
                torch.testing.assert_close(a, b, rtol=0, atol=2e-3 * b.abs().max().item(),
                                           msg=lambda m: f"{cand}, output {i}: {m}")
                assert (a - b).norm() < 1e-3 * b.norm(), (cand, i)
        checked += 1
    assert checked == len(cands) - 1 > 0


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
def test_triton_deterministic_mode_never_picks_atomics():
    """torch.use_deterministic_algorithms(True) leaves only the two-sweep backward (the one-sweep
    candidates add d a by atomics, in a varying order); half operands only otherwise."""
    from wmkernels.triton import contrastive as tc

    assert len(tc._grads_candidates(256, torch.bfloat16)) > 1
    assert tc._grads_candidates(256, torch.float32) == [tc._TWO_SWEEPS]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tc._grads_candidates(256, torch.bfloat16) == [tc._TWO_SWEEPS]
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
def test_triton_deterministic_mode_times_nothing(monkeypatch):
    """Under deterministic algorithms a large GPU call takes the default tiles: a pick by timing
    can differ between processes, and the rounding with it."""
    from wmkernels.triton import contrastive as tc

    def timed(*_):
        raise AssertionError("timed a candidate")

    monkeypatch.setattr(tc, "_pick", timed)
    monkeypatch.delenv("WMKERNELS_TUNE", raising=False)
    big, cuda = tc._TUNE_MIN_ROWS ** 2, torch.device("cuda")
    with pytest.raises(AssertionError, match="timed"):  # what the test stands on: large cuda calls are timed
        tc._tuned(("test-key",), ["a", "b"], lambda c: c, big, cuda)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tc._tuned(("test-key",), ["a", "b"], lambda c: c, big, cuda) == "a"
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton backend not runnable here")
def test_triton_picks_are_remembered_per_device(monkeypatch):
    """A tile shape timed on one GPU is reused for that GPU only: another model in the same process
    times its own."""
    from wmkernels.triton import contrastive as tc

    timed = []
    monkeypatch.setattr(tc, "_pick", lambda key, cands, run: timed.append(key[-1]) or cands[len(timed) - 1])
    monkeypatch.setattr(tc, "_picked", {})
    monkeypatch.delenv("WMKERNELS_TUNE", raising=False)
    big = tc._TUNE_MIN_ROWS ** 2
    for dev in ("cuda:0", "cuda:1", "cuda:0", "cuda:1"):
        got = tc._tuned(("test-key",), ["a", "b"], lambda c: c, big, torch.device(dev))
        assert got == ("a" if dev == "cuda:0" else "b")
    assert timed == [torch.device("cuda:0"), torch.device("cuda:1")]


def test_bad_labels_on_gpu_are_device_asserts(as_on_gpu):
    """For GPU labels the range and permutation checks are device-side asserts (no host sync)."""
    z = torch.randn(4, 3)
    wmkernels.contrastive_loss(z, z, labels=torch.tensor([1, 0, 3, 2]))
    with pytest.raises(RuntimeError, match=r"^labels: expected values in \[0, 4\)"):
        wmkernels.contrastive_loss(z, z, labels=torch.tensor([1, 0, 4, 2]), symmetric=False)
    with pytest.raises(RuntimeError, match="^labels: with symmetric=True labels must be a permutation"):
        wmkernels.contrastive_loss(z, z, labels=torch.tensor([1, 0, 1, 2]))
    wmkernels.contrastive_loss(z, z, labels=torch.tensor([1, 0, 1, 2]), symmetric=False)
    with pytest.raises(RuntimeError, match="^logit_scale: expected a positive finite value"):
        wmkernels.contrastive_loss(z, z, logit_scale=torch.tensor(-1.0))
