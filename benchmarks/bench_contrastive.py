"""pytest-benchmark over the contrastive cases of `wmkernels/bench/contrastive.py` (the cases
`wmkernels-bench --op contrastive` times in interleaved rounds, with peak memory):
`pytest benchmarks/bench_contrastive.py`. Quick shape (B=1024, D=256) by default; set
WMKERNELS_BENCH_FULL=1 for issue 4's shapes (B = 4096, 16384 x D = 256, 512 on CPU; up to B = 262144
on GPU), WMKERNELS_BENCH_DEVICE=cpu|cuda to pick the device. Every contender is checked equal to
eager first."""
import os

import pytest
import torch

from wmkernels.bench import contrastive, harness

DEVICE = os.environ.get("WMKERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("WMKERNELS_BENCH_FULL", "0") != "1"
CASES = contrastive.cases(DEVICE, QUICK)
PARAMS = [pytest.param(c, n, id=f"{c.name}-{n}") for c in CASES for n in harness.active_contenders(c, QUICK)]
_inputs: dict = {}


def _case_inputs(case: harness.Case):
    """Inputs and reference output of one case, kept while its contenders run (one case at a time)."""
    if case.name not in _inputs:
        _inputs.clear()
        harness.allow_recompiles()
        torch.manual_seed(0)
        inputs = case.setup()
        _inputs[case.name] = (inputs, case.contenders[case.reference](inputs))
    return _inputs[case.name]


@pytest.mark.parametrize("case,contender", PARAMS)
def test_contrastive(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    fn = case.contenders[contender]
    ok, why, _ = harness.compare(fn(inputs), ref, case.rtol, case.atol)
    assert ok, f"{contender} differs from {case.reference}: {why}"
    benchmark.group = case.name
    benchmark.extra_info.update(size=case.size, flops=case.flops, device=DEVICE)

    def call():
        fn(inputs)
        harness.sync(DEVICE)

    benchmark.pedantic(call, rounds=3 if QUICK else 5, warmup_rounds=1, iterations=1)
    benchmark.extra_info["gflops_nominal"] = case.flops / benchmark.stats.stats.median / 1e9
