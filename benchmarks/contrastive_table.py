"""Issue 4's table in one lean run: `python benchmarks/contrastive_table.py [--rounds 2] [--out DIR]`.

Uses the cases of `wmkernels/bench/contrastive.py` (full shapes) and the harness's checks, but
fewer calls than `wmkernels-bench` (one checked call that also warms up, then `--rounds`
interleaved timed calls, rotated order) because one fp32 forward+backward at B = 16384 takes
tens of seconds on a small CPU. Peak extra memory per contender is measured in a process of its
own exactly as the harness does (VmHWM - VmRSS after a warm-up call, MALLOC_MMAP_THRESHOLD_=65536).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from wmkernels.bench import contrastive, harness


def _memory(case_name: str, contender: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    code = ("import sys, torch; from wmkernels.bench import contrastive, harness; "
            f"c = {{x.name: x for x in contrastive.cases('cpu', False)}}[{case_name!r}]; torch.manual_seed(0); "
            f"print(harness.cpu_peak_extra_bytes(c.contenders[{contender!r}], c.setup())[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--contenders", default="eager,compile,wmkernels-cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/contrastive-cpu")
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = args.contenders.split(",")
    results = []
    for case in contrastive.cases("cpu", False):
        if args.cases and case.name not in args.cases.split(","):
            continue
        harness.allow_recompiles()
        torch.manual_seed(0)
        inputs = case.setup()
        fns = {n: case.contenders[n] for n in names if n in case.contenders}
        ref = fns[case.reference](inputs)
        row = {"case": case.name, **case.params, "threads": torch.get_num_threads(), "contenders": {}}
        for n, fn in fns.items():
            t0 = time.perf_counter()
            ok, why, err = harness.compare(fn(inputs), ref, case.rtol, case.atol)
            row["contenders"][n] = {"ok": ok, "why": why, "max_abs_err": err, "first_call_s": time.perf_counter() - t0,
                                    "samples_s": []}
            print(f"{case.name} {n}: checked ok={ok} {why} first call {time.perf_counter() - t0:.1f}s", flush=True)
        for r in range(args.rounds):
            order = list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]
            for n in order:
                t0 = time.perf_counter()
                fns[n](inputs)
                row["contenders"][n]["samples_s"].append(time.perf_counter() - t0)
        del inputs, ref
        for n, c in row["contenders"].items():
            c["median_s"] = statistics.median(c["samples_s"])
            c["gflops_nominal"] = case.flops / c["median_s"] / 1e9
            if not args.no_memory:
                c["peak_extra_bytes"] = _memory(case.name, n)
            print(f"{case.name} {n}: {c['median_s']:.2f}s {c.get('peak_extra_bytes', 0) / 2**20:.0f} MiB", flush=True)
        results.append(row)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| case | contender | median s (fwd+bwd) | vs eager | peak extra MiB | vs eager |", "|---|---|---|---|---|---|"]
    for row in results:
        e = row["contenders"].get("eager", {})
        for n, c in row["contenders"].items():
            mem = c.get("peak_extra_bytes")
            lines.append(f"| {row['case']} | {n} | {c['median_s']:.2f} | {e['median_s'] / c['median_s']:.2f}x | "
                         f"{mem / 2**20:.0f} | {mem / e['peak_extra_bytes']:.1%} |" if mem is not None and e.get("peak_extra_bytes")
                         else f"| {row['case']} | {n} | {c['median_s']:.2f} | {e['median_s'] / c['median_s']:.2f}x | - | - |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
