"""Benchmark harness: a `Case` says what to run; `run_case` checks every contender against the
reference, then times them in interleaved rounds and measures their peak extra memory.

Honesty rules, enforced here for every op: one `setup()` per case shared by all contenders; each
contender's output is compared with the reference contender's before anything is timed (a mismatch
is reported as FAILED and not timed); warm-up before timing; the device is synchronized before
every clock read; contenders run round-robin, the order rotated each round, and the median of the
rounds is reported with its spread (interquartile range and min/max).

Peak memory is "peak extra bytes" of one forward+backward, outputs included:
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes
  allocated before the call;
- CPU: peak resident set growth. In a process of its own (see `wmkernels.bench.__main__`), the
  contender runs once to load whatever it loads, then the kernel's high-water mark is reset
  (`/proc/self/clear_refs` <- 5), the resident size noted, the contender run again, and
  `VmHWM - VmRSS(before)` read from /proc/self/status. That process pins glibc's
  `MALLOC_MMAP_THRESHOLD_` at 64 KiB, so every buffer is mapped when allocated and unmapped when
  freed and RSS follows live memory.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import resource
import statistics
import time
from typing import Callable

import torch

COMPILE_PREFIX = "compile"
TIMED = ("ok", "unchecked")  # statuses that are timed; "unchecked": the reference itself failed


@dataclasses.dataclass
class Case:
    """One benchmark point of one op.

    `setup()` builds the inputs once; every contender takes them, runs forward+backward and returns
    a tensor or a tuple of tensors (loss, gradients) compared with the `reference` contender's
    within `rtol`/`atol`. Contenders are named "eager", "compile" (torch.compile of the eager
    formula; dropped in quick mode) and "wmkernels-<backend>". `bytes_moved` / `flops` are the
    minimal traffic / arithmetic of the operation, for GB/s and FLOP/s against the roofline.

    Optional additions: `floor` is timed in the same rounds but never checked (e.g. the time to
    read the inputs once and write the gradient once) and each contender is reported as a fraction
    of it; `sweep` names a series of cases plotted time vs `size`; `dtype` ("float32", ...) is what
    `--dtype` filters on (else `params["dtype"]`).
    """

    op: str
    name: str
    size: int
    setup: Callable[[], dict]
    contenders: dict[str, Callable[[dict], object]]
    reference: str = "eager"
    bytes_moved: int | None = None
    flops: int | None = None
    rtol: float = 1e-3
    atol: float = 1e-3
    params: dict = dataclasses.field(default_factory=dict)
    floor: Callable[[dict], object] | None = None
    sweep: str | None = None
    dtype: str | None = None


_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16", "fp64": "float64", "double": "float64"}


def normalize_dtype(d) -> str | None:
    """"torch.bfloat16", "bf16", torch.bfloat16 -> "bfloat16"; None stays None."""
    if d is None:
        return None
    s = str(d).removeprefix("torch.").lower()
    return _DTYPE_ALIASES.get(s, s)


def case_dtype(case: Case) -> str | None:
    return normalize_dtype(case.dtype if case.dtype is not None else case.params.get("dtype"))


def active_contenders(case: Case, quick: bool) -> dict[str, Callable[[dict], object]]:
    """The contenders run in this mode: quick mode drops the torch.compile ones."""
    return {n: f for n, f in case.contenders.items() if not (quick and n.startswith(COMPILE_PREFIX))}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _flatten(out) -> list:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return [out]


def compare(out, ref, rtol: float, atol: float) -> tuple[bool, str, float]:
    """(equal, why not, max abs error) of a contender's outputs vs the reference's: elementwise
    within `rtol`/`atol`, and as a whole within `rtol` of the reference's norm, so that an `atol`
    above an output's scale (gradients of O(1/B)) cannot pass zeros or half the right values."""
    a, b = _flatten(out), _flatten(ref)
    if len(a) != len(b):
        return False, f"returned {len(a)} values, reference returned {len(b)}", math.inf
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if tuple(x.shape) != tuple(y.shape):
            return False, f"output {i}: shape {tuple(x.shape)}, reference {tuple(y.shape)}", math.inf
        if x.numel() == 0:
            continue
        xd, yd = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        err = (xd - yd).abs()
        err = torch.where(torch.isnan(xd) & torch.isnan(yd), torch.zeros_like(err), err)
        worst = max(worst, float(err.nan_to_num(nan=math.inf).max()))
        if not torch.allclose(xd, yd, rtol=rtol, atol=atol, equal_nan=True):
            bad = int((~torch.isclose(xd, yd, rtol=rtol, atol=atol, equal_nan=True)).sum())
            return False, (f"output {i}: {bad} of {x.numel()} elements differ beyond rtol={rtol:g} "
                           f"atol={atol:g} (max abs err {worst:.3g})"), worst
        finite = torch.isfinite(xd) & torch.isfinite(yd)  # non-finite values matched above
        ref_norm = float(yd[finite].norm())
        rel = float((xd - yd)[finite].norm()) / ref_norm if ref_norm > 0 else 0.0
        if rel > rtol:
            return False, (f"output {i}: relative error {rel:.3g} of the whole output (2-norm) exceeds "
                           f"rtol={rtol:g}"), worst
    return True, "", worst


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_block(fn, inputs, reps: int, device: str) -> tuple[float, int]:
    """Seconds per call over `reps` calls, and the minor page faults they caused."""
    sync(device)
    f0 = _faults()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(inputs)
    sync(device)
    t = (time.perf_counter() - t0) / reps
    return t, _faults() - f0


