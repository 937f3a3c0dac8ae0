"""pytest-benchmark over the contrastive cases of `wmkernels/bench/contrastive.py` (the cases
`wmkernels-bench --op contrastive` times in interleaved rounds, with peak memory):
`pytest benchmarks/bench_contrastive.py`. Quick shape (B=1024, D=256) by default; set
WMKERNELS_BENCH_FULL=1 for issue 4's shapes (B = 4096, 16384 x D = 256, 512 on CPU; up to B = 262144
on GPU), WMKERNELS_BENCH_DEVICE=cpu|cuda to pick the device. Every contender is checked equal to
eager first."""
import pytest

from _cases import DEVICE, QUICK, CaseInputs, check, params, run
from wmkernels.bench import contrastive

CASES = contrastive.cases(DEVICE, QUICK)
PARAMS = params(CASES)
_case_inputs = CaseInputs()


@pytest.mark.parametrize("case,contender", PARAMS)
def test_contrastive(benchmark, case, contender):
    inputs, ref = _case_inputs(case)
    fn = check(case, contender, inputs, ref)
    median = run(benchmark, case, fn, inputs, rounds=3 if QUICK else 5, warmup_rounds=1, size=case.size, flops=case.flops)
    if median is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_nominal"] = case.flops / median / 1e9
