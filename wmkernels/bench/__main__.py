"""`wmkernels-bench` / `python -m wmkernels.bench`: every op against eager PyTorch and torch.compile,
with a roofline measured in the same run; writes results.json, results.md and plots.

On CPU the timing runs in a child process whose environment sets glibc's MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ high (glibc reads them at start-up), so freed buffers are reused instead of
being unmapped and page-faulted in again on every call; for MSE a second child runs with glibc's
defaults for comparison. Each contender's peak memory is measured in a process of its own.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = ("mse", "masked", "contrastive", "train")
CACHING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 35), "MALLOC_TRIM_THRESHOLD_": str(1 << 35)}
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
ALLOCATOR_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD",
                  "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS")
CPU_MEMORY_METHOD = ("CPU: peak RSS growth of one forward+backward in a process of its own, after a warm-up "
                     "call: VmHWM - VmRSS from /proc/self/status, the high-water mark reset through "
                     "/proc/self/clear_refs, with MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave RSS")
CUDA_MEMORY_METHOD = "CUDA: torch.cuda.max_memory_allocated() during one forward+backward minus the bytes allocated before it"


_START = time.monotonic()
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _say(msg: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wmkernels-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default=",".join(OPS), help=f"comma-separated ops (default: {','.join(OPS)})")
    p.add_argument("--dtype", default=None, help="comma-separated dtypes to keep, e.g. float32,bfloat16 (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="keep only the cases whose 'op/name' matches this regular expression")
    p.add_argument("--quick", action="store_true", help="small shapes, no torch.compile contenders (CI smoke run)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>-<date>[-quick]/)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per case (default 15, quick 5)")
    p.add_argument("--allocator", choices=("auto", "caching", "default", "both"), default="auto",
                   help="CPU allocator settings to time under: caching (high glibc malloc thresholds), glibc's "
                        "defaults, or both (auto: both for mse in a full run, else caching)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--jobs", type=int, default=2, help="CPU memory-measurement processes run at once")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the timed code (default: torch's own choice)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: time in this process with its own allocator settings, no memory measurement")
    p.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 5 if args.quick else 15
    for name in ("rounds", "jobs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    unknown = [o for o in (o.strip() for o in args.op.split(",")) if o and o not in OPS]
    if unknown or not args.op.strip(","):  # a typo must not pass for a clean run of the rest
        p.error(f"--op: unknown op {', '.join(map(repr, unknown)) or repr(args.op)} (known: {', '.join(OPS)})")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as exc:
            p.error(f"--only {args.only!r} is not a regular expression: {exc}")
    if args.device == "cuda" and args.worker is None:
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                    f"(torch.cuda.is_available() is False); use --device cpu")
    return args


def _threads_argv(args) -> list[str]:
    return ["--threads", str(args.threads)] if args.threads else []


def _dtypes(args) -> set[str] | None:
    from .harness import normalize_dtype

    return {normalize_dtype(d.strip()) for d in args.dtype.split(",")} if args.dtype else None


def load_cases(op: str, device: str, quick: bool, dtypes: set[str] | None, only: str | None = None) -> list:
    from .harness import case_dtype

    module = importlib.import_module(f"wmkernels.bench.{op}")
    cases = module.cases(device, quick)
    return [c for c in cases if (dtypes is None or case_dtype(c) is None or case_dtype(c) in dtypes)
            and (only is None or re.search(only, f"{op}/{c.name}"))]


def _timing_settings(quick: bool, device: str) -> dict:
    cuda = device.startswith("cuda")
    return dict(warmup=1 if quick else 3, min_sample_s=(0.005 if quick else 0.02) if cuda else (0.002 if quick else 0.01),
                max_seconds=2.0 if quick else 30.0)


def time_ops(ops: list[str], device: str, quick: bool, rounds: int, dtypes, label: str, progress=None,
             only: str | None = None) -> dict:
    """Roofline + every case of `ops`, in this process. Returns {"roofline", "cases"}; calls
    `progress(roofline, results so far)` after each case when given."""
    import gc

    import torch

    from . import harness, roofline

    _say(f"[{label}] measuring the roofline on {device}")
    rl_before = roofline.measure(device, quick)
    results, skipped = [], {}
    for op in ops:
        try:
            cases = load_cases(op, device, quick, dtypes, only)
        except Exception as exc:  # a broken cases file must not cost the other ops their run
            skipped[op] = f"cases() failed: {type(exc).__name__}: {exc}"
            _say(f"[{label}] skipping {op}: {skipped[op]}")
            continue
        for case in cases:
            _say(f"[{label}] {op}/{case.name}: {', '.join(harness.active_contenders(case, quick))}")
            try:
                res = harness.run_case(case, device, quick=quick, rounds=rounds, **_timing_settings(quick, device))
            except Exception as exc:  # e.g. out of memory while timing
                res = {"op": op, "name": case.name, "size": case.size, "dtype": harness.case_dtype(case),
                       "sweep": case.sweep, "params": {}, "bytes_moved": case.bytes_moved, "flops": case.flops,
                       "reference": case.reference, "status": "error", "contenders": {}, "floor": None,
                       "error": f"{type(exc).__name__}: {exc}"}
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            res["allocator"] = label
            for name, c in res["contenders"].items():
                if c["status"] != "ok":
                    _say(f"[{label}]   {name}: {c['status']}: {c['error']}")
            if res["status"] != "ok":
                _say(f"[{label}]   case error: {res['error']}")
            results.append(res)
            if progress is not None:
                progress(rl_before, results)
    rl_after = roofline.measure(device, quick)
    rl = {  # the best the device showed in this run, so fractions are not flattered by a slow moment
        "copy_gbps": max(rl_before["copy_gbps"], rl_after["copy_gbps"]),
        "matmul_tflops": {k: max(v, rl_after["matmul_tflops"][k]) for k, v in rl_before["matmul_tflops"].items()},
        "before": rl_before, "after": rl_after,
    }
    return {"roofline": rl, "cases": results, "skipped": skipped}


def memory_worker(args) -> dict:
    """Peak extra memory of each (case, contender) in the JSON list `--case`, one after another,
    each after its own warm-up call and high-water-mark reset."""
    import torch

    from . import harness

    cases = {c.name: c for c in load_cases(args.op, args.device, args.quick, None)}
    harness.allow_recompiles()
    out = {}
    for case_name, names in json.loads(args.case):
        case = cases[case_name]
        torch.manual_seed(0)
        inputs = case.setup()
        fns = harness.active_contenders(case, args.quick)
        for name in names:
            try:  # one contender failing here must not cost the others of this process their numbers
                peak, method = harness.cpu_peak_extra_bytes(fns[name], inputs)
            except Exception as exc:
                peak, method = None, f"failed: {type(exc).__name__}: {exc}"
            out[f"{case_name}/{name}"] = {"peak_extra_bytes": peak, "memory_method": method}
        del inputs
    return out


def _worker_env(overrides: dict, drop: tuple = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(overrides)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_worker(argv: list[str], env: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "wmkernels.bench", *argv, "--worker-out", str(out)]
        proc = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"worker {' '.join(argv)} exited with {proc.returncode}: {proc.stdout[-2000:]}")
        return json.loads(out.read_text())


def _allocator_plan(args, ops: list[str]) -> dict[str, tuple[list[str], dict, tuple, str]]:
    """label -> (ops, env overrides, env vars dropped, description)."""
    user_set = [v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if v in os.environ]
    if user_set:
        desc = "as set by the user: " + ", ".join(f"{v}={os.environ[v]}" for v in user_set)
        caching = ({}, (), desc)
    else:
        caching = (CACHING_ENV, (), "glibc with " + ", ".join(f"{k}={v}" for k, v in CACHING_ENV.items()))
    default = ({}, ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"), "glibc defaults (no MALLOC_* tuning)")
    mode = args.allocator
    plan = {}
    if mode in ("auto", "caching", "both"):
        plan["caching" if not user_set else "user"] = (ops, *caching)
    if mode in ("default", "both"):
        plan["default"] = (ops, *default)
    elif mode == "auto" and not args.quick and "mse" in ops:
        plan["default"] = (["mse"], *default)
    return plan


def machine_info(device: str) -> dict:
    import torch

    info = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["cpu_model"] = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        info["device_name"] = f"CPU {info['cpu_model']} x{info['cpu_count']}"
    info["allocator_env"] = {k: os.environ.get(k) for k in ALLOCATOR_VARS}
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = _LOAD_AT_START
        info["loadavg_end"] = os.getloadavg()[0]
    info["git_commit"] = _git_commit()
    try:
        import wmkernels

        info["wmkernels"] = wmkernels.__version__
        info["backends"] = {k: {"available": v.available, "reason": v.reason}
                            for k, v in wmkernels.available_backends().items()}
    except Exception as exc:  # the report should still be written
        info["wmkernels"] = f"import failed: {exc}"
    return info


def _git_commit() -> str | None:
    if os.environ.get("WMKERNELS_GIT_COMMIT"):  # a copy of the tree without .git (a GPU runner's)
        return os.environ["WMKERNELS_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # an installed package: git would name the repo around site-packages
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def default_out(device: str, quick: bool, threads: int | None = None) -> Path:
    if device.startswith("cuda"):
        import torch

        tag = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    else:
        tag = "cpu"
    date = datetime.date.today().isoformat()
    tag += f"-{threads}thread" if threads else ""
    return Path("benchmarks") / "results" / f"{tag}-{date}{'-quick' if quick else ''}"


def _measure_cpu_memory(args, results: list[dict]) -> None:
    """One process per contender; in quick mode one per op (its cases one after another)."""
    by_op: dict[str, list] = {}
    for res in results:
        if res["status"] == "ok":
            names = [n for n, c in res["contenders"].items() if c["status"] in ("ok", "unchecked")]
            by_op.setdefault(res["op"], []).extend([(res, [n]) for n in names] if not args.quick else [(res, names)])
    jobs = []
    for op, items in by_op.items():
        groups = [items] if args.quick else [[item] for item in items]
        for group in groups:
            spec = json.dumps([[res["name"], names] for res, names in group])
            argv = ["--worker", "memory", "--device", args.device, "--op", op, "--case", spec] + \
                   (["--quick"] if args.quick else []) + _threads_argv(args)
            jobs.append((group, argv))
    env = _worker_env(MEMORY_ENV)
    _say(f"measuring peak memory: {len(jobs)} processes, {args.jobs} at a time")

    def one(job):
        group, argv = job
        try:
            got = _run_worker(argv, env, timeout=900)
        except Exception as exc:
            got = {}
            _say(f"memory worker failed: {exc}")
        for res, names in group:
            for n in names:
                res["contenders"][n].update(got.get(f"{res['name']}/{n}", {"peak_extra_bytes": None,
                                                                             "memory_method": "failed"}))

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, jobs))


def run(args) -> Path:
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = device
    ops, skipped = [o.strip() for o in args.op.split(",") if o.strip()], {}  # known ops (parse_args)
    out_dir = Path(args.out) if args.out else default_out(device, args.quick, args.threads)
    try:  # before the timing: a run of many minutes must not end in an unwritable folder
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _say(f"--out {str(out_dir)!r}: cannot write results there ({e.strerror or e})")
        raise SystemExit(2) from e
    runs, cases = {}, []
    if device == "cpu" and not args.in_process:
        plan = _allocator_plan(args, ops)
        for label, (plan_ops, env, drop, desc) in plan.items():
            argv = ["--worker", "time", "--device", device, "--op", ",".join(plan_ops),
                    "--rounds", str(args.rounds)] + (["--quick"] if args.quick else []) + _threads_argv(args) + \
                   (["--dtype", args.dtype] if args.dtype else []) + (["--only", args.only] if args.only else [])
            worker_env = _worker_env(env, drop)
            got = _run_worker(argv + ["--allocator", "caching"], worker_env, timeout=3600)
            runs[label] = {"roofline": got["roofline"], "allocator_desc": desc,
                           "env": {k: worker_env.get(k) for k in ALLOCATOR_VARS}}
            for res in got["cases"]:
                res["allocator"] = label
            cases += got["cases"]
            skipped.update(got.get("skipped", {}))
        primary = next(iter(plan))
        if not args.no_memory:
            _measure_cpu_memory(args, [c for c in cases if c["allocator"] == primary])
        memory_method = CPU_MEMORY_METHOD
    else:
        label = "cuda-caching" if device.startswith("cuda") else "in-process"
        desc = (f"PyTorch CUDA caching allocator (PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')})"
                if device.startswith("cuda") else "this process's own settings (--in-process)")
        memory_method = CUDA_MEMORY_METHOD if device.startswith("cuda") else "not measured (--in-process)"
        env = {k: os.environ.get(k) for k in ALLOCATOR_VARS}

        def partial(roof, results):  # a GPU lease may end mid-run: keep what was measured
            _write(out_dir, args, ops, skipped, {label: {"roofline": roof, "allocator_desc": desc, "env": env}},
                   [dict(r) for r in results], label, memory_method, quiet=True)

        got = time_ops(ops, device, args.quick, args.rounds, _dtypes(args), label, progress=partial, only=args.only)
        runs[label] = {"roofline": got["roofline"], "allocator_desc": desc, "env": env}
        cases = got["cases"]
        skipped.update(got["skipped"])
        primary = label
    _write(out_dir, args, ops, skipped, runs, cases, primary, memory_method)
    print((out_dir / "results.md").read_text())
    return out_dir


def _write(out_dir: Path, args, ops, skipped, runs, cases, primary, memory_method, quiet=False) -> None:
    from . import harness, report

    for res in cases:
        harness.derive_metrics(res, runs[res["allocator"]]["roofline"])
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(args.device),
        "config": {"command": "wmkernels-bench " + " ".join(sys.argv[1:]), "ops": ops, "device": args.device,
                   "quick": args.quick, "dtype": args.dtype, "rounds": args.rounds, "threads": args.threads,
                   **_timing_settings(args.quick, args.device)},
        "memory_method": memory_method,
        "primary_run": primary,
        "runs": runs,
        "skipped_ops": skipped,
        "roofline": runs[primary]["roofline"],
        "cases": cases,
    }
    files = report.write_all(out_dir, payload, plots=not quiet)  # partial writes skip the slow plots
    if not quiet:
        _say(f"wrote {', '.join(files)} to {out_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker == "time":
        got = time_ops([o for o in args.op.split(",") if o], args.device, args.quick, args.rounds, _dtypes(args),
                       "worker", only=args.only)
        Path(args.worker_out).write_text(json.dumps(got, default=str))
        return 0
    if args.worker == "memory":
        Path(args.worker_out).write_text(json.dumps(memory_worker(args)))
        return 0
    out_dir = run(args)
    payload = json.loads((out_dir / "results.json").read_text())
    failed = []
    for c in payload["cases"]:
        if c["status"] != "ok":
            failed.append(f"{c['op']}/{c['name']}")
        for n, r in c["contenders"].items():  # out of memory is a result (eager at the largest shapes), not a bug
            if r["status"] == "FAILED" or (r["status"] == "error" and "out of memory" not in r["error"].lower()):
                failed.append(f"{c['op']}/{c['name']}/{n}")
    failed += [op for op, why in payload["skipped_ops"].items() if why.startswith("cases() failed")]
    if failed:
        _say(f"{len(failed)} contender(s) failed or errored: {', '.join(failed)}")
        return 1
    if not payload["cases"]:  # a typo in --op/--only/--dtype must not pass for a clean run
        _say(f"no case was run: nothing matched --op {args.op}"
             + (f" --only {args.only}" if args.only else "") + (f" --dtype {args.dtype}" if args.dtype else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