def interleaved_timing(fns: dict[str, Callable], inputs: dict, device: str, *, rounds: int, warmup: int,
                       min_sample_s: float, max_seconds: float, min_rounds: int = 3) -> dict[str, dict]:
    """Times every function in round-robin rounds (order rotated each round). Each sample is
    `reps` back-to-back calls, `reps` chosen per function so a sample lasts about `min_sample_s`.
    Stops after `rounds` rounds, or after `min_rounds` once `max_seconds` have passed. A function
    that raises (out of memory on its tenth call) leaves the rounds with {"error": ...} as its
    result, and the others keep theirs."""
    names = list(fns)
    reps, errors = {}, {}
    for name in names:
        try:
            for _ in range(max(warmup - 1, 0)):
                fns[name](inputs)
            t, _ = _time_block(fns[name], inputs, 1, device)  # the last warm-up call sizes the samples
        except Exception as exc:
            errors[name] = f"while timing: {type(exc).__name__}: {exc}"
            continue
        reps[name] = max(1, min(1000, math.ceil(min_sample_s / max(t, 1e-9))))
    names = [n for n in names if n not in errors]
    samples: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, int] = {n: 0 for n in names}
    calls: dict[str, int] = {n: 0 for n in names}
    gc.collect()
    start = time.perf_counter()
    for r in range(rounds):
        if not names:
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            try:
                t, f = _time_block(fns[name], inputs, reps[name], device)
            except Exception as exc:
                errors[name] = f"while timing: {type(exc).__name__}: {exc}"
                continue
            samples[name].append(t)
            faults[name] += f
            calls[name] += reps[name]
        names = [n for n in names if n not in errors]
        if r + 1 >= min_rounds and time.perf_counter() - start > max_seconds:
            break
    out = {n: summarize(samples[n], reps[n], faults[n] / max(calls[n], 1)) for n in names}
    return {**out, **{n: {"error": e} for n, e in errors.items()}}


def summarize(samples: list[float], reps: int, faults_per_call: float) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {
        "median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "min_s": s[0], "max_s": s[-1],
        "rounds": len(s), "reps": reps, "samples_s": samples, "faults_per_call": faults_per_call,
    }


