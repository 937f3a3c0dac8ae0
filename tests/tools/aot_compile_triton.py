"""Compiles every Triton kernel wmkernels ships, for each dtype and config it launches with,
ahead of time to PTX and cubin for sm_80 and sm_90 (no GPU needed). Run without
TRITON_INTERPRET: the interpreter accepts code that real Triton rejects. The last target of each
spec (sm_90) gets the launcher's aligned specialization (`aligned_attrs`), the variant that runs
at scale, and its register spills and tensor-core instructions are checked there; earlier targets
compile the unspecialized variant.

Usage: python aot_compile_triton.py MODULE [MODULE ...]; prints one line per module and fails
on the first kernel that does not compile, spills registers beyond its allowance or lacks the
wgmma its spec expects.
"""
import os
import re
import subprocess
import sys
import tempfile
import importlib
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)


def ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (its bundled one is newer than CUDA's)."""
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch).path
    except TypeError:  # older Triton: get_ptxas() takes no argument
        return compiler.get_ptxas().path


def spills(ptx: str, arch: int) -> int:
    target = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas(arch), f"-arch={target}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    found = re.findall(r"(\d+) bytes spill (?:stores|loads)", out.stderr)
    if not found:
        raise RuntimeError(f"ptxas -v printed no spill report:\n{out.stderr}")
    return sum(int(n) for n in found)


def aligned_attrs(fn, signature: dict, divisible=()) -> dict:
    """The specialization Triton's launcher compiles in the common case: every pointer 16-byte
    aligned (fresh torch allocations are) and the named integer arguments divisible by 16. Loads
    vectorize and pipeline (cp.async) only under it, which changes register use: spill and wgmma
    checks are made on this variant, the one that runs at scale."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
            if t.startswith("*") or n in divisible}


def compile_spec(name: str, index: int) -> None:
    """Compiles spec `index` of module `name` for its targets; raises on a missing cubin, on
    register spills beyond the spec's allowance, or on tensor-core code without Hopper's wgmma
    where the spec expects it."""
    spec = importlib.import_module(name).aot_specs()[index]
    fn, sig, cx = spec[:3]
    # the options every launch passes, then num_warps / num_stages the host code launches with
    options = {**importlib.import_module("wmkernels.triton._index").LAUNCH, **(spec[3] if len(spec) > 3 else {})}
    checks = spec[4] if len(spec) > 4 else {}  # targets, tolerated spill bytes, wgmma, divisible ints
    archs = checks.get("archs", ARCHS)
    for arch in archs:  # the earlier targets without alignment assumptions, the last one with them
        attrs = aligned_attrs(fn, sig, checks.get("divisible", ())) if arch == archs[-1] else {}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"{name}.{fn.__name__} {cx}: no cubin for sm_{arch}")
    n = spills(compiled.asm["ptx"], archs[-1])
    if n > checks.get("max_spill_bytes", 0):
        raise RuntimeError(f"{name}.{fn.__name__} {cx} {options}: {n} bytes of register spills on sm_{archs[-1]}")
    if checks.get("wgmma") and archs[-1] >= 90 and "wgmma.mma_async" not in compiled.asm["ptx"]:
        raise RuntimeError(f"{name}.{fn.__name__} {cx} {options}: no wgmma in the sm_{archs[-1]} code (mma.sync only)")
    if checks.get("no_fma") and re.search(r"\bfma\.rn\.f(32|64)\b", compiled.asm["ptx"]):
        raise RuntimeError(f"{name}.{fn.__name__} {cx} {options}: fused multiply-adds in the sm_{archs[-1]} code "
                           "(a logit must be rounded once, as the forward forms it)")


def main(modules: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    # one process per core: the compiles are independent and each is single-threaded
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for name in modules:
            count = len(importlib.import_module(name).aot_specs())
            list(pool.map(compile_spec, [name] * count, range(count)))
            print(f"{name}: {count} kernel configs compiled for sm_80 / sm_90, no spills beyond those allowed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