def cuda_peak_extra_bytes(fn: Callable, inputs: dict) -> int:
    """Peak bytes allocated by one call above what was allocated before it (outputs included)."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn: Callable, inputs: dict) -> tuple[int, str]:
    """Peak RSS growth of one call after a warm-up call (see the module docstring), and the method.
    Meant for a process of its own started with MALLOC_MMAP_THRESHOLD_=65536."""
    out = fn(inputs)
    del out
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM-VmRSS (clear_refs reset)"
    except OSError:
        method = "VmHWM-VmRSS (no clear_refs: high-water mark not reset, may under-report)"
    base = _status_kb("VmRSS")
    out = fn(inputs)
    peak = _status_kb("VmHWM") - base
    del out
    return max(int(peak), 0), method


def allow_recompiles() -> None:
    """Cases compile the same formula at new static shapes; dynamo's default limit (8 per code
    object) would otherwise fall back to eager, silently, after a few sizes."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_case(case: Case, device: str, *, quick: bool, rounds: int, warmup: int, min_sample_s: float,
             max_seconds: float, measure_cuda_memory: bool | None = None) -> dict:
    """Check, then time one case. Returns a JSON-ready dict; memory is filled in here on CUDA and by
    `wmkernels.bench.__main__` (separate processes) on CPU."""
    fns = active_contenders(case, quick)
    res = {
        "op": case.op, "name": case.name, "size": case.size, "dtype": case_dtype(case), "sweep": case.sweep,
        "params": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in case.params.items()},
        "bytes_moved": case.bytes_moved, "flops": case.flops, "reference": case.reference,
        "rtol": case.rtol, "atol": case.atol, "status": "ok", "error": "", "contenders": {}, "floor": None,
    }
    if case.reference not in fns:
        res.update(status="error", error=f"reference contender {case.reference!r} not among {list(fns)}")
        return res
    allow_recompiles()
    torch.manual_seed(0)
    try:
        inputs = case.setup()
        sync(device)
    except Exception as exc:  # one broken case must not stop the suite
        res.update(status="error", error=f"setup: {type(exc).__name__}: {exc}")
        return res
    ref_out, ref_err = None, ""
    try:
        ref_out = fns[case.reference](inputs)
        sync(device)
    except Exception as exc:  # e.g. eager out of memory where a fused kernel fits: time the others unchecked
        ref_err = f"{type(exc).__name__}: {exc}"
    if ref_err:
        _release(device)  # after the except block, so the traceback no longer holds its tensors
    timed = {}
    for name, fn in fns.items():
        entry = {"status": "ok", "error": "", "max_abs_err": 0.0}
        if name == case.reference:
            if ref_err:
                entry.update(status="error", error=ref_err)
        else:
            try:
                out = fn(inputs)
                sync(device)
                if ref_out is None:
                    entry.update(status="unchecked", error=f"reference {case.reference!r} failed: nothing to compare with")
                else:
                    ok, why, err = compare(out, ref_out, case.rtol, case.atol)
                    entry["max_abs_err"] = err
                    if not ok:
                        entry.update(status="FAILED", error=why)
                del out
            except Exception as exc:
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
            if entry["status"] == "error":
                _release(device)
        res["contenders"][name] = entry
        if entry["status"] in TIMED:
            timed[name] = fn
    del ref_out
    if case.floor is not None:
        try:
            case.floor(inputs)
            timed["__floor__"] = case.floor
        except Exception as exc:
            res["floor_error"] = f"{type(exc).__name__}: {exc}"
    stats = interleaved_timing(timed, inputs, device, rounds=rounds, warmup=warmup,
                               min_sample_s=min_sample_s, max_seconds=max_seconds) if timed else {}
    for name, st in stats.items():
        if "error" in st:
            if name == "__floor__":
                res["floor_error"] = st["error"]
            else:
                res["contenders"][name].update(status="error", error=st["error"])
            timed.pop(name)
        elif name == "__floor__":
            res["floor"] = st
        else:
            res["contenders"][name].update(st)
    if len(timed) < len(stats):
        _release(device)
    if measure_cuda_memory is None:
        measure_cuda_memory = device.startswith("cuda")
    if measure_cuda_memory:
        for name, fn in timed.items():
            if name != "__floor__":
                c = res["contenders"][name]
                try:
                    c["peak_extra_bytes"] = cuda_peak_extra_bytes(fn, inputs)
                    c["memory_method"] = "torch.cuda.max_memory_allocated"
                except Exception as exc:
                    c["peak_extra_bytes"], c["memory_method"] = None, f"failed: {type(exc).__name__}: {exc}"
                if c["peak_extra_bytes"] is None:
                    _release(device)
    return res


def derive_metrics(res: dict, roofline: dict) -> dict:
    """Adds speed-ups vs "eager"/"compile", GB/s, FLOP/s and their fractions of the roofline, and
    the fraction of the memory floor, to every timed contender of a case result."""
    cs = res["contenders"]

    def median(name):
        c = cs.get(name)
        return c.get("median_s") if c and c.get("status") in TIMED else None

    eager, comp, ref = median("eager"), median("compile"), median(res.get("reference"))
    floor = res["floor"]["median_s"] if res.get("floor") else None
    copy = roofline.get("copy_gbps")
    peak = roofline.get("matmul_tflops", {})
    peak_flops = peak.get("bfloat16" if res.get("dtype") in ("bfloat16", "float16") else "float32")
    for c in cs.values():
        t = c.get("median_s") if c.get("status") in TIMED else None
        if not t:
            continue
        c["speedup_vs_eager"] = eager / t if eager else None
        c["speedup_vs_compile"] = comp / t if comp else None
        c["speedup_vs_reference"] = ref / t if ref else None
        c["floor_fraction"] = floor / t if floor else None
        if res.get("bytes_moved"):
            c["gbps"] = res["bytes_moved"] / t / 1e9
            c["bw_fraction"] = c["gbps"] / copy if copy else None
        if res.get("flops"):
            c["tflops"] = res["flops"] / t / 1e12
            c["flops_fraction"] = c["tflops"] / peak_flops if peak_flops else None
    if floor and res.get("bytes_moved"):
        res["floor"]["gbps"] = res["bytes_moved"] / floor / 1e9
    return res
